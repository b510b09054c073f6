"""Scaled dot-product attention, softmax(QKᵀ/√d_k)V, with masks that never produce NaN.

Two paths compute the same function:

* ``need_weights=False`` hands the work to :func:`torch.nn.functional.scaled_dot_product_attention`,
  which picks a fused kernel (flash / memory-efficient on CPU and GPU) and never materialises the
  (L, S) score matrix;
* ``need_weights=True`` computes the scores explicitly, because the caller wants to see them.

Mask conventions follow :class:`torch.nn.MultiheadAttention`: a **bool** mask is True where
attention is NOT allowed, a **float** mask is added to the scores. A query row whose keys are all
masked has nothing to attend to; softmax over an empty set is undefined (torch returns NaN on several
of its paths). Here such a row gets output 0 and weights 0, with finite gradients, on both paths.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["scaled_dot_product_attention", "attend", "merge_masks"]


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _check_mask_dtype(mask: Tensor, name: str) -> None:
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise ValueError(f"{name}: expected a bool or floating-point tensor, got dtype {mask.dtype}")


def _expand_key_padding_mask(key_padding_mask: Tensor, batch: tuple[int, ...], src_len: int) -> Tensor:
    """(N, S) or batch + (S,) -> a view of rank len(batch) + 2 that broadcasts over heads and queries."""
    kpm = key_padding_mask
    _check_mask_dtype(kpm, "key_padding_mask")
    if _shape(kpm) == batch + (src_len,):
        return kpm.unsqueeze(-2)  # (..., 1, S)
    if len(batch) >= 1 and _shape(kpm) == (batch[0], src_len):
        # (N, S) -> (N, 1, ..., 1, S): the same padding for every head and every query.
        return kpm.view((batch[0],) + (1,) * (len(batch) - 1) + (1, src_len))
    expected = f"{batch + (src_len,)}" if len(batch) <= 1 else f"{(batch[0], src_len)} or {batch + (src_len,)}"
    raise ValueError(f"key_padding_mask: expected shape {expected}, got {_shape(kpm)}")


def _check_attn_mask(attn_mask: Tensor, batch: tuple[int, ...], tgt_len: int, src_len: int) -> Tensor:
    """(L, S), or batch + (L, S) where each batch dim may be 1 (broadcast on purpose)."""
    _check_mask_dtype(attn_mask, "attn_mask")
    shape = _shape(attn_mask)
    if shape == (tgt_len, src_len):
        return attn_mask
    ok = (
        len(shape) == len(batch) + 2
        and shape[-2:] == (tgt_len, src_len)
        and all(m in (1, b) for m, b in zip(shape[:-2], batch))
    )
    if not ok:
        raise ValueError(
            f"attn_mask: expected shape {(tgt_len, src_len)} or {batch + (tgt_len, src_len)} "
            f"(batch dims may be 1), got {shape}"
        )
    return attn_mask


def merge_masks(
    attn_mask: Tensor | None,
    key_padding_mask: Tensor | None,
    is_causal: bool,
    batch: tuple[int, ...],
    tgt_len: int,
    src_len: int,
    dtype: torch.dtype,
    device: torch.device | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """Combine the three ways of masking into one mask in SDPA's convention.

    Returns ``(mask, dead)``:

    * ``mask`` is None (nothing masked), a bool tensor that is True where attention IS allowed
      (the convention of ``F.scaled_dot_product_attention``), or a float tensor to add to the
      scores. It broadcasts to ``batch + (L, S)``.
    * ``dead`` is None or a bool tensor, broadcastable to ``batch + (L,)``, True for query rows with
      no allowed key. Those rows are un-masked in ``mask`` (so softmax stays finite) and must be
      zeroed by the caller afterwards.
    """
    masks: list[Tensor] = []
    if attn_mask is not None:
        masks.append(_check_attn_mask(attn_mask, batch, tgt_len, src_len))
    if key_padding_mask is not None:
        masks.append(_expand_key_padding_mask(key_padding_mask, batch, src_len))
    if is_causal:
        # Top-left aligned, as torch: query i sees keys 0..i. Never replaces a mask that was given.
        # On the inputs' device (``device``) when no mask was given: a CPU mask breaks CUDA inputs.
        device = masks[0].device if masks else device
        masks.append(torch.ones(tgt_len, src_len, dtype=torch.bool, device=device).triu_(1))
    if not masks:
        return None, None

    if all(m.dtype == torch.bool for m in masks):
        blocked = masks[0]
        for m in masks[1:]:
            blocked = blocked | m
        dead = blocked.all(dim=-1)  # (..., L) or (..., 1) for a padding-only mask
        # Dead rows attend to everything (finite softmax); their output is zeroed afterwards.
        allowed = ~blocked | dead.unsqueeze(-1)
        return allowed, dead

    additive = None
    for m in masks:
        if m.dtype == torch.bool:
            m = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(m, float("-inf"))
        else:
            m = m.to(dtype)
        additive = m if additive is None else additive + m
    dead = torch.isneginf(additive).all(dim=-1)
    additive = additive.masked_fill(dead.unsqueeze(-1), 0.0)
    return additive, dead


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
    need_weights: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """softmax(Q Kᵀ · scale + mask) V.

    Shapes:
        query: ``(..., L, E)``; key: ``(..., S, E)``; value: ``(..., S, Ev)`` with the same leading
        (batch) dims ``...``, e.g. ``(N, H)``.
        attn_mask: ``(L, S)`` or ``(..., L, S)`` (a leading dim may be 1); bool True = blocked,
        float = added to the scores.
        key_padding_mask: ``(N, S)`` (N = first leading dim) or ``(..., S)``; True = padding.
        is_causal: query i attends to keys ``j <= i`` (combined with any mask given).
        scale: defaults to ``1/sqrt(E)``.

    Returns:
        ``(output, weights)``: output ``(..., L, Ev)``; weights ``(..., L, S)`` when
        ``need_weights`` else None. Weights are the softmax probabilities before dropout. A query
        row with every key masked gets output 0 and weights 0.
    """
    _check_qkv(query, key, value)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p: expected a value in [0, 1), got {dropout_p}")
    out, weights, _ = attend(query, key, value, attn_mask, key_padding_mask, is_causal, dropout_p, scale, need_weights)
    return out, weights


def attend(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None,
    key_padding_mask: Tensor | None,
    is_causal: bool,
    dropout_p: float,
    scale: float | None,
    need_weights: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """:func:`scaled_dot_product_attention` for callers that checked q, k, v already; also returns
    the dead-row mask (True for query rows that could see no key; None when none can be dead),
    broadcastable to ``(..., L)``."""
    batch = _shape(query)[:-2]
    tgt_len, src_len = query.shape[-2], key.shape[-2]
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale

    if not need_weights and is_causal and attn_mask is None and key_padding_mask is None:
        # Causal alone: the kernel builds the mask itself (no (L, S) tensor at all). No row is
        # dead: query i always sees key 0.
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout_p, is_causal=True, scale=scale)
        return out, None, None

    mask, dead = merge_masks(
        attn_mask, key_padding_mask, is_causal, batch, tgt_len, src_len, query.dtype, device=query.device
    )
    if not need_weights:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout_p, scale=scale)
        if dead is not None and _records_grad(query, key, value, mask):
            out = out.masked_fill(dead.unsqueeze(-1), 0.0)  # out of place: SDPA saves `out` for backward
        elif dead is not None:
            out.masked_fill_(dead.unsqueeze(-1), 0.0)  # no autograd: no copy of the output
        return out, None, dead

    # Explicit path. One batched GEMM on (batch, L, E) x (batch, E, S) with the scale folded in
    # (alpha): the reshapes are the only copies of q and k (heads split from a packed projection are
    # strided views), where `matmul(query * scale, key.mT)` made three (q*scale, q, k).
    n = math.prod(batch)  # not -1: that is ambiguous for empty sequences
    q3, k3 = query.reshape(n, tgt_len, query.shape[-1]), key.reshape(n, src_len, key.shape[-1])
    scores = torch.baddbmm(q3.new_zeros(()), q3, k3.transpose(1, 2), beta=0.0, alpha=scale)
    scores = scores.view(batch + (tgt_len, src_len))  # (..., L, S)
    if _records_grad(query, key, value, mask):
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        weights = torch.softmax(scores, dim=-1)  # autograd keeps this output for backward
        if dead is not None:
            weights = weights.masked_fill(dead.unsqueeze(-1), 0.0)
    else:
        # No autograd: mask and softmax in place in `scores`, our own fresh tensor. A fresh large
        # tensor is costly on CPU (every page is faulted in); this saves up to two (..., L, S)
        # tensors, as torch's inference fast path does.
        if mask is not None and mask.dtype == torch.bool:
            scores.masked_fill_(~mask, float("-inf"))
        elif mask is not None:
            scores.add_(mask)
        weights = torch.softmax(scores, dim=-1, out=scores)
        if dead is not None:
            weights.masked_fill_(dead.unsqueeze(-1), 0.0)
    attn = F.dropout(weights, p=dropout_p) if dropout_p > 0.0 else weights
    return torch.matmul(attn, value), weights, dead


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
