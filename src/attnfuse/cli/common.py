"""What every command shares: the consoles, the error boundary and the metrics table."""

from __future__ import annotations

import contextlib
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
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..pipeline import ReadOptions, load_trained
from ..pipeline import split_parts as _parts  # noqa: F401

console = Console()
err_console = Console(stderr=True)

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


def one_line(message: str) -> str:
    """An error message as one line of plain text (escaped: a path or value with [brackets] is
    text, not rich markup)."""
    return escape(" ".join(str(message).split()))


def _fmt(v: float | None) -> str:
    """A metric; "n/a" where it is undefined (null in the JSON files, NaN in memory)."""
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def _metrics_table(title: str, metrics: dict[str, dict]) -> Table:
    """Rows: splits; columns: metrics. Values are floats (None: undefined) or {'mean', 'std'} summaries."""
    table = Table(title=escape(title), title_justify="left")  # titles quote paths/names: plain text
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
