"""An ensemble of fusion models of one kind, trained from different seeds, whose outputs are averaged.

Averaging K independently trained networks cancels much of the variance of any one of them
(which initialisation, which mini-batch order, which epoch early stopping kept) and is known to
help most where that variance is largest: on small data (Lakshminarayanan et al., "Simple and
Scalable Predictive Uncertainty Estimation using Deep Ensembles", NeurIPS 2017). ``attnfuse
train --ensemble K`` trains K members on the same training rows and keeps them in one model
directory (their weights under ``members.<k>.``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .checks import check_int
from .data import Batch
from .fusion import FUSIONS, FusionConfig, FusionModel, build_model
from .heads import build_head
from .modules import AttentionMap

__all__ = [
    "Ensemble",
    "EnsembleSpec",
    "WeightedEnsemble",
    "build_ensemble",
    "build_recorded",
    "first_member",
    "mix",
    "weighted_record",
]


class Ensemble(nn.Module):
    """The mean of the members' outputs: ``forward(batch)`` -> ``(B, out_dim)``.

    For regression that is the mean prediction; for classification the mean of the logits, i.e.
    class probabilities proportional to the geometric mean of the members' probabilities. With
    ``return_attention=True`` it also returns every member's attention maps, named
    ``member<k>/<map name>``.

    ``config``, ``has_attention``, ``specs`` and ``labels`` are the members' (they are all built
    from one config), so the ensemble is saved, loaded and explained like a single model."""

    def __init__(self, members: list[FusionModel]) -> None:
        super().__init__()
        if not members:
            raise ValueError("members: expected at least one model, got none")
        kinds = {type(m) for m in members}
        if len(kinds) > 1:
            raise ValueError(f"members: expected models of one fusion, got {sorted(k.__name__ for k in kinds)}")
        self.members = nn.ModuleList(members)

    # All members are built from one config: the ensemble is saved, loaded and explained as one model.
    config: FusionConfig = property(lambda self: self.members[0].config)  # type: ignore[assignment]
    has_attention: bool = property(lambda self: self.members[0].has_attention)  # type: ignore[assignment]
    specs: dict = property(lambda self: self.members[0].specs)  # type: ignore[assignment]
    labels: dict = property(lambda self: self.members[0].labels)  # type: ignore[assignment]

    def forward(self, batch: Batch, return_attention: bool = False) -> Tensor | tuple[Tensor, list[AttentionMap]]:
        if not return_attention:
            return torch.stack([m(batch) for m in self.members]).mean(dim=0)  # (K, B, out) -> (B, out)
        outs, maps = [], []
        for k, member in enumerate(self.members):
            out, member_maps = member(batch, return_attention=True)
            outs.append(out)
            maps += [
                AttentionMap(f"member{k}/{m.name}", m.weights, m.query_tokens, m.key_tokens, m.query_valid)
                for m in member_maps
            ]
        return torch.stack(outs).mean(dim=0), maps


def build_ensemble(fusion: str, config: FusionConfig | dict, size: int = 1) -> FusionModel | Ensemble:
    """``size`` untrained models of ``fusion`` for ``config`` as an :class:`Ensemble`; for
    ``size`` 1, the plain model (a model directory without an ensemble holds exactly that)."""
    size = check_int("ensemble", size)
    if size == 1:
        return build_model(fusion, config)
    return Ensemble([build_model(fusion, config) for _ in range(size)])


class WeightedEnsemble(nn.Module):
    """A weighted average of fitted models of any kind: ``forward(batch)`` -> ``(B, out_dim)``.

    ``parts``: name -> model, each mapping a standardised :class:`~attnfuse.data.Batch` to
    ``(B, out_dim)`` outputs (a fusion model, an :class:`Ensemble`, a baseline as a module of
    :mod:`attnfuse.heads`); ``weights``: name -> weight >= 0, summing to 1 (the weights of
    :func:`attnfuse.stacking.select_ensemble`, Caruana et al., 2004). ``primary``: the fusion
    part whose config, modalities and attention the ensemble shows (the fusion of largest weight).

    Regression: ``sum_m w_m y_m``, the weighted mean of the values. Classification: the mixture
    ``p = sum_m w_m softmax(z_m)`` of the parts' class probabilities (a linear pool: what ensemble
    selection scored), returned as logits ``log p`` (``softmax(log p) = p``, so every consumer of
    logits reads the mixture's probabilities). A part of weight 0 is kept (the primary fusion may
    carry nothing when a baseline wins) but not run."""

    def __init__(self, parts: dict[str, nn.Module], weights: dict[str, float], task: str, primary: str) -> None:
        super().__init__()
        if set(weights) != set(parts):
            raise ValueError(f"weights: expected one weight per part {sorted(parts)}, got {sorted(weights)}")
        if task not in ("classification", "regression"):
            raise ValueError(f"task: expected 'classification' or 'regression', got {task!r}")
        if primary not in parts:
            raise ValueError(f"primary: expected one of the parts {sorted(parts)}, got {primary!r}")
        total = sum(weights.values())
        if min(weights.values()) < 0 or abs(total - 1) > 1e-6:
            raise ValueError(f"weights: expected weights >= 0 summing to 1, got {weights}")
        self.parts = nn.ModuleDict(parts)
        self.weights = {name: float(w) for name, w in weights.items()}  # plain numbers: config.json holds them
        self.task, self.primary = task, primary

    # Saved, loaded and explained as its primary fusion (the weights file holds every part).
    config: FusionConfig = property(lambda self: self.parts[self.primary].config)  # type: ignore[assignment]
    has_attention: bool = property(lambda self: self.parts[self.primary].has_attention)  # type: ignore[assignment]
    specs: dict = property(lambda self: self.parts[self.primary].specs)  # type: ignore[assignment]
    labels: dict = property(lambda self: self.parts[self.primary].labels)  # type: ignore[assignment]

    def forward(self, batch: Batch, return_attention: bool = False) -> Tensor | tuple[Tensor, list[AttentionMap]]:
        maps: list[AttentionMap] = []
        outputs = {}
        for name, weight in self.weights.items():
            if weight == 0:
                continue
            if return_attention and name == self.primary:
                outputs[name], maps = self.parts[name](batch, return_attention=True)
            else:
                outputs[name] = self.parts[name](batch)  # (B, out_dim)
        total = mix(outputs, self.weights, self.task)
        if return_attention:
            if self.weights[self.primary] == 0:  # shown, though it carries nothing
                maps = self.parts[self.primary](batch, return_attention=True)[1]
            return total, maps
        return total


def mix(outputs: dict[str, Tensor], weights: dict[str, float], task: str) -> Tensor:
    """The outputs ``(B, out_dim)`` of a :class:`WeightedEnsemble` from its parts' ``outputs``
    (name -> ``(B, out_dim)``; parts of weight 0 may be left out): the weighted mean of the values,
    or the logits ``log sum_m w_m softmax(z_m)`` of the mixture of the class probabilities."""
    total = None
    for name, out in outputs.items():
        if task == "classification":
            out = torch.softmax(out.float(), dim=-1)  # (B, C) probabilities: the pool averages these
        total = weights[name] * out if total is None else total + weights[name] * out
    if task == "classification":
        total = torch.log(total.clamp_min(torch.finfo(total.dtype).tiny))  # (B, C) logits of the mixture
    return total


def first_member(model: FusionModel | Ensemble | WeightedEnsemble) -> FusionModel:
    """The model itself, or an ensemble's first member (a weighted ensemble's: its primary
    fusion's): the one whose attention is shown, and whose target statistics (the same in every
    member) define the regression loss's units."""
    if isinstance(model, WeightedEnsemble):
        model = model.parts[model.primary]
    return model.members[0] if isinstance(model, Ensemble) else model


