"""Multi-head attention: a drop-in for :class:`torch.nn.MultiheadAttention`.

Same constructor, same ``forward`` signature, same returned shapes and the same ``state_dict`` keys
(packed ``in_proj_weight``, or ``q/k/v_proj_weight`` when ``kdim``/``vdim`` differ from
``embed_dim``), so ``ours.load_state_dict(theirs.state_dict())`` just works. What differs:

* a query whose keys are all masked gets output 0 and weights 0, with finite gradients (torch:
  NaN outputs and weights when weights are asked for, and ``out_proj.bias`` on its fused path);
* a NaN or inf in a key or value that a mask hides reaches no output and no gradient (torch: every
  output is NaN); only the rows that see it, or are it, are NaN (see :mod:`.functional`);
* ``key_padding_mask`` may be a :class:`~attnfuse.nn.masks.KeyPaddingMask` prepared once for
  many layers; float masks may hold only finite values and -inf;
* wrong argument types, ranges and input dtypes are errors that name the argument;
* ``is_causal=True`` works without an ``attn_mask`` and is combined with one that is given;
* train and eval run the same kernels (no separate inference fast path), so they agree;
* no (L, S) matrix is built unless weights are asked for;
* in training with dropout on the CPU the projections are computed transposed, ``W xᵀ + b`` as
  ``(N, E, L)``, so that splitting the heads for the explicit kernels and merging them back are
  views, not copies (the same function; the products round differently in the last bits).

Per head, d_k = embed_dim / num_heads (512 / 8 = 64 in the paper).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_bool, check_divides, check_input_dtype, check_int, check_optional_int, check_probability
from .functional import attend, needs_guard, poison_rows, resolve_masks
from .masks import KeyPaddingMask

__all__ = ["MultiheadAttention"]


class MultiheadAttention(nn.Module):
    """Multi-head scaled dot-product attention, ``Concat(head_1..head_h) W_O``.

    Args:
        embed_dim: model size E (queries' feature size and output size).
        num_heads: H; must divide ``embed_dim``; each head works in E/H dimensions.
        dropout: dropout on the attention probabilities (training only).
        bias: add biases to the input and output projections.
        add_bias_kv: append a learned key and value (``bias_k``, ``bias_v``) to the sequence.
        add_zero_attn: append an all-zero key and value (after the head split).
        kdim, vdim: feature sizes of key and value (default E); cross-attention between
            modalities of different sizes sets these.
        batch_first: inputs are ``(N, L, E)`` instead of ``(L, N, E)``.

    Shapes (batch_first=False; swap the first two dims when True; drop N for unbatched input):
        query ``(L, N, E)``, key ``(S, N, kdim)``, value ``(S, N, vdim)``;
        key_padding_mask ``(N, S)``; attn_mask ``(L, S)`` or ``(N*H, L, S)``;
        output ``(L, N, E)``; weights ``(N, L, S)`` averaged over heads or ``(N, H, L, S)``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        embed_dim, num_heads = check_int("embed_dim", embed_dim), check_int("num_heads", num_heads)
        check_divides("embed_dim", embed_dim, "num_heads", num_heads)
        dropout = check_probability("dropout", dropout)
        for name, flag in (("bias", bias), ("add_bias_kv", add_bias_kv), ("add_zero_attn", add_zero_attn)):
            check_bool(name, flag)
        check_bool("batch_first", batch_first)
        kdim, vdim = check_optional_int("kdim", kdim), check_optional_int("vdim", vdim)
        factory = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.add_zero_attn = add_zero_attn

        # Parameter names and registration order mirror torch so state_dicts are interchangeable.
        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim, **factory))
            self.k_proj_weight = nn.Parameter(torch.empty(embed_dim, self.kdim, **factory))
            self.v_proj_weight = nn.Parameter(torch.empty(embed_dim, self.vdim, **factory))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
            self.bias_v = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
        else:
            self.bias_k = self.bias_v = None
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # The same initialisation as torch (Xavier-uniform projections, zero biases).
        if self._qkv_same_embed_dim:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            nn.init.xavier_uniform_(self.q_proj_weight)
            nn.init.xavier_uniform_(self.k_proj_weight)
            nn.init.xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
        if self.out_proj.bias is not None:
            nn.init.constant_(self.out_proj.bias, 0.0)
        if self.bias_k is not None:
            nn.init.xavier_normal_(self.bias_k)
            nn.init.xavier_normal_(self.bias_v)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | KeyPaddingMask | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """See the class docstring for shapes. Returns ``(output, weights or None)``."""
        unbatched = self._check_inputs(query, key, value)
        if unbatched:
            query, key, value, key_padding_mask = self._batch_of_one(query, key, value, key_padding_mask)
        seq_dim = 1 if self.batch_first else 0
        batch_size, tgt_len, src_len = query.shape[1 - seq_dim], query.shape[seq_dim], key.shape[seq_dim]
        attn_mask, key_padding_mask = self._check_masks(attn_mask, key_padding_mask, batch_size, tgt_len, src_len)
        guard = needs_guard(query, key, value)
        if guard:
            # Non-finite entries become 0 before any matmul (so no 0 · NaN reaches an output or a
            # gradient); the rows that depend on them are made NaN at the end.
            originals, given_masks = (query, key, value), (attn_mask, key_padding_mask, is_causal)
            query, key, value = _map_alike(lambda t: t.nan_to_num(0.0, 0.0, 0.0), query, key, value)
        if is_causal and (self.bias_k is not None or self.add_zero_attn):
            # The causal mask is over the S given keys; the appended ones (bias_k, zero) stay visible
            # to every query, exactly as with an explicit causal attn_mask (padded with an allowed
            # column below). Built now, before the padding, instead of over S + extra keys later.
            attn_mask, is_causal = _with_causal(attn_mask, tgt_len, src_len, query.device), False

        dropout_p = self.dropout if self.training else 0.0
        # Attention with dropout on the CPU runs explicit kernels (functional.attend), which take
        # the heads transposed without a copy; the fused kernel (SDPA) wants the usual layout.
        transposed = dropout_p > 0.0 and query.device.type == "cpu"
        q, k, v, attn_mask, key_padding_mask = self._heads(query, key, value, attn_mask, key_padding_mask, transposed)
        masks = resolve_masks(
            attn_mask, key_padding_mask, is_causal, (batch_size, self.num_heads), tgt_len, k.shape[2], q
        )
        out, weights = attend(q, k, v, masks, dropout_p, None, need_weights)
        out = self._merge_heads(out, masks.dead)  # out (N, H, L, hd) -> the input layout, W_O; weights (N, H, L, S)
        if guard:
            out, weights = self._poison(out, weights, given_masks, originals, batch_size, tgt_len, src_len)

        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)  # (N, L, S)
        if unbatched:
            out = out.squeeze(1 - seq_dim)
            weights = weights.squeeze(0) if weights is not None else None
        return out, weights

    def _batch_of_one(
        self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | KeyPaddingMask | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | KeyPaddingMask | None]:
        """Unbatched (L, E) inputs -> a batch of one along this layout's batch axis."""
        if isinstance(key_padding_mask, Tensor) and key_padding_mask.dim() != 1:
            raise ValueError(
                f"key_padding_mask: expected shape {(key.shape[0],)} for unbatched input, "
                f"got {tuple(key_padding_mask.shape)}"
            )
        bdim = 0 if self.batch_first else 1
        query, key, value = _map_alike(lambda t: t.unsqueeze(bdim), query, key, value)
        if isinstance(key_padding_mask, Tensor):
            key_padding_mask = key_padding_mask.unsqueeze(0)
        # An unbatched (H, L, S) attn_mask already is torch's (N*H, L, S) with N = 1.
        return query, key, value, key_padding_mask

    def _heads(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attn_mask: Tensor | None,
        key_padding_mask: Tensor | KeyPaddingMask | None,
        transposed: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | KeyPaddingMask | None]:
        """Projections split into heads ``(N, H, L|S, hd)``, with the extra keys of ``bias_k`` and
        ``add_zero_attn`` appended, and the masks given an allowed column for each.

        ``transposed``: each head is a transposed view of a contiguous ``(N, E, L|S)`` projection
        (see :meth:`_project_transposed`), so ``(N·H, L, hd)`` is a view, not a copy (the explicit
        kernels' batched products take it as it is); else the heads are views of the projection in
        the input layout (the last dim contiguous, as the fused kernel wants)."""
        seq_dim = 1 if self.batch_first else 0
        batch_size, E = query.shape[1 - seq_dim], self.embed_dim
        if transposed:
            q, k, v = self._project_transposed(query, key, value)  # (N, E, L|S)
            if self.bias_k is not None:
                k = torch.cat([k, self.bias_k.view(1, E, 1).expand(batch_size, E, 1)], dim=2)
                v = torch.cat([v, self.bias_v.view(1, E, 1).expand(batch_size, E, 1)], dim=2)
                key_padding_mask, attn_mask = _pad_last(key_padding_mask), _pad_last(attn_mask)
            H, hd = self.num_heads, self.head_dim
            q, k, v = (t.view(batch_size, H, hd, t.shape[2]).transpose(2, 3) for t in (q, k, v))  # (N, H, L|S, hd)
        else:
            q, k, v = self._project(query, key, value)  # in the input layout, last dim E
            if self.bias_k is not None:
                # A learned extra key/value: one more source position that no mask blocks.
                shape = (batch_size, 1, E) if self.batch_first else (1, batch_size, E)
                k = torch.cat([k, self.bias_k.expand(shape)], dim=seq_dim)
                v = torch.cat([v, self.bias_v.expand(shape)], dim=seq_dim)
                key_padding_mask, attn_mask = _pad_last(key_padding_mask), _pad_last(attn_mask)
            q, k, v = self._split_heads(q), self._split_heads(k), self._split_heads(v)  # (N, H, L|S, hd)
        if self.add_zero_attn:
            zeros = k.new_zeros(batch_size, self.num_heads, 1, self.head_dim)
            k, v = torch.cat([k, zeros], dim=2), torch.cat([v, zeros], dim=2)
            key_padding_mask, attn_mask = _pad_last(key_padding_mask), _pad_last(attn_mask)
        return q, k, v, attn_mask, key_padding_mask

    def _merge_heads(self, out: Tensor, dead: Tensor | None) -> Tensor:
        """(N, H, L, hd) -> the input layout's (N, L, E) or (L, N, E), then W_O; rows dead in every
        head are 0."""
        batch_size, H, tgt_len = out.shape[0], out.shape[1], out.shape[2]
        heads_t = out.transpose(2, 3)  # (N, H, hd, L)
        if self.batch_first and heads_t.is_contiguous():
            # The explicit kernel's output is a transposed view of a contiguous (N·H, hd, L): the
            # heads are merged as (N, E, L) without a copy and W_O applied from the right,
            # out (N, L, E) = (N, E, L)ᵀ W_Oᵀ, by one batched product into a contiguous result.
            merged_t = heads_t.reshape(batch_size, self.embed_dim, tgt_len)  # a view
            w, b = self.out_proj.weight, self.out_proj.bias
            wt = w.t().expand(batch_size, *w.t().shape)  # (N, E, E), no copy
            merged = merged_t.transpose(1, 2)  # (N, L, E), strided
            out = torch.bmm(merged, wt) if b is None else torch.baddbmm(b, merged, wt)
        else:
            if self.batch_first:
                out = out.transpose(1, 2).reshape(batch_size, tgt_len, self.embed_dim)
            else:
                out = out.permute(2, 0, 1, 3).reshape(tgt_len, batch_size, self.embed_dim)
            out = self.out_proj(out)
        if dead is not None:
            # A query that sees no key in any head receives nothing: output 0, not W_O·0 + b = b.
            dead_rows = _all_heads(dead, batch_size, H, tgt_len)  # (N, L) or (N, 1)
            # In place: out_proj's backward does not need its output.
            out.masked_fill_(self._to_layout(dead_rows).unsqueeze(-1), 0.0)
        return out

    # -- helpers -------------------------------------------------------------------------------

    def _check_masks(
        self,
        attn_mask: Tensor | None,
        key_padding_mask: Tensor | KeyPaddingMask | None,
        n: int,
        tgt_len: int,
        src_len: int,
    ) -> tuple[Tensor | None, Tensor | KeyPaddingMask | None]:
        """Check torch's mask layouts; (N*H, L, S) attn_mask becomes (N, H, L, S)."""
        H = self.num_heads
        if attn_mask is not None:
            if not isinstance(attn_mask, Tensor):
                raise TypeError(f"attn_mask: expected a torch.Tensor or None, got {type(attn_mask).__name__}")
            if attn_mask.dim() == 3 and tuple(attn_mask.shape) == (n * H, tgt_len, src_len):
                attn_mask = attn_mask.view(n, H, tgt_len, src_len)
            elif tuple(attn_mask.shape) != (tgt_len, src_len):
                raise ValueError(
                    f"attn_mask: expected shape {(tgt_len, src_len)} or {(n * H, tgt_len, src_len)}, "
                    f"got {tuple(attn_mask.shape)}"
                )
        if isinstance(key_padding_mask, KeyPaddingMask):
            shape = (key_padding_mask.batch_size, key_padding_mask.src_len)
            if self.bias_k is not None or self.add_zero_attn:
                key_padding_mask = key_padding_mask.key_padding_mask  # extended by a column below
        elif key_padding_mask is not None:
            if not isinstance(key_padding_mask, Tensor):
                raise TypeError(
                    f"key_padding_mask: expected a torch.Tensor, a KeyPaddingMask or None, "
                    f"got {type(key_padding_mask).__name__}"
                )
            shape = tuple(key_padding_mask.shape)
        if key_padding_mask is not None and shape != (n, src_len):
            raise ValueError(f"key_padding_mask: expected shape {(n, src_len)}, got {shape}")
        return attn_mask, key_padding_mask

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Input projections in the input's own layout (no transposed copies before the matmul)."""
        E = self.embed_dim
        b = self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else b.chunk(3)
        if not self._qkv_same_embed_dim:
            return (
                F.linear(query, self.q_proj_weight, bq),
                F.linear(key, self.k_proj_weight, bk),
                F.linear(value, self.v_proj_weight, bv),
            )
        w = self.in_proj_weight
        if query is key and key is value:
            # Self-attention: one (3E x E) matmul, then three views of its output.
            return F.linear(query, w, b).split(E, dim=-1)
        if key is value:
            # Cross-attention with shared key/value input: one matmul for both.
            k, v = F.linear(key, w[E:], None if b is None else b[E:]).split(E, dim=-1)
            return F.linear(query, w[:E], bq), k, v
        wq, wk, wv = w.chunk(3)
        return F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)

    def _project_transposed(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Input projections computed transposed, ``W xᵀ + b``: three contiguous ``(N, E, L|S)``,
        whose (N, E) dims split into heads (N, H, hd) and merge back into N·H batches as views.

        One batched product per projection (the weight broadcast over the batch, not copied).
        Compared with one packed product in the input layout, this moves no data to split the
        heads before the kernel, and autograd sums three input gradients instead of
        concatenating the three projections' gradients for the packed one."""
        b = self.in_proj_bias
        biases = (None, None, None) if b is None else b.chunk(3)
        if self._qkv_same_embed_dim:
            weights = self.in_proj_weight.chunk(3)
        else:
            weights = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        # (N, L, E) or (L, N, E) -> (N, E, L) views: a transposed operand costs the GEMM nothing.
        inputs = _map_alike(lambda t: t.transpose(1, 2) if self.batch_first else t.permute(1, 2, 0), query, key, value)
        return tuple(_linear_t(x, w, bias) for x, w, bias in zip(inputs, weights, biases))

    def _split_heads(self, x: Tensor) -> Tensor:
        """(N, L, E) or (L, N, E) -> (N, H, L, hd), a view whenever the layout allows."""
        x = x.unflatten(-1, (self.num_heads, self.head_dim))  # (N, L, H, hd) or (L, N, H, hd)
        return x.transpose(1, 2) if self.batch_first else x.permute(1, 2, 0, 3)

    def _check_inputs(self, query: Tensor, key: Tensor, value: Tensor) -> bool:
        """Validate ranks and sizes; returns True for unbatched (2-D) input."""
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if query.dim() not in (2, 3):
            raise ValueError(f"query: expected rank 3 (batched) or 2 (unbatched), got shape {tuple(query.shape)}")
        for name, t in (("key", key), ("value", value)):
            if t.dim() != query.dim():
                raise ValueError(
                    f"{name}: expected rank {query.dim()} like query {tuple(query.shape)}, got shape {tuple(t.shape)}"
                )
        for name, t, size in (("query", query, self.embed_dim), ("key", key, self.kdim), ("value", value, self.vdim)):
            if t.shape[-1] != size:
                raise ValueError(f"{name}: expected feature size {size}, got {t.shape[-1]} (shape {tuple(t.shape)})")
        if query.dim() == 3:
            bdim = 0 if self.batch_first else 1
            for name, t in (("key", key), ("value", value)):
                if t.shape[bdim] != query.shape[bdim]:
                    raise ValueError(
                        f"{name}: expected batch size {query.shape[bdim]} (as query) on dim {bdim}, got shape "
                        f"{tuple(t.shape)}"
                    )
        sdim = 0 if (query.dim() == 2 or not self.batch_first) else 1
        if key.shape[sdim] != value.shape[sdim]:
            raise ValueError(
                f"value: expected sequence length {key.shape[sdim]} (as key), got shape {tuple(value.shape)}"
            )
        dtype = self.out_proj.weight.dtype
        for name, t in (("query", query), ("key", key), ("value", value)):
            check_input_dtype(name, t, dtype)
        return query.dim() == 2

    def _to_layout(self, rows: Tensor) -> Tensor:
        """(N, L) per-query values -> the input layout's (N, L) or (L, N)."""
        return rows if self.batch_first else rows.transpose(0, 1)

    def _poison(
        self,
        out: Tensor,
        weights: Tensor | None,
        given_masks: tuple,
        originals: tuple[Tensor, Tensor, Tensor],
        n: int,
        tgt_len: int,
        src_len: int,
    ) -> tuple[Tensor, Tensor | None]:
        """NaN in the output rows (and per-head weight rows) that depend on a non-finite input row."""
        attn_mask, key_padding_mask, is_causal = given_masks
        # The inputs as (N, 1, L|S, features): one "head", broadcast over the real ones.
        query, key, value = (t.unsqueeze(1) if self.batch_first else t.transpose(0, 1).unsqueeze(1) for t in originals)
        if originals[1] is originals[2]:
            value = key  # poison_rows counts a shared key/value input once
        masks = resolve_masks(attn_mask, key_padding_mask, is_causal, (n, self.num_heads), tgt_len, src_len, query)
        poison_w, poison_out = poison_rows(masks, query, key, value)  # broadcast to (N, H, L)
        rows = poison_out.expand(n, self.num_heads, tgt_len).sum(dim=1)  # (N, L): NaN if any head depends
        out = out + self._to_layout(rows).unsqueeze(-1)
        if weights is not None:
            weights = weights + poison_w.unsqueeze(-1)  # (N, H, L, S)
        return out, weights

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, kdim={self.kdim}, vdim={self.vdim}, "
            f"dropout={self.dropout}, batch_first={self.batch_first}"
        )


