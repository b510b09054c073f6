"""A run in progress: ``DIR/last/``, what ``attnfuse train --resume DIR`` continues from.

While ``attnfuse train --out DIR`` runs, ``DIR/last/`` holds::

    last/run.yaml           the options of the run (a resumed run must not change them)
    last/log.csv            one row per epoch, appended as training goes
    last/tensorboard/       event files, with --tensorboard
    last/state -> state-…   the newest checkpoint: trainer.safetensors (weights, best weights,
                            optimizer, RNG states; the finished models' weights) and trainer.json
                            (epoch, step, early stopping, ...; where the loops of attnfuse.fit stand)

:class:`Checkpoints` is that directory as the loops of :mod:`attnfuse.fit` use it: the options,
the epoch log, :meth:`Checkpoints.save` and the checkpoint a resumed fit starts from.

A checkpoint is written into a fresh ``state-…`` directory, flushed to disk, and published by
replacing the ``state`` symlink in one rename, so a crash at any moment leaves the previous
checkpoint or the new one, never a mix. When the run completes, its model directory replaces
``DIR`` and ``last/`` goes with the old one. Like model directories, checkpoints hold tensors
(safetensors) and plain values (JSON) only: no pickle.

A checkpoint and the options it was trained with are one unit: ``trainer.json`` records the hash
of the ``run.yaml`` beside it (``options_sha256``). A later run started into the same ``DIR``
writes its own ``run.yaml`` over the first one's; if it is killed before a checkpoint of its own,
``last/state`` is still the first run's, and resuming it with the second run's options would
continue one run's weights with another's settings. :func:`load_state` refuses that.

``last/`` is untrusted input when resumed, like a model directory: :func:`load_state` checks
``trainer.json`` against its schema and every tensor of ``trainer.safetensors`` (names, dtypes,
shapes, RNG states that the generators accept) before anything is built or restored; the models a
checkpoint holds are described by their configs, built on the ``meta`` device (no memory) and
compared tensor by tensor. A damaged or tampered checkpoint is one ``ValueError``.

Nothing inside a run directory is written through a symbolic link: ``last/`` that is a link (to
another run's directory, or anything else), or a link among its entries, is refused, so that
neither the clean-up of stale checkpoints nor the log can touch what the link points to.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import random
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from .checks import is_int, is_number
from .data import Standardizer
from .ensemble import build_recorded
from .files import to_json, write_bytes, write_text
from .fusion import config_from_dict
from .training import DivergedError, tensor_mismatches

__all__ = [
    "LAST",
    "Checkpoints",
    "last_dir",
    "save_state",
    "load_state",
    "check_state",
    "check_last",
    "RunLog",
    "write_options",
    "read_run_options",
]

LAST = "last"
LOG_FIELDS = (
    "run",
    "seed",
    "candidate",
    "member",
    "epoch",
    "train_loss",
    "valid_loss",
    "valid_metric",
    "valid_value",
    "best_epoch",
)
LINK_DEBRIS = re.compile(r"\.link-\d+\.tmp")  # the next ``state`` link, left by a crash: removed as a link
STATE_NAME = re.compile(r"state-[A-Za-z0-9-]+")  # what the ``state`` link may point to: a sibling
MAX_META_BYTES = 256 << 20  # trainer.json: settings, histories and per-feature statistics; far less


def last_dir(out: str | os.PathLike) -> Path:
    return Path(out) / LAST


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _link_error(path: Path) -> ValueError:
    try:
        to = f" (to {os.readlink(path)})"
    except OSError:
        to = ""
    return ValueError(
        f"last: {path} is a symbolic link{to}; attnfuse writes a run directory's entries itself and never "
        "through a link: remove the link (its target is not touched), or choose another --out"
    )


def check_last(last: Path, create: bool = False) -> None:
    """``last/`` must be a directory of its own (``create``: made when missing), holding no link
    but ``state``: a link would make the clean-up delete, and the log truncate, what it points to."""
    if last.is_symlink():
        raise _link_error(last)
    if create:
        last.mkdir(parents=True, exist_ok=True)
        if last.is_symlink():  # made a link by someone else in between
            raise _link_error(last)
    if not last.exists():
        return
    if not last.is_dir():
        raise ValueError(f"last: {last} exists and is not a directory; move it away, or choose another --out")
    for entry in last.iterdir():
        if entry.is_symlink() and entry.name != "state" and not LINK_DEBRIS.fullmatch(entry.name):
            raise _link_error(entry)


def _options_hash(last: Path) -> str | None:
    """The hash of ``last/run.yaml`` (None when there is none): the options a checkpoint belongs to."""
    path = last / "run.yaml"
    if path.is_symlink() or not path.is_file():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_state(last: Path, tensors: dict[str, Tensor], meta: dict) -> None:
    """Publish a checkpoint under ``last/state`` atomically (see the module docstring); it records
    the hash of the ``run.yaml`` beside it."""
    check_last(last, create=True)
    meta = {**meta, "options_sha256": _options_hash(last)}
    name = f"state-r{meta.get('run_index', 0):03d}-e{meta['epoch']:05d}-s{meta['step']:06d}-{uuid.uuid4().hex[:8]}"
    tmp = last / f".state-{os.getpid()}.tmp"
    _remove(tmp)
    tmp.mkdir()
    state = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    write_bytes(tmp / "trainer.safetensors", safetensors_bytes(state))  # each fsynced, errors name the file
    write_text(tmp / "trainer.json", to_json(meta))
    _fsync(tmp)
    os.replace(tmp, last / name)
    link = last / f".link-{os.getpid()}.tmp"
    link.unlink(missing_ok=True)
    link.symlink_to(name)
    os.replace(link, last / "state")  # the one step that publishes the new checkpoint (replaces the link itself)
    _fsync(last)
    for stale in [*last.glob(".state-*"), *last.glob("state-*"), *last.glob(".link-*")]:  # left by a crash
        if stale.name != name:
            _remove(stale)


def _remove(path: Path) -> None:
    """Remove ``path``: a link itself (never what it points to), a file, or a directory tree (whose
    links rmtree removes as links)."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


