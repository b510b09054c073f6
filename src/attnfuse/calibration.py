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

Everything here takes numpy arrays or tensors and computes in float64 numpy.
"""

from __future__ import annotations

import math
from numbers import Real

import numpy as np

__all__ = [
    "ECE_BINS",
    "TEMPERATURE_BOUNDS",
    "fit_temperature",
    "temperature_nll",
    "scale_logits",
    "softmax",
    "expected_calibration_error",
    "calibration_bins",
    "calibration_summary",
    "conformal_quantile",
    "conformal_interval",
    "interval_coverage",
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


def _logsumexp(z: np.ndarray) -> np.ndarray:
    """(N,) log sum_c exp(z_c), stable (the row maximum is taken out first)."""
    top = z.max(axis=1)
    return top + np.log(np.exp(z - top[:, None]).sum(axis=1))


def softmax(logits: object, temperature: float = 1.0) -> np.ndarray:
    """(N, C) float64 class probabilities ``softmax(logits / temperature)``."""
    z = scale_logits(logits, temperature)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def scale_logits(logits: object, temperature: float) -> np.ndarray:
    """(N, C) float64 ``logits / temperature`` (the argmax, the predicted class, is unchanged)."""
    _check_temperature(temperature)
    return _array("logits", logits).astype(np.float64) / float(temperature)


def _check_temperature(t: object) -> None:
    if isinstance(t, bool) or not isinstance(t, Real) or not (math.isfinite(t) and t > 0):
        raise ValueError(f"temperature: expected a finite number > 0, got {t!r}")


def temperature_nll(logits: object, y: object, temperature: float = 1.0) -> float:
    """The mean negative log-likelihood of the labels ``y`` (N,) under ``softmax(logits / T)``:
    ``mean_i(logsumexp(z_i / T) - z_{i, y_i} / T)``, the quantity temperature scaling minimises."""
    z, labels = _logits_and_labels(logits, y)
    _check_temperature(temperature)
    return _nll(z, labels, float(temperature))


def _nll(z: np.ndarray, labels: np.ndarray, t: float) -> float:
    s = z / t
    return float(np.mean(_logsumexp(s) - s[np.arange(len(labels)), labels]))


def fit_temperature(
    logits: object, y: object, bounds: tuple[float, float] = TEMPERATURE_BOUNDS, tol: float = LOG_T_TOLERANCE
) -> float:
    """The temperature ``T`` that minimises the NLL of ``y`` (N,) under ``softmax(logits / T)``
    on held-out rows (``logits``: (N, C), never the rows the model was trained on: there it is
    over-confident by construction).

    Golden-section search over ``log T`` in ``bounds`` to a width ``tol`` (see the module's
    docstring for why the NLL is unimodal there and why not LBFGS); returns the bound itself when
    the minimum lies at or beyond it (perfectly separated rows: ``T`` at the lower bound)."""
    z, labels = _logits_and_labels(logits, y)
    lo, hi = bounds
    if not (0 < lo < hi < math.inf):
        raise ValueError(f"bounds: expected 0 < low < high < inf, got {bounds!r}")
    if not (isinstance(tol, Real) and tol > 0):
        raise ValueError(f"tol: expected a number > 0, got {tol!r}")
    a, b = math.log(lo), math.log(hi)

    def f(u: float) -> float:
        return _nll(z, labels, math.exp(u))

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
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
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
    if isinstance(alpha, bool) or not isinstance(alpha, Real) or not (0 < alpha < 1):
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
