"""The five fusion models, each with its config dataclass.

=========  ===================================================================================
concat     pool each modality, concatenate, MLP: the baseline every attention model must beat
self       all modalities' tokens in one Transformer encoder (self-attention across modalities),
           then aggregation (mean over valid tokens, attention pooling, a [CLS] token, or
           per-modality means concatenated)
cross      one modality's tokens query the others' (text queries video), stacked cross-attention
bicross    both directions (a queries b, b queries a), concatenated along the token axis, aggregated
mult       MulT-style: every modality queries each other one through a cross-modal Transformer,
           the results per target go through self-attention, then everything is concatenated
=========  ===================================================================================

Every model maps a :class:`~attnfuse.data.Batch` to ``(B, out_dim)`` (class logits or regression
outputs). With ``return_attention=True`` it also returns a list of :class:`AttentionMap`; without
it no attention weights are computed and the fused kernels run.

A missing modality (an all-False row of its token mask) is skipped by the attention masks, never
zero-filled: its tokens are keys nobody may attend to and they are left out of the aggregation;
where a model's fused vector would come from it alone (concat, a query modality, a MulT target),
a learned "missing" vector stands in.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from .checks import check_int, check_probability
from .data.dataset import Batch, ModalitySpec
from .modules import AttentionMap, MLPHead, ModalityEmbedding, Pooling, masked_mean, token_labels
from .nn import BidirectionalCrossAttention, CrossAttention, KeyPaddingMask, TransformerEncoder
from .options import option, options_of

__all__ = [
    "FusionConfig",
    "ConcatConfig",
    "SelfFusionConfig",
    "CrossFusionConfig",
    "BiCrossFusionConfig",
    "MulTConfig",
    "FusionModel",
    "ConcatFusion",
    "SelfAttentionFusion",
    "CrossModalFusion",
    "BiCrossFusion",
    "MulTFusion",
    "FUSIONS",
    "build_model",
    "config_from_dict",
]


# ---------------------------------------------------------------------------------------------
# Configs: every field made with `option` is a user-facing setting (see attnfuse.options)
# ---------------------------------------------------------------------------------------------


@dataclass
class FusionConfig:
    """What every fusion model needs: the modalities it reads, the output size and the width.

    ``modalities`` and ``out_dim`` come from the data (:func:`attnfuse.training.model_config`); a
    config without modalities checks its own settings only (the command line does that before any
    data is loaded)."""

    modalities: list[ModalitySpec] = field(default_factory=list)
    out_dim: int = 1  # number of classes, or of regression targets
    # Regression: the training rows' target mean and std per output (set by training.fit_model). The
    # network learns standardised targets and its outputs are mapped back (see FusionModel).
    target_mean: list[float] | None = None
    target_std: list[float] | None = None
    d_model: int = option(64, "Model width: every modality's features are projected to it.")
    dropout: float = option(0.1, "Dropout rate (embeddings, attention, feed-forward, head).")
    head_hidden: int | None = option(None, "Hidden size of the MLP head (default 2 * d_model).")
    modality_dropout: float = option(
        0.0,
        "Training only: hide each modality of a sample with this probability (at least one stays). "
        "The --fusion auto candidates: 0.1 unless given.",
    )

    def __post_init__(self) -> None:
        self.modalities = [m if isinstance(m, ModalitySpec) else ModalitySpec(**m) for m in self.modalities]
        check_int("out_dim", self.out_dim, 1)
        check_int("d_model", self.d_model, 1)
        if self.head_hidden is not None:
            check_int("head_hidden", self.head_hidden, 1)
        check_probability("dropout", self.dropout)
        check_probability("modality_dropout", self.modality_dropout)
        for name in ("target_mean", "target_std"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (list, tuple)) or len(value) != self.out_dim):
                raise ValueError(f"{name}: expected a list of out_dim={self.out_dim} numbers, got {value!r}")
        if self.target_std is not None and not all(s > 0 for s in self.target_std):
            raise ValueError(f"target_std: expected positive numbers, got {self.target_std}")
        if self.modalities:
            self.check_modalities(self.names())

    def check_modalities(self, names: list[str]) -> None:
        """Checks of the settings that name modalities, once the data's modalities are known."""

    @property
    def hidden(self) -> int:
        return self.head_hidden or 2 * self.d_model

    def names(self) -> list[str]:
        return [m.name for m in self.modalities]

    def num_parameters(self) -> int:
        """The parameter count of the model this config describes, from its numbers alone and at
        least (nothing is built, so a config is bounded before it can allocate): each modality's
        input projection ``D_m x d`` and the head's two linear maps (input >= d)."""
        d = self.d_model
        return sum(m.dim * d for m in self.modalities) + self.hidden * (d + self.out_dim)

    def size_settings(self) -> str:
        """The settings that set :meth:`num_parameters`, as a message names them."""
        return f"d_model={self.d_model}"