def _linear_t(x_t: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``W xᵀ + b`` for x_t ``(N, in, L)`` (any strides), weight ``(out, in)``: ``(N, out, L)``."""
    w = weight.expand(x_t.shape[0], *weight.shape)  # (N, out, in), batch stride 0
    return torch.bmm(w, x_t) if bias is None else torch.baddbmm(bias.unsqueeze(-1), w, x_t)


def _with_causal(mask: Tensor | None, tgt_len: int, src_len: int, device: torch.device) -> Tensor:
    """``mask`` (None, bool True = blocked, or float) combined with the top-left causal mask."""
    causal = torch.ones(tgt_len, src_len, dtype=torch.bool, device=device).triu_(1)
    if mask is None:
        return causal
    if mask.dtype == torch.bool:
        return mask | causal
    return mask.masked_fill(causal, float("-inf"))


def _pad_last(mask: Tensor | None) -> Tensor | None:
    """Append one 'allowed' column (False for bool masks, 0 for float masks) for an extra key."""
    return None if mask is None else F.pad(mask, (0, 1))


def _all_heads(dead: Tensor, n: int, num_heads: int, tgt_len: int) -> Tensor:
    """``dead`` (broadcastable to (N, H, L)) -> (N, L) or (N, 1): rows dead in every head."""
    if dead.dim() == 3 and dead.shape[0] == n and dead.shape[1] == 1:
        return dead[:, 0]  # the same for every head (padding): no reduction
    return dead.expand(n, num_heads, tgt_len).all(dim=1)


def _map_alike(fn: Callable[[Tensor], Tensor], *inputs: Tensor) -> list[Tensor]:
    """``fn`` of each input, computed once per distinct tensor: inputs that are one tensor stay one
    tensor (the packed self-attention projection needs ``query is key is value``)."""
    done: list[tuple[Tensor, Tensor]] = []
    for x in inputs:
        same = next((y for orig, y in done if orig is x), None)
        done.append((x, same if same is not None else fn(x)))
    return [y for _, y in done]