def load_state(last: Path) -> tuple[dict[str, Tensor], dict]:
    """The newest checkpoint of ``last/``, checked (:func:`check_state`) and belonging to the
    ``run.yaml`` beside it; a clear error when there is none."""
    check_last(last)
    state = last / "state"
    if not state.is_symlink() and not state.exists():
        raise FileNotFoundError(f"resume: {last.parent} has no checkpoint to resume ({state} is missing)")
    target = os.readlink(state) if state.is_symlink() else ""
    if not STATE_NAME.fullmatch(target) or (last / target).is_symlink() or not (last / target).is_dir():
        raise ValueError(
            f"resume: {state} is not a link to a checkpoint beside it (state-…), got {target or 'no link'!r}; "
            "the checkpoint is damaged: start again without --resume"
        )
    where = last / target
    for name in ("trainer.json", "trainer.safetensors"):
        path = where / name
        if path.is_symlink() or not path.is_file():
            raise ValueError(f"resume: the checkpoint in {where} is damaged ({name} is missing or not a file)")
    size = (where / "trainer.json").stat().st_size
    if size > MAX_META_BYTES:
        raise ValueError(f"resume: the checkpoint in {where} is damaged (trainer.json is {size:,} bytes)")

    def no_constants(name: str) -> None:
        raise ValueError(f"{name} is not a JSON number")

    try:
        meta = json.loads((where / "trainer.json").read_bytes(), parse_constant=no_constants)
        tensors = load_file(where / "trainer.safetensors")
    except RecursionError:
        raise ValueError(f"resume: the checkpoint in {where} is damaged (trainer.json is nested too deeply)") from None
    except Exception as e:  # safetensors' and json's own errors: a damaged checkpoint
        reason = " ".join(str(e).split())[:200]
        raise ValueError(f"resume: the checkpoint in {where} is damaged ({reason})") from None
    check_state(tensors, meta, str(where))
    if meta["options_sha256"] != _options_hash(last):
        raise ValueError(
            f"resume: {state} is a checkpoint of another run than {last / 'run.yaml'} describes (a later run into "
            f"{last.parent} started over it and stopped before a checkpoint of its own); start again without --resume"
        )
    return tensors, meta


