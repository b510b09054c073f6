"""Regenerate ``src/attnfuse/resources/mfeat.npz`` from the UCI Multiple Features CSVs.

Usage (from the repository root)::

    python tools/vendor_mfeat.py [--src ../shared/data/uci-mfeat] [--out src/attnfuse/resources/mfeat.npz]

Input: six CSVs ``mfeat-<view>.csv`` whose first row holds column numbers, whose last
column is the digit label, and whose rows are aligned across files.

Output: an attnfuse ``.npz`` dataset (the format ``attnfuse.data.load_npz`` reads):
``x_fou, x_fac, x_kar, x_pix, x_zer, x_mor`` (in that order) and ``y`` (int64, 0..9).
Only the storage changes, never a value:

- views whose values are all integers (``fac``, ``pix``) are stored as the smallest
  integer dtype that holds them (uint8/int16), which compresses far better;
- the other views are stored as float32. Every CSV value has at most 5 significant
  digits and float32 keeps 6, so each stored float32 is the float32 nearest to the
  CSV text and prints back as the same decimal. The script checks this for every
  value and refuses to write otherwise.

Needs only numpy and the standard library.
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
from decimal import Decimal
from pathlib import Path

import numpy as np

VIEWS = ("fou", "fac", "kar", "pix", "zer", "mor")  # the order attnfuse exposes them in
EXPECTED_DIMS = {"fou": 76, "fac": 216, "kar": 64, "pix": 240, "zer": 47, "mor": 6}
ROOT = Path(__file__).resolve().parent.parent


def read_view(path: Path) -> tuple[list[list[str]], list[str]]:
    """Return (feature strings per row, label strings) of one CSV, header row dropped."""
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    if any(len(r) != len(header) for r in body):
        raise ValueError(f"{path}: rows do not all have {len(header)} columns")
    return [r[:-1] for r in body], [r[-1] for r in body]


def encode(view: str, cells: list[list[str]]) -> np.ndarray:
    """Store one view losslessly in a compact dtype, verifying every value."""
    decimals = [[Decimal(s) for s in row] for row in cells]
    if all(d == d.to_integral_value() for row in decimals for d in row):
        ints = np.array([[int(d) for d in row] for row in decimals], dtype=np.int64)
        for dtype in (np.uint8, np.int8, np.uint16, np.int16, np.int32):
            info = np.iinfo(dtype)
            if ints.min() >= info.min and ints.max() <= info.max:
                return ints.astype(dtype)
        return ints
    values = np.array([[float(s) for s in row] for row in cells], dtype=np.float32)
    # Faithfulness check: the shortest decimal that round-trips each float32 must equal the CSV text.
    for i, row in enumerate(decimals):
        for j, d in enumerate(row):
            back = Decimal(np.format_float_positional(values[i, j], unique=True, trim="-"))
            if back != d:
                raise ValueError(f"mfeat-{view}: value {cells[i][j]!r} at row {i}, column {j} is not exact in float32")
    return values


def build(src: Path) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    labels: list[str] | None = None
    for view in VIEWS:
        cells, view_labels = read_view(src / f"mfeat-{view}.csv")
        if labels is None:
            labels = view_labels
        elif view_labels != labels:
            raise ValueError(f"mfeat-{view}: labels are not aligned with mfeat-{VIEWS[0]}")
        x = encode(view, cells)
        if x.shape != (2000, EXPECTED_DIMS[view]):
            raise ValueError(f"mfeat-{view}: expected shape (2000, {EXPECTED_DIMS[view]}), got {x.shape}")
        arrays[f"x_{view}"] = x
    assert labels is not None
    arrays["y"] = np.array([int(s) for s in labels], dtype=np.int64)
    return arrays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=ROOT.parent / "shared" / "data" / "uci-mfeat")
    parser.add_argument("--out", type=Path, default=ROOT / "src" / "attnfuse" / "resources" / "mfeat.npz")
    args = parser.parse_args()

    arrays = build(args.src)
    # Write to a temporary file next to the target, then rename: never a half-written file.
    fd, tmp = tempfile.mkstemp(dir=args.out.parent, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        np.savez_compressed(f, **arrays)
    os.chmod(tmp, 0o644)
    os.replace(tmp, args.out)
    summary = ", ".join(f"{k} {v.dtype}{list(v.shape)}" for k, v in arrays.items())
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB): {summary}")


if __name__ == "__main__":
    main()