@dataclass(frozen=True)
class EnsembleSpec:
    """How many models of one candidate are trained and averaged (``--ensemble``), with which seeds:
    the one place that knows the ensemble's size. It is the training setting ``ensemble``
    (``config.json`` ``"train"``, a checkpoint's record of a finished model: :meth:`to_dict`,
    :meth:`from_dict`); a model directory's weights are read by :meth:`build`."""

    size: int = 1

    def __post_init__(self) -> None:
        check_int("ensemble", self.size)

    def seed(self, seed: int, member: int) -> int:
        """The seed of ``member`` of an ensemble trained with ``seed``: member 0 is the single model
        of that seed; the others draw from ``SeedSequence([seed, member])``, so no two runs
        (``--repeat`` seeds seed, seed+1, ...) share a member."""
        if member == 0:
            return seed
        return int(np.random.SeedSequence([seed, member]).generate_state(1)[0] % 2**31)

    def build(self, fusion: str, config: FusionConfig | dict) -> FusionModel | Ensemble:
        """The untrained model of ``fusion`` for ``config`` (:func:`build_ensemble`)."""
        return build_ensemble(fusion, config, self.size)

    def combine(self, members: list[FusionModel]) -> FusionModel | Ensemble:
        """The trained members as one model: the model itself when there is one."""
        if len(members) != self.size:
            raise ValueError(f"members: expected {self.size} models, got {len(members)}")
        return members[0] if self.size == 1 else Ensemble(members)

    @classmethod
    def of(cls, model: FusionModel | Ensemble) -> EnsembleSpec:
        """The spec of a built model: an :class:`Ensemble`'s member count, else 1."""
        return cls(len(model.members) if isinstance(model, Ensemble) else 1)

    def to_dict(self) -> dict[str, int]:
        return {"ensemble": self.size}

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> EnsembleSpec:
        """From a record holding ``"ensemble"`` (absent: a single model)."""
        return cls(record.get("ensemble", 1))


