"""Bounded-memory helpers: row chunks, available memory, and reading rows of memory-mapped arrays.

Everything that scans a whole modality (validation, standardisation statistics, conversion) walks
it in chunks of rows of about ``CHUNK_BYTES``, so its temporaries stay small however large N is.

Rows of a memory-mapped array are read with ``pread`` from the file behind the map
(:func:`read_rows`), not through the map: every page touched through a map joins the process's
resident set, and the kernel maps whole large folios around each touched row (about 2 MB per
randomly chosen row was measured), so gathering a batch of random rows through the map would
add hundreds of MB of RSS; ``pread`` copies exactly the rows into the batch.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Iterator

import numpy as np

CHUNK_BYTES = 16 * 2**20  # per chunk of the source array; temporaries are at most a few times this


def row_chunks(n: int, row_bytes: int, budget: int = CHUNK_BYTES) -> Iterator[slice]:
    """Consecutive slices over ``n`` rows, each about ``budget`` bytes of rows of ``row_bytes``."""
    step = max(1, budget // max(1, row_bytes))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux's MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def is_mapped(array: np.ndarray) -> bool:
    """True for a memory-mapped array (``numpy.load(mmap_mode="r")``) or a view of one."""
    return isinstance(array, np.memmap) and isinstance(getattr(array, "_mmap", None), mmap.mmap)


def _root_map(array: np.ndarray) -> np.memmap | None:
    """The np.memmap that owns ``array``'s memory (the one numpy.load made), or None."""
    root = array
    while isinstance(root.base, np.ndarray):
        root = root.base
    if isinstance(root, np.memmap) and root.filename and isinstance(root.base, mmap.mmap):
        return root
    return None


def read_rows(array: np.ndarray, rows: np.ndarray) -> np.ndarray | None:
    """``array[rows]`` read from the file behind a memory-mapped, row-major array (see the module),
    or None when ``array`` is not one (then index it as usual). rows: (B,) int64 in [0, N)."""
    root = _root_map(array) if is_mapped(array) else None
    if root is None or not array.flags.c_contiguous or array.ndim == 0:
        return None
    start = root.offset + (array.ctypes.data - root.ctypes.data)  # file offset of array[0]
    row_bytes = array.strides[0]
    out = np.empty((rows.size, *array.shape[1:]), dtype=array.dtype)
    buf = memoryview(out.reshape(-1).view(np.uint8))
    order = np.argsort(rows, kind="stable")  # read in file order
    with open(root.filename, "rb", buffering=0) as f:
        for j in order.tolist():
            target = buf[j * row_bytes : (j + 1) * row_bytes]
            if os.preadv(f.fileno(), [target], start + int(rows[j]) * row_bytes) != row_bytes:
                raise ValueError(f"{root.filename}: the file is shorter than its header says (row {rows[j]})")
    return out


def release_pages(array: np.ndarray) -> None:
    """Drop the pages of a memory-mapped array from this process's resident set.

    Pages of a mapped file that were read count in the process's RSS until they are unmapped,
    although they are clean page cache the kernel may reclaim at any time. Dropping them
    (``MADV_DONTNEED`` on a read-only file mapping discards nothing: the file is the backing
    store) keeps RSS a measure of what the process really holds. A no-op for other arrays and
    on systems without ``madvise``.
    """
    handle = getattr(array, "_mmap", None)
    if isinstance(handle, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
        with contextlib.suppress(OSError, ValueError):  # a closed map, or a kernel that refuses: only a hint
            handle.madvise(mmap.MADV_DONTNEED)
