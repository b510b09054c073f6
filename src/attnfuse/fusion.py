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
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .data.dataset import Batch, ModalitySpec
from .modules import AttentionMap, MLPHead, ModalityEmbedding, Pooling, masked_mean, token_labels
from .nn.cross import BidirectionalCrossAttention, CrossAttention
from .nn.layers import TransformerEncoder

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
# Configs
# ---------------------------------------------------------------------------------------------


@dataclass
class FusionConfig:
    """What every fusion model needs: the modalities it reads, the output size and the width."""

    modalities: list[ModalitySpec]
    out_dim: int  # number of classes, or of regression targets
    d_model: int = 64
    dropout: float = 0.1
    head_hidden: int | None = None  # hidden size of the MLP head (default 2 * d_model)
    modality_dropout: float = 0.0  # training only: hide each modality of a sample with this probability

    def __post_init__(self) -> None:
        self.modalities = [m if isinstance(m, ModalitySpec) else ModalitySpec(**m) for m in self.modalities]
        if not self.modalities:
            raise ValueError("modalities: expected at least one modality, got none")
        if self.out_dim < 1:
            raise ValueError(f"out_dim: expected >= 1, got {self.out_dim}")
        if self.d_model < 1:
            raise ValueError(f"d_model: expected >= 1, got {self.d_model}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: expected a value in [0, 1), got {self.dropout}")
        if not 0.0 <= self.modality_dropout < 1.0:
            raise ValueError(f"modality_dropout: expected a value in [0, 1), got {self.modality_dropout}")

    @property
    def hidden(self) -> int:
        return self.head_hidden or 2 * self.d_model

    def names(self) -> list[str]:
        return [m.name for m in self.modalities]


@dataclass
class ConcatConfig(FusionConfig):
    """``concat``: no attention at all."""


@dataclass
class SelfFusionConfig(FusionConfig):
    """``self``: one Transformer encoder over the tokens of all modalities."""

    nhead: int = 4
    num_layers: int = 2
    dim_feedforward: int | None = None  # default 4 * d_model, the paper's ratio
    norm_first: bool = True  # pre-norm: stabler on small data sets than the paper's post-norm
    pooling: str = "mean"  # see POOLINGS: "mean" (the notes), "attention", "cls", "modality"

    POOLINGS = ("mean", "attention", "cls", "modality")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.nhead < 1:  # checked first: `d_model % 0` would be a ZeroDivisionError
            raise ValueError(f"heads: expected >= 1, got {self.nhead}")
        if self.d_model % self.nhead != 0:
            raise ValueError(f"d_model: expected a multiple of heads={self.nhead}, got {self.d_model}")
        if self.num_layers < 1:
            raise ValueError(f"layers: expected >= 1, got {self.num_layers}")
        if self.pooling not in self.POOLINGS:
            raise ValueError(f"pooling: expected one of {self.POOLINGS} for this fusion, got {self.pooling!r}")

    @property
    def ff(self) -> int:
        return self.dim_feedforward or 4 * self.d_model


@dataclass
class CrossFusionConfig(SelfFusionConfig):
    """``cross``: the ``query`` modality's tokens attend to the ``context`` modalities' tokens.

    Defaults: the first modality queries all the others (for text/audio/vision: text queries)."""

    query: str | None = None
    context: list[str] | None = None

    POOLINGS = ("mean", "attention")

    def __post_init__(self) -> None:
        super().__post_init__()
        names = self.names()
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

    self_layers: int = 3

    POOLINGS = ("mean",)

    def __post_init__(self) -> None:
        super().__post_init__()
        m = len(self.modalities)
        if m < 2:
            raise ValueError(f"modalities: mult needs at least 2 modalities, got {self.names()}")


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
        self.config = config
        self.specs = {m.name: m for m in config.modalities}
        self.labels = {m.name: token_labels(m) for m in config.modalities}  # axis labels of attention maps
        self.embed = ModalityEmbedding(config.modalities, config.d_model, config.dropout)

    def forward(self, batch: Batch, return_attention: bool = False) -> Tensor | tuple[Tensor, list[AttentionMap]]:
        if self.training and self.config.modality_dropout > 0:
            batch = self._drop_modalities(batch)
        maps: list[AttentionMap] | None = [] if return_attention else None
        out = self.head(self.fuse(batch, maps))
        return (out, maps) if return_attention else out

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

    def fuse(self, batch: Batch, maps: list[AttentionMap] | None) -> Tensor:
        """(B, fused_dim); appends attention maps to ``maps`` when it is a list."""
        raise NotImplementedError

    def _per_modality(self, h: dict[str, Tensor], mask: dict[str, Tensor], missing: Tensor) -> Tensor:
        """Each modality's mean over its valid tokens, concatenated: (B, M * d). An absent
        modality is represented by its learned ``missing[i]`` vector, not by zeros."""
        pooled = []
        for i, name in enumerate(self.specs):
            valid = mask[name]
            present = valid.any(dim=1, keepdim=True)  # (B, 1)
            pooled.append(torch.where(present, masked_mean(h[name], valid), missing[i]))
        return torch.cat(pooled, dim=-1)

    def _tokens(self, h: dict[str, Tensor], batch: Batch, names: list[str]) -> tuple[Tensor, Tensor, list[str]]:
        """Concatenate modalities along the token axis: (B, ΣT, d), valid (B, ΣT), labels."""
        x = torch.cat([h[n] for n in names], dim=1)
        valid = torch.cat([batch.mask[n] for n in names], dim=1)
        labels = [lab for n in names for lab in self.labels[n]]
        return x, valid, labels


