"""Evaluation metrics: numpy arrays in, plain Python floats out (JSON-able).

Definitions follow scikit-learn (F1, R^2) and, for MOSI/MOSEI sentiment, MMSA's
``__eval_mosei_regression``, without depending on either.
"""

from __future__ import annotations

import math

import numpy as np

from .checks import is_number

# task -> (metric used for model selection, whether higher ("max") or lower ("min") is better)
PRIMARY_METRIC: dict[str, tuple[str, str]] = {"classification": ("accuracy", "max"), "regression": ("mae", "min")}


def _as_array(name: str, a: object, finite: bool = True) -> np.ndarray:
    """A non-empty numeric array; with ``finite``, NaN/inf are an error (targets must be clean).

    Predictions may be non-finite (a diverged model): the regression metrics then come out NaN
    instead of raising, so a training loop can treat the epoch as "not better" and stop.
    """
    arr = np.asarray(a)
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{name}: expected a numeric array, got dtype {arr.dtype}")
    if arr.ndim == 0 or arr.shape[0] == 0:
        raise ValueError(f"{name}: expected at least one sample, got shape {arr.shape}")
    if finite and arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ValueError(f"{name}: {int((~np.isfinite(arr)).sum())} non-finite values (NaN/inf)")
    return arr


def _f1_per_class(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(classes, F1 per class) over the union of labels seen in y_true and y_pred.

    F1 = 2TP / (2TP + FP + FN): equal to 2PR/(P+R) and 0 (not NaN) when a class is never
    predicted, as scikit-learn reports it.
    """
    classes = np.union1d(y_true, y_pred)
    tp = np.array([np.sum((y_true == c) & (y_pred == c)) for c in classes], dtype=np.float64)
    fp = np.array([np.sum((y_true != c) & (y_pred == c)) for c in classes], dtype=np.float64)
    fn = np.array([np.sum((y_true == c) & (y_pred != c)) for c in classes], dtype=np.float64)
    return classes, 2 * tp / (2 * tp + fp + fn)


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """accuracy and macro F1.

    y_true: (N,) int labels. y_pred: (N,) int labels, or (N, C) scores/logits (argmax is taken).
    """
    y_true, y_pred = _as_array("y_true", y_true), _as_array("y_pred", y_pred, finite=False)
    if y_true.ndim != 1:
        raise ValueError(f"y_true: expected class labels of shape (N,), got {y_true.shape}")
    given = y_pred.shape
    if y_pred.ndim == 2:
        y_pred = y_pred.argmax(axis=1)
    if y_pred.shape != y_true.shape:
        expected = f"{y_true.shape} (labels) or ({y_true.shape[0]}, C) (scores)"
        raise ValueError(f"y_pred: expected shape {expected}, got {given}")
    _, f1 = _f1_per_class(y_true, y_pred)
    return {"accuracy": float(np.mean(y_true == y_pred)), "f1_macro": float(f1.mean())}


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two 1-D arrays; 0.0 when either is constant (undefined otherwise)."""
    da, db = a - a.mean(), b - b.mean()
    denom = math.sqrt(float(np.sum(da * da)) * float(np.sum(db * db)))
    return float(np.sum(da * db) / denom) if denom > 0 else 0.0


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """mae, rmse, r2, corr for (N,) or (N, K) targets; with K outputs each is averaged over them.

    r2 = 1 - SS_res / SS_tot per output; for a constant target it is 1.0 if the prediction is
    exact else 0.0 (scikit-learn's convention). corr is Pearson's r, 0.0 when a side is constant.
    All four are NaN when y_pred has a NaN/inf.
    """
    y_true = _as_array("y_true", y_true).astype(np.float64)
    y_pred = _as_array("y_pred", y_pred, finite=False).astype(np.float64)
    n = y_true.shape[0]
    t, p = y_true.reshape(n, -1), y_pred.reshape(y_pred.shape[0], -1)  # (N, K): (N,) counts as K=1
    if y_true.ndim > 2 or y_pred.ndim > 2 or t.shape != p.shape:
        raise ValueError(f"y_pred: expected shape {y_true.shape}, got {y_pred.shape}")
    if not np.isfinite(p).all():
        return dict.fromkeys(("mae", "rmse", "r2", "corr"), float("nan"))
    err = p - t
    ss_res = np.sum(err**2, axis=0)
    ss_tot = np.sum((t - t.mean(axis=0)) ** 2, axis=0)
    r2 = [1.0 - r / s if s > 0 else (1.0 if r == 0 else 0.0) for r, s in zip(ss_res, ss_tot)]
    return {
        "mae": float(np.mean(np.abs(err))),
        "rmse": float(np.mean(np.sqrt(np.mean(err**2, axis=0)))),
        "r2": float(np.mean(r2)),
        "corr": float(np.mean([_pearson(t[:, k], p[:, k]) for k in range(t.shape[1])])),
    }


def _weighted_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """F1 per class averaged with weights = the class's support in y_true (sklearn 'weighted')."""
    classes, f1 = _f1_per_class(y_true, y_pred)
    support = np.array([np.sum(y_true == c) for c in classes], dtype=np.float64)
    return float(np.sum(f1 * support) / support.sum())


def sentiment_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """MOSI/MOSEI sentiment scores in [-3, 3], as MMSA computes them.

    acc2 / f1: binary accuracy / weighted F1 of (> 0) on samples whose target is non-zero;
    acc2_has0 / f1_has0: the same for (>= 0) over all samples;
    acc7 / acc5: accuracy of np.round (half to even, as MMSA) after clipping both sides to
    [-3, 3] / [-2, 2]. acc2 and f1 are NaN when every target is 0 (they are undefined); all are
    NaN when y_pred has a NaN/inf.
    """
    t = _as_array("y_true", y_true).astype(np.float64).reshape(-1)
    p = _as_array("y_pred", y_pred, finite=False).astype(np.float64).reshape(-1)
    if t.shape != p.shape:
        raise ValueError(f"y_pred: expected {t.size} values (one sentiment score per sample), got {p.size}")
    names = ("acc2", "acc2_has0", "f1", "f1_has0", "acc7", "acc5")
    if not np.isfinite(p).all():
        return dict.fromkeys(names, float("nan"))
    nonzero = t != 0
    if nonzero.any():
        acc2 = float(np.mean((t[nonzero] > 0) == (p[nonzero] > 0)))
        f1 = _weighted_f1(t[nonzero] > 0, p[nonzero] > 0)
    else:
        acc2 = f1 = float("nan")
    return {  # in the order of `names`
        "acc2": acc2,
        "acc2_has0": float(np.mean((t >= 0) == (p >= 0))),
        "f1": f1,
        "f1_has0": _weighted_f1(t >= 0, p >= 0),
        "acc7": float(np.mean(np.round(np.clip(p, -3, 3)) == np.round(np.clip(t, -3, 3)))),
        "acc5": float(np.mean(np.round(np.clip(p, -2, 2)) == np.round(np.clip(t, -2, 2)))),
    }


def compute_metrics(task: str, y_true: np.ndarray, y_pred: np.ndarray, sentiment: bool = False) -> dict[str, float]:
    """The metrics for ``task``; ``sentiment`` adds MOSI/MOSEI metrics to a 1-output regression."""
    if task == "classification":
        if sentiment:
            raise ValueError("sentiment: sentiment metrics need task='regression' (scores), got 'classification'")
        return classification_metrics(y_true, y_pred)
    if task == "regression":
        out = regression_metrics(y_true, y_pred)
        if sentiment:
            if np.asarray(y_true).size != np.asarray(y_true).shape[0]:
                raise ValueError(f"sentiment: needs one target per sample, got y_true shape {np.shape(y_true)}")
            out.update(sentiment_metrics(y_true, y_pred))
        return out
    raise ValueError(f"task: expected 'classification' or 'regression', got {task!r}")


def summarize(runs: list[dict]) -> dict[str, dict[str, float]]:
    """Mean and std of each numeric metric over runs (e.g. seeds): {metric: {"mean", "std"}}.

    std is the sample standard deviation (ddof=1), as papers report over seeds; 0.0 for one run.
    Metrics are those with numeric values in the first run; each must be numeric in every run.
    Non-numeric entries (e.g. a run name) are skipped.
    """
    if not runs:
        raise ValueError("runs: expected at least one run, got none")

    out = {}
    for key, first in runs[0].items():
        if not is_number(first, finite=False):
            continue
        values = []
        for i, run in enumerate(runs):
            if not is_number(run.get(key), finite=False):
                raise ValueError(f"runs: metric {key!r} is missing or not a number in run {i}")
            values.append(float(run[key]))
        arr = np.array(values)
        std = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
        out[key] = {"mean": float(arr.mean()), "std": std}
    return out


def _per_sample(metric: str, y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """(N,) float64: correct (0/1) for accuracy, the absolute error for mae, the squared error
    for rmse (averaged over the K outputs of a multi-target regression)."""
    t, p = np.asarray(y_true), np.asarray(y_pred)
    n = t.shape[0]
    if metric == "accuracy":
        return (t == p).astype(np.float64)
    if metric in ("mae", "rmse"):
        err = (p.astype(np.float64) - t.astype(np.float64)).reshape(n, -1)
        return np.abs(err).mean(axis=1) if metric == "mae" else (err**2).mean(axis=1)
    raise ValueError(f"metric: expected 'accuracy', 'mae' or 'rmse', got {metric!r}")


def standard_error(metric: str, y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """The standard error of ``metric`` (accuracy, mae or rmse) estimated on these samples: how
    much the score would move on another draw of as many samples.

    accuracy and mae are means of per-sample values (correct: 0/1; absolute error, averaged over
    outputs): SE = std / sqrt(N). rmse = sqrt(MSE): SE(MSE) = std of the squared errors / sqrt(N),
    mapped through the square root by the delta method, SE(rmse) = SE(MSE) / (2 rmse).
    y_true: (N,) or (N, K); y_pred: labels (N,) for accuracy, values like y_true otherwise."""
    per_sample = _per_sample(metric, y_true, y_pred)
    se = float(per_sample.std() / math.sqrt(per_sample.size))
    if metric == "rmse":
        rmse = math.sqrt(float(per_sample.mean()))
        return se / (2 * rmse) if rmse > 0 else 0.0
    return se


def paired_standard_error(metric: str, y_true: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray) -> float:
    """The standard error of the difference between two models' ``metric`` on the same samples:
    SE = std of the per-sample differences / sqrt(N) (for rmse through the delta method at the
    mean of the two rmse). Where the models err on the same samples it is smaller than either
    model's own standard error, where they err on different ones larger: it is what says whether
    one model is better than the other on these rows (the paired test, as McNemar's for accuracy)."""
    a, b = _per_sample(metric, y_true, pred_a), _per_sample(metric, y_true, pred_b)
    se = float((a - b).std() / math.sqrt(a.size))
    if metric == "rmse":
        mean_rmse = (math.sqrt(float(a.mean())) + math.sqrt(float(b.mean()))) / 2
        return se / (2 * mean_rmse) if mean_rmse > 0 else 0.0
    return se