# ---------------------------------------------------------------------------------------------
# What a checkpoint must hold


class _Bad(ValueError):
    pass


def _fail(where: str, key: str, problem: str) -> _Bad:
    return _Bad(f"resume: the checkpoint in {where} is damaged ({key}: {problem}); start again without --resume")


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


class _Meta:
    """Typed access to trainer.json, failing with the key's dotted name."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, key: str, problem: str) -> _Bad:
        return _fail(self.where, f"trainer.json {key}", problem)

    def get(self, d: dict, key: str, name: str, kind, optional: bool = False) -> Any:
        if key not in d:
            if optional:
                return None
            raise self.fail(name, "missing")
        value = d[key]
        ok = isinstance(value, kind) and (kind not in (int, (int, float)) or is_number(value, finite=False))
        if not ok:
            raise self.fail(name, f"expected {getattr(kind, '__name__', 'a number')}, got {_type_name(value)}")
        return value

    def count(self, d: dict, key: str, name: str, low: int = 0, optional: bool = False) -> int | None:
        value = self.get(d, key, name, int, optional)
        if value is not None and value < low:
            raise self.fail(name, f"expected an integer >= {low}, got {value}")
        return value

    def number(self, d: dict, key: str, name: str) -> float | None:
        if key not in d:
            raise self.fail(name, "missing")
        value = d[key]
        if value is not None and not is_number(value):
            raise self.fail(name, f"expected a finite number or null, got {value!r}")
        return value

    def records(self, d: dict, key: str, name: str, optional: bool = False) -> list[dict]:
        value = self.get(d, key, name, list, optional) or []
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                raise self.fail(f"{name}[{i}]", f"expected an object, got {_type_name(item)}")
        return value


def _tensor(tensors: dict[str, Tensor], key: str, where: str, dtype: torch.dtype, shape: tuple | None = None) -> Tensor:
    if key not in tensors:
        raise _fail(where, f"trainer.safetensors {key}", "missing")
    t = tensors[key]
    if t.dtype != dtype or (shape is not None and tuple(t.shape) != shape):
        expected = f"expected {dtype} of shape {list(shape or t.shape)}"
        raise _fail(where, f"trainer.safetensors {key}", f"{expected}, got {t.dtype} of shape {list(t.shape)}")
    return t


def _check_generator(tensors: dict[str, Tensor], key: str, where: str) -> None:
    t = _tensor(tensors, key, where, torch.uint8, tuple(torch.Generator().get_state().shape))
    try:
        torch.Generator().set_state(t)  # a scratch generator: the state must be one torch accepts
    except RuntimeError as e:
        raise _fail(where, f"trainer.safetensors {key}", " ".join(str(e).split())[:120]) from None


def _check_rank_rng(tensors: dict[str, Tensor], meta: dict, rank: int, where: str) -> None:
    """One process's global RNG states (see :func:`attnfuse.training.rng_state`)."""
    prefix = f"rng.rank{rank}."
    _check_generator(tensors, f"{prefix}torch", where)
    keys = _tensor(tensors, f"{prefix}numpy_keys", where, torch.int64, (624,))
    rest = _tensor(tensors, f"{prefix}numpy_rest", where, torch.int64, (2,))
    gauss = _tensor(tensors, f"{prefix}numpy_gauss", where, torch.float64, (1,))
    if bool(((keys < 0) | (keys >= 2**32)).any()) or not bool(keys.any()):
        problem = "not a Mersenne Twister state (values outside 0..2^32-1, or all zero)"
        raise _fail(where, f"trainer.safetensors {prefix}numpy_keys", problem)
    pos, has_gauss = rest.tolist()
    if not (0 <= pos <= 624 and has_gauss in (0, 1) and math.isfinite(float(gauss[0]))):
        problem = f"expected a position 0..624 and a flag 0/1, got {[pos, has_gauss]}"
        raise _fail(where, f"trainer.safetensors {prefix}numpy_rest", problem)
    for key in (k for k in tensors if k.startswith(f"{prefix}cuda")):
        _tensor(tensors, key, where, torch.uint8)
        if tensors[key].dim() != 1:
            raise _fail(where, f"trainer.safetensors {key}", "expected a 1-d byte tensor")
    python = meta["python_rng"].get(f"rank{rank}")
    try:
        version, internal, g = python
        if version != 3 or len(internal) != 625 or not all(is_int(v) and 0 <= v < 2**32 for v in internal):
            raise ValueError
        if not any(internal[:624]) or not (g is None or is_number(g)):
            raise ValueError
        random.Random().setstate((version, tuple(internal), g))  # a scratch generator
    except (ValueError, TypeError, OverflowError):
        raise _fail(where, f"trainer.json python_rng.rank{rank}", "not a state of Python's random") from None


