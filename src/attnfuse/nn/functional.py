"""Scaled dot-product attention, softmax(QKᵀ/√d_k)V (Vaswani et al., 2017, eq. 1), with masks that
never produce NaN and non-finite inputs that reach only the outputs that depend on them.

Two paths compute the same function:

* the **fused** path hands the work to :func:`torch.nn.functional.scaled_dot_product_attention`,
  which picks a fused kernel (flash / memory-efficient) and never materialises the (L, S) score
  matrix;
* the **explicit** path computes the scores, because the caller wants to see them
  (``need_weights=True``), or because dropout is on and the inputs are on the CPU: there SDPA has
  no fused kernel with dropout and falls back to its own explicit "math" path, which draws its
  dropout mask with :func:`torch.nn.functional.dropout`; the explicit path here does the same work
  with the cheaper mask of :mod:`.dropout` (measured in benchmarks/RESULTS.md), computed by the
  kernel that :mod:`.kernels` timed fastest on this machine for the shape.

Mask conventions are :class:`torch.nn.MultiheadAttention`'s (see :mod:`.masks`). A query row whose
keys are all masked gets output 0 and weights 0, with finite gradients, on both paths.

Non-finite inputs (the "guard"): a NaN or ±inf in a key or value that a mask hides from a query
must not reach that query, yet ``0 · NaN = NaN`` makes it reach every query (the weight of a
hidden key is 0, its value is still multiplied). The guarded entry points
(:func:`scaled_dot_product_attention`, :class:`~attnfuse.nn.MultiheadAttention`) therefore compute
attention on inputs whose non-finite entries are replaced by 0, then make NaN exactly the output
rows that do depend on a non-finite value: a non-finite query row, or a non-finite key or value
row that the query sees. Every other output, and every gradient, stays finite. On the CPU one sum
over each input tells whether any of this is needed (almost never); on other devices the guard
always runs, as a few cheap elementwise ops, to avoid a host sync per call.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..checks import check_probability
from . import kernels
from .dropout import dropout
from .explicit import explicit_attention
from .masks import KeyPaddingMask, merge_masks, tracing, visible_keys

__all__ = [
    "scaled_dot_product_attention",
    "attend",
    "merge_masks",
    "KeyPaddingMask",
    "dropout",
    "resolve_masks",
    "Masks",
    "needs_guard",
    "poison_rows",
    "clean_padding",
]


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    key_padding_mask: Tensor | KeyPaddingMask | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
    need_weights: bool = False,
    *,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor | None]:
    """softmax(Q Kᵀ · scale + mask) V.

    Shapes:
        query: ``(..., L, E)``; key: ``(..., S, E)``; value: ``(..., S, Ev)`` with the same leading
        (batch) dims ``...``, e.g. ``(N, H)``.
        attn_mask: ``(L, S)`` or ``(..., L, S)`` (a leading dim may be 1); bool True = blocked,
        float = added to the scores (finite or -inf).
        key_padding_mask: ``(N, S)`` (N = first leading dim) or ``(..., S)``; True = padding; or a
        :class:`KeyPaddingMask` built once for several calls.
        is_causal: query i attends to keys ``j <= i`` (combined with any mask given).
        scale: defaults to ``1/sqrt(E)``.
        generator: random numbers for dropout (default: torch's global generator).

    Returns:
        ``(output, weights)``: output ``(..., L, Ev)``; weights ``(..., L, S)`` when
        ``need_weights`` else None. Weights are the softmax probabilities before dropout. A query
        row with every key masked gets output 0 and weights 0. Output rows that depend on a
        non-finite input row are NaN; no other output is (see the module docstring).
    """
    _check_qkv(query, key, value)
    check_probability("dropout_p", dropout_p)
    batch = _shape(query)[:-2]
    masks = resolve_masks(attn_mask, key_padding_mask, is_causal, batch, query.shape[-2], key.shape[-2], query)
    if not needs_guard(query, key, value):
        out, weights = attend(query, key, value, masks, dropout_p, scale, need_weights, generator=generator)
        return out, weights
    clean = [t.nan_to_num(0.0, 0.0, 0.0) for t in (query, key, value)]
    out, weights = attend(*clean, masks, dropout_p, scale, need_weights, generator=generator)
    poison_w, poison_out = poison_rows(masks, query, key, value)  # (..., L): 0 or NaN
    out = out + poison_out.unsqueeze(-1)
    weights = None if weights is None else weights + poison_w.unsqueeze(-1)
    return out, weights


class Masks(NamedTuple):
    """The masks of one attention call, merged (see :func:`resolve_masks`).

    mask: None, bool (True = may attend) or float to add; broadcasts to ``batch + (L, S)``.
    dead: None or bool broadcastable to ``batch + (L,)``: rows with no visible key (output 0).
    causal: True when ``is_causal`` was the only masking asked for: no mask tensor is built and
        the fused kernel applies it.
    """

    mask: Tensor | None
    dead: Tensor | None
    causal: bool = False


def resolve_masks(
    attn_mask: Tensor | None,
    key_padding_mask: Tensor | KeyPaddingMask | None,
    is_causal: bool,
    batch: tuple[int, ...],
    tgt_len: int,
    src_len: int,
    like: Tensor,
) -> Masks:
    """Check and merge the masks of one call on inputs with leading dims ``batch`` (dtype and
    device of ``like``, the query). A :class:`KeyPaddingMask` alone costs two views."""
    if isinstance(key_padding_mask, KeyPaddingMask):
        if attn_mask is None and not is_causal:
            return Masks(*key_padding_mask.broadcast(batch, src_len, like.dtype))
        key_padding_mask = key_padding_mask.key_padding_mask
    if attn_mask is None and key_padding_mask is None:
        return Masks(None, None, is_causal)
    if (
        attn_mask is None
        and not is_causal
        and like.device.type == "cpu"
        and isinstance(key_padding_mask, Tensor)
        and len(batch) >= 1
        and _shape(key_padding_mask) == (batch[0], src_len)
    ):
        # Padding alone, as (N, S): one path with the prepared mask, so nothing padded means no
        # mask at all (reading the mask's values is free on the CPU; elsewhere it would be a sync).
        return Masks(*KeyPaddingMask(key_padding_mask).broadcast(batch, src_len, like.dtype))
    return Masks(*merge_masks(attn_mask, key_padding_mask, is_causal, batch, tgt_len, src_len, like.dtype, like.device))


def attend(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    masks: Masks,
    dropout_p: float,
    scale: float | None,
    need_weights: bool,
    *,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor | None]:
    """:func:`scaled_dot_product_attention` for callers that checked q, k, v and merged the masks
    (:func:`resolve_masks`) already, and guard non-finite inputs themselves. Shapes as there.

    Path rule: explicit scores when weights are asked for, or when dropout is on and the inputs
    are on the CPU (see the module docstring); the fused kernel otherwise. Without weights the
    explicit scores are computed by the kernel :func:`~attnfuse.nn.kernels.choose` picks for the
    problem's shapes on this machine: :func:`~attnfuse.nn.explicit.explicit_attention` (its own
    backward) or plain ops under autograd (:func:`_plain`).
    """
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    if not (need_weights or (dropout_p > 0.0 and query.device.type == "cpu")):
        return _fused(query, key, value, masks, dropout_p, scale), None
    mask, dead = _additive_mask(masks, query, key.shape[-2]), masks.dead
    if not need_weights and (mask is None or not mask.requires_grad) and query.numel() and key.numel():

        def explicit(q: Tensor, k: Tensor, v: Tensor, g: torch.Generator | None) -> Tensor:
            return explicit_attention(q, k, v, mask, dead, scale, dropout_p, g)

        def plain(q: Tensor, k: Tensor, v: Tensor, g: torch.Generator | None) -> Tensor:
            return _plain(q, k, v, mask, dead, scale, dropout_p, False, g)[0]

        grad = _records_grad(query, key, value)
        kernel = kernels.choose(query, key, value, mask, grad, {"explicit": explicit, "autograd": plain})
        return (explicit if kernel == "explicit" else plain)(query, key, value, generator), None
    return _plain(query, key, value, mask, dead, scale, dropout_p, need_weights, generator)


def _fused(query: Tensor, key: Tensor, value: Tensor, masks: Masks, dropout_p: float, scale: float) -> Tensor:
    """torch's SDPA (a fused kernel where one applies), dead rows zeroed. Shapes as attend's."""
    # No row is dead under a causal mask alone: query i always sees key 0.
    mask, dead = masks.mask, masks.dead
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout_p, is_causal=masks.causal, scale=scale
    )
    if dead is not None and _records_grad(query, key, value, mask):
        out = out.masked_fill(dead.unsqueeze(-1), 0.0)  # out of place: SDPA saves `out` for backward
    elif dead is not None:
        out.masked_fill_(dead.unsqueeze(-1), 0.0)  # no autograd: no copy of the output
    return out


def _additive_mask(masks: Masks, query: Tensor, src_len: int) -> Tensor | None:
    """The merged mask as scores to add (0 or -inf for a bool mask; a causal mask built), or None."""
    mask = masks.mask
    if masks.causal:
        mask = _causal_allowed(query.shape[-2], src_len, query.device)
    if mask is not None and mask.dtype == torch.bool:
        # Added, not masked_fill'ed: on the CPU a broadcast masked_fill of the (..., L, S) scores
        # costs ~20x an add (4.3 ms vs 0.2 ms forward + backward at B·H·L·S = 300k).
        mask = torch.zeros(mask.shape, dtype=query.dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    return mask


def _plain(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: Tensor | None,
    dead: Tensor | None,
    scale: float,
    dropout_p: float,
    need_weights: bool,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor | None]:
    """Explicit attention as plain ops (autograd differentiates them): ``(output, weights or None)``.
    ``mask`` is None or float scores to add, broadcastable to ``(..., L, S)``."""
    batch, tgt_len, src_len = _shape(query)[:-2], query.shape[-2], key.shape[-2]
    # One batched GEMM on (batch, L, E) x (batch, E, S) with the scale folded in (alpha): the
    # reshapes are views for MultiheadAttention's heads on the CPU dropout path (transposed
    # projections, whose batch dims merge) and the only copies of q and k otherwise (heads split
    # from a packed projection are strided views), where `matmul(query * scale, key.mT)` made
    # three (q*scale, q, k).
    n = math.prod(batch)  # not -1: that is ambiguous for empty sequences
    q3, k3 = query.reshape(n, tgt_len, query.shape[-1]), key.reshape(n, src_len, key.shape[-1])
    scores = torch.baddbmm(q3.new_zeros(()), q3, k3.transpose(1, 2), beta=0.0, alpha=scale)
    scores = scores.view(batch + (tgt_len, src_len))  # (..., L, S)
    if _records_grad(query, key, value, mask):
        if mask is not None:
            scores = scores + mask
        weights = torch.softmax(scores, dim=-1)  # autograd keeps this output for backward
        if dead is not None:
            weights = weights.masked_fill(dead.unsqueeze(-1), 0.0)
    else:
        # No autograd: mask and softmax in place in `scores`, our own fresh tensor. A fresh large
        # tensor is costly on CPU (every page is faulted in); this saves up to two (..., L, S)
        # tensors, as torch's inference fast path does.
        if mask is not None:
            scores.add_(mask)
        weights = torch.softmax(scores, dim=-1, out=scores)
        if dead is not None:
            weights.masked_fill_(dead.unsqueeze(-1), 0.0)
    attn = dropout(weights, dropout_p, generator=generator) if dropout_p > 0.0 else weights
    return torch.matmul(attn, value), (weights if need_weights else None)


# --------------------------------------------------------------------------- the guard


def needs_guard(*inputs: Tensor) -> bool:
    """Whether any input may hold a NaN or ±inf. On the CPU one sum per input decides (a NaN or inf
    survives a sum; a finite overflow only costs a needless guard); elsewhere always True, since
    reading the answer would be a host sync."""
    if tracing():
        # A recorded graph cannot branch on values: it takes the plain path, which is exact for
        # finite inputs (attnfuse.export zeroes the padded positions before the model sees them).
        return False
    for i, x in enumerate(inputs):
        if any(x is y for y in inputs[:i]):
            continue  # self-attention: query is key is value, one check
        if x.device.type != "cpu":
            return True
        half = x.dtype in (torch.float16, torch.bfloat16)
        # detach(), not no_grad(): half the Python overhead, which is most of the cost at small sizes.
        if not math.isfinite(x.detach().sum(dtype=torch.float32 if half else None).item()):
            return True
    return False


def poison_rows(masks: Masks, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
    """``(poison_weights, poison_out)``, each broadcastable to ``batch + (L,)``: NaN for query rows
    whose weights (resp. output) depend on a non-finite input row, 0 elsewhere.

    Weights depend on the query row and on the keys it sees; outputs also on the values it sees.
    A dead row (no visible key) depends on nothing: its output is 0. Inputs have leading dims
    broadcastable to ``batch`` (heads may be 1). Computed without autograd (add the result to the
    output: a constant)."""
    with torch.no_grad():
        nan_q = _row_nan(query)  # (..., L): 0, or NaN for a row with a non-finite entry
        if masks.dead is not None:
            nan_q = torch.where(masks.dead, 0.0, nan_q)
        nan_k = _row_nan(key)  # (..., S)
        nan_kv = nan_k if value is key else nan_k + _row_nan(value)
        visible = visible_keys(masks.mask, masks.dead)
        if masks.causal:
            visible = _causal_allowed(query.shape[-2], key.shape[-2], query.device)
        return nan_q + _reach(visible, nan_k), nan_q + _reach(visible, nan_kv)


def clean_padding(x: Tensor, padding: Tensor | KeyPaddingMask | None, batch_first: bool) -> Tensor:
    """``x`` with NaN and ±inf replaced by 0 at its padded positions; ``x`` itself when it is
    finite (one sum on the CPU) or nothing is padded.

    Blocks whose input is also their padded key sequence (self-attention, both directions of
    cross-attention) call this first: a padded position is not data, but its row still flows
    through the residual, the LayerNorms and the feed-forward net, and their weight gradients
    would pick up 0 · NaN from it. Finite inputs are returned unchanged (torch parity).

    Shapes: x ``(N, S, E)`` with ``batch_first``, ``(S, N, E)`` without, or ``(S, E)`` unbatched;
    padding ``(N, S)`` (``(S,)`` unbatched), True or -inf = padded. Other shapes are left for the
    layer to report.
    """
    if padding is None or (isinstance(padding, KeyPaddingMask) and padding.allowed is None) or not needs_guard(x):
        return x  # nothing padded (a prepared mask knows without a look at x), or x is finite
    kpm = padding.key_padding_mask if isinstance(padding, KeyPaddingMask) else padding
    if not isinstance(kpm, Tensor):
        return x
    padded = kpm if kpm.dtype == torch.bool else torch.isneginf(kpm)
    if x.dim() == 3 and not batch_first:
        padded = padded.transpose(0, 1)  # (S, N)
    if _shape(padded) != _shape(x)[:-1]:
        return x
    return torch.where(padded.unsqueeze(-1), x.nan_to_num(0.0, 0.0, 0.0), x)


def _row_nan(x: Tensor) -> Tensor:
    # x * 0 is 0 for a finite entry and NaN for NaN or ±inf (no overflow, unlike a plain row sum).
    return (x * 0.0).sum(dim=-1)


def _reach(visible: Tensor | None, nan_keys: Tensor) -> Tensor:
    """(..., L): the NaN of every key a query sees, summed (0 when it sees none)."""
    if visible is None:
        return nan_keys.sum(dim=-1, keepdim=True)  # every query sees every key
    return torch.where(visible, nan_keys.unsqueeze(-2), 0.0).sum(dim=-1)


# --------------------------------------------------------------------------- helpers


def _causal_allowed(tgt_len: int, src_len: int, device: torch.device) -> Tensor:
    """(L, S) bool, True where query i may see key j <= i (top-left aligned, as torch)."""
    return torch.ones(tgt_len, src_len, dtype=torch.bool, device=device).tril_()


def _records_grad(*tensors: Tensor | None) -> bool:
    """True if autograd records ops on any of these tensors (None is skipped)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _check_qkv(query: Tensor, key: Tensor, value: Tensor) -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
        if t.dim() < 2:
            raise ValueError(f"{name}: expected rank >= 2 (..., seq, features), got shape {_shape(t)}")
    if not (query.dim() == key.dim() == value.dim()):
        raise ValueError(
            f"query, key, value: expected the same rank, got {_shape(query)}, {_shape(key)}, {_shape(value)}"
        )
    if query.shape[:-2] != key.shape[:-2] or key.shape[:-2] != value.shape[:-2]:
        raise ValueError(
            f"query, key, value: expected the same leading (batch) dims, got shapes "
            f"{_shape(query)}, {_shape(key)}, {_shape(value)}"
        )
    if key.shape[-1] != query.shape[-1]:
        raise ValueError(
            f"key: expected feature size {query.shape[-1]} (as query {_shape(query)}), got {key.shape[-1]} "
            f"(shape {_shape(key)})"
        )
    if value.shape[-2] != key.shape[-2]:
        raise ValueError(
            f"value: expected sequence length {key.shape[-2]} (as key {_shape(key)}), got {value.shape[-2]} "
            f"(shape {_shape(value)})"
        )
    if not (query.dtype == key.dtype == value.dtype):
        raise ValueError(f"query, key, value: expected one dtype, got {query.dtype}, {key.dtype}, {value.dtype}")
