"""Options declared once, on the dataclass fields they set.

A field made with :func:`option` is a user-facing setting: its name, type, default and help text
are all the command line (``attnfuse train --help``), ``--config`` files and ``run.yaml`` know
about it, in the way LightningCLI reads options off class signatures. A plain dataclass field is
internal (for example the modalities of a fusion config, which come from the data).

Validation stays where it belongs, in each dataclass's ``__post_init__``: the command line does
not check values a second time. An integer option declares its range once, with the field
(``bounds=(1, 100_000)``), and :func:`check_bounds` in ``__post_init__`` enforces it: an epoch count
of 10^23 is a typo, not a run to start.

A value quoted in an error message goes through :func:`shorten`: a value read from a file can be
huge (a YAML "billion laughs" expands a few hundred bytes into a list of 10^9 strings), and the
message must stay one short line.
"""

from __future__ import annotations

import dataclasses
import reprlib
import types
import typing
from collections.abc import Iterable
from dataclasses import MISSING, dataclass, field
from typing import Any

from .checks import check_int, is_int, is_number

__all__ = ["option", "Option", "options_of", "by_name", "coerce", "check_bounds", "shorten"]

SHORT = 60  # characters of a value quoted in a message

_repr = reprlib.Repr()
# Bounded work as well as bounded output: reprlib looks at a few items per level and a few levels,
# however large or deep (or self-referencing, as YAML aliases make them) the value is.
_repr.maxlevel, _repr.maxlist, _repr.maxtuple, _repr.maxdict, _repr.maxset = 3, 4, 4, 4, 4
_repr.maxstring, _repr.maxlong, _repr.maxother = SHORT, SHORT, SHORT


def shorten(value: Any, limit: int = SHORT) -> str:
    """``repr(value)`` for an error message, at most ``limit`` characters ("..." marks a cut), in
    time that does not grow with the value's size."""
    text = _repr.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def option(
    default: Any,
    help: str,
    *,
    flags: tuple[str, ...] = (),
    choices: tuple[str, ...] = (),
    metavar: str | None = None,
    bounds: tuple[int, int] | None = None,
) -> Any:
    """A dataclass field that is also a user-facing option.

    ``flags`` are extra command-line names (``("heads",)`` gives ``--heads`` next to ``--nhead``);
    ``choices`` restricts a string option to these values (checked by the dataclass, listed in help);
    ``metavar`` names the value in help (default: its type); ``bounds`` ``(lo, hi)``: the range of an
    integer option, inclusive (checked by the dataclass with :func:`check_bounds`).
    """
    if bounds is not None and not (len(bounds) == 2 and bounds[0] <= bounds[1]):
        raise ValueError(f"bounds: expected (lo, hi) with lo <= hi, got {bounds!r}")
    meta = {"help": help, "flags": flags, "choices": choices, "metavar": metavar, "bounds": bounds}
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
    bounds: tuple[int, int] | None = None  # an integer option's range, inclusive

    @property
    def flag(self) -> str:
        """The primary command-line flag: the field name with dashes."""
        return "--" + self.name.replace("_", "-")


def by_name(values: dict[str, Any], options: Iterable[Option]) -> dict[str, Any]:
    """``values`` keyed by their options' names: a command-line alias becomes the option's name
    (``heads`` -> ``nhead``) and dashes are read as underscores; an unknown key stays as it is."""
    alias = {flag.replace("-", "_"): o.name for o in options for flag in o.flags}
    return {alias.get(k.replace("-", "_"), k.replace("-", "_")): v for k, v in values.items()}


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
                f.metadata.get("bounds"),
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
    if opt.type is list:
        return _string_list(opt, value, where)
    if opt.type not in (bool, float, int, str):
        return value
    if opt.type is bool:
        if isinstance(value, bool):
            return value
    elif opt.type is float:
        if is_number(value, finite=False):
            return float(value)
    elif opt.type is int:
        if is_int(value):
            return value
    elif isinstance(value, (str, int, float)) and not isinstance(value, bool):  # a str option
        return str(value)
    raise ValueError(f"{where}: {opt.name}: expected a {opt.type.__name__}, got {shorten(value)}")


def _string_list(opt: Option, value: Any, where: str) -> list:
    """A list option's value read from a config file: a string is a list of one; the items must be
    plain strings, as the command line gives them (a file could nest anything)."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise ValueError(f"{where}: {opt.name}: expected a list, got {shorten(value)}")
    bad = next((v for v in value if not isinstance(v, str)), None)
    if bad is not None:
        raise ValueError(f"{where}: {opt.name}: expected a list of strings, got an item {shorten(bad)}")
    return value


def check_bounds(obj: Any) -> None:
    """Check the integer options of dataclass instance ``obj`` against their declared ``bounds``:
    a ValueError naming the option, the bound and the value (None passes: an optional option's
    "not set")."""
    for f in dataclasses.fields(obj):
        bounds = f.metadata.get("bounds")
        if bounds is None:
            continue
        value, (lo, hi) = getattr(obj, f.name), bounds
        if value is None:
            continue
        check_int(f.name, value, lo, hi)


def split_by_owner(values: dict[str, Any], owners: Iterable[type]) -> dict[type, dict[str, Any]]:
    """Group option values by the dataclass that declares each (a name several classes declare goes
    to every one of them)."""
    out: dict[type, dict[str, Any]] = {}
    for cls in owners:
        names = {f.name for f in dataclasses.fields(cls) if "help" in f.metadata}
        out[cls] = {k: v for k, v in values.items() if k in names}
    return out
