"""Dropout (Srivastava et al., 2014) with a mask that is cheap to draw on CPU.

Dropout zeroes each element with probability p and scales the kept ones by 1/(1 - p), so the
expected output is the input. On CPU, :func:`torch.nn.functional.dropout` draws one Bernoulli
number per element; at the sizes of small attention models that costs several times the matmul it
guards (B·H·L·S = 300k probabilities: ~2.4 ms against ~0.4 ms for P @ V, see benchmarks/RESULTS.md).
Here the mask comes from packed random bits instead: one 64-bit draw of torch's generator gives
four 16-bit numbers r, and an element is kept when r >= t, with t set so that the drop rate is

    p' = round(p · 2^16) / 2^16        (|p' - p| <= 2^-17 ≈ 7.6e-6).

The kept elements are scaled by 1/(1 - p'), so E[output] = input exactly; the mask is built with
integer and float arithmetic only (bool tensors are slow on this path). The result is still dropout:
independent per element, same rate to 7.6e-6, identity in eval mode, reproducible for a seed
(``torch.manual_seed`` or a ``generator``), gradient = mask · grad.

Where the packed mask does not pay or cannot hold the rate, :func:`dropout` is torch's own:
on GPUs (``F.dropout`` is one fused kernel there), for rates within 2^-8 of 0 or 1, and while
``torch.compile`` records a graph (it cannot record the full-range ``random_`` of the packed draw,
and would break the graph at every dropout; its own dropout is fused into the graph instead).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .masks import tracing

__all__ = ["dropout", "dropout_mask", "packed_rate", "Dropout"]

_LEVELS = 1 << 16  # 16 random bits per element
_MIN_RATE = 2**-8  # below this (or within it of 1) the 2^-17 rounding of p would be > 0.2% of p
_MIN_NUMEL = 4096  # smaller tensors: torch's one-op Bernoulli mask is cheaper (benchmarks/nn_primitives.py)


def packed_rate(p: float) -> float:
    """The drop rate the packed mask actually uses for a requested rate ``p`` (p rounded to a
    multiple of 2^-16)."""
    return round(p * _LEVELS) / _LEVELS


def _packs(p: float, numel: int, device: torch.device) -> bool:
    """Whether the packed mask is used: on the CPU, for a rate it can hold, and for tensors big
    enough that its few extra ops (~7 against 1) cost less than the Bernoulli draws they save."""
    return device.type == "cpu" and numel >= _MIN_NUMEL and _MIN_RATE <= p <= 1.0 - _MIN_RATE and not tracing()


def dropout_mask(
    shape: tuple[int, ...] | torch.Size,
    p: float,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The multiplicative dropout mask of ``shape``: 0 where an element is dropped, 1/(1 - p')
    where it is kept (p' = :func:`packed_rate` (p) on the packed path, else p).

    ``input * dropout_mask(input.shape, p, dtype=input.dtype, device=input.device)`` is
    :func:`dropout` (training mode). Exposed so that tests (and callers that reuse one mask) can
    check the output against ``input * mask``.
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    numel = math.prod(shape)
    if p == 1.0:
        return torch.zeros(shape, dtype=dtype, device=device)
    if not _packs(p, numel, device):
        keep = torch.empty(shape, dtype=dtype, device=device).bernoulli_(1.0 - p, generator=generator)
        return keep.div_(1.0 - p)
    rate = packed_rate(p)
    # r >= t keeps: r is uniform on [-2^15, 2^15), so P(keep) = (2^15 - t) / 2^16 = 1 - rate.
    t = round(rate * _LEVELS) - _LEVELS // 2
    words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device)
    r = words.random_(-(2**63), None, generator=generator).view(torch.int16)  # 4 × 16 random bits a word
    r = (r if r.numel() == numel else r[:numel]).view(shape)
    keep = r.clamp_(t - 1, t).sub_(t - 1)  # 0 below t, 1 from t on: integer ops, no bool tensor
    return keep.to(dtype).mul_(1.0 / (1.0 - rate))


def dropout(input: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False, *, generator=None) -> Tensor:
    """:func:`torch.nn.functional.dropout` with the packed CPU mask (see the module docstring).

    Shapes: any; the output has the input's shape and dtype. ``p`` in [0, 1].
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p: expected a dropout probability in [0, 1], got {p}")
    if not training or p == 0.0:
        return input
    if p == 1.0:
        return input.mul_(0.0) if inplace else input * 0.0
    if generator is None and not _packs(p, input.numel(), input.device):
        return F.dropout(input, p, True, inplace)
    mask = dropout_mask(input.shape, p, dtype=input.dtype, device=input.device, generator=generator)
    return input.mul_(mask) if inplace else input * mask


class Dropout(nn.Dropout):
    """:class:`torch.nn.Dropout` (same arguments, attributes and ``repr``) computed with
    :func:`dropout`. Shapes: input ``(...)`` of any shape, output the same shape."""

    def forward(self, input: Tensor) -> Tensor:
        return dropout(input, self.p, self.training, self.inplace)
