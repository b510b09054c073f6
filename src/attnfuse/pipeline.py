"""What the commands do, as library functions: ``attnfuse train`` is :func:`train`, and
``evaluate``/``predict``/``explain`` start from :func:`load_trained`.

A training request is a :class:`TrainSpec`: the run's options (:class:`RunOptions`), the settings
given for the fusion's config, and the :class:`~attnfuse.training.TrainConfig`. It is built from
plain option values (the command line, a ``--config`` file, a ``run.yaml``) by
:meth:`TrainSpec.from_options`, which checks every value before any data is loaded, and written
back by :meth:`TrainSpec.to_options`, so that a run directory's ``run.yaml`` reproduces the run::

    spec = TrainSpec.from_options({"data": "mfeat", "fusion": "self", "d_model": 32, "epochs": 5})
    result = train(spec, out="runs/mfeat-self")   # loads, trains (per seed), saves, returns metrics
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from .checkpoint import (
    check_compatible,
    check_memory,
    fingerprint,
    load_model,
    metrics_for_json,
    read_config,
    run_directory,
    write_run,
)
from .data import BUILTINS, MultimodalDataset, Standardizer, load_data
from .data.dataset import TASKS
from .fusion import FUSIONS, FusionModel, config_from_dict
from .metrics import summarize
from .options import Option, coerce, option, options_of
from .training import RunResult, TrainConfig, model_config, run

__all__ = [
    "RunOptions",
    "TrainSpec",
    "TrainResult",
    "train",
    "train_options",
    "read_options",
    "load",
    "load_trained",
    "split_parts",
]

# progress(event, info): "data" once the data is loaded ({"data"}), "run" when a seed starts
# ({"index", "seed", "epochs"}), "epoch" after each epoch ({"index", "epoch", "train_loss",
# "valid_loss", "valid_<metric>", "best_epoch"}), "run_end" ({"index", "epochs", "best_epoch"}),
# "diverged" after "run_end" when a NaN/inf loss stopped it ({"index", "message", "best_epoch":
# the finite epoch whose weights were kept}).
Progress = Callable[[str, dict], None]


@dataclass
class RunOptions:
    """What to train on, with which fusion, how many times: the options of ``attnfuse train`` that
    belong neither to the model nor to the optimiser."""

    data: str = option("mfeat", "Built-in dataset name (see `attnfuse datasets`) or a data file (.npz, .pkl).")
    task: str = option("auto", "auto: classification for integer labels, else regression.", choices=TASKS)
    allow_pickle: bool = option(False, "Allow reading a pickle file (unpickling can run code its author put in it).")
    fusion: str = option("self", "Fusion model.", choices=tuple(FUSIONS))
    repeat: int = option(1, "Train this many seeds (seed, seed+1, ...; and splits, when the data has none).")

    def __post_init__(self) -> None:
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion: expected one of {', '.join(FUSIONS)}, got {self.fusion!r}")
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
        config_from_dict(run_opts.fusion, model)  # the fusion has these settings, and their values are valid
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
    except RecursionError:
        raise ValueError(f"config: {p} is nested too deeply to be a file of options") from None
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
    metrics, the report written to ``metrics.json``, the data and where it was saved."""

    first: RunResult
    runs: list[dict]
    report: dict
    data: MultimodalDataset
    out: Path | None


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
    model with the metrics and the options in ``out`` (see :func:`attnfuse.checkpoint.write_run`),
    as one transaction (:func:`attnfuse.checkpoint.run_directory`): ``out`` is locked and proven
    writable before the data is loaded, and a reader finds the previous run or this one, complete.
    Training that diverges (a NaN/inf loss) keeps the best finite epoch (a "diverged" progress
    event says so) or, with none, raises :class:`~attnfuse.training.DivergedError` and saves nothing.

    With ``repeat`` K > 1, seeds ``seed .. seed+K-1`` each train a model (and draw their own split
    when the data has none); ``metrics.json`` then holds every run and the mean ± std."""
    emit = progress or (lambda event, info: None)
    opts, cfg = spec.run, spec.train
    # The output is locked and proven writable before the data is read: a second run into the
    # same --out, or an unwritable one, fails now, not after training.
    with run_directory(out) if out is not None else contextlib.nullcontext() as tmp:
        data = load(opts.data, opts.allow_pickle, cfg.seed, opts.task)
        cfg.check_task(data.task, data.target_dim)
        # Refused with the numbers, not allocated until the machine swaps: 16 bytes a parameter
        # (weights, gradients, AdamW's two moments).
        check_memory(config_from_dict(opts.fusion, model_config(opts.fusion, data, **spec.model)), 16)
        emit("data", {"data": data})

        first, runs = None, []
        for i in range(opts.repeat):
            seed_cfg = replace(cfg, seed=cfg.seed + i)
            emit("run", {"index": i, "seed": seed_cfg.seed, "epochs": seed_cfg.epochs})
            result = run(
                data, opts.fusion, spec.model, seed_cfg, split_seed=seed_cfg.seed,
                on_epoch=lambda record, i=i: emit("epoch", {"index": i, **record}),
            )  # fmt: skip
            emit("run_end", {"index": i, "epochs": len(result.history), "best_epoch": result.best_epoch})
            if "diverged" in result.history[-1]:
                emit(
                    "diverged", {"index": i, "message": result.history[-1]["diverged"], "best_epoch": result.best_epoch}
                )
            runs.append({"seed": seed_cfg.seed, "best_epoch": result.best_epoch, **result.metrics})
            first = first or result

        if opts.repeat == 1:
            report = first.metrics
        else:
            report = {"runs": runs, "summary": {s: summarize([r[s] for r in runs]) for s in first.metrics}}
        report = metrics_for_json(report)  # an undefined (NaN) metric is null, here and in metrics.json
        if out is not None:
            source = opts.data if opts.data in BUILTINS else str(Path(opts.data).resolve())
            options = {**spec.to_options(), "data": source}
            write_run(tmp, first.model, opts.fusion, data, first.standardizer, asdict(cfg), cfg.seed, report, options)
    return TrainResult(first, runs, report, data, None if out is None else Path(out))


def load_trained(
    model_dir: str | os.PathLike, source: str | None = None, allow_pickle: bool = False
) -> tuple[FusionModel, dict, Standardizer, MultimodalDataset]:
    """A trained model, its config and standardiser, and data checked to fit it (default: the data
    it was trained on). A generated built-in (``synthetic-*``) is regenerated with the seed it was
    trained with, so it is the same data; labels are read in the model's label space, so data
    holding fewer classes (even one) can be evaluated."""
    config = read_config(model_dir)  # checked, and the model's size bounded, before anything is built
    trained = config["data"]
    data = load(
        source or trained.get("source", trained["name"]),
        allow_pickle,
        seed=config["train"].get("seed", 0),
        task=trained["task"],
        num_classes=trained.get("num_classes") if trained["task"] == "classification" else None,
    )
    check_compatible(config, data)
    net, config, standardizer = load_model(model_dir, config=config)
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
