"""What the commands do, as library functions: ``attnfuse train`` is :func:`train`, and
``evaluate``/``predict``/``explain`` start from :func:`load_trained`.

A training request is a :class:`TrainSpec`: the run's options (:class:`RunOptions`), the settings
given for the fusion's config, and the :class:`~attnfuse.training.TrainConfig`. It is built from
plain option values (the command line, a ``--config`` file, a ``run.yaml``) by
:meth:`TrainSpec.from_options`, which checks every value before any data is loaded, and written
back by :meth:`TrainSpec.to_options`, so that a run directory's ``run.yaml`` reproduces the run::

    spec = TrainSpec.from_options({"data": "mfeat", "fusion": "self", "d_model": 32, "epochs": 5})
    result = train(spec, out="runs/mfeat-self")   # loads, trains (per seed), saves, returns metrics

With ``fusion="auto"`` (the default) :func:`train` trains the candidates of :data:`PORTFOLIO`
that fit the data on the training rows and keeps the simplest one within a standard error of the
best validation metric (:func:`attnfuse.portfolio.choose`); with
``baselines`` (the default) it also fits the classical models of :mod:`attnfuse.baselines` on the
same rows and says when one of them beats the fusion on the validation split.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from .baselines import fit_baselines, summarize_baselines, verdict
from .checkpoint import check_compatible, fingerprint, load_model, save_run
from .data import BUILTINS, MultimodalDataset, Standardizer, load_data
from .data.dataset import TASKS
from .fusion import FUSIONS, FusionModel, config_from_dict
from .metrics import summarize
from .options import Option, coerce, option, options_of
from .portfolio import PORTFOLIO, Candidate, candidates_for, choose, public, settings_used
from .training import RunResult, TrainConfig, run

__all__ = [
    "RunOptions",
    "TrainSpec",
    "TrainResult",
    "Candidate",
    "PORTFOLIO",
    "candidates_for",
    "train",
    "train_options",
    "read_options",
    "load",
    "load_trained",
    "split_parts",
]

# progress(event, info): "data" once the data is loaded ({"data"}); "run" when a model starts
# training ({"index" (of the seed), "seed", "epochs", "candidate" (the fusion, or the candidate's
# name under --fusion auto), "members" (--ensemble)}); "epoch" after each epoch ({"index",
# "candidate", "member", "epoch", "train_loss", "valid_loss", "valid_<metric>", "best_epoch"});
# "run_end" ({"index", "candidate", "epochs", "best_epoch"}); with --fusion auto, "selected" once
# a seed's candidates are trained ({"index", "selection"}: see TrainResult.selection).
Progress = Callable[[str, dict], None]
FUSION_CHOICES = ("auto", *FUSIONS)


@dataclass
class RunOptions:
    """What to train on, with which fusion, how many times: the options of ``attnfuse train`` that
    belong neither to the model nor to the optimiser."""

    data: str = option("mfeat", "Built-in dataset name (see `attnfuse datasets`) or a data file (.npz, .pkl).")
    task: str = option("auto", "auto: classification for integer labels, else regression.", choices=TASKS)
    allow_pickle: bool = option(False, "Allow reading a pickle file (unpickling can run code its author put in it).")
    fusion: str = option(
        "auto",
        "Fusion model; auto: train a small portfolio (concat, self with mean and with per-modality pooling, "
        "cross for sequence data) and keep the simplest within one standard error of the best validation score.",
        choices=FUSION_CHOICES,
    )
    repeat: int = option(1, "Train this many seeds (seed, seed+1, ...; and splits, when the data has none).")
    baselines: bool = option(
        True, "Also fit logistic regression / ridge and gradient boosting on the same rows, for comparison."
    )

    def __post_init__(self) -> None:
        if self.fusion not in FUSION_CHOICES:
            raise ValueError(f"fusion: expected one of {', '.join(FUSION_CHOICES)}, got {self.fusion!r}")
        if self.task not in TASKS:
            raise ValueError(f"task: expected one of {', '.join(TASKS)}, got {self.task!r}")
        if isinstance(self.repeat, bool) or not isinstance(self.repeat, int) or self.repeat < 1:
            raise ValueError(f"repeat: expected an integer >= 1, got {self.repeat!r}")


def train_options() -> list[Option]:
    """Every option of ``attnfuse train``, in the order of its help: the run, the model (the union
    of the fusions' settings), the optimisation."""
    return options_of(RunOptions, *(m.config_class for m in FUSIONS.values()), TrainConfig)


@dataclass
class TrainSpec:
    """One ``attnfuse train`` request: run options, the fusion settings given (the rest take the
    config's defaults), and the training settings."""

    run: RunOptions
    model: dict[str, Any]
    train: TrainConfig

    @classmethod
    def from_options(cls, values: dict[str, Any], where: str = "options") -> TrainSpec:
        """Build and check a request from option values (names as the dataclass fields or their
        command-line aliases; dashes are read as underscores). An unknown option, a value of the wrong type or range, or a setting the
        chosen fusion does not have is a ValueError, raised before any data is loaded."""
        known = {o.name: o for o in train_options()}
        alias = {flag.replace("-", "_"): o.name for o in known.values() for flag in o.flags}  # heads -> nhead
        values = {alias.get(k.replace("-", "_"), k.replace("-", "_")): v for k, v in values.items()}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"{where}: unknown option {unknown[0]!r} (options: {', '.join(known)})")
        values = {k: coerce(known[k], v, where) for k, v in values.items()}
        run_opts = RunOptions(**{k: v for k, v in values.items() if known[k].owner is RunOptions})
        train_cfg = TrainConfig(**{k: v for k, v in values.items() if known[k].owner is TrainConfig})
        model = {k: v for k, v in values.items() if known[k].owner not in (RunOptions, TrainConfig)}
        # The fusion has these settings, and their values are valid (for auto: some candidate's).
        if run_opts.fusion == "auto":
            candidates_for(None, "auto", model)
        else:
            config_from_dict(run_opts.fusion, model)
        return cls(run_opts, model, train_cfg)

    def to_options(self) -> dict[str, Any]:
        """Flat option values that :meth:`from_options` turns back into this request."""
        return {**asdict(self.run), **self.model, **asdict(self.train)}


