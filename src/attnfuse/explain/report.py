"""Figures (matplotlib's object API: no pyplot, no global backend, so a notebook's plotting is left
alone) and a self-contained HTML report of an :class:`Explanation`.

Conventions of every figure: attention weights on the ``viridis`` scale from 0; padded steps and
absent modalities hatched in grey (they are not tokens of that sample, which differs from a token
that got zero attention); figures sized from their content and saved with a tight bounding box,
so no title or label is cut.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
import textwrap
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from ..files import transaction, write_text
from ..modules import AttentionMap
from ._common import to_numpy, token_modality, token_step
from .agreement import METHOD_LABELS, METHOD_SHORT, POINTS, Agreement
from .attention import ModalityAttention, bertviz_export
from .masking import MaskingImportance
from .run import Explanation, SampleExplanation

__all__ = [
    "plot_heads",
    "plot_modality_matrices",
    "plot_step_maps",
    "plot_received",
    "plot_agreement",
    "plot_masking",
    "plot_steps",
    "plot_features",
    "plot_sample",
    "plot_rollout_maps",
    "save_figure",
    "file_name",
    "write_html_report",
    "write_report",
    "write_report_into",
    "explanation_directory",
    "feature_effects",
    "feature_labels",
]

MAX_TICKS = 32  # label at most this many tokens per axis, evenly spaced
PADDED = {"hatch": "////", "facecolor": "#e6e6e6", "edgecolor": "#9a9a9a", "linewidth": 0.0}
PADDED_LABEL = "padded step / absent modality"
COLORS = {"attention": "#3b6ea8", "rollout": "#7aa6d6", "mask": "#c2553d", "ig": "#3f8f4f", "gxi": "#9cc58a"}
# A section of the report: its heading, how to read it, and its HTML parts (tables, images).
Section = tuple[str, str, list[str]]


def file_name(block: str) -> str:
    """A block name as a readable file name: "cross:text->video/layer0" -> "cross_text-to-video_layer0"."""
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", block.replace("->", "-to-").replace("<->", "-with-")).strip("_")


def _subplots(*grid: int, figsize: tuple[float, float], layout: str = "constrained", **kwargs) -> tuple[Figure, Axes]:
    """``pyplot.subplots`` without pyplot: a Figure of its own (PNG output goes through Agg)."""
    fig = Figure(figsize=figsize, layout=layout)
    return fig, fig.subplots(*grid, **kwargs)


def _wrap(text: str, width_in: float) -> str:
    """Wrap a title to the figure's width (about 9 characters per inch at 10 pt)."""
    return "\n".join(textwrap.wrap(text, max(20, int(width_in * 9))))


def _ticks(ax: Axes, labels: list[str], axis: str) -> None:
    step = max(1, int(np.ceil(len(labels) / MAX_TICKS)))
    idx = list(range(0, len(labels), step))
    if axis == "x":
        ax.set_xticks(idx, [labels[i] for i in idx], rotation=90, fontsize=7)
    else:
        ax.set_yticks(idx, [labels[i] for i in idx], fontsize=7)


def _hatch(ax: Axes, rows: np.ndarray | None, cols: np.ndarray | None, shape: tuple[int, int]) -> None:
    """Grey hatching over invalid rows (queries) and columns (keys) of an (L, S) image."""
    n_rows, n_cols = shape
    for j in np.flatnonzero(~cols) if cols is not None else []:
        ax.add_patch(Rectangle((j - 0.5, -0.5), 1, n_rows, **PADDED))
    for i in np.flatnonzero(~rows) if rows is not None else []:
        ax.add_patch(Rectangle((-0.5, i - 0.5), n_cols, 1, **PADDED))


def _annotate(ax: Axes, values: np.ndarray, vmax: float, limit: int, fmt: str = "{:.2f}") -> None:
    """Write each cell's value on a small (L, S) image (at most ``limit`` cells)."""
    if values.size > limit:
        return
    for (r, c), v in np.ndenumerate(values):
        if np.isfinite(v):
            ax.text(
                c, r, fmt.format(v), ha="center", va="center", fontsize=7, color="white" if v < 0.6 * vmax else "black"
            )


def _legend_padded(fig: Figure) -> None:
    fig.legend(handles=[Patch(**PADDED, label=PADDED_LABEL)], loc="outside lower center", fontsize=8, frameon=False)


