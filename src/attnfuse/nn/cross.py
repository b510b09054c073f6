"""Cross-attention blocks: one sequence asks, another answers.

In self-attention Q, K and V come from the same sequence. In cross-attention the queries come from
one sequence (text) and keys/values from another (video): each text token gathers what it needs
from the video. The two need not share a feature size: the key/value projections map the
context's size onto the query's (``kdim``/``vdim`` of :class:`MultiheadAttention`).
"""

from __future__ import annotations

from torch import Tensor, nn

from ..checks import check_divides, check_input_dtype, check_int, check_optional_int
from .attention import MultiheadAttention
from .functional import clean_padding
from .layers import Activation, _AddNormBlock, _check_block_args
from .masks import KeyPaddingMask

__all__ = ["CrossAttention", "BidirectionalCrossAttention"]


class CrossAttention(_AddNormBlock):
    """Query sequence attends to a context sequence, then a feed-forward net; each with Add & Norm.

    Args:
        query_dim: feature size of the query sequence (and of the output).
        context_dim: feature size of the context sequence (may differ from ``query_dim``).
        nhead: number of heads; must divide ``query_dim``.
        dim_feedforward: hidden size of the feed-forward net (default ``4 * query_dim``, the
            paper's ratio).
        norm_first: pre-norm; the context then gets its own LayerNorm (``norm_context``).

    Shapes (batch_first=False; swap the first two dims when True):
        x ``(L, N, query_dim)``; context ``(S, N, context_dim)``;
        context_key_padding_mask ``(N, S)``, True = padding, or a
        :class:`~attnfuse.nn.masks.KeyPaddingMask` prepared once for a stack of layers; attn_mask ``(L, S)`` or ``(N*H, L, S)``.
        Returns ``(L, N, query_dim)``, and with ``need_weights=True`` also ``(N, H, L, S)`` weights.
        A query with no visible context (e.g. the whole modality is absent) receives nothing from
        it and no NaN: the attention output is 0 (weights 0) and the residual carries the query
        through to the feed-forward sublayer.
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: int,
        nhead: int,
        dim_feedforward: int | None = None,
        dropout: float = 0.1,
        activation: Activation = "relu",
        layer_norm_eps: float = 1e-5,
        batch_first: bool = False,
        norm_first: bool = False,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        query_dim, context_dim = check_int("query_dim", query_dim), check_int("context_dim", context_dim)
        dim_feedforward = (
            4 * query_dim if check_optional_int("dim_feedforward", dim_feedforward) is None else dim_feedforward
        )
        flags = {"batch_first": batch_first, "norm_first": norm_first, "bias": bias}
        _check_block_args(("query_dim", query_dim), nhead, dim_feedforward, dropout, layer_norm_eps, flags)
        factory = {"device": device, "dtype": dtype}
        super().__init__(query_dim, dim_feedforward, dropout, activation, layer_norm_eps, norm_first, bias, factory)
        self.cross_attn = MultiheadAttention(
            query_dim,
            nhead,
            dropout=dropout,
            bias=bias,
            kdim=context_dim,
            vdim=context_dim,
            batch_first=batch_first,
            **factory,
        )
        self.norm_context = nn.LayerNorm(context_dim, eps=layer_norm_eps, bias=bias, **factory) if norm_first else None
        self.query_dim, self.context_dim, self.batch_first = query_dim, context_dim, batch_first

    def forward(
        self,
        x: Tensor,
        context: Tensor,
        context_key_padding_mask: Tensor | KeyPaddingMask | None = None,
        attn_mask: Tensor | None = None,
        need_weights: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        check_input_dtype("x", x, self.linear1.weight.dtype)
        if isinstance(context, Tensor):
            check_input_dtype("context", context, self.linear1.weight.dtype)
            context = clean_padding(context, context_key_padding_mask, self.batch_first)
        ctx = self.norm_context(context) if self.norm_context is not None else context

        def attend(q: Tensor) -> tuple[Tensor, Tensor | None]:
            return self.cross_attn(
                q,
                ctx,
                ctx,
                key_padding_mask=context_key_padding_mask,
                attn_mask=attn_mask,
                need_weights=need_weights,
                average_attn_weights=False,
            )

        out, weights = self._residual(x, attend)
        return (out, weights) if need_weights else out


class BidirectionalCrossAttention(nn.Module):
    """Both directions of cross-attention between sequences ``a`` and ``b`` (text <-> video).

    ``a_to_b``: a's tokens query b (output has a's shape); ``b_to_a``: b's tokens query a.
    Fusion models concatenate the two outputs along the token axis and aggregate them.

    Shapes (batch_first=False): a ``(La, N, dim_a)``, b ``(Lb, N, dim_b)``; padding masks
    ``(N, La)`` and ``(N, Lb)`` (tensors or :class:`~attnfuse.nn.masks.KeyPaddingMask`). Returns ``(a_out, b_out)`` with the shapes of a and b; with
    ``need_weights=True``, ``(a_out, b_out, weights_a_to_b (N, H, La, Lb), weights_b_to_a (N, H, Lb, La))``.
    """

    def __init__(
        self,
        dim_a: int,
        dim_b: int,
        nhead: int,
        dim_feedforward: int | None = None,
        dropout: float = 0.1,
        activation: Activation = "relu",
        layer_norm_eps: float = 1e-5,
        batch_first: bool = False,
        norm_first: bool = False,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        nhead = check_int("nhead", nhead)
        for name, dim in (("dim_a", dim_a), ("dim_b", dim_b)):
            check_divides(name, check_int(name, dim), "nhead", nhead)
        kw = dict(
            nhead=nhead,
            dropout=dropout,
            activation=activation,
            layer_norm_eps=layer_norm_eps,
            batch_first=batch_first,
            norm_first=norm_first,
            bias=bias,
            device=device,
            dtype=dtype,
        )
        self.a_to_b = CrossAttention(dim_a, dim_b, dim_feedforward=dim_feedforward, **kw)
        self.b_to_a = CrossAttention(dim_b, dim_a, dim_feedforward=dim_feedforward, **kw)

    def forward(
        self,
        a: Tensor,
        b: Tensor,
        key_padding_mask_a: Tensor | KeyPaddingMask | None = None,
        key_padding_mask_b: Tensor | KeyPaddingMask | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, ...]:
        # Both inputs are queries of one direction and keys of the other: padded rows cleaned once.
        batch_first = self.a_to_b.batch_first
        if isinstance(a, Tensor) and isinstance(b, Tensor):
            a = clean_padding(a, key_padding_mask_a, batch_first)
            b = clean_padding(b, key_padding_mask_b, batch_first)
        if need_weights:
            a_out, w_ab = self.a_to_b(a, b, key_padding_mask_b, need_weights=True)
            b_out, w_ba = self.b_to_a(b, a, key_padding_mask_a, need_weights=True)
            return a_out, b_out, w_ab, w_ba
        return self.a_to_b(a, b, key_padding_mask_b), self.b_to_a(b, a, key_padding_mask_a)
