"""What the commands do, as library functions: ``attnfuse train`` is :func:`train`, and
``evaluate``/``predict``/``explain`` start from :func:`load_trained`.

A training request is a :class:`TrainSpec`: the run's options (:class:`RunOptions`), the settings
given for the fusion's config, and the :class:`~attnfuse.training.TrainConfig`. It is built from
plain option values (the command line, a ``--config`` file, a ``run.yaml``) by
:meth:`TrainSpec.from_options`, which checks every value before any data is loaded, and written
back by :meth:`TrainSpec.to_options`, so that a run directory's ``run.yaml`` reproduces the run::

    spec = TrainSpec.from_options({"data": "mfeat", "fusion": "self", "d_model": 32, "epochs": 5})
    result = train(spec, out="runs/mfeat-self")   # loads, trains (per seed), saves, returns metrics

The work of one request is a list of models, each trained by :func:`attnfuse.training.fit_model`:
for every run (a seed of ``--repeat``, or a fold of ``--folds``), every candidate (the fusion asked
for, or with ``fusion="auto"`` those of :data:`attnfuse.portfolio.PORTFOLIO` that fit the data),
every member of an ``--ensemble``. A run keeps the candidate picked on the validation split
(:func:`attnfuse.portfolio.choose`), calibrates it on the same rows (a temperature; with
``interval``, prediction intervals: :mod:`attnfuse.calibration`) and, with ``baselines`` (the
default), fits the classical models of :mod:`attnfuse.baselines` on the same rows. The loops that do it are
:mod:`attnfuse.fit`; a checkpoint holds their state, so ``--resume`` continues any of these
combinations.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from .calibration import check_level, evaluation_block
from .checkpoint import (
    check_compatible,
    check_memory,
    fingerprint,
    load_model,
    read_config,
    run_directory,
    write_run,
)
from .checks import check_int
from .data import BUILTINS, SPLITS, MultimodalDataset, RowBatches, Standardizer, load_data
from .data.dataset import TASKS
from .data.io._common import read_bounded
from .data.io.table import TABLE_SUFFIXES, parse_modality_options
from .distributed import Dist, local_device, setup, teardown
from .fit import Fit, ProgressCallback, RunLoop, RunLoopState, bags_for, summarize_runs, workers_for
from .fusion import FUSIONS, FusionModel, config_from_dict
from .metrics import compute_metrics
from .options import Option, by_name, coerce, option, options_of, shorten
from .portfolio import PORTFOLIO, Candidate, candidates_for
from .runstate import Checkpoints, last_dir
from .splitplan import SplitPlan
from .training import DivergedError, Interrupted, TrainConfig, TrainedModel, model_config, predict, to_predictions

__all__ = [
    "ReadOptions",
    "RunOptions",
    "TrainSpec",
    "TrainResult",
    "Candidate",
    "PORTFOLIO",
    "candidates_for",
    "train",
    "train_options",
    "data_options",
    "read_options",
    "without_consent",
    "CONSENT_OPTIONS",
    "load",
    "load_trained",
    "data_for_model",
    "label_space",
    "metrics_per_part",
    "bagged_on_valid",
    "split_parts",
]

FUSION_CHOICES = ("auto", *FUSIONS)
_INTERVAL_CLASSIFICATION = (
    "interval: prediction intervals are for regression targets, the task is classification "
    "(its probabilities are calibrated by --calibrate)"
)


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
    fusion: str = option(
        "auto",
        "Fusion model; auto: train a small portfolio (concat, self with mean and with per-modality pooling, "
        "cross for sequence data) and save the weighted ensemble of it and the baselines that predicts held-out "
        "rows best (see --bags).",
        choices=FUSION_CHOICES,
    )
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
    bags: int = option(
        5,
        "--fusion auto on data of fewer than 1,000 rows: train each candidate in this many bags of the train + "
        "valid rows, each holding one part out, and weigh the ensemble on their out-of-fold predictions (at most "
        "3 bags from 1,000 rows on, none from 10,000); 0: no bagging (the validation rows weigh it).",
    )
    baselines: bool = option(
        True,
        "Also fit logistic regression / ridge and gradient boosting on the same rows, for comparison (and, with "
        "--fusion auto, as members of the weighted ensemble).",
    )
    calibrate: bool = option(
        True,
        "Classification: fit a temperature on the saved model's held-out logits (validation, or out-of-fold when "
        "bagged), so that predict's "
        "probabilities are calibrated (the predicted class is unchanged); ECE before/after in metrics.json.",
    )
    interval: float | None = option(
        None,
        "Regression: prediction intervals at this coverage level (e.g. 0.9): split-conformal, from the saved "
        "model's held-out residuals (validation, or out-of-fold when bagged), one half-width per target; predict "
        "writes lower/upper.",
        metavar="LEVEL",
    )

    @property
    def runs(self) -> int:
        """How many runs: one per fold, or one per seed (each trains every candidate and member)."""
        return self.folds or self.repeat

    def __post_init__(self) -> None:
        if self.fusion not in FUSION_CHOICES:
            raise ValueError(f"fusion: expected one of {', '.join(FUSION_CHOICES)}, got {self.fusion!r}")
        if self.task not in TASKS:
            raise ValueError(f"task: expected one of {', '.join(TASKS)}, got {self.task!r}")
        check_int("repeat", self.repeat)
        if check_int("folds", self.folds, 0) == 1:
            raise ValueError("folds: expected 0 (no cross-validation) or an integer >= 2, got 1")
        if self.folds and self.repeat > 1:
            raise ValueError(f"folds: with --folds {self.folds} the folds are the runs; --repeat must be 1")
        check_int("checkpoint_every", self.checkpoint_every, 0)
        if check_int("bags", self.bags, 0) == 1:
            raise ValueError("bags: expected 0 (no bagging) or an integer >= 2, got 1")
        if self.interval is not None:
            check_level(self.interval)
            if self.task == "classification":
                raise ValueError(_INTERVAL_CLASSIFICATION)


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
        values = by_name(values, known.values())  # heads -> nhead
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"{where}: unknown option {shorten(unknown[0])} (options: {', '.join(known)})")
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


# Consent only the person running the command can give, on its command line or as a Python argument:
# never read from a file. A run.yaml records that its run read a pickle, but `--config run.yaml` or
# `--resume` of someone else's run must not unpickle a file that run.yaml names.
CONSENT_OPTIONS = ("allow_pickle",)


def without_consent(values: dict[str, Any]) -> dict[str, Any]:
    """Option values read from a file, less the consent options (:data:`CONSENT_OPTIONS`)."""
    return {k: v for k, v in values.items() if k.replace("-", "_") not in CONSENT_OPTIONS}


MAX_OPTIONS_BYTES = 1 << 20  # a file of option values: a few hundred bytes, a run.yaml a few KB


def read_options(path: str | os.PathLike) -> dict[str, Any]:
    """Option values from a YAML or JSON file (a mapping of option name to value; JSON is YAML).
    Consent options (``allow_pickle``) in the file are ignored: they come from the command line.
    The file must be a regular file (a named pipe would block) of at most :data:`MAX_OPTIONS_BYTES`."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a str or os.PathLike, got {type(path).__name__}")
    p = Path(path)
    raw = read_bounded(p, MAX_OPTIONS_BYTES, "config")
    try:
        values = yaml.safe_load(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"config: {p} is not a text file (not UTF-8 at byte {e.start})") from None
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
        raise ValueError(f"config: {p}: option {shorten(nested[0])} has a nested mapping; options are plain values")
    return without_consent(values)


