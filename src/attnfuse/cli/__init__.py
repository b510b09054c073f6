"""The ``attnfuse`` command line: one module per group of commands, registered here behind one
error boundary (:func:`.common.cli_errors`); command-line parsing errors are one line too.

Exit codes: 0 success; 2 bad input or environment (data, options, a model directory, a file that
cannot be read or written, no space, no memory); 1 an internal error (a bug: the line names the
exception and where its traceback was written); 130 Ctrl-C; 143 SIGTERM. ``--debug`` prints the
traceback of any error."""

from __future__ import annotations

import sys

import typer
from typer.core import TyperCommand, TyperGroup

from .._version import __version__
from . import common
from .common import cli_errors, err_console, one_line
from .data import convert_cmd, datasets
from .explain import explain
from .export import export_cmd
from .predict import evaluate, predict_cmd
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
        print(f"attnfuse {__version__}")
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


app.command(cls=_Command, context_settings={"allow_interspersed_args": True})(cli_errors(train))
app.command(cls=_Command)(cli_errors(evaluate))
app.command("predict", cls=_Command)(cli_errors(predict_cmd, "predict"))
app.command(cls=_Command)(cli_errors(datasets))
app.command("convert", cls=_Command)(cli_errors(convert_cmd, "convert"))
app.command(cls=_Command)(cli_errors(explain))
app.command("tune", cls=_Command, context_settings={"allow_interspersed_args": True})(cli_errors(tune_cmd))
app.command("export", cls=_Command)(cli_errors(export_cmd, "export"))


def main() -> None:
    app()
