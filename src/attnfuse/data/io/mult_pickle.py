"""MulT / MMSA feature pickles: ``{'train','valid','test'} -> {'text','audio','vision', labels}``.

Unpickling can run code the file's author put in it, so it happens only with ``allow_pickle=True``.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..dataset import SPLITS, MultimodalDataset
from ._common import existing_file

__all__ = ["load_pickle"]

PICKLE_MODALITIES = ("text", "audio", "vision")


def _labels_of(part: Mapping, where: str) -> np.ndarray:
    """(N,) float targets of one MulT/MMSA part; MMSA's regression_labels win over labels."""
    key = "regression_labels" if "regression_labels" in part else "labels" if "labels" in part else None
    if key is None:
        raise ValueError(f"{where}: no labels (expected 'regression_labels' or 'labels')")
    y = np.asarray(part[key])
    n = y.shape[0] if y.ndim else 0
    if y.ndim == 0 or y.size != n:
        raise ValueError(f"{where}[{key!r}]: expected one value per sample ((N,), (N, 1) or (N, 1, 1)), got {y.shape}")
    return y.reshape(n)


def _steps_from_lengths(lengths: Any, x: np.ndarray, where: str) -> np.ndarray:
    """(N, T) bool step mask from MMSA sequence lengths (N,): the first `length` steps are valid."""
    if x.ndim != 3:
        raise ValueError(f"{where}: lengths need a sequence modality (N, T, D), got features of shape {x.shape}")
    n, t = x.shape[:2]
    lengths = np.asarray(lengths).reshape(-1)
    if lengths.shape != (n,) or lengths.dtype.kind not in "iuf" or (lengths < 0).any() or (lengths > t).any():
        got = f"shape {lengths.shape}, dtype {lengths.dtype}"
        if lengths.size and lengths.dtype.kind in "iuf":
            got += f", range [{lengths.min()}, {lengths.max()}]"
        raise ValueError(f"{where}: expected {n} lengths in [0, {t}], got {got}")
    return np.arange(t)[None, :] < lengths[:, None]


def load_pickle(
    path: str | os.PathLike,
    allow_pickle: bool = False,
    *,
    task: str = "auto",
    num_classes: int | None = None,
    classes: list | None = None,
) -> MultimodalDataset:
    """Load a MulT / MMSA feature pickle: {'train','valid','test'} -> {'text','audio','vision', labels}.

    Labels come from 'regression_labels' (N,) or 'labels' (N, 1, 1); -inf features (present in
    their audio) are set to 0 as MulT/MMSA do; MMSA's optional 'audio_lengths' / 'vision_lengths'
    become per-step masks (valid steps first). Other keys are ignored. The three parts are
    concatenated and recorded in ``split``.
    """
    p = existing_file(path)
    raw = _unpickled(p, allow_pickle)
    present = [m for m in PICKLE_MODALITIES if all(isinstance(raw[s], Mapping) and m in raw[s] for s in SPLITS)]
    if not present:
        raise ValueError(f"{p}: no modality found in all of train/valid/test (expected {', '.join(PICKLE_MODALITIES)})")
    features: dict[str, list[np.ndarray]] = {m: [] for m in present}
    masks: dict[str, list[np.ndarray]] = {}
    ys, split = [], []
    for s in SPLITS:
        y, xs, steps = _read_part(raw[s], present, f"{p}[{s!r}]")
        ys.append(y)
        split += [s] * y.shape[0]
        for m, x in xs.items():
            features[m].append(x)
        for m, valid in steps.items():
            masks.setdefault(m, []).append(valid)
    _check_across_parts(p, features, masks)
    return MultimodalDataset(
        {m: np.concatenate(parts) for m, parts in features.items()},
        np.concatenate(ys),
        masks={m: np.concatenate(parts) for m, parts in masks.items()},
        split=np.array(split),
        name=p.stem,
        task=task,
        num_classes=num_classes,
        classes=classes,
    )


def _unpickled(p: Path, allow_pickle: bool) -> Mapping:
    """The object in pickle file ``p`` (only with ``allow_pickle``), checked to be a dict with a
    train, a valid and a test part."""
    if not allow_pickle:
        raise ValueError(
            f"{p}: refusing to unpickle: loading a pickle can execute arbitrary code. "
            "If you trust this file, pass --allow-pickle (allow_pickle=True)."
        )
    try:
        with p.open("rb") as f:
            raw = pickle.load(f)
    except Exception as e:  # unpickling can fail in many ways; all mean "not a usable pickle"
        raise ValueError(f"{p}: cannot unpickle ({type(e).__name__}: {e})") from None
    if not isinstance(raw, Mapping) or any(s not in raw for s in SPLITS):
        found = sorted(map(str, raw)) if isinstance(raw, Mapping) else type(raw).__name__
        raise ValueError(f"{p}: expected a dict with keys 'train', 'valid', 'test', got {found}")
    return raw


def _read_part(
    part: Mapping, modalities: list[str], where: str
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """One part (train, valid or test): its targets ``(N,)``, modality -> float32 features ``(N, [T,]
    D)`` (-inf set to 0), and modality -> ``(N, T)`` step mask for those with ``<modality>_lengths``."""
    y = _labels_of(part, where)
    features, steps = {}, {}
    for m in modalities:
        try:
            x = np.array(part[m], dtype=np.float32)  # a copy, safe to edit
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}[{m!r}]: expected a float array ({e})") from None
        if x.ndim not in (2, 3) or x.shape[0] != y.shape[0]:
            raise ValueError(f"{where}[{m!r}]: expected shape ({y.shape[0]}, [T,] D), got {x.shape}")
        x[x == -np.inf] = 0.0
        features[m] = x
        if f"{m}_lengths" in part:
            steps[m] = _steps_from_lengths(part[f"{m}_lengths"], x, f"{where}['{m}_lengths']")
    return y, features, steps


def _check_across_parts(p: Path, features: dict[str, list[np.ndarray]], masks: dict[str, list[np.ndarray]]) -> None:
    """Each modality has one shape (but N) in every part, and lengths in all parts or none."""
    for m, parts in features.items():
        shapes = {x.shape[1:] for x in parts}
        if len(shapes) > 1:
            raise ValueError(f"{p}: modality {m!r} has different shapes across train/valid/test: {sorted(shapes)}")
    for m, parts in masks.items():
        if len(parts) != len(SPLITS):
            raise ValueError(f"{p}: '{m}_lengths' must be given in all of train/valid/test or none")
