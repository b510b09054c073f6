"""Directory datasets, for data larger than memory: one ``.npy`` file per array of the ``.npz``
format, memory-mapped when read.

``DIR/x_<modality>.npy`` (N, D) or (N, T, D), ``DIR/y.npy``, optional ``DIR/mask_<modality>.npy``,
``DIR/split.npy`` and ``DIR/info_<name>.npy``, and optionally ``DIR/attnfuse.json``
(``{"modalities": [names in order]}``, at most :data:`MAX_MANIFEST_BYTES`; without it the
modalities are in name order). Every file must be a regular file, checked before it is opened (a
named pipe would block the reader). A modality's name is part of its file names, so it must be a
valid file-name component (:func:`check_modality_name`). Features
are opened with ``numpy.load(mmap_mode="r")``: nothing is read until rows are gathered, except
the one chunked pass that checks them for NaN/inf (:func:`attnfuse.data.validation.check_values`).
Targets, masks and the split are small (N or N x T) and are read into memory.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ...options import shorten
from .._memory import row_chunks
from ..dataset import MultimodalDataset
from ._common import dataset_arrays, non_feature_arrays, npy_header, read_bounded, regular_file

__all__ = [
    "MANIFEST",
    "NpyWriter",
    "check_modality_name",
    "load_directory",
    "save_directory",
    "write_dataset",
    "write_directory",
]

MANIFEST = "attnfuse.json"
IN_MEMORY = ("y", "split")  # small and needed whole at once: read, not mapped
MAX_MANIFEST_BYTES = 1 << 20  # a list of modality names: far less
MAX_NAME_BYTES = 200  # a file name is at most 255 bytes, with "mask_" and ".npy" around the name


def check_modality_name(name: object, where: str = "modality") -> str:
    """``name``, checked to be usable in the file names of a directory dataset (``x_<name>.npy``):
    a non-empty string without a path separator, NUL or control character, not "." or "..", of
    at most :data:`MAX_NAME_BYTES` bytes in UTF-8. ``where`` names the option or file it came from."""
    if not isinstance(name, str):
        raise ValueError(f"{where}: expected a modality name (a string), got {shorten(name)}")
    bad = next((c for c in name if c in "/\\" or ord(c) < 32 or ord(c) == 127), None)
    why = None
    if name in ("", ".", ".."):
        why = "it is empty, '.' or '..'"
    elif bad is not None:
        why = f"it holds {bad!r}"
    elif len(name.encode("utf-8", "replace")) > MAX_NAME_BYTES:
        why = f"it is longer than {MAX_NAME_BYTES} bytes"
    if why is not None:
        raise ValueError(
            f"{where}: the modality name {shorten(name)} is not a valid file-name component ({why}); "
            "a directory dataset stores each modality as x_<name>.npy"
        )
    return name


def _modality_order(p: Path, keys: list[str]) -> list[str]:
    """The x_ keys in the manifest's order (or name order without one)."""
    names = sorted(k[2:] for k in keys if k.startswith("x_"))
    manifest = p / MANIFEST
    if not os.path.lexists(manifest):
        return names
    text = read_bounded(manifest, MAX_MANIFEST_BYTES, "data directory's manifest")
    try:
        order = json.loads(text)["modalities"]
    except RecursionError:
        raise ValueError(f'{manifest}: nested too deeply to be a manifest {{"modalities": [names]}}') from None
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f'{manifest}: expected JSON {{"modalities": [names]}} ({e})') from None
    if not isinstance(order, list) or sorted(map(str, order)) != names:
        raise ValueError(
            f"{manifest}: lists modalities {shorten(order, 200)}, the directory holds x_ files for {shorten(names, 200)}"
        )
    return order


