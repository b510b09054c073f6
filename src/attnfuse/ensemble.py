"""An ensemble of fusion models of one kind, trained from different seeds, whose outputs are averaged.

Averaging K independently trained networks cancels much of the variance of any one of them
(which initialisation, which mini-batch order, which epoch early stopping kept) and is known to
help most where that variance is largest: on small data (Lakshminarayanan et al., "Simple and
Scalable Predictive Uncertainty Estimation using Deep Ensembles", NeurIPS 2017). ``attnfuse
train --ensemble K`` trains K members on the same training rows and keeps them in one model
directory (their weights under ``members.<k>.``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .checks import check_int
from .data import Batch
from .fusion import FusionConfig, FusionModel, build_model
from .modules import AttentionMap

__all__ = ["Ensemble", "EnsembleSpec", "build_ensemble", "first_member"]


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


def first_member(model: FusionModel | Ensemble) -> FusionModel:
    """The model itself, or an ensemble's first member: the one whose attention is shown, and
    whose target statistics (the same in every member) define the regression loss's units."""
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
