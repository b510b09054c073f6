"""One entry point for data: :func:`load_data` takes a built-in dataset's name (see
:mod:`.builtins`), a data file or a directory dataset (see :mod:`.io`)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from .builtins import BUILTINS
from .dataset import MultimodalDataset
from .io import FILE_SUFFIXES, read_file
from .io.table import refuse_table_options

__all__ = ["load_data"]


def load_data(
    source: str | os.PathLike,
    *,
    allow_pickle: bool = False,
    seed: int = 0,
    task: str = "auto",
    num_classes: int | None = None,
    classes: list | None = None,
    modalities: Mapping[str, str | list[str]] | None = None,
    target: str | None = None,
    split_col: str | None = None,
    mapping: str | os.PathLike | Mapping | None = None,
    model_columns: Mapping | None = None,
) -> MultimodalDataset:
    """A built-in dataset by name (see :data:`BUILTINS`), a data file or a directory dataset (see
    ``attnfuse.data.io``).

    ``seed`` is passed to the built-ins (the synthetic ones draw from it); ``task``,
    ``num_classes`` and ``classes`` (a trained model's label space) to files (built-ins have their
    own); ``modalities``, ``target``, ``split_col``, ``mapping`` and ``model_columns`` (the columns
    a trained model was read from) to tables (``read_table``).
    """
    table = {
        "modalities": modalities,
        "target": target,
        "split_col": split_col,
        "mapping": mapping,
        "model_columns": model_columns,
    }
    if isinstance(source, str) and source in BUILTINS:
        refuse_table_options(source, **table)
        return BUILTINS[source][0](seed=seed)
    if not Path(source).is_dir() and Path(source).suffix.lower() not in FILE_SUFFIXES:
        raise ValueError(
            f"data: expected a built-in dataset ({', '.join(BUILTINS)}), a directory dataset or a path ending in "
            f"{', '.join(FILE_SUFFIXES)}, got {str(source)!r}"
        )
    return read_file(source, allow_pickle=allow_pickle, task=task, num_classes=num_classes, classes=classes, **table)
