"""A weighted ensemble of fitted models, chosen by greedy ensemble selection with replacement.

Caruana, Niculescu-Mizil, Crew & Ksikes, "Ensemble Selection from Libraries of Models", ICML 2004
(the weighted ensemble of AutoGluon-Tabular, Erickson et al., 2020, is this procedure on
out-of-fold predictions). Given the predictions of M models on rows none of them was fitted on
(out-of-fold or validation predictions) and those rows' targets, :func:`select_ensemble`:

1. starts from the best single model (Caruana's "sorted ensemble initialisation" with one model);
2. at each step ``s = 2, 3, ..., steps`` adds to the ensemble, *with replacement* (a model may be
   added again), the model whose addition gives the best score of the plain mean of the
   ``s`` chosen predictions; it adds one even when no addition improves the score (Caruana's
   hill-climb: a step that does not improve may make a later one possible);
3. keeps the best *prefix* of that sequence (the ensemble after the step with the best score, the
   earliest on a tie: the smallest ensemble).

The ensemble is the average of the predictions weighted by how often each model was chosen,
``w_m = count_m / sum(count)``: integer counts, so a few dozen steps give weights in steps of a
few percent, which is the regularisation that makes the procedure safe on small data (a free
least-squares stacking of the M predictions over-fits the rows it is fitted on). Because the first
prefix is the best member alone and the best prefix is kept, the ensemble is never worse than its
best member on the rows it was fitted on (the result is checked, see :func:`select_ensemble`).

Ties are broken deterministically: between models with the same score, the first in the order
given. Callers list the fusion candidates before the baselines, so a tie goes to the fusion.

What is averaged: regression values ``(N,)`` or ``(N, K)``; for classification class
probabilities ``(N, C)`` (a linear pool; the baselines give probabilities, not logits).
Scores: :func:`attnfuse.metrics.compute_metrics` (``rmse``, ``mae``, ``r2``, ``accuracy``,
``f1_macro``) and the log-loss (:func:`log_loss`, as scikit-learn defines it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .checks import check_int
from .metrics import compute_metrics

__all__ = ["METRICS", "DEFAULT_METRIC", "DEFAULT_STEPS", "Selection", "select_ensemble", "blend", "log_loss"]

# metric -> (task, "max" if higher is better else "min")
METRICS: dict[str, tuple[str, str]] = {
    "rmse": ("regression", "min"),
    "mae": ("regression", "min"),
    "r2": ("regression", "max"),
    "accuracy": ("classification", "max"),
    "f1_macro": ("classification", "max"),
    "log_loss": ("classification", "min"),
}
# The metric the training loop selects with (early stopping and --fusion auto): RMSE for the MSE
# loss, accuracy for classes.
DEFAULT_METRIC = {"regression": "rmse", "classification": "accuracy"}
# Caruana et al. hill-climb a few dozen to a hundred steps; 25 steps give weights in multiples of
# 4% of the ensemble, fine enough for a handful of models and coarse enough not to over-fit.
DEFAULT_STEPS = 25
PROBABILITY_TOLERANCE = 1e-4  # rows of class probabilities must sum to 1 within this (float32 softmax)
LOG_LOSS_EPS = 1e-15  # probabilities are clipped to [eps, 1 - eps] before the logarithm


def log_loss(y: np.ndarray, probs: np.ndarray) -> float:
    """The mean negative log-probability of the true class, ``-mean_i log p_{i, y_i}``, with the
    probabilities clipped to ``[1e-15, 1 - 1e-15]`` so that a confident mistake costs a finite
    amount. ``y``: (N,) labels in 0..C-1; ``probs``: (N, C)."""
    p = np.clip(np.asarray(probs, dtype=np.float64), LOG_LOSS_EPS, 1 - LOG_LOSS_EPS)
    labels = np.asarray(y).astype(np.int64)
    return float(-np.mean(np.log(p[np.arange(len(labels)), labels])))


def _score(task: str, metric: str, y: np.ndarray, pred: np.ndarray) -> float:
    if metric == "log_loss":
        return log_loss(y, pred)
    return compute_metrics(task, y, pred)[metric]


def blend(predictions: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The weighted mean ``sum_m count_m * P_m / sum_m count_m`` of ``predictions`` (M, N, ...),
    in float64; ``counts`` (M,) non-negative (integer counts or weights)."""
    counts = np.asarray(counts, dtype=np.float64)
    return np.tensordot(counts, np.asarray(predictions, dtype=np.float64), axes=1) / counts.sum()


