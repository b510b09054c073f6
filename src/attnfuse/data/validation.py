"""Validation of a dataset's parts, as functions (in the manner of scikit-learn's ``check_array``).

Each ``check_*`` raises ``ValueError`` or ``TypeError`` naming the argument (and the modality),
what was expected and what was found: the CLI prints these messages as one-line errors. The
checks of shapes and dtypes read only array headers; the checks of values walk the arrays in
chunks of rows (:func:`check_values`), so a memory-mapped modality is never read whole.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..options import shorten
from ._memory import is_mapped, release_pages, row_chunks
from .labels import class_codes

__all__ = [
    "SPLITS",
    "TASKS",
    "Targets",
    "check_features",
    "check_columns",
    "check_info",
    "check_mask",
    "check_modality_name",
    "check_rows",
    "check_some_token",
    "check_split",
    "check_targets",
    "check_values",
]

SPLITS = ("train", "valid", "test")
TASKS = ("auto", "classification", "regression")
# Modality names become token labels ("video[3]") and keys of the models' nn.ModuleDicts, which
# reject '.' and names of their own attributes.
MODALITY_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
RESERVED_NAMES = frozenset(n for n in dir(torch.nn.ModuleDict) if not n.startswith("_"))
FLOAT32_MAX = float(np.finfo(np.float32).max)


def check_modality_name(name: object, where: str = "features") -> str:
    """A modality name usable as a token label and an nn.ModuleDict key."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"{where}: modality names must be non-empty strings, got {name!r}")
    if not MODALITY_NAME.fullmatch(name) or name in RESERVED_NAMES:
        raise ValueError(
            f"{where}: modality name {name!r} is not usable: expected letters, digits, '_' or '-' "
            f"(no '.' or brackets), starting with a letter, and not a name of torch's nn.ModuleDict "
            f"(e.g. 'train', 'to', 'eval', 'keys')"
        )
    return name


def check_features(name: str, x: Any, n: int) -> np.ndarray:
    """One modality's array, (N, D) or (N, T, D) real, checked from its header only (no copy)."""
    arr = x if isinstance(x, np.ndarray) else np.asarray(x)
    if arr.dtype.kind not in "iuf":
        raise TypeError(f"features[{name!r}]: expected a real-valued (float) array, got dtype {arr.dtype}")
    if arr.ndim not in (2, 3):
        raise ValueError(f"features[{name!r}]: expected shape (N, D) or (N, T, D), got shape {arr.shape}")
    if arr.shape[0] != n:
        raise ValueError(f"features[{name!r}]: expected N={n} samples (as in y), got {arr.shape[0]}")
    if 0 in arr.shape[1:]:
        raise ValueError(f"features[{name!r}]: T and D must be >= 1, got shape {arr.shape}")
    return arr


def check_mask(name: str, mask: Any, n: int, length: int) -> np.ndarray:
    """A modality's bool mask, (N,) presence or (N, T) valid steps, as an in-memory array."""
    m = np.asarray(mask)
    if m.dtype != np.bool_:
        raise TypeError(f"masks[{name!r}]: expected a bool array, got dtype {m.dtype}")
    if m.shape not in ((n,), (n, length)):
        raise ValueError(f"masks[{name!r}]: expected shape ({n},) or ({n}, {length}), got {m.shape}")
    return np.array(m)  # a small copy (1 byte per token), so later edits of the caller's mask change nothing


def valid_tokens(mask: np.ndarray | None, n: int, length: int) -> np.ndarray:
    """(N, T) bool: True where a token is valid (present modality and valid step)."""
    if mask is None:
        return np.ones((n, length), dtype=bool)
    return np.broadcast_to(mask.reshape(n, -1), (n, length)).copy()  # presence (N,) -> every step


def check_values(name: str, x3: np.ndarray, valid: np.ndarray, first_row: int = 0) -> None:
    """No NaN/inf and nothing beyond float32's range at valid positions of x3 (N, T, D).

    Walks the rows in chunks (bounded temporaries; a memory-mapped array is read once and its
    pages released). Values at invalid positions are never looked at: padding may hold anything.
    ``first_row``: the sample number of x3's first row, for messages about a block of rows.
    """
    if x3.dtype.kind != "f":  # integers are always finite and within float32's range
        return
    wide = x3.dtype.itemsize > 4  # may hold finite values float32 cannot
    row_bytes = x3[0].nbytes if x3.shape[0] else 1
    nonfinite = [0, None]  # count, first sample
    too_big = [0, None]
    for rows in row_chunks(x3.shape[0], row_bytes):
        _check_chunk(x3[rows], valid[rows][:, :, None], wide, first_row + rows.start, nonfinite, too_big)
        release_pages(x3)  # a memory map's pages read so far leave this process's RSS
    if nonfinite[0]:
        raise ValueError(
            f"features[{name!r}]: {nonfinite[0]} non-finite values (NaN/inf) at valid positions, first at "
            f"sample {nonfinite[1]}; fix them or mark those steps invalid with a mask"
        )
    if too_big[0]:
        raise ValueError(
            f"features[{name!r}]: {too_big[0]} finite values out of float32 range (|x| > {FLOAT32_MAX:.4g}), "
            f"first at sample {too_big[1]}; rescale them"
        )


