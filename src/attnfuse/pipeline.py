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
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
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
from .data import BUILTINS, SPLITS, MultimodalDataset, Split, Standardizer, kfold, load_data, make_split
from .data.dataset import TASKS
from .data.io.table import parse_modality_options
from .distributed import Dist, setup, teardown
from .fusion import FUSIONS, FusionModel, build_model, config_from_dict
from .metrics import summarize
from .options import Option, coerce, option, options_of
from .runstate import RunLog, last_dir, load_state, save_state, write_options
from .training import Control, DivergedError, Interrupted, RunResult, TrainConfig, Trainer, model_config, run

__all__ = [
    "ReadOptions",
    "RunOptions",
    "TrainSpec",
    "TrainResult",
    "train",
    "train_options",
    "data_options",
    "read_options",
    "load",
    "load_trained",
    "split_parts",
]

# progress(event, info): "data" once the data is loaded ({"data"}), "run" when a seed starts
# ({"index", "seed", "epochs"}), "epoch" after each epoch ({"index", "epoch", "train_loss",
# "valid_loss", "valid_<metric>", "best_epoch"}), "run_end" ({"index", "epochs", "best_epoch"}),
# "diverged" after "run_end" when a NaN/inf loss stopped it ({"index", "message", "best_epoch":
# the finite epoch whose weights were kept}), "note" ({"message"}: e.g. a carved validation part).
Progress = Callable[[str, dict], None]


@dataclass
class ReadOptions:
    """How a data file is read: the options every command that reads data has."""

    allow_pickle: bool = option(False, "Allow reading a pickle file (unpickling can run code its author put in it).")
    modality: list[str] | None = option(
        None,
        "Tables: the columns of modality NAME, as NAME=PREFIX or NAME=GLOB (text=txt_*); repeat per modality "
        "(default: one modality per NAME_ column prefix).",
        metavar="NAME=PATTERN",
    )
    target: str | None = option(None, "Tables: the target column (default y).")
    split_col: str | None = option(None, "Tables: the column of train/valid/test (default: a column named split).")
    mapping: str | None = option(
        None, "Tables: a YAML/JSON file {modalities: {name: pattern or [columns]}, target: col, split: col}."
    )

    def table_options(self) -> dict[str, Any]:
        """The keyword arguments of :func:`attnfuse.data.load_data` for tables."""
        return {
            "modalities": parse_modality_options(self.modality) if self.modality else None,
            "target": self.target,
            "split_col": self.split_col,
            "mapping": self.mapping,
        }


@dataclass
class RunOptions(ReadOptions):
    """What to train on, with which fusion, how many times: the options of ``attnfuse train`` that
    belong neither to the model nor to the optimiser."""

    data: str = option(
        "mfeat",
        "Built-in dataset name (see `attnfuse datasets`), a data file (.npz, .csv, .parquet, .pkl) or a "
        "directory dataset (see `attnfuse convert`).",
    )
    task: str = option("auto", "auto: classification for integer labels, else regression.", choices=TASKS)
    fusion: str = option("self", "Fusion model.", choices=tuple(FUSIONS))
    repeat: int = option(1, "Train this many seeds (seed, seed+1, ...; and splits, when the data has none).")
    folds: int = option(
        0,
        "K-fold cross-validation (K >= 2): one model per fold (seed, seed+1, ...), mean ± std over the folds; "
        "the first fold's model is saved. A split column's test rows stay the test part of every fold.",
    )
    checkpoint_every: int = option(
        1, "Write OUT/last/ (what --resume continues from) every K epochs; 0: only when interrupted."
    )
    tensorboard: bool = option(False, "Also log each epoch to TensorBoard (needs the tensorboard package).")

    @property
    def runs(self) -> int:
        """How many models are trained: one per fold, or one per seed."""
        return self.folds or self.repeat

    def __post_init__(self) -> None:
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion: expected one of {', '.join(FUSIONS)}, got {self.fusion!r}")
        if self.task not in TASKS:
            raise ValueError(f"task: expected one of {', '.join(TASKS)}, got {self.task!r}")
        if isinstance(self.repeat, bool) or not isinstance(self.repeat, int) or self.repeat < 1:
            raise ValueError(f"repeat: expected an integer >= 1, got {self.repeat!r}")
        if isinstance(self.folds, bool) or not isinstance(self.folds, int) or self.folds < 0 or self.folds == 1:
            raise ValueError(f"folds: expected 0 (no cross-validation) or an integer >= 2, got {self.folds!r}")
        if self.folds and self.repeat > 1:
            raise ValueError(f"folds: with --folds {self.folds} the folds are the runs; --repeat must be 1")
        if (
            isinstance(self.checkpoint_every, bool)
            or not isinstance(self.checkpoint_every, int)
            or self.checkpoint_every < 0
        ):
            raise ValueError(f"checkpoint_every: expected an integer >= 0, got {self.checkpoint_every!r}")