@dataclass
class TrainResult:
    """What :func:`train` returns: the first run's model (the one saved), every run's metrics, the
    report written to ``metrics.json``, the data and where it was saved.

    ``selection``: with ``--fusion auto``, how the first run's model was chosen (also in
    config.json under ``"auto"``): ``{"picked", "fusion", "metric", "best", "threshold",
    "candidates": {name: {"fusion", "settings", "valid", "valid_se", "valid_loss"}}, "left_out",
    "reason"}`` (see :func:`attnfuse.portfolio.choose`).
    ``verdict``: the best baseline when it beats the fusion on the validation split (means over
    the runs), see :func:`attnfuse.baselines.verdict`. ``seconds``: wall time of the fusion
    training (``"fusion"``: all candidates and members; ``"fusion:<candidate>"``: each, the sum of
    its models' own training, which side by side (:mod:`attnfuse.workers`) add up to more than
    ``"fusion"``, the baselines' fits inside it), of
    each baseline and (auto) of the weighted ensemble's fit (``"weighing"``: its selection, and a
    bagged run's refits of the baselines), summed over the runs (of this process: a resumed run
    counts what it trained).
    ``candidate_metrics``: per run, every candidate's metrics on every split (for benchmarks; not
    written to metrics.json, where only validation scores appear: choosing a candidate by its test
    score would leak the test rows). ``calibration``: the first run's calibration, config.json's
    ``calibration`` block (a temperature, or the interval's half-widths; None without), see
    :mod:`attnfuse.calibration`."""

    first: TrainedModel
    runs: list[dict]
    report: dict
    data: MultimodalDataset
    out: Path | None
    selection: dict | None = None
    verdict: dict | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    candidate_metrics: list[dict[str, dict]] = field(default_factory=list)
    calibration: dict | None = None


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
    return data if task == "auto" else data.as_task(task)