def _model_shapes(record: dict, name: str, m: _Meta) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The tensors of the model a record describes, built on the ``meta`` device (no memory)."""
    fusion = m.get(record, "fusion", f"{name}.fusion", str)
    values = m.get(record, "model", f"{name}.model", dict)
    m.count(record, "ensemble", f"{name}.ensemble", low=1, optional=True)
    m.get(record, "weighted", f"{name}.weighted", dict, optional=True)
    try:
        config = config_from_dict(fusion, values)
        with torch.device("meta"):
            model = build_recorded({**record, "model": config})
    except _Bad:
        raise
    except (ValueError, TypeError, KeyError) as e:
        raise m.fail(f"{name}.model", " ".join(str(e).split())[:200]) from None
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def _check_record(tensors: dict[str, Tensor], record: dict, name: str, prefix: str, m: _Meta) -> None:
    """A finished model of the checkpoint (:meth:`attnfuse.training.TrainedModel.to_dict`): its
    record in trainer.json, its weights ``prefix weights.*`` and validation predictions
    ``prefix valid_pred``."""
    m.get(record, "metrics", f"{name}.metrics", dict)
    m.count(record, "best_epoch", f"{name}.best_epoch")
    m.records(record, "history", f"{name}.history")
    m.get(record, "note", f"{name}.note", (str, type(None)))
    for key in ("valid_loss", "valid_se"):
        m.number(record, key, f"{name}.{key}")
    try:
        Standardizer.from_dict(m.get(record, "standardizer", f"{name}.standardizer", dict))
    except (ValueError, TypeError) as e:
        raise m.fail(f"{name}.standardizer", str(e)) from None
    _check_weights(tensors, f"{prefix}weights.", _model_shapes(record, name, m), m.where)
    pred = tensors.get(f"{prefix}valid_pred")
    if pred is not None and (pred.dim() not in (1, 2) or pred.dtype == torch.bool):
        raise _fail(
            m.where, f"trainer.safetensors {prefix}valid_pred", "expected the validation predictions (N,) or (N, K)"
        )
    outputs, rows = tensors.get(f"{prefix}valid_outputs"), tensors.get(f"{prefix}valid_rows")
    if (outputs is None) != (rows is None):
        raise _fail(m.where, f"trainer.safetensors {prefix}valid_outputs", "expected with valid_rows, or neither")
    shaped = outputs is None or (
        outputs.dim() == 2 and rows.dim() == 1 and rows.dtype == torch.int64 and rows.shape[0] == outputs.shape[0]
    )
    if not shaped or (outputs is not None and not (outputs.is_floating_point() and outputs.isfinite().all())):
        raise _fail(
            m.where,
            f"trainer.safetensors {prefix}valid_outputs",
            "expected finite out-of-fold outputs (N, C) of N rows",
        )


def _check_weights(tensors: dict[str, Tensor], prefix: str, expected: dict, where: str) -> None:
    """The tensors ``prefix*`` are exactly ``expected`` ({name: (shape, dtype)}), and finite."""
    got = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    problems = tensor_mismatches(got, expected, prefix)
    problems += [
        f"{prefix}{k} holds NaN/inf" for k, v in got.items() if v.is_floating_point() and not v.isfinite().all()
    ]
    if problems:
        raise _fail(where, "trainer.safetensors", "; ".join(problems[:3]))


def check_state(tensors: dict[str, Tensor], meta: Any, where: str) -> None:
    """A checkpoint read from ``where`` (untrusted) against what attnfuse writes: the schema of
    ``meta`` (trainer.json), the RNG states of every process, the loops' state and finished models'
    configs and weights (compared on the ``meta`` device, nothing allocated), the loop's tensors.
    The trainer's own weights and optimizer state are compared with the model they restore when it
    exists (:meth:`attnfuse.training.Trainer.load_state_dict`). Raises one ``ValueError``."""
    m = _Meta(where)
    if not isinstance(meta, dict):
        raise m.fail("top level", f"expected an object, got {_type_name(meta)}")
    _check_trainer_meta(meta, m)
    _check_run_loop(tensors, meta, m)
    _check_inner_loop(tensors, meta, m, "candidate", "candidates", "candidates' models")
    _check_inner_loop(tensors, meta, m, "member", "members", "members")
    _check_tensors(tensors, meta, where)


def _check_trainer_meta(meta: dict, m: _Meta) -> None:
    """The trainer's plain values (:meth:`attnfuse.training.Trainer.state_dict`)."""
    epoch = m.count(meta, "epoch", "epoch")
    m.count(meta, "step", "step")
    m.count(meta, "count", "count")
    best_epoch = m.count(meta, "best_epoch", "best_epoch")
    if best_epoch > epoch:
        raise m.fail("best_epoch", f"expected at most epoch {epoch}, got {best_epoch}")
    best_key = m.get(meta, "best_key", "best_key", (list, type(None)))
    if best_key is not None and (len(best_key) != 2 or not all(v is None or is_number(v) for v in best_key)):
        raise m.fail("best_key", f"expected two numbers, got {best_key!r}")
    m.records(meta, "history", "history")
    for i, group in enumerate(m.records(meta, "optimizer_groups", "optimizer_groups")):
        params = m.get(group, "params", f"optimizer_groups[{i}].params", list)
        if not all(is_int(p) and p >= 0 for p in params):
            raise m.fail(f"optimizer_groups[{i}].params", "expected parameter indices")
    m.get(meta, "scaler", "scaler", dict)
    m.count(meta, "world", "world", low=1)
    m.get(meta, "python_rng", "python_rng", dict)
    m.get(meta, "options_sha256", "options_sha256", (str, type(None)))
    m.get(meta, "fingerprint", "fingerprint", str, optional=True)
    m.count(meta, "log_rows", "log_rows", optional=True)