def _check_chunk(chunk: np.ndarray, ok: np.ndarray, wide: bool, offset: int, nonfinite: list, too_big: list) -> None:
    """Count a chunk's non-finite and (when ``wide``) beyond-float32 values at valid positions."""
    # Fast path without temporaries: min and max are finite (then so is every value: NaN and inf
    # propagate) and within float32's range.
    lo, hi = chunk.min(), chunk.max()
    if np.isfinite(lo) and np.isfinite(hi) and (not wide or max(-lo, hi) <= FLOAT32_MAX):
        return
    finite = np.isfinite(chunk)
    _tally(nonfinite, ~finite & ok, offset)
    if wide:
        with np.errstate(invalid="ignore"):
            _tally(too_big, finite & (np.abs(chunk) > FLOAT32_MAX) & ok, offset)


def _tally(acc: list, bad: np.ndarray, offset: int) -> None:
    """Add a chunk's bad entries (rows first) to acc = [count, first row or None]."""
    count = int(np.count_nonzero(bad))
    if count:
        acc[0] += count
        if acc[1] is None:
            acc[1] = offset + int(np.flatnonzero(bad.reshape(bad.shape[0], -1).any(axis=1))[0])


def check_some_token(valid: Mapping[str, np.ndarray], n: int) -> None:
    """Every sample has at least one valid token in some modality (else there is nothing to fuse)."""
    any_token = np.zeros(n, dtype=bool)
    for v in valid.values():
        any_token |= v.any(axis=1)
    if not any_token.all():
        empty = np.flatnonzero(~any_token)
        raise ValueError(f"masks: {empty.size} samples have no valid token in any modality, first is sample {empty[0]}")


@dataclass(frozen=True)
class Targets:
    """Checked targets: y (N,) int64 codes or (N,)/(N, K) float32, the resolved task, and the label
    space (classification: num_classes, classes) or target_dim (regression)."""

    y: np.ndarray
    task: str
    num_classes: int | None = None
    classes: list | None = None
    target_dim: int | None = None


def check_targets(y: Any, task: str = "auto", num_classes: int | None = None, classes: list | None = None) -> Targets:
    """Resolve the task from y (when "auto": integers and strings -> classification, floats ->
    regression) and check y for it; classification labels go through :func:`labels.class_codes`.

    ``y=None`` is data without targets (to predict on): its task and label space are a trained
    model's, so ``task`` must be given."""
    if task not in TASKS:
        raise ValueError(f"task: expected one of {', '.join(map(repr, TASKS))}, got {task!r}")
    if y is None:
        if task == "auto":
            raise ValueError("y: the data has no targets; training and evaluating need them (predict does not)")
        if task == "classification" and classes is not None:
            num_classes = len(classes)
        return Targets(None, task, num_classes, None if classes is None else list(classes))
    y = np.asarray(y)
    if y.ndim not in (1, 2):
        raise ValueError(f"y: expected shape (N,) or (N, K), got shape {y.shape}")
    if y.shape[0] == 0:
        raise ValueError("y: the dataset has no samples (N=0)")
    if y.dtype.kind not in "biufUSO":
        raise TypeError(f"y: expected class labels or float targets, got dtype {y.dtype}")
    inferred = task == "auto"
    if inferred:
        if y.dtype.kind != "f" and y.ndim == 2:
            raise ValueError(
                f"y: integer labels must have shape (N,), got {y.shape}; pass task='regression' for "
                "multi-output targets"
            )
        task = "regression" if y.dtype.kind == "f" else "classification"
    if task == "classification":
        labels = class_codes(y, inferred=inferred, num_classes=num_classes, classes=classes)
        return Targets(labels.codes, task, labels.num_classes, labels.classes)
    if num_classes is not None or classes is not None:
        raise ValueError(f"num_classes: only meaningful for classification, got {num_classes} for regression")
    if y.dtype.kind not in "biuf":
        raise TypeError(f"y: regression needs numeric targets, got dtype {y.dtype}")
    if y.ndim == 2 and y.shape[1] == 0:
        raise ValueError(f"y: expected shape (N,) or (N, K) with K >= 1, got {y.shape}")
    bad = ~np.isfinite(y) if y.dtype.kind == "f" else np.zeros(y.shape, bool)
    if bad.any():
        rows = np.flatnonzero(bad.reshape(bad.shape[0], -1).any(axis=1))
        raise ValueError(f"y: {int(bad.sum())} non-finite regression targets (NaN/inf), first at sample {rows[0]}")
    with np.errstate(invalid="ignore"):
        big = np.abs(y.astype(np.float64)) > FLOAT32_MAX
    if big.any():
        first = int(np.flatnonzero(big.reshape(big.shape[0], -1).any(axis=1))[0])
        raise ValueError(f"y: {int(big.sum())} targets out of float32 range, first at sample {first}")
    return Targets(y.astype(np.float32), task, target_dim=1 if y.ndim == 1 else int(y.shape[1]))


