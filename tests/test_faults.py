"""Fault injection: a crash or a full disk at every write step of ``train``, ``evaluate`` and
``predict``, SIGKILL and SIGTERM of a real ``attnfuse train``, two concurrent trains into one
``--out``. After each, the output is absent, the old complete result or the new complete one,
never a mix; temporaries are gone (or removed by the next run); ``evaluate`` agrees with the
``metrics.json`` of whatever run is there.

The in-process injections replace the ``os`` and ``tempfile`` that attnfuse.files sees with
proxies that count every step that writes (open, create, write, chmod, fsync, rename) and fail at
the k-th, for every k of a clean run.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from attnfuse import files
from attnfuse.runstate import LAST, load_state
from clikit import (
    RUN_FILES,
    TINY,
    assert_complete_run,
    assert_evaluate_agrees,
    assert_one_line,
    cli,
    entries,
    ok,
    snapshot,
    strict_loads,
    write_npz,
)

OS_STEPS = ("open", "fdopen", "write", "ftruncate", "chmod", "fsync", "replace", "rename")
TEMPFILE_STEPS = ("mkstemp", "mkdtemp", "TemporaryFile")


class Faults:
    """Counts the write steps of attnfuse.files and raises ``error(step)`` at the ``fail_at``-th."""

    def __init__(self, fail_at: int | None = None, error: Callable[[str], BaseException] | None = None) -> None:
        self.fail_at, self.error, self.steps = fail_at, error, []

    def step(self, name: str) -> None:
        self.steps.append(name)
        if len(self.steps) == self.fail_at:
            raise self.error(name)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> Faults:
        monkeypatch.setattr(files, "os", _Proxy(os, OS_STEPS, self))
        monkeypatch.setattr(files, "tempfile", _Proxy(tempfile, TEMPFILE_STEPS, self))
        exchange = files._exchange

        def stepped_exchange(a, b):
            self.step("renameat2")
            return exchange(a, b)

        monkeypatch.setattr(files, "_exchange", stepped_exchange)
        return self


class _Proxy:
    def __init__(self, module, steps: tuple[str, ...], faults: Faults) -> None:
        self._module, self._steps, self._faults = module, steps, faults

    def __getattr__(self, name: str):
        attr = getattr(self._module, name)
        if name not in self._steps:
            return attr

        def stepped(*args, **kwargs):
            self._faults.step(name)
            result = attr(*args, **kwargs)
            return _File(result, self._faults) if name == "fdopen" else result

        return stepped


class _File:
    """A file object whose writes are steps."""

    def __init__(self, f, faults: Faults) -> None:
        self._f, self._faults = f, faults

    def write(self, data):
        self._faults.step("write")
        return self._f.write(data)

    def __getattr__(self, name: str):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)


def crash(step: str) -> BaseException:
    return KeyboardInterrupt()  # what a signal raises at that moment


def disk_full(step: str) -> BaseException:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


ERRORS = {"crash": (crash, 130, "interrupted"), "disk-full": (disk_full, 2, "no space left on device: ")}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict:
    """Data, an old run (seed 1) and what a clean new run (seed 0) writes, with its step count."""
    root = tmp_path_factory.mktemp("faults")
    data = write_npz(root / "toy.npz")
    old = root / "old"
    ok(cli("train", "--data", data, *TINY, "--seed", "1", "--out", old))
    new = root / "new"
    shutil.copytree(old, new)  # replacing a run, as in the tests
    with pytest.MonkeyPatch.context() as m:
        faults = Faults().install(m)
        ok(cli("train", "--data", data, *TINY, "--seed", "0", "--out", new))
    assert_complete_run(old)
    assert_complete_run(new)
    assert_evaluate_agrees(old, data, root)
    assert_evaluate_agrees(new, data, root)
    before_swap = faults.steps[: faults.steps.index("renameat2")]
    return {
        "root": root,
        "data": data,
        "old": snapshot(old),
        "new": snapshot(new),
        "train_steps": len(faults.steps),
        "fsyncs_before_swap": before_swap.count("fsync"),
    }


def state_of(out: Path, base: dict) -> str:
    """ "absent", "old" or "new": anything else fails."""
    if not out.exists():
        return "absent"
    assert_complete_run(out)
    now = snapshot(out)
    assert now in (base["old"], base["new"]), "a complete run, but neither the old one nor the new one"
    return "old" if now == base["old"] else "new"


def fresh_old_run(base: dict, where: Path) -> Path:
    where.mkdir()
    out = where / "run"
    out.mkdir()
    for name, content in base["old"].items():
        (out / name).write_bytes(content)
    return out


@pytest.mark.parametrize("kind", list(ERRORS))
def test_train_fault_at_every_write_step(base, tmp_path, monkeypatch, kind):
    error, code, needle = ERRORS[kind]
    assert base["train_steps"] > 20  # every file's create, write, chmod, fsync, rename; the swap
    outcomes = []
    for k in range(1, base["train_steps"] + 1):
        out = fresh_old_run(base, tmp_path / f"k{k}")
        with monkeypatch.context() as m:
            faults = Faults(k, error).install(m)
            result = cli("train", "--data", base["data"], *TINY, "--seed", "0", "--out", out)
        assert_one_line(result, code, needle)
        outcomes.append((faults.steps[-1], state_of(out, base)))
        assert entries(out.parent) == ["run"], f"step {k} ({faults.steps[-1]}): debris {entries(out.parent)}"
        shutil.rmtree(out.parent)
    # The old run up to the swap (included: a failed rename changes nothing), the new one after it.
    swap = [step for step, _ in outcomes].index("renameat2") + 1
    assert [state for _, state in outcomes] == ["old"] * swap + ["new"] * (len(outcomes) - swap)


def test_train_into_a_new_directory_fault_at_every_step_leaves_nothing(base, tmp_path, monkeypatch):
    for k in range(1, base["train_steps"] + 1):
        out = tmp_path / f"k{k}" / "deeper" / "run"
        with monkeypatch.context() as m:
            Faults(k, disk_full).install(m)
            result = cli("train", "--data", base["data"], *TINY, "--seed", "0", "--out", out)
        assert_one_line(result, 2, "no space left on device")
        if out.exists() and entries(out) == [LAST]:  # failed after a checkpoint: resumable, and said so
            load_state(out / LAST)
            assert f"attnfuse train --resume {out} continues" in " ".join(result.stdout.split())
        elif out.exists():  # the failure came after the rename into place
            assert state_of(out, base) == "new"
        else:
            assert not (tmp_path / f"k{k}").exists(), f"step {k}: parents created for nothing"


@pytest.mark.parametrize("kind", list(ERRORS))
def test_evaluate_fault_at_every_write_step(base, tmp_path, monkeypatch, kind):
    error, code, needle = ERRORS[kind]
    model = fresh_old_run(base, tmp_path / "model")
    target = model / "evaluation.json"
    ok(cli("evaluate", "--model", model, "--data", base["data"]))
    complete = target.read_text()
    target.unlink()
    with monkeypatch.context() as m:
        faults = Faults().install(m)
        ok(cli("evaluate", "--model", model, "--data", base["data"]))
    target.unlink()
    for k in range(1, len(faults.steps) + 1):
        if k % 2:
            target.unlink(missing_ok=True)  # alternately: no previous report, and the previous one
        before = target.read_text() if target.exists() else None
        with monkeypatch.context() as m:
            Faults(k, error).install(m)
            result = cli("evaluate", "--model", model, "--data", base["data"])
        assert_one_line(result, code, needle)
        if kind == "disk-full":  # the metrics are shown although they could not be written
            assert "accuracy" in result.stdout and "could not be written" in result.stderr
        after = target.read_text() if target.exists() else None
        assert after in (before, complete), f"step {k}: a partial evaluation.json"
        assert entries(model) in (RUN_FILES, sorted([*RUN_FILES, "evaluation.json"])), entries(model)
        assert snapshot(model).items() >= base["old"].items()  # the model itself untouched


@pytest.mark.parametrize("kind", list(ERRORS))
def test_predict_fault_at_every_write_step(base, tmp_path, monkeypatch, kind):
    error, code, needle = ERRORS[kind]
    model = fresh_old_run(base, tmp_path / "model")
    target = tmp_path / "out" / "pred.csv"
    with monkeypatch.context() as m:
        faults = Faults().install(m)
        ok(cli("predict", "--model", model, "--data", base["data"], "--out", target))
    complete = target.read_text()
    shutil.rmtree(target.parent)
    for k in range(1, len(faults.steps) + 1):
        with monkeypatch.context() as m:
            Faults(k, error).install(m)
            result = cli("predict", "--model", model, "--data", base["data"], "--out", target)
        assert_one_line(result, code, needle)
        assert not target.exists() or target.read_text() == complete, f"step {k}: a partial CSV"
        assert not target.parent.exists() or entries(target.parent) == ["pred.csv"]
        shutil.rmtree(target.parent, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# A real small file system (needs root to mount; skipped elsewhere)


def test_train_on_a_full_file_system(base, tiny_filesystem):
    out = tiny_filesystem / "run"
    result = cli("train", "--data", base["data"], *TINY, "--out", out)
    assert_one_line(result, 2, f"no space left on device: {out}")
    assert entries(tiny_filesystem) == []


# ---------------------------------------------------------------------------------------------
# Real signals to a real `attnfuse train` process

# Runs the CLI with attnfuse.files.os.fsync pausing at its PAUSE_AT-th call (after writing a
# file's bytes, so that a full-size temporary exists), announcing the pause in PAUSE_MARKER.
PAUSING_CLI = r"""
import os, sys, time
from pathlib import Path
import attnfuse.files as files
from attnfuse.cli import main

