"""attnfuse's ``.npz`` format.

Arrays: ``x_<modality>`` float ``(N, D)`` or ``(N, T, D)``, the target ``y``, optional bool
``mask_<modality>`` ``(N,)`` (present) or ``(N, T)`` (valid steps), optional ``split`` strings and
``info_<name>`` per-sample extras. It is read without unpickling anything, and every member's
header (shape, dtype) is checked before any data is decompressed (:func:`npz_headers`).
"""

from __future__ import annotations

import math
import os
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._memory import available_memory
from ..dataset import MultimodalDataset
from ._common import dataset_arrays, existing_file, non_feature_arrays, npy_header

__all__ = ["NpyMember", "load_npz", "npz_headers", "open_npz", "save_npz"]

NPY_MAGIC = b"\x93NUMPY"


@dataclass(frozen=True)
class NpyMember:
    """One array of an .npz archive as its header describes it (nothing decompressed yet)."""

    key: str  # the array's name, e.g. "x_text"
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    info: zipfile.ZipInfo

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _fmt_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.{2 if unit == 'GiB' else 1}f} {unit}"
    return f"{n} bytes"


@contextmanager
def open_npz(path: str | os.PathLike) -> Iterator[tuple[zipfile.ZipFile, dict[str, NpyMember]]]:
    """Open an .npz archive and read every member's header: (zip file, key -> member).

    Errors are one clear line: not a zip archive (e.g. garbage bytes, or a single .npy), a
    member that is not a .npy array, or one that holds pickled Python objects (dtype object).
    Read a member's data with ``np.lib.format.read_array(zf.open(member.info), allow_pickle=False)``.
    """
    p = existing_file(path)
    with p.open("rb") as f:
        head = f.read(len(NPY_MAGIC))
    if head == NPY_MAGIC:
        raise ValueError(f"{p}: expected an .npz archive of named arrays, got a single .npy array")
    if not zipfile.is_zipfile(p):
        raise ValueError(f"{p}: not a readable .npz file (not a zip archive)")
    try:
        with zipfile.ZipFile(p) as zf:
            yield zf, npz_headers(zf, p)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
        raise ValueError(f"{p}: not a readable .npz file ({e})") from None


def npz_headers(zf: zipfile.ZipFile, where: Path) -> dict[str, NpyMember]:
    """key -> NpyMember for every member of an open .npz archive, from the headers only."""
    members = {}
    for info in zf.infolist():
        if not info.filename.endswith(".npy"):
            raise ValueError(f"{where}: not a readable .npz file (member {info.filename!r} is not a .npy array)")
        key = info.filename[: -len(".npy")]
        with zf.open(info) as f:
            shape, fortran, dtype = npy_header(f, f"{where}[{key!r}]")
        members[key] = NpyMember(key, shape, dtype, fortran, info)
    return members


def check_fits_in_memory(where: Path, nbytes: int) -> None:
    """Refuse to decompress more than the memory available now (with both numbers)."""
    available = available_memory()
    if available is not None and nbytes > available:
        raise ValueError(
            f"{where}: its arrays take {_fmt_bytes(nbytes)} decompressed, more than the {_fmt_bytes(available)} "
            "of memory available; convert it to a directory dataset (attnfuse convert), which is read from disk"
        )


def load_npz(
    path: str | os.PathLike, *, task: str = "auto", num_classes: int | None = None, classes: list | None = None
) -> MultimodalDataset:
    """Load a dataset from an .npz file.

    Arrays: ``x_<modality>`` (N, D) or (N, T, D) real, ``y``, optional ``mask_<modality>`` bool
    (N,) or (N, T), optional ``split`` strings, optional ``info_<name>`` per-sample extras.
    Modalities keep the order they have in the file. ``task``, ``num_classes`` and ``classes``
    are passed to :class:`MultimodalDataset` (e.g. a trained model's label space, so that data
    with a single class can still be evaluated). The headers are checked first: an archive whose
    arrays would not fit in the available memory is refused before anything is decompressed.
    """
    p = Path(path)
    with open_npz(p) as (zf, members):
        check_fits_in_memory(p, sum(m.nbytes for m in members.values()))
        arrays = {}
        for key, member in members.items():
            try:
                with zf.open(member.info) as f:
                    arrays[key] = np.lib.format.read_array(f, allow_pickle=False)
            except (ValueError, EOFError, OSError, zlib.error, zipfile.BadZipFile) as e:
                raise ValueError(f"{p}: not a readable .npz file (member {key!r}: {e})") from None
    parts = dataset_arrays(p, arrays)
    return MultimodalDataset(**parts, name=p.stem, task=task, num_classes=num_classes, classes=classes)


def save_npz(data: MultimodalDataset, path: str | os.PathLike) -> None:
    """Save in the ``load_npz`` format, atomically (temp file in the same directory + rename).

    Encoded class labels are written as the original labels (``data.classes``)."""
    p = Path(path)
    if not p.parent.is_dir():
        raise FileNotFoundError(f"directory does not exist: {p.parent}")
    arrays = {f"x_{m.name}": data.features[m.name] for m in data.modalities}
    arrays.update(non_feature_arrays(data))
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
