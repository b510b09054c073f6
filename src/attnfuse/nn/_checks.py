"""Argument checks shared by every ``attnfuse.nn`` constructor and forward: one place, one wording.

Each check raises ``TypeError`` (wrong kind of value) or ``ValueError`` (right kind, bad value) with a
message that names the argument, what was expected and what was given, e.g.
``embed_dim: expected an int, got float 8.0``. torch itself fails later and elsewhere
(``MultiheadAttention(8.0, 2)`` inside ``torch.empty``; ``kdim=0`` not at all).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "check_int",
    "check_optional_int",
    "check_bool",
    "check_probability",
    "check_positive_float",
    "check_divides",
    "check_activation",
    "check_input_dtype",
]


def _given(value: object) -> str:
    return f"{type(value).__name__} {value!r}"


def check_int(name: str, value: object, minimum: int = 1) -> int:
    """An int (not a bool, not a float such as 8.0) that is at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {_given(value)}")
    if value < minimum:
        bound = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{name}: expected {bound}, got {value}")
    return int(value)


def check_optional_int(name: str, value: object, minimum: int = 1) -> int | None:
    """None, or an int as :func:`check_int`."""
    return None if value is None else check_int(name, value, minimum)


def check_bool(name: str, value: object) -> bool:
    """A bool (an int such as 1 is refused: it is more likely a misplaced size)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {_given(value)}")
    return value


def _check_real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a float, got {_given(value)}")
    return float(value)


def check_probability(name: str, value: object) -> float:
    """A dropout rate: a real number in [0, 1)."""
    p = _check_real(name, value)
    if not 0.0 <= p < 1.0:  # also refuses NaN
        raise ValueError(f"{name}: expected a value in [0, 1), got {value}")
    return p


def check_positive_float(name: str, value: object) -> float:
    """A real number > 0 (and finite), e.g. ``layer_norm_eps``."""
    x = _check_real(name, value)
    if not 0.0 < x < float("inf"):
        raise ValueError(f"{name}: expected a finite value > 0, got {value}")
    return x


def check_divides(name: str, value: int, divisor_name: str, divisor: int) -> None:
    """``value`` is a multiple of ``divisor`` (both already checked ints)."""
    if value % divisor != 0:
        raise ValueError(f"{name}: expected a multiple of {divisor_name}={divisor}, got {value}")


def check_activation(activation: object) -> Callable[[Tensor], Tensor]:
    """'relu', 'gelu' or a callable; returns the callable."""
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
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype != expected and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(
            f"{name}: expected dtype {expected} (the dtype of the module's parameters), got {x.dtype}; "
            f"convert the input ({name}.to({expected})) or the module (module.to({x.dtype}))"
        )
