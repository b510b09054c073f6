"""Transformer encoder building blocks (Vaswani et al., 2017, section 3).

Each encoder layer is two sublayers, multi-head self-attention and a position-wise feed-forward net
(d_model -> dim_feedforward -> d_model with ReLU: 512 -> 2048 -> 512 in the paper), each wrapped in
"Add & Norm": ``LayerNorm(x + Dropout(Sublayer(x)))`` (post-norm, the paper's form, and the default)
or ``x + Dropout(Sublayer(LayerNorm(x)))`` (pre-norm, ``norm_first=True``, easier to train deep).

Argument names and ``state_dict`` keys match :class:`torch.nn.TransformerEncoderLayer` and
:class:`torch.nn.TransformerEncoder`, so their weights load here and give the same outputs;
``TransformerEncoder`` also takes torch's own form, ``TransformerEncoder(encoder_layer, num_layers)``.
Dropout is :class:`~attnfuse.nn.dropout.Dropout` (torch's, with a cheaper mask on the CPU).
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..checks import (
    check_activation,
    check_bool,
    check_divides,
    check_input_dtype,
    check_int,
    check_positive_float,
    check_probability,
)
from .attention import MultiheadAttention
from .dropout import Dropout
from .functional import clean_padding
from .masks import KeyPaddingMask

__all__ = ["PositionalEncoding", "FeedForward", "TransformerEncoderLayer", "TransformerEncoder"]

Activation = str | Callable[[Tensor], Tensor]


def _check_block_args(
    width: tuple[str, object],
    nhead: object,
    dim_feedforward: object,
    dropout: object,
    layer_norm_eps: object,
    flags: dict[str, object],
) -> None:
    """The arguments every attention block shares; ``width`` = (its name, value), e.g. ("d_model", 512)."""
    d = check_int(width[0], width[1])
    check_divides(width[0], d, "nhead", check_int("nhead", nhead))
    check_int("dim_feedforward", dim_feedforward)
    check_probability("dropout", dropout)
    check_positive_float("layer_norm_eps", layer_norm_eps)
    for name, flag in flags.items():
        check_bool(name, flag)


class PositionalEncoding(nn.Module):
    """Adds position information to a sequence of embeddings.

    Sinusoidal (the paper's formula, no parameters)::

        PE[pos, 2i]   = sin(pos / 10000^(2i / d_model))
        PE[pos, 2i+1] = cos(pos / 10000^(2i / d_model))

    or, with ``learned=True``, a trained table of ``max_len`` position vectors.

    Shapes: input and output ``(L, N, E)``, or ``(N, L, E)`` with ``batch_first=True``, with
    ``E = d_model`` and ``L <= max_len``.
    """

    def __init__(
        self, d_model: int, max_len: int = 5000, dropout: float = 0.0, learned: bool = False, batch_first: bool = False
    ) -> None:
        super().__init__()
        d_model, max_len = check_int("d_model", d_model), check_int("max_len", max_len)
        check_probability("dropout", dropout)
        check_bool("learned", learned), check_bool("batch_first", batch_first)
        self.d_model, self.max_len, self.learned, self.batch_first = d_model, max_len, learned, batch_first
        self.dropout = Dropout(dropout)
        if learned:
            self.pe = nn.Parameter(torch.empty(max_len, d_model))
            nn.init.normal_(self.pe, std=0.02)
        else:
            self.register_buffer("pe", sinusoidal_table(max_len, d_model), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(
                f"x: expected shape (L, N, {self.d_model}) or (N, L, {self.d_model}), got {tuple(x.shape)}"
            )
        seq_len = x.shape[1] if self.batch_first else x.shape[0]
        if seq_len > self.max_len:
            raise ValueError(f"x: expected sequence length <= max_len={self.max_len}, got {seq_len}")
        pe = self.pe[:seq_len].to(x.dtype)  # (L, E)
        pe = pe.unsqueeze(0) if self.batch_first else pe.unsqueeze(1)
        return self.dropout(x + pe)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, max_len={self.max_len}, learned={self.learned}"


def sinusoidal_table(length: int, d_model: int) -> Tensor:
    """The (length, d_model) sinusoid table of the paper (odd d_model drops the last cosine)."""
    pos = torch.arange(length, dtype=torch.float64).unsqueeze(1)  # (L, 1)
    inv_freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float64) * (-math.log(10000.0) / d_model))
    table = torch.zeros(length, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * inv_freq)
    table[:, 1::2] = torch.cos(pos * inv_freq[: d_model // 2])
    return table.float()


class FeedForward(nn.Module):
    """Position-wise feed-forward net: ``Linear(d_model, d_ff) -> activation -> Dropout -> Linear(d_ff, d_model)``.

    Shapes: input and output ``(..., d_model)``, e.g. ``(B, L, d_model)``; every position is
    transformed independently.
    """

    def __init__(
        self,
        d_model: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: Activation = "relu",
        bias: bool = True,
    ) -> None:
        super().__init__()
        d_model, dim_feedforward = check_int("d_model", d_model), check_int("dim_feedforward", dim_feedforward)
        check_probability("dropout", dropout), check_bool("bias", bias)
        self.linear1 = nn.Linear(d_model, dim_feedforward, bias=bias)
        self.dropout = Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias)
        self.activation = check_activation(activation)

    def forward(self, x: Tensor) -> Tensor:
        check_input_dtype("x", x, self.linear1.weight.dtype)
        return _feed_forward(self, x)


def _feed_forward(m: FeedForward | _AddNormBlock, x: Tensor) -> Tensor:
    # Shared by FeedForward and the encoder blocks, which hold the same four attributes.
    return m.linear2(m.dropout(m.activation(m.linear1(x))))


class _AddNormBlock(nn.Module):
    """An attention sublayer followed by a feed-forward sublayer, each with residual + LayerNorm.

    Subclasses pass their attention module as ``attention=(name, module)`` and implement the
    attention call; it is registered first and the feed-forward weights sit directly on the block
    (``linear1``, ``linear2``), so the keys, their order (``parameters()``, optimizer state) and
    the seeded initialisation all match torch.
    """

    def __init__(
        self,
        d_model: int,
        dim_feedforward: int,
        dropout: float,
        activation: Activation,
        layer_norm_eps: float,
        norm_first: bool,
        bias: bool,
        factory: dict,
        attention: tuple[str, nn.Module] | None = None,
    ) -> None:
        super().__init__()
        if attention is not None:
            self.add_module(*attention)
        self.linear1 = nn.Linear(d_model, dim_feedforward, bias=bias, **factory)
        self.dropout = Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias, **factory)
        self.norm_first = norm_first
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)
        self.activation = check_activation(activation)

    def _ff_block(self, x: Tensor) -> Tensor:
        return self.dropout2(_feed_forward(self, x))

    def _residual(
        self, x: Tensor, attend: Callable[[Tensor], tuple[Tensor, Tensor | None]]
    ) -> tuple[Tensor, Tensor | None]:
        """Both sublayers; ``attend(normed_or_raw_x) -> (attention output, weights)``."""
        if self.norm_first:
            a, weights = attend(self.norm1(x))
            x = x + self.dropout1(a)
            x = x + self._ff_block(self.norm2(x))
        else:
            a, weights = attend(x)
            x = self.norm1(x + self.dropout1(a))
            x = self.norm2(x + self._ff_block(x))
        return x, weights


class TransformerEncoderLayer(_AddNormBlock):
    """One encoder layer: self-attention and feed-forward, each with Add & Norm.

    Arguments and ``state_dict`` keys as :class:`torch.nn.TransformerEncoderLayer`.

    Shapes: src ``(S, N, E)`` (``(N, S, E)`` with ``batch_first``; ``(S, E)`` unbatched);
    src_mask ``(S, S)`` or ``(N*H, S, S)``; src_key_padding_mask ``(N, S)``, True = padding, or a
    :class:`~attnfuse.nn.masks.KeyPaddingMask`. Returns the output (same shape as src), and with ``need_weights=True`` also the per-head
    weights ``(N, H, S, S)``.
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: Activation = "relu",
        layer_norm_eps: float = 1e-5,
        batch_first: bool = False,
        norm_first: bool = False,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        flags = {"batch_first": batch_first, "norm_first": norm_first, "bias": bias}
        _check_block_args(("d_model", d_model), nhead, dim_feedforward, dropout, layer_norm_eps, flags)
        factory = {"device": device, "dtype": dtype}
        # Created first, as torch does: the same seed gives the same initial weights.
        self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, bias=bias, batch_first=batch_first, **factory)
        super().__init__(
            d_model,
            dim_feedforward,
            dropout,
            activation,
            layer_norm_eps,
            norm_first,
            bias,
            factory,
            attention=("self_attn", self_attn),
        )
        self.batch_first = batch_first

    def forward(
        self,
        src: Tensor,
        src_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | KeyPaddingMask | None = None,
        is_causal: bool = False,
        need_weights: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        def attend(x: Tensor) -> tuple[Tensor, Tensor | None]:
            return self.self_attn(
                x,
                x,
                x,
                attn_mask=src_mask,
                key_padding_mask=src_key_padding_mask,
                is_causal=is_causal,
                need_weights=need_weights,
                average_attn_weights=False,
            )

        check_input_dtype("src", src, self.linear1.weight.dtype)
        src = clean_padding(src, src_key_padding_mask, self.batch_first)
        out, weights = self._residual(src, attend)
        return (out, weights) if need_weights else out


class TransformerEncoder(nn.Module):
    """A stack of ``num_layers`` encoder layers (the paper: 6 layers, d_model 512, 8 heads,
    feed-forward 2048, dropout 0.1) with an optional final LayerNorm. Two ways to build one:

    * **torch's form**, ``TransformerEncoder(encoder_layer, num_layers, norm=None,
      enable_nested_tensor=True, mask_check=True)``: ``num_layers`` deep copies of
      ``encoder_layer`` (as torch's ``_get_clones``; the layer given is not itself part of the
      stack), so code written for :class:`torch.nn.TransformerEncoder` runs unchanged.
      ``enable_nested_tensor`` and ``mask_check`` are accepted and kept as attributes; they have no
      effect here (attnfuse has no nested-tensor path: padded positions are computed, not skipped).
    * **the keyword form**, ``TransformerEncoder(d_model=512, nhead=8, num_layers=6,
      dim_feedforward=2048, dropout=0.1, activation="relu", layer_norm_eps=1e-5,
      batch_first=False, norm_first=False, bias=True, final_norm=None, device=None, dtype=None)``:
      independently initialised :class:`TransformerEncoderLayer` s, and a final LayerNorm when
      ``final_norm`` (default: on for pre-norm, whose last output is otherwise un-normalised).

    The first positional argument (or ``encoder_layer=``) being an ``nn.Module`` selects torch's
    form. Either way the ``state_dict`` keys are torch's (``layers.{i}.…``, ``norm.…``).

    Shapes: src ``(S, N, E)`` or ``(N, S, E)`` with ``batch_first``; mask ``(S, S)`` or
    ``(N*H, S, S)``; src_key_padding_mask ``(N, S)`` (True = padding; prepared once as a
    :class:`~attnfuse.nn.masks.KeyPaddingMask` for all layers). Returns the output, and with
    ``return_attention=True`` also a list with every layer's weights ``(N, H, S, S)``. Without it
    no weights are computed (fused kernels).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        first = args[0] if args else kwargs.get("encoder_layer")
        torch_form = isinstance(first, nn.Module)
        if "encoder_layer" in kwargs and not torch_form:
            raise TypeError(f"encoder_layer: expected an nn.Module (torch's form), got {type(first).__name__}")
        try:
            bound = (inspect.signature(_torch_form) if torch_form else _KEYWORD_FORM).bind(*args, **kwargs)
        except TypeError as e:
            name = "torch's form (encoder_layer, num_layers, ...)" if torch_form else "the keyword form"
            raise TypeError(f"TransformerEncoder, {name}: {e}") from None
        bound.apply_defaults()
        layers, norm, attributes = (_torch_form if torch_form else _keyword_form)(**bound.arguments)
        self.layers = nn.ModuleList(layers)
        self.num_layers = len(layers)
        self.norm = norm
        for name, value in attributes.items():
            setattr(self, name, value)
        # A padding mask is prepared once per forward when every layer is ours (they accept it).
        self._prepares_padding = all(isinstance(layer, TransformerEncoderLayer) for layer in layers)

    def forward(
        self,
        src: Tensor,
        mask: Tensor | None = None,
        src_key_padding_mask: Tensor | KeyPaddingMask | None = None,
        is_causal: bool = False,
        return_attention: bool = False,
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        if return_attention and not self._prepares_padding:
            raise TypeError(
                "return_attention: needs attnfuse TransformerEncoderLayer layers (they return their "
                f"attention weights), got {type(self.layers[0]).__name__}"
            )
        padding = src_key_padding_mask
        if self._prepares_padding and isinstance(padding, Tensor) and padding.dim() == 2 and src.dim() == 3:
            padding = KeyPaddingMask(padding)  # checked and merged once, not in every layer
        x, maps = src, []
        for layer in self.layers:
            if return_attention:
                x, w = layer(x, mask, padding, is_causal, need_weights=True)
                maps.append(w)
            else:
                x = layer(x, src_mask=mask, src_key_padding_mask=padding, is_causal=is_causal)
        if self.norm is not None:
            x = self.norm(x)
        return (x, maps) if return_attention else x


def _torch_form(
    encoder_layer: nn.Module,
    num_layers: int,
    norm: nn.Module | None = None,
    enable_nested_tensor: bool = True,
    mask_check: bool = True,
) -> tuple[list[nn.Module], nn.Module | None, dict[str, bool]]:
    """torch.nn.TransformerEncoder's arguments -> (deep copies of the layer, final norm, attributes)."""
    num_layers = check_int("num_layers", num_layers)
    if norm is not None and not isinstance(norm, nn.Module):
        raise TypeError(f"norm: expected an nn.Module or None, got {type(norm).__name__}")
    attributes = {
        "enable_nested_tensor": check_bool("enable_nested_tensor", enable_nested_tensor),
        "mask_check": check_bool("mask_check", mask_check),
    }
    return [copy.deepcopy(encoder_layer) for _ in range(num_layers)], norm, attributes


def _keyword_form_signature() -> inspect.Signature:
    """The keyword form's parameters: TransformerEncoderLayer's (d_model and nhead with the paper's
    defaults), ``num_layers`` after ``nhead``, ``final_norm`` before ``device``."""
    params = list(inspect.signature(TransformerEncoderLayer).parameters.values())
    params[0], params[1] = params[0].replace(default=512), params[1].replace(default=8)
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    params.insert(2, inspect.Parameter("num_layers", kind, default=6))
    params.insert(
        next(i for i, p in enumerate(params) if p.name == "device"), inspect.Parameter("final_norm", kind, default=None)
    )
    return inspect.Signature(params)


_KEYWORD_FORM = _keyword_form_signature()


def _keyword_form(
    num_layers: int, final_norm: bool | None, **layer_args: Any
) -> tuple[list[nn.Module], nn.Module | None, dict[str, bool]]:
    """The keyword form's arguments -> (independently initialised layers, final norm or None, {})."""
    num_layers = check_int("num_layers", num_layers)
    final_norm = layer_args["norm_first"] if final_norm is None else check_bool("final_norm", final_norm)
    layers = [TransformerEncoderLayer(**layer_args) for _ in range(num_layers)]
    norm = None
    if final_norm:
        kw = {name: layer_args[name] for name in ("bias", "device", "dtype")}
        norm = nn.LayerNorm(layer_args["d_model"], eps=layer_args["layer_norm_eps"], **kw)
    return layers, norm, {}
