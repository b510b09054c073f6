"""Built-in datasets: UCI Multiple Features (vendored) and the synthetic planted-answer tasks.

``BUILTINS`` maps each name (listed by ``attnfuse datasets``) to a factory and a one-line
description. Every factory has the same signature, ``factory(seed=0) -> MultimodalDataset``: a
generated data set draws from ``seed``; a vendored one ignores it.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from importlib import resources

import numpy as np

from ..checks import check_float, check_int
from .dataset import MultimodalDataset
from .io.npz import load_npz

MFEAT_VIEWS = ("fou", "fac", "kar", "pix", "zer", "mor")


def load_mfeat(seed: int = 0) -> MultimodalDataset:
    """UCI Multiple Features: 2,000 handwritten digits (200 per class), y int64 in 0..9.

    Six vector modalities, in this order: fou (76 Fourier coefficients), fac (216 profile
    correlations), kar (64 Karhunen-Loeve coefficients), pix (240 pixel averages), zer (47 Zernike
    moments), mor (6 morphological features). No predefined split. See resources/ATTRIBUTION.md.
    ``seed`` is accepted for the factories' common signature; the data is fixed.
    """
    with resources.as_file(resources.files("attnfuse") / "resources" / "mfeat.npz") as path:
        data = load_npz(path)
    names = [m.name for m in data.modalities]
    if names != list(MFEAT_VIEWS):  # guards against a badly regenerated file
        raise ValueError(f"mfeat.npz: expected modalities {list(MFEAT_VIEWS)}, got {names}")
    data.name = "mfeat"
    return data


def make_planted(
    n: int = 2000,
    seq_len: int = 8,
    num_keys: int = 16,
    key_dim: int = 16,
    value_dim: int = 8,
    noise: float = 0.1,
    task: str = "regression",
    num_classes: int = 4,
    seed: int = 0,
) -> MultimodalDataset:
    """A task that needs cross-modal attention: find the video step whose key matches the text.

    text: (N, key_dim) vector, a query = one codebook key + noise.
    video: (N, seq_len, key_dim + value_dim); step t = [key_t + noise, v_t * u + noise], where the
        seq_len keys of a sample are distinct keys from a fixed random codebook of num_keys keys,
        v_t ~ U(-1, 1) and u is a fixed unit direction in value_dim dims.
    Exactly one step's key equals the query. Regression: y = v at that step (float32 (N,));
    classification: y = the bin of that v among num_classes equal-width bins of [-1, 1] (int64).

    Pooling video over time destroys which value belongs to which key, so pooled features only
    tell the mean of the values (R^2 about 1/seq_len); text->video attention can pick the step.
    info: "planted_step" (N,) the matching step, "values" (N, seq_len) the v_t,
    "key_ids" (N, seq_len) the codebook index of each step's key, "query_id" (N,).
    """
    for arg, value, low in (
        ("n", n, 1),
        ("seq_len", seq_len, 1),
        ("num_keys", num_keys, 1),
        ("key_dim", key_dim, 1),
        ("value_dim", value_dim, 1),
        ("num_classes", num_classes, 2),
    ):
        check_int(arg, value, low)
    if num_keys < seq_len:
        raise ValueError(f"num_keys: expected >= seq_len={seq_len} (each step needs a distinct key), got {num_keys}")
    check_float("noise", noise, 0.0)
    if task not in ("regression", "classification"):
        raise ValueError(f"task: expected 'regression' or 'classification', got {task!r}")

    text, video, answer, info = _planted_arrays(n, seq_len, num_keys, key_dim, value_dim, noise, seed)
    if task == "regression":
        y = answer.astype(np.float32)
    else:
        y = np.minimum(((answer + 1.0) / 2.0 * num_classes).astype(np.int64), num_classes - 1)
    return MultimodalDataset(
        {"text": text, "video": video},
        y,
        task=task,
        name=f"synthetic-{task}",
        info=info,
        num_classes=num_classes if task == "classification" else None,
    )


def _planted_arrays(
    n: int, seq_len: int, num_keys: int, key_dim: int, value_dim: int, noise: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """:func:`make_planted`'s draw: text ``(N, key_dim)`` and video ``(N, seq_len, key_dim +
    value_dim)`` float32, the planted answer v ``(N,)`` float64 in [-1, 1], and the info arrays."""
    rng = np.random.default_rng(seed)
    # Fixed (per seed) codebook and value direction. Keys are scaled to norm sqrt(key_dim), i.e.
    # unit RMS per coordinate, so `noise` is relative to a unit signal in every coordinate.
    codebook = rng.standard_normal((num_keys, key_dim))
    codebook *= np.sqrt(key_dim) / np.linalg.norm(codebook, axis=1, keepdims=True)
    direction = rng.standard_normal(value_dim)
    direction /= np.linalg.norm(direction)

    # Per sample: seq_len distinct keys (first seq_len of a random permutation), one planted step.
    key_ids = np.argsort(rng.random((n, num_keys)), axis=1)[:, :seq_len]
    planted = rng.integers(0, seq_len, size=n)
    rows = np.arange(n)
    query_id = key_ids[rows, planted]
    values = rng.uniform(-1.0, 1.0, size=(n, seq_len))

    text = codebook[query_id] + noise * rng.standard_normal((n, key_dim))
    video_keys = codebook[key_ids] + noise * rng.standard_normal((n, seq_len, key_dim))
    video_values = values[:, :, None] * direction + noise * rng.standard_normal((n, seq_len, value_dim))
    video = np.concatenate([video_keys, video_values], axis=2)
    info = {
        "planted_step": planted.astype(np.int64),
        "values": values.astype(np.float32),
        "key_ids": key_ids.astype(np.int64),
        "query_id": query_id.astype(np.int64),
    }
    return text.astype(np.float32), video.astype(np.float32), values[rows, planted], info


BUILTINS: dict[str, tuple[Callable[..., MultimodalDataset], str]] = {
    "mfeat": (load_mfeat, "UCI Multiple Features: 2,000 handwritten digits, 6 feature views, 10 classes"),
    "synthetic-regression": (
        partial(make_planted, task="regression"),
        "planted cross-modal lookup: predict the video value whose key matches the text query (regression)",
    ),
    "synthetic-classification": (
        partial(make_planted, task="classification"),
        "planted cross-modal lookup: classify the binned video value whose key matches the text query",
    ),
}