def plot_heads(m: AttentionMap, sample: int, title: str, key_valid: np.ndarray | None = None) -> Figure:
    """One panel per head: the ``(L, S)`` weights of ``sample``, query tokens down, keys across;
    invalid query rows (``m.query_valid``) and keys (``key_valid`` ``(S,)``) hatched."""
    w = to_numpy(m.weights[sample].float())  # (H, L, S)
    q_valid = to_numpy(m.query_valid[sample])
    heads, n_q, n_k = w.shape
    cols = min(heads, 4)
    rows = int(np.ceil(heads / cols))
    cell_w = max(2.4, 0.22 * n_k + 1.4)
    cell_h = max(1.3, 0.22 * n_q + 1.2)
    width = cell_w * cols + 1.4
    fig, axes = _subplots(rows, cols, figsize=(width, cell_h * rows + 1.4), squeeze=False, layout="constrained")
    vmax = float(w.max()) if w.size and w.max() > 0 else 1.0
    image = None
    for h in range(rows * cols):
        ax = axes[h // cols][h % cols]
        if h >= heads:
            ax.axis("off")
            continue
        image = ax.imshow(w[h], vmin=0.0, vmax=vmax, cmap="viridis", aspect="auto", interpolation="nearest")
        _hatch(ax, q_valid, key_valid, (n_q, n_k))
        _annotate(ax, w[h], vmax, limit=48)
        ax.set_title(f"head {h}", fontsize=9)
        _ticks(ax, m.key_tokens, "x")
        _ticks(ax, m.query_tokens, "y")
        ax.set_xlabel("key (attended to)", fontsize=8)
        if h % cols == 0:
            ax.set_ylabel("query", fontsize=8)
    fig.colorbar(image, ax=axes, shrink=0.9, label="attention weight")
    fig.suptitle(_wrap(title, width), fontsize=10)
    if (key_valid is not None and not key_valid.all()) or not q_valid.all():
        _legend_padded(fig)
    return fig


def _grid(n: int, max_cols: int, cell_w: float, cell_h: float, extra_w: float = 1.4) -> tuple[Figure, np.ndarray]:
    cols = min(n, max_cols)
    rows = int(np.ceil(n / cols))
    fig, axes = _subplots(
        rows, cols, figsize=(cell_w * cols + extra_w, cell_h * rows + 1.0), squeeze=False, layout="constrained"
    )
    for i in range(n, rows * cols):
        axes[i // cols][i % cols].axis("off")
    return fig, axes


def _map_panels(
    blocks: list[tuple[str, list[str], list[str], np.ndarray, np.ndarray | None, np.ndarray | None]],
    title: str,
    labels: tuple[str, str],
    cell: tuple[float, float],
    max_cols: int,
    annotate: int,
    what: str = "mean attention weight",
) -> Figure:
    """One heatmap per block (name, row labels, column labels, ``(L, S)`` values, ``(L,)`` real
    rows and ``(S,)`` real columns or None), on one colour scale stretched to the largest value so
    differences show; rows and columns that are not real tokens hatched, their values not written."""
    fig, axes = _grid(len(blocks), max_cols, *cell)
    vmax = max(float(mat.max()) for _, _, _, mat, _, _ in blocks) or 1.0
    image = None
    for ax, (name, rows, cols, mat, real_rows, real_cols) in zip(axes.flat, blocks):
        image = ax.imshow(mat, vmin=0.0, vmax=vmax, cmap="viridis", aspect="auto", interpolation="nearest")
        _hatch(ax, real_rows, real_cols, mat.shape)
        _ticks(ax, cols, "x")
        _ticks(ax, rows, "y")
        ax.set_xlabel(labels[1], fontsize=8)
        ax.set_ylabel(labels[0], fontsize=8)
        ax.set_title(name, fontsize=9)
        shown = mat.astype(np.float64)
        if real_rows is not None:
            shown[~real_rows] = np.nan
        if real_cols is not None:
            shown[:, ~real_cols] = np.nan
        _annotate(ax, shown, vmax, limit=annotate)
    fig.colorbar(image, ax=axes, shrink=0.9, label=what)
    fig.suptitle(_wrap(title, fig.get_figwidth()), fontsize=10)
    return fig


def plot_modality_matrices(attn: ModalityAttention, title: str) -> Figure:
    """One panel per block: rows = querying modality, columns = attended modality (rows sum to 1)."""
    blocks = [(name, q, k, mat, None, None) for name, (q, k, mat) in attn.matrices.items()]
    size = max(max(len(b[1]), len(b[2])) for b in blocks)
    cell = max(2.8, 0.55 * size + 1.6)
    return _map_panels(blocks, title, ("querying modality", "attended modality"), (cell, cell), 3, annotate=64)


def _last_layers(names: list[str]) -> list[str]:
    """The last layer of each attention stack ("cross:a->b/layer0", "…/layer1" -> "…/layer1")."""
    last: dict[str, str] = {}
    for name in names:  # the models list a stack's layers in order
        last[name.rsplit("/layer", 1)[0]] = name
    return list(last.values())


def plot_step_maps(attn: ModalityAttention, title: str) -> Figure:
    """One panel per attention stack (its last layer, the one closest to the output): the mean
    head-averaged weight of each query step on each key step over the samples; keys that are never
    real tokens in those samples are hatched."""
    blocks = [(name, *attn.steps[name], None, attn.key_valid[name] > 0) for name in _last_layers(list(attn.steps))]
    return _step_panels(blocks, title, ("query step", "key step (attended to)"), "mean attention weight")


def _step_panels(blocks: list, title: str, labels: tuple[str, str], what: str) -> Figure:
    """:func:`_map_panels` for token-by-token maps: about 0.3 in per token, within reason."""
    cell_w = float(np.clip(0.3 * max(len(b[2]) for b in blocks) + 1.8, 3.0, 7.0))
    cell_h = float(np.clip(0.3 * max(len(b[1]) for b in blocks) + 1.3, 1.4, 6.0))
    return _map_panels(blocks, title, labels, (cell_w, cell_h), 3 if cell_w < 4.5 else 2, annotate=48, what=what)


def plot_received(attn: ModalityAttention, title: str) -> Figure:
    """Bar chart: the share of all attention that lands on each modality's tokens."""
    names = list(attn.received)
    shares = [100.0 * attn.received[n] for n in names]
    width = max(4.5, 0.9 * len(names) + 2.5)
    fig, ax = _subplots(figsize=(width, 3.4), layout="constrained")
    bars = ax.bar(names, shares, color=COLORS["attention"])
    ax.bar_label(bars, fmt="%.1f%%", fontsize=8)
    ax.set_ylabel("share of attention received (%)")
    ax.set_xlabel("modality (as key)")
    ax.set_ylim(0, max([*shares, 1.0]) * 1.18)
    ax.set_title(_wrap(title, width), fontsize=10)
    ax.tick_params(axis="x", labelrotation=30)
    return fig


def plot_agreement(expl: Explanation) -> Figure:
    """Per modality: each method's share (grouped bars) and, with masking, the metric drop."""
    agree = expl.agreement
    mods, methods = agree.modalities, list(agree.shares)
    has_drop = agree.drops is not None
    height = max(2.6, 0.16 * len(mods) * max(len(methods), 1) + 1.8)
    fig, axes = _subplots(
        1,
        2 if has_drop else 1,
        figsize=(10.0 if has_drop else 6.5, height),
        squeeze=False,
        layout="constrained",
        gridspec_kw={"width_ratios": [3, 2]} if has_drop else None,
    )
    ax = axes[0][0]
    y = np.arange(len(mods))
    bar_h = 0.8 / max(len(methods), 1)
    for k, method in enumerate(methods):
        values = np.nan_to_num(100.0 * agree.shares[method], nan=0.0)
        ax.barh(
            y + (k - (len(methods) - 1) / 2) * bar_h,
            values,
            height=bar_h,
            color=COLORS[method],
            label=METHOD_LABELS[method],
        )
    ax.set_yticks(y, mods)
    ax.invert_yaxis()
    ax.set_xlabel("share per method (%)")
    ax.set_title("Each method's share per modality", fontsize=10)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=min(len(methods), 3), frameon=False)
    if has_drop:
        _drop_bars(axes[0][1], mods, agree.drops, agree.metric)
        axes[0][1].set_title("Hiding one modality", fontsize=10)
    return fig


def _drop_bars(ax: Axes, mods: list[str], drops: np.ndarray, metric: str) -> None:
    """Horizontal bars of the metric lost when each modality is hidden (accuracy in points)."""
    points = metric in POINTS
    values = (100.0 if points else 1.0) * drops
    bars = ax.barh(mods, values, color=COLORS["mask"])
    ax.bar_label(bars, fmt="%.1f" if points else "%.3f", fontsize=8, padding=2)
    ax.axvline(0, color="black", lw=0.6)
    ax.invert_yaxis()
    ax.set_xlabel(f"{metric} lost when hidden" + (" (points)" if points else ""))
    lo, hi = min(0.0, float(np.nanmin(values))), max(0.0, float(np.nanmax(values)))
    pad = 0.25 * (hi - lo or 1.0)  # room for the value labels
    ax.set_xlim(lo - (pad if lo < 0 else 0.0), hi + pad)


def plot_masking(masking: MaskingImportance) -> Figure:
    """Metric lost when each modality is hidden, and, when pairs were hidden, the pair interaction
    drop(a, b) - drop(a) - drop(b) (> 0: redundant, they stand in for each other)."""
    mods = masking.modalities
    pairs = [h for h in masking.hidden if len(h) == 2]
    scale = 100.0 if masking.metric in POINTS else 1.0
    unit = "points" if scale == 100 else masking.metric
    bars_w, matrix_w = 5.5, 0.6 * len(mods) + 2.6
    fig, axes = _subplots(
        1,
        2 if pairs else 1,
        figsize=(bars_w + (matrix_w if pairs else 0.0), max(2.8, 0.5 * len(mods) + 1.8)),
        squeeze=False,
        layout="constrained",
        gridspec_kw={"width_ratios": [bars_w, matrix_w]} if pairs else None,
    )
    _drop_bars(axes[0][0], mods, masking.drops(), masking.metric)
    axes[0][0].set_title(f"{masking.metric}: {masking.metrics[masking.metric]:.4f} with every modality", fontsize=10)
    if pairs:
        ax = axes[0][1]
        inter = np.full((len(mods), len(mods)), np.nan)
        for a, b in pairs:
            i, j = mods.index(a), mods.index(b)
            inter[i, j] = inter[j, i] = scale * masking.interaction(a, b)
        bound = float(np.nanmax(np.abs(inter))) or 1.0
        image = ax.imshow(inter, cmap="RdBu_r", vmin=-bound, vmax=bound)
        for (r, c), v in np.ndenumerate(inter):
            if np.isfinite(v):
                text = f"{v:.1f}" if scale == 100 else f"{v:.2f}"
                color = "white" if abs(v) > 0.6 * bound else "black"
                ax.text(c, r, text, ha="center", va="center", fontsize=7, color=color)
        ax.set_xticks(range(len(mods)), mods, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(mods)), mods, fontsize=8)
        ax.set_title("Pair interaction:\ndrop(a, b) − drop(a) − drop(b)", fontsize=10)
        fig.colorbar(image, ax=ax, shrink=0.85, label=f"{unit}: > 0 redundant, < 0 synergy")
    return fig


