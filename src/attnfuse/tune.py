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

Several processes may share a study (each runs its trials into the same file, as Optuna's
parallel workers do): opening or creating the study is serialised by a lock beside the file
(``.NAME.lock``), since two processes creating Optuna's tables at once collide on its schema
version. ``--out`` is locked for the whole search (:func:`attnfuse.files.lock`), so a second tune,
or a train, into it is refused at once instead of after its search. The file is checked before
Optuna opens it: anything but an empty file or an SQLite database holding an Optuna study (another
program's database, a truncated or damaged file, a directory) is refused in one line, since Optuna
would add its tables to another database or fail deep inside SQLAlchemy. A new study file gets the
mode the umask gives, as every file attnfuse writes.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from .checks import check_float, check_int
from .files import BusyError, file_mode, lock, new_directories
from .fusion import FUSIONS
from .options import Option, by_name, option, options_of
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
    "check_study_db",
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
        None,
        "SQLite file of the study (default: OUT.study.db beside --out); the same file again continues it, and "
        "several tune processes (each with its own --out) may share it.",
    )

    def __post_init__(self) -> None:
        check_int("trials", self.trials)
        if self.timeout is not None:
            check_float("timeout", self.timeout, 0.0, above=True)  # seconds


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
# Options that only the final model uses (a trial trains one model of one seed and saves nothing).
_FINAL_ONLY = {"repeat", "folds", "baselines", "ensemble", "checkpoint_every", "tensorboard"}


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
    given, fixed = _trial_options(options, base.run.fusion)
    identity = {"data": str(base.run.data), "task": data.task, "fusion": base.run.fusion, "fixed": _plain(fixed)}

    db = Path(tune_opts.study_db) if tune_opts.study_db else default_study_db(out)
    direction = "maximize" if mode == "max" else "minimize"
    # Prune only once a few trials have finished and each trial has had a few epochs to learn.
    pruner = pruner or optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=5)
    target = Path(os.path.realpath(out))  # the path the final training's transaction locks
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    # --out stays locked for the search; the final training takes the same lock again itself.
    with new_directories(target.parent), new_directories(db.parent), lock(target), _storage_errors(db):
        study = _seeded_study(db, direction, pruner, identity, base.train.seed)
        callbacks = [] if on_trial is None else [lambda _study, trial: on_trial(trial)]
        objective = _objective(fusions, fixed, base.run.data, metric)
        study.optimize(objective, n_trials=tune_opts.trials, timeout=tune_opts.timeout, callbacks=callbacks)
        done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if not done:
            raise ValueError(f"tune: no trial of the study in {db} completed (every one was pruned or failed)")
        best = {**study.best_trial.user_attrs["options"], "data": base.run.data}

    best.update({k: given[k] for k in _FINAL_ONLY if k in given})  # the final model's own options
    final = train(TrainSpec.from_options(best), out, progress)
    return TuneResult(study, best, final, db)


def _trial_options(options: dict[str, Any], fusion: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The user's option values under their option names (``heads`` -> ``nhead``), and those every
    trial shares: all but the final model's own and the data (and the fusion unless it is fixed)."""
    given = by_name(options, train_options())  # heads -> nhead
    fixed = {k: v for k, v in given.items() if k not in _FINAL_ONLY and k not in ("data", "fusion")}
    if fusion != "auto":
        fixed["fusion"] = fusion
    return given, fixed


def _seeded_study(
    db: Path, direction: str, pruner: optuna.pruners.BasePruner, identity: dict, seed: int
) -> optuna.Study:
    """The study in ``db`` (opened or created under the study lock, checked to be for ``identity``),
    with this run counted and a TPE sampler of its own seed."""
    with _study_lock(db):
        study = _open_study(db, direction, pruner)
        _check_identity(study, identity, db)
        # Seeded by the seed, the trials so far and the runs before this one (each run, and each
        # of several processes sharing the study, draws its own random start-up trials).
        runs = study.user_attrs.get("runs", 0)
        study.set_user_attr("runs", runs + 1)
        seed = seed + len(study.trials) + runs
    study.sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=5)
    return study


