"""The loops of ``attnfuse train``: every model that one request trains, in order, resumable.

A request (:class:`attnfuse.pipeline.TrainSpec`, loaded data) trains runs x candidates x
members. Each level is an object (:class:`RunLoop` > :class:`CandidateLoop` > :class:`MemberLoop`)
whose position and finished work are a state object with ``to_dict``/``from_dict``
(:class:`RunLoopState`, :class:`CandidateLoopState`, :class:`MemberLoopState`)::

    RunLoop.run()                                  # runs: the seeds of --repeat, or the folds of --folds
        for run in range(state.index, runs):
            split = fit.plan(run).rows(data)       # SplitPlan: the one place a split is made
            parts = Parts.of(data, split, device)  # the one place inputs are standardised
            CandidateLoop.run()                    # --fusion auto's portfolio, or the one fusion
                for candidate in range(state.index, len(candidates)):
                    MemberLoop.run()               # --ensemble
                        for member in range(state.index, ensemble.size):
                            fit_model(parts, ...)  # seed EnsembleSpec.seed(seed, member); Trainer.fit:
                                                   # epochs x steps, checkpoints (MemberLoop.save)
                    state.finished.append(_average(members))  # the candidate's model
            pick(...)                              # one candidate chosen on the validation rows
            calibrate(...)                         # its temperature or intervals, on the validation rows
            fit_baselines(...)                     # the classical models on the same rows
            state.finished.append(record)          # metrics.json's "runs"
    summarize_runs(fit, state.finished)            # metrics.json: one run's, or mean ± std; the verdict

A checkpoint, taken by the trainer every ``--checkpoint-every`` epochs and when stopped, is the
trainer's state plus the three loops' states (:meth:`MemberLoop.save`); a resumed request restores
the states (:meth:`RunLoop.restore`, then each inner loop of the run and the candidate under way)
and continues where they say: it retrains nothing, and ends bitwise as the uninterrupted request
(on the CPU). Another level (bags of rows, say) is another loop object with its own state, and its
part of the checkpoint.

Words: a *fit* is everything one request trains (:class:`Fit`); a *run* is one seed or fold; a
*candidate* one fusion of the portfolio; a *member* one model of an ensemble; a *model* one
trained network (:class:`~attnfuse.training.TrainedModel`); *progress* the callback of events
below; a *checkpoint* the saved state in ``OUT/last/``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from .baselines import fit_baselines, summarize_baselines, verdict
from .calibration import calibration_report, check_calibration, check_conformal_rows, fit_calibration
from .checkpoint import metrics_for_json
from .data import SPLITS, MultimodalDataset, Split
from .distributed import Dist
from .ensemble import EnsembleSpec
from .metrics import summarize
from .portfolio import Candidate, choose, public, settings_used
from .runstate import Checkpoints
from .splitplan import SplitPlan
from .training import Control, Parts, TrainConfig, TrainedModel, Trainer, assess, fit_model, predict

__all__ = [
    "ProgressCallback",
    "Fit",
    "RunLoopState",
    "CandidateLoopState",
    "MemberLoopState",
    "RunLoop",
    "CandidateLoop",
    "MemberLoop",
    "pick",
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
    interval: float | None = None  # regression: the coverage level of prediction intervals
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
        fit = self.fit
        for index in range(self.state.index, fit.runs):
            self.state.index = index
            split = fit.plan(index).rows(fit.data)
            if index == 0 and split.note and split.how != "drawn":
                fit.emit("note", {"message": split.note})
            if fit.interval is not None and fit.data.task == "regression":
                check_conformal_rows(len(split["valid"]), fit.interval)  # before training, not after
            parts = Parts.of(fit.data, split, fit.device)
            candidates = CandidateLoop.restore(fit, self.state, parts)
            candidates.run()
            self.state.finished.append(self._finish(parts, candidates.state.finished))
        fit.seconds["fusion"] = sum(v for k, v in fit.seconds.items() if k.startswith("fusion:"))

    def _finish(self, parts: Parts, models: list[TrainedModel]) -> dict:
        """The record of the run under way, once its candidates are trained: the model picked, its
        metrics and calibration, (auto) the candidates', the baselines'. The first run's model is
        kept, with its calibration."""
        fit, index = self.fit, self.state.index
        model, chosen, metrics_of = pick(fit, parts, models)
        fit.candidate_metrics.append(metrics_of)
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
        if fit.baselines and fit.dist.main:
            fitted = fit_baselines(fit.data, parts.split, seed=fit.seed(index), sentiment=fit.train.sentiment_metrics)
            record["baselines"] = fitted.metrics
            for name, seconds in fitted.seconds.items():
                _add(fit.seconds, name, seconds)
        if self.state.first is None:
            self.state.first, self.state.selection = model, public(chosen) if fit.auto else None
            self.state.calibration = block
        return record


class CandidateLoop:
    """The candidates of one run, each: its members (:class:`MemberLoop`), averaged into the
    candidate's model."""

    def __init__(
        self,
        fit: Fit,
        runs: RunLoopState,
        parts: Parts,
        state: CandidateLoopState | None = None,
        resume: tuple[dict, dict] | None = None,
    ) -> None:
        self.fit, self.runs, self.parts = fit, runs, parts
        self.state = state or CandidateLoopState()
        self.resume = resume  # the checkpoint, when it was taken in this run

    @classmethod
    def restore(cls, fit: Fit, runs: RunLoopState, parts: Parts) -> CandidateLoop:
        """The loop of run ``runs.index``: as the checkpoint left it when that is the run it was
        taken in, else fresh."""
        resumed = fit.checkpoints.resumed
        if resumed is None or resumed[1].get("run_index", 0) != runs.index:
            return cls(fit, runs, parts)
        return cls(fit, runs, parts, CandidateLoopState.from_dict(*resumed, parts.split, fit.device), resumed)

    def run(self) -> None:
        for c in range(self.state.index, len(self.fit.candidates)):
            self.state.index = c
            members = MemberLoop.restore(self, self.resume)
            self.resume = None
            members.run()
            self.state.finished.append(_average(self.fit, self.parts, members.state.finished))


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
        state = MemberLoopState.from_dict(*resumed, candidates.parts.split, candidates.fit.device)
        return cls(candidates, state, resumed)

    def run(self) -> None:
        for k in range(self.state.index, self.fit.ensemble.size):
            self.state.index = k
            resume, self.resume = self.resume, None
            self.state.finished.append(self._fit_one(k, resume))

    def _fit_one(self, k: int, resume: tuple[dict, dict] | None) -> TrainedModel:
        fit, candidate = self.fit, self.fit.candidates[self.candidates.state.index]
        index, seed = self.runs.index, self.fit.seed(self.runs.index)
        unit = {"index": index, "candidate": candidate.name, "member": k}
        fit.emit("model_start", {**unit, "seed": seed, "epochs": fit.train.epochs, "members": fit.ensemble.size})
        control = Control(
            dist=fit.dist,
            resume=resume,
            checkpoint=None if fit.checkpoints.last is None else self.save,
            every=fit.checkpoint_every,
            stop=fit.stop,
        )
        train = replace(fit.train, seed=fit.ensemble.seed(seed, k))
        on_epoch = partial(self._on_epoch, unit, seed)
        start = time.perf_counter()
        parts = self.candidates.parts
        model = fit_model(parts, candidate.fusion, candidate.settings, train, on_epoch=on_epoch, control=control)
        _add(fit.seconds, f"fusion:{candidate.name}", time.perf_counter() - start)
        fit.emit("model_end", {**unit, "epochs": len(model.history), "best_epoch": model.best_epoch})
        if model.note:
            fit.emit("diverged", {"index": index, "message": model.note, "best_epoch": model.best_epoch})
        return model

    def _on_epoch(self, unit: dict, seed: int, record: dict) -> None:
        self.fit.checkpoints.log_epoch(unit["index"], seed, {**unit, **record})
        self.fit.emit("epoch", {**unit, **record})

    def save(self, trainer: Trainer) -> None:
        """The checkpoint of the member under way: the trainer's state and the three loops' states."""
        tensors, meta = trainer.state_dict()  # on every rank: the ranks' RNG states are gathered
        if not self.fit.dist.main:
            return
        for loop_tensors, loop_meta in (self.runs.to_dict(), self.candidates.state.to_dict(), self.state.to_dict()):
            tensors.update(loop_tensors)
            meta.update(loop_meta)
        self.fit.checkpoints.save(tensors, metrics_for_json(meta))