def read_options(path: str | os.PathLike) -> dict[str, Any]:
    """Option values from a YAML or JSON file (a mapping of option name to value; JSON is YAML)."""
    p = Path(path)
    try:
        values = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"config: {p} is not valid YAML or JSON ({str(e).splitlines()[0]})") from None
    if values is None:
        return {}
    if not isinstance(values, dict) or not all(isinstance(k, str) for k in values):
        raise ValueError(f"config: {p}: expected a mapping of option names to values, got {type(values).__name__}")
    nested = [k for k, v in values.items() if isinstance(v, dict)]
    if nested:
        raise ValueError(f"config: {p}: option {nested[0]!r} has a nested mapping; options are plain values")
    return values


@dataclass
class TrainResult:
    """What :func:`train` returns: the first seed's run (its model is the one saved), every seed's
    metrics, the report written to ``metrics.json``, the data and where it was saved.

    ``selection``: with ``--fusion auto``, how the first seed's model was chosen (also in
    config.json under ``"auto"``): ``{"picked", "fusion", "metric", "best", "threshold",
    "candidates": {name: {"fusion", "settings", "valid", "valid_se", "valid_loss"}}, "left_out",
    "reason"}`` (see :func:`attnfuse.portfolio.choose`).
    ``verdict``: the best baseline when it beats the fusion on the validation split (means with
    ``repeat``), see :func:`attnfuse.baselines.verdict`. ``seconds``: wall time of the fusion
    training (``"fusion"``: all candidates and members; ``"fusion:<candidate>"``: each) and of
    each baseline, summed over the seeds. ``candidate_metrics``: per seed, every candidate's
    metrics on every split (for benchmarks; not written to metrics.json, where only validation
    scores appear: choosing a candidate by its test score would leak the test rows)."""

    first: RunResult
    runs: list[dict]
    report: dict
    data: MultimodalDataset
    out: Path | None
    selection: dict | None = None
    verdict: dict | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    candidate_metrics: list[dict[str, dict]] = field(default_factory=list)


