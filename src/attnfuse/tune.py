"""Hyper-parameter search with Optuna: ``attnfuse tune`` is :func:`tune`.

Each trial is one ``attnfuse train`` run (:func:`attnfuse.pipeline.train`, one seed, no baselines,
nothing saved) with settings drawn by a seeded TPE sampler (Bergstra et al., "Algorithms for
Hyper-Parameter Optimization", NeurIPS 2011) and scored by the validation metric that
early stopping uses (accuracy; for regression RMSE, or MAE when training with the L1 loss). The per-epoch validation metric reaches Optuna's median pruner through the
training's progress callback, so a trial that is worse than the median of earlier trials at the
same epoch stops early. Test rows are never looked at.

What is searched: the fusion (with ``--fusion auto``, among the candidates ``--fusion auto``
would train on this data; else the one given), its width, depth, heads, pooling, dropout and
modality dropout, the learning rate and the weight decay. A setting given on the command line is
fixed for every trial (and not searched); ``--repeat``, ``--ensemble`` and ``--baselines`` apply to
the final model only (a trial trains one model of one seed).

The study lives in an SQLite file (``--study-db``): a search that crashed, or that is run again
with the same file, continues where it stopped (its earlier trials inform the sampler). When the
search ends, the best trial's settings are trained into ``--out`` exactly as ``attnfuse train``
would, so ``OUT/run.yaml`` reproduces the model with ``attnfuse train --config OUT/run.yaml``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from .fusion import FUSIONS
from .options import Option, option, options_of
from .pipeline import RunOptions, TrainSpec, candidates_for, load, train, train_options
from .training import TrainConfig

__all__ = [
    "TuneOptions",
    "TuneResult",
    "tune",
    "tune_options",
    "search_space",
    "trial_summary",
    "default_study_db",
    "STUDY_NAME",
]

STUDY_NAME = "attnfuse"
# The searched values. Widths and heads are powers of two, so every head count divides every width.
D_MODELS = (16, 32, 64, 128)
HEADS = (1, 2, 4)


@dataclass
class TuneOptions:
    """The options of ``attnfuse tune`` that ``attnfuse train`` does not have."""

    trials: int = option(20, "Trials to run now (a continued study adds them to the trials it holds).")
    timeout: float | None = option(None, "Start no new trial after this many seconds.")
    study_db: str | None = option(
        None, "SQLite file of the study (default: OUT.study.db beside --out); the same file again continues it."
    )

    def __post_init__(self) -> None:
        if isinstance(self.trials, bool) or not isinstance(self.trials, int) or self.trials < 1:
            raise ValueError(f"trials: expected an integer >= 1, got {self.trials!r}")
        if self.timeout is not None and (
            isinstance(self.timeout, bool) or not isinstance(self.timeout, (int, float)) or not self.timeout > 0
        ):
            raise ValueError(f"timeout: expected a number of seconds > 0, got {self.timeout!r}")


def tune_options() -> list[Option]:
    """Every option of ``attnfuse tune``: its own, then those of ``attnfuse train``."""
    return options_of(TuneOptions) + train_options()


def default_study_db(out: str | os.PathLike) -> Path:
    """``OUT.study.db`` beside the output directory: outside it, so that replacing the model
    directory never deletes the study."""
    out = Path(out)
    return out.with_name(out.name + ".study.db")


def search_space(trial: optuna.Trial, fusions: list[str], fixed: dict[str, Any]) -> dict[str, Any]:
    """One trial's option values: the ``fixed`` ones (given by the user) and the drawn ones.

    Settings that only some fusions have are drawn under per-fusion names (``self.pooling``), as
    their choices differ between fusions (Optuna's categorical distributions are fixed per name).
    A fixed model setting the drawn fusion lacks (``nhead`` when ``concat`` is drawn) is left out."""
    values = {k: v for k, v in fixed.items() if k not in _MODEL_OPTIONS}

    def draw(name: str, sample: Callable[[], Any]) -> None:
        if name not in fixed:
            values[name] = sample()

    draw("fusion", lambda: trial.suggest_categorical("fusion", fusions))
    fusion = values["fusion"]
    config_class = FUSIONS[fusion].config_class
    has = {o.name for o in options_of(config_class)}
    values.update({k: v for k, v in fixed.items() if k in has})
    draw("d_model", lambda: trial.suggest_categorical("d_model", D_MODELS))
    if "num_layers" in has:
        draw("num_layers", lambda: trial.suggest_int("num_layers", 1, 3))
        draw("nhead", lambda: trial.suggest_categorical("nhead", HEADS))
    poolings = getattr(config_class, "POOLINGS", ())
    if len(poolings) > 1:
        draw("pooling", lambda: trial.suggest_categorical(f"{fusion}.pooling", poolings))
    draw("dropout", lambda: trial.suggest_float("dropout", 0.0, 0.5))
    if "modality_dropout" in has:
        draw("modality_dropout", lambda: trial.suggest_float("modality_dropout", 0.0, 0.3))
    draw("lr", lambda: trial.suggest_float("lr", 1e-4, 3e-3, log=True))
    draw("weight_decay", lambda: trial.suggest_float("weight_decay", 1e-4, 0.3, log=True))
    return values


@dataclass
class TuneResult:
    """The study (all its trials, earlier runs' included), the best trial's option values, and
    what training them into ``out`` returned (:class:`attnfuse.pipeline.TrainResult`)."""

    study: optuna.Study
    best_options: dict[str, Any]
    final: Any
    study_db: Path


# Settings of the models (the union of the fusion configs'), as opposed to run and training options.
_MODEL_OPTIONS = {o.name for o in train_options() if o.owner not in (RunOptions, TrainConfig)}

# What a study was started for: continuing it with other data, task or fixed settings would mix
# scores that cannot be compared.
_IDENTITY = ("data", "task", "fusion", "fixed")


def tune(
    options: dict[str, Any],
    tune_opts: TuneOptions,
    out: str | os.PathLike,
    on_trial: Callable[[optuna.trial.FrozenTrial], None] | None = None,
    progress: Callable[[str, dict], None] | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
) -> TuneResult:
    """Search, then train the best settings into ``out`` (see the module docstring).

    ``options``: ``attnfuse train`` option values given by the user (fixed in every trial);
    ``on_trial`` is called after each trial of this run; ``progress`` is passed to the final
    training (as to :func:`attnfuse.pipeline.train`); ``pruner`` replaces the median pruner."""
    base = TrainSpec.from_options(options)  # every given value is checked before any trial
    if base.run.repeat != 1:
        raise ValueError(
            f"repeat: tune scores one seed per trial (the final model may use --repeat), got {base.run.repeat}"
        )
    data = load(base.run.data, base.run.allow_pickle, base.train.seed, base.run.task, **base.run.table_options())
    base.train.check_task(data.task, data.target_dim)
    fusions = [base.run.fusion]
    if base.run.fusion == "auto":
        fusions = list(dict.fromkeys(c.fusion for c in candidates_for(data, "auto", {})[0]))
    metric, mode = base.train.selection_metric(data.task)

    # The options every trial shares: the user's, without those that only matter for the final model.
    alias = {flag.replace("-", "_"): o.name for o in train_options() for flag in o.flags}  # heads -> nhead
    given = {alias.get(k.replace("-", "_"), k.replace("-", "_")): v for k, v in options.items()}
    final_only = {"repeat", "folds", "baselines", "ensemble", "checkpoint_every", "tensorboard"}
    fixed = {k: v for k, v in given.items() if k not in final_only and k not in ("data", "fusion")}
    if base.run.fusion != "auto":
        fixed["fusion"] = base.run.fusion
    identity = {"data": str(base.run.data), "task": data.task, "fusion": base.run.fusion, "fixed": _plain(fixed)}

    db = Path(tune_opts.study_db) if tune_opts.study_db else default_study_db(out)
    db.parent.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=STUDY_NAME,
        storage=f"sqlite:///{db.resolve()}",
        load_if_exists=True,
        direction="maximize" if mode == "max" else "minimize",
        # Prune only once a few trials have finished and each trial has had a few epochs to learn.
        pruner=pruner or optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=5),
    )
    _check_identity(study, identity, db)
    # Seeded by the seed and the trials so far: a continued study does not replay the random
    # start-up draws of its first run.
    study.sampler = optuna.samplers.TPESampler(seed=base.train.seed + len(study.trials), n_startup_trials=5)

    def objective(trial: optuna.Trial) -> float:
        values = search_space(trial, fusions, fixed)
        trial.set_user_attr("options", _plain(values))
        spec = TrainSpec.from_options({**values, "data": base.run.data, "baselines": False})

        def report(event: str, info: dict) -> None:
            if event == "epoch":
                trial.report(info[f"valid_{metric}"], info["epoch"])
                if trial.should_prune():
                    raise optuna.TrialPruned(f"epoch {info['epoch']}: below the median of earlier trials")

        result = train(spec, None, report)
        value = result.report["valid"][metric]
        if not math.isfinite(value):
            raise optuna.TrialPruned("the validation metric is not finite (training diverged)")
        return value

    callbacks = [] if on_trial is None else [lambda _study, trial: on_trial(trial)]
    study.optimize(objective, n_trials=tune_opts.trials, timeout=tune_opts.timeout, callbacks=callbacks)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        raise ValueError(f"tune: no trial of the study in {db} completed (every one was pruned or failed)")

    best = {**study.best_trial.user_attrs["options"], "data": base.run.data}
    best.update({k: given[k] for k in final_only if k in given})  # the final model's own options
    final = train(TrainSpec.from_options(best), out, progress)
    return TuneResult(study, best, final, db)


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    """JSON-able option values (Optuna stores user attributes as JSON)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(values.items())}


def _check_identity(study: optuna.Study, identity: dict, db: Path) -> None:
    """Record what a new study is for; refuse to continue a study of other data or settings."""
    saved = {k: study.user_attrs.get(k) for k in _IDENTITY}
    if not study.trials and saved["data"] is None:
        for k, v in identity.items():
            study.set_user_attr(k, v)
        return
    for k in _IDENTITY:
        if saved[k] != identity[k]:
            raise ValueError(
                f"study-db: {db} holds a study with {k} {saved[k]!r}, not {identity[k]!r}; "
                "use another --study-db for another search"
            )


def trial_summary(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """A trial as a plain dict: number, state, value and the options it trained with."""
    return {
        "number": trial.number,
        "state": trial.state.name.lower(),
        "value": trial.value,
        "options": trial.user_attrs.get("options", {}),
    }