def _check_run_loop(tensors: dict[str, Tensor], meta: dict, m: _Meta) -> None:
    """The loop over runs (:class:`attnfuse.fit.RunLoopState`): the run under way, the records of
    the runs before it, the first run's model."""
    run_index = m.count(meta, "run_index", "run_index", optional=True) or 0
    finished = m.records(meta, "finished", "finished", optional=True)
    if len(finished) != run_index:
        problem = f"expected the records of the {run_index} runs before run {run_index}, got {len(finished)}"
        raise m.fail("finished", problem)
    for i, record in enumerate(finished):
        m.count(record, "seed", f"finished[{i}].seed")
        m.records(record, "history", f"finished[{i}].history", optional=True)
        for part in ("train", "valid", "test"):
            metrics = m.get(record, part, f"finished[{i}].{part}", dict, optional=True) or {}
            if not all(v is None or is_number(v) for v in metrics.values()):
                raise m.fail(f"finished[{i}].{part}", "expected numbers")
    m.get(meta, "selection", "selection", (dict, type(None)), optional=True)
    if (run_index > 0) != ("first" in meta):
        raise m.fail("first", "expected the first run's model exactly when a later run is under way")
    if "first" in meta:
        _check_record(tensors, m.get(meta, "first", "first", dict), "first", "first.", m)


