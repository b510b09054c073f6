"""How a trained model holds up when a modality goes missing or gets noisy (``attnfuse evaluate
--missing``): the robustness curves MultiBench reports (Liang et al., "MultiBench: Multiscale
Benchmarks for Multimodal Representation Learning", NeurIPS 2021: performance as modalities
get noisier or go missing), for the model and, on the same rows, for the baselines.

On the evaluated rows (the test part; all rows for data without one), for each modality in turn:

* **absent** for 0, 25, 50, 75 and 100% of the rows. For the fusion an absent modality is an
  all-False mask (and zero features), the same input a sample without that modality has in the
  data: attention never looks at masked tokens, so "absent" is exact, not an imitation. The rows
  are drawn once per modality from ``seed`` as a permutation, the first 25% of it absent at 25%
  and so on (nested: the curve is not a new draw at each level), and the same rows are absent
  for the model and for the baselines.
* **noisy**: Gaussian noise of standard deviation 0, 0.25, 0.5, 1 and 2 added to every valid
  feature of the modality on every row, in standardised units (1 = the feature's own standard
  deviation on the training rows). One draw of ``eps`` per modality serves every scale (the curve
  moves with the scale only) and both sides: the model sees ``z + s * eps`` (``z`` its standardised
  input), the baselines ``x + s * std * eps``, the same perturbation in the original units.

The baselines (:mod:`attnfuse.baselines`: logistic/ridge and gradient boosting on the features
averaged over steps) are fitted as ``attnfuse train`` fits them, on the model's training rows;
they cannot take a mask, so they **impute**: an absent modality's pooled features become their
mean on the training rows (and its presence column, where the data has one, 0); noise is pooled
with the features (averaging over steps is linear, so the pooled noise is the mean of ``eps``
over the valid steps). Baselines need the model's training rows: on other data (``--data`` with
rows that are not the training data) only the model is measured.

The rows are read, standardised, perturbed and predicted :data:`CHUNK` rows at a time (each chunk
read once for every modality and level; ``eps`` drawn per chunk from ``seed``), so a large or
memory-mapped test part is never loaded whole; the baselines' pooled features are in memory, as
when they were fitted.

The result (:class:`Robustness`) holds every metric at every level; :func:`robustness_table`
prints the headline metric (accuracy, or R² for regression) and :func:`plot_robustness` draws it.
"""

from __future__ import annotations

import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .baselines import BASELINES, fit_baseline, pooled_features, predict_baseline
from .checkpoint import fingerprint
from .checks import check_int
from .data import Batch, MultimodalDataset, RowBatches, Standardizer
from .ensemble import Ensemble
from .files import write_bytes
from .fusion import FusionModel
from .metrics import compute_metrics
from .pipeline import split_parts
from .training import predict, to_predictions

__all__ = [
    "FRACTIONS",
    "NOISE_SCALES",
    "HEADLINE",
    "Robustness",
    "missing_modalities",
    "robustness_table",
    "plot_robustness",
]

FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)
NOISE_SCALES = (0.0, 0.25, 0.5, 1.0, 2.0)  # standard deviations of the training rows
HEADLINE = {"classification": "accuracy", "regression": "r2"}
# The name of a --fusion auto model (a weighted ensemble of fusion models and baselines) in the curves.
ENSEMBLE = "weighted ensemble"
KINDS = ("absent", "noise")
CHUNK = 1024  # rows read, perturbed and predicted at a time (the noise is drawn per chunk of this size)


