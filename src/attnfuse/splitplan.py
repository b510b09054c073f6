"""How a run's train/valid/test rows are made: one :class:`SplitPlan` per run, the one owner of
the split.

A plan is a seed and, for cross-validation, which fold of how many. It makes the rows from the
data (:meth:`SplitPlan.rows`: :func:`attnfuse.data.make_split`, or one fold of
:func:`attnfuse.data.kfold`), and it is what a model directory records (``config.json``
``"split"``, :meth:`SplitPlan.to_dict`), so ``evaluate`` and ``predict`` rebuild the same rows
later (:meth:`SplitPlan.from_dict`). Nothing else draws a split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .data import MultimodalDataset, Split, kfold, make_split

__all__ = ["SplitPlan"]

HOWS = ("column", "carved", "drawn", "fold")  # Split.how: what the rows came from


@dataclass(frozen=True)
class SplitPlan:
    """The rows of one run: ``make_split(data, seed)`` (the data's split column, a validation part
    carved out of its train rows, or a split drawn by ``seed``), or with ``folds`` K >= 2 fold
    ``fold`` of ``kfold(data, K, seed)``."""

    seed: int
    folds: int = 0
    fold: int = 0

    @classmethod
    def for_run(cls, seed: int, index: int, folds: int = 0) -> SplitPlan:
        """The plan of run ``index`` of a request trained with ``seed``: fold ``index`` of the
        folds drawn with ``seed``, or (``--repeat``) the split of the run's own seed ``seed + index``."""
        return cls(seed, folds, index) if folds else cls(seed + index)

    def rows(self, data: MultimodalDataset) -> Split:
        """The train/valid/test row indices of ``data`` and how they were made (``Split.how``)."""
        if self.folds:
            return kfold(data, self.folds, self.seed)[self.fold]
        return make_split(data, self.seed)

    def to_dict(self, how: str) -> dict[str, Any]:
        """``config.json``'s ``"split"``: ``{"how", "seed"}`` and, for a fold, ``"folds"``, ``"fold"``
        (``how``: the :class:`~attnfuse.data.Split`'s, which says what the rows came from)."""
        return {"how": how, "seed": self.seed, **({"folds": self.folds, "fold": self.fold} if self.folds else {})}

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> SplitPlan:
        """The plan a ``"split"`` record describes (checked by :func:`attnfuse.checkpoint.read_config`)."""
        if record["how"] == "fold":
            return cls(record["seed"], record["folds"], record["fold"])
        return cls(record["seed"])