def _check_inner_loop(tensors: dict[str, Tensor], meta: dict, m: _Meta, level: str, records: str, total: str) -> None:
    """One of a run's inner loops (:class:`attnfuse.fit.CandidateLoopState`,
    :class:`attnfuse.fit.MemberLoopState`): the position ``level`` and one finished model (record
    and tensors ``<level>.<i>.*``) per position before it."""
    index = m.count(meta, level, level)
    finished = m.records(meta, records, records)
    if len(finished) != index:
        raise m.fail(records, f"expected the {index} {total} before {level} {index}, got {len(finished)}")
    for i, record in enumerate(finished):
        _check_record(tensors, record, f"{records}[{i}]", f"{level}.{i}.", m)


# The tensors a checkpoint holds: the trainer's (checked against its model on restore), the finished
# models' (first., candidate.<c>., member.<k>.), the loop's, the RNGs'.
KNOWN_TENSORS = re.compile(
    r"(model|best|optim\.\d+)\..+"
    r"|(first|candidate\.\d+|member\.\d+)\.(weights\..+|valid_pred|valid_outputs|valid_rows)"
    r"|loop\.(loss_sum|step_losses)"
    r"|rng\.(shuffle|epoch)|rng\.rank\d+\.(torch|numpy_keys|numpy_rest|numpy_gauss|cuda\d+)"
)


def _check_tensors(tensors: dict[str, Tensor], meta: dict, where: str) -> None:
    """No tensor attnfuse does not write; the trainer's loop tensors and every process's RNG states."""
    unknown = [k for k in tensors if not KNOWN_TENSORS.fullmatch(k)]
    if unknown:
        raise _fail(where, f"trainer.safetensors {unknown[0]}", "not a tensor attnfuse writes")
    if not any(k.startswith("model.") for k in tensors):
        raise _fail(where, "trainer.safetensors model.*", "missing")
    loss_sum = _tensor(tensors, "loop.loss_sum", where, torch.float32, ())
    if not math.isfinite(float(loss_sum)):
        raise _fail(where, "trainer.safetensors loop.loss_sum", "not finite")
    step = meta["step"]
    if step and "loop.step_losses" in tensors:
        _tensor(tensors, "loop.step_losses", where, torch.float32, (step,))
    elif "loop.step_losses" in tensors or step:
        raise _fail(where, "trainer.safetensors loop.step_losses", f"expected {step} step losses")
    _check_generator(tensors, "rng.shuffle", where)
    _check_generator(tensors, "rng.epoch", where)
    for rank in range(meta["world"]):
        _check_rank_rng(tensors, meta, rank, where)


def write_options(last: Path, options: dict) -> None:
    check_last(last, create=True)
    write_text(last / "run.yaml", yaml.safe_dump(options, sort_keys=False))


def read_run_options(last: Path) -> dict:
    check_last(last)
    path = last / "run.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"resume: {last.parent} has no run in progress (no {path})")
    return yaml.safe_load(path.read_text())


