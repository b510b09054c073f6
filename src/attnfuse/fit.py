"""The loops of ``attnfuse train``: every model that one request trains, in order, resumable.

A request (:class:`attnfuse.pipeline.TrainSpec`, loaded data) trains runs x candidates x
members. Each level is an object (:class:`RunLoop` > :class:`CandidateLoop` > :class:`MemberLoop`)
whose position and finished work are a state object with ``to_dict``/``from_dict``
(:class:`RunLoopState`, :class:`CandidateLoopState`, :class:`MemberLoopState`)::

    RunLoop.run()                                  # runs: the seeds of --repeat, or the folds of --folds
        for run in range(state.index, runs):
            split = fit.plan(run).rows(data)       # SplitPlan: the one place a split is made
            rows = _parts(split)                   # Parts.of: the one place inputs are standardised;
                                                   # auto on small data: K bags of train + valid; auto
                                                   # on larger data: validation halved (early stopping |
                                                   # weighing)
            CandidateLoop.start()                  # bagged on the CPU: the run's models queued to workers
                                                   # that train them side by side (attnfuse.workers)
            CandidateLoop.run()                    # --fusion auto's portfolio, or the one fusion
                for candidate in range(state.index, len(candidates)):
                    MemberLoop.run()               # --ensemble members, in each bag
                        for model in range(state.index, bags x ensemble.size):
                            fit_model(parts_of(model), ...)  # seed EnsembleSpec.seed(seed, model);
                                                   # Trainer.fit: epochs x steps, checkpoints (MemberLoop.save);
                                                   # side by side: SideBySide.take, the same model
                    state.finished.append(_average(members) or _bag(members))  # the candidate's model
            _baselines(...)                        # the classical models on the same rows (bagged auto: refitted
                                                   # per bag); side by side: in a thread, during run()
            pick(...)                              # the best single candidate (recorded: config "auto")
            weigh(...)                             # auto: the weighted ensemble of candidates and baselines,
                                                   # fitted on the held-out validation half, or on the
                                                   # out-of-fold predictions
            calibrate(...)                         # its temperature or intervals, on the same rows
            state.finished.append(record)          # metrics.json's "runs"
    summarize_runs(fit, state.finished)            # metrics.json: one run's, or mean ± std; the verdict

A checkpoint, taken by the trainer every ``--checkpoint-every`` epochs and when stopped, is the
trainer's state plus the three loops' states (:meth:`MemberLoop.save`); a resumed request restores
the states (:meth:`RunLoop.restore`, then each inner loop of the run and the candidate under way)
and continues where they say: it retrains nothing, and ends bitwise as the uninterrupted request
(on the CPU). A candidate's bags are positions of its member loop (model ``k`` is member ``k %
ensemble`` of bag ``k // ensemble``), so they are checkpointed as members are.

Words: a *fit* is everything one request trains (:class:`Fit`); a *run* is one seed or fold; a
*candidate* one fusion of the portfolio; a *member* one model of an ensemble; a *model* one
trained network (:class:`~attnfuse.training.TrainedModel`); *progress* the callback of events
below; a *checkpoint* the saved state in ``OUT/last/``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from .baselines import BaselineResult, fit_baseline, fit_baselines, pooled_features, summarize_baselines, verdict
from .calibration import calibration_report, check_calibration, check_conformal_rows, conformal_rows, fit_calibration
from .checkpoint import metrics_for_json
from .data import SPLITS, Batch, MultimodalDataset, RowBatches, Split, bags, halve_valid
from .distributed import Dist
from .ensemble import Ensemble, EnsembleSpec, WeightedEnsemble, mix
from .heads import head_from_baseline
from .metrics import summarize
from .portfolio import Candidate, choose, public, settings_used
from .runstate import Checkpoints
from .splitplan import SplitPlan
from .stacking import select_ensemble
from .training import (
    Control,
    Parts,
    TrainConfig,
    TrainedModel,
    Trainer,
    assess,
    fit_model,
    predict,
    score_outputs,
    to_predictions,
)
from .workers import FORK, Job, SideBySide

__all__ = [
    "ProgressCallback",
    "Fit",
    "RunLoopState",
    "CandidateLoopState",
    "MemberLoopState",
    "RunLoop",
    "CandidateLoop",
    "MemberLoop",
    "bags_for",
    "workers_for",
    "pick",
    "weigh",
    "calibrate",
    "summarize_runs",
]

# progress(event, info): "data" once the data is loaded ({"data"}); "model_start" when a model
# starts training ({"index" (of the run), "seed", "epochs", "candidate" (the fusion, or the
# candidate's name under --fusion auto), "member" (of --ensemble), "members"}); "epoch" after each
# epoch ({"index", "candidate", "member", "epoch", "train_loss", "valid_loss", "valid_<metric>",
# "best_epoch"}); "model_end" ({"index", "candidate", "member", "epochs", "best_epoch"});
# "diverged" after "model_end" when a NaN/inf loss stopped it ({"index", "message", "best_epoch":
# the finite epoch whose weights were kept}); with --fusion auto, "selected" once a run's
# candidates are trained ({"index", "selection"}: see TrainResult.selection); "note"
# ({"message"}: e.g. a carved validation part).
ProgressCallback = Callable[[str, dict], None]


@dataclass
class Fit:
    """What every loop of one request reads: the data, the models to train and their settings,
    where progress and checkpoints go, and what it measured (``seconds``, ``candidate_metrics``)."""

    data: MultimodalDataset
    candidates: list[Candidate]
    left_out: dict[str, str]
    train: TrainConfig
    runs: int  # seeds of --repeat, or folds of --folds
    folds: int
    auto: bool  # --fusion auto: a run picks among the candidates
    baselines: bool
    checkpoint_every: int
    device: torch.device
    dist: Dist
    emit: ProgressCallback
    checkpoints: Checkpoints
    stop: Callable[[], int] | None = None
    calibrate: bool = True  # classification: a temperature fitted on the validation logits
    bags: int = 0  # K >= 2: each candidate is K bagged models, out-of-fold on train + valid (auto, small data)
    interval: float | None = None  # regression: the coverage level of prediction intervals
    workers: int = 1  # >= 2: a bagged run's models train side by side in this many processes (attnfuse.workers)
    side: SideBySide | None = None  # their pool, started by the first run that uses it
    seconds: dict[str, float] = field(default_factory=lambda: {"fusion": 0.0})
    candidate_metrics: list[dict[str, dict]] = field(default_factory=list)

    @property
    def ensemble(self) -> EnsembleSpec:
        return EnsembleSpec(self.train.ensemble)

    def seed(self, run: int) -> int:
        """The seed of run ``run``: ``seed``, ``seed + 1``, ..."""
        return self.train.seed + run

    def plan(self, run: int) -> SplitPlan:
        return SplitPlan.for_run(self.train.seed, run, self.folds)


# Auto, unbagged: a validation part of at least HELD_ROWS rows is halved, one half for early
# stopping, the other to weigh the ensemble and fit its calibration on. Early stopping picks each
# candidate's epoch on the rows it validates on, so its scores there are too good by the luck of
# that choice; weighed on those same rows, the candidates crowd out the baselines that chose
# nothing (benchmarks/RESULTS.md: on a 6,366-row table ridge got weight 0 and the ensemble lost
# 0.013 R² to it on test). Under HELD_ROWS the halves would be too small to choose on.
HELD_ROWS = 100


@dataclass
class RunParts:
    """One run's rows as its models see them: ``parts`` (the run's split: what the run's model is
    assessed on), and what the candidates train on: ``bagged`` (each bag's parts), or ``stopping``
    (the run's split with the first half of its validation rows, early stopping's) with the other
    half ``held``, or ``parts`` itself."""

    parts: Parts
    bagged: list[Parts] = field(default_factory=list)
    stopping: Parts | None = None
    held: np.ndarray | None = None  # the validation rows early stopping does not see

    @property
    def trained(self) -> Parts:
        """The parts the candidates' unbagged models train and early-stop on."""
        return self.parts if self.stopping is None else self.stopping


def _prefixed(prefix: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {f"{prefix}{k}": v for k, v in tensors.items()}


def _unprefixed(prefix: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}


@dataclass
class RunLoopState:
    """Where the loop over runs stands: the run under way (``index``), the records of the runs
    before it (``finished``), and the first run's model with the record of its choice and its
    calibration (config.json's ``calibration`` block): the model that is saved. In a checkpoint:
    ``run_index``, ``finished``, ``selection``, ``calibration``, ``first`` (its record) and the
    tensors ``first.*``."""

    index: int = 0
    finished: list[dict] = field(default_factory=list)
    first: TrainedModel | None = None
    selection: dict | None = None
    calibration: dict | None = None

    def to_dict(self) -> tuple[dict[str, Tensor], dict]:
        meta: dict[str, Any] = {"run_index": self.index, "finished": self.finished, "selection": self.selection}
        if self.calibration is not None:
            meta["calibration"] = self.calibration
        if self.first is None:
            return {}, meta
        tensors, meta["first"] = self.first.to_dict(predictions=False)
        return _prefixed("first.", tensors), meta

    @classmethod
    def from_dict(cls, tensors: dict[str, Tensor], meta: dict, fit: Fit) -> RunLoopState:
        first = None
        if "first" in meta:
            split = fit.plan(0).rows(fit.data)
            first = TrainedModel.from_dict(_unprefixed("first.", tensors), meta["first"], split, fit.device)
        calibration = meta.get("calibration")
        if calibration is not None:  # it goes into config.json: checked as a model directory's is when read
            data = fit.data
            out_dim = data.num_classes if data.task == "classification" else data.target_dim
            try:
                check_calibration(calibration, data.task, out_dim)
            except ValueError as e:
                raise ValueError(f"resume: the checkpoint's {e}") from None
        return cls(
            meta.get("run_index", 0),
            list(meta.get("finished", [])),
            first,
            meta.get("selection"),
            calibration,
        )


@dataclass
class _InnerLoopState:
    """Where one of a run's inner loops stands: the position under way (``index``) and the models
    finished before it (``finished``). In a checkpoint: ``<level>``, ``<level>s`` (one record per
    finished model) and the tensors ``<level>.<i>.*``."""

    level: ClassVar[str]
    index: int = 0
    finished: list[TrainedModel] = field(default_factory=list)

    def to_dict(self) -> tuple[dict[str, Tensor], dict]:
        tensors: dict[str, Tensor] = {}
        records = []
        for i, model in enumerate(self.finished):
            model_tensors, record = model.to_dict()
            tensors.update(_prefixed(f"{self.level}.{i}.", model_tensors))
            records.append(record)
        return tensors, {self.level: self.index, f"{self.level}s": records}

    @classmethod
    def from_dict(cls, tensors: dict[str, Tensor], meta: dict, split: Split, device: torch.device) -> _InnerLoopState:
        finished = [
            TrainedModel.from_dict(_unprefixed(f"{cls.level}.{i}.", tensors), record, split, device)
            for i, record in enumerate(meta[f"{cls.level}s"])
        ]
        return cls(meta[cls.level], finished)


class CandidateLoopState(_InnerLoopState):
    """Where the loop over one run's candidates stands: the candidate under way (``index``) and
    the models of the candidates before it (``finished``), each its members averaged. In a checkpoint:
    ``candidate``, ``candidates`` (one record per finished candidate) and the tensors
    ``candidate.<c>.*``."""

    level = "candidate"


class MemberLoopState(_InnerLoopState):
    """Where the loop over one candidate's ensemble members stands: the member under way
    (``index``) and the members trained before it (``finished``). In a checkpoint: ``member``,
    ``members`` (one record per trained member) and the tensors ``member.<k>.*``."""

    level = "member"


class RunLoop:
    """The runs of a request, each: its split and parts, its candidates (:class:`CandidateLoop`),
    the candidate picked, the baselines, its record (see the module docstring)."""

    def __init__(self, fit: Fit, state: RunLoopState | None = None) -> None:
        self.fit = fit
        self.state = state or RunLoopState()

    @classmethod
    def restore(cls, fit: Fit) -> RunLoop:
        """The loop as the checkpoint being resumed left it (a fresh one without)."""
        resumed = fit.checkpoints.resumed
        return cls(fit, None if resumed is None else RunLoopState.from_dict(*resumed, fit))

    def run(self) -> None:
        try:
            self._runs()
        finally:
            if self.fit.side is not None:
                self.fit.side.close()
                self.fit.side = None

    def _runs(self) -> None:
        fit = self.fit
        for index in range(self.state.index, fit.runs):
            self.state.index = index
            split = fit.plan(index).rows(fit.data)
            if index == 0 and split.note and split.how != "drawn":
                fit.emit("note", {"message": split.note})
            if fit.interval is not None and fit.data.task == "regression":
                check_conformal_rows(len(split["valid"]), fit.interval)  # before training, not after
            rows = self._parts(split)
            candidates = CandidateLoop.restore(fit, self.state, rows)
            start = time.perf_counter()
            if candidates.start():  # side by side: the baselines are fitted here meanwhile
                baselines = self._train_side_by_side(candidates, rows)
            else:
                candidates.run()
                baselines = self._baselines(rows)
            _add(fit.seconds, "fusion", time.perf_counter() - start)  # side by side: less than the fusion:NAME sum
            self.state.finished.append(self._finish(rows, candidates.state.finished, baselines))

    def _train_side_by_side(self, candidates: CandidateLoop, rows: RunParts) -> RunBaselines | None:
        """Take the run's models from the workers training them side by side while a thread of this
        process fits the baselines (scikit-learn computes without the GIL; both on one thread each).
        Returns the baselines."""
        threads, cancel = torch.get_num_threads(), threading.Event()
        torch.set_num_threads(1)  # this process's share meanwhile: a model's outputs now and then
        meanwhile = ThreadPoolExecutor(1, thread_name_prefix="attnfuse-baselines")
        try:
            pending = meanwhile.submit(self._baselines, rows, cancel)
            candidates.run()
            return pending.result()
        finally:
            cancel.set()  # when the run stopped: the baselines end at their next fit
            meanwhile.shutdown(wait=False)
            torch.set_num_threads(threads)

    def _parts(self, split: Split) -> RunParts:
        """The run's parts and what its candidates train on: each bag's (:func:`attnfuse.data.bags`),
        all standardised by the train + valid rows' statistics (their models average into one), or,
        auto unbagged, the run's split with its validation rows halved (:meth:`_halved`)."""
        fit = self.fit
        if not fit.bags:
            return self._halved(Parts.of(fit.data, split, fit.device))
        pool = np.sort(np.concatenate([split["train"], split["valid"]]))
        try:
            cuts = bags(fit.data, split, fit.bags, fit.seed(self.state.index))
        except ValueError as e:  # a class too rare to be in every bag: the validation rows select
            fit.emit("note", {"message": f"no bagging in run {self.state.index + 1}: {e}"})
            return self._halved(Parts.of(fit.data, split, fit.device))
        parts = Parts.of(fit.data, split, fit.device, fitted_on=pool)
        scaled = parts.standardizer
        return RunParts(
            parts, [Parts.of(fit.data, cut, fit.device, fitted_on=pool, standardizer=scaled) for cut in cuts]
        )

    def _halved(self, parts: Parts) -> RunParts:
        """Auto, unbagged, with :data:`HELD_ROWS` validation rows or more (and, for intervals,
        enough in one half to fit them): the candidates early-stop on one half of the validation
        rows, and the other half (``held``) weighs the ensemble and fits its calibration."""
        fit, valid = self.fit, len(parts.split["valid"])
        enough = fit.interval is None or fit.data.task != "regression" or valid // 2 >= conformal_rows(fit.interval)
        if not (fit.auto and valid >= HELD_ROWS and enough):
            return RunParts(parts)
        split, held = halve_valid(fit.data, parts.split, fit.seed(self.state.index))
        stopping = Parts.of(fit.data, split, fit.device, standardizer=parts.standardizer)
        return RunParts(parts, stopping=stopping, held=held)

    def _finish(self, rows: RunParts, models: list[TrainedModel], baselines: RunBaselines | None) -> dict:
        """The record of the run under way, once its candidates are trained: the model picked (auto:
        the weighted ensemble of the candidates and the baselines), its metrics and calibration,
        (auto) the candidates', the baselines'. The first run's model is kept, with its calibration."""
        fit, index, parts = self.fit, self.state.index, rows.parts
        model, chosen, metrics_of = pick(fit, models)
        if rows.bagged:  # config.json's "auto" says so: the bags trained on the validation rows too
            chosen["bags"] = len(rows.bagged)
        fit.candidate_metrics.append(metrics_of)
        weights = None
        if fit.auto:
            start = time.perf_counter()
            model, weights = weigh(fit, rows, models, chosen, baselines)
            _add(fit.seconds, "weighing", time.perf_counter() - start)  # bagged: the baselines' refits too
        block, calibration = calibrate(fit, parts, model)
        record: dict[str, Any] = {"fold": index} if fit.folds else {}
        record.update(seed=fit.seed(index), best_epoch=model.best_epoch, fusion=model.fusion)
        record.update(history=model.history, valid_se=model.valid_se, **model.metrics)
        if calibration is not None:
            record["calibration"] = calibration
        if fit.auto:
            record["picked"] = chosen["picked"]
            record["candidates"] = {n: {"valid": c["valid_metrics"]} for n, c in chosen["candidates"].items()}
            fit.emit("selected", {"index": index, "selection": public(chosen)})
        if weights is not None:
            record["weighted"] = weights
        if baselines is not None:
            record["baselines"] = baselines.fitted.metrics
        if self.state.first is None:
            self.state.first, self.state.selection = model, public(chosen) if fit.auto else None
            self.state.calibration = block
        return record

    def _baselines(self, rows: RunParts, cancel: threading.Event | None = None) -> RunBaselines | None:
        """The run's baselines (None with ``--no-baselines``), with their seconds counted: fitted on
        its training rows, and (auto, bagged) refitted per bag and on all train + valid rows
        (:func:`refit_baselines`, seconds of the weighing). On every rank: a weighted ensemble holds
        them, and every rank returns the same model. ``cancel``: set, the refits end early."""
        fit, seed = self.fit, self.fit.seed(self.state.index)
        if not fit.baselines:
            return None
        fitted = fit_baselines(fit.data, rows.parts.split, seed=seed, sentiment=fit.train.sentiment_metrics)
        for name, seconds in fitted.seconds.items():
            _add(fit.seconds, name, seconds)
        if not (fit.auto and rows.bagged):
            return RunBaselines(fitted)
        start = time.perf_counter()
        refits = refit_baselines(fit.data, rows, fitted, seed, cancel)
        _add(fit.seconds, "weighing", time.perf_counter() - start)
        return RunBaselines(fitted, refits)


@dataclass
class RunBaselines:
    """A run's baselines: ``fitted`` on its training rows (their metrics go beside the fusion's)
    and, bagged, each one's refits (``refits``: name -> (its estimator on each bag's training rows,
    its estimator on all the train + valid rows)); one that cannot be fitted on some bag has none."""

    fitted: BaselineResult
    refits: dict[str, tuple[list[Any], Any]] = field(default_factory=dict)


def refit_baselines(
    data: MultimodalDataset, rows: RunParts, fitted: BaselineResult, seed: int, cancel: threading.Event | None = None
) -> dict[str, tuple[list[Any], Any]]:
    """Each of the ``fitted`` baselines fitted again on each bag's training rows (for its
    out-of-fold outputs) and on all of the run's train + valid rows (what the weighted ensemble
    holds), as :attr:`RunBaselines.refits`; a baseline that cannot be fitted on some bag's rows is
    left out. ``cancel``: set, the ones not yet fitted are left out."""
    pool = rows.parts.statistics_rows
    x, y = pooled_features(data, pool, presence=fitted.presence), np.asarray(data.y[pool])
    refits = {}
    for name in fitted.models:
        try:
            per_bag = []
            for bag in rows.bagged:
                if cancel is not None and cancel.is_set():
                    return refits
                train = np.searchsorted(pool, bag.split["train"])
                per_bag.append(fit_baseline(name, data, x[train], y[train], seed))
            refits[name] = (per_bag, fit_baseline(name, data, x, y, seed))
        except Exception:  # as fit_baselines: a baseline that cannot be fitted ends no run
            continue
    return refits


class CandidateLoop:
    """The candidates of one run, each: its members (:class:`MemberLoop`), averaged into the
    candidate's model."""

    def __init__(
        self,
        fit: Fit,
        runs: RunLoopState,
        rows: RunParts,
        state: CandidateLoopState | None = None,
        resume: tuple[dict, dict] | None = None,
    ) -> None:
        self.fit, self.runs, self.rows = fit, runs, rows
        self.parts, self.bagged = rows.parts, rows.bagged
        self.state = state or CandidateLoopState()
        self.resume = resume  # the checkpoint, when it was taken in this run
        self.side: SideBySide | None = None  # side by side: the pool the run's models are queued in (start)

    @classmethod
    def restore(cls, fit: Fit, runs: RunLoopState, rows: RunParts) -> CandidateLoop:
        """The loop of run ``runs.index``: as the checkpoint left it when that is the run it was
        taken in, else fresh."""
        resumed = fit.checkpoints.resumed
        if resumed is None or resumed[1].get("run_index", 0) != runs.index:
            return cls(fit, runs, rows)
        state = CandidateLoopState.from_dict(*resumed, rows.trained.split, fit.device)
        return cls(fit, runs, rows, state, resumed)

    @property
    def size(self) -> int:
        """The models of one candidate: its ``--ensemble`` members in each bag (one bag unbagged)."""
        return max(1, len(self.bagged)) * self.fit.ensemble.size

    def parts_of(self, model: int) -> Parts:
        """The rows model ``model`` of a candidate trains on: its bag's, or the run's (validation:
        early stopping's half, when halved)."""
        return self.bagged[model // self.fit.ensemble.size] if self.bagged else self.rows.trained

    def start(self) -> bool:
        """A bagged run with ``fit.workers`` >= 2: queue its models, from the one under way on (that
        one continuing from the checkpoint), in the pool that trains them side by side (``side``,
        started by the first run), and return True; else False: they train one after another, here."""
        fit = self.fit
        if fit.workers < 2 or not self.bagged:
            return False
        if fit.side is None:  # no more workers than a run has models
            fit.side = SideBySide(fit.data, min(fit.workers, len(fit.candidates) * self.size))
        first, member = self.state.index, 0 if self.resume is None else self.resume[1]["member"]
        jobs = {}
        for c in range(first, len(fit.candidates)):
            for k in range(member if c == first else 0, self.size):
                jobs[(self.runs.index, c, k)] = self._job(c, k, self.resume if (c, k) == (first, member) else None)
        fit.side.plan(jobs)
        self.side = fit.side
        return True

    def train_config(self, model: int) -> TrainConfig:
        """The settings of model ``model`` of a candidate: the run's, with its member's seed."""
        fit = self.fit
        return replace(fit.train, seed=fit.ensemble.seed(fit.seed(self.runs.index), model))

    def _job(self, c: int, k: int, resume: tuple[dict, dict] | None) -> Job:
        fit, parts, candidate = self.fit, self.parts_of(k), self.fit.candidates[c]
        return Job(
            candidate.fusion,
            candidate.settings,
            self.train_config(k),
            parts.split,
            parts.standardizer,
            parts.fitted_on,
            checkpoint=fit.checkpoints.last is not None,
            every=fit.checkpoint_every,
            resume=resume,
        )

    def run(self) -> None:
        for c in range(self.state.index, len(self.fit.candidates)):
            self.state.index = c
            members = MemberLoop.restore(self, self.resume)
            self.resume = None
            members.run()
            finished = members.state.finished
            if self.bagged:
                self.state.finished.append(_bag(self.fit, self.parts, self.bagged, finished))
            else:
                self.state.finished.append(_average(self.fit, self.rows.trained, finished))


class MemberLoop:
    """The ensemble members of one candidate, each trained by
    :func:`~attnfuse.training.fit_model` on the run's ``parts``; its checkpoint function
    (:meth:`save`) writes the trainer's state with the three loops' states."""

    def __init__(
        self, candidates: CandidateLoop, state: MemberLoopState | None = None, resume: tuple | None = None
    ) -> None:
        self.fit, self.runs, self.candidates = candidates.fit, candidates.runs, candidates
        self.state = state or MemberLoopState()
        self.resume = resume  # the trainer state of the member at state.index, when resuming it

    @classmethod
    def restore(cls, candidates: CandidateLoop, resumed: tuple[dict, dict] | None) -> MemberLoop:
        """The loop of the candidate under way: as the checkpoint ``resumed`` left it, else fresh."""
        if resumed is None:
            return cls(candidates)
        state = MemberLoopState.from_dict(*resumed, candidates.rows.trained.split, candidates.fit.device)
        return cls(candidates, state, resumed)

    def run(self) -> None:
        for k in range(self.state.index, self.candidates.size):
            self.state.index = k
            resume, self.resume = self.resume, None
            self.state.finished.append(self._fit_one(k, resume))

    def _fit_one(self, k: int, resume: tuple[dict, dict] | None) -> TrainedModel:
        fit, candidate = self.fit, self.fit.candidates[self.candidates.state.index]
        index, seed = self.runs.index, self.fit.seed(self.runs.index)
        unit = {"index": index, "candidate": candidate.name, "member": k}
        members = self.candidates.size
        fit.emit("model_start", {**unit, "seed": seed, "epochs": fit.train.epochs, "members": members})
        on_epoch = partial(self._on_epoch, unit, seed)
        side = self.candidates.side
        if side is not None:  # queued by CandidateLoop.start, with the checkpoint's state
            key = (index, self.candidates.state.index, k)
            model, seconds = side.take(key, on_epoch, self._save, fit.stop)
        else:
            control = Control(
                dist=fit.dist,
                resume=resume,
                checkpoint=None if fit.checkpoints.last is None else self.save,
                every=fit.checkpoint_every,
                stop=fit.stop,
            )
            start = time.perf_counter()
            train, parts = self.candidates.train_config(k), self.candidates.parts_of(k)
            model = fit_model(parts, candidate.fusion, candidate.settings, train, on_epoch=on_epoch, control=control)
            seconds = time.perf_counter() - start
        _add(fit.seconds, f"fusion:{candidate.name}", seconds)
        fit.emit("model_end", {**unit, "epochs": len(model.history), "best_epoch": model.best_epoch})
        if model.note:
            fit.emit("diverged", {"index": index, "message": model.note, "best_epoch": model.best_epoch})
        return model

    def _on_epoch(self, unit: dict, seed: int, record: dict) -> None:
        self.fit.checkpoints.log_epoch(unit["index"], seed, {**unit, **record})
        self.fit.emit("epoch", {**unit, **record})

    def save(self, trainer: Trainer) -> None:
        """The checkpoint of the member under way: the trainer's state and the three loops' states."""
        state = trainer.state_dict()  # on every rank: the ranks' RNG states are gathered
        if self.fit.dist.main:
            self._save(state)

    def _save(self, state: tuple[dict[str, Tensor], dict]) -> None:
        """Checkpoint a trainer's ``state`` (of the member under way) with the three loops' states."""
        tensors, meta = state
        for loop_tensors, loop_meta in (self.runs.to_dict(), self.candidates.state.to_dict(), self.state.to_dict()):
            tensors.update(loop_tensors)
            meta.update(loop_meta)
        self.fit.checkpoints.save(tensors, metrics_for_json(meta))


def _add(seconds: dict[str, float], key: str, value: float) -> None:
    seconds[key] = seconds.get(key, 0.0) + value


def pick(fit: Fit, models: list[TrainedModel]) -> tuple[TrainedModel, dict, dict[str, dict]]:
    """One run's model: the candidate :func:`attnfuse.portfolio.choose` picks on the rows the
    candidates' ``models`` (each its members averaged) were validated on (early stopping's, or
    bagged, out-of-fold). Returns it, the record of the choice and every candidate's metrics."""
    metric, _ = selection = fit.train.selection_metric(fit.data.task)
    scores = {}
    for candidate, model in zip(fit.candidates, models):
        scores[candidate.name] = {
            "fusion": candidate.fusion,
            "settings": settings_used(model.model, candidate),
            "valid": model.metrics["valid"][metric],
            "valid_se": model.valid_se,
            "valid_loss": model.valid_loss,
            "valid_metrics": model.metrics["valid"],
            "valid_pred": model.valid_pred,
        }
    rows = models[0].valid_rows if models[0].valid_rows is not None else models[0].split["valid"]  # bagged: out-of-fold
    held = "validation" if models[0].valid_rows is None else "out-of-fold"
    chosen = choose(scores, selection, fit.left_out, np.asarray(fit.data.y[rows]), held)
    by_name = {candidate.name: model for candidate, model in zip(fit.candidates, models)}
    return by_name[chosen["picked"]], chosen, {name: m.metrics for name, m in by_name.items()}


# Bagging (Breiman, 1996; the K-fold bagging of AutoGluon-Tabular, Erickson et al., 2020): below
# BAG_ROWS rows, --fusion auto trains every candidate --bags times (5), once per part of the run's
# train + valid rows held out, so that every one of those rows has an out-of-fold prediction and
# the candidates and the baselines are weighed on all of them, not on the 15% a validation part
# holds (a validation part of 45-150 rows picks mostly by chance: benchmarks/RESULTS.md). The
# bags' models are averaged. From FEW_BAGS_ROWS rows on, in at most FEW_BAGS bags: K bags cost
# about K x (K-1)/K of one training. On mfeat (2,000 rows; the candidates then without modality
# dropout) 3 bags gave 99.15% over 10 splits, 4 bags 99.13% at 1.29x the time of 3, 5 bags no
# more on the two splits tried at about twice the time of 3; 3 bags, trained side by side on 2
# cores, cost 1.77-1.91x the previous default's time on mfeat (within the 2x budget; one after
# another 2.5x). On fair (6,366 rows) 3 bags gave R² 0.0645 where halving the validation rows
# gave 0.0580 and ridge 0.0619 (benchmarks/RESULTS.md). From BAG_ROWS rows on the candidates are
# not bagged (the validation rows are halved instead, RunLoop._halved): minutes of training would
# become K - 1 times as many, and a validation half holds 750 rows or more.
BAG_ROWS = 10_000
FEW_BAGS_ROWS = 1000
FEW_BAGS = 3


def bags_for(data: MultimodalDataset, auto: bool, bags: int) -> int:
    """How many bags a request's runs train their candidates in: under ``--fusion auto``,
    ``bags`` (``--bags``) on data of fewer than :data:`FEW_BAGS_ROWS` rows, at most
    :data:`FEW_BAGS` of them under :data:`BAG_ROWS` rows; else 0 (no bagging)."""
    if not auto or data.n >= BAG_ROWS:
        return 0
    return bags if data.n < FEW_BAGS_ROWS else min(bags, FEW_BAGS)


def workers_for(threads: int | None, device: torch.device, dist: Dist, bags: int) -> int:
    """How many processes train a run's models side by side (:mod:`attnfuse.workers`): with bags on
    the CPU in one process, one per thread (``--threads``; default: torch's count, the free cores),
    each with one thread; else 1 (one after another, with all the threads; so too where processes
    are not forked, :data:`attnfuse.workers.FORK`)."""
    if bags < 2 or device.type != "cpu" or dist.enabled or not FORK:
        return 1
    return threads if threads is not None else torch.get_num_threads()


# What ensemble selection minimises: the squared error for values, the log-loss for classes (a
# smooth score: on a few dozen validation rows accuracy ties most ensembles, and probabilities
# averaged by log-loss are the ones temperature scaling then calibrates).
WEIGHING_METRIC = {"regression": "rmse", "classification": "log_loss"}


def weigh(
    fit: Fit,
    run: RunParts,
    models: list[TrainedModel],
    chosen: dict,
    baselines: RunBaselines | None,
) -> tuple[TrainedModel, dict]:
    """``--fusion auto``'s model: the weighted ensemble (:class:`~attnfuse.ensemble.WeightedEnsemble`)
    that greedy ensemble selection (:func:`attnfuse.stacking.select_ensemble`) fits over the
    candidates' ``models`` and the run's ``baselines`` (as modules of :mod:`attnfuse.heads`; none
    with ``--no-baselines``), on rows no choice was made on when the run has them: bagged, the
    out-of-fold predictions of all train + valid rows; halved, the validation half early stopping
    did not see (``run.held``); else the validation rows. Never worse on those rows, by
    :data:`WEIGHING_METRIC`, than its best member. Its primary fusion is the candidate of largest
    weight (``chosen["picked"]``, kept at weight 0, when the baselines carry everything). An
    unbagged, unhalved ensemble of one fusion is that candidate's model itself.

    Returns the model (metrics assessed on every part of the run; bagged, ``"valid"`` is
    out-of-fold; bagged or halved, its outputs on the rows it was weighed on are kept for
    :func:`calibrate`) and metrics.json's record of the weights."""
    task, parts, bagged = fit.data.task, run.parts, run.bagged
    pool = {c.name: m.model for c, m in zip(fit.candidates, models)}
    if bagged:
        rows = models[0].valid_rows
        outputs = {c.name: torch.from_numpy(m.valid_outputs) for c, m in zip(fit.candidates, models)}
        fitted_on = "out-of-fold"
    else:
        rows = parts.split["valid"] if run.held is None else run.held
        source = (
            parts.sources["valid"] if run.held is None else RowBatches(fit.data, rows, parts.standardizer, fit.device)
        )
        outputs = {name: predict(net, source).cpu() for name, net in pool.items()}
        fitted_on = "validation" if run.held is None else "held-out validation"
    if baselines is not None:
        heads, head_outputs = _heads(fit, parts, bagged, baselines, None if bagged else source)
        pool.update(heads)
        outputs.update(head_outputs)
    y = np.asarray(fit.data.y[rows])
    predictions = {name: _weighable(task, out) for name, out in outputs.items()}
    selection = select_ensemble(predictions, y, task, metric=WEIGHING_METRIC[task])
    weights = {n: float(w) for n, w in zip(selection.names, selection.weights)}
    fusions = [c.name for c in fit.candidates]
    carried = [n for n in fusions if weights[n] > 0]
    primary = max(carried, key=lambda n: weights[n]) if carried else chosen["picked"]  # max: the first on a tie
    record = {**selection.to_dict(), "rows": len(y), "fitted_on": fitted_on}
    record.update(primary=primary, **({"bags": len(bagged)} if bagged else {}))
    base = models[fusions.index(primary)]
    kept = {n: net for n, net in pool.items() if weights[n] > 0 or n == primary}
    alone = list(kept) == [primary] and not bagged  # the candidate's model itself
    if alone and fitted_on == "validation":
        return base, record
    net = base.model if alone else WeightedEnsemble(kept, {n: weights[n] for n in kept}, task, primary)
    metrics, *scored = assess(net, parts, fit.train, fit.dist)  # halved: on all validation rows
    # Its outputs on the rows it was weighed on, the mixture of its parts' (what calibration is
    # fitted on); bagged, they are its "valid" metrics too (out-of-fold on all train + valid rows).
    mixed = outputs[primary] if alone else mix({n: outputs[n] for n in kept if weights[n] > 0}, weights, task)
    if bagged:
        metrics["valid"], *scored = score_outputs(net, task, mixed, torch.as_tensor(y), fit.train)
    more = {} if fitted_on == "validation" else {"valid_outputs": mixed.numpy(), "valid_rows": np.asarray(rows)}
    return _as_one([base], net, metrics, scored, split=parts.split, **more), record


def _heads(
    fit: Fit, parts: Parts, bagged: list[Parts], baselines: RunBaselines, source: RowBatches | Batch | None
) -> tuple[dict[str, torch.nn.Module], dict[str, Tensor]]:
    """The baselines as modules of :mod:`attnfuse.heads` and their outputs on the rows the
    ensemble is fitted on. Unbagged: the ones fitted on the training rows, on ``source``'s rows.
    Bagged: their refits on all train + valid rows, with out-of-fold outputs from the refit of
    each bag (:attr:`RunBaselines.refits`)."""
    data, task, presence = fit.data, fit.data.task, baselines.fitted.presence
    out_dim = data.num_classes if task == "classification" else data.target_dim

    def head(estimator: Any, name: str) -> torch.nn.Module:
        made = head_from_baseline(name, estimator, data.modalities, parts.standardizer, presence, task, out_dim)
        return made.to(fit.device)

    if not bagged:
        heads = {name: head(estimator, name) for name, estimator in baselines.fitted.models.items()}
        return heads, {name: predict(h, source).cpu() for name, h in heads.items()}
    pool = parts.statistics_rows
    heads, outputs = {}, {}
    for name, (per_bag, everything) in baselines.refits.items():
        out = torch.zeros(len(pool), out_dim)  # (N_pool, out_dim)
        for bag, estimator in zip(bagged, per_bag):
            out[torch.from_numpy(np.searchsorted(pool, bag.split["valid"]))] = predict(
                head(estimator, name), bag.sources["valid"]
            ).cpu()
        heads[name], outputs[name] = head(everything, name), out
    return heads, outputs


def _weighable(task: str, outputs: Tensor) -> np.ndarray:
    """What ensemble selection averages: class probabilities (N, C), or values (N,) / (N, K)."""
    if task == "classification":
        return torch.softmax(outputs.double(), dim=-1).cpu().numpy()
    return to_predictions(task, outputs).astype(np.float64)


def calibrate(fit: Fit, parts: Parts, model: TrainedModel) -> tuple[dict | None, dict | None]:
    """The calibration of one run's chosen model, fitted on its validation rows only
    (:func:`attnfuse.calibration.fit_calibration`): a temperature for a classifier (unless
    ``--no-calibrate``), intervals at ``--interval``'s level for a regression. Returns config.json's
    ``calibration`` block and metrics.json's record (the block with ``"valid"`` and ``"test"``:
    ECE and NLL before/after, or the intervals' coverage and mean width), or (None, None).

    The outputs are the float32 outputs that ``predict`` and ``evaluate`` compute (whatever
    ``--precision`` trained), so that their numbers are these; every rank computes them (the
    same), as every rank returns the result."""
    task = fit.data.task
    if not (fit.calibrate if task == "classification" else fit.interval is not None):
        return None, None
    outputs, targets = {}, {}
    for name in ("valid", "test"):
        source = parts.sources.get(name)
        if source is not None and len(source):
            outputs[name] = predict(model.model, source)  # (N, out_dim)
            targets[name] = source.y.detach().cpu().numpy()
    if model.valid_outputs is not None:  # bagged: fitted on the out-of-fold outputs of train + valid
        outputs["valid"] = torch.from_numpy(model.valid_outputs)
        targets["valid"] = np.asarray(fit.data.y[model.valid_rows])
    if "valid" not in outputs:
        return None, None
    block = fit_calibration(task, outputs["valid"], targets["valid"], fit.interval)
    report = {name: calibration_report(block, task, outputs[name], targets[name]) for name in outputs}
    return block, {**block, **report}


def _average(fit: Fit, parts: Parts, members: list[TrainedModel]) -> TrainedModel:
    """A candidate's members as one model: the model itself, or their
    :class:`~attnfuse.ensemble.Ensemble`, assessed anew (history and best epoch: the first member's)."""
    if len(members) == 1:
        return members[0]
    model = fit.ensemble.combine([m.model for m in members])
    metrics, *scored = assess(model, parts, fit.train, fit.dist)
    return _as_one(members, model, metrics, scored)


def _as_one(members: list[TrainedModel], model: torch.nn.Module, metrics: dict, scored: list, **more) -> TrainedModel:
    """The trained ``members`` as one ``model`` with its ``metrics`` and ``scored`` (validation
    loss, standard error, predictions); the first member's history and best epoch, the first note."""
    note = next((m.note for m in members if m.note), None)
    valid_loss, valid_se, valid_pred = scored
    return replace(
        members[0],
        model=model,
        metrics=metrics,
        note=note,
        valid_loss=valid_loss,
        valid_se=valid_se,
        valid_pred=valid_pred,
        **more,
    )


def _bag(fit: Fit, parts: Parts, bagged: list[Parts], members: list[TrainedModel]) -> TrainedModel:
    """A bagged candidate: its models of every bag averaged into one
    :class:`~attnfuse.ensemble.Ensemble`, with its out-of-fold outputs on the run's train + valid
    rows (each row's from the ``--ensemble`` members of the one bag that validated on it, their
    outputs averaged as the ensemble averages them). Its ``"valid"`` metrics, loss, standard error
    and predictions are those out-of-fold rows'; ``"train"`` and ``"test"`` the averaged model's."""
    size, data = fit.ensemble.size, fit.data
    model = Ensemble([m.model for m in members])
    pool = parts.statistics_rows  # the train + valid rows, sorted
    outputs = torch.zeros(len(pool), model.config.out_dim)
    for b, bag in enumerate(bagged):
        source = bag.sources["valid"]
        out = torch.stack([predict(m.model, source).cpu() for m in members[b * size : (b + 1) * size]]).mean(dim=0)
        outputs[torch.from_numpy(np.searchsorted(pool, bag.split["valid"]))] = out  # (N_bag, out_dim)
    metrics, _, _, _ = assess(model, parts, fit.train, fit.dist)
    targets = torch.as_tensor(np.asarray(data.y[pool]))
    metrics["valid"], *scored = score_outputs(model, data.task, outputs, targets, fit.train)
    rows = np.asarray(pool, dtype=np.int64)
    # split: the run's (the members': their bags')
    return _as_one(members, model, metrics, scored, split=parts.split, valid_outputs=outputs.numpy(), valid_rows=rows)


def summarize_runs(fit: Fit, finished: list[dict]) -> tuple[list[dict], dict, dict | None]:
    """The runs' records as metrics.json lists them, the report (metrics.json: undefined metrics as
    null) and the verdict of the baselines (:func:`attnfuse.baselines.verdict`, or None)."""
    records = [{k: v for k, v in r.items() if k not in ("history", "valid_se")} for r in finished]
    report = _report(records, fit.runs)
    found = None
    if "baselines" in report:
        fusion_valid = report["valid"] if fit.runs == 1 else report["summary"]["valid"]
        # The standard error of the (mean) validation score: one run's, or their mean over sqrt(runs).
        ses = [r["valid_se"] for r in finished if r.get("valid_se") is not None]
        se = float(np.mean(ses) / np.sqrt(len(ses))) if ses else None
        found = verdict(fit.train.selection_metric(fit.data.task), fusion_valid, report["baselines"], se)
    return records, metrics_for_json(report), found


def _report(records: list[dict], runs: int) -> dict:
    """metrics.json from the per-run records (see :func:`attnfuse.pipeline.train`)."""
    if runs == 1:
        return {k: v for k, v in records[0].items() if k not in ("fold", "seed", "best_epoch", "fusion", "picked")}
    splits = [s for s in SPLITS if s in records[0]]
    report: dict[str, Any] = {"runs": records, "summary": {s: summarize([r[s] for r in records]) for s in splits}}
    if "candidates" in records[0]:
        report["candidates"] = {
            name: {"valid": summarize([r["candidates"][name]["valid"] for r in records])}
            for name in records[0]["candidates"]
        }
    if "baselines" in records[0]:
        report["baselines"] = summarize_baselines([r["baselines"] for r in records])
    if "weighted" in records[0]:  # each run's ensemble weights, as mean ± std over the runs
        report["weighted"] = {"weights": summarize([r["weighted"]["weights"] for r in records])}
    if "calibration" in records[0]:
        report["calibration"] = _calibration_summary([r["calibration"] for r in records])
    return report


def _calibration_summary(records: list[dict]) -> dict:
    """Mean ± std over the runs of their calibration records: the temperature (classification),
    and per part each number of :func:`attnfuse.calibration.calibration_report`."""
    parts = {p: summarize([r[p] for r in records]) for p in ("valid", "test") if p in records[0]}
    return {**summarize([{k: r[k] for k in ("temperature",) if k in r} for r in records]), **parts}