def train(
    spec: TrainSpec,
    out: str | os.PathLike | None = None,
    progress: ProgressCallback | None = None,
    *,
    data: MultimodalDataset | None = None,
    resume: bool = False,
    handle_signals: bool = False,
) -> TrainResult:
    """Load the data, train the models of each run (see the module docstring), and (when ``out`` is
    given) save the first run's model with the metrics, the options and the epoch log in ``out`` (see
    :func:`attnfuse.checkpoint.write_run`) as one transaction
    (:func:`attnfuse.checkpoint.run_directory`): ``out`` is locked and proven writable before the
    data is loaded, and a reader finds the previous run or this one, complete. Training that
    diverges (a NaN/inf loss) keeps the best finite epoch (a "diverged" progress event says so) or,
    with none, raises :class:`~attnfuse.training.DivergedError` and saves nothing.

    With ``repeat`` K > 1, seeds ``seed .. seed+K-1`` each train a model (and draw their own split
    when the data has none); with ``folds`` K, each fold does. With ``fusion="auto"`` each run
    trains every candidate of :func:`~attnfuse.portfolio.candidates_for` and keeps one by its
    validation score; with ``ensemble`` K each model is K members averaged; with ``baselines`` each
    run also fits the baselines on its rows.

    ``metrics.json``: ``{"train", "valid", "test"}`` (the model's metrics per part; no ``"test"``
    when the data's split column has train and valid rows only), plus
    ``"candidates": {name: {"valid": metrics}}`` (auto), ``"baselines": {name: {part:
    metrics}}`` and ``"calibration"`` (:func:`attnfuse.fit.calibrate`: the temperature, or the
    interval's half-widths, with ECE and NLL before/after, or coverage and width, on ``"valid"``
    and ``"test"``); over several runs: ``{"runs": [each as above, with "seed", "best_epoch",
    "fusion", "fold" and (auto) "picked"], "summary": {part: {metric: {"mean", "std"}}}}`` and the
    same mean ± std for ``"candidates"``, ``"baselines"`` and ``"calibration"``.

    With ``calibrate`` (the default) a classifier's temperature, with ``interval`` a regression's
    prediction intervals are fitted on each run's validation rows; the first run's go into
    config.json (``"calibration"``) with its model.

    While it trains, ``out/last/`` holds the epoch log and a checkpoint every ``checkpoint_every``
    epochs; ``resume=True`` continues from it (bitwise as if never stopped, on the CPU). With
    ``handle_signals``, SIGINT/SIGTERM stop the run at the end of the current step, write the
    checkpoint and raise :class:`~attnfuse.training.Interrupted`. Under ``torchrun`` every
    process calls this; rank 0 alone reports progress and writes files. ``progress(event, info)``
    is called with the events :data:`attnfuse.fit.ProgressCallback` lists.

    ``data``: data already in memory (e.g. built from a DataFrame by
    :class:`attnfuse.FusionPredictor`), trained on instead of reading ``spec.run.data``, which then
    only names it in ``run.yaml``; such a run cannot be resumed (nothing on disk to read it again)."""
    _check_train_arguments(spec, out, progress, resume, handle_signals)
    if data is not None and not isinstance(data, MultimodalDataset):
        raise TypeError(f"data: expected a MultimodalDataset or None, got {type(data).__name__}")
    if data is not None and resume:
        raise ValueError("resume: a run on data given in memory cannot be resumed; train again")
    if resume and out is None:
        raise ValueError("resume: expected the output directory of the run to continue (out), got None")
    dist = setup(spec.train.training_device())
    emit = (progress or _quiet) if dist.main else _quiet
    try:
        # Rank 0 locks the output and proves it writable before the data is read: a second run into
        # the same --out, or an unwritable one, fails now, not after training.
        with run_directory(out) if out is not None and dist.main else contextlib.nullcontext() as tmp:
            return _train(spec, out, tmp, emit, resume, handle_signals, dist, data)
    except BaseException as error:
        if dist.main and _resumable(out, error):
            emit("note", {"message": f"the state is kept in {last_dir(out)}: attnfuse train --resume {out} continues"})
        raise
    finally:
        teardown()