def _cross_stack(config: SelfFusionConfig, block: type[nn.Module] = CrossAttention) -> nn.ModuleList:
    """``num_layers`` cross-attention blocks of width d_model (GELU feed-forward, batch-first)."""
    d = config.d_model
    return nn.ModuleList(
        block(d, d, config.nhead, config.ff, config.dropout, "gelu", batch_first=True, norm_first=config.norm_first)
        for _ in range(config.num_layers)
    )


def _ln(dim: int, on: bool) -> nn.Module:
    # Pre-norm stacks end with a LayerNorm (their last residual output is un-normalised).
    return nn.LayerNorm(dim) if on else nn.Identity()


class ConcatFusion(FusionModel):
    """Pool each modality over its valid tokens, concatenate, MLP. No attention."""

    config_class = ConcatConfig
    has_attention = False

    def __init__(self, config: ConcatConfig) -> None:
        super().__init__(config)
        m, d = len(config.modalities), config.d_model
        # An absent modality is represented by a learned vector, not by zeros.
        self.missing = nn.Parameter(torch.zeros(m, d))
        self.head = MLPHead(m * d, config.hidden, config.out_dim, config.dropout)

    def fuse(self, batch: Batch, maps: list[AttentionMap] | None) -> Tensor:
        return self._per_modality(self.embed(batch), batch.mask, self.missing)  # (B, M * d)


class SelfAttentionFusion(FusionModel):
    """Self-attention across all modalities' tokens (Transformer encoder), then aggregation:
    ``mean`` / ``attention`` / ``cls`` pool all tokens into one d-vector; ``modality`` pools each
    modality's tokens and concatenates the M vectors (the attention-refined version of ``concat``)."""

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

    def fuse(self, batch: Batch, maps: list[AttentionMap] | None) -> Tensor:
        x, valid, labels = self._tokens(self.embed(batch), batch, list(self.specs))  # (B, T, d), (B, T)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
            valid = torch.cat([valid.new_ones(x.shape[0], 1), valid], dim=1)
            labels = ["[CLS]"] + labels
        if maps is None:
            x = self.encoder(x, src_key_padding_mask=~valid)
        else:
            x, weights = self.encoder(x, src_key_padding_mask=~valid, return_attention=True)
            maps += [AttentionMap(f"self/layer{i}", w, labels, labels, valid) for i, w in enumerate(weights)]
        if self.pool is None:
            lengths = [self.specs[n].length for n in self.specs]
            return self._per_modality(dict(zip(self.specs, x.split(lengths, dim=1))), batch.mask, self.missing)
        return self.pool(x, valid)


class CrossModalFusion(FusionModel):
    """The query modality's tokens attend to the context modalities' tokens, layer after layer."""

    config_class = CrossFusionConfig

    def __init__(self, config: CrossFusionConfig) -> None:
        super().__init__(config)
        d = config.d_model
        self.layers = _cross_stack(config)
        self.norm = _ln(d, config.norm_first)
        self.pool = Pooling(config.pooling, d)
        self.missing = nn.Parameter(torch.zeros(d))  # the fused vector when the query modality is absent
        self.head = MLPHead(d, config.hidden, config.out_dim, config.dropout)

    def fuse(self, batch: Batch, maps: list[AttentionMap] | None) -> Tensor:
        cfg = self.config
        h = self.embed(batch)
        q, q_valid, q_labels = self._tokens(h, batch, [cfg.query])
        ctx, ctx_valid, ctx_labels = self._tokens(h, batch, cfg.context)
        name = f"cross:{cfg.query}->{'+'.join(cfg.context)}"
        for i, layer in enumerate(self.layers):
            if maps is None:
                q = layer(q, ctx, ~ctx_valid)
            else:
                q, w = layer(q, ctx, ~ctx_valid, need_weights=True)
                maps.append(AttentionMap(f"{name}/layer{i}", w, q_labels, ctx_labels, q_valid))
        return torch.where(q_valid.any(dim=1, keepdim=True), self.pool(self.norm(q), q_valid), self.missing)


