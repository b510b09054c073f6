"""Argument checks for the whole package: one place, one convention, one wording (as
scikit-learn's ``utils.validation.check_scalar``).

Each check raises ``TypeError`` when the value is of the wrong kind (a float or a bool where an int
belongs, a string where a number belongs) and ``ValueError`` when it is of the right kind but out of
range, with a message that names the argument, what was expected and what was given, e.g.
``embed_dim: expected an integer, got float 8.0`` or ``folds: expected an integer >= 2, got 1``. Each
returns the value as a plain Python ``int``/``float``/``bool`` (a NumPy integer becomes an ``int``).
Without them torch and NumPy fail later and elsewhere (``MultiheadAttention(8.0, 2)`` inside
``torch.empty``; ``kdim=0`` not at all).

The module sits at the base of the package and imports torch only inside the two checks that need it,
so the command line's start-up (which reads options before torch is loaded) can use it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import Tensor

__all__ = [
    "is_int",
    "is_number",
    "check_int",
    "check_optional_int",
    "check_bool",
    "check_float",
    "check_probability",
    "check_positive_float",
    "check_divides",
    "check_activation",
    "check_input_dtype",
]


def is_int(value: object) -> bool:
    """An integer and not a bool (``True`` is an ``int`` to Python, never a count to us)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: object, finite: bool = True) -> bool:
    """A real number and not a bool; with ``finite``, neither NaN nor infinite. The predicate under
    every number check here, and under the checks of the documents the package reads back
    (config.json, a checkpoint's trainer.json), whose errors name the file instead of an argument."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and (not finite or math.isfinite(value))


MAX_SHOWN = 60  # characters of a given value shown in a message: a huge list or frame stays one line


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= MAX_SHOWN else text[: MAX_SHOWN - 3] + "..."


def _given(value: object) -> str:
    return f"{type(value).__name__} {_shown(value)}"


def check_int(name: str, value: object, minimum: int = 1, maximum: int | None = None) -> int:
    """An int (not a bool, not a float such as 8.0; a NumPy integer is one) in ``[minimum, maximum]``."""
    if not is_int(value):
        raise TypeError(f"{name}: expected an integer, got {_given(value)}")
    if value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name}: expected an integer <= {maximum:,}, got {value}")
    return int(value)


def check_optional_int(name: str, value: object, minimum: int = 1, maximum: int | None = None) -> int | None:
    """None, or an int as :func:`check_int`."""
    return None if value is None else check_int(name, value, minimum, maximum)


def check_bool(name: str, value: object) -> bool:
    """A bool (an int such as 1 is refused: it is more likely a misplaced size)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {_given(value)}")
    return value


def _check_real(name: str, value: object) -> float:
    if not is_number(value, finite=False):
        raise TypeError(f"{name}: expected a float, got {_given(value)}")
    return float(value)


def check_float(
    name: str, value: object, minimum: float | None = None, maximum: float | None = None, *, above: bool = False
) -> float:
    """A finite real number (an int is one; a bool is not) in ``[minimum, maximum]``, or in
    ``(minimum, maximum]`` when ``above`` (the value must be strictly above ``minimum``)."""
    x = _check_real(name, value)
    low_ok = minimum is None or (x > minimum if above else x >= minimum)
    if not math.isfinite(x) or not low_ok or (maximum is not None and x > maximum):
        parts = [] if minimum is None else [f"{'>' if above else '>='} {minimum:g}"]
        parts += [] if maximum is None else [f"<= {maximum:g}"]
        raise ValueError(f"{name}: expected a finite number{' ' + ' and '.join(parts) if parts else ''}, got {value}")
    return x


def check_probability(name: str, value: object) -> float:
    """A dropout rate: a real number in [0, 1)."""
    p = _check_real(name, value)
    if not 0.0 <= p < 1.0:  # also refuses NaN
        raise ValueError(f"{name}: expected a value in [0, 1), got {value}")
    return p


def check_positive_float(name: str, value: object) -> float:
    """A real number > 0 (and finite), e.g. ``layer_norm_eps``."""
    return check_float(name, value, 0.0, above=True)


def check_divides(name: str, value: int, divisor_name: str, divisor: int) -> None:
    """``value`` is a multiple of ``divisor`` (both already checked ints)."""
    if value % divisor != 0:
        raise ValueError(f"{name}: expected a multiple of {divisor_name}={divisor}, got {value}")


def check_activation(activation: object) -> Callable[[Tensor], Tensor]:
    """'relu', 'gelu' or a callable; returns the callable."""
    import torch.nn.functional as F

    if callable(activation):
        return activation
    if activation == "relu":
        return F.relu
    if activation == "gelu":
        return F.gelu
    raise ValueError(f"activation: expected 'relu', 'gelu' or a callable, got {activation!r}")


def check_input_dtype(name: str, x: Tensor, expected: torch.dtype) -> None:
    """``x`` has the dtype of the module's parameters (``expected``), unless autocast is on for its
    device (autocast casts per op, so mixed dtypes are its normal state).

    Without this torch fails inside a matmul with "mat1 and mat2 must have the same dtype".
    """
    import torch

    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype != expected and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(
            f"{name}: expected dtype {expected} (the dtype of the module's parameters), got {x.dtype}; "
            f"convert the input ({name}.to({expected})) or the module (module.to({x.dtype}))"
        )