def load(
    source: str, allow_pickle: bool = False, seed: int = 0, task: str = "auto", num_classes: int | None = None
) -> MultimodalDataset:
    """A built-in or a file, read as ``task`` (a built-in is rebuilt when another task is asked)."""
    data = load_data(source, allow_pickle=allow_pickle, seed=seed, task=task, num_classes=num_classes)
    if task != "auto" and task != data.task:
        data = MultimodalDataset(
            data.features, data.y, masks=data.masks, split=data.split, task=task, name=data.name, info=data.info
        )
    return data


def train(spec: TrainSpec, out: str | os.PathLike | None = None, progress: Progress | None = None) -> TrainResult:
    """Load the data, train one model per seed, and (when ``out`` is given) save the first seed's
    model with the metrics and the options in ``out`` (see :func:`attnfuse.checkpoint.save_run`).

    With ``repeat`` K > 1, seeds ``seed .. seed+K-1`` each train a model (and draw their own split
    when the data has none); ``metrics.json`` then holds every run and the mean ± std. With
    ``fusion="auto"`` each seed trains every candidate of :func:`candidates_for` and keeps one by
    its validation score (:func:`attnfuse.portfolio.choose`); with ``baselines`` each seed also fits the baselines on its rows.

    ``metrics.json``: ``{"train", "valid", "test"}`` (the model's metrics per split), plus
    ``"candidates": {name: {"valid": metrics}}`` (auto) and ``"baselines": {name: {split:
    metrics}}``; with ``repeat``: ``{"runs": [each as above, with "seed", "best_epoch", "fusion"
    and (auto) "picked"], "summary": {split: {metric: {"mean", "std"}}}}`` and the same mean ± std for
    ``"candidates"`` and ``"baselines"``."""
    emit = progress or (lambda event, info: None)
    opts, cfg = spec.run, spec.train
    data = load(opts.data, opts.allow_pickle, cfg.seed, opts.task)
    cfg.check_task(data.task, data.target_dim)
    candidates, left_out = candidates_for(data, opts.fusion, spec.model)
    emit("data", {"data": data})

    first, selection, runs, seconds, per_candidate = None, None, [], {"fusion": 0.0}, []
    for i in range(opts.repeat):
        seed_cfg = replace(cfg, seed=cfg.seed + i)
        start = time.perf_counter()
        result, chosen = _train_candidates(data, candidates, left_out, seed_cfg, i, emit, seconds)
        seconds["fusion"] += time.perf_counter() - start
        per_candidate.append({n: c.pop("metrics") for n, c in chosen["candidates"].items()})
        chosen = chosen if opts.fusion == "auto" else None
        record = {"seed": seed_cfg.seed, "best_epoch": result.best_epoch, "fusion": result.fusion, **result.metrics}
        if chosen is not None:
            record["picked"] = chosen["picked"]
            record["candidates"] = {n: {"valid": c["valid_metrics"]} for n, c in chosen["candidates"].items()}
            emit("selected", {"index": i, "selection": public(chosen)})
        if opts.baselines:
            fitted = fit_baselines(data, result.splits, seed=seed_cfg.seed, sentiment=cfg.sentiment_metrics)
            record["baselines"] = fitted.metrics
            for name, sec in fitted.seconds.items():
                seconds[name] = seconds.get(name, 0.0) + sec
        runs.append(record)
        first = first or result
        selection = selection or chosen

    report = _report(runs)
    found = None
    if opts.baselines:
        fusion_valid = report["valid"] if opts.repeat == 1 else report["summary"]["valid"]
        found = verdict(cfg.selection_metric(data.task), fusion_valid, report["baselines"])
    selection = None if selection is None else public(selection)
    if out is not None:
        source = opts.data if opts.data in BUILTINS else str(Path(opts.data).resolve())
        options = {**spec.to_options(), "data": source}
        extra = None if selection is None else {"auto": selection}
        save_run(
            out, first.model, first.fusion, data, first.standardizer, asdict(cfg), cfg.seed, report, options, extra
        )
    return TrainResult(
        first, runs, report, data, None if out is None else Path(out), selection, found, seconds, per_candidate
    )


