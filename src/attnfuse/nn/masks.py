"""Attention masks: torch's three ways of masking merged into the one mask a kernel takes.

Conventions follow :class:`torch.nn.MultiheadAttention`: a **bool** ``attn_mask`` or
``key_padding_mask`` is True where attention is NOT allowed, a **float** one is added to the scores
(-inf blocks); ``is_causal`` lets query i see keys 0..i (top-left aligned). The merged mask is in
the convention of :func:`torch.nn.functional.scaled_dot_product_attention`: bool True where
attention IS allowed, or float to add.

A query row whose keys are all masked ("dead") has nothing to attend to; softmax over an empty set
is undefined (torch returns NaN on several of its paths). The merge un-masks such rows (so softmax
stays finite) and reports them, and the caller zeroes their output.

:class:`KeyPaddingMask` does the checking and merging of a key_padding_mask once, for models that
apply the same padding in every layer.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["KeyPaddingMask", "merge_masks", "tracing", "visible_keys"]


def tracing() -> bool:
    """True while a graph of the model is recorded (``torch.jit.trace``, ``torch.export``, the
    ONNX exporter, ``torch.compile``). Shortcuts taken after reading a tensor's values ("nothing is
    padded", "every input is finite") are then skipped: a recorder would freeze the branch taken
    for the example inputs into the graph, and a graph recorded on rows without padding would
    ignore the masks of every later input. The general path computes the same values."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def check_mask(mask: object, name: str) -> Tensor:
    """A bool mask, or a float mask whose values are finite or -inf (NaN or +inf in a mask has no
    meaning as a score bias: NaN would poison every score it touches, +inf every softmax)."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        raise ValueError(f"{name}: expected a bool or floating-point tensor, got dtype {mask.dtype}")
    if bool((torch.isnan(mask) | torch.isposinf(mask)).any()):
        raise ValueError(
            f"{name}: expected finite values or -inf (= blocked) in a float mask, got NaN or +inf "
            f"(for a boolean meaning use a bool mask: True = blocked)"
        )
    return mask


def _expand_key_padding_mask(key_padding_mask: Tensor, batch: tuple[int, ...], src_len: int) -> Tensor:
    """(N, S) or batch + (S,) -> a view of rank len(batch) + 2 that broadcasts over heads and queries."""
    kpm = check_mask(key_padding_mask, "key_padding_mask")
    if _shape(kpm) == batch + (src_len,):
        return kpm.unsqueeze(-2)  # (..., 1, S)
    if len(batch) >= 1 and _shape(kpm) == (batch[0], src_len):
        # (N, S) -> (N, 1, ..., 1, S): the same padding for every head and every query.
        return kpm.view((batch[0],) + (1,) * (len(batch) - 1) + (1, src_len))
    expected = f"{batch + (src_len,)}" if len(batch) <= 1 else f"{(batch[0], src_len)} or {batch + (src_len,)}"
    raise ValueError(f"key_padding_mask: expected shape {expected}, got {_shape(kpm)}")


def _check_attn_mask(attn_mask: Tensor, batch: tuple[int, ...], tgt_len: int, src_len: int) -> Tensor:
    """(L, S), or batch + (L, S) where each batch dim may be 1 (broadcast on purpose)."""
    check_mask(attn_mask, "attn_mask")
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


def visible_keys(mask: Tensor | None, dead: Tensor | None) -> Tensor | None:
    """From :func:`merge_masks`' ``(mask, dead)``: bool, broadcastable to ``batch + (L, S)``, True
    where query i really sees key j (dead rows see nothing); None when every query sees every key."""
    if mask is None:
        return None
    visible = mask if mask.dtype == torch.bool else ~torch.isneginf(mask)
    return visible if dead is None else visible & ~dead.unsqueeze(-1)


class KeyPaddingMask:
    """A ``key_padding_mask`` checked and merged once, for every attention layer over the same keys.

    A fusion model applies one padding mask in every layer of a stack; passed where a
    ``key_padding_mask`` (or ``src_key_padding_mask``, ``context_key_padding_mask``) goes, this
    spares each layer the checks, the merge and the search for samples without any valid key. When
    nothing is padded it carries no mask at all, so attention runs its unmasked kernel.

    Building one reads the mask's values (one host sync on a GPU): build it once per forward, not
    per layer. :class:`TransformerEncoder` builds it itself from a tensor.

    Args:
        key_padding_mask: ``(N, S)``; bool True = padding, or float added to the scores (-inf =
            padding).

    Attributes:
        key_padding_mask: the ``(N, S)`` tensor as given.
        allowed: None when no key is masked, else ``(N, S)`` in SDPA's convention (bool True = may
            attend, or float to add); the keys of a sample without any valid key are all allowed
            (finite softmax) and the sample is listed in ``dead``.
        dead: None, or ``(N,)`` bool, True for samples whose keys are all masked: their attention
            output is 0.
    """

    __slots__ = ("allowed", "dead", "key_padding_mask")

    def __init__(self, key_padding_mask: Tensor) -> None:
        kpm = check_mask(key_padding_mask, "key_padding_mask")
        if kpm.dim() != 2:
            raise ValueError(f"key_padding_mask: expected shape (N, S), got {_shape(kpm)}")
        self.key_padding_mask = kpm
        blocked = kpm if kpm.dtype == torch.bool else torch.isneginf(kpm)
        if tracing():  # one graph for every input: the masked path, dead samples always handled
            dead = blocked.all(dim=-1)  # (N,)
            self.dead = dead
            if kpm.dtype == torch.bool:
                self.allowed = ~kpm | dead.unsqueeze(-1)
            else:
                self.allowed = kpm.masked_fill(dead.unsqueeze(-1), 0.0)
            return
        if kpm.dtype == torch.bool and not bool(blocked.any()):
            self.allowed = self.dead = None  # nothing padded: no mask, the unmasked kernel
            return
        if kpm.dtype != torch.bool and not bool(kpm.any()) and not (kpm.requires_grad and torch.is_grad_enabled()):
            # All zeros adds nothing, but a mask that records gradients is kept: its gradient is
            # not zero (it is the scores' gradient summed over queries and heads, as in torch).
            self.allowed = self.dead = None
            return
        dead = blocked.all(dim=-1)  # (N,)
        has_dead = bool(dead.any())
        self.dead = dead if has_dead else None
        if kpm.dtype == torch.bool:
            self.allowed = ~kpm | dead.unsqueeze(-1) if has_dead else ~kpm
        else:
            self.allowed = kpm.masked_fill(dead.unsqueeze(-1), 0.0) if has_dead else kpm

    @property
    def batch_size(self) -> int:
        return self.key_padding_mask.shape[0]

    @property
    def src_len(self) -> int:
        return self.key_padding_mask.shape[1]

    def broadcast(
        self, batch: tuple[int, ...], src_len: int, dtype: torch.dtype
    ) -> tuple[Tensor | None, Tensor | None]:
        """``(mask, dead)`` as :func:`merge_masks` returns them for inputs with leading dims
        ``batch`` (``batch[0]`` = N): views of rank ``len(batch) + 2`` and ``len(batch) + 1``."""
        if not batch or (batch[0], src_len) != (self.batch_size, self.src_len):
            expected = f"{(batch[0], src_len)}" if batch else "rank-2 (N, S) with N the inputs' batch size"
            raise ValueError(
                f"key_padding_mask: expected shape {expected}, got a KeyPaddingMask of shape "
                f"{(self.batch_size, self.src_len)}"
            )
        ones = (1,) * (len(batch) - 1)
        mask = self.allowed
        if mask is not None:
            mask = mask.view((batch[0],) + ones + (1, src_len))  # (N, 1, ..., 1, S)
            if mask.is_floating_point() and mask.dtype != dtype:
                mask = mask.to(dtype)
        dead = None if self.dead is None else self.dead.view((batch[0],) + ones + (1,))  # (N, 1, ..., 1)
        return mask, dead

    def __repr__(self) -> str:
        state = "nothing padded" if self.allowed is None else f"dead samples: {self.dead is not None}"
        return f"KeyPaddingMask(shape={(self.batch_size, self.src_len)}, {state})"
