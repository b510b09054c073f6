"""Which attention kernel computes attention with dropout on the CPU: chosen by measurement.

Two kernels compute the same function (softmax(QKᵀ·scale + mask) with dropout, times V), draw the
same dropout mask from the same random numbers, and agree to float32 rounding:

* ``"explicit"``: :func:`~attnfuse.nn.explicit.explicit_attention`, one autograd function whose
  products are computed transposed (wide outputs for narrow heads) and whose backward keeps two
  (L, S) tensors;
* ``"autograd"``: the same function as plain ops, differentiated by autograd.

Which one is faster depends on the machine, not on the model: at MulT's sizes (q, k, v
``(24, 5, 50, 6)``) the explicit kernel took 0.88x the time of plain ops, forward and backward,
on an AMD EPYC, and 1.69x on an Intel Xeon (benchmarks/RESULTS.md, "Fusion model speed"; the
CPUs' GEMM libraries take other code paths for its transposed products). So neither is a default that holds everywhere; like cuDNN's
benchmark mode, the first call of a shape times both kernels on random inputs of that shape and
every later call of the shape in this process runs the winner (:func:`choose`). The choice is
keyed by the sizes of one attention problem (L, S, E, Ev, dtype, mask, gradient), not by the batch:
the kernels' ratio hardly depends on it, and a model's first training step then decides for the
whole run, its last, smaller batch included.

Deterministic fallback: where timing cannot tell (a winner must be faster in all but one of
:data:`ROUNDS` interleaved rounds and by :data:`MARGIN` in the median), where a problem is too
small for the kernels to differ measurably (:data:`MIN_WORK`), and off the CPU, the kernel is
:data:`FALLBACK`. While ``torch.compile`` records a graph it is ``"autograd"``: the compiler
differentiates and fuses plain ops itself, where the explicit function would be an opaque call.

The two kernels round differently (a last bit here and there), so the choice is part of a run's
state: :func:`choices` lists what this process chose, :func:`restore` makes it choose the same again
(``attnfuse.training.Trainer`` keeps it in its checkpoints, so a resumed run is bitwise the run
that never stopped). A new process times again: where the two kernels are within the margin of
each other, two fresh runs of one seed may choose differently and differ in the last bits (as
they do between thread counts); :func:`forced` runs one kernel regardless (tests, benchmarks).

Pinning the choice: the environment variable ``ATTNFUSE_ATTENTION_KERNEL`` (:data:`ENV`) set to
``explicit`` or ``autograd`` runs that kernel for every problem, untimed, on every device (but
plain ops while ``torch.compile`` records a graph, as above); unset, empty or ``measure`` keeps
the timing. It is read when a problem is first met in a process (and again after :func:`restore`
or :func:`clear`), not at every call: set it before the first attention call of a process (set
later, it pins only the problems met after). It wins over restored choices
(a resumed run follows the variable it is given), and what it picks is recorded in
:func:`choices` like a timed choice. So two fresh runs of one seed with the variable set compute
the same bits whatever their machines' load; an unknown value is a ``ValueError`` naming it.

Timing draws its inputs and dropout masks from its own generator: it consumes none of the random
numbers of the computation it is part of.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from .masks import tracing

__all__ = ["KERNELS", "FALLBACK", "ENV", "choose", "choices", "restore", "clear", "forced", "pinned", "problem_key"]

KERNELS = ("explicit", "autograd")
FALLBACK = "explicit"  # the kernel of small problems, undecided timings and other devices
MIN_WORK = 1 << 17  # batch·L·S score elements below which the fallback runs untimed (MulT: 120·50·50)
ROUNDS = 5  # interleaved timed rounds per candidate (after one untimed call of each)
MARGIN = 1.05  # the winner's median time ratio must be at least this
ENV = "ATTNFUSE_ATTENTION_KERNEL"  # explicit | autograd pin the kernel; measure (or unset) times it

_chosen: dict[str, str] = {}  # problem key -> kernel, this process
_seen: dict[tuple, str] = {}  # the exact shapes of calls -> kernel (a cache of _chosen)
_forced: list[str] = []  # a stack: forced() may nest


def problem_key(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, grad: bool) -> str:
    """The key of an attention problem: its sizes without the batch, e.g. ``"50x50x6x6 float32
    mask:none grad"`` (mask: none, or the shape it broadcasts from, batch dims as 1 or n)."""
    L, E, S, Ev = query.shape[-2], query.shape[-1], key.shape[-2], value.shape[-1]
    if mask is None:
        m = "none"
    else:
        lead = ("n" if d > 1 else "1" for d in mask.shape[:-2])
        m = "x".join([*lead, "L" if mask.shape[-2] > 1 else "1", "S" if mask.shape[-1] > 1 else "1"])
    dtype = str(query.dtype).removeprefix("torch.")
    return f"{L}x{S}x{E}x{Ev} {dtype} mask:{m} {'grad' if grad else 'nograd'}"


