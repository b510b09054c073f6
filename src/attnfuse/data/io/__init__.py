"""Readers and writers of data files, one module per format; :func:`read_file` picks by suffix.

* ``.npz`` — attnfuse's own format (:mod:`.npz`);
* ``.pkl`` / ``.pickle`` — MulT / MMSA feature pickles, only with ``allow_pickle=True`` (:mod:`.mult_pickle`).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..dataset import MultimodalDataset
from .mult_pickle import load_pickle
from .npz import load_npz, save_npz

__all__ = ["FILE_SUFFIXES", "read_file", "load_npz", "save_npz", "load_pickle"]

FILE_SUFFIXES = (".npz", ".pkl", ".pickle")


def read_file(
    path: str | os.PathLike, *, allow_pickle: bool = False, task: str = "auto", num_classes: int | None = None
) -> MultimodalDataset:
    """Read a data file by its suffix (see :data:`FILE_SUFFIXES`)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".npz":
        return load_npz(path, task=task, num_classes=num_classes)
    if suffix in (".pkl", ".pickle"):
        return load_pickle(path, allow_pickle=allow_pickle, task=task, num_classes=num_classes)
    raise ValueError(f"data: expected a path ending in {', '.join(FILE_SUFFIXES)}, got {str(path)!r}")
