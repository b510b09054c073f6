"""Options declared once, on the dataclass fields they set.

A field made with :func:`option` is a user-facing setting: its name, type, default and help text
are all the command line (``attnfuse train --help``), ``--config`` files and ``run.yaml`` know
about it, in the way LightningCLI reads options off class signatures. A plain dataclass field is
internal (for example the modalities of a fusion config, which come from the data).

Validation stays where it belongs, in each dataclass's ``__post_init__``: the command line does
not check values a second time.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable
from dataclasses import MISSING, dataclass, field
from typing import Any

__all__ = ["option", "Option", "options_of", "coerce"]


def option(
    default: Any, help: str, *, flags: tuple[str, ...] = (), choices: tuple[str, ...] = (), metavar: str | None = None
) -> Any:
    """A dataclass field that is also a user-facing option.

    ``flags`` are extra command-line names (``("heads",)`` gives ``--heads`` next to ``--nhead``);
    ``choices`` restricts a string option to these values (checked by the dataclass, listed in help);
    ``metavar`` names the value in help (default: its type).
    """
    meta = {"help": help, "flags": flags, "choices": choices, "metavar": metavar}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Option:
    """One option: ``name`` (the field), its value type, default, help, extra flags and choices."""

    name: str
    type: type
    default: Any
    help: str
    flags: tuple[str, ...]
    choices: tuple[str, ...]
    optional: bool  # None is an accepted value (e.g. "use the model's own default")
    owner: type  # the dataclass that declares it
    metavar: str | None = None

    @property
    def flag(self) -> str:
        """The primary command-line flag: the field name with dashes."""
        return "--" + self.name.replace("_", "-")


def options_of(*classes: type) -> list[Option]:
    """The options declared by ``classes`` (dataclasses), in field order; a name declared by several
    classes (e.g. ``nhead`` by every attention fusion) appears once, from the first class."""
    seen: dict[str, Option] = {}
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if "help" not in f.metadata or f.name in seen:
                continue
            value_type, optional = _unwrap(hints[f.name])
            default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
            seen[f.name] = Option(
                f.name,
                value_type,
                default,
                f.metadata["help"],
                f.metadata["flags"],
                f.metadata["choices"],
                optional,
                cls,
                f.metadata["metavar"],
            )
    return list(seen.values())


def _unwrap(hint: Any) -> tuple[type, bool]:
    """``int | None`` -> (int, True); ``float`` -> (float, False); ``list[str]`` -> (list, False)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return _unwrap(rest[0])[0] if len(rest) == 1 else object, True
    origin = typing.get_origin(hint)
    return (origin or hint), False


def coerce(opt: Option, value: Any, where: str) -> Any:
    """A value read from a config file, converted to the option's type (an int for a float option,
    a list for a list option); anything else is a ValueError naming the option and ``where``."""
    if value is None:
        if opt.optional:
            return None
        raise ValueError(f"{where}: {opt.name}: expected a {opt.type.__name__}, got null")
    if opt.type is bool:
        if isinstance(value, bool):
            return value
    elif opt.type is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif opt.type is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif opt.type is list:
        if isinstance(value, list):
            return value
        if isinstance(value, str):
            return [value]
    elif opt.type is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        return value
    raise ValueError(f"{where}: {opt.name}: expected a {opt.type.__name__}, got {value!r}")


def split_by_owner(values: dict[str, Any], owners: Iterable[type]) -> dict[type, dict[str, Any]]:
    """Group option values by the dataclass that declares each (a name several classes declare goes
    to every one of them)."""
    out: dict[type, dict[str, Any]] = {}
    for cls in owners:
        names = {f.name for f in dataclasses.fields(cls) if "help" in f.metadata}
        out[cls] = {k: v for k, v in values.items() if k in names}
    return out