def train_options() -> list[Option]:
    """Every option of ``attnfuse train``, in the order of its help: the run, the model (the union
    of the fusions' settings), the optimisation."""
    return options_of(RunOptions, *(m.config_class for m in FUSIONS.values()), TrainConfig)


def data_options() -> list[Option]:
    """The options of the commands that read data for a trained model (evaluate, predict, explain)."""
    return options_of(ReadOptions)


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
    source: str,
    allow_pickle: bool = False,
    seed: int = 0,
    task: str = "auto",
    num_classes: int | None = None,
    classes: list | None = None,
    **table: Any,
) -> MultimodalDataset:
    """A built-in, a file or a directory, read as ``task`` (a built-in is rebuilt when another task
    is asked); ``table`` are the reading options of tables (see :meth:`RunOptions.table_options`)."""
    data = load_data(
        source, allow_pickle=allow_pickle, seed=seed, task=task, num_classes=num_classes, classes=classes, **table
    )
    if task != "auto" and task != data.task:
        data = MultimodalDataset(
            data.features, data.y, masks=data.masks, split=data.split, task=task, name=data.name, info=data.info
        )
    return data


def train(
    spec: TrainSpec,
    out: str | os.PathLike | None = None,
    progress: Progress | None = None,
    *,
    resume: bool = False,
    handle_signals: bool = False,
) -> TrainResult:
    """Load the data, train one model per seed, and (when ``out`` is given) save the first seed's
    model with the metrics, the options and the epoch log in ``out`` (see
    :func:`attnfuse.checkpoint.write_run`) as one transaction
    (:func:`attnfuse.checkpoint.run_directory`): ``out`` is locked and proven writable before the
    data is loaded, and a reader finds the previous run or this one, complete. Training that
    diverges (a NaN/inf loss) keeps the best finite epoch (a "diverged" progress event says so) or,
    with none, raises :class:`~attnfuse.training.DivergedError` and saves nothing.

    With ``repeat`` K > 1, seeds ``seed .. seed+K-1`` each train a model (and draw their own split
    when the data has none); ``metrics.json`` then holds every run and the mean ± std.

    While it trains, ``out/last/`` holds the epoch log and a checkpoint every ``checkpoint_every``
    epochs; ``resume=True`` continues from it (bitwise as if never stopped, on the CPU). With
    ``handle_signals``, SIGINT/SIGTERM stop the run at the end of the current step, write the
    checkpoint and raise :class:`~attnfuse.training.Interrupted`. Under ``torchrun`` every
    process calls this; rank 0 alone reports progress and writes files."""
    dist = setup(spec.train.torch_device())
    emit = (progress or _quiet) if dist.main else _quiet
    try:
        # Rank 0 locks the output and proves it writable before the data is read: a second run into
        # the same --out, or an unwritable one, fails now, not after training.
        with run_directory(out) if out is not None and dist.main else contextlib.nullcontext() as tmp:
            return _train(spec, out, tmp, emit, resume, handle_signals, dist)
    except BaseException as error:
        if dist.main and _resumable(out, error):
            emit("note", {"message": f"the state is kept in {last_dir(out)}: attnfuse train --resume {out} continues"})
        raise
    finally:
        teardown()


def _resumable(out, error: BaseException) -> bool:
    """A run that failed after a checkpoint (a full disk at the final write, a crash) can be
    continued; an interrupted one says so itself, and a diverged one would only diverge again."""
    if out is None or isinstance(error, (Interrupted, KeyboardInterrupt, DivergedError)):
        return False
    return (last_dir(out) / "state").exists()


def _quiet(event: str, info: dict) -> None:
    pass


