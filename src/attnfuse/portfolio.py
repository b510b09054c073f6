"""The ``--fusion auto`` portfolio: which models are tried on the user's data, with which settings,
and the record of which one was kept and why (written to config.json under ``"auto"``).

The loop that trains the candidates is :class:`attnfuse.fit.CandidateLoop`; this module only decides
what the candidates are (:func:`candidates_for`) and how the choice is recorded (:func:`choose`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .data import MultimodalDataset
from .fusion import FUSIONS, FusionModel, config_from_dict
from .metrics import paired_standard_error
from .options import options_of

__all__ = ["Candidate", "PORTFOLIO", "candidates_for", "choose", "public", "settings_used"]


@dataclass(frozen=True)
class Candidate:
    """One model of the ``--fusion auto`` portfolio: a ``name`` (as reported), its ``fusion`` and
    the ``settings`` that set it apart (settings the user gives win over them)."""

    name: str
    fusion: str
    settings: dict = field(default_factory=dict)
    sequences_only: bool = False  # only for data with at least one sequence modality


# Why these (benchmarks/RESULTS.md, "Baselines and --fusion auto"): on global feature views
# (mfeat) concat and self with per-modality pooling are the best models and cost little; on
# sequences (the planted lookup) pooling destroys the alignment and an attention model is needed:
# self and cross both solve it, cross is the canonical "text queries video" model.
#
# Every candidate trains with modality dropout (each modality of a training sample hidden through
# its mask with probability 0.1, ModDrop: Neverova et al., 2015): measured on mfeat's ten splits,
# it cut each candidate's out-of-fold errors (concat 201 -> 177, self 195 -> 179, self-modality
# 197 -> 172 of 16,000 rows) and the weighted ensemble's on 9 splits of 10, none worse (RESULTS.md,
# "Modality dropout in the portfolio"). The ensemble's out-of-fold score rose on the five benchmark
# tables whose views overlap and fell a little on the two whose views complement each other
# (planted 0.9649 -> 0.9639 R², fair 0.0845 -> 0.0829). A model that has seen absent modalities
# also degrades gracefully when one is missing, and masking explanations measure what a modality
# carries instead of its reaction to an input it never saw.
MODALITY_DROPOUT = 0.1
PORTFOLIO: tuple[Candidate, ...] = (
    Candidate("concat", "concat", {"modality_dropout": MODALITY_DROPOUT}),
    Candidate("self", "self", {"pooling": "mean", "modality_dropout": MODALITY_DROPOUT}),
    Candidate("self-modality", "self", {"pooling": "modality", "modality_dropout": MODALITY_DROPOUT}),
    Candidate("cross", "cross", {"modality_dropout": MODALITY_DROPOUT}, sequences_only=True),
)


def _settings_of(fusion: str) -> set[str]:
    return {o.name for o in options_of(FUSIONS[fusion].config_class)}


def candidates_for(
    data: MultimodalDataset | None, fusion: str, given: dict[str, Any]
) -> tuple[list[Candidate], dict[str, str]]:
    """The models ``train`` fits: ``fusion`` itself with the ``given`` settings, or, for ``auto``,
    the portfolio candidates that fit ``data`` (sequence-only ones need a sequence modality, cross
    models two modalities), each with the given settings it has (they win over the candidate's own),
    duplicates dropped. Returns (candidates, {left-out candidate: why}).

    A given setting that no candidate has, or whose value none accepts, is a ValueError naming it.
    With ``data`` None (before loading), every candidate counts."""
    if fusion != "auto":
        return [Candidate(fusion, fusion, dict(given))], {}
    modalities = [] if data is None else [asdict(m) for m in data.modalities]
    kept: list[Candidate] = []
    left_out: dict[str, str] = {}
    rejected: list[str] = []  # the candidates' own errors for the settings given, in portfolio order
    for cand in PORTFOLIO:
        if data is not None and cand.sequences_only and not any(m.is_sequence for m in data.modalities):
            left_out[cand.name] = "the data has no sequence modality"
            continue
        names = _settings_of(cand.fusion)
        settings = {**cand.settings, **{k: v for k, v in given.items() if k in names}}
        try:
            config_from_dict(cand.fusion, {"modalities": modalities, **settings})
        except ValueError as e:
            left_out[cand.name] = str(e)
            rejected.append(str(e))
            continue
        if any(c.fusion == cand.fusion and c.settings == settings for c in kept):
            left_out[cand.name] = "the same model as another candidate with the settings given"
            continue
        kept.append(Candidate(cand.name, cand.fusion, settings))
    for name in given:
        if not any(name in c.settings for c in kept):
            if rejected:  # e.g. "d_model: expected a multiple of nhead=3", from the candidate itself
                raise ValueError(rejected[0])
            having = [c.name for c in PORTFOLIO if name in _settings_of(c.fusion)]
            why = (
                f"the candidates that have it ({', '.join(f'{n}: {left_out[n]}' for n in having)}) are left out"
                if having
                else "no candidate has this setting"
            )
            raise ValueError(
                f"{name}: --fusion auto cannot use it: {why} (candidates: {', '.join(c.name for c in kept)})"
            )
    if not kept:
        raise ValueError(f"fusion: no candidate of --fusion auto fits this data ({left_out})")
    return kept, left_out


def settings_used(model: FusionModel | Any, cand: Candidate) -> dict:
    """The candidate's user-facing settings as the model was built (its config, defaults included)."""
    names = _settings_of(cand.fusion)
    return {k: v for k, v in asdict(model.config).items() if k in names}


def public(selection: dict) -> dict:
    """The selection record without the per-candidate metric dicts (those go to metrics.json) and
    validation predictions."""
    drop = ("valid_metrics", "valid_pred")
    cands = {n: {k: v for k, v in c.items() if k not in drop} for n, c in selection["candidates"].items()}
    return {**selection, "candidates": cands}


def choose(
    scores: dict[str, dict],
    selection: tuple[str, str],
    left_out: dict[str, str],
    y_valid: Any = None,
    held: str = "validation",
) -> dict:
    """The record of the choice among trained candidates, by the one-standard-error rule.

    ``scores``: ``{name: {"fusion", "settings", "valid": the selection metric, "valid_se": its
    standard error, "valid_loss", "valid_pred": its predictions on the validation rows (optional),
    ...}}`` in portfolio order, simplest first; ``selection``: (metric, "max"/"min"); ``y_valid``:
    the validation targets. The best validation score (ties: the lower validation loss) sets the
    bar; the first, i.e. simplest, candidate within one standard error of it is picked (Breiman et
    al., "Classification and Regression Trees", 1984; Hastie et al., "The Elements of Statistical
    Learning", 2nd ed., §7.10): a few hundred validation rows cannot tell apart models closer than
    that, and the simpler one is then the safer choice. The standard error is that of the
    difference between the candidate and the best on the same rows
    (:func:`attnfuse.metrics.paired_standard_error`, recorded as ``"se_vs_best"``) when the
    predictions are given, else the best's own. ``held``: the rows scored, as the reason names them
    (``"validation"``, or ``"out-of-fold"`` for bagged candidates). Returns ``{"picked", "fusion", "metric", "best",
    "threshold" (the picked candidate's bar), "candidates": scores, "left_out", "reason"}``."""
    metric, mode = selection
    sign = 1.0 if mode == "max" else -1.0
    best = max(scores, key=lambda n: (sign * scores[n]["valid"], -scores[n]["valid_loss"]))
    top = scores[best]
    for name, cand in scores.items():
        paired = y_valid is not None and cand.get("valid_pred") is not None and top.get("valid_pred") is not None
        cand["se_vs_best"] = (
            paired_standard_error(metric, y_valid, top["valid_pred"], cand["valid_pred"])
            if paired and name != best
            else top["valid_se"]
        )
    picked = next(n for n, c in scores.items() if sign * c["valid"] >= sign * (top["valid"] - sign * c["se_vs_best"]))
    threshold = top["valid"] - sign * scores[picked]["se_vs_best"]
    others = ", ".join(f"{n} {c['valid']:.4f}" for n, c in scores.items() if n != picked)
    if picked == best:
        reason = f"the best {held} {metric} of {len(scores)} candidates: {picked} {scores[picked]['valid']:.4f}"
    else:
        reason = (
            f"the simplest candidate within one standard error ({scores[picked]['se_vs_best']:.4f}) of the best "
            f"{held} {metric} ({best} {top['valid']:.4f}): {picked} {scores[picked]['valid']:.4f}"
        )
    return {
        "picked": picked,
        "fusion": scores[picked]["fusion"],
        "metric": metric,
        "best": best,
        "threshold": threshold,
        "candidates": scores,
        "left_out": dict(left_out),
        "reason": reason + (f" (others: {others})" if others else ""),
    }
