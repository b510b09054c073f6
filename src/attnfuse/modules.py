"""Building blocks shared by the fusion models: token embedding, pooling, prediction head, and the
named attention maps a model returns when asked where it looked.

Conventions used throughout the fusion code: everything is batch-first, ``(B, T, d_model)``;
a token mask is ``(B, T)`` bool with **True = valid** (the data layer's convention); attention layers
take its negation as ``key_padding_mask`` (True = ignore), as torch does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .data.dataset import Batch, ModalitySpec
from .nn.dropout import Dropout
from .nn.layers import sinusoidal_table

__all__ = ["AttentionMap", "ModalityEmbedding", "Pooling", "MLPHead", "masked_mean", "token_labels"]


@dataclass
class AttentionMap:
    """Per-head attention weights of one block, with the token labels of both axes.

    weights: ``(B, H, L, S)``; ``query_tokens`` has L labels and ``key_tokens`` S labels, each
    ``"modality"`` for a one-token modality or ``"modality[t]"`` for step t of a sequence.
    query_valid: ``(B, L)`` bool, True for real query tokens (padding and absent modalities are
    False: their rows are not meaningful). Keys that were masked have weight exactly 0.
    """

    name: str
    weights: Tensor
    query_tokens: list[str]
    key_tokens: list[str]
    query_valid: Tensor


def token_labels(spec: ModalitySpec) -> list[str]:
    """Axis labels for a modality's tokens."""
    return [f"{spec.name}[{t}]" for t in range(spec.length)] if spec.is_sequence else [spec.name]


def masked_mean(x: Tensor, valid: Tensor) -> Tensor:
    """Mean over the valid tokens: x ``(B, T, D)``, valid ``(B, T)`` bool -> ``(B, D)``.

    A sample with no valid token gets 0 (the sum is empty; the count is clamped to 1).
    """
    w = valid.unsqueeze(-1).to(x.dtype)  # (B, T, 1)
    return (x * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)


class ModalityEmbedding(nn.Module):
    """Projects each modality to ``d_model`` and marks where each token comes from.

    token = Linear_m(x_m[t]) + type_m (+ PE[t] for sequence modalities)

    The learned modality-type embedding tells attention which modality a token belongs to (the
    one-token modalities would otherwise be indistinguishable once projected); the sinusoidal
    positional encoding gives sequence steps their order.

    Input: a :class:`Batch` (``x[m]`` ``(B, T_m, D_m)``). Output: dict ``m -> (B, T_m, d_model)``.
    """

    def __init__(self, modalities: list[ModalitySpec], d_model: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.specs = {m.name: m for m in modalities}
        self.proj = nn.ModuleDict({m.name: nn.Linear(m.dim, d_model) for m in modalities})
        self.type_embedding = nn.Parameter(torch.randn(len(modalities), d_model) * 0.02)
        max_len = max([m.length for m in modalities if m.is_sequence], default=1)
        self.register_buffer("pe", sinusoidal_table(max_len, d_model), persistent=False)
        self.dropout = Dropout(dropout)  # attnfuse's: the same dropout, a cheaper mask on the CPU

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        out = {}
        for i, (name, spec) in enumerate(self.specs.items()):
            x = batch.x[name]
            if x.dim() != 3 or x.shape[-1] != spec.dim:
                raise ValueError(f"modality '{name}': expected shape (B, T, {spec.dim}), got {tuple(x.shape)}")
            h = self.proj[name](x) + self.type_embedding[i]  # (B, T, d_model)
            if spec.is_sequence:
                h = h + self.pe[: x.shape[1]]
            out[name] = self.dropout(h)
        return out


class Pooling(nn.Module):
    """Aggregates a token sequence into one vector, ignoring invalid tokens.

    * ``mean``: the mean of the valid tokens;
    * ``attention``: a learned query attends over the valid tokens (a softmax-weighted mean);
    * ``cls``: the first token, for models that prepend a [CLS] token.

    Shapes: x ``(B, T, D)``, valid ``(B, T)`` -> ``(B, D)``.
    """

    KINDS = ("mean", "attention", "cls")

    def __init__(self, kind: str, dim: int) -> None:
        super().__init__()
        if kind not in self.KINDS:
            raise ValueError(f"pooling: expected one of {self.KINDS}, got {kind!r}")
        self.kind = kind
        self.score = nn.Linear(dim, 1) if kind == "attention" else None

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        if self.kind == "cls":
            return x[:, 0]
        if self.kind == "mean":
            return masked_mean(x, valid)
        scores = self.score(x).squeeze(-1).masked_fill(~valid, float("-inf"))  # (B, T)
        # A sample without valid tokens would be all -inf: give it uniform scores, then zero it.
        none = ~valid.any(dim=1, keepdim=True)
        weights = torch.softmax(scores.masked_fill(none, 0.0), dim=1).masked_fill(none, 0.0)
        return torch.einsum("bt,btd->bd", weights, x)


class MLPHead(nn.Module):
    """``LayerNorm -> Linear -> GELU -> Dropout -> Linear``: fused vector ``(B, in_dim)`` ->
    ``(B, out_dim)`` (class logits, or regression outputs)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), nn.GELU(), Dropout(dropout), nn.Linear(hidden, out_dim)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