def _check_train_arguments(spec: Any, out: Any, progress: Any, resume: Any, handle_signals: Any) -> None:
    """The types of :func:`train`'s arguments, each a TypeError naming it, the expected and the
    actual type (not an AttributeError from deep inside)."""
    if not isinstance(spec, TrainSpec):
        hint = " (build one with TrainSpec.from_options(values))" if isinstance(spec, dict) else ""
        raise TypeError(f"spec: expected a TrainSpec{hint}, got {type(spec).__name__}")
    if out is not None and not isinstance(out, (str, os.PathLike)):
        raise TypeError(f"out: expected a str, an os.PathLike or None, got {type(out).__name__}")
    if progress is not None and not callable(progress):
        raise TypeError(f"progress: expected a callable(event, info) or None, got {type(progress).__name__}")
    for name, value in (("resume", resume), ("handle_signals", handle_signals)):
        if not isinstance(value, bool):
            raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")


def _resumable(out, error: BaseException) -> bool:
    """A run that failed after a checkpoint (a full disk at the final write, a crash) can be
    continued; an interrupted one says so itself, and a diverged one would only diverge again."""
    if out is None or isinstance(error, (Interrupted, KeyboardInterrupt, DivergedError)):
        return False
    return (last_dir(out) / "state").exists()


def _quiet(event: str, info: dict) -> None:
    pass


def _train(
    spec: TrainSpec,
    out,
    tmp: Path | None,
    emit: ProgressCallback,
    resume: bool,
    handle_signals: bool,
    dist: Dist,
    given: MultimodalDataset | None = None,
) -> TrainResult:
    """:func:`train` with ``out`` locked (``tmp``: the directory being written, on rank 0):
    load and check, run the loops of :mod:`attnfuse.fit`, summarise, write."""
    opts = spec.run
    data = _training_data(spec, given)
    candidates, left_out = _candidates(spec, data)
    emit("data", {"data": data})
    options = _recorded_options(spec, given)
    checkpoints = Checkpoints(out, options, fingerprint(data), opts.tensorboard, resume, dist.main)
    try:
        with stop_on_signals(handle_signals) as stop:
            fit = _fit_of(spec, data, (candidates, left_out), given is not None, dist, emit, checkpoints, stop)
            loop = RunLoop.restore(fit)
            loop.run()
        records, report, found = summarize_runs(fit, loop.state.finished)
        if tmp is not None:
            write_first(tmp, fit, loop.state, report, options)
            checkpoints.close()
            checkpoints.move_logs(tmp)
    except BaseException as error:
        checkpoints.close()
        checkpoints.failed(error)
        raise
    return TrainResult(
        first=loop.state.first,
        runs=records,
        report=report,
        data=data,
        out=None if out is None else Path(out),
        selection=loop.state.selection,
        verdict=found,
        seconds=fit.seconds,
        candidate_metrics=fit.candidate_metrics,
        calibration=loop.state.calibration,
    )


def _fit_of(
    spec: TrainSpec,
    data: MultimodalDataset,
    portfolio: tuple[list[Candidate], dict[str, str]],
    in_memory: bool,
    dist: Dist,
    emit: ProgressCallback,
    checkpoints: Checkpoints,
    stop: Callable[[], int],
) -> Fit:
    """What every loop of the request reads (:class:`attnfuse.fit.Fit`)."""
    opts, cfg = spec.run, spec.train
    candidates, left_out = portfolio
    device = local_device(cfg.torch_device())
    bags = bags_for(data, opts.fusion == "auto", opts.bags)
    return Fit(
        data=data,
        candidates=candidates,
        left_out=left_out,
        train=cfg,
        runs=opts.runs,
        folds=opts.folds,
        auto=opts.fusion == "auto",
        bags=bags,
        baselines=opts.baselines,
        # A run on data given in memory cannot be resumed: checkpoints of it would be written
        # (and fsynced) for nothing, so only an interruption writes one.
        checkpoint_every=0 if in_memory else opts.checkpoint_every,
        calibrate=opts.calibrate,
        interval=opts.interval,
        device=device,
        workers=workers_for(cfg.threads, device, dist, bags),
        dist=dist,
        emit=emit,
        checkpoints=checkpoints,
        stop=stop,
    )