@dataclass
class ConcatConfig(FusionConfig):
    """``concat``: no attention at all."""


@dataclass
class SelfFusionConfig(FusionConfig):
    """``self``: one Transformer encoder over the tokens of all modalities."""

    nhead: int = option(4, "Attention heads (must divide d_model).", flags=("heads",))
    num_layers: int = option(2, "Attention layers per stack.", flags=("layers",))
    dim_feedforward: int | None = option(None, "Hidden size of the feed-forward sublayers (default 4 * width).")
    norm_first: bool = option(
        True, "Pre-norm blocks (stabler on small data); --no-norm-first: post-norm, as the paper."
    )
    pooling: str = option(
        "mean",
        "Aggregation of the fused tokens: mean over valid tokens, attention (a learned query), cls (a [CLS] "
        "token), or modality (self fusion: per-modality means, concatenated).",
        choices=("mean", "attention", "cls", "modality"),
    )

    POOLINGS: ClassVar[tuple[str, ...]] = ("mean", "attention", "cls", "modality")

    def __post_init__(self) -> None:
        check_int("nhead", self.nhead, 1)  # before d_model % nhead, which would divide by 0
        check_int("num_layers", self.num_layers, 1)
        if self.dim_feedforward is not None:
            check_int("dim_feedforward", self.dim_feedforward, 1)
        if self.pooling not in self.POOLINGS:
            raise ValueError(f"pooling: expected one of {self.POOLINGS} for this fusion, got {self.pooling!r}")
        super().__post_init__()
        if self.d_model % self.nhead != 0:
            raise ValueError(f"d_model: expected a multiple of nhead={self.nhead}, got {self.d_model}")

    @property
    def ff(self) -> int:
        return self.dim_feedforward or 4 * self.d_model

    def num_parameters(self) -> int:
        """At least :meth:`FusionConfig.num_parameters` and ``num_layers`` attention blocks of at
        least ``4 d²`` (Q, K, V and output projections) plus ``2 d ff`` (feed-forward) each."""
        d = self.d_model
        return super().num_parameters() + self.num_layers * (4 * d * d + 2 * d * self.ff)

    def size_settings(self) -> str:
        return f"{super().size_settings()}, num_layers={self.num_layers}"


@dataclass
class CrossFusionConfig(SelfFusionConfig):
    """``cross``: the ``query`` modality's tokens attend to the ``context`` modalities' tokens.

    Defaults: the first modality queries all the others (for text/audio/vision: text queries)."""

    query: str | None = option(None, "cross/bicross: the modality whose tokens ask (default: the first).")
    context: list[str] | None = option(
        None,
        "cross/bicross: the modalities that answer (repeat the option; default: all but the query).",
        metavar="MODALITY",
    )

    POOLINGS: ClassVar[tuple[str, ...]] = ("mean", "attention")

    def check_modalities(self, names: list[str]) -> None:
        if len(names) < 2:
            raise ValueError(f"modalities: cross-modal fusion needs at least 2 modalities, got {names}")
        if self.query is None:
            self.query = names[0]
        if self.query not in names:
            raise ValueError(f"query: expected one of {names}, got {self.query!r}")
        if self.context is None:
            self.context = [n for n in names if n != self.query]
        bad = [c for c in self.context if c not in names or c == self.query]
        if bad or not self.context:
            raise ValueError(
                f"context: expected modalities from {names} other than query {self.query!r}, got {self.context}"
            )