def _split_step_profiles(expl: Explanation) -> dict[str, dict[str, np.ndarray]]:
    """Sequence modality -> method -> ``(T,)`` share of the modality's mass per step over the rows."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for mod, valid in expl.step_valid.items():
        masses = {}
        if expl.attention is not None:
            masses["attention"] = _attention_per_step(expl.attention, mod, len(valid))
        if expl.rollout is not None:
            masses["rollout"] = expl.rollout.step_relevance(mod).sum(axis=0)
        profiles = {method: mass / mass.sum() for method, mass in masses.items() if mass.sum() > 0}
        for method, g in expl.gradients.items():
            profiles[method] = g.step_share(mod)
        if profiles:
            out[mod] = profiles
    return out


def _attention_per_step(attention: ModalityAttention, mod: str, length: int) -> np.ndarray:
    """``(T,)`` the attention landing on each step of ``mod``, summed over every block's queries
    and the rows."""
    mass = np.zeros(length)
    for _, k_tokens, mat in attention.steps.values():
        for j, tok in enumerate(k_tokens):
            if token_modality(tok) == mod:
                mass[token_step(tok)] += mat[:, j].sum()
    return mass


def plot_steps(expl: Explanation) -> Figure | None:
    """Per sequence modality: each method's share of the modality's mass per step, over the rows,
    with the share of rows in which each step is padding hatched behind it."""
    profiles = _split_step_profiles(expl)
    if not profiles:
        return None
    longest = max(len(expl.step_valid[m]) for m in profiles)
    width = max(6.0, 0.22 * longest + 3.0)
    fig, axes = _subplots(
        len(profiles), 1, figsize=(width, 2.6 * len(profiles) + 0.6), squeeze=False, layout="constrained"
    )
    for ax, (mod, methods) in zip(axes[:, 0], profiles.items()):
        padded = 1.0 - expl.step_valid[mod]  # (T,)
        steps = np.arange(len(padded))
        top = max(float(np.nanmax(v)) for v in methods.values()) * 1.15 or 1.0
        for t in np.flatnonzero(padded > 0):
            ax.add_patch(Rectangle((t - 0.5, 0), 1, top * padded[t], **PADDED))
        for method, values in methods.items():
            ax.plot(steps, values, marker="o", ms=3, lw=1.4, color=COLORS[method], label=METHOD_LABELS[method])
        ax.set_xlim(-0.5, len(steps) - 0.5)
        ax.set_ylim(0, top)
        ax.set_xlabel(f"{mod} step")
        ax.set_ylabel("share of the modality's mass")
        ax.set_title(f"{mod}: where in the sequence each method puts its mass", fontsize=10)
        handles, _ = ax.get_legend_handles_labels()
        if (padded > 0).any():
            handles.append(Patch(**PADDED, label="share of rows where the step is padding"))
        ax.legend(handles=handles, fontsize=8, loc="upper right")
    return fig


def _explained(view: SampleExplanation, task: str) -> str:
    """What a sample's explanation is about, in words."""
    if task == "classification":
        return f"class {view.target} logit"
    return "prediction" if view.prediction.size == 1 else f"output {view.target}"