def _train(
    spec: TrainSpec, out, tmp: Path | None, emit: Progress, resume: bool, handle_signals: bool, dist: Dist
) -> TrainResult:
    opts, cfg = spec.run, spec.train
    data = load(opts.data, opts.allow_pickle, cfg.seed, opts.task, **opts.table_options())
    if data.y is None:
        raise ValueError("y: the data has no targets; training needs them (attnfuse predict works without)")
    cfg.check_task(data.task, data.target_dim)
    # Refused with the numbers, not allocated until the machine swaps: 16 bytes a parameter
    # (weights, gradients, AdamW's two moments).
    check_memory(config_from_dict(opts.fusion, model_config(opts.fusion, data, **spec.model)), 16)
    emit("data", {"data": data})
    folds = kfold(data, opts.folds, cfg.seed) if opts.folds else None
    options = {**spec.to_options(), "data": _source(opts.data)}
    if opts.mapping:
        options["mapping"] = str(Path(opts.mapping).resolve())
    progress = _Progress(out, options, data, opts.tensorboard, resume, dist)

    runs = progress.finished
    first = progress.first(spec, data, folds[0] if folds else make_split(data, cfg.seed))
    try:
        with stop_on_signals(handle_signals) as stop:
            for i in range(progress.run_index, opts.runs):
                seed_cfg = replace(cfg, seed=cfg.seed + i)
                split = folds[i] if folds else make_split(data, seed_cfg.seed)
                if i == 0 and split.note and split.how != "drawn":
                    emit("note", {"message": split.note})
                emit("run", {"index": i, "seed": seed_cfg.seed, "epochs": seed_cfg.epochs})

                def on_epoch(record: dict, i=i, seed=seed_cfg.seed) -> None:
                    progress.log_epoch(i, seed, record)
                    emit("epoch", {"index": i, **record})

                control = Control(
                    dist=dist,
                    resume=progress.state if i == progress.run_index else None,
                    checkpoint=progress.saver(i, runs, first),
                    every=opts.checkpoint_every,
                    stop=stop,
                )
                result = run(data, opts.fusion, spec.model, seed_cfg, on_epoch=on_epoch, control=control, split=split)
                emit("run_end", {"index": i, "epochs": len(result.history), "best_epoch": result.best_epoch})
                if result.note:
                    emit("diverged", {"index": i, "message": result.note, "best_epoch": result.best_epoch})
                record = {"fold": i} if folds else {}
                runs.append({**record, "seed": seed_cfg.seed, "best_epoch": result.best_epoch,
                             "history": result.history, **result.metrics})  # fmt: skip
                first = first or result

        records = [{k: v for k, v in r.items() if k != "history"} for r in runs]
        if opts.runs == 1:
            report = first.metrics
        else:
            report = {"runs": records, "summary": {s: summarize([r[s] for r in records]) for s in first.metrics}}
        report = metrics_for_json(report)  # an undefined (NaN) metric is null, here and in metrics.json
        if tmp is not None:
            split = {"how": first.split.how, "seed": cfg.seed, **({"folds": opts.folds, "fold": 0} if folds else {})}
            write_run(tmp, first.model, opts.fusion, data, first.standardizer, asdict(cfg), split, report, options)
            progress.close()
            progress.move_logs(tmp)
    except BaseException as error:
        progress.close()
        progress.failed(error)
        raise
    return TrainResult(first, records, report, data, None if out is None else Path(out))


class _Progress:
    """``OUT/last/`` of a run in progress (see :mod:`attnfuse.runstate`): its options, epoch log and
    checkpoints, and what a resumed run starts from. Rank 0 alone writes; without ``out``, nothing."""

    def __init__(self, out, options: dict, data: MultimodalDataset, tensorboard: bool, resume: bool, dist: Dist):
        self.dist, self.data = dist, data
        self.last = None if out is None else last_dir(out)
        self.state = load_state(self.last) if resume else None
        meta = self.state[1] if self.state else {}
        if self.state and meta.get("fingerprint") != fingerprint(data):
            raise ValueError(f"resume: the data {options['data']!r} is not the data the run in {out} was trained on")
        self.run_index, self.finished = meta.get("run_index", 0), list(meta.get("finished", []))
        writes = self.last is not None and dist.main
        self.created = [p for p in (None if out is None else Path(out), self.last) if writes and not p.exists()]
        self.log = None
        try:
            if writes and not resume:
                write_options(self.last, options)
            self.log = RunLog(self.last, tensorboard, keep_rows=meta.get("log_rows")) if writes else None
        except BaseException as error:
            self.failed(error)
            raise

    def first(self, spec: TrainSpec, data: MultimodalDataset, split: Split) -> RunResult | None:
        """The first seed's finished run (trained on ``split``), as a checkpoint taken during a
        later seed keeps it."""
        if self.state is None or self.run_index == 0:
            return None
        tensors, meta = self.state
        info = meta["first"]
        model = build_model(spec.run.fusion, model_config(spec.run.fusion, data, **spec.model))
        model.load_state_dict({k.removeprefix("first."): v for k, v in tensors.items() if k.startswith("first.")})
        return RunResult(model, spec.run.fusion, Standardizer.from_dict(info["standardizer"]), info["metrics"],
                         info["best_epoch"], info["history"], info["note"], split)  # fmt: skip

    def log_epoch(self, run: int, seed: int, record: dict) -> None:
        if self.log is not None:
            self.log.write(run, seed, record)

    def saver(self, i: int, runs: list[dict], first: RunResult | None) -> Callable[[Trainer], None] | None:
        """The checkpoint function of run ``i`` (None without an output directory)."""
        if self.last is None:
            return None

        def save(trainer: Trainer) -> None:
            tensors, meta = trainer.state_dict()  # on every rank: the ranks' RNG states are gathered
            if not self.dist.main:
                return
            done = sum(len(r.get("history", [])) for r in runs) + trainer.epoch
            meta.update(run_index=i, finished=runs, fingerprint=fingerprint(self.data), log_rows=done)
            if first is not None:
                tensors.update({f"first.{k}": v for k, v in first.model.state_dict().items()})
                meta["first"] = {
                    "metrics": first.metrics, "best_epoch": first.best_epoch, "history": first.history,
                    "note": first.note, "standardizer": first.standardizer.to_dict(),
                }  # fmt: skip
            save_state(self.last, tensors, meta)

        return save

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
            self.log = None

    def move_logs(self, new: Path) -> None:
        """The epoch log (and TensorBoard events) move into the finished run's new directory; the
        checkpoints of ``last/`` go with the old directory when the new one is swapped in."""
        for name in ("log.csv", "tensorboard"):
            if self.last is not None and (self.last / name).exists():
                os.replace(self.last / name, new / name)

    def failed(self, error: BaseException) -> None:
        """After ``error``: unless the run can be continued from a checkpoint in ``last/``, the
        directories this run created go, so nothing is left behind (a diverged run would only
        diverge again)."""
        keep = (self.last / "state").exists() and not isinstance(error, DivergedError) if self.last else False
        if self.created and self.dist.main and not keep:
            shutil.rmtree(self.created[0], ignore_errors=True)


