"""The CPU thread count: the cores other processes leave free by default, OMP_NUM_THREADS when
set, --threads when given (checked like every option, recorded in run.yaml)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import yaml

from attnfuse import threads
from attnfuse.threads import busy_cores, default_threads, free_cores, set_threads
from attnfuse.training import TrainConfig
from clikit import assert_one_line, cli, ok, write_npz


@pytest.fixture(autouse=True)
def keep_torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("busy", "cores", "free"),
    [(0.0, 2, 2), (0.3, 2, 2), (1.0, 2, 1), (0.6, 2, 1), (1.9, 2, 1), (5.0, 2, 1), (2.2, 8, 6), (float("nan"), 4, 4)],
)
def test_free_cores_are_the_cores_less_the_busy_ones_at_least_one(busy, cores, free):
    assert free_cores(busy, cores) == free


def test_free_cores_fall_back_to_the_load_average_without_kernel_counters(monkeypatch):
    monkeypatch.setattr(threads, "busy_cores", lambda: None)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.0, 0.0, 0.0))
    assert free_cores(cores=2) == 1


def test_omp_num_threads_wins_over_the_free_cores(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "zero")
    monkeypatch.setattr(threads, "free_cores", lambda: 1)
    assert default_threads() == 1


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="the kernel's per-core counters are Linux's")
def test_a_busy_loop_in_another_process_is_seen_as_a_busy_core():
    loop = subprocess.Popen(
        [sys.executable, "-c", "import sys; print(flush=True); sys.stdout.close()\nwhile True: pass"],
        stdout=subprocess.PIPE,
    )
    try:
        loop.stdout.readline()  # it runs
        assert busy_cores(0.3) >= 0.5
    finally:
        loop.kill()
        loop.wait()


def test_set_threads_sets_torch_and_refuses_a_bad_count():
    assert set_threads(1) == 1 and torch.get_num_threads() == 1
    for bad in (0, -2):
        with pytest.raises(ValueError, match="threads: expected an integer >= 1"):
            set_threads(bad)
    for bad in (1.5, True):
        with pytest.raises(TypeError, match="threads: expected an integer, got"):
            set_threads(bad)


def test_threads_option_is_checked_by_the_train_config():
    assert TrainConfig(threads=2).threads == 2 and TrainConfig().threads is None
    with pytest.raises(ValueError, match=r"threads: expected an integer >= 1, got 0"):
        TrainConfig(threads=0)


def test_train_threads_sets_torch_and_is_recorded(tmp_path):
    out = tmp_path / "run"
    data = write_npz(tmp_path / "d.npz")
    ok(cli("train", "--data", data, "--fusion", "concat", "--epochs", "1", "--d-model", "8", "--threads", "1",
           "--out", out))  # fmt: skip
    assert torch.get_num_threads() == 1
    assert yaml.safe_load((out / "run.yaml").read_text())["threads"] == 1
    assert_one_line(cli("train", "--data", data, "--threads", "0", "--out", out), 2, "threads: expected an integer")


def test_run_yaml_records_the_thread_count_used(tmp_path):
    """The count is part of the run (float32 sums differ between counts): run.yaml records the one
    used, so --config run.yaml and --resume compute with it again."""
    import yaml

    from clikit import TINY, cli, ok, write_npz

    data = write_npz(tmp_path / "d.npz")
    ok(cli("train", "--data", data, *TINY, "--out", tmp_path / "a"))  # OMP_NUM_THREADS=1 (conftest)
    assert yaml.safe_load((tmp_path / "a" / "run.yaml").read_text())["threads"] == 1
    ok(cli("train", "--data", data, *TINY, "--threads", "2", "--out", tmp_path / "b"))
    assert yaml.safe_load((tmp_path / "b" / "run.yaml").read_text())["threads"] == 2
    torch.set_num_threads(1)  # as the suite runs