class BiCrossFusion(FusionModel):
    """a queries b and b queries a; the two outputs are concatenated along the token axis and
    aggregated over their valid tokens (the notes' text <-> video example)."""

    config_class = BiCrossFusionConfig

    def __init__(self, config: BiCrossFusionConfig) -> None:
        super().__init__(config)
        d = config.d_model
        self.layers = _cross_stack(config, BidirectionalCrossAttention)
        self.norm = _ln(d, config.norm_first)
        self.pool = Pooling(config.pooling, d)
        self.head = MLPHead(d, config.hidden, config.out_dim, config.dropout)

    def fuse(self, batch: Batch, maps: list[AttentionMap] | None) -> Tensor:
        cfg = self.config
        h = self.embed(batch)
        a, a_valid, a_labels = self._tokens(h, batch, [cfg.query])
        b, b_valid, b_labels = self._tokens(h, batch, cfg.context)
        a_name, b_name = cfg.query, "+".join(cfg.context)
        for i, layer in enumerate(self.layers):
            if maps is None:
                a, b = layer(a, b, ~a_valid, ~b_valid)
            else:
                a, b, w_ab, w_ba = layer(a, b, ~a_valid, ~b_valid, need_weights=True)
                maps.append(AttentionMap(f"cross:{a_name}->{b_name}/layer{i}", w_ab, a_labels, b_labels, a_valid))
                maps.append(AttentionMap(f"cross:{b_name}->{a_name}/layer{i}", w_ba, b_labels, a_labels, b_valid))
        tokens = self.norm(torch.cat([a, b], dim=1))  # (B, Ta + Tb, d)
        return self.pool(tokens, torch.cat([a_valid, b_valid], dim=1))


class MulTFusion(FusionModel):
    """MulT (Tsai et al., 2019): for each target modality, one cross-modal Transformer per source
    modality; the target's outputs are concatenated along features, refined by self-attention,
    pooled; all targets are concatenated for the head."""

    config_class = MulTConfig

    def __init__(self, config: MulTConfig) -> None:
        super().__init__(config)
        d, names = config.d_model, config.names()
        wide = (len(names) - 1) * d

        # cross[target][source]: target's tokens query source's tokens.
        self.cross = nn.ModuleDict(
            {t: nn.ModuleDict({s: _cross_stack(config) for s in names if s != t}) for t in names}
        )
        self.cross_norm = nn.ModuleDict({t: _ln(d, config.norm_first) for t in names})
        self.self_attn = nn.ModuleDict(
            {
                t: TransformerEncoder(
                    wide,
                    config.nhead,
                    config.self_layers,
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

    def fuse(self, batch: Batch, maps: list[AttentionMap] | None) -> Tensor:
        h = self.embed(batch)
        fused = []
        for j, (t, sources) in enumerate(self.cross.items()):
            t_valid, t_labels = batch.mask[t], self.labels[t]
            per_source = []
            for s, stack in sources.items():
                x, s_pad = h[t], ~batch.mask[s]
                for i, layer in enumerate(stack):
                    if maps is None:
                        x = layer(x, h[s], s_pad)
                    else:
                        x, w = layer(x, h[s], s_pad, need_weights=True)
                        maps.append(AttentionMap(f"cross:{t}->{s}/layer{i}", w, t_labels, self.labels[s], t_valid))
                per_source.append(self.cross_norm[t](x))
            x = torch.cat(per_source, dim=-1)  # (B, T_t, (M-1) d)
            if maps is None:
                x = self.self_attn[t](x, src_key_padding_mask=~t_valid)
            else:
                x, ws = self.self_attn[t](x, src_key_padding_mask=~t_valid, return_attention=True)
                maps += [AttentionMap(f"self:{t}/layer{i}", w, t_labels, t_labels, t_valid) for i, w in enumerate(ws)]
            fused.append(torch.where(t_valid.any(dim=1, keepdim=True), masked_mean(x, t_valid), self.missing[j]))
        return torch.cat(fused, dim=-1)  # (B, M (M-1) d)


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
    model_class = _model_class(fusion)
    known = {f.name for f in dataclasses.fields(model_class.config_class)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"config for fusion '{fusion}': unknown fields {unknown}; known: {sorted(known)}")
    return model_class.config_class(**values)


def build_model(fusion: str, config: FusionConfig | dict) -> FusionModel:
    """The fusion model named ``fusion`` (see :data:`FUSIONS`) for ``config``."""
    if isinstance(config, dict):
        config = config_from_dict(fusion, config)
    return _model_class(fusion)(config)


def _model_class(fusion: str) -> type[FusionModel]:
    if fusion not in FUSIONS:
        raise ValueError(f"fusion: expected one of {sorted(FUSIONS)}, got {fusion!r}")
    return FUSIONS[fusion]
