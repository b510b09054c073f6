"""Reading and writing datasets: attnfuse's .npz format, MulT/MMSA feature pickles, built-ins.

The .npz format: ``x_<modality>`` float arrays ``(N, D)`` or ``(N, T, D)``, the target ``y``,
optional bool ``mask_<modality>`` ``(N,)`` (present) or ``(N, T)`` (valid steps), optional
``split`` strings and ``info_<name>`` per-sample extras. It is read with ``allow_pickle=False``.
"""

from __future__ import annotations

import inspect
import os
import pickle
import tempfile
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .data import SPLITS, MultimodalDataset

__all__ = ["load_npz", "save_npz", "load_pickle", "load_data"]

PICKLE_MODALITIES = ("text", "audio", "vision")  # MulT/MMSA feature pickles


def _existing_file(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"data file not found: {p}")
    if not p.is_file():
        raise ValueError(f"data file: expected a file, got a directory or special file: {p}")
    return p


def load_npz(path: str | os.PathLike, *, task: str = "auto", num_classes: int | None = None) -> MultimodalDataset:
    """Load a dataset from an .npz file.

    Arrays: ``x_<modality>`` (N, D) or (N, T, D) real, ``y``, optional ``mask_<modality>`` bool
    (N,) or (N, T), optional ``split`` strings, optional ``info_<name>`` per-sample extras.
    Modalities keep the order they have in the file. ``task`` and ``num_classes`` are passed to
    :class:`MultimodalDataset` (e.g. a trained model's label space, so that data with a single
    class can still be evaluated).
    """
    p = _existing_file(path)
    try:
        loaded = np.load(p, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):  # a .npy file: one array, not an archive
            raise ValueError(f"{p}: expected an .npz archive of named arrays, got a single .npy array")
        with loaded as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        # allow_pickle=False makes object arrays fail here too, which is what we want.
        raise ValueError(f"{p}: not a readable .npz file ({e})") from None

    features, masks, info = {}, {}, {}
    for key, arr in arrays.items():
        if key.startswith("x_") and len(key) > 2:
            features[key[2:]] = arr
        elif key.startswith("mask_") and len(key) > 5:
            masks[key[5:]] = arr
        elif key.startswith("info_") and len(key) > 5:
            info[key[5:]] = arr
        elif key not in ("y", "split"):
            raise ValueError(
                f"{p}: not a modality: {key!r} (expected x_<modality>, mask_<modality>, y, split or info_<name>)"
            )
    if "y" not in arrays:
        raise ValueError(f"{p}: missing the target array 'y'")
    if not features:
        raise ValueError(f"{p}: no modality arrays (expected at least one x_<modality>)")
    for mod in masks:
        if mod not in features:
            raise ValueError(f"{p}: mask_{mod} has no matching x_{mod}")
    return MultimodalDataset(
        features,
        arrays["y"],
        masks=masks,
        split=arrays.get("split"),
        name=p.stem,
        info=info,
        task=task,
        num_classes=num_classes,
    )


def save_npz(data: MultimodalDataset, path: str | os.PathLike) -> None:
    """Save in the ``load_npz`` format, atomically (temp file in the same directory + rename)."""
    p = Path(path)
    if not p.parent.is_dir():
        raise FileNotFoundError(f"directory does not exist: {p.parent}")
    arrays = {f"x_{k}": v for k, v in data.features.items()}
    arrays.update({f"mask_{k}": v for k, v in data.masks.items()})
    arrays["y"] = data.y
    if data.split is not None:
        arrays["split"] = data.split
    arrays.update({f"info_{k}": v for k, v in data.info.items()})
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as f:  # a file object, so numpy does not append ".npz"
            np.savez_compressed(f, **arrays)
        umask = os.umask(0)  # mkstemp creates 0600; give the usual permissions instead
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
    path: str | os.PathLike, allow_pickle: bool = False, *, task: str = "auto", num_classes: int | None = None
) -> MultimodalDataset:
    """Load a MulT / MMSA feature pickle: {'train','valid','test'} -> {'text','audio','vision', labels}.

    Labels come from 'regression_labels' (N,) or 'labels' (N, 1, 1); -inf features (present in
    their audio) are set to 0 as MulT/MMSA do; MMSA's optional 'audio_lengths' / 'vision_lengths'
    become per-step masks (valid steps first). Other keys are ignored. The three parts are
    concatenated and recorded in ``split``.
    """
    p = _existing_file(path)
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

    present = [m for m in PICKLE_MODALITIES if all(isinstance(raw[s], Mapping) and m in raw[s] for s in SPLITS)]
    if not present:
        raise ValueError(f"{p}: no modality found in all of train/valid/test (expected {', '.join(PICKLE_MODALITIES)})")
    features: dict[str, list[np.ndarray]] = {m: [] for m in present}
    masks: dict[str, list[np.ndarray]] = {}
    ys, split = [], []
    for s in SPLITS:
        part = raw[s]
        y = _labels_of(part, f"{p}[{s!r}]")
        ys.append(y)
        split += [s] * y.shape[0]
        for m in present:
            try:
                x = np.array(part[m], dtype=np.float32)  # a copy, safe to edit
            except (TypeError, ValueError) as e:
                raise ValueError(f"{p}[{s!r}][{m!r}]: expected a float array ({e})") from None
            if x.ndim not in (2, 3) or x.shape[0] != y.shape[0]:
                raise ValueError(f"{p}[{s!r}][{m!r}]: expected shape ({y.shape[0]}, [T,] D), got {x.shape}")
            x[x == -np.inf] = 0.0
            features[m].append(x)
            if f"{m}_lengths" in part:
                steps = _steps_from_lengths(part[f"{m}_lengths"], x, f"{p}[{s!r}]['{m}_lengths']")
                masks.setdefault(m, []).append(steps)
    for m, parts in features.items():
        shapes = {x.shape[1:] for x in parts}
        if len(shapes) > 1:
            raise ValueError(f"{p}: modality {m!r} has different shapes across train/valid/test: {sorted(shapes)}")
    for m, parts in masks.items():
        if len(parts) != len(SPLITS):
            raise ValueError(f"{p}: '{m}_lengths' must be given in all of train/valid/test or none")
    return MultimodalDataset(
        {m: np.concatenate(parts) for m, parts in features.items()},
        np.concatenate(ys),
        masks={m: np.concatenate(parts) for m, parts in masks.items()},
        split=np.array(split),
        name=p.stem,
        task=task,
        num_classes=num_classes,
    )


def load_data(
    source: str, *, allow_pickle: bool = False, seed: int = 0, task: str = "auto", num_classes: int | None = None
) -> MultimodalDataset:
    """A built-in dataset by name (see ``attnfuse.datasets.BUILTINS``) or a .npz / .pkl / .pickle file.

    ``seed`` is passed to built-ins that are generated (the synthetic ones); ``task`` and
    ``num_classes`` to files (built-ins have their own).
    """
    from attnfuse.datasets import BUILTINS  # late import: datasets builds on this module

    if source in BUILTINS:
        factory = BUILTINS[source][0]
        takes_seed = "seed" in inspect.signature(factory).parameters
        return factory(seed=seed) if takes_seed else factory()
    suffix = Path(source).suffix.lower()
    if suffix == ".npz":
        return load_npz(source, task=task, num_classes=num_classes)
    if suffix in (".pkl", ".pickle"):
        return load_pickle(source, allow_pickle=allow_pickle, task=task, num_classes=num_classes)
    raise ValueError(
        f"data: expected a built-in dataset ({', '.join(BUILTINS)}) or a path ending in .npz, .pkl or .pickle, "
        f"got {source!r}"
    )