def _add(seconds: dict[str, float], key: str, value: float) -> None:
    seconds[key] = seconds.get(key, 0.0) + value


def pick(fit: Fit, parts: Parts, models: list[TrainedModel]) -> tuple[TrainedModel, dict, dict[str, dict]]:
    """One run's model: the candidate :func:`attnfuse.portfolio.choose` picks on the validation
    split among the candidates' ``models`` (each its members averaged). Returns it, the record of
    the choice and every candidate's metrics."""
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
    chosen = choose(scores, selection, fit.left_out, np.asarray(fit.data.y[parts.split["valid"]]))
    by_name = {candidate.name: model for candidate, model in zip(fit.candidates, models)}
    return by_name[chosen["picked"]], chosen, {name: m.metrics for name, m in by_name.items()}


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
    metrics, valid_loss, valid_se, valid_pred = assess(model, parts, fit.train, fit.dist)
    note = next((m.note for m in members if m.note), None)
    return replace(
        members[0],
        model=model,
        metrics=metrics,
        note=note,
        valid_loss=valid_loss,
        valid_se=valid_se,
        valid_pred=valid_pred,
    )


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
    if "calibration" in records[0]:
        report["calibration"] = _calibration_summary([r["calibration"] for r in records])
    return report


def _calibration_summary(records: list[dict]) -> dict:
    """Mean ± std over the runs of their calibration records: the temperature (classification),
    and per part each number of :func:`attnfuse.calibration.calibration_report`."""
    parts = {p: summarize([r[p] for r in records]) for p in ("valid", "test") if p in records[0]}
    return {**summarize([{k: r[k] for k in ("temperature",) if k in r} for r in records]), **parts}