def _fusion_of(model: nn.Module) -> str | None:
    """The registry name of a fusion model or of an :class:`Ensemble`'s members; None for another module."""
    member = model.members[0] if isinstance(model, Ensemble) else model
    return next((name for name, cls in FUSIONS.items() if type(member) is cls), None)


def weighted_record(model: WeightedEnsemble) -> dict:
    """config.json's ``"weighted"`` block: what :func:`build_recorded` needs to rebuild
    ``model`` untrained (its weights come from the weights file, under ``parts.<name>.``).
    ``{"task", "primary", "parts": [{"name", "weight", "kind": "fusion", "fusion", "model",
    "ensemble"} or {"name", "weight", "kind": "baseline", "head": <the head's record>}]}``."""
    parts = []
    for name, part in model.parts.items():
        fusion = _fusion_of(part)
        if fusion is not None:
            entry = {
                "kind": "fusion",
                "fusion": fusion,
                "model": asdict(part.config),
                **EnsembleSpec.of(part).to_dict(),
            }
        else:
            entry = {"kind": "baseline", "head": part.record()}
        parts.append({"name": name, "weight": model.weights[name], **entry})
    return {"task": model.task, "primary": model.primary, "parts": parts}


def build_recorded(record: dict[str, Any]) -> FusionModel | Ensemble | WeightedEnsemble:
    """The untrained model a record describes (config.json, or a checkpoint's record of a
    trained model): its ``"weighted"`` block when it has one (:func:`weighted_record`), else the
    ``"fusion"`` of config ``"model"`` with ``"ensemble"`` members (:meth:`EnsembleSpec.build`)."""
    weighted = record.get("weighted")
    if weighted is None:
        return EnsembleSpec.from_dict(record).build(record["fusion"], record["model"])
    parts: dict[str, nn.Module] = {}
    for entry in weighted["parts"]:
        if entry["kind"] == "fusion":
            parts[entry["name"]] = EnsembleSpec.from_dict(entry).build(entry["fusion"], entry["model"])
        else:
            parts[entry["name"]] = build_head(entry["head"])
    weights = {entry["name"]: entry["weight"] for entry in weighted["parts"]}
    return WeightedEnsemble(parts, weights, weighted["task"], weighted["primary"])
