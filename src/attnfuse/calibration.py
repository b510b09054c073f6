"""Outputs a user can act on: calibrated class probabilities and regression intervals with a
guaranteed coverage, both fitted on rows the model did not train on.

Temperature scaling (Guo, Pleiss, Sun & Weinberger, "On Calibration of Modern Neural Networks",
ICML 2017). A network trained with cross-entropy is usually over-confident: its largest softmax
probability is higher than its accuracy. One scalar ``T > 0`` divides every logit,
``p = softmax(z / T)``; it is fitted by minimising the negative log-likelihood on held-out rows
(:func:`fit_temperature`). Dividing by one positive number keeps the order of the logits, so the
predicted class, and with it accuracy, never changes: only the confidence does.

How ``T`` is found: a bounded golden-section search over ``log T`` in float64, not LBFGS. The NLL
as a function of the inverse temperature ``b = 1/T`` is ``mean(logsumexp(b z) - b z_y)``, a
log-sum-exp of functions linear in ``b`` minus a linear one: convex. A convex function of ``b``
is unimodal in ``log T = -log b`` (a monotone change of variable maps its sublevel intervals to
intervals), and golden-section search finds the minimum of a unimodal function on a bracket to
any tolerance, deterministically and without gradients. LBFGS (as in Guo et al.'s code) finds the
same minimum (the tests check it), but its result depends on line-search and tolerance settings,
and on held-out rows that the model separates perfectly the NLL keeps falling as ``T -> 0``: the
bracket (:data:`TEMPERATURE_BOUNDS`) keeps ``T`` finite there, and the bound is then the answer.

Why ``attnfuse train`` fits ``T`` against smoothed targets. A small validation part is often
separated perfectly: on scikit-learn's breast_cancer (86 validation rows) 5 of 10 splits had every
validation row right, the NLL's minimum was the lower bound ``T = 0.01``, and the test NLL rose
from 0.13 to 6.5 on average (a single wrong test row at probability ~e^-100); with one wrong row of
86 it still sharpened to ``T = 0.15`` (test NLL 0.08 -> 0.24). Rows without an error are not
evidence that errors cannot happen: Laplace's rule of succession gives the next one a chance of
``1 / (n + 2)`` after ``n`` rows without one, and Platt ("Probabilistic Outputs for Support Vector
Machines", 1999) fits his sigmoid to targets ``(N + 1) / (N + 2)`` instead of 1 for the same
reason. So each validation row's target puts ``1 - e`` on its label and ``e / (C - 1)`` on each
other class, ``e = 1 / (n + 2)`` (:func:`laplace_smoothing`): the cross-entropy against such
targets is still convex in ``1 / T`` (a log-sum-exp minus a linear function) and now has its
minimum at a finite ``T``. Measured on those 10 breast_cancer splits (test rows): mean NLL 0.132
uncalibrated, 6.52 with the plain fit, 0.108 with the smoothed one; ECE 0.032, 0.037, 0.032. On
mfeat (300 validation rows, 3 of them wrong on seed 0) the two fits differ little (test NLL 0.0331
and 0.0336).

Expected calibration error (Naeini, Cooper & Hauskrecht, AAAI 2015; in the form Guo et al.
report it): the confidences ``max_c p_ic`` are put in ``M = 15`` equal-width bins
``B_m = {i : (m-1)/M < conf_i <= m/M}`` and
``ECE = sum_m |B_m| / n * |acc(B_m) - conf(B_m)|``, the gap between accuracy and mean confidence
per bin, weighted by the bin's share of the rows (:func:`expected_calibration_error`).

Split-conformal intervals for regression (Lei, G'Sell, Rinaldo, Tibshirani & Wasserman,
"Distribution-Free Predictive Inference for Regression", JASA 2018; Angelopoulos & Bates, "A
Gentle Introduction to Conformal Prediction and Distribution-Free Uncertainty Quantification",
2021, section 1). On ``n`` held-out (calibration) rows take the absolute residuals
``s_i = |y_i - f(x_i)|`` and ``q`` = the ``k``-th smallest of them, ``k = ceil((n + 1)(1 - alpha))``
(the empirical quantile at level ``k / n``). If the calibration rows and a new row are
exchangeable, the new row's residual is equally likely to take any rank among the ``n + 1``, so
``P(|y - f(x)| <= q) >= k / (n + 1) >= 1 - alpha``, whatever the model and the distribution
(and ``<= 1 - alpha + 1 / (n + 1)`` when the residuals have no ties). The interval is
``[f(x) - q, f(x) + q]`` (:func:`conformal_quantile`, :func:`conformal_interval`). With
``k > n`` (fewer than ``1/alpha - 1`` rows) no finite ``q`` has the guarantee: ``q`` is infinite.

A trained model carries what was fitted in a ``calibration`` block of its ``config.json``
(written by ``attnfuse train``, checked by :func:`check_calibration` when the directory is read):
``{"method": "temperature", "temperature": T, "smoothing": e, "fitted_on": "valid", "rows": n}``
for a classifier, ``{"method": "conformal", "level": 0.9, "half_width": [q_1, ..., q_K],
"fitted_on": "valid", "rows": n}`` for a regression (one half-width per target: targets of
different scales get intervals of their own). No block (``--no-calibrate``, a regression without
``--interval``, a directory written before calibration existed) means none: temperature 1, no
interval. :func:`fit_calibration` makes the block from the validation outputs of the run's chosen
model; :func:`calibrated_probabilities`, :func:`prediction_interval` and :func:`output_metrics`
apply it, the same way for ``predict``, ``evaluate``, :class:`attnfuse.FusionPredictor` and the
export.

Everything here takes numpy arrays or tensors and computes in float64 (numpy; torch for the softmax
and the cross-entropy).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .checks import is_int, is_number

__all__ = [
    "ECE_BINS",
    "TEMPERATURE_BOUNDS",
    "fit_temperature",
    "laplace_smoothing",
    "temperature_nll",
    "scale_logits",
    "softmax",
    "expected_calibration_error",
    "calibration_bins",
    "calibration_summary",
    "conformal_quantile",
    "conformal_interval",
    "interval_coverage",
    "CALIBRATION_METHODS",
    "check_level",
    "conformal_rows",
    "check_conformal_rows",
    "fit_calibration",
    "calibration_report",
    "check_calibration",
    "temperature_of",
    "half_width_of",
    "calibrated_probabilities",
    "prediction_interval",
    "output_metrics",
    "evaluation_block",
]

ECE_BINS = 15  # Guo et al.'s choice, the one papers report
# The bracket of the temperature search: a hundredfold sharpening to a hundredfold flattening of the
# logits. Guo et al. report fitted temperatures between 1 and 3 on their benchmarks.
TEMPERATURE_BOUNDS = (0.01, 100.0)
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0  # 0.618...: the golden-section step
LOG_T_TOLERANCE = 1e-7  # on log T: T is found to a relative 1e-7


def _array(name: str, a: object) -> np.ndarray:
    """``a`` (a numpy array, a tensor or a list) as a numpy array, without a copy when it is one."""
    if hasattr(a, "detach"):  # a torch tensor
        a = a.detach().cpu().numpy()
    arr = np.asarray(a)
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{name}: expected a numeric array, got dtype {arr.dtype}")
    if arr.ndim == 0 or arr.shape[0] == 0:
        raise ValueError(f"{name}: expected at least one row, got shape {arr.shape}")
    return arr


def _logits_and_labels(logits: object, y: object) -> tuple[np.ndarray, np.ndarray]:
    """(N, C) float64 finite logits and (N,) int64 labels in 0..C-1."""
    z = _array("logits", logits).astype(np.float64)
    if z.ndim != 2 or z.shape[1] < 2:
        raise ValueError(f"logits: expected shape (N, C) with C >= 2 classes, got {z.shape}")
    if not np.isfinite(z).all():
        raise ValueError(f"logits: {int((~np.isfinite(z)).sum())} non-finite values (NaN/inf)")
    labels = _labels(y, z.shape)
    return z, labels


def _labels(y: object, shape: tuple[int, ...]) -> np.ndarray:
    """(N,) int64 class labels in 0..C-1 for scores of ``shape`` (N, C)."""
    labels = _array("y", y)
    if labels.dtype.kind not in "biu" or labels.shape != shape[:1]:
        raise ValueError(f"y: expected ({shape[0]},) integer class labels, got {labels.dtype} {labels.shape}")
    if labels.min() < 0 or labels.max() >= shape[1]:
        raise ValueError(f"y: expected labels in 0..{shape[1] - 1}, got {labels.min()}..{labels.max()}")
    return labels.astype(np.int64)


def softmax(logits: object, temperature: float = 1.0) -> np.ndarray:
    """(N, C) float64 class probabilities ``softmax(logits / temperature)``."""
    return torch.softmax(torch.from_numpy(scale_logits(logits, temperature)), dim=1).numpy()


def scale_logits(logits: object, temperature: float) -> np.ndarray:
    """(N, C) float64 ``logits / temperature`` (the argmax, the predicted class, is unchanged)."""
    _check_temperature(temperature)
    return _array("logits", logits).astype(np.float64) / float(temperature)


def _check_temperature(t: object) -> None:
    if not (is_number(t) and t > 0):
        raise ValueError(f"temperature: expected a finite number > 0, got {t!r}")


def temperature_nll(logits: object, y: object, temperature: float = 1.0) -> float:
    """The mean negative log-likelihood of the labels ``y`` (N,) under ``softmax(logits / T)``:
    ``mean_i(logsumexp(z_i / T) - z_{i, y_i} / T)``, the quantity temperature scaling minimises."""
    z, labels = _logits_and_labels(logits, y)
    _check_temperature(temperature)
    return _nll(z, labels, float(temperature))


def _nll(z: np.ndarray, labels: np.ndarray, t: float) -> float:
    """The mean NLL of the labels (N,) under ``softmax(z / t)``."""
    return _cross_entropy(z, _targets(labels, z.shape[1]), t)


def _targets(labels: np.ndarray, classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """What :func:`_cross_entropy` compares with: the labels (N,) themselves, or with ``smoothing``
    (N, C) target probabilities, ``1 - smoothing`` on each row's label and ``smoothing / (C - 1)``
    on every other class."""
    y = torch.from_numpy(labels)
    if not smoothing:
        return y
    target = torch.full((len(labels), classes), smoothing / (classes - 1), dtype=torch.float64)
    return target.scatter_(1, y[:, None], 1.0 - smoothing)


def _cross_entropy(z: np.ndarray, targets: torch.Tensor, t: float) -> float:
    """The mean cross-entropy of ``softmax(z / t)`` (float64) against ``targets`` (:func:`_targets`)."""
    return float(F.cross_entropy(torch.from_numpy(z / t), targets))


def _check_smoothing(smoothing: object, name: str = "smoothing") -> float:
    if not (is_number(smoothing, finite=False) and 0 <= smoothing < 1):
        raise ValueError(f"{name}: expected a number in [0, 1), got {smoothing!r}")
    return float(smoothing)


def laplace_smoothing(rows: int) -> float:
    """``1 / (n + 2)``: the chance Laplace's rule of succession gives a next error after ``n``
    rows without one, the target smoothing :func:`fit_calibration` fits the temperature with."""
    if not is_int(rows) or rows < 1:
        raise ValueError(f"rows: expected an integer >= 1, got {rows!r}")
    return 1.0 / (int(rows) + 2)


def fit_temperature(
    logits: object,
    y: object,
    bounds: tuple[float, float] = TEMPERATURE_BOUNDS,
    tol: float = LOG_T_TOLERANCE,
    smoothing: float = 0.0,
) -> float:
    """The temperature ``T`` that minimises the NLL of ``y`` (N,) under ``softmax(logits / T)``
    on held-out rows (``logits``: (N, C), never the rows the model was trained on: there it is
    over-confident by construction); with ``smoothing`` in [0, 1), the cross-entropy against
    targets of ``1 - smoothing`` on the label and the rest shared by the other classes (see the
    module's docstring: on rows the model separates perfectly the NLL has no minimum).

    Golden-section search over ``log T`` in ``bounds`` to a width ``tol`` (see the module's
    docstring for why the NLL is unimodal there and why not LBFGS); returns the bound itself when
    the minimum lies at or beyond it (perfectly separated rows without smoothing: ``T`` at the
    lower bound)."""
    z, labels = _logits_and_labels(logits, y)
    lo, hi = bounds
    if not (0 < lo < hi < math.inf):
        raise ValueError(f"bounds: expected 0 < low < high < inf, got {bounds!r}")
    if not (is_number(tol, finite=False) and tol > 0):
        raise ValueError(f"tol: expected a number > 0, got {tol!r}")
    smoothing = _check_smoothing(smoothing)
    a, b = math.log(lo), math.log(hi)
    targets = _targets(labels, z.shape[1], smoothing)  # made once for the whole search

    def f(u: float) -> float:
        return _cross_entropy(z, targets, math.exp(u))

    # Golden-section: keep a bracket [a, b] with two interior points whose values decide which end
    # to drop; each step shrinks it by 0.618 and needs one new evaluation.
    c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        if fc <= fd:  # the minimum is in [a, d]  (ties: the smaller temperature's side, deterministically)
            b, d, fd = d, c, fc
            c = b - _GOLDEN * (b - a)
            fc = f(c)
        else:  # the minimum is in [c, b]
            a, c, fc = c, d, fd
            d = a + _GOLDEN * (b - a)
            fd = f(d)
    u = (a + b) / 2
    # The end points themselves: a minimum at a bound is approached, never evaluated, by the interior points.
    best = min((f(u), u), (f(math.log(lo)), math.log(lo)), (f(math.log(hi)), math.log(hi)))
    return float(math.exp(best[1]))


def calibration_bins(probs: object, y: object, bins: int = ECE_BINS) -> dict[str, np.ndarray]:
    """The reliability diagram's numbers: per equal-width confidence bin ``((m-1)/M, m/M]``,
    ``count`` (M,) int64, ``confidence`` (M,) the mean confidence and ``accuracy`` (M,) the
    share of correct predictions (NaN in empty bins), and the bin ``edges`` (M + 1,).

    ``probs``: (N, C) class probabilities; the prediction is their argmax (the first class on a
    tie) and the confidence its probability. ``y``: (N,) labels."""
    p = _array("probs", probs).astype(np.float64)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"probs: expected shape (N, C) with C >= 2 classes, got {p.shape}")
    if not (np.isfinite(p).all() and p.min() >= 0 and p.max() <= 1):
        raise ValueError("probs: expected probabilities in [0, 1] (softmax of the logits), got values outside")
    labels = _labels(y, p.shape)
    if not is_int(bins) or bins < 1:
        raise ValueError(f"bins: expected an integer >= 1, got {bins!r}")
    confidence = p.max(axis=1)  # (N,)
    correct = (p.argmax(axis=1) == labels).astype(np.float64)  # (N,)
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Bin m (0-based) holds (edges[m], edges[m+1]]: searchsorted on the upper edges, left side, puts
    # a confidence equal to an edge in the bin that edge closes. A confidence of 0 (impossible for a
    # maximum of C >= 2 probabilities summing to 1) would join the first bin.
    which = np.searchsorted(edges[1:-1], confidence, side="left")  # (N,) in 0..M-1
    count = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.bincount(which, weights=confidence, minlength=bins) / count
        acc = np.bincount(which, weights=correct, minlength=bins) / count
    return {"count": count.astype(np.int64), "confidence": conf, "accuracy": acc, "edges": edges}


def expected_calibration_error(probs: object, y: object, bins: int = ECE_BINS) -> float:
    """``ECE = sum_m |B_m| / n * |acc(B_m) - conf(B_m)|`` over ``bins`` equal-width confidence
    bins (empty bins contribute nothing); in [0, 1]. ``probs``: (N, C); ``y``: (N,) labels."""
    b = calibration_bins(probs, y, bins)
    full = b["count"] > 0
    n = b["count"].sum()
    return float(np.sum(b["count"][full] / n * np.abs(b["accuracy"][full] - b["confidence"][full])))


def calibration_summary(logits: object, y: object, temperature: float) -> dict[str, float]:
    """What temperature scaling did on rows ``logits`` (N, C) with labels ``y`` (N,), for a
    metrics file: ``{"temperature", "ece_before", "ece_after", "nll_before", "nll_after"}``
    (before: ``T = 1``). On the rows ``T`` was fitted on the NLL cannot rise; report it on other
    rows (test) to see what carries over."""
    z, labels = _logits_and_labels(logits, y)
    _check_temperature(temperature)
    t = float(temperature)
    return {
        "temperature": t,
        "ece_before": expected_calibration_error(softmax(z), labels),
        "ece_after": expected_calibration_error(softmax(z, t), labels),
        "nll_before": _nll(z, labels, 1.0),
        "nll_after": _nll(z, labels, t),
    }


def _check_alpha(alpha: object) -> float:
    if not (is_number(alpha, finite=False) and 0 < alpha < 1):
        raise ValueError(f"alpha: expected a miscoverage level in (0, 1), e.g. 0.1 for 90% intervals, got {alpha!r}")
    return float(alpha)


def conformal_quantile(residuals: object, alpha: float) -> np.ndarray | float:
    """The split-conformal half-width ``q``: the ``k``-th smallest absolute residual on the ``n``
    calibration rows, ``k = ceil((n + 1)(1 - alpha))``; ``inf`` when ``k > n``.

    ``residuals``: (n,) or (n, K) values ``y - f(x)`` (their absolute values are taken), one
    ``q`` per output for (n, K). Returns a float for (n,), a (K,) array for (n, K)."""
    r = np.abs(_array("residuals", residuals).astype(np.float64))
    if r.ndim > 2:
        raise ValueError(f"residuals: expected shape (n,) or (n, K), got {r.shape}")
    if not np.isfinite(r).all():
        raise ValueError(f"residuals: {int((~np.isfinite(r)).sum())} non-finite values (NaN/inf)")
    alpha = _check_alpha(alpha)
    n = r.shape[0]
    # The small margin: (n + 1)(1 - alpha) is often an integer that float arithmetic lands just above
    # ((19 + 1)(1 - 0.7) = 6.000000000000001), and its ceiling must not then be one rank too high.
    k = math.ceil((n + 1) * (1.0 - alpha) - 1e-9)
    if k > n:
        q = np.full(r.shape[1:], np.inf)
    else:
        q = np.sort(r, axis=0)[k - 1]
    return float(q) if r.ndim == 1 else q


def conformal_interval(pred: object, q: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """``(lower, upper) = (pred - q, pred + q)`` for predictions (N,) or (N, K) and the half-width
    ``q`` of :func:`conformal_quantile` (a float, or (K,))."""
    p = _array("pred", pred).astype(np.float64)
    half = np.asarray(q, dtype=np.float64)
    if half.ndim > 0 and (p.ndim != 2 or half.shape != p.shape[1:]):
        raise ValueError(f"q: expected one half-width per output of pred {p.shape}, got shape {half.shape}")
    if np.any(np.isnan(half)) or np.any(half < 0):
        raise ValueError(f"q: expected half-widths >= 0, got {half}")
    return p - half, p + half


def interval_coverage(y: object, lower: object, upper: object) -> dict[str, float]:
    """``{"coverage", "width"}``: the share of targets inside ``[lower, upper]`` (bounds included)
    and the intervals' mean width, over all rows and outputs (shapes (N,) or (N, K), equal)."""
    t = _array("y", y).astype(np.float64)
    lo, hi = _array("lower", lower).astype(np.float64), _array("upper", upper).astype(np.float64)
    if not (t.shape == lo.shape == hi.shape):
        raise ValueError(f"lower, upper: expected the shape of y {t.shape}, got {lo.shape} and {hi.shape}")
    return {"coverage": float(np.mean((lo <= t) & (t <= hi))), "width": float(np.mean(hi - lo))}


# ---------------------------------------------------------------------------------------------
# A model's calibration: fitted on its validation outputs, kept in config.json, applied to outputs

CALIBRATION_METHODS = ("temperature", "conformal")


def check_level(level: object, name: str = "interval") -> float:
    """A coverage level in (0, 1) (0.9: intervals that hold 90% of the targets)."""
    if not (is_number(level, finite=False) and 0 < level < 1):
        raise ValueError(f"{name}: expected a coverage level in (0, 1), e.g. 0.9 for 90% intervals, got {level!r}")
    return float(level)


def conformal_rows(level: float) -> int:
    """The fewest calibration rows whose split-conformal half-width at ``level`` is finite: the
    smallest ``n`` with ``ceil((n + 1) level) <= n``, i.e. ``n >= level / (1 - level)`` (9 rows
    for 0.9, 19 for 0.95)."""
    level = check_level(level)
    return max(1, math.ceil(level / (1.0 - level) - 1e-9))


def check_conformal_rows(rows: int, level: float) -> None:
    """A ValueError when ``rows`` validation rows are too few for a finite interval at ``level``
    (checked before training: the split is known then, the residuals only after)."""
    need = conformal_rows(level)
    if rows < need:
        raise ValueError(
            f"interval: {level:g} needs at least {need} validation rows for a finite interval, the validation "
            f"part has {rows}; lower --interval or give the validation part more rows"
        )


def _outputs(outputs: object) -> np.ndarray:
    """(N, out_dim) float64 outputs of a model (a tensor on any device, or an array)."""
    out = _array("outputs", outputs).astype(np.float64)
    return out.reshape(out.shape[0], -1)


def _values(y: object, k: int) -> np.ndarray:
    """Regression targets (N,) or (N, K) as (N, K) float64 (checked against ``k`` outputs)."""
    t = _array("y", y).astype(np.float64)
    t = t.reshape(t.shape[0], -1)
    if t.shape[1] != k:
        raise ValueError(f"y: expected {k} targets per row (the model's outputs), got {t.shape[1]}")
    return t


def fit_calibration(task: str, outputs: object, y: object, level: float | None = None) -> dict[str, Any]:
    """The ``calibration`` block of ``config.json`` fitted on held-out rows (the run's validation
    part): ``outputs`` (N, out_dim) the model's raw outputs on them (logits; regression values),
    ``y`` (N,) labels or (N,)/(N, K) targets. Classification: the temperature
    (:func:`fit_temperature` against targets smoothed by :func:`laplace_smoothing`); regression at ``level``: the split-conformal half-width of each
    target (:func:`conformal_quantile`; fewer rows than :func:`conformal_rows` is a ValueError,
    the interval would be infinite)."""
    out = _outputs(outputs)
    n = out.shape[0]
    if task == "classification":
        smoothing = laplace_smoothing(n)
        t = fit_temperature(out, y, smoothing=smoothing)
        return {"method": "temperature", "temperature": t, "smoothing": smoothing, "fitted_on": "valid", "rows": n}
    if task != "regression":
        raise ValueError(f"task: expected 'classification' or 'regression', got {task!r}")
    level = check_level(level)
    check_conformal_rows(n, level)
    half = np.atleast_1d(conformal_quantile(_values(y, out.shape[1]) - out, 1.0 - level))
    return {"method": "conformal", "level": level, "half_width": half.tolist(), "fitted_on": "valid", "rows": n}


def calibration_report(block: dict, task: str, outputs: object, y: object) -> dict[str, float]:
    """What ``block`` does on rows with ``outputs`` (N, out_dim) and targets ``y``, for
    metrics.json: classification ``{"ece_before", "ece_after", "nll_before", "nll_after"}``
    (:func:`calibration_summary`, 15 bins); regression ``{"coverage", "width"}`` of the intervals
    (:func:`interval_coverage`: all rows and targets)."""
    out = _outputs(outputs)
    if task == "classification":
        summary = calibration_summary(out, y, block["temperature"])
        return {k: v for k, v in summary.items() if k != "temperature"}
    lower, upper = prediction_interval(out, block)
    return interval_coverage(_values(y, out.shape[1]), lower, upper)


def check_calibration(block: object, task: str, out_dim: int) -> None:
    """A ``calibration`` block read from a file (untrusted) against what :func:`fit_calibration`
    writes for a model of ``task`` with ``out_dim`` outputs; a ValueError naming the key."""
    if not isinstance(block, dict):
        raise ValueError(f"calibration: expected an object, got {type(block).__name__}")
    method = block.get("method")
    expected = "temperature" if task == "classification" else "conformal"
    if method != expected:
        raise ValueError(f"calibration.method: expected {expected!r} for a {task} model, got {method!r}")
    own = ("temperature", "smoothing") if method == "temperature" else ("level", "half_width")
    keys = {"method", "fitted_on", "rows", *own}
    unknown = sorted(set(block) - keys)
    missing = sorted(keys - set(block))
    if unknown or missing:
        what = f"unknown key {unknown[0]!r}" if unknown else f"missing key {missing[0]!r}"
        raise ValueError(f"calibration: {what}")
    if not isinstance(block["fitted_on"], str):
        raise ValueError(f"calibration.fitted_on: expected a string, got {block['fitted_on']!r}")
    rows = block["rows"]
    if not is_int(rows) or rows < 1:
        raise ValueError(f"calibration.rows: expected an integer >= 1, got {rows!r}")
    if method == "temperature":
        try:
            _check_temperature(block["temperature"])
        except ValueError as e:
            raise ValueError(f"calibration.{e}") from None
        _check_smoothing(block["smoothing"], "calibration.smoothing")
        return
    check_level(block["level"], "calibration.level")
    half = block["half_width"]
    if not (isinstance(half, list) and len(half) == out_dim):
        raise ValueError(f"calibration.half_width: expected a list of {out_dim} numbers (one per target), got {half!r}")
    if not all(is_number(q) and q >= 0 for q in half):
        raise ValueError(f"calibration.half_width: expected finite numbers >= 0, got {half!r}")


def _block(config: dict, method: str) -> dict | None:
    block = config.get("calibration")
    return block if isinstance(block, dict) and block.get("method") == method else None


def temperature_of(config: dict) -> float:
    """The temperature of a model's ``config.json`` (1.0 when it has none: uncalibrated)."""
    block = _block(config, "temperature")
    return 1.0 if block is None else float(block["temperature"])


def half_width_of(config: dict) -> np.ndarray | None:
    """The (K,) interval half-widths of a regression model's ``config.json``, or None (no ``--interval``)."""
    block = _block(config, "conformal")
    return None if block is None else np.asarray(block["half_width"], dtype=np.float64)


def calibrated_probabilities(outputs: object, config: dict) -> np.ndarray:
    """(N, C) float64 class probabilities ``softmax(logits / T)`` with the temperature of ``config``
    (``outputs``: (N, C) logits); their argmax is the logits' (the predicted class is unchanged)."""
    return softmax(_outputs(outputs), temperature_of(config))


def prediction_interval(outputs: object, config_or_block: dict) -> tuple[np.ndarray, np.ndarray]:
    """``(lower, upper)``, each (N, K) float64: the predictions ``outputs`` (N, K) minus and plus
    the half-width of each target (from a model's ``config.json`` or its ``calibration`` block)."""
    block = config_or_block if config_or_block.get("method") == "conformal" else _block(config_or_block, "conformal")
    if block is None:
        raise ValueError("interval: the model has no prediction interval; train it with --interval LEVEL (e.g. 0.9)")
    out = _outputs(outputs)
    return conformal_interval(out, np.asarray(block["half_width"], dtype=np.float64))


def output_metrics(task: str, y: object, outputs: object, config: dict) -> dict[str, float]:
    """The metrics of calibrated outputs that ``evaluate`` reports for a part: classification
    ``{"ece", "nll"}`` of ``softmax(logits / T)`` (T = 1 without a temperature); regression with
    an interval ``{"coverage", "width"}``; else nothing. ``outputs``: (N, out_dim) raw outputs."""
    out = _outputs(outputs)
    if task == "classification":
        t = temperature_of(config)
        z, labels = _logits_and_labels(out, y)
        return {"ece": expected_calibration_error(softmax(z, t), labels), "nll": _nll(z, labels, t)}
    if _block(config, "conformal") is None:
        return {}
    lower, upper = prediction_interval(out, config)
    return interval_coverage(_values(y, out.shape[1]), lower, upper)


def evaluation_block(
    task: str, y: object, outputs: object, parts: Mapping[str, np.ndarray], config: dict
) -> dict[str, Any] | None:
    """The ``calibration`` block of ``evaluate``'s report: the model's calibration
    (``{"temperature": T}``, 1.0 for an uncalibrated classifier; ``{"level", "half_width"}``) and,
    per part (``parts``: row indices), :func:`output_metrics` of its rows; None for a regression
    without intervals. ``y``: (N,) or (N, K); ``outputs``: (N, out_dim) raw outputs."""
    if task == "regression" and half_width_of(config) is None:
        return None
    out, targets = _outputs(outputs), np.asarray(y)
    if task == "classification":
        head: dict[str, Any] = {"temperature": temperature_of(config)}
    else:
        head = {k: config["calibration"][k] for k in ("level", "half_width")}
    rows_of = {name: rows for name, rows in parts.items() if len(rows)}
    return {**head, **{name: output_metrics(task, targets[rows], out[rows], config) for name, rows in rows_of.items()}}
