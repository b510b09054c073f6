"""What every command shares: the consoles, the error boundary and the metrics table."""

from __future__ import annotations

import functools
from collections.abc import Callable

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..pipeline import load_trained as _load_for_model  # noqa: F401 (the explain command's name for it)
from ..pipeline import split_parts as _parts  # noqa: F401

console = Console()
err_console = Console(stderr=True)


def cli_errors(command: Callable) -> Callable:
    """One clear line and exit code 2 for bad input, instead of a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (ValueError, TypeError, OSError) as e:
            message = (
                str(e) if not isinstance(e, FileNotFoundError) or not e.filename else f"no such file: {e.filename}"
            )
            err_console.print(f"[bold red]error:[/] {one_line(message)}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=2) from None

    return wrapper


def one_line(message: str) -> str:
    """An error message as one line of plain text (escaped: a path or value with [brackets] is
    text, not rich markup)."""
    return escape(" ".join(str(message).split()))


def _fmt(v: float) -> str:
    return f"{v:.4f}"


def _metrics_table(title: str, metrics: dict[str, dict]) -> Table:
    """Rows: splits; columns: metrics. Values are floats or {'mean', 'std'} summaries."""
    table = Table(title=escape(title), title_justify="left")  # titles quote paths/names: plain text
    names = list(next(iter(metrics.values())))
    table.add_column("split")
    for n in names:
        table.add_column(n, justify="right")
    for split, values in metrics.items():
        cells = [
            f"{values[n]['mean']:.4f} ± {values[n]['std']:.4f}" if isinstance(values[n], dict) else _fmt(values[n])
            for n in names
        ]
        table.add_row(split, *cells)
    return table