def _objective(fusions: list[str], fixed: dict[str, Any], data: str, metric: str) -> Callable[[optuna.Trial], float]:
    """Optuna's objective: train the trial's settings (one seed, no baselines, nothing saved) on
    ``data`` and return the validation ``metric``, reporting it every epoch to the pruner."""

    def objective(trial: optuna.Trial) -> float:
        values = search_space(trial, fusions, fixed)
        trial.set_user_attr("options", _plain(values))
        spec = TrainSpec.from_options({**values, "data": data, "baselines": False})

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

    return objective


# ---------------------------------------------------------------------------------------------
# The study file

SQLITE_HEADER = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite 3 database
OPTUNA_TABLES = frozenset({"studies", "trials", "alembic_version", "version_info"})
LOCK_WAIT = 120.0  # seconds to wait for another process opening the same study (it takes well under one)


@contextlib.contextmanager
def _study_lock(db: Path, wait: float = LOCK_WAIT) -> Iterator[Path]:
    """Hold ``.NAME.lock`` beside the study file while the study is opened or created, waiting
    (up to ``wait`` seconds) for another process that holds it.

    :func:`attnfuse.files.lock` refuses a second holder at once, which is right for an output but
    not here: processes sharing a study each hold this lock only for the instant of opening it.
    As there, the file is removed after, so a waiter checks that it locked the file still on disk."""
    lock_path = db.with_name(f".{db.name}.lock")
    try:
        import fcntl
    except ImportError:  # Windows: no flock (creation races are left to SQLite there)
        yield lock_path
        return
    deadline = time.monotonic() + wait
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, file_mode())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_ino == os.stat(lock_path).st_ino:
                break
        except (BlockingIOError, FileNotFoundError):
            pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        if time.monotonic() > deadline:
            raise BusyError(
                f"study-db: another process has been opening {db} for {wait:.0f} s (it holds {lock_path}); "
                "wait for it or use another --study-db"
            )
        time.sleep(0.02)
    try:
        yield lock_path
    finally:
        lock_path.unlink(missing_ok=True)
        os.close(fd)


def check_study_db(db: str | os.PathLike) -> None:
    """Refuse, in one line naming ``--study-db``, a file Optuna must not open: a directory or other
    non-file, a file that is not an SQLite database (garbage, a truncated header), one shorter than
    its header says (truncated), one SQLite finds damaged, and another program's database (Optuna
    would add its tables to it). An absent or empty file is a new study."""
    db = Path(db)
    if not db.exists():
        return
    if db.is_dir():
        raise ValueError(f"study-db: expected an SQLite file, got the directory {db}")
    if not db.is_file():
        raise ValueError(f"study-db: expected an SQLite file, got {db}, which is not a regular file")
    with open(db, "rb") as f:  # an unreadable file: the PermissionError names it
        head = f.read(100)
    size = os.path.getsize(db)
    if size == 0:
        return
    if len(head) < 100 and head.startswith(SQLITE_HEADER):
        raise ValueError(
            f"study-db: {db} is truncated: {size} bytes, shorter than SQLite's 100-byte header; restore it or use "
            "another --study-db"
        )
    if len(head) < 100 or not head.startswith(SQLITE_HEADER):
        raise ValueError(
            f"study-db: expected an SQLite database, got {db}, which does not start with SQLite's header "
            f"({size} bytes); use another --study-db"
        )
    page = int.from_bytes(head[16:18], "big")
    page = 65536 if page == 1 else page
    pages = int.from_bytes(head[28:32], "big")
    # The header's page count is valid when its "version-valid-for" matches the change counter; the
    # pages of a database in WAL mode may still be in the -wal file.
    if pages and head[92:96] == head[24:28] and not Path(f"{db}-wal").exists() and size < pages * page:
        raise ValueError(
            f"study-db: {db} is truncated: {size} bytes, its header says {pages * page}; restore it or use "
            "another --study-db"
        )
    try:
        con = sqlite3.connect(f"{db.resolve().as_uri()}?mode=rw", uri=True, timeout=LOCK_WAIT)
        try:
            verdict = con.execute("PRAGMA quick_check").fetchone()[0]
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if verdict == "ok" and tables >= OPTUNA_TABLES:
                con.execute("SELECT version_num FROM alembic_version").fetchall()
                con.execute("SELECT study_id, study_name FROM studies").fetchall()
        finally:
            con.close()
    except sqlite3.Error as e:
        raise ValueError(f"study-db: {db} cannot be read as an Optuna study: {e}; use another --study-db") from None
    if verdict != "ok":
        raise ValueError(f"study-db: {db} is damaged (SQLite's check: {verdict}); restore it or use another --study-db")
    if tables and not tables >= OPTUNA_TABLES:
        shown = ", ".join(sorted(tables)[:5]) + (", ..." if len(tables) > 5 else "")
        raise ValueError(
            f"study-db: {db} is an SQLite database of something else (tables {shown}), not an Optuna study; "
            "use another --study-db"
        )