def check_split(split: Any, n: int) -> np.ndarray:
    """(N,) strings in {"train", "valid", "test"}."""
    s = np.asarray(split)
    if s.shape != (n,):
        raise ValueError(f"split: expected shape ({n},), got {s.shape}")
    if s.dtype.kind not in "USO":
        raise TypeError(f"split: expected strings {SPLITS}, got dtype {s.dtype}")
    s = s.astype(str)
    unknown = ~np.isin(s, SPLITS)
    if unknown.any():
        first = int(np.flatnonzero(unknown)[0])
        expected = ", ".join(map(repr, SPLITS))
        # str(): numpy 2 shows a numpy string as np.str_('tst'); the user wrote tst.
        raise ValueError(f"split: expected values in {expected}, got {str(s[first])!r} at sample {first}")
    return s


def check_info(info: Any, n: int) -> dict[str, np.ndarray]:
    """Per-sample extras, name -> (N, ...) numeric, bool or string array (what an .npz holds)."""
    if not isinstance(info, Mapping):
        raise TypeError(f"info: expected a dict of name -> array, got {type(info).__name__}")
    out = {}
    for key, value in info.items():
        arr = np.asarray(value)
        if arr.ndim == 0 or arr.shape[0] != n:
            raise ValueError(f"info[{key!r}]: expected N={n} rows, got shape {arr.shape}")
        if arr.dtype.kind not in "biufUS":  # what an .npz holds without pickling
            raise TypeError(f"info[{key!r}]: expected a numeric, bool or string array, got dtype {arr.dtype}")
        out[key] = arr if is_mapped(arr) else arr.copy()
    return out


def check_rows(indices: Any, n: int) -> np.ndarray:
    """Row indices: None (all rows), int indices or a (N,) bool mask -> an int64 index array."""
    if indices is None:
        return np.arange(n)
    if isinstance(indices, torch.Tensor):
        indices = indices.cpu().numpy()
    idx = np.asarray(indices)
    if idx.size == 0 and idx.ndim == 1:
        return np.zeros(0, dtype=np.int64)
    if idx.dtype == np.bool_:
        if idx.shape != (n,):
            raise ValueError(f"indices: a bool mask must have shape ({n},), got {idx.shape}")
        return np.flatnonzero(idx)
    if idx.dtype.kind not in "iu" or idx.ndim != 1:
        raise TypeError(f"indices: expected a 1-D integer array, got dtype {idx.dtype} and shape {idx.shape}")
    if idx.size and (idx.min() < -n or idx.max() >= n):
        raise ValueError(f"indices: expected values in [0, {n}), got range [{idx.min()}, {idx.max()}]")
    return idx.astype(np.int64, copy=False)


def check_columns(columns: Any, dims: Mapping[str, int]) -> dict | None:
    """Where a table's features came from: ``{"modalities": {name: [one column name per feature]},
    "target": column or None, "split": column or None}``; ``dims``: each modality's feature size."""
    if columns is None:
        return None
    if not isinstance(columns, Mapping) or set(columns) != {"modalities", "target", "split"}:
        raise ValueError(f"columns: expected a dict with keys modalities, target, split, got {shorten(columns)}")
    mods = columns["modalities"]
    if not isinstance(mods, Mapping) or set(mods) != set(dims):
        raise ValueError(f"columns: expected column names for the modalities {list(dims)}, got {shorten(mods)}")
    for name, cols in mods.items():
        if not isinstance(cols, list) or len(cols) != dims[name] or not all(isinstance(c, str) for c in cols):
            raise ValueError(f"columns[{name!r}]: expected {dims[name]} column names, got {shorten(cols)}")
    for key in ("target", "split"):
        if columns[key] is not None and not isinstance(columns[key], str):
            raise ValueError(f"columns: {key} must be a column name or None, got {shorten(columns[key])}")
    return {
        "modalities": {name: list(mods[name]) for name in dims},
        "target": columns["target"],
        "split": columns["split"],
    }
