"""Every explanation of a trained model in one call: the methods chosen, over a split and for a
few samples, as plain dataclasses and numpy arrays (:func:`explain_model`; ``attnfuse explain``
renders its result with :func:`.report.write_report`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, TypeVar

import numpy as np

from ..data import Batch, MultimodalDataset, Standardizer
from ..ensemble import Ensemble, WeightedEnsemble, first_member
from ..fusion import FusionModel
from ..metrics import PRIMARY_METRIC, compute_metrics
from ..modules import AttentionMap
from ..training import to_predictions
from ._common import (
    explained_target,
    forward,
    fusion_name,
    to_numpy,
    token_modality,
    token_step,
    token_valid,
)
from .agreement import Agreement, agreement
from .attention import ModalityAttention, collect_maps, key_valid, modality_attention, require_attention
from .gradients import GRADIENT_METHODS, GradientAttribution, gradient_attribution
from .masking import MaskingImportance, masking_importance
from .rollout import Rollout, attention_rollout

__all__ = [
    "METHODS",
    "CHEAP_METHODS",
    "resolve_methods",
    "SampleExplanation",
    "Explanation",
    "explain_model",
    "column_names",
]

METHODS = ("attention", "mask", "ig", "gxi", "rollout")
# One forward (attention, rollout), one per hidden set (mask) or one backward (gxi) per sample;
# IG needs n_steps forward + backward passes per sample, so it runs only when asked for.
CHEAP_METHODS = ("attention", "mask", "gxi", "rollout")
NEEDS_ATTENTION = ("attention", "rollout")
T = TypeVar("T")


def resolve_methods(methods: str | Sequence[str], has_attention: bool) -> tuple[str, ...]:
    """The methods to run: "auto" -> the cheap ones, "all" -> every one, else a comma-separated
    list (or a sequence) of METHODS. With "auto"/"all" the attention methods are skipped for a model without
    attention; named explicitly they are an error for it."""
    if isinstance(methods, str):
        if methods in ("auto", "all"):
            chosen = CHEAP_METHODS if methods == "auto" else METHODS
            return tuple(m for m in chosen if has_attention or m not in NEEDS_ATTENTION)
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    methods = list(dict.fromkeys(methods))
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(
            f"method: expected 'auto', 'all' or a comma-separated list of {', '.join(METHODS)}, got {bad or methods!r}"
        )
    return tuple(m for m in METHODS if m in methods)  # a fixed order, whatever the order asked


@dataclass
class SampleExplanation:
    """One sample, every chosen method together.

    row: its index in the data. truth / prediction: target and prediction (class index, or value
    ``()``/``(K,)``). target: the output explained; output: its value. present: modality -> bool.
    masking: modality -> output minus the output without it; hidden_prediction: modality -> the
    prediction without it. gradients: method -> modality -> summed attribution. steps: sequence
    modality -> {method: ``(T,)`` per-step share within the modality}; step_valid: modality ->
    ``(T,)`` bool. maps: attention maps with weights ``(1, H, L, S)``; map_key_valid: block ->
    ``(S,)`` bool. rollout: ``(N,)`` relevance over ``rollout_tokens``; rollout_maps: stack ->
    (row tokens, column tokens, ``(L, N_s)`` rolled-out map, ``(L,)`` real rows, ``(N_s,)`` real
    columns).
    """

    row: int
    truth: np.ndarray
    prediction: np.ndarray
    target: int
    output: float
    present: dict[str, bool]
    masking: dict[str, float] | None = None
    hidden_prediction: dict[str, np.ndarray] | None = None
    gradients: dict[str, dict[str, float]] = field(default_factory=dict)
    steps: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    step_valid: dict[str, np.ndarray] = field(default_factory=dict)
    maps: list[AttentionMap] = field(default_factory=list)
    map_key_valid: dict[str, np.ndarray] = field(default_factory=dict)
    rollout: np.ndarray | None = None
    rollout_tokens: list[str] = field(default_factory=list)
    rollout_maps: dict[str, tuple[list[str], list[str], np.ndarray, np.ndarray, np.ndarray]] = field(
        default_factory=dict
    )


@dataclass
class Explanation:
    """The result of :func:`explain_model`: the model and data, the metric on the explained rows,
    each method's result over those rows (None / absent when not run), the agreement between them,
    the per-sample views, the seconds each method took, and notes on how to read the results.
    step_valid: sequence modality -> ``(T,)`` share of the explained rows in which each step is a
    real token (not padding, modality present). feature_names: modality -> the name of each feature
    (a table's columns, in the model's order), None where unknown."""

    fusion: str
    data: str
    task: str
    split: str
    rows: np.ndarray
    metric: str
    score: float
    methods: tuple[str, ...]
    modalities: list[str]
    step_valid: dict[str, np.ndarray]
    seconds: dict[str, float]
    attention: ModalityAttention | None
    masking: MaskingImportance | None
    gradients: dict[str, GradientAttribution]
    rollout: Rollout | None
    agreement: Agreement
    samples: list[SampleExplanation]
    notes: list[str]
    parameters: int
    feature_names: dict[str, list[str]] | None = None


def _shares_within(values: np.ndarray) -> np.ndarray:
    """|values| normalised to sum to 1 along the last axis (0 where all are 0)."""
    a = np.abs(values)
    total = a.sum(axis=-1, keepdims=True)
    return np.divide(a, total, out=np.zeros_like(a, dtype=np.float64), where=total > 0)


def _received_per_step(maps: list[AttentionMap], modality: str, length: int) -> np.ndarray:
    """``(B, T)`` attention landing on each step of ``modality`` (every block, head-mean, valid
    queries), normalised within the modality."""
    b = maps[0].weights.shape[0]
    total = np.zeros((b, length))
    for m in maps:
        cols = [j for j, t in enumerate(m.key_tokens) if token_modality(t) == modality]
        if not cols:
            continue
        w = to_numpy(m.weights.double().mean(dim=1) * m.query_valid.unsqueeze(-1))  # (B, L, S)
        steps = [token_step(m.key_tokens[j]) for j in cols]
        total[:, steps] += w[:, :, cols].sum(axis=1)
    return _shares_within(total)


def _sample_views(
    model: FusionModel,
    batch: Batch,
    rows: list[int],
    task: str,
    methods: tuple[str, ...],
    n_steps: int,
    target: int | None,
) -> list[SampleExplanation]:
    names = list(batch.x)
    outputs = forward(model, batch, len(rows))
    predictions = to_predictions(task, outputs)
    masking = masking_importance(model, batch, task, pairs=False, target=target) if "mask" in methods else None
    grads = {
        m: gradient_attribution(model, batch, task, m, target=target, n_steps=n_steps)
        for m in methods
        if m in GRADIENT_METHODS
    }
    maps = collect_maps(first_member(model), batch)[1] if "attention" in methods else []
    rollout = attention_rollout(first_member(model), batch, keep_stacks=True) if "rollout" in methods else None
    sequences = [s.name for s in model.config.modalities if s.is_sequence]

    targets = explained_target(task, outputs, target)  # the rule masking and gradients follow too
    views = []
    for i, row in enumerate(rows):
        t = int(targets[i])
        view = SampleExplanation(
            row=row,
            truth=to_numpy(batch.y[i]) if batch.y is not None else np.array(np.nan),
            prediction=np.asarray(predictions[i]),
            target=t,
            output=float(outputs[i, t]),
            present={n: bool(batch.mask[n][i].any()) for n in names},
        )
        if masking is not None:
            view.masking = {n: float(masking.delta[i, k]) for k, n in enumerate(names)}
            view.hidden_prediction = {n: np.asarray(masking.hidden_prediction[k][i]) for k, n in enumerate(names)}
        for method, g in grads.items():
            view.gradients[method] = {n: float(v) for n, v in zip(names, g.per_modality()[i])}
        for n in sequences:
            view.step_valid[n] = to_numpy(batch.mask[n][i])
            steps = {}
            if maps:
                steps["attention"] = _received_per_step([_one(m, i) for m in maps], n, model.specs[n].length)[0]
            if rollout is not None:
                steps["rollout"] = rollout.step_relevance(n)[i]
            for method, g in grads.items():
                steps[method] = _shares_within(g.per_step(n)[i])
            view.steps[n] = steps
        if maps:
            view.maps = [_one(m, i) for m in maps]
            view.map_key_valid = {m.name: to_numpy(key_valid(m, batch)[i]) for m in maps}
        if rollout is not None:
            view.rollout, view.rollout_tokens = rollout.relevance[i], rollout.tokens
            for name, (q_tokens, k_tokens, r) in rollout.stacks.items():
                real = (to_numpy(token_valid(t, batch.mask)[i]) for t in (q_tokens, k_tokens))
                view.rollout_maps[name] = (q_tokens, k_tokens, r[i], *real)
        views.append(view)
    return views


def _one(m: AttentionMap, i: int) -> AttentionMap:
    return AttentionMap(m.name, m.weights[i : i + 1], m.query_tokens, m.key_tokens, m.query_valid[i : i + 1])


def explain_model(
    model: FusionModel,
    dataset: MultimodalDataset,
    standardizer: Standardizer | None = None,
    rows: Sequence[int] | np.ndarray | None = None,
    *,
    split: str = "all",
    methods: str | Sequence[str] = "auto",
    samples: Sequence[int] | None = None,
    n_steps: int = 50,
    target: int | None = None,
    batch_size: int = 256,
    feature_names: Mapping[str, Sequence[str]] | None = None,
) -> Explanation:
    """Explain ``model`` on ``rows`` of ``dataset`` (default: all rows; ``split`` is their name in
    the report) and on the rows ``samples`` one by one (default: the first two of ``rows``; an
    empty list for none).

    ``dataset`` is raw data and ``standardizer`` the model's (from training or
    :func:`attnfuse.load_model`); pass None for data already standardised. ``methods``: see
    :func:`resolve_methods` (default "auto": attention, mask, gxi, rollout). The model may be on
    any device; every array in the result is on the CPU. ``feature_names``: modality -> one name
    per feature, as the model records a table's columns (:func:`column_names`); default: the
    dataset's own (``dataset.columns``), if any.
    """
    methods, rows, chosen = _checked_request(model, dataset, methods, rows, samples)
    scaled = standardizer.transform(dataset) if standardizer is not None else dataset
    task, batch, metric = dataset.task, scaled.to_batch(rows), PRIMARY_METRIC[dataset.task][0]
    seconds: dict[str, float] = {}
    outputs = _timed(seconds, "predict", lambda: forward(model, batch, batch_size))
    score = compute_metrics(task, dataset.y[rows], to_predictions(task, outputs))[metric]
    results = _run_methods(model, batch, task, methods, seconds, target=target, n_steps=n_steps, batch_size=batch_size)
    names = [m.name for m in dataset.modalities]
    agree = agreement(names, _modality_shares(results), results.masking)
    sample_views = []
    if chosen:
        sample_views = _timed(
            seconds,
            "samples",
            lambda: _sample_views(model, scaled.to_batch(chosen), chosen, task, methods, n_steps, target),
        )
    return Explanation(
        fusion=fusion_name(model),
        data=dataset.name,
        task=task,
        split=split,
        rows=rows,
        metric=metric,
        score=float(score),
        methods=methods,
        modalities=names,
        step_valid={s.name: to_numpy(batch.mask[s.name].double().mean(0)) for s in dataset.modalities if s.is_sequence},
        seconds=seconds,
        **results._asdict(),
        agreement=agree,
        samples=sample_views,
        notes=_notes(model, methods, results),
        parameters=sum(p.numel() for p in model.parameters()),
        feature_names=_feature_names(feature_names, dataset),
    )


def _checked_request(
    model: FusionModel,
    dataset: MultimodalDataset,
    methods: str | Sequence[str],
    rows: Sequence[int] | np.ndarray | None,
    samples: Sequence[int] | None,
) -> tuple[tuple[str, ...], np.ndarray, list[int]]:
    """:func:`explain_model`'s methods, rows and sample rows, checked before any work (the rows
    default to every row, the samples to the first two rows)."""
    methods = resolve_methods(methods, model.has_attention)
    if any(m in NEEDS_ATTENTION for m in methods):
        require_attention(model)
    if dataset.y is None:  # the scores and the masking importances compare predictions with targets
        raise ValueError(
            "data: explaining a model needs the targets; the data has none (for a table: name its target column "
            "with --target)"
        )
    rows = np.arange(dataset.n) if rows is None else np.asarray(rows, dtype=np.int64)
    if rows.ndim != 1 or rows.size == 0:
        raise ValueError(f"rows: expected a non-empty 1-D list of row indices, got shape {rows.shape}")
    chosen = [int(s) for s in (rows[:2] if samples is None else samples)]
    bad = [i for i in chosen if not 0 <= i < dataset.n]
    if bad:
        raise ValueError(f"samples: expected row indices in 0..{dataset.n - 1}, got {bad}")
    return methods, rows, chosen


def _timed(seconds: dict[str, float], name: str, fn: Callable[[], T]) -> T:
    """``fn()``, its wall time recorded as ``seconds[name]`` (the report's cost of each method)."""
    start = time.perf_counter()
    result = fn()
    seconds[name] = time.perf_counter() - start
    return result


class _MethodResults(NamedTuple):
    """What each method found over the explained rows, named as :class:`Explanation`'s fields
    (None, or no entry, for a method not chosen)."""

    attention: ModalityAttention | None
    masking: MaskingImportance | None
    gradients: dict[str, GradientAttribution]
    rollout: Rollout | None


def _run_methods(
    model: FusionModel,
    batch: Batch,
    task: str,
    methods: tuple[str, ...],
    seconds: dict[str, float],
    *,
    target: int | None,
    n_steps: int,
    batch_size: int,
) -> _MethodResults:
    """Every chosen method over the whole ``batch``, each timed into ``seconds``."""
    attention = (
        _timed(seconds, "attention", lambda: modality_attention(first_member(model), batch, batch_size))
        if "attention" in methods
        else None
    )
    masking = (
        _timed(seconds, "mask", lambda: masking_importance(model, batch, task, target=target, batch_size=batch_size))
        if "mask" in methods
        else None
    )
    gradients = {
        m: _timed(seconds, m, lambda m=m: gradient_attribution(model, batch, task, m, target=target, n_steps=n_steps))
        for m in methods
        if m in GRADIENT_METHODS
    }
    rollout = (
        _timed(seconds, "rollout", lambda: attention_rollout(first_member(model), batch, batch_size=batch_size))
        if "rollout" in methods
        else None
    )
    return _MethodResults(attention, masking, gradients, rollout)


def _modality_shares(results: _MethodResults) -> dict[str, object]:
    """Method -> ``(M,)`` each modality's share by that method (those run), for :func:`.agreement`."""
    shares: dict[str, object] = {}
    if results.attention is not None:
        shares["attention"] = results.attention.received
    if results.rollout is not None:
        shares["rollout"] = results.rollout.modality_share()
    if results.masking is not None:
        shares["mask"] = results.masking.share()
    for m, g in results.gradients.items():
        shares[m] = g.share()
    return shares


def _notes(model: FusionModel, methods: tuple[str, ...], results: _MethodResults) -> list[str]:
    """The caveats for reading the results: an ensemble's attention is its first member's, masking
    a model never trained with absent modalities, Integrated Gradients that did not converge."""
    notes = []
    if isinstance(model, WeightedEnsemble):
        share = model.weights[model.primary]
        notes.append(
            f"This model is a {fusion_name(model)}. Masking and gradients explain its "
            f"prediction; attention and rollout show {model.primary}'s, which carries {share:.0%} of it."
        )
    elif isinstance(model, Ensemble) and ({"attention", "rollout"} & set(methods)):
        notes.append(
            f"This model is an ensemble of {len(model.members)} members whose outputs are averaged: masking and "
            "gradients explain the averaged prediction; attention and rollout show the first member's."
        )
    if results.masking is not None and model.config.modality_dropout == 0:
        notes.append(
            "This model was trained without modality dropout, so it never saw an absent modality: hiding one "
            "takes it outside its training data, and the masking importance includes its reaction to that "
            "(it can be large even for a modality that carries nothing). Train with --modality-dropout "
            "(e.g. 0.2) for masking to measure what a modality carries."
        )
    ig = results.gradients.get("ig")
    if ig is not None and ig.complete() is False:
        worst = float(np.max(ig.relative_delta()))
        notes.append(
            f"Integrated Gradients did not converge for every sample (largest |delta| relative to the output "
            f"change: {worst:.3f}); raise --steps."
        )
    return notes


def column_names(config: Mapping) -> dict[str, list[str]] | None:
    """modality -> its features' column names, from a model's ``config.json`` (``data.columns``,
    recorded for a model trained on a table, in the model's feature order); None without."""
    data = config.get("data") if isinstance(config, Mapping) else None
    columns = data.get("columns") if isinstance(data, Mapping) else None
    modalities = columns.get("modalities") if isinstance(columns, Mapping) else None
    if not isinstance(modalities, Mapping):
        return None
    return {str(m): [str(c) for c in cols] for m, cols in modalities.items() if isinstance(cols, (list, tuple))}


def _feature_names(given: Mapping[str, Sequence[str]] | None, dataset: MultimodalDataset) -> dict | None:
    """The names to label features with: those given, else the dataset's columns; only those of a
    modality of the data with one name per feature (any other would label the wrong feature)."""
    if given is None and dataset.columns is not None:
        given = dataset.columns["modalities"]
    if given is None:
        return None
    dims = {m.name: m.dim for m in dataset.modalities}
    names = {m: [str(c) for c in cols] for m, cols in given.items() if m in dims and len(cols) == dims[m]}
    return names or None