def _open_study(db: Path, direction: str, pruner: optuna.pruners.BasePruner) -> optuna.Study:
    """The study in ``db`` (checked first, see :func:`check_study_db`), created when new. A new
    file is created here with the umask's mode (SQLite would create it 0644 whatever the umask);
    when creating the study fails (a full disk), the file is removed again."""
    check_study_db(db)
    created, storage = False, None
    if not db.exists():
        os.close(os.open(db, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # 0o666 less the umask
        created = True
    try:
        # Made in two steps so that an __init__ failing half-way (a full disk while it creates the
        # tables) leaves us its engine to close: its pooled connection holds the file open.
        storage = optuna.storages.RDBStorage.__new__(optuna.storages.RDBStorage)
        try:
            # SQLite waits up to the timeout for a write lock another process sharing the study holds.
            storage.__init__(f"sqlite:///{db.resolve()}", engine_kwargs={"connect_args": {"timeout": LOCK_WAIT}})
        except RuntimeError as e:  # a schema of another Optuna version: "... is no longer compatible ..."
            raise ValueError(f"study-db: {db}: {e}") from None
        return optuna.create_study(
            study_name=STUDY_NAME, storage=storage, load_if_exists=True, direction=direction, pruner=pruner
        )
    except BaseException:
        if getattr(storage, "engine", None) is not None:
            storage.engine.dispose()
        if created:
            for p in (db, Path(f"{db}-journal")):
                p.unlink(missing_ok=True)
        raise


def _sqlite_error(e: BaseException) -> sqlite3.Error | None:
    """The SQLite error behind ``e`` (SQLAlchemy wraps it, Optuna wraps SQLAlchemy's), if any."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, sqlite3.Error):
            return x
        todo += [getattr(x, "orig", None), x.__cause__, x.__context__]
    return None


@contextlib.contextmanager
def _storage_errors(db: Path) -> Iterator[None]:
    """SQLite failures of the study file as the errors of a file: a full disk is "no space left on
    device: DB", a read-only file or directory "permission denied", anything else a one-line
    ValueError naming ``--study-db``, instead of an internal error from deep inside SQLAlchemy."""
    try:
        yield
    except Exception as e:
        cause = _sqlite_error(e)
        if cause is None:
            raise
        text = str(cause)
        if "disk is full" in text:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(db)) from e
        if "readonly" in text or "read-only" in text:
            raise PermissionError(errno.EACCES, "cannot write the study (read-only)", str(db)) from e
        if "locked" in text:
            raise BusyError(f"study-db: {db} stayed locked by another process for {LOCK_WAIT:.0f} s: {text}") from e
        if "disk I/O error" in text:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(db)) from e
        if "malformed" in text or "not a database" in text:
            raise ValueError(f"study-db: {db} is damaged (SQLite: {text}); restore it or use another --study-db") from e
        raise ValueError(f"study-db: {db} cannot be used: {text}") from e


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
