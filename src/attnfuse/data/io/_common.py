"""Helpers shared by the readers: paths, .npy headers, and the array names of the .npz format
(``x_<modality>``, ``mask_<modality>``, ``info_<name>``, ``y``, ``split``), which the directory
format shares."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import IO

import numpy as np

from ..dataset import MultimodalDataset
from ..labels import decode_labels

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def regular_file(path: str | os.PathLike, what: str = "data file") -> Path:
    """``path`` as a Path, after checking that it is a regular file (a link to one is fine).

    Checked before anything opens it: opening a named pipe blocks until some other process
    writes to it (a training run that hangs without a word), and a device such as /dev/zero
    never ends. ``what`` names the file in the error (the option or the role it has)."""
    p = Path(path)
    try:
        mode = os.stat(p).st_mode
    except FileNotFoundError:
        # With its errno and file name, so that no caller names another file in its place.
        raise FileNotFoundError(errno.ENOENT, f"{what} not found", str(p)) from None
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
        raise ValueError(f"{what}: expected a regular file, got {kind}: {p}")
    return p


def existing_file(path: str | os.PathLike, what: str = "data file") -> Path:
    """A data file that exists and is a regular file (see :func:`regular_file`)."""
    return regular_file(path, what)


def read_bounded(path: Path, limit: int, what: str) -> bytes:
    """The bytes of regular file ``path``, refused when larger than ``limit`` (a small metadata
    file: never read a huge one whole to find out)."""
    with regular_file(path, what).open("rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{what}: {path} is larger than {limit:,} bytes, more than such a file ever holds")
    return data


def npy_header(f: IO[bytes], where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of a .npy stream, read from its header only.

    Arrays of Python objects would need unpickling: refused here, before any data is read."""
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
    except (ValueError, EOFError, OSError) as e:
        raise ValueError(f"{where}: not a readable .npy array ({e})") from None
    if dtype.hasobject:
        raise ValueError(
            f"{where}: holds Python objects (dtype {dtype}), which would need unpickling; "
            "save plain numeric, bool or string arrays"
        )
    return shape, fortran, dtype


def dataset_arrays(where: Path, arrays: Mapping[str, np.ndarray]) -> dict:
    """Sort arrays named as in the .npz format into MultimodalDataset's arguments
    (features, y, masks, split, info), modalities in the order given."""
    features, masks, info = {}, {}, {}
    groups = {"x_": features, "mask_": masks, "info_": info}
    for key, arr in arrays.items():
        prefix = next((p for p in groups if key.startswith(p) and len(key) > len(p)), None)
        if prefix is not None:
            groups[prefix][key[len(prefix) :]] = arr
        elif key not in ("y", "split"):
            raise ValueError(
                f"{where}: not a modality: {key!r} (expected x_<modality>, mask_<modality>, y, split or info_<name>)"
            )
    if not features:
        raise ValueError(f"{where}: no modality arrays (expected at least one x_<modality>)")
    for mod in masks:
        if mod not in features:
            raise ValueError(f"{where}: mask_{mod} has no matching x_{mod}")
    # Without "y" the data has no targets: something to predict on (MultimodalDataset says so when
    # a task needs them).
    return {"features": features, "y": arrays.get("y"), "masks": masks, "split": arrays.get("split"), "info": info}


def non_feature_arrays(data: MultimodalDataset) -> dict[str, np.ndarray]:
    """The .npz-format arrays of ``data`` other than its features: masks, y (encoded class labels
    written as the original labels), split and info."""
    arrays = {f"mask_{k}": v for k, v in data.masks.items()}
    if data.y is not None:
        arrays["y"] = decode_labels(data.y, data.classes) if data.task == "classification" else data.y
    if data.split is not None:
        arrays["split"] = data.split
    arrays.update({f"info_{k}": v for k, v in data.info.items()})
    return arrays
