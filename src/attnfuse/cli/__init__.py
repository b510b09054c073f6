"""The ``attnfuse`` command line: one module per group of commands, registered here behind one
error boundary (:func:`.common.cli_errors`); command-line parsing errors are one line too.

Exit codes: 0 success; 2 bad input or environment (data, options, a model directory, a file that
cannot be read or written, no space, no memory); 1 an internal error (a bug: the line names the
exception and where its traceback was written); 130 Ctrl-C; 143 SIGTERM; 141 stdout closed early
(``attnfuse datasets | head -1``: quietly, see :mod:`attnfuse_cli`). ``--debug`` prints the
traceback of any error.

Signals: :func:`main` (and the console script, and ``python -m attnfuse``) runs the command line
under :mod:`attnfuse_cli`'s guard, which ends the process at once with one line on Ctrl-C or
SIGTERM; while a command runs, :func:`_command` hands over to Python's own Ctrl-C handling (a
KeyboardInterrupt, which the error boundary turns into one line and exit code 130 after the
command's clean-up) and :func:`.common.cli_errors` to its SIGTERM handling."""

from __future__ import annotations

import functools
import signal
import sys
import threading
from collections.abc import Callable
from typing import NoReturn

import rich.console
import typer
from typer.core import TyperCommand, TyperGroup

import attnfuse_cli

from .._version import __version__
from . import common
from .common import cli_errors, err_console, one_line
from .data import convert_cmd, datasets
from .explain import explain
from .export import export_cmd
from .predict import evaluate, predict_cmd
from .serve import serve_cmd
from .train import train
from .tune import tune_cmd


def _flag_help(option):
    """``--help`` is a flag: no "<bool>" placeholder in the rich help."""
    if option is not None:
        option.metavar = ""
    return option


class _Command(TyperCommand):
    def get_help_option(self, ctx):
        return _flag_help(super().get_help_option(ctx))


class _OneLineErrors(TyperGroup):
    """Parsing errors (an unknown option, a value of the wrong type) as one line and exit code 2,
    like every other error, instead of click's boxed usage message."""

    def get_help_option(self, ctx):
        return _flag_help(super().get_help_option(ctx))

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except BrokenPipeError:  # stdout closed while printing outside a command
            _stdout_closed()
        except typer.TyperException as e:  # click's usage errors (typer vendors click)
            err_console.print(f"[bold red]error:[/] {one_line(e.format_message())}", highlight=False, soft_wrap=True)
            sys.exit(2)
        except typer.Abort:  # Ctrl-C outside a command (while parsing)
            err_console.print("[bold red]error:[/] interrupted (Ctrl-C)", highlight=False)
            sys.exit(common.EXIT_INTERRUPTED)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=_OneLineErrors,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Attention-based multimodal fusion: train, tune, evaluate, predict and explain.",
)


def _version(value: bool) -> None:
    if value:
        try:
            print(f"attnfuse {__version__}", flush=True)
        except BrokenPipeError:  # click would make it exit code 1
            _stdout_closed()
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, metavar="", help="Print the version and exit."
    ),
    debug: bool = typer.Option(
        False, "--debug", metavar="", help="On an error, print the full traceback as well as the one-line message."
    ),
) -> None:
    """Attention-based multimodal fusion: train, tune, evaluate, predict and explain."""
    common.debug = debug


def _command(function: Callable, name: str | None = None) -> Callable:
    """``function`` as a command: behind the error boundary (:func:`.common.cli_errors`), with
    Python's own Ctrl-C handling while it runs (SIGINT raises KeyboardInterrupt, so that the
    command cleans up; ``train`` replaces it with its stop at a step boundary) in place of the
    start-up guard, which is put back when it returns. Handlers are swapped, never removed, so no
    moment is left to the default disposition (death without a word). A closed stdout ends the
    command quietly with exit code 141."""

    @functools.wraps(function)
    def running(*args, **kwargs):
        previous = None
        try:
            if threading.current_thread() is threading.main_thread():
                previous = signal.signal(signal.SIGINT, signal.default_int_handler)
            return function(*args, **kwargs)
        except BrokenPipeError:
            _stdout_closed()
        finally:
            if previous is not None:  # None: a handler not set from Python, which cannot be put back
                signal.signal(signal.SIGINT, previous)

    return cli_errors(running, name or function.__name__)


app.command(cls=_Command, context_settings={"allow_interspersed_args": True})(_command(train))
app.command(cls=_Command)(_command(evaluate))
app.command("predict", cls=_Command)(_command(predict_cmd, "predict"))
app.command(cls=_Command)(_command(datasets))
app.command("convert", cls=_Command)(_command(convert_cmd, "convert"))
app.command(cls=_Command)(_command(explain))
app.command("tune", cls=_Command, context_settings={"allow_interspersed_args": True})(_command(tune_cmd, "tune"))
app.command("export", cls=_Command)(_command(export_cmd, "export"))
app.command("serve", cls=_Command)(_command(serve_cmd, "serve"))


def _stdout_closed() -> NoReturn:
    """Stdout was closed by its reader: exit quietly with code 141 (see :mod:`attnfuse_cli`; rich
    and click make it exit code 1, this program's "internal error"), stdout sent to /dev/null."""
    attnfuse_cli.stdout_closed()
    raise SystemExit(attnfuse_cli.EXIT_CLOSED_STDOUT)


def _closed_stdout(console: rich.console.Console) -> NoReturn:
    """A rich console's reaction to a BrokenPipeError, in this program: :func:`_stdout_closed`."""
    console.quiet = True
    _stdout_closed()


def main() -> None:
    """Run the command line and end the process with its exit code (see :mod:`attnfuse_cli`:
    Ctrl-C or SIGTERM at any moment is one line and exit code 130 or 143; a closed stdout, 141).
    Every rich console of the process, typer's help included, takes this program's exit on a
    closed stdout (which is why this is done here, for the program, and not on import)."""
    rich.console.Console.on_broken_pipe = _closed_stdout
    attnfuse_cli.run(app)
