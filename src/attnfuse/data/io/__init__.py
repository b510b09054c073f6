"""Readers and writers of data files, one module per format; :func:`read_file` picks by suffix.

* ``.npz`` — attnfuse's own format (:mod:`.npz`);
* a directory of ``.npy`` files — the same arrays, memory-mapped, for data larger than memory
  (:mod:`.directory`);
* ``.csv`` / ``.parquet`` / ``.pq`` — tables, one row per sample, columns mapped to modalities
  (:mod:`.table`; pyarrow is imported only when a table is read);
* ``.pkl`` / ``.pickle`` — MulT / MMSA feature pickles, only with ``allow_pickle=True`` (:mod:`.mult_pickle`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..dataset import MultimodalDataset
from .directory import load_directory
from .mult_pickle import load_pickle
from .npz import load_npz
from .table import TABLE_SUFFIXES, read_table, refuse_table_options

__all__ = ["FILE_SUFFIXES", "TABLE_SUFFIXES", "read_file"]

FILE_SUFFIXES = (".npz", ".pkl", ".pickle", *TABLE_SUFFIXES)


def read_file(
    path: str | os.PathLike, *, allow_pickle: bool = False, task: str = "auto", **options: Any
) -> MultimodalDataset:
    """Read a data file by its suffix (see :data:`FILE_SUFFIXES`) or a directory dataset.

    ``options``: ``num_classes`` and ``classes`` (a trained model's label space, every format),
    and for tables ``modalities``, ``target``, ``split_col`` and ``mapping`` (see
    :func:`.table.read_table`); table options for another format are an error."""
    p = Path(path)
    suffix = p.suffix.lower()
    labels = {"task": task, "num_classes": options.pop("num_classes", None), "classes": options.pop("classes", None)}
    if suffix in TABLE_SUFFIXES:
        return read_table(p, **options, **labels)
    refuse_table_options(path, **options)
    if p.is_dir():
        return load_directory(p, **labels)
    if suffix == ".npz":
        return load_npz(p, **labels)
    if suffix in (".pkl", ".pickle"):
        return load_pickle(p, allow_pickle=allow_pickle, **labels)
    raise ValueError(f"data: expected a directory or a path ending in {', '.join(FILE_SUFFIXES)}, got {str(path)!r}")