@dataclass
class BiCrossFusionConfig(CrossFusionConfig):
    """``bicross``: a = ``query`` modality, b = the ``context`` modalities; both directions."""


@dataclass
class MulTConfig(SelfFusionConfig):
    """``mult``: ``num_layers`` cross-modal layers per (target, source) pair, then ``self_layers``
    of self-attention per target over the concatenated cross-modal outputs (width
    ``(M - 1) * d_model``; its feed-forward is ``dim_feedforward`` or 4x that width)."""

    self_layers: int | None = option(None, "mult: self-attention layers per target modality (default: num_layers).")

    POOLINGS: ClassVar[tuple[str, ...]] = ("mean",)

    def __post_init__(self) -> None:
        if self.self_layers is not None:
            check_int("self_layers", self.self_layers, 1)
        super().__post_init__()

    def check_modalities(self, names: list[str]) -> None:
        if len(names) < 2:
            raise ValueError(f"modalities: mult needs at least 2 modalities, got {names}")

    @property
    def self_depth(self) -> int:
        return self.self_layers or self.num_layers


# ---------------------------------------------------------------------------------------------
# Stacks: each returns its output and every layer's attention weights (an empty list unless
# `return_attention`), so the models collect maps without branching.
# ---------------------------------------------------------------------------------------------


class CrossStack(nn.ModuleList):
    """``num_layers`` cross-attention blocks of width d_model (GELU feed-forward, batch-first).

    forward(x ``(B, L, d)``, context ``(B, S, d)``, context_pad ``(B, S)`` True = ignore, or a
    :class:`~attnfuse.nn.KeyPaddingMask`) -> (x ``(B, L, d)``, weights: list of ``(B, H, L, S)``)."""

    def __init__(self, config: SelfFusionConfig, block: type[nn.Module] = CrossAttention) -> None:
        d = config.d_model
        super().__init__(
            block(d, d, config.nhead, config.ff, config.dropout, "gelu", batch_first=True, norm_first=config.norm_first)
            for _ in range(config.num_layers)
        )

    def forward(self, x: Tensor, context: Tensor, context_pad: Tensor | KeyPaddingMask, return_attention: bool = False):
        context_pad = padding(context_pad)  # checked and merged once for every layer
        weights = []
        for layer in self:
            if return_attention:
                x, w = layer(x, context, context_pad, need_weights=True)
                weights.append(w)
            else:
                x = layer(x, context, context_pad)
        return x, weights


class BiCrossStack(nn.ModuleList):
    """``num_layers`` bidirectional blocks: a attends to b and b to a, both updated every layer.

    forward(a ``(B, La, d)``, b ``(B, Lb, d)``, a_pad, b_pad (``(B, L)`` True = ignore, or
    :class:`~attnfuse.nn.KeyPaddingMask`)) -> (a, b, weights a->b, weights b->a)."""

    def __init__(self, config: SelfFusionConfig) -> None:
        d = config.d_model
        super().__init__(
            BidirectionalCrossAttention(
                d, d, config.nhead, config.ff, config.dropout, "gelu", batch_first=True, norm_first=config.norm_first
            )
            for _ in range(config.num_layers)
        )

    def forward(
        self,
        a: Tensor,
        b: Tensor,
        a_pad: Tensor | KeyPaddingMask,
        b_pad: Tensor | KeyPaddingMask,
        return_attention: bool = False,
    ):
        a_pad, b_pad = padding(a_pad), padding(b_pad)  # checked and merged once for every layer
        w_ab, w_ba = [], []
        for layer in self:
            if return_attention:
                a, b, ab, ba = layer(a, b, a_pad, b_pad, need_weights=True)
                w_ab.append(ab)
                w_ba.append(ba)
            else:
                a, b = layer(a, b, a_pad, b_pad)
        return a, b, w_ab, w_ba


