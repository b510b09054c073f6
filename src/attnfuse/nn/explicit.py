"""Explicit attention, softmax(QKᵀ·scale + mask)·V with dropout on the probabilities, as one
autograd function whose every product has the layout the CPU's GEMM is fast at.

Per head, attention multiplies an (L, S) probability matrix by (S, d_head) values. With the small
heads of multimodal models (d_head = 6 or 12 for MulT on CMU-MOSEI) a product whose *output* has
d_head columns is slow on some CPUs: on one thread of an AMD EPYC, ``bmm(P, V)`` at (120, 50, 50) x
(120, 50, 6) takes twice as long as the same product computed transposed, ``bmm(Vᵀ, Pᵀ)``, whose
output has 50 columns (0.33 ms against 0.17 ms, medians: benchmarks/speed.py --part kernel). On an
Intel Xeon it is the other way round (0.26 ms against 2.16 ms).
Autograd's backward of ``P @ V`` and of ``Q @ Kᵀ`` builds three more such products (dQ, dK, dV
all have d_head columns). Here the forward computes ``(P V)ᵀ = Vᵀ Pᵀ`` and the backward computes
dQᵀ, dKᵀ and dVᵀ, each a wide product, returned as transposed views. Whether the whole function
beats plain ops depends on the CPU's GEMM library, so :mod:`.kernels` times both at first use.

The backward also needs fewer (L, S) tensors than autograd's: with A = P ⊙ M the dropped-out
probabilities (M = 0 or 1/(1-p)), the softmax backward through the dropout is

    dS = P ⊙ (dP - rowsum(dP ⊙ P)),  dP = dA ⊙ M   =>   dS = A ⊙ dA - P ⊙ rowsum(A ⊙ dA)

so P and A are all it keeps, and dS is computed in place in dA.

The dropout mask is :func:`~attnfuse.nn.dropout.dropout_mask`'s (the same draws as
:func:`~attnfuse.nn.dropout.dropout` of the probabilities). The function is differentiable once
(no double backward: nothing in attnfuse takes gradients of gradients); callers that need the
weights, or a gradient for a float mask, use autograd on plain ops instead (see
:func:`~attnfuse.nn.functional.attend`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from .dropout import dropout_mask

__all__ = ["explicit_attention"]


def explicit_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: Tensor | None,
    dead: Tensor | None,
    scale: float,
    dropout_p: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """softmax(Q Kᵀ · scale + mask) V, dropout on the probabilities, dead rows 0.

    Shapes: query ``(..., L, E)``, key ``(..., S, E)``, value ``(..., S, Ev)`` with the same
    leading dims; mask None or a float tensor (added to the scores; -inf blocks) broadcastable to
    ``(..., L, S)``, without gradient; dead None or bool broadcastable to ``(..., L)``: rows whose
    probabilities are set to 0 (their softmax must be finite: un-mask them in ``mask``).
    Returns ``(..., L, Ev)`` (a transposed view; ``reshape`` it as needed).
    """
    if mask is not None and mask.requires_grad:
        raise ValueError("mask: expected a mask without gradient (use autograd on plain ops for a learned mask)")
    return _ExplicitAttention.apply(query, key, value, mask, dead, scale, dropout_p, generator)


class _ExplicitAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, query, key, value, mask, dead, scale, dropout_p, generator) -> Tensor:
        # Arguments as explicit_attention's.
        batch = query.shape[:-2]
        L, E, S, Ev = query.shape[-2], query.shape[-1], key.shape[-2], value.shape[-1]
        n = math.prod(batch)  # not -1: ambiguous for empty sequences
        q, k, v = query.reshape(n, L, E), key.reshape(n, S, E), value.reshape(n, S, Ev)
        probs = torch.baddbmm(q.new_zeros(()), q, k.transpose(1, 2), beta=0.0, alpha=scale)  # (n, L, S)
        grid = probs.view(batch + (L, S))
        if mask is not None:
            grid.add_(mask)
        torch.softmax(probs, dim=-1, out=probs)  # in place: one (n, L, S) tensor so far
        if dead is not None:
            grid.masked_fill_(dead.unsqueeze(-1), 0.0)
        attn = probs
        if dropout_p > 0.0:
            attn = dropout_mask(probs.shape, dropout_p, dtype=probs.dtype, device=probs.device, generator=generator)
            attn.mul_(probs)  # A = P ⊙ M, in the mask's own fresh tensor
        out_t = torch.bmm(v.transpose(1, 2), attn.transpose(1, 2))  # (n, Ev, L) = (A V)ᵀ: a wide product
        ctx.save_for_backward(q, k, v, probs, attn)
        ctx.scale = scale
        ctx.shapes = (query.shape, key.shape, value.shape)
        return out_t.transpose(1, 2).view(batch + (L, Ev))

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_out: Tensor):
        q, k, v, probs, attn = ctx.saved_tensors
        q_shape, k_shape, v_shape = ctx.shapes
        n, L, Ev = q.shape[0], q.shape[1], v.shape[-1]
        g = grad_out.reshape(n, L, Ev)
        zero = q.new_zeros(())
        dq = dk = dv = None
        if ctx.needs_input_grad[2]:
            dv = torch.bmm(g.transpose(1, 2), attn).transpose(1, 2).view(v_shape)  # dVᵀ = gᵀ A: (n, Ev, S)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            ds = torch.bmm(g, v.transpose(1, 2))  # dA: (n, L, S)
            ds.mul_(attn)  # A ⊙ dA
            ds.addcmul_(probs, ds.sum(dim=-1, keepdim=True), value=-1.0)  # dS = A ⊙ dA - P ⊙ rowsum(A ⊙ dA)
            if ctx.needs_input_grad[0]:  # dQᵀ = Kᵀ dSᵀ · scale: (n, E, L)
                dq = torch.baddbmm(zero, k.transpose(1, 2), ds.transpose(1, 2), beta=0.0, alpha=ctx.scale)
                dq = dq.transpose(1, 2).view(q_shape)
            if ctx.needs_input_grad[1]:  # dKᵀ = Qᵀ dS · scale: (n, E, S)
                dk = torch.baddbmm(zero, q.transpose(1, 2), ds, beta=0.0, alpha=ctx.scale)
                dk = dk.transpose(1, 2).view(k_shape)
        return dq, dk, dv, None, None, None, None, None
