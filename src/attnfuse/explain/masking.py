"""Modality importance by masking: what the model does when a modality is absent.

Every fusion model reads a modality's presence from its mask (an all-False row = absent) and then
ignores that modality's features entirely, so hiding a modality through its mask is a true
counterfactual for this model ("the same sample without audio"), not a zero-filled input. The
importance of a modality is the difference between two forward passes, with and without it:

    delta[b, k] = f(x_b)[t_b] - f(x_b with hidden[k] absent)[t_b]

per sample (t_b: the output explained, see :func:`._common.explained_target`), and the change in
the metric on the whole set. Hiding pairs measures interaction: two modalities that carry the same
information (redundant) each cost little alone and much together.

Caveat: a model trained without modality dropout never saw an absent modality, so the
counterfactual lies outside its training distribution and can cost accuracy even for a modality
that carries nothing (``--modality-dropout`` teaches the model the situation masking asks about).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from ..data import Batch
from ..fusion import FusionModel
from ..metrics import compute_metrics
from ..training import to_predictions
from ._common import explained_target, forward, to_numpy

__all__ = ["MaskingImportance", "masking_importance", "hide", "DEFAULT_METRIC", "MAX_PAIR_MODALITIES"]

# The metric whose change is reported: unitless, so modalities and data sets compare.
DEFAULT_METRIC = {"classification": "accuracy", "regression": "r2"}
METRICS = {"classification": ("accuracy", "f1_macro"), "regression": ("mae", "rmse", "r2", "corr")}
LOWER_IS_BETTER = frozenset({"mae", "rmse"})
MAX_PAIR_MODALITIES = 6  # pairs by default up to 6 modalities (15 pairs: 22 forward passes in all)


def hide(batch: Batch, modalities: Iterable[str]) -> Batch:
    """``batch`` with ``modalities`` absent for every sample: their mask rows all False, features
    untouched (the models ignore them through the mask)."""
    hidden = set(modalities)
    unknown = sorted(hidden - set(batch.mask))
    if unknown:
        raise ValueError(f"modalities: expected names from {list(batch.mask)}, got {unknown}")
    mask = {k: torch.zeros_like(v) if k in hidden else v for k, v in batch.mask.items()}
    return Batch(batch.x, mask, batch.y)


@dataclass
class MaskingImportance:
    """What hiding each modality (and, optionally, each pair) does to a model.

    modalities: the M modality names. hidden: the K hidden sets (the M single modalities first,
    then the pairs). target ``(B,)``: the output explained per sample; output ``(B,)`` its value
    with everything present; delta ``(B, K)``: output minus the output with ``hidden[k]`` absent
    (0 exactly where the hidden modalities were absent anyway); present ``(B, M)``: which
    modalities each sample has. prediction ``(B,)`` or ``(B, T)``: the model's prediction with
    everything present; hidden_prediction ``(K, B, ...)``: with ``hidden[k]`` absent.
    metric: the metric whose change is reported; metrics: all metrics with everything present,
    hidden_metrics: per hidden set (both None without targets).
    """

    modalities: list[str]
    hidden: list[tuple[str, ...]]
    target: np.ndarray
    output: np.ndarray
    delta: np.ndarray
    present: np.ndarray
    prediction: np.ndarray
    hidden_prediction: np.ndarray
    metric: str
    metrics: dict[str, float] | None
    hidden_metrics: list[dict[str, float]] | None

    def index(self, *modalities: str) -> int:
        """Position in ``hidden`` of the set ``modalities`` (in any order)."""
        wanted = set(modalities)
        for k, h in enumerate(self.hidden):
            if set(h) == wanted:
                return k
        raise ValueError(f"modalities: {sorted(wanted)} were not hidden together; hidden sets: {self.hidden}")

    def drop(self, *modalities: str, metric: str | None = None) -> float:
        """How much worse ``metric`` gets when ``modalities`` are hidden (positive = the model needs
        them; for accuracy, 0.032 is 3.2 points). NaN without targets."""
        metric = metric or self.metric
        if self.metrics is None or self.hidden_metrics is None:
            return float("nan")
        full, hidden = self.metrics[metric], self.hidden_metrics[self.index(*modalities)][metric]
        return hidden - full if metric in LOWER_IS_BETTER else full - hidden

    def drops(self, metric: str | None = None) -> np.ndarray:
        """``(M,)`` :meth:`drop` of each single modality."""
        return np.array([self.drop(m, metric=metric) for m in self.modalities])

    def interaction(self, a: str, b: str, metric: str | None = None) -> float:
        """drop(a, b) - drop(a) - drop(b): > 0 when a and b stand in for each other (redundant:
        each alone costs little, both much); < 0 when each needs the other (hiding either already
        loses what both carry)."""
        return self.drop(a, b, metric=metric) - self.drop(a, metric=metric) - self.drop(b, metric=metric)

    def share(self) -> np.ndarray:
        """``(M,)`` each single modality's share of the total mean |delta| (sums to 1; NaN if
        hiding anything changes nothing)."""
        mass = np.abs(self.delta[:, : len(self.modalities)]).mean(axis=0)
        return mass / mass.sum() if mass.sum() > 0 else np.full(len(self.modalities), np.nan)


def masking_importance(
    model: FusionModel,
    batch: Batch,
    task: str,
    *,
    pairs: bool | None = None,
    metric: str | None = None,
    target: int | None = None,
    batch_size: int = 256,
) -> MaskingImportance:
    """Hide each modality (and each pair, by default when 2..``MAX_PAIR_MODALITIES`` modalities)
    through its mask and compare with the full input, per sample and, when ``batch.y`` holds the
    targets, in ``metric`` (default: accuracy / R², see ``DEFAULT_METRIC``).

    One forward pass per hidden set over ``batch``, in chunks of ``batch_size`` on the model's
    device; every result is on the CPU. Works for every fusion, ``concat`` included.
    """
    if task not in DEFAULT_METRIC:
        raise ValueError(f"task: expected 'classification' or 'regression', got {task!r}")
    names = list(batch.x)
    if pairs is None:
        pairs = 2 <= len(names) <= MAX_PAIR_MODALITIES
    hidden = [(n,) for n in names] + (list(itertools.combinations(names, 2)) if pairs else [])
    metric = metric or DEFAULT_METRIC[task]
    if metric not in METRICS[task]:
        raise ValueError(f"metric: expected one of {METRICS[task]} for {task}, got {metric!r}")

    full = forward(model, batch, batch_size)  # (B, out_dim)
    t = explained_target(task, full, target)
    rows = np.arange(len(t))
    outputs = [forward(model, hide(batch, h), batch_size) for h in hidden]  # K x (B, out_dim)
    full_np = to_numpy(full)
    delta = np.stack([full_np[rows, t] - to_numpy(o)[rows, t] for o in outputs], axis=1)  # (B, K)
    present = np.stack([to_numpy(batch.mask[n].any(dim=1)) for n in names], axis=1)  # (B, M)

    metrics = hidden_metrics = None
    if batch.y is not None:
        y = to_numpy(batch.y)
        metrics = compute_metrics(task, y, to_predictions(task, full))
        hidden_metrics = [compute_metrics(task, y, to_predictions(task, o)) for o in outputs]
    return MaskingImportance(
        modalities=names,
        hidden=hidden,
        target=t,
        output=full_np[rows, t],
        delta=delta,
        present=present,
        prediction=to_predictions(task, full),
        hidden_prediction=np.stack([to_predictions(task, o) for o in outputs]),
        metric=metric,
        metrics=metrics,
        hidden_metrics=hidden_metrics,
    )
