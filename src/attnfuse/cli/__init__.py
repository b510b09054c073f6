"""The ``attnfuse`` command line: one module per group of commands, registered here behind one
error boundary (:func:`.common.cli_errors`)."""

from __future__ import annotations

import typer

from .common import cli_errors
from .explain import explain
from .predict import datasets, evaluate, predict_cmd
from .train import train

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Attention-based multimodal fusion: train, evaluate, predict and explain.",
)
app.command()(cli_errors(train))
app.command()(cli_errors(evaluate))
app.command("predict")(cli_errors(predict_cmd))
app.command()(datasets)
app.command()(cli_errors(explain))


def main() -> None:
    app()