def _train_candidates(
    data: MultimodalDataset,
    candidates: list[Candidate],
    left_out: dict[str, str],
    cfg: TrainConfig,
    index: int,
    emit: Progress,
    seconds: dict[str, float],
) -> tuple[RunResult, dict]:
    """Train each candidate on one seed's rows; return the chosen one and the record of the choice
    (:func:`attnfuse.portfolio.choose`; each candidate's metrics on every split under
    ``"metrics"``). Each candidate's training time is added to ``seconds``."""
    metric, _ = selection = cfg.selection_metric(data.task)
    results, scores = {}, {}
    for cand in candidates:
        emit("run", {"index": index, "seed": cfg.seed, "epochs": cfg.epochs, "candidate": cand.name,
                     "members": cfg.ensemble})  # fmt: skip
        start = time.perf_counter()
        result = run(
            data, cand.fusion, cand.settings, cfg, split_seed=cfg.seed,
            on_epoch=lambda record, name=cand.name: emit("epoch", {"index": index, "candidate": name, **record}),
        )  # fmt: skip
        key = f"fusion:{cand.name}"
        seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - start
        emit("run_end", {"index": index, "candidate": cand.name, "epochs": len(result.history),
                         "best_epoch": result.best_epoch})  # fmt: skip
        results[cand.name] = result
        scores[cand.name] = {
            "fusion": cand.fusion,
            "settings": settings_used(result.model, cand),
            "valid": result.metrics["valid"][metric],
            "valid_se": result.valid_se,
            "valid_loss": result.valid_loss,
            "valid_metrics": result.metrics["valid"],
            "metrics": result.metrics,
        }
    chosen = choose(scores, selection, left_out)
    return results[chosen["picked"]], chosen


def _report(runs: list[dict]) -> dict:
    """metrics.json from the per-seed records (see :func:`train`)."""
    if len(runs) == 1:
        return {k: v for k, v in runs[0].items() if k not in ("seed", "best_epoch", "fusion", "picked")}
    splits = [s for s in ("train", "valid", "test") if s in runs[0]]
    report: dict[str, Any] = {"runs": runs, "summary": {s: summarize([r[s] for r in runs]) for s in splits}}
    if "candidates" in runs[0]:
        report["candidates"] = {
            name: {"valid": summarize([r["candidates"][name]["valid"] for r in runs])} for name in runs[0]["candidates"]
        }
    if "baselines" in runs[0]:
        report["baselines"] = summarize_baselines([r["baselines"] for r in runs])
    return report


def load_trained(
    model_dir: str | os.PathLike, source: str | None = None, allow_pickle: bool = False
) -> tuple[FusionModel, dict, Standardizer, MultimodalDataset]:
    """A trained model, its config and standardiser, and data checked to fit it (default: the data
    it was trained on). A generated built-in (``synthetic-*``) is regenerated with the seed it was
    trained with, so it is the same data; labels are read in the model's label space, so data
    holding fewer classes (even one) can be evaluated."""
    net, config, standardizer = load_model(model_dir)
    trained = config["data"]
    data = load(
        source or trained.get("source", trained["name"]),
        allow_pickle,
        seed=config["train"].get("seed", 0),
        task=trained["task"],
        num_classes=trained.get("num_classes") if trained["task"] == "classification" else None,
    )
    check_compatible(config, data)
    return net, config, standardizer, data


def split_parts(data: MultimodalDataset, config: dict) -> dict[str, np.ndarray]:
    """Row indices per split for a trained model's data: the data's own split column, or, for the
    training data itself (recognised by its fingerprint), the split drawn in training; always also
    ``"all"``. Other data without a split column has only ``"all"``."""
    parts = {}
    if data.split is not None:
        parts = {s: np.flatnonzero(data.split == s) for s in ("train", "valid", "test")}
    elif config["data"].get("fingerprint") == fingerprint(data):
        parts = data.split_indices(config["split_seed"])
    parts["all"] = np.arange(data.n)
    return parts
