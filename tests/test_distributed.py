"""Data-parallel training through the real launcher: `torchrun --nproc-per-node 2 -m attnfuse train`
on the CPU (gloo), against the same command in one process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from attnfuse.distributed import Dist

TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
# No dropout: 1 and 2 processes draw different dropout masks, everything else must agree.
ARGS = ["--fusion", "cross", "--d-model", "8", "--heads", "2", "--layers", "1", "--dropout", "0", "--batch-size", "16",
        "--epochs", "3", "--device", "cpu"]  # fmt: skip

pytestmark = pytest.mark.skipif(not Path(TORCHRUN).exists(), reason="torchrun is not installed")


def write_data(path: Path, n: int = 90) -> Path:
    rng = np.random.default_rng(0)
    y = np.arange(n) % 3
    np.savez(path, x_a=(rng.normal(size=(n, 4)) + y[:, None]).astype(np.float32),
             x_b=rng.normal(size=(n, 3, 2)).astype(np.float32), y=y)  # fmt: skip
    return path


def torchrun(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [TORCHRUN, "--standalone", "--nproc-per-node", "2", *map(str, args)]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)


def test_two_processes_follow_the_one_process_optimisation(tmp_path):
    data = write_data(tmp_path / "d.npz")
    one = subprocess.run([sys.executable, "-m", "attnfuse", "train", "--data", data, *ARGS, "--out", tmp_path / "one"],
                         env=ENV, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr
    two = torchrun("-m", "attnfuse", "train", "--data", data, *ARGS, "--out", tmp_path / "two")
    assert two.returncode == 0, two.stderr

    w1, w2 = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    for k in w1:
        a, b = w1[k], w2[k]
        if k.endswith("in_proj_bias"):
            # The key bias adds q·b_k to every score of a query: softmax cancels it, so its gradient
            # is 0 in exact arithmetic and float noise that Adam normalises to full-size steps.
            e = a.numel() // 3
            a, b = torch.cat([a[:e], a[2 * e :]]), torch.cat([b[:e], b[2 * e :]])
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=k)
    m1, m2 = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    for split in ("train", "valid", "test"):  # computed over all rows, gathered from both ranks
        assert m2[split] == pytest.approx(m1[split], abs=1e-6), split
    # Rank 0 alone prints and writes.
    assert two.stdout.count("written to") == 1 and two.stdout.count("(best epoch") == 1
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


@pytest.mark.parametrize(("rows", "bags", "fitted_on"), [(90, "2", "out-of-fold"), (700, "0", "held-out validation")])
def test_the_default_auto_trains_its_weighted_ensemble_under_torchrun(tmp_path, rows, bags, fitted_on):
    """--fusion auto (the default) under torchrun: bagged, or with the validation rows halved; one
    weighted ensemble written by rank 0, whose `evaluate` gives metrics.json's test numbers."""
    data = write_data(tmp_path / "d.npz", rows)
    small = ["--d-model", "8", "--heads", "2", "--layers", "1", "--batch-size", "32", "--epochs", "2",
             "--device", "cpu"]  # fmt: skip
    two = torchrun("-m", "attnfuse", "train", "--data", data, *small, "--bags", bags, "--out", tmp_path / "m")
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("written to") == 1 and two.stdout.count("auto: the model is a weighted ensemble") == 1
    metrics = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert metrics["weighted"]["fitted_on"] == fitted_on
    written = tmp_path / "evaluation.json"
    one = subprocess.run(
        [sys.executable, "-m", "attnfuse", "evaluate", "--model", tmp_path / "m", "--data", data, "--out", written],
        env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr
    evaluated = json.loads(written.read_text())
    for metric, value in metrics["test"].items():
        assert evaluated["test"][metric] == pytest.approx(value, rel=1e-5, abs=1e-6), metric


def test_a_failing_rank_takes_the_job_down_with_one_line(tmp_path):
    data = write_data(tmp_path / "d.npz")
    script = tmp_path / "fail_on_rank1.py"
    script.write_text(
        "import os\n"
        "import attnfuse.training as training\n"
        "if os.environ['RANK'] == '1':\n"
        "    def boom(self, *args, **kwargs):\n"
        "        raise ValueError('injected failure on rank 1')\n"
        "    training.Trainer._end_epoch = boom\n"
        "from attnfuse.cli import main\n"
        "main()\n"
    )
    result = torchrun(script, "train", "--data", data, *ARGS, "--out", tmp_path / "never", timeout=180)
    assert result.returncode != 0
    assert "error: injected failure on rank 1" in result.stderr
    # Rank 0 loses its peer inside a collective: one line from it too, no traceback (the report
    # that torchrun itself prints about the failed job is torchrun's).
    assert "[rank0]: Traceback" not in result.stderr and "[rank1]: Traceback" not in result.stderr
    assert not (tmp_path / "never" / "config.json").exists()


def test_shards_partition_a_batch_and_gather_restores_row_order():
    index = torch.arange(11)
    shards = [Dist(r, 3).shard(index) for r in range(3)]
    assert sorted(torch.cat(shards).tolist()) == list(range(11))
    assert Dist().shard(index) is index and not Dist().enabled