def choose(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: Tensor | None,
    grad: bool,
    candidates: dict[str, Callable[[Tensor, Tensor, Tensor, torch.Generator], Tensor]],
) -> str:
    """The kernel for this problem: forced, pinned by :data:`ENV`, recorded, or timed now (once per
    key and process).

    ``candidates`` maps each of :data:`KERNELS` to ``f(q, k, v, generator) -> out`` (the caller
    binds mask, scale and dropout rate); they are called on random inputs of the problem's shapes
    only when this key is met for the first time and timing applies."""
    if _forced:
        return _forced[-1]
    if tracing():
        return "autograd"  # a graph recorder differentiates and fuses plain ops itself; not recorded
    shapes = (query.shape[-2:], key.shape[-2], value.shape[-1], query.dtype, None if mask is None else mask.shape, grad)
    kernel = _seen.get(shapes) if query.is_cpu else None  # every call asks: a tuple lookup, no more
    if kernel is not None:
        return kernel
    pin = pinned()  # read for a problem met for the first time (and after restore or clear)
    if pin is None and not query.is_cpu:
        return FALLBACK
    name = problem_key(query, key, value, mask, grad)
    kernel = _chosen.get(name) if pin is None else pin
    if kernel is None:
        work = query[..., 0].numel() * key.shape[-2]  # batch·L·S
        kernel = FALLBACK if work < MIN_WORK else _measure(query, key, value, grad, candidates)
    _chosen[name] = _seen[shapes] = kernel
    return kernel


def pinned() -> str | None:
    """The kernel :data:`ENV` pins (``"explicit"`` or ``"autograd"``), or None: unset, empty or
    ``measure`` (case and surrounding spaces ignored)."""
    raw = os.environ.get(ENV)
    value = "" if raw is None else raw.strip().lower()
    if value in ("", "measure"):
        return None
    if value not in KERNELS:
        raise ValueError(f"{ENV}: expected one of explicit, autograd, measure, got {raw!r}")
    return value


def choices() -> dict[str, str]:
    """What this process chose so far, ``{problem key: kernel}`` (a copy, JSON-ready)."""
    return dict(_chosen)


def restore(recorded: object) -> None:
    """Choose as ``recorded`` (from :func:`choices`, e.g. read back from a checkpoint) for its keys
    from now on; other keys are still timed at first use. Checked whole before anything changes."""
    if not isinstance(recorded, dict):
        raise ValueError(f"kernels: expected a mapping of problem keys to kernels, got {type(recorded).__name__}")
    for k, v in recorded.items():
        if not isinstance(k, str) or v not in KERNELS:
            raise ValueError(f"kernels: expected kernels among {KERNELS} for problem keys, got {k!r}: {v!r}")
    _chosen.update(recorded)
    _seen.clear()


def clear() -> None:
    """Forget every choice (tests: the next call of each key is timed again)."""
    _chosen.clear()
    _seen.clear()


@contextlib.contextmanager
def forced(kernel: str) -> Iterator[None]:
    """Run ``kernel`` for every problem inside the block (no timing, nothing recorded)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel: expected one of {KERNELS}, got {kernel!r}")
    _forced.append(kernel)
    try:
        yield
    finally:
        _forced.pop()


def _seconds(kernel: Callable, inputs: list[Tensor], g: torch.Generator, grad: bool) -> float:
    """Seconds of one call of ``kernel`` on ``inputs`` (and its backward when ``grad``)."""
    t0 = time.perf_counter()
    out = kernel(*inputs, g)
    if grad:
        out.backward(torch.ones_like(out))
    return time.perf_counter() - t0


def _measure(query: Tensor, key: Tensor, value: Tensor, grad: bool, candidates: dict) -> str:
    """Time each candidate, forward (+ backward when ``grad``), on random inputs of the problem's
    shapes: one untimed call each, then :data:`ROUNDS` rounds with alternating order. The winner
    must win all rounds but one and by :data:`MARGIN` in the median ratio; else :data:`FALLBACK`."""
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(t.shape, generator=g, dtype=t.dtype).requires_grad_(grad) for t in (query, key, value)]
    seconds: dict[str, list[float]] = {k: [] for k in KERNELS}
    with torch.enable_grad() if grad else torch.no_grad():
        for r in range(1 + ROUNDS):
            for name in KERNELS if r % 2 else KERNELS[::-1]:
                t = _seconds(candidates[name], inputs, g, grad)
                if r:  # round 0 warms up
                    seconds[name].append(t)
    ratios = [a / e for e, a in zip(seconds["explicit"], seconds["autograd"])]  # > 1: explicit is faster
    median = statistics.median(ratios)
    if median >= MARGIN and sum(x > 1.0 for x in ratios) >= ROUNDS - 1:
        return "explicit"
    if 1.0 / median >= MARGIN and sum(x < 1.0 for x in ratios) >= ROUNDS - 1:
        return "autograd"
    return FALLBACK