@dataclass
class Selection:
    """The result of :func:`select_ensemble`.

    ``names``: the models, in the order given; ``counts`` (M,) how often each was chosen;
    ``weights`` (M,) ``counts / counts.sum()``; ``metric`` and ``higher_is_better``; ``score``: the
    ensemble's score on the rows it was fitted on; ``member_scores``: each model's alone;
    ``best_member``: the best single model; ``trajectory``: the score after each hill-climbing
    step (step 1: the best member), of which the best prefix was kept."""

    names: list[str]
    counts: np.ndarray
    metric: str
    higher_is_better: bool
    score: float
    member_scores: dict[str, float]
    best_member: str
    trajectory: list[float] = field(default_factory=list)

    @property
    def weights(self) -> np.ndarray:
        """(M,) float64 weights summing to 1."""
        return self.counts / self.counts.sum()

    def predict(self, predictions: Mapping[str, np.ndarray] | Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
        """The ensemble's prediction from the members' predictions on new rows (as
        :func:`select_ensemble` takes them; models of weight 0 may be left out of a mapping)."""
        if isinstance(predictions, Mapping):
            missing = [n for n, c in zip(self.names, self.counts) if c > 0 and n not in predictions]
            if missing:
                raise ValueError(f"predictions: expected the ensemble's members {self.used()}, missing {missing}")
            first = np.asarray(predictions[next(n for n, c in zip(self.names, self.counts) if c > 0)])
            stacked = np.stack(
                [np.asarray(predictions[n]) if c > 0 else np.zeros_like(first) for n, c in zip(self.names, self.counts)]
            )
        else:
            stacked = np.stack([np.asarray(p) for p in predictions])
            if stacked.shape[0] != len(self.names):
                raise ValueError(f"predictions: expected {len(self.names)} models' predictions, got {stacked.shape[0]}")
        return blend(stacked, self.counts)

    def used(self) -> list[str]:
        """The models with a weight above 0, in the order given."""
        return [n for n, c in zip(self.names, self.counts) if c > 0]

    def describe(self) -> str:
        """One line: each model's weight, largest first (ties in the order given)."""
        order = sorted(range(len(self.names)), key=lambda i: -self.counts[i])
        parts = [f"{self.names[i]} {self.weights[i]:.2f}" for i in order if self.counts[i] > 0]
        return f"ensemble ({self.metric} {self.score:.4f}): " + ", ".join(parts)

    def to_dict(self) -> dict:
        """JSON-able: names, counts, weights, the scores and the trajectory."""
        return {
            "metric": self.metric,
            "higher_is_better": self.higher_is_better,
            "counts": {n: int(c) for n, c in zip(self.names, self.counts)},
            "weights": {n: float(w) for n, w in zip(self.names, self.weights)},
            "score": self.score,
            "members": dict(self.member_scores),
            "best_member": self.best_member,
            "trajectory": list(self.trajectory),
        }


def _stack(
    predictions: Mapping[str, np.ndarray] | Sequence[np.ndarray] | np.ndarray, names: Sequence[str] | None
) -> tuple[np.ndarray, list[str]]:
    """(M, N, ...) float64 predictions and M names."""
    if isinstance(predictions, Mapping):
        if names is not None:
            raise ValueError(
                "names: give names with a sequence of predictions, not with a mapping (its keys are the names)"
            )
        names, arrays = list(predictions), list(predictions.values())
    else:
        arrays = list(predictions)
        names = [f"model{i}" for i in range(len(arrays))] if names is None else [str(n) for n in names]
    if not arrays:
        raise ValueError("predictions: expected at least one model's predictions, got none")
    if len(names) != len(arrays) or len(set(names)) != len(names):
        raise ValueError(f"names: expected {len(arrays)} distinct names, got {list(names)}")
    shapes = {np.shape(a) for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"predictions: expected one shape for every model, got {sorted(map(str, shapes))}")
    stacked = np.stack([np.asarray(a, dtype=np.float64) for a in arrays])  # (M, N, ...)
    if stacked.ndim < 2 or stacked.shape[1] == 0:
        raise ValueError(f"predictions: expected at least one row per model, got shape {np.shape(arrays[0])}")
    bad = [n for n, a in zip(names, stacked) if not np.isfinite(a).all()]
    if bad:
        raise ValueError(f"predictions: non-finite values (NaN/inf) in {bad}")
    return stacked, names


def _check_selection(task: str, metric: str | None, steps: int) -> tuple[str, int]:
    """The metric (default :data:`DEFAULT_METRIC`) and steps of :func:`select_ensemble`, checked."""
    if task not in DEFAULT_METRIC:
        raise ValueError(f"task: expected 'classification' or 'regression', got {task!r}")
    metric = DEFAULT_METRIC[task] if metric is None else metric
    if METRICS.get(metric, (None,))[0] != task:
        valid = [m for m, (t, _) in METRICS.items() if t == task]
        raise ValueError(f"metric: expected one of {valid} for {task}, got {metric!r}")
    return metric, check_int("steps", steps)


def _check_targets(stacked: np.ndarray, names: list[str], y: np.ndarray, task: str) -> np.ndarray:
    """``y`` as an array whose rows match the (M, N, ...) stacked predictions."""
    target = np.asarray(y)
    if target.shape[0] != stacked.shape[1]:
        raise ValueError(f"y: expected {stacked.shape[1]} rows (as the predictions), got {target.shape[0]}")
    if task == "classification":
        _check_probabilities(stacked, names, target)
    elif target.shape != stacked.shape[1:]:
        raise ValueError(f"y: expected the predictions' shape {stacked.shape[1:]}, got {target.shape}")
    return target


def select_ensemble(
    predictions: Mapping[str, np.ndarray] | Sequence[np.ndarray] | np.ndarray,
    y: np.ndarray,
    task: str,
    metric: str | None = None,
    steps: int = DEFAULT_STEPS,
    names: Sequence[str] | None = None,
) -> Selection:
    """Greedy ensemble selection with replacement (see the module's docstring) over the models'
    ``predictions`` on held-out rows: ``{name: (N,) or (N, K) values}`` for regression, ``{name:
    (N, C) class probabilities}`` for classification (or a sequence of such arrays, with
    ``names``), against their targets ``y`` ((N,) / (N, K) values, (N,) labels 0..C-1).

    ``metric``: one of :data:`METRICS` for ``task`` (default :data:`DEFAULT_METRIC`);
    ``steps``: hill-climbing steps (the ensemble holds at most this many picks).

    The weighted mean is scored once more as :meth:`Selection.predict` computes it; should float
    rounding make it worse than the best member (the hill-climb sums in another order), the best
    member alone is returned: never worse than the best member on these rows, exactly."""
    metric, steps = _check_selection(task, metric, steps)
    stacked, names = _stack(predictions, names)
    target = _check_targets(stacked, names, y, task)
    higher = METRICS[metric][1] == "max"
    sign = 1.0 if higher else -1.0

    def score(pred: np.ndarray) -> float:
        return _score(task, metric, target, pred)

    def first_best(scores: list[float]) -> int:
        """The index of the best score; the first one on a tie (NaN counts as worst)."""
        keyed = [sign * s if np.isfinite(s) else -np.inf for s in scores]
        return int(np.argmax(keyed))  # argmax returns the first maximum

    member_scores = [score(p) for p in stacked]
    best = first_best(member_scores)
    counts = np.zeros(len(names), dtype=np.int64)
    counts[best] = 1
    total = stacked[best].copy()  # the sum of the chosen predictions
    best_counts, best_score = counts.copy(), member_scores[best]
    trajectory = [member_scores[best]]
    for s in range(2, steps + 1):
        step_scores = [score((total + p) / s) for p in stacked]
        j = first_best(step_scores)
        counts[j] += 1
        total += stacked[j]
        trajectory.append(step_scores[j])
        if sign * step_scores[j] > sign * best_score:  # strictly better: on a tie the smaller ensemble stays
            best_counts, best_score = counts.copy(), step_scores[j]
    final = score(blend(stacked, best_counts))
    if not sign * final >= sign * member_scores[best]:  # float rounding of the other summation order
        best_counts = np.zeros_like(counts)
        best_counts[best] = 1
        final = score(blend(stacked, best_counts))
    return Selection(
        names=names,
        counts=best_counts,
        metric=metric,
        higher_is_better=higher,
        score=final,
        member_scores=dict(zip(names, member_scores)),
        best_member=names[best],
        trajectory=trajectory,
    )


def _check_probabilities(stacked: np.ndarray, names: list[str], y: np.ndarray) -> None:
    """Classification: (M, N, C) probabilities whose rows sum to 1; (N,) labels in 0..C-1."""
    if stacked.ndim != 3 or stacked.shape[2] < 2:
        raise ValueError(f"predictions: expected (N, C) class probabilities per model, got {stacked.shape[1:]}")
    sums = stacked.sum(axis=2)
    bad = [n for n, a, s in zip(names, stacked, sums) if a.min() < 0 or np.abs(s - 1).max() > PROBABILITY_TOLERANCE]
    if bad:
        raise ValueError(f"predictions: expected class probabilities (>= 0, rows summing to 1), not so in {bad}")
    if y.shape != stacked.shape[1:2] or y.dtype.kind not in "biu" or y.min() < 0 or y.max() >= stacked.shape[2]:
        raise ValueError(
            f"y: expected ({stacked.shape[1]},) labels in 0..{stacked.shape[2] - 1}, got {y.dtype} {y.shape}"
        )