def padding(pad: Tensor | KeyPaddingMask) -> KeyPaddingMask:
    """A ``(B, S)`` key padding mask (True = ignore) prepared once for a whole stack (or several
    stacks over the same keys): the layers then skip its checks and merge, and when nothing is
    padded they get no mask at all (the unmasked kernel, no additive mask, no NaN guard of padded
    rows)."""
    return pad if isinstance(pad, KeyPaddingMask) else KeyPaddingMask(pad)


def encode(
    encoder: TransformerEncoder, x: Tensor, pad: Tensor | KeyPaddingMask, return_attention: bool
) -> tuple[Tensor, list]:
    """A self-attention stack in the stacks' convention: (output, weights per layer or [])."""
    if return_attention:
        return encoder(x, src_key_padding_mask=pad, return_attention=True)
    return encoder(x, src_key_padding_mask=pad), []


def layer_maps(
    name: str, weights: list[Tensor], queries: list[str], keys: list[str], query_valid: Tensor
) -> list[AttentionMap]:
    """Name a stack's per-layer weights ``name/layer{i}`` with the token labels of both axes."""
    return [AttentionMap(f"{name}/layer{i}", w, queries, keys, query_valid) for i, w in enumerate(weights)]


def or_missing(vector: Tensor, present: Tensor, missing: Tensor) -> Tensor:
    """``vector`` ``(B, D)`` where ``present`` ``(B, 1)``, else the learned ``missing`` ``(D,)``: a
    fused vector that would come from an absent modality alone is a learned stand-in, not zeros."""
    return torch.where(present, vector, missing)


def _ln(dim: int, on: bool) -> nn.Module:
    # Pre-norm stacks end with a LayerNorm (their last residual output is un-normalised).
    return nn.LayerNorm(dim) if on else nn.Identity()


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


class FusionModel(nn.Module):
    """Base: token embedding of every modality and an MLP head; subclasses fuse.

    ``forward(batch, return_attention=False)``: batch.x[m] ``(B, T_m, D_m)``, batch.mask[m]
    ``(B, T_m)`` -> ``(B, out_dim)``, plus a list of :class:`AttentionMap` when asked.
    """

    config_class: type[FusionConfig] = FusionConfig
    has_attention = True

    def __init__(self, config: FusionConfig) -> None:
        super().__init__()
        if not config.modalities:
            raise ValueError("modalities: expected at least one modality, got none")
        self.config = config
        self.specs = {m.name: m for m in config.modalities}
        self.labels = {m.name: token_labels(m) for m in config.modalities}  # axis labels of attention maps
        self.embed = ModalityEmbedding(config.modalities, config.d_model, config.dropout)
        # The head predicts standardised targets (an output of 150 ± 77 from a freshly initialised
        # network would take thousands of steps of size lr to reach); outputs are mapped back with
        # the training rows' statistics. Not persistent: they live in the config (config.json).
        mean, std = config.target_mean or [0.0] * config.out_dim, config.target_std or [1.0] * config.out_dim
        self.register_buffer("target_mean", torch.tensor(mean, dtype=torch.float32), persistent=False)
        self.register_buffer("target_std", torch.tensor(std, dtype=torch.float32), persistent=False)

    def forward(self, batch: Batch, return_attention: bool = False) -> Tensor | tuple[Tensor, list[AttentionMap]]:
        if self.training and self.config.modality_dropout > 0:
            batch = self._drop_modalities(batch)
        fused, maps = self.fuse(batch, return_attention)
        out = self.head(fused) * self.target_std + self.target_mean  # (B, out_dim)
        return (out, maps) if return_attention else out

    def fuse(self, batch: Batch, return_attention: bool) -> tuple[Tensor, list[AttentionMap]]:
        """The fused vector ``(B, fused_dim)`` and the attention maps (empty unless asked)."""
        raise NotImplementedError

    def _drop_modalities(self, batch: Batch) -> Batch:
        """Hide whole modalities at random (through the masks, as a missing modality is hidden),
        keeping at least one present modality per sample: the fusion learns not to lean on any
        single modality, and to cope when one is missing."""
        names = list(self.specs)
        present = torch.stack([batch.mask[n].any(dim=1) for n in names], dim=1)  # (B, M)
        keep = (torch.rand(present.shape, device=present.device) >= self.config.modality_dropout) & present
        keep = torch.where(keep.any(dim=1, keepdim=True), keep, present)  # never hide everything
        mask = {n: batch.mask[n] & keep[:, i : i + 1] for i, n in enumerate(names)}
        return Batch(batch.x, mask, batch.y)

    def _per_modality(self, h: dict[str, Tensor], mask: dict[str, Tensor], missing: Tensor) -> Tensor:
        """Each modality's mean over its valid tokens, concatenated: (B, M * d); an absent modality
        contributes its learned ``missing[i]`` vector."""
        return torch.cat(
            [
                or_missing(masked_mean(h[n], mask[n]), mask[n].any(dim=1, keepdim=True), missing[i])
                for i, n in enumerate(self.specs)
            ],
            dim=-1,
        )

    def _tokens(self, h: dict[str, Tensor], batch: Batch, names: list[str]) -> tuple[Tensor, Tensor, list[str]]:
        """Concatenate modalities along the token axis: (B, ΣT, d), valid (B, ΣT), labels."""
        x = torch.cat([h[n] for n in names], dim=1)
        valid = torch.cat([batch.mask[n] for n in names], dim=1)
        labels = [lab for n in names for lab in self.labels[n]]
        return x, valid, labels