pause_at, marker, calls = int(os.environ["PAUSE_AT"]), Path(os.environ["PAUSE_MARKER"]), [0]

class OS:
    def __getattr__(self, name):
        return fsync if name == "fsync" else getattr(os, name)

def fsync(fd):
    calls[0] += 1
    if calls[0] == pause_at:
        marker.write_text(str(os.getpid()))
        time.sleep(120)
    os.fsync(fd)

files.os = OS()
sys.argv = ["attnfuse", *sys.argv[1:]]
main()
"""


def start(args: list, tmp: Path, pause_at: int | None = None) -> tuple[subprocess.Popen, Path]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "PAUSE_MARKER": str(tmp / "paused")}
    if pause_at is None:
        command = [sys.executable, "-m", "attnfuse"]
    else:
        command = [sys.executable, "-c", PAUSING_CLI]
        env["PAUSE_AT"] = str(pause_at)
    proc = subprocess.Popen(
        [*command, *map(str, args)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    return proc, tmp / "paused"


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"exited {proc.returncode} before pausing: {proc.communicate()}"
        assert time.monotonic() < end, "the process never paused"
        time.sleep(0.05)


def test_concurrent_train_fails_fast_and_sigterm_rolls_back(base, tmp_path):
    out = fresh_old_run(base, tmp_path / "a")
    args = ["train", "--data", base["data"], *TINY, "--seed", "0", "--out", out]
    first, paused = start(args, tmp_path, pause_at=1)  # holds the lock, a file half-way written
    try:
        wait_for(paused, first)
        second = cli(*args)
        assert first.poll() is None  # the second did not wait for the first
        assert_one_line(second, 2, rf"process {first.pid} is writing it", r"\.run\.lock")
        first.send_signal(signal.SIGTERM)
        _, stderr = first.communicate(timeout=60)
    finally:
        first.kill()
    assert first.returncode == 143, stderr
    assert stderr.strip().splitlines()[-1] == "error: terminated (SIGTERM)" and "Traceback" not in stderr
    assert state_of(out, base) == "old" and entries(out.parent) == ["run"]  # rolled back, no debris


def test_sigkill_while_writing_and_at_random_moments(base, tmp_path):
    """SIGKILL at a random fsync of the write (a file's bytes are written: a full-size temporary
    exists) and at a random moment: the old run stays, or the new one is complete; the debris a
    kill leaves is removed by the next run into the same place. (Two processes side by side: their
    start-up, importing torch, dominates; the in-process tests above cover every step.)"""
    rng = random.Random(0)
    pauses = [rng.randint(1, base["fsyncs_before_swap"]), None]
    runs = []
    for i, pause_at in enumerate(pauses):
        out = fresh_old_run(base, tmp_path / f"a{i}")
        (tmp_path / f"m{i}").mkdir()
        args = ["train", "--data", base["data"], *TINY, "--seed", "0", "--out", out]
        runs.append((*start(args, tmp_path / f"m{i}", pause_at), out, pause_at))
    try:
        for proc, paused, _, pause_at in runs:
            if pause_at is None:
                time.sleep(rng.uniform(0.0, 8.0))
            else:
                wait_for(paused, proc)
            proc.kill()
            proc.communicate(timeout=60)
    finally:
        for proc, *_ in runs:
            proc.kill()
    for _, _, out, pause_at in runs:
        assert state_of(out, base) == "old" if pause_at is not None else state_of(out, base) in ("old", "new")
        if pause_at is not None:  # killed during the write: a full-size temporary was left
            assert any(n.startswith(".run.") and n.endswith(".tmp") for n in entries(out.parent)), pause_at
        ok(cli("train", "--data", base["data"], *TINY, "--seed", "0", "--out", out))  # the next run
        assert state_of(out, base) == "new" and entries(out.parent) == ["run"]
    assert_evaluate_agrees(runs[0][2], base["data"], tmp_path)


def test_sigkill_while_writing_evaluation_json(base, tmp_path):
    model = fresh_old_run(base, tmp_path / "a")
    proc, paused = start(["evaluate", "--model", model, "--data", base["data"]], tmp_path, pause_at=1)
    try:
        wait_for(paused, proc)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    debris = [n for n in entries(model) if n.startswith(".evaluation.json.")]
    assert len(debris) == 1 and (model / debris[0]).stat().st_size > 0  # a full-size temporary
    ok(cli("evaluate", "--model", model, "--data", base["data"]))
    assert entries(model) == sorted([*RUN_FILES, "evaluation.json"])
    strict_loads((model / "evaluation.json").read_text())


# Ctrl-C and SIGTERM at every moment of start-up: tests/test_signals.py