def load_directory(
    path: str | os.PathLike, *, task: str = "auto", num_classes: int | None = None, classes: list | None = None
) -> MultimodalDataset:
    """Open a directory dataset; features (and info) stay memory-mapped (see the module)."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"data directory not found: {p}")
    files = {f.stem: f for f in sorted(p.glob("*.npy"))}
    if not files:
        raise ValueError(f"{p}: no .npy arrays in the directory (expected x_<modality>.npy and y.npy)")
    arrays = {}
    for key, f in files.items():
        with regular_file(f, "data directory's array").open("rb") as fh:
            npy_header(fh, str(f))  # refuses object arrays before numpy sees them
        try:
            arrays[key] = np.load(f, mmap_mode=None if key in IN_MEMORY else "r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise ValueError(f"{f}: not a readable .npy array ({e})") from None
    order = _modality_order(p, list(arrays))
    parts = dataset_arrays(p, arrays)
    parts["features"] = {m: parts["features"][m] for m in order}
    return MultimodalDataset(**parts, name=p.name, task=task, num_classes=num_classes, classes=classes)


class NpyWriter:
    """Write a .npy file of a known shape sequentially, a chunk of rows at a time.

    Plain file writes, no memory map: what was written leaves this process's memory at once."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype | type = np.float32) -> None:
        self.path, self.shape, self.dtype = path, tuple(int(s) for s in shape), np.dtype(dtype)
        self.rows = 0
        self._file = path.open("wb")
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": self.shape}
        np.lib.format.write_array_header_1_0(self._file, header)

    def write(self, chunk: np.ndarray) -> None:
        """Append rows (k, *shape[1:]), converted to the file's dtype."""
        if chunk.shape[1:] != self.shape[1:] or self.rows + chunk.shape[0] > self.shape[0]:
            raise ValueError(
                f"{self.path}: rows of shape {chunk.shape[1:]} after {self.rows} rows do not fit {self.shape}"
            )
        self._file.write(np.ascontiguousarray(chunk, dtype=self.dtype).data)
        self.rows += chunk.shape[0]

    def close(self) -> None:
        self._file.close()
        if self.rows != self.shape[0]:
            raise ValueError(f"{self.path}: {self.rows} rows written, {self.shape[0]} expected")


def write_directory(dst: str | os.PathLike, write: callable) -> Path:
    """Create directory ``dst`` atomically: ``write(tmp_dir)`` fills a temporary directory beside
    it, which is renamed to ``dst`` when complete. ``dst`` must not exist or be an empty directory."""
    dst = Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"output directory exists and is not empty: {dst}")
    if not dst.parent.is_dir():
        raise FileNotFoundError(f"directory does not exist: {dst.parent}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    try:
        umask = os.umask(0)  # mkdtemp creates 0700; give the usual permissions instead
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        write(tmp)
        if dst.exists():
            dst.rmdir()
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def write_manifest(directory: Path, modalities: list[str]) -> None:
    (directory / MANIFEST).write_text(json.dumps({"modalities": modalities}) + "\n")


def write_dataset(data: MultimodalDataset, directory: Path) -> None:
    """Write ``data``'s arrays into an existing directory (see :func:`save_directory`)."""
    for m in data.modalities:
        check_modality_name(m.name, f"data {data.name!r}" if data.name else "data")
    for name in data.info:
        check_modality_name(name, "info")
    for m in data.modalities:
        writer = NpyWriter(directory / f"x_{m.name}.npy", data.features[m.name].shape)
        for rows in row_chunks(data.n, m.length * m.dim * 4):
            chunk = data.gather(m.name, np.arange(rows.start, rows.stop))  # (k, T, D), invalid tokens 0
            writer.write(chunk if m.is_sequence else chunk[:, 0])
        writer.close()
    for key, arr in non_feature_arrays(data).items():
        np.save(directory / f"{key}.npy", np.asarray(arr), allow_pickle=False)
    write_manifest(directory, [m.name for m in data.modalities])


def save_directory(data: MultimodalDataset, path: str | os.PathLike) -> Path:
    """Write ``data`` as a directory dataset (atomically; ``path`` must not exist or be empty).

    Features are written as float32 in chunks of rows (invalid tokens 0), so a memory-mapped
    dataset is copied without being loaded; encoded labels are written as the original ones."""
    return write_directory(path, lambda tmp: write_dataset(data, tmp))