def _recorded_options(spec: TrainSpec, given: MultimodalDataset | None) -> dict[str, Any]:
    """The option values ``run.yaml`` (and a checkpoint) records: files by their full paths."""
    opts = spec.run
    options = {**spec.to_options(), "data": _source(opts.data) if given is None else opts.data}
    if opts.mapping:
        options["mapping"] = str(Path(opts.mapping).resolve())
    return options


def _training_data(spec: TrainSpec, given: MultimodalDataset | None) -> MultimodalDataset:
    """The data of the request (read, or given in memory), as its task, checked to train on."""
    opts, cfg = spec.run, spec.train
    if given is None:
        data = load(opts.data, opts.allow_pickle, cfg.seed, opts.task, **opts.table_options())
    else:
        data = given if opts.task == "auto" else given.as_task(opts.task)
    if data.y is None:
        raise ValueError("y: the data has no targets; training needs them (attnfuse predict works without)")
    cfg.check_task(data.task, data.target_dim)
    if opts.interval is not None and data.task == "classification":
        raise ValueError(_INTERVAL_CLASSIFICATION)
    return data


def _candidates(spec: TrainSpec, data: MultimodalDataset) -> tuple[list[Candidate], dict[str, str]]:
    """The models each run trains (:func:`attnfuse.portfolio.candidates_for`), each refused with
    the numbers, not allocated until the machine swaps, when it cannot be trained in the memory
    available: 16 bytes a parameter (weights, gradients, AdamW's two moments)."""
    candidates, left_out = candidates_for(data, spec.run.fusion, spec.model)
    for cand in candidates:
        check_memory(config_from_dict(cand.fusion, model_config(cand.fusion, data, **cand.settings)), 16)
    return candidates, left_out


def write_first(tmp: Path, fit: Fit, state: RunLoopState, report: dict, options: dict) -> None:
    """The first run's model (the one a run directory holds), the report and the options into the run
    directory being built (:func:`attnfuse.checkpoint.write_run`)."""
    first = state.first
    split = fit.plan(0).to_dict(first.split.how)
    extra = {"auto": state.selection} if state.selection is not None else {}
    if state.calibration is not None:
        extra["calibration"] = state.calibration
    write_run(
        tmp, first.model, first.fusion, fit.data, first.standardizer, asdict(fit.train), split, report, options, extra
    )


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
    model_dir: str | os.PathLike,
    source: str | None = None,
    allow_pickle: bool = False,
    *,
    data: MultimodalDataset | None = None,
    **table: Any,
) -> tuple[FusionModel, dict, Standardizer, MultimodalDataset]:
    """A trained model, its config and standardiser, and data checked to fit it (default: the data
    it was trained on, read as it was). A generated built-in (``synthetic-*``) is regenerated with
    the seed it was trained with, so it is the same data; labels are read in the model's label space
    (its classes), so data holding fewer classes (even one) can be evaluated. ``table``: reading
    options for a table (by default none are needed: a model trained on a table recorded each
    modality's columns and the target column, and any table is read by those names, in the
    model's order, whatever its own column order).

    Another ``attnfuse train`` may replace the directory meanwhile: the data is read as the config
    says, then the model is loaded with a config of its own (config and weights of one run, see
    :func:`load_model`); when that is another run's, everything is read again. ``data``: data
    already in memory, checked against the model instead of reading any (``source`` must be None)."""
    if data is not None and source is not None:
        raise ValueError(f"source: give data in memory or a source, not both; got source {shorten(source)}")
    given = data
    for _ in range(READ_ATTEMPTS):
        config = read_config(model_dir)  # checked, and the model's size bounded, before anything is built
        data = data_for_model(config, source, allow_pickle, table) if given is None else given
        check_compatible(config, data)
        net, loaded, standardizer = load_model(model_dir)
        if loaded.get("weights_id") == config.get("weights_id"):
            return net, loaded, standardizer, data
    raise ValueError(f"model: {model_dir} was replaced by other runs while it was being read; run the command again")


READ_ATTEMPTS = 3


