"""attnfuse's ``.npz`` format.

Arrays: ``x_<modality>`` float ``(N, D)`` or ``(N, T, D)``, the target ``y``, optional bool
``mask_<modality>`` ``(N,)`` (present) or ``(N, T)`` (valid steps), optional ``split`` strings and
``info_<name>`` per-sample extras. It is read with ``allow_pickle=False``.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np

from ..dataset import MultimodalDataset
from ._common import existing_file

__all__ = ["load_npz", "save_npz"]


def load_npz(path: str | os.PathLike, *, task: str = "auto", num_classes: int | None = None) -> MultimodalDataset:
    """Load a dataset from an .npz file.

    Arrays: ``x_<modality>`` (N, D) or (N, T, D) real, ``y``, optional ``mask_<modality>`` bool
    (N,) or (N, T), optional ``split`` strings, optional ``info_<name>`` per-sample extras.
    Modalities keep the order they have in the file. ``task`` and ``num_classes`` are passed to
    :class:`MultimodalDataset` (e.g. a trained model's label space, so that data with a single
    class can still be evaluated).
    """
    p = existing_file(path)
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