class ConcatFusion(FusionModel):
    """Pool each modality over its valid tokens, concatenate, MLP. No attention.

    ``fuse``: embedded tokens ``(B, T_m, d_model)`` per modality -> ``(B, M * d_model)`` (an
    absent modality's part is its learned "missing" vector) -> head ``(B, out_dim)``."""

    config_class = ConcatConfig
    has_attention = False

    def __init__(self, config: ConcatConfig) -> None:
        super().__init__(config)
        m, d = len(config.modalities), config.d_model
        self.missing = nn.Parameter(torch.zeros(m, d))  # stand-ins for absent modalities
        self.head = MLPHead(m * d, config.hidden, config.out_dim, config.dropout)

    def fuse(self, batch: Batch, return_attention: bool) -> tuple[Tensor, list[AttentionMap]]:
        return self._per_modality(self.embed(batch), batch.mask, self.missing), []  # (B, M * d)


class SelfAttentionFusion(FusionModel):
    """Self-attention across all modalities' tokens (Transformer encoder), then aggregation:
    ``mean`` / ``attention`` / ``cls`` pool all tokens into one d-vector; ``modality`` pools each
    modality's tokens and concatenates the M vectors (the attention-refined version of ``concat``).

    ``fuse``: all tokens ``(B, T, d_model)`` with ``T = sum_m T_m`` (+1 for ``cls``) through the
    encoder -> ``(B, d_model)``, or ``(B, M * d_model)`` for ``modality`` pooling; one
    :class:`AttentionMap` ``(B, H, T, T)`` per layer."""

    config_class = SelfFusionConfig

    def __init__(self, config: SelfFusionConfig) -> None:
        super().__init__(config)
        d, m = config.d_model, len(config.modalities)
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.02) if config.pooling == "cls" else None
        self.encoder = TransformerEncoder(
            d,
            config.nhead,
            config.num_layers,
            config.ff,
            config.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=config.norm_first,
        )
        if config.pooling == "modality":
            self.pool, self.missing = None, nn.Parameter(torch.zeros(m, d))
            fused = m * d
        else:
            self.pool, fused = Pooling(config.pooling, d), d
        self.head = MLPHead(fused, config.hidden, config.out_dim, config.dropout)

    def fuse(self, batch: Batch, return_attention: bool) -> tuple[Tensor, list[AttentionMap]]:
        x, valid, labels = self._tokens(self.embed(batch), batch, list(self.specs))  # (B, T, d), (B, T)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
            valid = torch.cat([valid.new_ones(x.shape[0], 1), valid], dim=1)
            labels = ["[CLS]", *labels]
        x, weights = encode(self.encoder, x, ~valid, return_attention)
        maps = layer_maps("self", weights, labels, labels, valid)
        if self.pool is None:
            lengths = [self.specs[n].length for n in self.specs]
            return self._per_modality(dict(zip(self.specs, x.split(lengths, dim=1))), batch.mask, self.missing), maps
        return self.pool(x, valid), maps


