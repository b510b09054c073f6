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
from collections.abc import Mapping
from pathlib import Path

from ..dataset import MultimodalDataset
from .directory import load_directory, save_directory
from .mult_pickle import load_pickle
from .npz import load_npz, save_npz
from .table import TABLE_SUFFIXES, read_table, refuse_table_options

__all__ = [
    "FILE_SUFFIXES",
    "TABLE_SUFFIXES",
    "read_file",
    "load_npz",
    "save_npz",
    "load_pickle",
    "read_table",
    "load_directory",
    "save_directory",
]

FILE_SUFFIXES = (".npz", ".pkl", ".pickle", *TABLE_SUFFIXES)


def read_file(
    path: str | os.PathLike,
    *,
    allow_pickle: bool = False,
    task: str = "auto",
    num_classes: int | None = None,
    classes: list | None = None,
    modalities: Mapping[str, str | list[str]] | None = None,
    target: str | None = None,
    split_col: str | None = None,
    mapping: str | os.PathLike | Mapping | None = None,
) -> MultimodalDataset:
    """Read a data file by its suffix (see :data:`FILE_SUFFIXES`) or a directory dataset.

    ``modalities``, ``target``, ``split_col`` and ``mapping`` describe a table's columns (see
    :func:`read_table`); giving them for another format is an error."""
    p = Path(path)
    suffix = p.suffix.lower()
    labels = {"task": task, "num_classes": num_classes, "classes": classes}
    if suffix in TABLE_SUFFIXES:
        return read_table(p, modalities, target, split_col, mapping=mapping, **labels)
    refuse_table_options(path, modalities=modalities, target=target, split_col=split_col, mapping=mapping)
    if p.is_dir():
        return load_directory(p, **labels)
    if suffix == ".npz":
        return load_npz(p, **labels)
    if suffix in (".pkl", ".pickle"):
        return load_pickle(p, allow_pickle=allow_pickle, **labels)
    raise ValueError(f"data: expected a directory or a path ending in {', '.join(FILE_SUFFIXES)}, got {str(path)!r}")
