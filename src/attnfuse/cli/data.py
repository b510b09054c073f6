"""``attnfuse datasets`` and ``attnfuse convert``: the data side of the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from ..data import BUILTINS, convert
from ..data.validation import TASKS
from ..pipeline import ReadOptions, data_options
from .common import console
from .options import with_options


def datasets() -> None:
    """List the built-in datasets."""
    table = Table(title="built-in datasets (use the name with --data)", title_justify="left")
    table.add_column("name")
    table.add_column("description")
    for name, (_, description) in BUILTINS.items():
        table.add_row(name, description)
    console.print(table)


@with_options(data_options())
def convert_cmd(
    src: str = typer.Argument(..., help="A data file (.npz, .csv, .parquet, .pkl), a directory or a built-in's name."),
    dst: Path = typer.Argument(..., help="The directory dataset to write (must not exist, or be empty)."),
    task: str = typer.Option("auto", help=f"How to read the targets: {', '.join(TASKS)}."),
    seed: int = typer.Option(0, help="The seed of a generated built-in (synthetic-*)."),
    **read: Any,
) -> None:
    """Write data as a directory dataset, for data larger than memory.

    One .npy file per array, read memory-mapped by `attnfuse train --data DIR`; .npz and Parquet
    are converted in pieces."""
    options = ReadOptions(**read)
    data = convert(src, dst, allow_pickle=options.allow_pickle, seed=seed, task=task, **options.table_options())
    mods = ", ".join(m.name for m in data.modalities)
    console.print(f"{data.n} samples ({mods}) written to [bold]{escape(str(dst))}[/]", highlight=False)
