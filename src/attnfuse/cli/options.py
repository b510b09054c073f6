"""Command-line options generated from :class:`attnfuse.options.Option` (the dataclass fields):
a command's signature is built here, so a setting is declared once, on its dataclass."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import typer
from rich.markup import escape

from ..options import Option

__all__ = ["with_options", "given"]


def _parameter(opt: Option, panel: str | None) -> inspect.Parameter:
    names = [opt.flag] + [f"--{f.replace('_', '-')}" for f in opt.flags]
    # escape: help is printed as rich markup, where "[columns]" would be read as a style tag.
    help_text = escape(opt.help + (f" One of: {', '.join(opt.choices)}." if opt.choices else ""))
    if opt.type is bool:
        decl = f"{opt.flag}/--no-{opt.flag[2:]}" if opt.default else opt.flag
        # metavar "": a flag takes no value (typer's rich help would print a "<bool>" placeholder).
        default = typer.Option(opt.default, decl, help=help_text, metavar="", rich_help_panel=panel)
        annotation: Any = bool
    else:
        value_type = list[str] if opt.type is list else opt.type
        annotation = value_type | None if opt.optional else value_type
        default = typer.Option(
            opt.default,
            *names,
            help=help_text,
            show_default=opt.default is not None,
            rich_help_panel=panel,
            metavar=opt.metavar,
        )
    return inspect.Parameter(opt.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def with_options(
    options: list[Option], panels: Callable[[Option], str | None] = lambda o: None
) -> Callable[[Callable], Callable]:
    """Give a command ``fn(ctx, **fixed, **options)`` the generated ``options`` as keyword
    parameters after its own (typer reads the signature); ``panels`` names each option's group
    in ``--help``."""

    def decorate(fn: Callable) -> Callable:
        sig = inspect.signature(fn)
        own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        params = own + [_parameter(o, panels(o)) for o in options]
        fn.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        fn.__annotations__ = {p.name: p.annotation for p in params}
        return fn

    return decorate


def given(ctx: typer.Context, values: dict[str, Any]) -> dict[str, Any]:
    """The values the user typed on the command line (not the defaults)."""
    return {k: v for k, v in values.items() if ctx.get_parameter_source(k).name != "DEFAULT"}