class CrossModalFusion(FusionModel):
    """The query modality's tokens attend to the context modalities' tokens, layer after layer.

    ``fuse``: query tokens ``(B, T_q, d_model)`` attend to context tokens ``(B, T_c, d_model)``
    -> pooled over the valid query tokens ``(B, d_model)``; one :class:`AttentionMap`
    ``(B, H, T_q, T_c)`` per layer."""

    config_class = CrossFusionConfig

    def __init__(self, config: CrossFusionConfig) -> None:
        super().__init__(config)
        d = config.d_model
        self.layers = CrossStack(config)
        self.norm = _ln(d, config.norm_first)
        self.pool = Pooling(config.pooling, d)
        self.missing = nn.Parameter(torch.zeros(d))  # the fused vector when the query modality is absent
        self.head = MLPHead(d, config.hidden, config.out_dim, config.dropout)

    def fuse(self, batch: Batch, return_attention: bool) -> tuple[Tensor, list[AttentionMap]]:
        cfg = self.config
        h = self.embed(batch)
        q, q_valid, q_labels = self._tokens(h, batch, [cfg.query])  # (B, Tq, d)
        ctx, ctx_valid, ctx_labels = self._tokens(h, batch, cfg.context)  # (B, Tc, d)
        q, weights = self.layers(q, ctx, ~ctx_valid, return_attention)
        maps = layer_maps(f"cross:{cfg.query}->{'+'.join(cfg.context)}", weights, q_labels, ctx_labels, q_valid)
        fused = self.pool(self.norm(q), q_valid)  # (B, d)
        return or_missing(fused, q_valid.any(dim=1, keepdim=True), self.missing), maps


class BiCrossFusion(FusionModel):
    """a queries b and b queries a; the two outputs are concatenated along the token axis and
    aggregated over their valid tokens (text <-> video).

    ``fuse``: ``a`` ``(B, T_a, d_model)`` and ``b`` ``(B, T_b, d_model)`` -> tokens
    ``(B, T_a + T_b, d_model)`` -> ``(B, d_model)``; per layer the maps ``(B, H, T_a, T_b)`` and
    ``(B, H, T_b, T_a)``."""

    config_class = BiCrossFusionConfig

    def __init__(self, config: BiCrossFusionConfig) -> None:
        super().__init__(config)
        d = config.d_model
        self.layers = BiCrossStack(config)
        self.norm = _ln(d, config.norm_first)
        self.pool = Pooling(config.pooling, d)
        self.head = MLPHead(d, config.hidden, config.out_dim, config.dropout)

    def fuse(self, batch: Batch, return_attention: bool) -> tuple[Tensor, list[AttentionMap]]:
        cfg = self.config
        h = self.embed(batch)
        a, a_valid, a_labels = self._tokens(h, batch, [cfg.query])  # (B, Ta, d)
        b, b_valid, b_labels = self._tokens(h, batch, cfg.context)  # (B, Tb, d)
        a, b, w_ab, w_ba = self.layers(a, b, ~a_valid, ~b_valid, return_attention)
        a_name, b_name = cfg.query, "+".join(cfg.context)
        ab = layer_maps(f"cross:{a_name}->{b_name}", w_ab, a_labels, b_labels, a_valid)
        ba = layer_maps(f"cross:{b_name}->{a_name}", w_ba, b_labels, a_labels, b_valid)
        maps = [m for pair in zip(ab, ba) for m in pair]  # layer by layer, a->b before b->a
        tokens = self.norm(torch.cat([a, b], dim=1))  # (B, Ta + Tb, d)
        return self.pool(tokens, torch.cat([a_valid, b_valid], dim=1)), maps