@dataclass
class Robustness:
    """The curves of :func:`missing_modalities`.

    ``absent[modality][model]``: one metrics dict per fraction of :attr:`fractions`;
    ``noise[modality][model]``: one per scale of :attr:`scales`. ``models``: the fusion first
    (named by its fusion), then the baselines that could be fitted; ``skipped``: ``{baseline:
    reason}`` for the others; ``rows``: which part was evaluated (``"test"`` or ``"all"``), ``n``
    its size; ``note``: why there are no baselines, when there are none."""

    task: str
    metric: str
    rows: str
    n: int
    seed: int
    fractions: list[float]
    scales: list[float]
    models: list[str]
    absent: dict[str, dict[str, list[dict[str, float]]]] = field(default_factory=dict)
    noise: dict[str, dict[str, list[dict[str, float]]]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    note: str | None = None
    seconds: float = 0.0  # not part of to_dict(): evaluation.json stays reproducible

    def curve(self, kind: str, modality: str, model: str, metric: str | None = None) -> list[float]:
        """The headline (or ``metric``) values of one curve, in the order of the levels."""
        cells = getattr(self, kind)[modality][model]
        return [c[metric or self.metric] for c in cells]

    def cost(self, modality: str, model: str | None = None) -> float:
        """How much of the headline metric ``model`` (default: the fusion) loses when ``modality``
        goes absent: the score at the first fraction minus the score at the last (with the default
        fractions, 0% minus 100%; positive: worse without it)."""
        values = self.curve("absent", modality, model or self.models[0])
        return values[0] - values[-1]

    def to_dict(self) -> dict[str, Any]:
        """The JSON block of ``evaluation.json`` (``"missing"``)."""
        out: dict[str, Any] = {
            "rows": self.rows,
            "n": self.n,
            "seed": self.seed,
            "metric": self.metric,
            "fractions": self.fractions,
            "noise_scales": self.scales,
            "models": self.models,
            "absent": self.absent,
            "noise": self.noise,
        }
        if self.skipped:
            out["skipped"] = self.skipped
        if self.note:
            out["note"] = self.note
        return out


def _levels(name: str, values: Any, upper: float | None) -> list[float]:
    """``values`` as a list of floats in [0, upper] (``upper`` None: >= 0), at least one."""
    bound = f"in [0, {upper:g}]" if upper is not None else ">= 0"
    try:
        levels = [float(v) for v in values if not isinstance(v, bool)]
        if len(levels) != len(values):
            raise TypeError
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected one or more finite numbers {bound}, got {values!r}") from None
    if not levels or any(not np.isfinite(v) or v < 0 or (upper is not None and v > upper) for v in levels):
        raise ValueError(f"{name}: expected one or more finite numbers {bound}, got {list(values)!r}")
    return levels


def missing_modalities(
    net: FusionModel | Ensemble,
    config: dict,
    standardizer: Standardizer,
    data: MultimodalDataset,
    *,
    fractions: Any = FRACTIONS,
    scales: Any = NOISE_SCALES,
    seed: int = 0,
    baselines: bool = True,
) -> Robustness:
    """The robustness curves of a trained model (``net``, ``config``, ``standardizer`` as
    :func:`attnfuse.pipeline.load_trained` returns them) on ``data`` (targets needed); see the
    module's docstring. ``fractions``: shares of the rows without the modality, in [0, 1];
    ``scales``: noise standard deviations in standardised units; ``seed``: which rows go absent
    and which noise is drawn; ``baselines``: also measure the baselines (on the training data)."""
    start = time.perf_counter()
    if data.y is None:
        raise ValueError(f"data: {data.name} has no targets to measure the robustness against")
    fractions, scales = _levels("fractions", fractions, 1.0), _levels("scales", scales, None)
    seed = check_int("seed", seed, 0)
    parts = split_parts(data, config)
    part = "test" if "test" in parts and parts["test"].size else "all"
    rows = parts[part]
    fusion = ENSEMBLE if config.get("weighted") else str(config["fusion"])  # auto: the whole ensemble is measured
    result = Robustness(data.task, HEADLINE[data.task], part, int(rows.size), seed, fractions, scales, [fusion])
    sentiment = config["train"].get("metrics") == "sentiment"

    def score(pred: np.ndarray) -> dict[str, float]:
        return compute_metrics(data.task, data.y[rows], pred, sentiment=sentiment)

    side = _Baselines.fit(data, config, parts, rows, result) if baselines else _Baselines()
    rank = _absence_ranks(data, rows.size, seed)
    absent_out, noise_out, pooled_eps = _fusion_predictions(net, data, rows, standardizer, rank, result)
    columns = _columns(data, side.used)  # modality -> (feature columns, presence column or None)
    for spec in data.modalities:
        m = spec.name
        result.absent[m] = {fusion: [score(p) for p in absent_out[m]]}
        result.noise[m] = {fusion: [score(p) for p in noise_out[m]]}
        noise = standardizer.std[m].astype(np.float64) * np.nan_to_num(pooled_eps[m])  # (R, D), original units
        for name, model in side.fitted.items():
            result.absent[m][name] = [score(p) for p in side.absent(model, columns[m], rank[m], fractions)]
            result.noise[m][name] = [score(p) for p in side.noisy(model, columns[m][0], noise, scales)]
    result.seconds = time.perf_counter() - start
    return result


def _absence_ranks(data: MultimodalDataset, n: int, seed: int) -> dict[str, np.ndarray]:
    """modality -> (R,) each evaluated row's place in a seeded permutation: the row is absent at
    fraction f when its place is < round(f R), so the absent rows are nested across levels."""
    rank = {}
    for i, spec in enumerate(data.modalities):
        rank[spec.name] = np.empty(n, dtype=np.int64)
        rank[spec.name][np.random.default_rng([seed, i]).permutation(n)] = np.arange(n)
    return rank


def _fusion_predictions(
    net: FusionModel | Ensemble,
    data: MultimodalDataset,
    rows: np.ndarray,
    standardizer: Standardizer,
    rank: dict[str, np.ndarray],
    result: Robustness,
) -> tuple[dict[str, list[np.ndarray]], dict[str, list[np.ndarray]], dict[str, np.ndarray]]:
    """The fusion's predictions at every level, ``{modality: [(R, ...) per level]}`` for absence and
    for noise, and the noise each row got pooled over its valid steps ``{modality: (R, D)}`` (NaN
    where the modality is absent), gathered :data:`CHUNK` rows at a time (a large test part, or a
    memory-mapped one, is never loaded whole): each chunk is read and standardised once."""
    n, task = rows.size, result.task
    absent_out = {m.name: [[] for _ in result.fractions] for m in data.modalities}
    noise_out = {m.name: [[] for _ in result.scales] for m in data.modalities}
    pooled_eps = {m.name: np.empty((n, m.dim)) for m in data.modalities}
    for c, at in enumerate(range(0, n, CHUNK)):
        chunk = slice(at, at + CHUNK)
        clean = RowBatches(data, rows[chunk], standardizer).to_batch()  # standardised (B, T, D) per modality
        for i, spec in enumerate(data.modalities):
            m = spec.name
            for level, f in enumerate(result.fractions):
                gone = np.flatnonzero(rank[m][chunk] < round(f * n))  # positions in the chunk
                absent_out[m][level].append(_predict(net, task, _absent(clean, m, gone)))
            eps = np.random.default_rng([result.seed, i, c]).standard_normal(clean.x[m].shape).astype(np.float32)
            for level, s in enumerate(result.scales):
                noise_out[m][level].append(_predict(net, task, _noisy(clean, m, s, eps)))
            pooled_eps[m][chunk] = _pooled(eps, clean.mask[m].numpy())
    joined = {m: [np.concatenate(p) for p in levels] for m, levels in absent_out.items()}
    noisy = {m: [np.concatenate(p) for p in levels] for m, levels in noise_out.items()}
    return joined, noisy, pooled_eps


def _pooled(eps: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(B, T, D) noise averaged over each row's valid steps (B, T) -> (B, D); NaN where none is."""
    with np.errstate(invalid="ignore", divide="ignore"):  # 0/0 = NaN where the modality is absent
        return (eps * valid[..., None]).sum(axis=1, dtype=np.float64) / valid.sum(axis=1, keepdims=True)


@dataclass
class _Baselines:
    """The baselines on the evaluated rows: fitted on the model's training rows, fed the pooled
    features of the evaluated rows (``pooled``, (R, F)), an absent modality mean-imputed."""

    fitted: dict[str, Any] = field(default_factory=dict)
    pooled: np.ndarray | None = None  # (R, F)
    used: np.ndarray | None = None  # the rows whose pooled columns fit_baselines used
    train_mean: np.ndarray | None = None  # (F,): what mean imputation puts in

    @classmethod
    def fit(
        cls, data: MultimodalDataset, config: dict, parts: dict[str, np.ndarray], rows: np.ndarray, result: Robustness
    ) -> _Baselines:
        """Fitted as ``attnfuse train`` fits them, when ``data`` is the model's training data (its
        fingerprint); otherwise none, and ``result.note`` says why."""
        if config["data"].get("fingerprint") != fingerprint(data) or parts.get("train") is None:
            result.note = (
                "the baselines are fitted on the model's training rows: they are measured on the training data "
                "(evaluate without --data, or with the data it was trained on)"
            )
            return cls()
        # The rows and columns fit_baselines used: every part's rows pooled together (a presence
        # column for each modality absent in any of them), the training rows' part fitted on.
        used = np.unique(np.concatenate([r for name, r in parts.items() if name != "all"]))
        x_used = pooled_features(data, used)  # (U, F)
        x_train = x_used[np.searchsorted(used, parts["train"])]
        fitted, result.skipped = _fit_baselines(data, x_train, data.y[parts["train"]], config)
        result.models += list(fitted)
        return cls(fitted, x_used[np.searchsorted(used, rows)], used, _column_means(x_train))

    def absent(self, model: Any, columns: tuple, rank: np.ndarray, fractions: list[float]) -> list[np.ndarray]:
        """Predictions with the modality mean-imputed on the rows the fusion lost it on, per fraction."""
        cols, presence = columns
        out = []
        for f in fractions:
            x = self.pooled.copy()
            gone = np.flatnonzero(rank < round(f * len(rank)))
            x[np.ix_(gone, cols)] = self.train_mean[cols]  # mean imputation
            if presence is not None:
                x[gone, presence] = 0.0
            out.append(predict_baseline(model, x))
        return out

    def noisy(self, model: Any, cols: np.ndarray, noise: np.ndarray, scales: list[float]) -> list[np.ndarray]:
        """Predictions with the fusion's noise in original units, pooled as the features are (the
        mean over valid steps is linear; NaN, absent, stays NaN: no noise on what is not there)."""
        out = []
        for s in scales:
            x = self.pooled.copy()
            x[:, cols] += s * noise
            out.append(predict_baseline(model, x))
        return out


def _fit_baselines(data: MultimodalDataset, x: np.ndarray, y: np.ndarray, config: dict) -> tuple[dict, dict[str, str]]:
    """The baselines of ``data.task`` fitted on pooled features ``x`` (R, F) and targets ``y`` by
    :func:`attnfuse.baselines.fit_baseline`, as ``attnfuse train`` fits them (same seed):
    ``({name: fitted model}, {name: why it could not be fitted})``."""
    seed = int(config["train"].get("seed", 0))
    fitted, skipped = {}, {}
    for name in BASELINES[data.task]:
        try:
            fitted[name] = fit_baseline(name, data, x, y, seed)
        except Exception as e:  # a comparison that cannot be made ends no evaluation
            skipped[name] = " ".join(str(e).split()) or type(e).__name__
    return fitted, skipped


def _column_means(x: np.ndarray) -> np.ndarray:
    """(F,) the mean of each column over its non-NaN values; 0 for a column that is all NaN (a
    modality absent from every training row: the linear baselines' imputer makes it 0 too)."""
    present = ~np.isnan(x)
    count = present.sum(axis=0)
    return np.where(count > 0, np.where(present, x, 0.0).sum(axis=0) / np.maximum(count, 1), 0.0)


def _columns(data: MultimodalDataset, used: np.ndarray | None) -> dict[str, tuple[np.ndarray, int | None]]:
    """modality -> (its columns in ``pooled_features(data, used)``, its presence column or None):
    the modalities' features in order, then one presence column per modality absent for at least
    one of the ``used`` rows, in the same order (as :func:`attnfuse.baselines.pooled_features`
    builds them)."""
    out, at = {}, 0
    for spec in data.modalities:
        out[spec.name] = (np.arange(at, at + spec.dim), None)
        at += spec.dim
    if used is not None:
        for spec in data.modalities:
            if not data.valid_mask(spec.name)[used].any(axis=1).all():
                out[spec.name], at = (out[spec.name][0], at), at + 1
    return out


def _absent(batch: Batch, modality: str, gone: np.ndarray) -> Batch:
    """``batch`` with ``modality`` absent on rows ``gone``: an all-False mask and zero features,
    as a sample without that modality has them in the data."""
    x, mask = dict(batch.x), dict(batch.mask)
    if gone.size:
        index = torch.from_numpy(gone)
        x[modality], mask[modality] = x[modality].clone(), mask[modality].clone()
        x[modality][index] = 0.0
        mask[modality][index] = False
    return Batch(x, mask, batch.y)


def _noisy(batch: Batch, modality: str, scale: float, eps: np.ndarray) -> Batch:
    """``batch`` with ``scale * eps`` added to ``modality``'s valid tokens (invalid stay 0)."""
    x = dict(batch.x)
    if scale:
        valid = batch.mask[modality].unsqueeze(-1)  # (R, T, 1)
        x[modality] = (batch.x[modality] + scale * torch.from_numpy(eps)).masked_fill_(~valid, 0.0)
    return Batch(x, batch.mask, batch.y)


def _predict(net: FusionModel | Ensemble, task: str, batch: Batch) -> np.ndarray:
    return to_predictions(task, predict(net, batch))


def _cell(v: float | None) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:.4f}"


def robustness_table(result: Robustness) -> list[tuple[str, list[str], list[list[str]]]]:
    """The two tables as ``(title, header, rows)``: the headline metric per modality and model
    (rows) at each share absent / noise scale (columns)."""
    out = []
    for kind in KINDS:
        levels = result.fractions if kind == "absent" else result.scales
        if kind == "absent":
            title = f"{result.metric} on the {result.n} {result.rows} rows with a modality absent from a share of them"
            header = ["modality", "model", *(f"{f:.0%}" for f in levels)]
        else:
            title = (
                f"{result.metric} on the {result.n} {result.rows} rows with Gaussian noise on a modality "
                "(standard deviations of its training rows)"
            )
            header = ["modality", "model", *(f"{s:g}" for s in levels)]
        body = []
        for m in getattr(result, kind):
            for name in result.models:
                label = _label(name, result)  # the others: baselines
                body.append([m, label, *(_cell(v) for v in result.curve(kind, m, name))])
        out.append((title, header, body))
    return out


def _label(name: str, result: Robustness) -> str:
    """A model's name in tables and plots: the measured model marked as such, the baselines as named."""
    if name != result.models[0]:
        return name
    return f"{name} (the model)" if name == ENSEMBLE else f"{name} (fusion)"


def plot_robustness(result: Robustness, path: str | Path, title: str | None = None) -> None:
    """A PNG of the curves: one column per modality, the share absent (top) and the noise scale
    (bottom) on the x axes, the headline metric on the y axes; the fusion solid, the baselines
    dashed. Written atomically."""
    import io

    from matplotlib.figure import Figure  # no pyplot: a notebook's plotting is left alone

    modalities = list(result.absent)
    k = len(modalities)
    width = 2.6 * k + 1.0  # inches
    shown = "R²" if result.metric == "r2" else result.metric
    fig = Figure(figsize=(width, 5.2), layout="constrained")
    axes = fig.subplots(2, k, squeeze=False, sharey="row")
    styles = {name: ("-" if i == 0 else "--") for i, name in enumerate(result.models)}
    for j, m in enumerate(modalities):
        for row, kind in enumerate(KINDS):
            ax = axes[row][j]
            levels = [100 * f for f in result.fractions] if kind == "absent" else result.scales
            for name in result.models:
                label = _label(name, result)
                ax.plot(
                    levels,
                    result.curve(kind, m, name),
                    styles[name],
                    marker="o",
                    markersize=3,
                    linewidth=2.0 if name == result.models[0] else 1.2,
                    label=label,
                )
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(m)
                ax.set_xlabel(f"% of rows without {m}")
            else:
                ax.set_xlabel("noise (training std)")
            if j == 0:
                ax.set_ylabel(f"{shown} ({'absent' if kind == 'absent' else 'noisy'})")
    axes[0][0].legend(fontsize="small", loc="best")
    if title:  # wrapped to the figure's width (about 11 characters an inch at this size)
        fig.suptitle("\n".join(textwrap.wrap(title, int(11 * width))))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    write_bytes(path, buffer.getvalue())