def data_for_model(
    config: dict, source: str | None = None, allow_pickle: bool = False, table: dict[str, Any] | None = None
) -> MultimodalDataset:
    """The data to run a trained model on (see :func:`load_trained`), read in its label space:
    ``source`` (a built-in's name or a path; default: the data the model was trained on, as its
    ``config`` records it), a table read by the model's column names. ``table``: reading options
    for a table (:meth:`ReadOptions.table_options`). A model trained on data given in memory (a
    DataFrame, arrays) recorded only a name for it: without ``source`` that is a ValueError saying
    the data must be given."""
    trained = config["data"]
    table = {k: v for k, v in (table or {}).items() if v is not None}
    recorded = trained.get("source", trained["name"])
    in_memory = recorded not in BUILTINS and not Path(recorded).is_absolute() and not Path(recorded).exists()
    if source is None and in_memory:
        # The command line and the predictor record a file by its full path and a built-in by its
        # name: anything else named data that was only in memory, which cannot be read again.
        raise ValueError(
            f"data: the model was trained on data in memory ({recorded!r}, e.g. a DataFrame), which cannot be read "
            "again; give the data to use (--data FILE)"
        )
    table_source = Path(source or trained.get("source", "")).suffix.lower() in TABLE_SUFFIXES
    if table_source and trained.get("columns") is not None:  # read by the model's column names
        table["model_columns"] = trained["columns"]
    return load(
        source or recorded,
        allow_pickle,
        seed=config["train"].get("seed", 0),
        **label_space(config),
        **{k: v for k, v in table.items() if v is not None},
    )


def label_space(config: dict) -> dict[str, Any]:
    """A trained model's task and label space as the data readers take them (``task``,
    ``num_classes``, ``classes``), so that new data is read as the training data was."""
    trained = config["data"]
    classification = trained["task"] == "classification"
    return {
        "task": trained["task"],
        "num_classes": trained.get("num_classes") if classification and trained.get("classes") is None else None,
        "classes": trained.get("classes") if classification else None,
    }


def split_parts(data: MultimodalDataset, config: dict) -> dict[str, np.ndarray]:
    """Row indices per part for a trained model's data: for the training data itself (recognised by
    its fingerprint) the parts it was trained with (its split column, the validation part carved out
    of it, a drawn split or the first fold: :class:`~attnfuse.splitplan.SplitPlan`); for other data
    its own split column; always also ``"all"``. Only parts with rows are listed."""
    parts: dict[str, np.ndarray] = {}
    if config["data"].get("fingerprint") == fingerprint(data):  # the training data: its training split
        # A part without rows (the test part of a split column of train and valid rows) is left out.
        parts = {s: rows for s, rows in SplitPlan.from_dict(config["split"]).rows(data).items() if rows.size}
    elif data.split is not None:
        parts = {s: rows for s in SPLITS if (rows := np.flatnonzero(data.split == s)).size}
    parts["all"] = np.arange(data.n)
    return parts


def bagged_on_valid(data: MultimodalDataset, config: dict) -> bool:
    """Whether ``data`` is a bagged model's own training data: its bags trained on the validation
    rows too (each on all but one of K parts of train + valid), so the model's metrics there are
    in-sample; its out-of-fold ones are metrics.json's ``"valid"``."""
    bagged = bool((config.get("auto") or {}).get("bags"))
    return bagged and config["data"].get("fingerprint") == fingerprint(data)


def metrics_per_part(net: Any, config: dict, standardizer: Standardizer | None, data: MultimodalDataset) -> dict:
    """A trained model's metrics on each part of ``data`` (:func:`split_parts`: its splits, and
    all rows; for a bagged model on its own training data, :func:`bagged_on_valid`, the validation
    rows count as training rows) and, under ``"calibration"``, those of its calibrated outputs per part
    (:func:`attnfuse.calibration.evaluation_block`: the expected calibration error and NLL of the
    probabilities; the coverage and mean width of the intervals): ``attnfuse evaluate``'s report."""
    outputs = predict(net, RowBatches(data, None, standardizer))  # (N, out_dim)
    y_pred = to_predictions(data.task, outputs)
    sentiment = config["train"].get("metrics") == "sentiment"
    parts = split_parts(data, config)
    if bagged_on_valid(data, config):  # its validation rows are training rows of its bags: "train"
        parts = {"train": np.sort(np.concatenate([parts.pop("train"), parts.pop("valid", [])])), **parts}
    report: dict[str, dict] = {
        s: compute_metrics(data.task, data.y[idx], y_pred[idx], sentiment=sentiment)
        for s, idx in parts.items()
        if idx.size
    }
    calibration = evaluation_block(data.task, data.y, outputs, parts, config)
    if calibration is not None:
        report["calibration"] = calibration
    return report
