"""A run in progress: ``DIR/last/``, what ``attnfuse train --resume DIR`` continues from.

While ``attnfuse train --out DIR`` runs, ``DIR/last/`` holds::

    last/run.yaml           the options of the run (a resumed run must not change them)
    last/log.csv            one row per epoch, appended as training goes
    last/tensorboard/       event files, with --tensorboard
    last/state -> state-…   the newest checkpoint: trainer.safetensors (weights, best weights,
                            optimizer, RNG states) and trainer.json (epoch, step, early stopping, ...)

A checkpoint is written into a fresh ``state-…`` directory, flushed to disk, and published by
replacing the ``state`` symlink in one rename, so a crash at any moment leaves the previous
checkpoint or the new one, never a mix. When the run completes, its model directory replaces
``DIR`` and ``last/`` goes with the old one. Like model directories, checkpoints hold tensors
(safetensors) and plain values (JSON) only: no pickle.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import uuid
from pathlib import Path

import yaml
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from .files import to_json, write_bytes, write_text

__all__ = ["LAST", "last_dir", "save_state", "load_state", "RunLog", "write_options", "read_run_options"]

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


def last_dir(out: str | os.PathLike) -> Path:
    return Path(out) / LAST


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_state(last: Path, tensors: dict[str, Tensor], meta: dict) -> None:
    """Publish a checkpoint under ``last/state`` atomically (see the module docstring)."""
    last.mkdir(parents=True, exist_ok=True)
    name = f"state-r{meta.get('run_index', 0):03d}-e{meta['epoch']:05d}-s{meta['step']:06d}-{uuid.uuid4().hex[:8]}"
    tmp = last / f".state-{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    state = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    write_bytes(tmp / "trainer.safetensors", safetensors_bytes(state))  # each fsynced, errors name the file
    write_text(tmp / "trainer.json", to_json(meta))
    _fsync(tmp)
    os.replace(tmp, last / name)
    link = last / f".link-{os.getpid()}.tmp"
    link.unlink(missing_ok=True)
    link.symlink_to(name)
    os.replace(link, last / "state")  # the one step that publishes the new checkpoint
    _fsync(last)
    for stale in [*last.glob(".state-*"), *last.glob("state-*")]:  # left by an earlier crash
        if stale.name != name and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)


def load_state(last: Path) -> tuple[dict[str, Tensor], dict]:
    """The newest checkpoint of ``last/``; a clear error when there is none."""
    state = last / "state"
    if not (state / "trainer.json").is_file() or not (state / "trainer.safetensors").is_file():
        raise FileNotFoundError(f"resume: {last.parent} has no checkpoint to resume ({state} is missing)")
    try:
        meta = json.loads((state / "trainer.json").read_text())
        tensors = load_file(state / "trainer.safetensors")
    except Exception as e:  # safetensors' and json's own errors: a damaged checkpoint
        raise ValueError(f"resume: the checkpoint in {state.resolve()} is damaged ({e})") from None
    return tensors, meta


def write_options(last: Path, options: dict) -> None:
    write_text(last / "run.yaml", yaml.safe_dump(options, sort_keys=False))


def read_run_options(last: Path) -> dict:
    path = last / "run.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"resume: {last.parent} has no run in progress (no {path})")
    return yaml.safe_load(path.read_text())


class RunLog:
    """``last/log.csv``: one row per epoch, flushed as it is written; optionally TensorBoard too."""

    def __init__(self, last: Path, tensorboard: bool = False, keep_rows: int | None = None) -> None:
        last.mkdir(parents=True, exist_ok=True)
        self.path = last / "log.csv"
        rows = []
        if keep_rows is not None and self.path.is_file():  # resumed: keep the epochs the checkpoint holds
            with open(self.path, newline="") as f:
                rows = list(csv.DictReader(f))[:keep_rows]
        self.file = open(self.path, "w", newline="")  # noqa: SIM115 (closed in close())
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
