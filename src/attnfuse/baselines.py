"""The classical models a user would try first, fitted on the same training rows as the fusion.

Every ``attnfuse train`` also fits, on the features pooled over time and concatenated:

=================  =======================================================================
``logistic``       classification: ``StandardScaler`` + ``LogisticRegression``
``ridge``          regression: ``StandardScaler`` + ``RidgeCV`` (leave-one-out CV over alpha)
``hist_gb``        both: ``HistGradientBoostingClassifier`` / ``...Regressor`` (32 bins, early stopping)
=================  =======================================================================

and scores them with the fusion's metrics on the same train / valid / test rows, so a fusion
that loses to a linear model on the user's own split says so (:func:`verdict`).

A baseline is a comparison, never the point of the run: one that cannot be fitted on the rows
given (a training part holding a single class, say) is skipped, and its entry says why
(``{"skipped": reason}`` in place of its splits, :func:`skipped`). On small data gradient
boosting adapts (:func:`make_baseline`): no early-stopping part when it would not hold every
class twice, and leaves small enough for the tree to split at all.

Features (:func:`pooled_features`): each modality becomes the mean of its valid steps (a vector
modality is itself), and the modalities are concatenated. A modality absent for a sample has
NaN features there, plus one presence column (1 present, 0 absent) per modality that is absent
somewhere in the data. The linear models replace the NaN by the training rows' mean (so that,
after standardisation, an absent modality contributes exactly 0 and only its presence column
carries the information); gradient boosting handles NaN natively (it learns which branch the
missing values take).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .data import MultimodalDataset
from .metrics import compute_metrics, summarize

__all__ = [
    "BASELINES",
    "pooled_features",
    "presence_columns",
    "make_baseline",
    "fit_baselines",
    "fit_baseline",
    "predict_baseline",
    "BaselineResult",
    "skipped",
    "summarize_baselines",
    "verdict",
    "verdict_line",
]

# task -> baseline names, in the order of the printed table.
BASELINES: dict[str, tuple[str, ...]] = {
    "classification": ("logistic", "hist_gb"),
    "regression": ("ridge", "hist_gb"),
}
RIDGE_ALPHAS = np.logspace(-3, 4, 15)  # RidgeCV's default (0.1, 1, 10) is too narrow for a few hundred rows
# Gradient boosting's early stopping holds out this share of the training rows (stratified for
# classification); it is used only when that part would hold EARLY_STOPPING_ROWS rows of every
# class (regression: EARLY_STOPPING_REGRESSION_ROWS rows), else the model trains its max_iter
# iterations on every row.
EARLY_STOPPING_FRACTION = 0.1
EARLY_STOPPING_ROWS = 2
EARLY_STOPPING_REGRESSION_ROWS = 20
MIN_SAMPLES_LEAF = 20  # scikit-learn's default, lowered on small data (see make_baseline)


def pooled_features(
    data: MultimodalDataset, rows: np.ndarray | None = None, chunk: int = 4096, presence: list[str] | None = None
) -> np.ndarray:
    """The baselines' input for ``rows`` (default all): ``(R, sum_m D_m + A)`` float64.

    Columns: for each modality in order, its features averaged over the valid steps ``(R, D_m)``
    (NaN where the modality is absent), then one presence column for each of the A modalities
    that are absent in at least one of the rows (``presence``: for these modalities instead, so
    that features of other rows have the same columns). Read ``chunk`` rows at a time (a
    memory-mapped dataset is never loaded whole)."""
    rows = np.arange(data.n) if rows is None else np.asarray(rows, dtype=np.int64)
    with_presence = presence_columns(data, rows) if presence is None else presence
    pooled, present_columns = [], []
    for spec in data.modalities:
        valid = data.valid_mask(spec.name)[rows]  # (R, T)
        count = valid.sum(axis=1, keepdims=True)  # (R, 1)
        total = np.zeros((rows.size, spec.dim))
        for at in range(0, rows.size, chunk):
            # gather: float32 (B, T, D) with invalid steps zeroed, so the sum is over valid steps.
            total[at : at + chunk] = data.gather(spec.name, rows[at : at + chunk]).sum(axis=1, dtype=np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            pooled.append(total / count)  # (R, D); 0/0 = NaN where absent
        if spec.name in with_presence:
            present_columns.append((count > 0).astype(np.float64))  # (R, 1)
    return np.concatenate(pooled + present_columns, axis=1)


def presence_columns(data: MultimodalDataset, rows: np.ndarray | None = None) -> list[str]:
    """The modalities that :func:`pooled_features` gives a presence column for ``rows``: those
    absent (no valid step) in at least one of them."""
    rows = np.arange(data.n) if rows is None else np.asarray(rows, dtype=np.int64)
    return [spec.name for spec in data.modalities if not data.valid_mask(spec.name)[rows].any(axis=1).all()]


def make_baseline(name: str, task: str, seed: int = 0, target_dim: int = 1, y: np.ndarray | None = None):
    """An unfitted scikit-learn estimator for baseline ``name`` (see :data:`BASELINES`).

    ``y``: the training targets, when known: gradient boosting then fits its settings to the rows.
    Its early-stopping part (:data:`EARLY_STOPPING_FRACTION` of them) is split off only when it
    would hold :data:`EARLY_STOPPING_ROWS` rows of every class (regression:
    :data:`EARLY_STOPPING_REGRESSION_ROWS` rows; scikit-learn refuses a stratified
    part smaller than the number of classes: 40 rows of 5 classes failed), and its leaves need at
    most a tenth of the rows (the default 20 rows a leaf left 28 training rows a single split)."""
    if name not in BASELINES.get(task, ()):
        raise ValueError(f"baseline: expected one of {BASELINES.get(task, ())} for {task}, got {name!r}")
    # Imported here: scikit-learn (with SciPy) takes longer to import than the rest of the command
    # line together, and `attnfuse --help`, `predict` or `explain` never need it.
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression, RidgeCV
    from sklearn.multioutput import MultiOutputRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if name == "hist_gb":
        # Early stopping on 10% of the training rows (never the validation rows, which judge the
        # baselines against the fusion); 32 bins instead of 255: 3-4x faster on mfeat's 649
        # features with the same accuracy (benchmarks/RESULTS.md).
        kwargs = {"early_stopping": True, "max_bins": 32, "random_state": seed}
        if y is not None:
            kwargs.update(_boosting_size(task, np.asarray(y)))
        if task == "classification":
            return HistGradientBoostingClassifier(**kwargs)
        model = HistGradientBoostingRegressor(**kwargs)
        return model if target_dim == 1 else MultiOutputRegressor(model)
    # keep_empty_features: a modality absent from every training row becomes zeros, not a dropped column.
    impute = SimpleImputer(strategy="mean", keep_empty_features=True)
    linear = LogisticRegression(max_iter=2000) if name == "logistic" else RidgeCV(alphas=RIDGE_ALPHAS)
    return make_pipeline(impute, StandardScaler(), linear)


def _boosting_size(task: str, y: np.ndarray) -> dict:
    """Gradient boosting's early stopping and leaf size for the training targets ``y``."""
    n = len(y)
    if task == "classification":
        smallest = int(np.unique(y, return_counts=True)[1].min()) if n else 0
        stop = smallest * EARLY_STOPPING_FRACTION >= EARLY_STOPPING_ROWS  # the smallest class's rows in the part
    else:
        stop = n * EARLY_STOPPING_FRACTION >= EARLY_STOPPING_REGRESSION_ROWS
    return {"early_stopping": stop, "min_samples_leaf": max(1, min(MIN_SAMPLES_LEAF, n // 10))}


@dataclass
class BaselineResult:
    """Each baseline's metrics per split (``{name: {split: {metric: value}}}``, or ``{name:
    {"skipped": reason}}`` for one that could not be fitted) and the seconds it took to fit and
    predict (``{name: seconds}``, fitted ones; timings are not part of ``metrics.json``, which
    stays reproducible bit for bit)."""

    metrics: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    models: dict[str, Any] = field(default_factory=dict)  # name -> the fitted estimator (not saved as such)
    presence: list[str] = field(default_factory=list)  # the modalities with a presence column


def fit_baselines(
    data: MultimodalDataset, splits: dict[str, np.ndarray], seed: int = 0, sentiment: bool = False
) -> BaselineResult:
    """Fit every baseline of ``data.task`` on ``splits["train"]`` and score it on every split
    that has rows (an empty test part has no metrics, as the fusion's has none).

    ``splits``: ``{"train": rows, "valid": rows, "test": rows}`` as the fusion was trained on."""
    used = np.unique(np.concatenate([np.asarray(r, dtype=np.int64) for r in splits.values()]))
    x = pooled_features(data, used)  # (R, F): row used[i] is x[i]
    y = np.asarray(data.y[used])
    part = {split: np.searchsorted(used, rows) for split, rows in splits.items()}
    result = BaselineResult(presence=presence_columns(data, used))
    y_train = y[part["train"]]
    for name in BASELINES[data.task]:
        start = time.perf_counter()
        try:
            model = fit_baseline(name, data, x[part["train"]], y_train, seed)
            pred = predict_baseline(model, x)  # (R,) labels, or (R,) / (R, K) values
        except Exception as e:  # a comparison that cannot be made ends no run
            result.metrics[name] = {"skipped": _why(e, y_train, data.task)}
            continue
        result.models[name] = model
        result.metrics[name] = {
            split: compute_metrics(data.task, y[at], pred[at], sentiment=sentiment)
            for split, at in part.items()
            if at.size
        }
        result.seconds[name] = time.perf_counter() - start
    return result


def fit_baseline(name: str, data: MultimodalDataset, x: np.ndarray, y: np.ndarray, seed: int = 0):
    """Baseline ``name`` (:func:`make_baseline` for ``data``'s task and targets) fitted on pooled
    features ``x`` (R, F) and targets ``y``, on one thread, without scikit-learn's convergence
    warnings (a tiny table: lbfgs may stop short). Whatever the fit raises is raised."""
    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits  # (installed with scikit-learn)

    model = make_baseline(name, data.task, seed, data.target_dim or 1, y=y)
    # One thread: OpenMP's threads spin-wait at every barrier, so on a machine whose cores are busy
    # (another job, torch's own threads) a multi-threaded fit can take many times as long as a
    # single-threaded one; these small fits gain little from a second thread anyway.
    with threadpool_limits(limits=1), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x, y)
    return model


def predict_baseline(model, x: np.ndarray) -> np.ndarray:
    """A fitted baseline's predictions on pooled features ``x`` (R, F), on one thread."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        return model.predict(x)


def _why(e: Exception, y_train: np.ndarray, task: str) -> str:
    """Why a baseline could not be fitted, in one line (scikit-learn's message, with the rows)."""
    rows = f"{len(y_train)} training rows"
    if task == "classification":
        k = np.unique(y_train).size
        rows += f" of {k} class{'es' if k != 1 else ''}"
    message = " ".join(str(e).split()) or type(e).__name__
    kind = "" if isinstance(e, ValueError) else f"{type(e).__name__}: "
    return f"cannot be fitted on {rows}: {kind}{message}"


def skipped(baselines: dict[str, dict]) -> dict[str, str]:
    """``{name: reason}`` of the baselines in ``baselines`` (``{name: {split: ...}}``, one run's
    or a summary) that could not be fitted (in a summary: in some run)."""
    return {name: parts["skipped"] for name, parts in baselines.items() if "skipped" in parts}


def summarize_baselines(runs: list[dict[str, dict[str, dict[str, float]]]]) -> dict:
    """Mean ± std of each baseline's metrics over runs: ``{name: {split: {metric: {mean, std}}}}``,
    over the runs it could be fitted in; one skipped in some runs also has ``"skipped"``: in how
    many runs, and the first run's reason."""
    out: dict[str, dict] = {}
    for name in dict.fromkeys(n for r in runs for n in r):
        parts = [r[name] for r in runs if name in r]
        fitted = [p for p in parts if "skipped" not in p]
        entry = {split: summarize([p[split] for p in fitted]) for split in fitted[0]} if fitted else {}
        reasons = [p["skipped"] for p in parts if "skipped" in p]
        if reasons:
            entry["skipped"] = reasons[0] if not fitted else f"in {len(reasons)} of {len(parts)} runs: {reasons[0]}"
        out[name] = entry
    return out


def verdict(
    selection: tuple[str, str], fusion_valid: dict, baselines: dict[str, dict], se: float | None = None
) -> dict | None:
    """The best baseline on the validation split, when it beats the fusion there; else None.

    ``selection``: (metric, "max" or "min"), the metric that early stopping and ``--fusion auto``
    select with (:meth:`attnfuse.training.TrainConfig.selection_metric`); ``fusion_valid``: the
    fusion's validation metrics; ``baselines``: ``{name: {split: metrics}}``. Values may be floats
    or ``{"mean", "std"}`` summaries (with ``--repeat``; means are compared); skipped baselines
    and undefined (NaN or None) scores are left out. ``se``: the standard
    error of the fusion's validation score; a baseline ahead by no more than it is not ``"clear"``
    (the validation rows cannot tell the two apart). Returns ``{"baseline", "metric",
    "higher_is_better", "baseline_score", "fusion_score", "standard_error", "clear"}``."""
    metric, mode = selection

    def score(metrics: dict) -> float:
        v = metrics[metric]
        v = v["mean"] if isinstance(v, dict) else v
        return float("nan") if v is None else float(v)

    sign = 1.0 if mode == "max" else -1.0
    # Baselines that were fitted, with a defined validation score (accuracy of 0 valid rows is not one).
    scored = {n: b for n, b in baselines.items() if "valid" in b and not np.isnan(score(b["valid"]))}
    if not scored or np.isnan(score(fusion_valid)):
        return None
    best = max(scored, key=lambda n: sign * score(scored[n]["valid"]))
    ours, theirs = score(fusion_valid), score(baselines[best]["valid"])
    if not sign * theirs > sign * ours:
        return None
    return {
        "baseline": best,
        "metric": metric,
        "higher_is_better": mode == "max",
        "baseline_score": theirs,
        "fusion_score": ours,
        "standard_error": se,
        "clear": se is None or sign * (theirs - ours) > se,
    }


def verdict_line(found: dict, fusion: str) -> str:
    """The one line that says a baseline (``found``, from :func:`verdict`) beats ``fusion`` on the
    validation split, with both scores; or, when it is ahead by less than a standard error, that
    the validation rows cannot tell them apart."""
    better = "higher" if found["higher_is_better"] else "lower"
    scores = f"{found['metric']} {found['baseline_score']:.4f} vs {found['fusion_score']:.4f} ({better} is better)"
    if not found.get("clear", True):
        return (
            f"the {found['baseline']} baseline is level with the {fusion} fusion on the validation split: "
            f"{scores}, a difference within one standard error ({found['standard_error']:.4f})"
        )
    return (
        f"the {found['baseline']} baseline beats the {fusion} fusion on the validation split: {scores}; "
        "attention fusion may not be what this data needs"
    )
