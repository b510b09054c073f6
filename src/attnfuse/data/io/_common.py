"""Helpers shared by the readers."""

from __future__ import annotations

import os
from pathlib import Path


def existing_file(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"data file not found: {p}")
    if not p.is_file():
        raise ValueError(f"data file: expected a file, got a directory or special file: {p}")
    return p