TOP_FEATURES = 10
RAISES, LOWERS = COLORS["ig"], "#7b5ea7"  # a larger value of the feature raises / lowers the output


def feature_labels(expl: Explanation, modality: str, dim: int) -> list[str]:
    """The names of a modality's ``dim`` features: the table's column names when the model recorded
    them (``config.json`` ``data.columns``, passed to :func:`~.run.explain_model`), else
    ``modality:i``, numbered from 0 in the order of the data's features."""
    names = (expl.feature_names or {}).get(modality)
    if names is not None and len(names) == dim:
        return [str(n) for n in names]
    return [f"{modality}:{i}" for i in range(dim)]


def feature_effects(expl: Explanation) -> dict[str, tuple[list[str], np.ndarray, np.ndarray]] | None:
    """Per modality: (feature labels, mass ``(D,)``, direction ``(D,)``) from IG when it ran, else
    gradient × input; None without a gradient method.

    mass: the mean over the explained rows of |attribution| summed over steps (how much a feature
    moves the output). direction: the mean over rows and real steps of attribution × sign(x −
    baseline): positive when a larger value of the feature raises the output. For a linear model
    f = w·x both attributions are w_i (x_i − x'_i), so the direction is w_i |x_i − x'_i| ≥ 0 exactly
    when w_i > 0; the sign of the mean attribution alone would be that of w_i · mean(x_i − x'_i),
    which follows the data's mean, not the model (after standardisation, a coin toss)."""
    g = expl.gradients.get("ig") or expl.gradients.get("gxi")
    if g is None:
        return None
    effects = {}
    for mod in g.modalities:
        a = g.attributions[mod]  # (B, T, D)
        mass = np.abs(a.sum(axis=1)).mean(axis=0)
        if g.inputs is not None:
            direction = (a * np.sign(g.inputs[mod])).sum(axis=1).mean(axis=0)  # baseline 0: sign of x
        else:  # an attribution computed without its inputs: only the sign of the mean is known
            direction = a.sum(axis=1).mean(axis=0)
        effects[mod] = (feature_labels(expl, mod, a.shape[-1]), mass, direction)
    return effects


