"""Do the explanations agree? Per modality: attention share, rollout share, masking importance and
gradient attribution side by side, their rank correlations, and plain sentences where they differ.

Attention and rollout describe where the model routed information; masking says what the model
loses without a modality (for this model, on this data); gradients say how sensitive the
explained output is to each modality's features. They answer different questions, so they may
disagree, and when they do it is worth saying which modality each one favours.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .masking import MaskingImportance

__all__ = ["Agreement", "agreement", "METHOD_LABELS", "METHOD_SHORT"]

# Short column names for tables (the figures and sentences use METHOD_LABELS).
METHOD_SHORT = {"attention": "attention", "rollout": "rollout", "mask": "masking", "ig": "IG", "gxi": "grad×input"}
METHOD_LABELS = {
    "attention": "attention received",
    "rollout": "attention rollout",
    "mask": "masking |Δ output|",
    "ig": "Integrated Gradients",
    "gxi": "gradient × input",
}
POINTS = frozenset({"accuracy", "f1_macro"})  # metrics in [0, 1] said in percentage points
MARGIN = 0.02  # shares within 2 points of a method's largest count as tied for first
SMALL_DROP = 0.02  # no single modality costs more than this (2 points of accuracy, 0.02 of R²)


@dataclass
class Agreement:
    """modalities: M names. shares: method -> ``(M,)`` share of that method's mass per modality
    (NaN where the method says nothing about a modality, e.g. attention for ``cross``'s query).
    metric / drops ``(M,)``: the metric and how much it worsens when each modality is hidden
    (None without masking). spearman: (method a, method b) -> rank correlation over the modalities
    both cover (NaN with fewer than 3). sentences: the comparison in words."""

    modalities: list[str]
    shares: dict[str, np.ndarray]
    metric: str | None
    drops: np.ndarray | None
    spearman: dict[tuple[str, str], float]
    sentences: list[str]


def _fmt_drop(metric: str, value: float) -> str:
    return f"{100 * value:.1f} points" if metric in POINTS else f"{value:.3f}"


def _rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr  # here: scipy.stats takes seconds to import, and only this needs it

    both = np.isfinite(a) & np.isfinite(b)
    if both.sum() < 3 or np.ptp(a[both]) == 0 or np.ptp(b[both]) == 0:
        return float("nan")
    return float(spearmanr(a[both], b[both]).statistic)


def agreement(
    modalities: list[str], shares: dict[str, dict[str, float] | np.ndarray], masking: MaskingImportance | None = None
) -> Agreement:
    """Compare per-modality shares from several methods (keys of ``METHOD_LABELS``; a dict
    modality -> share or an ``(M,)`` array in ``modalities``' order) and, with ``masking``, the
    metric drop of hiding each modality."""
    unknown = sorted(set(shares) - set(METHOD_LABELS))
    if unknown:
        raise ValueError(f"shares: expected methods from {list(METHOD_LABELS)}, got {unknown}")
    table: dict[str, np.ndarray] = {}
    for method, values in shares.items():
        if isinstance(values, dict):
            values = np.array([values.get(m, np.nan) for m in modalities], dtype=np.float64)
        values = np.asarray(values, dtype=np.float64)
        if values.shape != (len(modalities),):
            raise ValueError(f"shares[{method!r}]: expected {len(modalities)} values, got shape {values.shape}")
        table[method] = values
    drops = masking.drops() if masking is not None and masking.metrics is not None else None
    metric = masking.metric if drops is not None else None

    ranked = dict(table)
    if drops is not None:
        ranked["drop"] = drops
    names = list(ranked)
    spearman = {(a, b): _rank_correlation(ranked[a], ranked[b]) for i, a in enumerate(names) for b in names[i + 1 :]}
    pairs = [h for h in masking.hidden if len(h) == 2] if drops is not None else []
    pair_drops = np.array([masking.drop(*h) for h in pairs]) if pairs else None
    sentences = _sentences(modalities, table, metric, drops, pair_drops, spearman)
    return Agreement(modalities, table, metric, drops, spearman, sentences)


def _favourites(values: np.ndarray) -> list[int]:
    """The modalities a method puts first: those within ``MARGIN`` of its largest share (largest
    first). None stands out (an empty list) when they are more than half of the modalities."""
    finite = np.nan_to_num(values, nan=-np.inf)
    if not np.isfinite(finite).any():
        return []
    top = [int(i) for i in np.argsort(-finite) if finite[i] >= finite.max() - MARGIN]
    return top if len(top) <= max(1, len(values) // 2) else []


def _names(modalities: list[str], index: list[int]) -> str:
    return " and ".join(f"`{modalities[i]}`" for i in index)


def _sentences(
    modalities: list[str],
    shares: dict[str, np.ndarray],
    metric: str | None,
    drops: np.ndarray | None,
    pair_drops: np.ndarray | None,
    spearman: dict[tuple[str, str], float],
) -> list[str]:
    out = []
    if "attention" in shares:
        unattended = [modalities[i] for i in np.flatnonzero(~(shares["attention"] > 0))]
        if unattended:
            mods = ", ".join(f"`{m}`" for m in unattended)
            out.append(
                f"No attention lands on {mods}: in this fusion those tokens only ask (they are queries, not keys)."
            )
    favourites = {m: _favourites(v) for m, v in shares.items()}
    if drops is not None and metric is not None and np.isfinite(drops).any():
        # Masking is the reference: it is what the model loses without the modality.
        best = int(np.nanargmax(drops))
        said = f"hiding `{modalities[best]}` by {_fmt_drop(metric, drops[best])}"
        for method, favs in favourites.items():
            if method != "mask" and favs and best not in favs:
                each = ", ".join(f"{shares[method][i]:.0%}" for i in favs)
                lost = " and ".join(_fmt_drop(metric, drops[i]) for i in favs)
                out.append(
                    f"{METHOD_LABELS[method]} favours {_names(modalities, favs)} ({each}), but hiding "
                    f"{_names(modalities, favs)} changes {metric} by {lost}; {said}."
                )
        # Every method has `best` first, or within MARGIN of its first (an even spread abstains).
        voted = [m for m, favs in favourites.items() if favs]
        if voted and all(best in favourites[m] for m in voted):
            out.append(
                f"Every method ranks `{modalities[best]}` first; hiding it changes {metric} by "
                f"{_fmt_drop(metric, drops[best])}."
            )
        if np.nanmax(drops) <= SMALL_DROP:
            most = _fmt_drop(metric, float(np.nanmax(drops)))
            if pair_drops is not None and np.nanmax(pair_drops) > SMALL_DROP:
                out.append(
                    f"Hiding any one modality changes {metric} by at most {most}, hiding two by up to "
                    f"{_fmt_drop(metric, float(np.nanmax(pair_drops)))}: the modalities stand in for each other."
                )
            else:
                out.append(f"Hiding any one modality changes {metric} by at most {most}.")
        reference, ref_label = "drop", f"the {metric} drop"
    else:
        named = {m: favs for m, favs in favourites.items() if favs}
        if len({tuple(f) for f in named.values()}) > 1:
            listed = "; ".join(f"{METHOD_LABELS[m]}: {_names(modalities, f)}" for m, f in named.items())
            out.append(f"The methods favour different modalities: {listed}.")
        reference, ref_label = "mask", METHOD_LABELS["mask"]
    if len(modalities) < 3:
        out.append("With fewer than 3 modalities a rank correlation says nothing; compare the shares directly.")
        return out
    for method in shares:
        rho = spearman.get((method, reference), spearman.get((reference, method), float("nan")))
        if method != reference and np.isfinite(rho) and rho < 0.5:
            out.append(f"{METHOD_LABELS[method]} ranks the modalities unlike {ref_label} (Spearman ρ = {rho:.2f}).")
    return out