def _source(data: str) -> str:
    """Where the data comes from, as ``run.yaml`` records it: a built-in's name or a full path."""
    return data if data in BUILTINS else str(Path(data).resolve())


@contextlib.contextmanager
def stop_on_signals(enabled: bool) -> Iterator[Callable[[], int]]:
    """While active, SIGINT and SIGTERM are noted instead of killing the process; the function it
    yields returns the signal received (0: none), for the loop to stop at a step boundary. A second
    SIGINT interrupts at once."""
    received: list[int] = []
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield lambda: 0
        return

    def note(signum: int, frame: object) -> None:
        if received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        received.append(signum)

    previous = {s: signal.signal(s, note) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: received[0] if received else 0
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def load_trained(
    model_dir: str | os.PathLike, source: str | None = None, allow_pickle: bool = False, **table: Any
) -> tuple[FusionModel, dict, Standardizer, MultimodalDataset]:
    """A trained model, its config and standardiser, and data checked to fit it (default: the data
    it was trained on, read as it was). A generated built-in (``synthetic-*``) is regenerated with
    the seed it was trained with, so it is the same data; labels are read in the model's label space
    (its classes), so data holding fewer classes (even one) can be evaluated. ``table``: reading
    options for a table (default: those the model's own table was read with)."""
    config = read_config(model_dir)  # checked, and the model's size bounded, before anything is built
    trained = config["data"]
    if not any(v for v in table.values()) and (source is None or source == trained.get("source")):
        read = config.get("read") or {}
        table = ReadOptions(**{k: v for k, v in read.items() if v is not None}).table_options() if read else {}
    classification = trained["task"] == "classification"
    data = load(
        source or trained.get("source", trained["name"]),
        allow_pickle,
        seed=config["train"].get("seed", 0),
        task=trained["task"],
        num_classes=trained.get("num_classes") if classification and trained.get("classes") is None else None,
        classes=trained.get("classes") if classification else None,
        **{k: v for k, v in table.items() if v is not None},
    )
    check_compatible(config, data)
    net, config, standardizer = load_model(model_dir, config=config)
    return net, config, standardizer, data


def split_parts(data: MultimodalDataset, config: dict) -> dict[str, np.ndarray]:
    """Row indices per part for a trained model's data: for the training data itself (recognised by
    its fingerprint) the parts it was trained with (its split column, the validation part carved out
    of it, a drawn split or the first fold); for other data its own split column; always also
    ``"all"``."""
    split = config.get("split", {"how": "drawn", "seed": config.get("split_seed", 0)})
    parts: dict[str, np.ndarray] = {}
    if config["data"].get("fingerprint") == fingerprint(data):  # the training data: its training split
        if split["how"] == "fold":
            parts = dict(kfold(data, split["folds"], split["seed"])[split["fold"]])
        else:
            parts = dict(make_split(data, split["seed"]))
    elif data.split is not None:
        parts = {s: rows for s in SPLITS if (rows := np.flatnonzero(data.split == s)).size}
    parts["all"] = np.arange(data.n)
    return parts