def plot_features(expl: Explanation) -> Figure | None:
    """Per modality, the ``TOP_FEATURES`` features with the largest mean |attribution| over the
    rows (IG when it ran, else gradient × input), coloured by the direction of their effect (see
    :func:`feature_effects`); None without a gradient method."""
    effects = feature_effects(expl)
    if effects is None:
        return None
    method = "ig" if "ig" in expl.gradients else "gxi"
    fig, axes = _grid(len(effects), 3, 3.4, 0.24 * TOP_FEATURES + 1.2, extra_w=0.4)
    for ax, (mod, (labels, mass, direction)) in zip(axes.flat, effects.items()):
        top = np.argsort(-mass, kind="stable")[:TOP_FEATURES]
        colors = [RAISES if direction[i] >= 0 else LOWERS for i in top]
        ax.barh([labels[i] for i in top], mass[top], color=colors)
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=7)
        ax.set_title(mod, fontsize=9)
        ax.set_xlabel("mean |attribution|", fontsize=8)
    fig.suptitle(f"Largest features by {METHOD_LABELS[method]}", fontsize=10)
    signs = [
        Patch(color=RAISES, label="a larger value raises the output"),
        Patch(color=LOWERS, label="a larger value lowers it"),
    ]
    fig.legend(handles=signs, loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    return fig


def _fmt_value(task: str, v: np.ndarray) -> str:
    v = np.asarray(v)
    if task == "classification":
        return f"{int(v)}"
    return f"{float(v):.3f}" if v.size == 1 else np.array2string(v, precision=3)


def plot_sample(view: SampleExplanation, task: str, split: str) -> Figure:
    """One sample: prediction and target, each modality's importance (masking and gradients),
    and, per sequence modality, every method's share per step (padded steps hatched)."""
    sequences = [m for m, steps in view.steps.items() if steps]
    mods = list(view.present)
    longest = max([len(view.step_valid[m]) for m in sequences] or [0])
    width = max(8.5, 0.42 * longest + 4.5)
    series = ([("mask", view.masking)] if view.masking is not None else []) + list(view.gradients.items())
    heights = [max(1.6, 0.32 * len(mods) * max(len(series), 1) + 0.9)]
    heights += [0.42 * len(view.steps[m]) + 1.2 for m in sequences]
    fig, axes = _subplots(
        len(heights),
        1,
        figsize=(width, sum(heights) + 1.2),
        squeeze=False,
        layout="constrained",
        gridspec_kw={"height_ratios": heights},
    )
    what = _explained(view, task)
    fig.suptitle(
        f"Sample {view.row} ({split}): true {_fmt_value(task, view.truth)}, predicted "
        f"{_fmt_value(task, view.prediction)}\nexplained: the {what} = {view.output:.3f}",
        fontsize=10,
    )

    _sample_modality_bars(axes[0][0], view, series, what)
    for ax, mod in zip(axes[1:, 0], sequences):
        _sample_step_shares(fig, ax, view, mod)
    if any(not view.step_valid[m].all() for m in sequences) or not all(view.present.values()):
        _legend_padded(fig)
    return fig


def _sample_modality_bars(
    ax: Axes, view: SampleExplanation, series: list[tuple[str, dict[str, float]]], what: str
) -> None:
    """:func:`plot_sample`'s top panel: one bar per modality and method of ``series`` (masking,
    gradients), absent modalities marked."""
    mods = list(view.present)
    y = np.arange(len(mods))
    bar_h = 0.8 / max(len(series), 1)
    for k, (method, values) in enumerate(series):
        label = "masking: output − output without it" if method == "mask" else f"{METHOD_LABELS[method]} (sum)"
        offset = (k - (len(series) - 1) / 2) * bar_h
        ax.barh(y + offset, [values[m] for m in mods], height=bar_h, color=COLORS[method], label=label)
    for i, m in enumerate(mods):
        if not view.present[m]:
            ax.text(0, i, "  absent", va="center", fontsize=8, color="#666666")
    ax.axvline(0, color="black", lw=0.6)
    ax.set_yticks(y, mods)
    ax.invert_yaxis()
    ax.set_xlabel(f"contribution to the {what}")
    if series:  # above the bars, under its title
        ax.legend(
            title="Modality importance for this sample",
            title_fontsize=10,
            fontsize=8,
            loc="lower center",
            bbox_to_anchor=(0.5, 1.0),
            ncol=len(series),
            frameon=False,
        )


def _sample_step_shares(fig: Figure, ax: Axes, view: SampleExplanation, mod: str) -> None:
    """:func:`plot_sample`'s panel of sequence modality ``mod``: each method's share per step, a
    row per method, padded steps hatched."""
    methods = list(view.steps[mod])
    grid = np.stack([view.steps[mod][m] for m in methods])  # (methods, T)
    vmax = max(float(grid.max()), 1e-9)
    image = ax.imshow(grid, cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto", interpolation="nearest")
    _hatch(ax, None, view.step_valid[mod], grid.shape)
    _annotate(ax, np.where(view.step_valid[mod], grid, np.nan), vmax, limit=200)
    ax.set_yticks(range(len(methods)), [METHOD_LABELS[m] for m in methods], fontsize=8)
    _ticks(ax, [f"{t}" for t in range(grid.shape[1])], "x")
    ax.set_xlabel(f"{mod} step")
    ax.set_title(f"{mod}: each method's share per step (each row sums to 1)", fontsize=10)
    fig.colorbar(image, ax=ax, shrink=0.9, label="share", pad=0.01)


def plot_rollout_maps(view: SampleExplanation) -> Figure:
    """One panel per attention stack: the rolled-out map of this sample (rows: the stack's tokens,
    or the pooled query tokens of a cross stack; columns: the input tokens they trace back to)."""
    blocks = [(name, *stack) for name, stack in view.rollout_maps.items()]
    title = f"Attention rollout, sample {view.row}: each token's share traced back to the input tokens"
    return _step_panels(blocks, title, ("token after the stack", "input token"), "rollout share")


def save_figure(fig: Figure, path: Path) -> bytes:
    """Write a PNG (tight bounding box: nothing clipped) and return its bytes for the HTML report."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    data = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


# ---------------------------------------------------------------------------------------------
# The HTML report
# ---------------------------------------------------------------------------------------------

HOW_TO_READ = {
    "agreement": (
        "Each method answers a different question. <b>Attention received</b>: the share of all attention "
        "weight (every block, head and real query) that lands on a modality's tokens: where the model looked. "
        "<b>Attention rollout</b> (Abnar &amp; Zuidema, 2020) follows that routing through every layer and the "
        "residual connections to the input tokens. <b>Masking</b>: how much the explained output changes, on "
        "average, when the modality is hidden through its mask (the model then ignores it entirely: a real "
        "“without this modality”), and how much the metric drops. <b>Integrated Gradients</b> / "
        "<b>gradient × input</b>: how much of the output each modality's features account for, from the "
        "training mean (all features 0 after standardisation). Shares are of each method's total, so bars of "
        "one colour sum to 100%. When the methods rank the modalities differently, trust masking for "
        "“what does the model need” and read attention as “where it looked”."
    ),
    "masking": (
        "Left: the metric lost when one modality is hidden for every sample (positive: the model needs it; "
        "near 0: it can do without). Right, when pairs were hidden: drop(a, b) − drop(a) − drop(b). Red "
        "(&gt; 0): the two stand in for each other — each alone costs little, both together much (redundant "
        "information). Blue (&lt; 0): hiding either already loses what the pair carries (synergy)."
    ),
    "features": (
        "For each modality, the features with the largest attribution (Integrated Gradients when it ran, else "
        "gradient × input), summed over steps and averaged in absolute value over the explained rows. Green: a "
        "larger value of the feature raises the explained output; purple: a larger value lowers it (the sign of "
        "the mean of attribution × sign(value − baseline), the baseline being the training mean: for a linear "
        "model, the sign of the feature's coefficient). Features carry the table's column names when the model "
        "was trained on a table, else modality:i, numbered from 0 in the order of the data's features."
    ),
    "steps": (
        "For each sequence modality, how each method spreads that modality's mass over its steps, summed over "
        "the explained rows (each line sums to 1). Grey hatching: the share of rows in which the step is "
        "padding or the modality is absent — no attention can land there and its attribution is 0, which is "
        "not the same as a real step that the model ignores."
    ),
    "matrix": (
        "Each panel is one attention block. Row: the modality whose tokens ask (the queries); columns: how "
        "their attention is spread over the modalities they can attend to, averaged over heads, over the real "
        "query tokens and over the rows. Each row sums to 1."
    ),
    "step_maps": (
        "In this fusion every block's queries come from one modality, so a modality-to-modality matrix would be a "
        "single row. Instead, each panel shows, for the last layer of each attention stack, which key step each "
        "query step attends to, averaged over heads and over the rows in which the query step is real. When the important step differs from sample to sample (as in a "
        "lookup), the average spreads out: the per-sample views below show the individual maps. Hatched keys "
        "are never real tokens in these rows."
    ),
    "received": (
        "The share of all attention (every block, head and real query token) that lands on each modality's "
        "tokens. Modalities that only ask (queries) receive none."
    ),
    "sample": (
        "Top: for this sample, how much each modality contributes to the explained output — red: the output "
        "minus the output with the modality hidden (masking); green: the modality's summed attribution "
        "(Integrated Gradients sums, over all modalities, to output − output at the training mean). Below, for "
        "each sequence modality: each method's share per step (each row sums to 1); hatched steps are padding "
        "or absent. Then, with rollout, each attention stack's rolled-out map: how much of each token's state "
        "after the stack traces back to each input token through all its layers and residual connections "
        "(Abnar & Zuidema, 2020; for a cross stack the context never changes, so the map is the query's own "
        "residual share plus a weighted mean of the layers' maps). Last, the raw per-head heatmaps of every "
        "attention block: query tokens down, keys across; hatched rows/columns are not tokens of this sample."
    ),
}


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def write_html_report(path: Path, title: str, summary: list[tuple[str, str]], sections: list[Section]) -> None:
    """A single HTML file, every image embedded (base64), readable offline. ``sections``: (heading,
    "how to read this" HTML, body HTML fragments)."""
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in summary)
    body = []
    for heading, how, parts in sections:
        anchor = re.sub(r"[^a-z0-9]+", "-", heading.lower()).strip("-")  # e.g. report.html#sample-17
        body.append(f'<h2 id="{anchor}">{html.escape(heading)}</h2>')
        if how:
            body.append(f'<p class="how"><b>How to read this.</b> {how}</p>')
        body.extend(parts)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; padding: 0 1em; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
th, td {{ text-align: left; padding: 0.25em 1em 0.25em 0; border-bottom: 1px solid #ddd; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
p.how {{ background: #f4f6f9; border-left: 3px solid #3b6ea8; padding: 0.6em 0.9em; max-width: 60em; }}
ul.said li {{ margin: 0.3em 0; }}
img {{ max-width: 100%; display: block; margin: 0.5em 0 1.5em; }}
h3 {{ margin-top: 2em; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<table>{rows}</table>
{"".join(body)}
</body></html>
"""
    write_text(path, page)


def _agreement_table(expl: Explanation) -> str:
    agree = expl.agreement
    head = "".join(f"<th>{html.escape(METHOD_LABELS[m])}</th>" for m in agree.shares)
    if agree.drops is not None:
        head += f"<th>{html.escape(agree.metric)} lost when hidden</th>"
    rows = []
    for i, mod in enumerate(agree.modalities):
        cells = "".join(
            f'<td class="num">{v:.1%}</td>' if np.isfinite(v) else '<td class="num">—</td>'
            for v in (agree.shares[m][i] for m in agree.shares)
        )
        if agree.drops is not None:
            d = agree.drops[i]
            cells += (
                f'<td class="num">{100 * d:+.2f} points</td>'
                if agree.metric in POINTS
                else f'<td class="num">{d:+.4f}</td>'
            )
        rows.append(f"<tr><th>{html.escape(mod)}</th>{cells}</tr>")
    table = f"<table><tr><th>modality</th>{head}</tr>{''.join(rows)}</table>"
    rhos = _spearman_table(agree)
    said = "".join(f"<li>{html.escape(s)}</li>" for s in agree.sentences)
    out = table
    if rhos:
        out += "<p>Spearman rank correlation of the methods' rankings of the modalities (1: the same order):</p>" + rhos
    if said:
        out += f'<ul class="said">{said}</ul>'
    return out


def _spearman_table(agree: Agreement) -> str:
    """The rank correlations as a lower-triangular table ("" when there are none)."""
    names = list(agree.shares) + (["drop"] if agree.drops is not None else [])
    label = {**METHOD_SHORT, "drop": f"{agree.metric} lost"}
    if not any(np.isfinite(r) for r in agree.spearman.values()):
        return ""
    rows = []
    for i, a in enumerate(names[1:], start=1):
        cells = []
        for b in names[:i]:
            rho = agree.spearman.get((b, a), agree.spearman.get((a, b), float("nan")))
            cells.append(f'<td class="num">{rho:.2f}</td>' if np.isfinite(rho) else '<td class="num">—</td>')
        rows.append(f"<tr><th>{html.escape(label[a])}</th>{''.join(cells)}</tr>")
    head = "".join(f"<th>{html.escape(label[b])}</th>" for b in names[:-1])
    return f"<table><tr><th></th>{head}</tr>{''.join(rows)}</table>"


def _sample_table(view: SampleExplanation, task: str) -> str:
    """Target and prediction, then one row per modality with every method's number."""
    head = ["modality", "present"]
    if view.masking is not None:
        head += ["prediction without it", "masking: output − output without it"]
    head += [f"{METHOD_LABELS[m]} (sum)" for m in view.gradients]
    rows = []
    for mod, present in view.present.items():
        cells = [html.escape(mod), "yes" if present else "absent"]
        if view.masking is not None:
            cells += [_fmt_value(task, view.hidden_prediction[mod]), f"{view.masking[mod]:+.3f}"]
        cells += [f"{values[mod]:+.3f}" for values in view.gradients.values()]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    line = (
        f"<p>target <b>{_fmt_value(task, view.truth)}</b>, prediction <b>{_fmt_value(task, view.prediction)}</b>; "
        f"explained: the {_explained(view, task)} = {view.output:.3f}</p>"
    )
    header = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    return f"{line}<table><tr>{header}</tr>{''.join(rows)}</table>"


def _summary(expl: Explanation) -> list[tuple[str, str]]:
    summary = [
        ("model", f"{expl.fusion} fusion ({expl.parameters:,} parameters)"),
        ("data", f"{expl.data}, {expl.task}; explained rows: {expl.split} ({len(expl.rows)} samples)"),
        (f"{expl.split} {expl.metric}", f"{expl.score:.4f}"),
        *(
            [(f"{expl.split} {expl.masking.metric}", f"{expl.masking.metrics[expl.masking.metric]:.4f}")]
            if expl.masking is not None and expl.masking.metrics is not None and expl.masking.metric != expl.metric
            else []
        ),
        ("methods", ", ".join(f"{METHOD_LABELS.get(m, m)} ({expl.seconds.get(m, 0.0):.1f} s)" for m in expl.methods)),
    ]
    ig = expl.gradients.get("ig")
    if ig is not None:
        rel = ig.relative_delta()
        summary.append(
            (
                "IG completeness",
                f"{ig.n_steps} steps; max |sum of attributions − (f(x) − f(0))| = {np.abs(ig.delta).max():.2e} "
                f"(relative {rel.max():.2e}; {'within' if ig.complete() else 'outside'} Captum's tolerance 0.05)",
            )
        )
    return summary


def explanation_directory(out: str | Path):
    """The transaction writing an explanation into ``out`` (:func:`attnfuse.files.transaction`):
    ``out`` is locked (a second ``explain`` into it is refused at once) and proven writable when the
    block starts, and replaced by what the block wrote into the yielded temporary directory when it
    ends cleanly; a directory that is not an earlier explanation is refused."""
    return transaction(out, check=_ours)


def write_report(expl: Explanation, out: Path) -> list[Path]:
    """Write the figures, per-sample heatmaps, bertviz JSON, ``explanation.json`` and a
    self-contained ``report.html`` into ``out``; returns the files written. Everything is built in
    a sibling temporary folder and moved into place at the end, so a failure writes nothing."""
    out = Path(out)
    with explanation_directory(out) as tmp:
        written = write_report_into(expl, tmp)
    return sorted(out / p.relative_to(tmp) for p in written)


def write_report_into(expl: Explanation, tmp: Path) -> list[Path]:
    """:func:`write_report`'s files, written into the directory ``tmp`` (the temporary of an
    :func:`explanation_directory` transaction); returns them."""
    title_of = f"{expl.fusion} fusion on {expl.data}"
    sections: list[Section] = []
    if expl.notes:
        sections.append(("Before you read", "", [f"<p>{html.escape(n)}</p>" for n in expl.notes]))
    png = save_figure(plot_agreement(expl), tmp / "agreement.png")
    sections.append(
        ("Do the explanations agree?", HOW_TO_READ["agreement"], [_agreement_table(expl), _img(png, "agreement")])
    )
    if expl.masking is not None and expl.masking.metrics is not None:
        sections += _figure_section(
            plot_masking(expl.masking), tmp / "masking.png", "masking", "Modality importance by masking"
        )
    sections += _figure_section(plot_steps(expl), tmp / "steps.png", "steps", "Which steps matter")
    sections += _figure_section(plot_features(expl), tmp / "features.png", "features", "Which features matter")
    if expl.attention is not None:
        sections += _attention_sections(expl, expl.attention, tmp)
    sections += [_sample_section(view, expl, tmp) for view in expl.samples]
    (tmp / "explanation.json").write_text(json.dumps(summary_dict(expl), indent=2) + "\n")
    write_html_report(tmp / "report.html", f"attnfuse explain — {title_of}", _summary(expl), sections)
    return sorted(p for p in tmp.rglob("*") if p.is_file())


def _figure_section(fig: Figure | None, path: Path, kind: str, heading: str, alt: str | None = None) -> list[Section]:
    """The section of one figure, saved at ``path``, read as ``HOW_TO_READ[kind]`` says, ``alt``
    (default ``kind``) its image's text; none without a figure (nothing of the kind to show)."""
    if fig is None:
        return []
    png = save_figure(fig, path)
    return [(heading, HOW_TO_READ[kind], [_img(png, alt or kind)])]


def _attention_sections(expl: Explanation, attn: ModalityAttention, tmp: Path) -> list[Section]:
    """The sections of the attention over the rows: between modalities or step by step, and the
    share each modality receives."""
    # Only where a block's queries of several modalities spread over several (self fusion) is
    # the matrix more than one row or one column of 1.00; otherwise steps are the view.
    if any(len(q) > 1 and len(k) > 1 for q, k, _ in attn.matrices.values()):
        fig = plot_modality_matrices(attn, f"Modality-to-modality attention, mean over {expl.split}")
        sections = _figure_section(
            fig, tmp / "modality_matrix.png", "matrix", "Attention between modalities", "modality matrix"
        )
    else:
        fig = plot_step_maps(attn, f"Mean attention step by step over {expl.split}")
        sections = _figure_section(fig, tmp / "step_maps.png", "step_maps", "Attention step by step", "step maps")
    if len(attn.received) > 1:  # one attended modality would be a single 100% bar
        fig = plot_received(attn, f"Attention received per modality ({expl.split}, {expl.metric} {expl.score:.4f})")
        sections += _figure_section(fig, tmp / "modality_received.png", "received", "Attention received per modality")
    return sections


def _sample_section(view: SampleExplanation, expl: Explanation, tmp: Path) -> Section:
    """The section of one sample: its table and figure, its rollout maps, a heatmap per attention
    block (and the block's weights as bertviz JSON)."""
    parts = [_sample_table(view, expl.task)]
    png = save_figure(plot_sample(view, expl.task, expl.split), tmp / "samples" / f"sample{view.row}.png")
    parts.append(_img(png, f"sample {view.row}"))
    if view.rollout_maps:
        png = save_figure(plot_rollout_maps(view), tmp / "samples" / f"sample{view.row}_rollout.png")
        parts.append(_img(png, f"rollout, sample {view.row}"))
    key_valid = view.map_key_valid
    for m in view.maps:
        png = save_figure(
            plot_heads(m, 0, f"{m.name} — sample {view.row}", key_valid.get(m.name)),
            tmp / "heatmaps" / f"sample{view.row}" / f"{file_name(m.name)}.png",
        )
        parts.append(_img(png, m.name))
    if view.maps:
        (tmp / "bertviz").mkdir(exist_ok=True)
        (tmp / "bertviz" / f"sample{view.row}.json").write_text(json.dumps(bertviz_export(view.maps, 0)))
    return (f"Sample {view.row}", HOW_TO_READ["sample"], parts)


def _ours(out: Path) -> None:
    """Refuse to replace a directory that is not an earlier explanation (a user's folder given as
    ``--out`` would otherwise be swapped out with everything in it)."""
    if any(out.iterdir()) and not (out / "explanation.json").is_file():
        raise ValueError(
            f"out: {out} exists and is not an attnfuse explanation (no explanation.json); give a new or empty directory"
        )


def summary_dict(expl: Explanation) -> dict:
    """The numbers of the report as JSON-able values: per-modality shares, metric drops,
    interactions, rank correlations, sentences, seconds per method, the samples' data rows, the
    features of the features figure (name, mean |attribution|, direction: > 0 when a larger value
    raises the output), IG completeness."""
    agree = expl.agreement
    out: dict = {
        "fusion": expl.fusion,
        "data": expl.data,
        "split": expl.split,
        "rows": len(expl.rows),
        "samples": [view.row for view in expl.samples],
        expl.metric: expl.score,
        "methods": list(expl.methods),
        "seconds": expl.seconds,
        "shares": {m: dict(zip(agree.modalities, map(_finite, v))) for m, v in agree.shares.items()},
        "spearman": {f"{a} vs {b}": _finite(r) for (a, b), r in agree.spearman.items()},
        "sentences": agree.sentences,
        "notes": expl.notes,
    }
    if expl.masking is not None and expl.masking.metrics is not None:
        m = expl.masking
        out["masking"] = {
            "metric": m.metric,
            "with_all": m.metrics[m.metric],
            "drop": {"+".join(h): m.drop(*h) for h in m.hidden},
            "interaction": {f"{a}+{b}": m.interaction(a, b) for a, b in (h for h in m.hidden if len(h) == 2)},
        }
    effects = feature_effects(expl)
    if effects is not None:  # the features of the figure, largest first
        out["features"] = {
            mod: [
                {"name": labels[i], "mean_abs_attribution": float(mass[i]), "direction": float(direction[i])}
                for i in np.argsort(-mass, kind="stable")[:TOP_FEATURES]
            ]
            for mod, (labels, mass, direction) in effects.items()
        }
    ig = expl.gradients.get("ig")
    if ig is not None:
        out["ig"] = {"n_steps": ig.n_steps, "max_abs_delta": float(np.abs(ig.delta).max()), "complete": ig.complete()}
    return out


def _finite(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None
