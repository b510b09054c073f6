"""``convert``: write a directory dataset (see :mod:`.io.directory`) from any readable source.

Streaming where the source allows it, so that data larger than memory can be converted:

* ``.npz``: each feature array is decompressed and written a chunk of rows at a time (the small
  arrays, y, masks, split and info, are read whole);
* ``.parquet``: read and written in batches of rows;
* ``.csv``, pickles, built-ins and other directories are read whole, then written in chunks.

The result is checked as ``load_directory`` checks it before it is moved into place: ``dst``
appears complete and valid, or not at all.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ._memory import row_chunks
from .dataset import MultimodalDataset
from .io import TABLE_SUFFIXES
from .io._common import npy_header
from .io.directory import (
    NpyWriter,
    check_modality_name,
    load_directory,
    write_dataset,
    write_directory,
    write_manifest,
)
from .io.npz import check_fits_in_memory, open_npz
from .io.table import merge_mapping, table_arrays, table_batches, table_columns
from .sources import load_data
from .validation import check_values

__all__ = ["convert"]

TABLE_BATCH_ROWS = 65_536


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    allow_pickle: bool = False,
    seed: int = 0,
    task: str = "auto",
    modalities: Mapping[str, str | list[str]] | None = None,
    target: str | None = None,
    split_col: str | None = None,
    mapping: str | os.PathLike | Mapping | None = None,
) -> MultimodalDataset:
    """Write the dataset ``src`` (a file, directory or built-in name, as :func:`load_data` takes
    it, with the same options) as a directory dataset ``dst`` (which must not exist or be empty).

    Returns the new dataset, opened memory-mapped. Features are written as float32. A modality's
    name becomes part of file names (``x_<name>.npy``): one that is not a valid file-name component
    is refused before anything is written, naming where it came from."""
    dst = Path(dst)
    suffix = Path(src).suffix.lower()
    table_opts = {"modalities": modalities, "target": target, "split_col": split_col, "mapping": mapping}
    for name in modalities or {}:
        check_modality_name(name, "modality")
    is_table = suffix in TABLE_SUFFIXES and not Path(src).is_dir()
    if is_table:
        table_mapping = merge_mapping(mapping, modalities, target, split_col)
        for name in table_mapping.modalities or {}:
            check_modality_name(name, "mapping")

    def write(tmp: Path) -> None:
        if is_table:
            _write_table(Path(src), tmp, table_mapping)
        elif suffix == ".npz" and not Path(src).is_dir():
            _write_npz(Path(src), tmp)
        else:
            write_dataset(load_data(str(src), allow_pickle=allow_pickle, seed=seed, task=task, **table_opts), tmp)
        load_directory(tmp, task=task)  # the whole check, before dst appears

    write_directory(dst, write)
    return load_directory(dst, task=task)


def _write_npz(src: Path, tmp: Path) -> None:
    """Stream an .npz archive's feature arrays into .npy files, a chunk of rows at a time."""
    with open_npz(src) as (zf, members):
        for key in members:
            for prefix in ("x_", "mask_", "info_"):
                if key.startswith(prefix):
                    check_modality_name(key[len(prefix) :], f"{src}")
        small = {k: m for k, m in members.items() if not k.startswith("x_")}
        check_fits_in_memory(src, sum(m.nbytes for m in small.values()))
        arrays = {}
        for key, m in small.items():
            with zf.open(m.info) as f:
                arrays[key] = np.lib.format.read_array(f, allow_pickle=False)
        for key, arr in arrays.items():
            np.save(tmp / f"{key}.npy", arr, allow_pickle=False)
        features = [m for k, m in members.items() if k.startswith("x_")]
        for m in features:
            _stream_member(zf, m, arrays.get(f"mask_{m.key[2:]}"), tmp, src)
        write_manifest(tmp, [m.key[2:] for m in features])


def _stream_member(zf, member, mask: np.ndarray | None, tmp: Path, src: Path) -> None:
    """Copy one x_ member as float32, checking for values float32 cannot hold on the way."""
    shape, dtype = member.shape, member.dtype
    if member.fortran_order or dtype.kind not in "iuf" or len(shape) not in (2, 3):
        # Not row-major numbers: read whole, and let the dataset's checks name what is wrong.
        with zf.open(member.info) as f:
            np.save(tmp / f"{member.key}.npy", np.lib.format.read_array(f, allow_pickle=False))
        return
    n, length = shape[0], shape[1] if len(shape) == 3 else 1
    row_bytes = math.prod(shape[1:]) * dtype.itemsize
    writer = NpyWriter(tmp / f"{member.key}.npy", shape)
    with zf.open(member.info) as f:
        npy_header(f, f"{src}[{member.key!r}]")  # skip to the data
        for rows in row_chunks(n, row_bytes):
            k = rows.stop - rows.start
            buf = f.read(k * row_bytes)
            if len(buf) != k * row_bytes:
                raise ValueError(f"{src}: not a readable .npz file (member {member.key!r} is truncated)")
            chunk = np.frombuffer(buf, dtype=dtype).reshape((k, *shape[1:]))
            if mask is not None and mask.shape[:1] == (n,):
                valid = np.broadcast_to(mask[rows].reshape(k, -1), (k, length))
            else:
                valid = np.ones((k, length), dtype=bool)
            check_values(member.key[2:], chunk.reshape(k, length, shape[-1]), valid, first_row=rows.start)
            with np.errstate(over="ignore", invalid="ignore"):  # huge values at invalid positions only
                writer.write(chunk)
    writer.close()


def _write_table(src: Path, tmp: Path, mapping) -> None:
    """Write a table's columns as modalities, a batch of rows at a time (Parquet) or whole (CSV)."""
    columns, n = table_columns(src, mapping)
    for name in columns.modalities:
        check_modality_name(name, f"{src}")
    writers: dict[str, NpyWriter] = {}
    present: dict[str, list[np.ndarray]] = {m: [] for m in columns.modalities}
    ys, splits, offset = [], [], 0
    for block in table_batches(src, columns, TABLE_BATCH_ROWS):
        arrays = table_arrays(block, columns, first_row=offset)
        total = block.num_rows if n is None else n  # a CSV comes as one block
        for name, x in arrays.features.items():
            if name not in writers:
                writers[name] = NpyWriter(tmp / f"x_{name}.npy", (total, x.shape[1]))
            writers[name].write(x)
            present[name].append(arrays.present[name])
        if arrays.y is not None:
            ys.append(arrays.y)
        if arrays.split is not None:
            splits.append(arrays.split)
        offset += block.num_rows
    if offset == 0:
        raise ValueError(f"{src}: the table has no rows")
    for w in writers.values():
        w.close()
    if ys:
        np.save(tmp / "y.npy", np.concatenate(ys), allow_pickle=False)
    if splits:
        np.save(tmp / "split.npy", np.concatenate(splits), allow_pickle=False)
    for name, parts in present.items():
        mask = np.concatenate(parts)
        if not mask.all():
            np.save(tmp / f"mask_{name}.npy", mask)
    write_manifest(tmp, list(columns.modalities))