class RunLog:
    """``last/log.csv``: one row per epoch, flushed as it is written; optionally TensorBoard too."""

    def __init__(self, last: Path, tensorboard: bool = False, keep_rows: int | None = None) -> None:
        check_last(last, create=True)  # no link: the log must not truncate what it points to
        self.path = last / "log.csv"
        rows = []
        if keep_rows is not None and self.path.is_file():  # resumed: keep the epochs the checkpoint holds
            with open(self.path, newline="") as f:
                rows = list(csv.DictReader(f))[:keep_rows]
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
        self.file = open(os.open(self.path, flags, 0o666), "w", newline="")  # noqa: SIM115 (closed in close())
        self.writer = csv.DictWriter(self.file, LOG_FIELDS)
        self.writer.writeheader()
        self.writer.writerows(rows)
        self.file.flush()
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError(
                    "tensorboard: the tensorboard package is not installed (pip install tensorboard, or "
                    "pip install 'attnfuse[tensorboard]')"
                ) from None
            self.tb = SummaryWriter(log_dir=str(last / "tensorboard"))

    def write(self, run: int, seed: int, record: dict) -> None:
        metric = next(k for k in record if k.startswith("valid_") and k != "valid_loss")
        row = {
            "run": run,
            "seed": seed,
            "candidate": record.get("candidate", ""),
            "member": record.get("member", 0),
            "epoch": record["epoch"],
            "train_loss": record["train_loss"],
            "valid_loss": record["valid_loss"],
            "valid_metric": metric.removeprefix("valid_"),
            "valid_value": record[metric],
            "best_epoch": record["best_epoch"],
        }
        self.writer.writerow(row)
        self.file.flush()
        if self.tb is not None:
            step = record["epoch"]
            # run1/self-modality/member2/loss/train: one curve per model trained.
            parts = [f"run{run}" if run else "", record.get("candidate", ""), f"member{record.get('member', 0)}"]
            prefix = "".join(f"{p}/" for p in parts if p and p != "member0")
            self.tb.add_scalar(f"{prefix}loss/train", record["train_loss"], step)
            self.tb.add_scalar(f"{prefix}loss/valid", record["valid_loss"], step)
            self.tb.add_scalar(f"{prefix}valid/{row['valid_metric']}", record[metric], step)
            self.tb.flush()

    def close(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())  # on disk before the finished run's directory is swapped in
        self.file.close()
        if self.tb is not None:
            self.tb.close()


class Checkpoints:
    """``OUT/last/`` of a fit in progress: its options (``run.yaml``), its epoch log and its
    checkpoints, and the checkpoint a resumed fit starts from (:attr:`resumed`). Rank 0 alone
    writes (``writes``); without ``out``, nothing is written.

    A checkpoint is the trainer's state and the loops' state (see :mod:`attnfuse.fit`), given to
    :meth:`save` as tensors and plain values; this store adds what ties it to its data
    (``fingerprint``) and to its epoch log (``log_rows``: the epochs ``log.csv`` held when it was
    taken, so a resumed log keeps exactly those)."""

    def __init__(
        self, out: Path | None, options: dict, fingerprint: str, tensorboard: bool, resume: bool, writes: bool
    ) -> None:
        self.last = None if out is None else last_dir(out)
        self.fingerprint = fingerprint
        self.resumed = load_state(self.last) if resume and self.last is not None else None
        meta = self.resumed[1] if self.resumed else {}
        if self.resumed and meta.get("fingerprint") != fingerprint:
            raise ValueError(f"resume: the data {options['data']!r} is not the data the run in {out} was trained on")
        self.logged = meta.get("log_rows", 0)  # epochs in log.csv
        writes = self.last is not None and writes
        self.writes = writes
        self.created = [p for p in (None if out is None else Path(out), self.last) if writes and not p.exists()]
        self.log: RunLog | None = None
        try:
            if writes and not resume:
                write_options(self.last, options)
            self.log = RunLog(self.last, tensorboard, keep_rows=meta.get("log_rows")) if writes else None
        except BaseException as error:
            self.failed(error)
            raise

    def log_epoch(self, run: int, seed: int, record: dict) -> None:
        self.logged += 1
        if self.log is not None:
            self.log.write(run, seed, record)

    def save(self, tensors: dict[str, Tensor], meta: dict) -> None:
        """Publish a checkpoint (:func:`save_state`) of ``tensors`` and ``meta`` (JSON values)."""
        if self.writes:
            save_state(self.last, tensors, {**meta, "fingerprint": self.fingerprint, "log_rows": self.logged})

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
        """After ``error``: unless the fit can be continued from a checkpoint in ``last/``, the
        directories it created go, so nothing is left behind (a diverged fit would only diverge
        again)."""
        keep = self.last is not None and (self.last / "state").exists() and not isinstance(error, DivergedError)
        if self.created and self.writes and not keep:
            shutil.rmtree(self.created[0], ignore_errors=True)
