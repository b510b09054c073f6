"""A bagged run's models trained side by side in worker processes (attnfuse.workers): the same
models, events and checkpoints as one after another; a kill, a signal, a dead worker."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch

from attnfuse import fit as fit_module
from attnfuse.distributed import Dist
from attnfuse.fit import workers_for
from attnfuse.pipeline import TrainSpec, train
from attnfuse.workers import FORK
from test_resume import AUTO, attnfuse, finish, kill_at_random, same_run, stop_with, wait_for_epochs, write_data

pytestmark = pytest.mark.skipif(not FORK, reason="side by side only where processes are forked (Linux)")

SMALL = {"d_model": 8, "nhead": 2, "num_layers": 1, "epochs": 4, "patience": 4, "batch_size": 16}


def test_side_by_side_trains_what_one_after_another_trains(tmp_path, monkeypatch):
    """At one thread each model is a function of its seed and rows: the workers' models, the
    progress events in their order, metrics.json and the saved weights are bit for bit those of the
    same request trained one after another."""
    data = write_data(tmp_path / "d.npz", n=200)
    pools, real = [], fit_module.SideBySide

    def spy(*args):
        pools.append(real(*args))
        return pools[-1]

    monkeypatch.setattr(fit_module, "SideBySide", spy)
    results = {}
    for threads in (1, 2):
        events = []
        options = {"data": str(data), **SMALL, "bags": 3, "ensemble": 2, "repeat": 2, "threads": threads}
        spec = TrainSpec.from_options(options)  # two runs: one pool, the second run's jobs queued after the first's
        result = train(
            spec, tmp_path / f"t{threads}", progress=lambda e, info, seen=events: seen.append((e, _plain(info)))
        )
        results[threads] = result, events
    assert len(pools) == 1 and pools[0].workers == 2  # threads 2: two workers; threads 1: none
    (one, one_events), (two, two_events) = results[1], results[2]
    assert [e for e in two_events if e[0] != "data"] == [e for e in one_events if e[0] != "data"]
    assert two.report == one.report
    same_run(tmp_path / "t2", tmp_path / "t1")


def _plain(info: dict) -> dict:
    return {k: v for k, v in info.items() if k not in ("data", "selection")}


def test_the_rule_of_side_by_side():
    """Side by side: bagged, on the CPU, in one process, with two threads or more."""
    cpu, one = torch.device("cpu"), Dist()
    assert workers_for(4, cpu, one, bags=3) == 4
    assert workers_for(None, cpu, one, bags=3) == torch.get_num_threads()
    assert workers_for(4, cpu, one, bags=0) == 1  # unbagged: one model at a time, every thread
    assert workers_for(4, torch.device("cuda"), one, bags=3) == 1
    assert workers_for(4, cpu, Dist(rank=0, world=2), bags=3) == 1


SIDE = [*AUTO, "--threads", "2"]


def _processes_of(out: Path) -> list[int]:
    """The processes whose command line names ``out`` (the command and its forked workers)."""
    found = []
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and str(out).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
        except OSError:
            continue
    return found


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("side")
    data = write_data(tmp / "d.npz")
    out = tmp / "uninterrupted"
    code, _, err = finish(attnfuse("train", "--data", data, *SIDE, "--out", out))
    assert code == 0, err
    return data, out


def test_sigkill_side_by_side_then_resume_is_bitwise_the_same_and_leaves_no_worker(uninterrupted, tmp_path):
    """A checkpoint is one position of the loops (the model they wait on): a run killed while its
    workers train resumes from it, trains the models after it again and ends bit for bit as the
    uninterrupted run. The workers end with the command."""
    data, expected = uninterrupted
    out = tmp_path / "killed"
    proc = attnfuse("train", "--data", data, *SIDE, "--out", out)
    kill_at_random(out, proc, 5, 16)
    end = time.time() + 30
    while _processes_of(out) and time.time() < end:
        time.sleep(0.1)
    assert not _processes_of(out), "a worker outlived the command"
    code, _, err = finish(attnfuse("train", "--resume", out))
    assert code == 0, err
    same_run(out, expected)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_the_workers_writes_last_and_resumes_bitwise(uninterrupted, tmp_path, sig, code):
    data, expected = uninterrupted
    out = tmp_path / "stopped"
    proc = attnfuse("train", "--data", data, *SIDE, "--out", out)
    stop_with(out, proc, sig, code)
    assert not _processes_of(out)
    returncode, _, err = finish(attnfuse("train", "--resume", out))
    assert returncode == 0, err
    same_run(out, expected)


def test_a_worker_that_dies_fails_the_run_in_one_line(tmp_path):
    """A worker killed (say, by the kernel out of memory) ends the command with one line and an
    exit code, not a hang or a traceback."""
    data = write_data(tmp_path / "d.npz")
    out = tmp_path / "m"
    proc = attnfuse("train", "--data", data, *SIDE, "--out", out)
    wait_for_epochs(out, proc, 2)
    workers = [pid for pid in _processes_of(out) if pid != proc.pid]
    assert workers, "no worker process found"
    os.kill(workers[0], signal.SIGKILL)
    returncode, _, err = finish(proc, timeout=120)
    assert returncode != 0
    assert "Traceback" not in err and "worker" in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not (out / "config.json").exists() and not (out / "metrics.json").exists()
    assert not _processes_of(out), "a worker outlived the command"