class MulTFusion(FusionModel):
    """MulT (Tsai et al., 2019): for each target modality, one cross-modal Transformer per source
    modality; the target's outputs are concatenated along features, refined by self-attention,
    pooled; all targets are concatenated for the head.

    ``fuse``: for each target t, ``(B, T_t, d_model)`` from each of the M-1 sources, concatenated
    ``(B, T_t, (M-1) d_model)``, self-attention, pooled; all targets ``(B, M (M-1) d_model)``."""

    config_class = MulTConfig

    def __init__(self, config: MulTConfig) -> None:
        super().__init__(config)
        d, names = config.d_model, config.names()
        wide = (len(names) - 1) * d

        # cross[target][source]: target's tokens query source's tokens.
        self.cross = nn.ModuleDict({t: nn.ModuleDict({s: CrossStack(config) for s in names if s != t}) for t in names})
        self.cross_norm = nn.ModuleDict({t: _ln(d, config.norm_first) for t in names})
        self.self_attn = nn.ModuleDict(
            {
                t: TransformerEncoder(
                    wide,
                    config.nhead,
                    config.self_depth,
                    config.dim_feedforward or 4 * wide,
                    config.dropout,
                    "gelu",
                    batch_first=True,
                    norm_first=config.norm_first,
                )
                for t in names
            }
        )
        self.missing = nn.Parameter(torch.zeros(len(names), wide))  # a target modality that is absent
        self.head = MLPHead(len(names) * wide, config.hidden, config.out_dim, config.dropout)

    def fuse(self, batch: Batch, return_attention: bool) -> tuple[Tensor, list[AttentionMap]]:
        h = self.embed(batch)
        pads = {n: padding(~batch.mask[n]) for n in self.specs}  # each source's keys: once for all targets
        fused, maps = [], []
        for j, (t, sources) in enumerate(self.cross.items()):
            t_valid, t_labels = batch.mask[t], self.labels[t]
            per_source = []
            for s, stack in sources.items():
                x, weights = stack(h[t], h[s], pads[s], return_attention)  # (B, T_t, d)
                maps += layer_maps(f"cross:{t}->{s}", weights, t_labels, self.labels[s], t_valid)
                per_source.append(self.cross_norm[t](x))
            x, weights = encode(self.self_attn[t], torch.cat(per_source, dim=-1), pads[t], return_attention)
            maps += layer_maps(f"self:{t}", weights, t_labels, t_labels, t_valid)  # x: (B, T_t, (M-1) d)
            fused.append(or_missing(masked_mean(x, t_valid), t_valid.any(dim=1, keepdim=True), self.missing[j]))
        return torch.cat(fused, dim=-1), maps  # (B, M (M-1) d)


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

FUSIONS: dict[str, type[FusionModel]] = {
    "concat": ConcatFusion,
    "self": SelfAttentionFusion,
    "cross": CrossModalFusion,
    "bicross": BiCrossFusion,
    "mult": MulTFusion,
}


def config_from_dict(fusion: str, values: dict) -> FusionConfig:
    """Build ``fusion``'s config from a dict (e.g. a saved config.json); unknown keys are an error."""
    config_class = _model_class(fusion).config_class
    known = [f.name for f in dataclasses.fields(config_class)]
    unknown = [k for k in values if k not in known]
    if unknown:
        settings = ", ".join(o.name for o in options_of(config_class))
        raise ValueError(f"{unknown[0]}: the '{fusion}' fusion has no such setting (its settings: {settings})")
    return config_class(**values)


def build_model(fusion: str, config: FusionConfig | dict) -> FusionModel:
    """The fusion model named ``fusion`` (see :data:`FUSIONS`) for ``config``."""
    if isinstance(config, dict):
        config = config_from_dict(fusion, config)
    return _model_class(fusion)(config)


def _model_class(fusion: str) -> type[FusionModel]:
    if fusion not in FUSIONS:
        raise ValueError(f"fusion: expected one of {sorted(FUSIONS)}, got {fusion!r}")
    return FUSIONS[fusion]
