"""What every command shares: the consoles, the error boundary and the metrics table.

Tables fit the terminal (80 columns included) without a cell cut to "…": the consoles here
print every :class:`~rich.table.Table` through :class:`Fitted`, which splits a table too wide
for the width into parts of its columns, each part repeating the first (key) column. A command
prints a table with ``console.print(table)`` and needs nothing else."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import math
import re
import signal
import tempfile
import threading
import traceback
from collections.abc import Callable, Iterator

import torch
import typer
from rich.console import Console, ConsoleOptions, RenderResult
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Column, Table

from ..pipeline import ReadOptions, load_trained


class Fitted:
    """``table`` rendered within the width it is given, with no cell cut.

    A table whose columns fit at their natural widths is printed as it is. Otherwise every column
    needs its longest word (a right-aligned column, which holds numbers, its whole widest cell:
    "0.8123 ± 0.0123" is never broken; the first column, its widest cell when that takes at most
    a third of the width), and the columns are laid out in as few parts as fit, each
    part a table of the first column and the next columns that fit beside it; the room left in a
    part goes to its wrapping columns, which wrap between words. A single word wider than the
    whole width (a long path) is folded onto the next line, never dropped."""

    def __init__(self, table: Table) -> None:
        self.table = table

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield from fit_table(self.table, console, options.max_width)

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement.get(console, options, self.table)


def fit_table(table: Table, console: Console, width: int) -> list[Table]:
    """The parts of ``table`` that :class:`Fitted` prints at ``width`` columns (see there)."""
    columns = table.columns
    if not columns:
        return [table]
    ranges = [_column_range(table, c, console, width) for c in columns]  # (least, natural) content widths
    if ranges[0][1] <= width // 3:  # the key column, repeated in every part, keeps its lines whole
        ranges[0] = (ranges[0][1], ranges[0][1])
    pad = [_padding(table, i, len(columns)) for i in range(len(columns))]

    def room(indices: list[int], which: int) -> int:  # the table's width with these columns
        border = (2 if table.box and table.show_edge else 0) + (len(indices) - 1 if table.box else 0)
        return border + sum(ranges[i][which] + pad[i] for i in indices)

    everything = list(range(len(columns)))
    if room(everything, 1) <= width:
        return [table]
    groups: list[list[int]] = []
    for i in everything[1:]:
        if groups and room([0, *groups[-1], i], 0) <= width:
            groups[-1].append(i)
        else:
            groups.append([i])
    if room(everything, 0) <= width or not groups:
        groups = [everything[1:]]
    parts = []
    for n, group in enumerate(groups):
        indices = [0, *group]
        part = copy.copy(table)
        spare = width - room(indices, 0)
        widths = _share(spare, [ranges[i] for i in indices], [_wraps(columns[i]) for i in indices])
        part.columns = [
            dataclasses.replace(columns[i], _index=k, width=w, overflow="fold")
            for k, (i, w) in enumerate(zip(indices, widths))
        ]
        if n:
            part.title = None if table.title is None else f"{table.title} (continued)"
        if n < len(groups) - 1:
            part.caption = None
        parts.append(part)
    return parts


def _wraps(column: Column) -> bool:
    """A column whose cells may wrap between words (text); a right-aligned one holds numbers."""
    return not column.no_wrap and column.justify != "right"


def _column_range(table: Table, column: Column, console: Console, width: int) -> tuple[int, int]:
    """(least, natural) width of a column's content: its longest word (a column that does not
    wrap: its widest cell) and its widest cell; headers and footers included."""
    options = console.options.update_width(max(1, width))
    cells = [column.header, column.footer, *column.cells] if table.show_header else [column.footer, *column.cells]
    least = natural = 1
    for cell in cells:
        if cell == "" or cell is None:
            continue
        m = Measurement.get(console, options, cell)
        natural = max(natural, m.maximum)
        least = max(least, m.minimum if _wraps(column) else m.maximum)
    least = min(least, max(1, width - 4))  # a word wider than the screen folds
    return least, max(least, natural)


def _padding(table: Table, index: int, count: int) -> int:
    _, right, _, left = table.padding
    if not table.pad_edge:
        left = 0 if index == 0 else left
        right = 0 if index == count - 1 else right
    return left + right


def _share(spare: int, ranges: list[tuple[int, int]], wraps: list[bool]) -> list[int]:
    """Column widths: each its least, and ``spare`` columns given to the wrapping ones, each up to
    its natural width, in proportion to what it lacks."""
    widths = [least for least, _ in ranges]
    lack = [natural - least if w else 0 for (least, natural), w in zip(ranges, wraps)]
    total = sum(lack)
    if total and spare > 0:
        given = [min(short, spare * short // total) for short in lack]
        left = min(spare, total) - sum(given)
        for i in sorted(range(len(lack)), key=lambda i: lack[i] - given[i], reverse=True):
            if left <= 0:
                break
            if given[i] < lack[i]:
                given[i] += 1
                left -= 1
        widths = [w + g for w, g in zip(widths, given)]
    return widths


class _FittingConsole(Console):
    """A console that prints every table as :class:`Fitted` (within the width, no cell cut)."""

    def print(self, *objects, **kwargs) -> None:  # type: ignore[override]
        super().print(*(Fitted(o) if isinstance(o, Table) else o for o in objects), **kwargs)


console = _FittingConsole()
err_console = _FittingConsole(stderr=True)

# Exit codes: 0 success, 1 an internal error (a bug: please report it), 2 a problem with the input
# or the environment (bad data or options, a file that cannot be read or written, no memory),
# 130 interrupted (Ctrl-C), 143 terminated (SIGTERM).
EXIT_INTERNAL, EXIT_INPUT, EXIT_INTERRUPTED, EXIT_TERMINATED = 1, 2, 130, 143

debug = False  # the global --debug flag: print the full traceback with the one-line error


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt, so that the same clean-up
    runs (transactions roll back, temporaries are removed)."""


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """During a command, SIGTERM raises :class:`Terminated` (Python's default would end the process
    at once, leaving temporaries behind). A second SIGTERM during the clean-up is ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def describe(e: BaseException) -> tuple[int, str]:
    """(exit code, one-line message) for an exception that ended a command."""
    if isinstance(e, Terminated):
        return EXIT_TERMINATED, "terminated (SIGTERM)"
    if isinstance(e, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "interrupted (Ctrl-C)"
    if _out_of_memory(e):
        asked = re.search(r"tried to allocate ([\d.]+ ?\w+)", str(e), re.IGNORECASE)  # torch says how much
        detail = f" (tried to allocate {asked.group(1)})" if asked else ""
        return EXIT_INPUT, f"out of memory{detail}: try a smaller --batch-size or --d-model, or less data"
    if isinstance(e, OSError):
        return EXIT_INPUT, describe_os_error(e)
    if isinstance(e, (ValueError, TypeError)):
        return EXIT_INPUT, str(e)
    return EXIT_INTERNAL, f"{type(e).__name__}: {e}"


def _out_of_memory(e: BaseException) -> bool:
    # torch reports a failed CPU allocation as a RuntimeError, CUDA's as torch.OutOfMemoryError.
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(e, RuntimeError) and "can't allocate memory" in str(e)
    )


def describe_os_error(e: OSError) -> str:
    """ "no space left on device: PATH", "permission denied: PATH", ...: the reason, then the file."""
    if e.strerror and e.filename:
        return f"{e.strerror[0].lower()}{e.strerror[1:]}: {e.filename}"
    return str(e)


def _save_traceback(e: BaseException) -> str:
    """Where the traceback of an internal error was written, for the report ("" if it could not be)."""
    try:
        with tempfile.NamedTemporaryFile(
            "w", prefix="attnfuse-traceback-", suffix=".txt", delete=False, encoding="utf-8"
        ) as f:
            f.write("".join(traceback.format_exception(type(e), e, e.__traceback__)))
            return f.name
    except OSError:
        return ""


def cli_errors(command: Callable, name: str | None = None) -> Callable:
    """The error boundary of the command ``name`` (default: the function's name): every exception
    becomes one line on stderr and an exit code (see ``EXIT_*``); the traceback is printed with
    ``--debug`` only (and, for an internal error, written to a file named in the line). SIGTERM is
    handled like Ctrl-C during the command."""
    name = name or command.__name__

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            with _sigterm_raises():
                return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise  # typer's own exits and usage errors
        except (Exception, KeyboardInterrupt) as e:
            code, message = describe(e)
            if debug:
                err_console.print_exception(show_locals=False)
            elif code == EXIT_INTERNAL:
                saved = _save_traceback(e)
                trace = f"traceback in {saved}" if saved else "run with --debug for the traceback"
                message = f"internal error in `attnfuse {name}`: {message} ({trace}; please report it)"
            err_console.print(f"[bold red]error:[/] {one_line(message)}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=code) from None

    return wrapper


MAX_LINE = 1000  # characters of an error line: a message that quotes a huge value is cut, with "…"


def one_line(message: str) -> str:
    """An error message as one line of plain text (escaped: a path or value with [brackets] is
    text, not rich markup), at most :data:`MAX_LINE` characters before escaping: the last resort
    against a message that quotes a value read from a file whole (the messages themselves quote
    short forms, see :func:`attnfuse.options.shorten`)."""
    text = str(message)
    cut = len(text) > 4 * MAX_LINE  # whitespace runs collapse below: look at a bounded prefix only
    text = " ".join(text[: 4 * MAX_LINE].split())
    if cut or len(text) > MAX_LINE:
        text = text[: MAX_LINE - 1].rstrip() + "…"
    return escape(text)


def _fmt(v: float | None) -> str:
    """A metric; "n/a" where it is undefined (null in the JSON files, NaN in memory)."""
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def metrics_table(title: str, metrics: dict[str, dict]) -> Table:
    """Rows: splits; columns: metrics. Values are floats (None: undefined) or {'mean', 'std'} summaries."""
    table = Table(title=escape(title), title_justify="left")  # titles quote paths/names: plain text
    # (too many metrics for the width, --metrics sentiment at 80 columns: printed in parts, see Fitted)
    names = list(next(iter(metrics.values())))
    table.add_column("split")
    for n in names:
        table.add_column(n, justify="right")
    for split, values in metrics.items():
        cells = [
            f"{_fmt(values[n]['mean'])} ± {_fmt(values[n]['std'])}" if isinstance(values[n], dict) else _fmt(values[n])
            for n in names
        ]
        table.add_row(split, *cells)
    return table


def load_for_model(model, data: str | None, read: dict):
    """A trained model and its data (default: its training data), read with the reading options
    given on the command line (:class:`attnfuse.pipeline.ReadOptions`; by default the model's own)."""
    options = ReadOptions(**read)
    return load_trained(model, data, options.allow_pickle, **options.table_options())
