"""Surviving a crash: checkpoints in OUT/last/, bitwise resume after SIGKILL, SIGINT/SIGTERM at a
step boundary, the epoch log; mixed precision and compilation on the one training path."""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from attnfuse.data import MultimodalDataset, make_planted
from attnfuse.pipeline import TrainSpec, train
from attnfuse.runstate import load_state
from attnfuse.training import Control, TrainConfig, Trainer
from trainkit import train_one

# A run long enough to be killed in the middle: many small steps of a tiny model.
LONG = ["--fusion", "self", "--d-model", "8", "--heads", "2", "--layers", "1", "--batch-size", "8"]
EPOCHS = "6"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # same threads: same floats


def write_data(path: Path, n: int = 160, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    np.savez(
        path,
        x_a=(rng.normal(size=(n, 4)) + y[:, None]).astype(np.float32),
        x_b=(rng.normal(size=(n, 3, 2)) + 0.3 * y[:, None, None]).astype(np.float32),
        y=y,
    )
    return path


def attnfuse(*args, **kw) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "attnfuse", *map(str, args)]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def wait_for_epochs(out: Path, proc: subprocess.Popen, epochs: int, timeout: float = 120) -> None:
    """Until the run in ``out`` has logged ``epochs`` epochs (and so checkpointed at least once)."""
    log, end = out / "last" / "log.csv", time.time() + timeout
    while not log.exists() or len(log.read_text().splitlines()) - 1 < epochs:
        assert proc.poll() is None, f"exited early: {proc.communicate()}"
        assert time.time() < end, f"{epochs} epochs never logged"
        time.sleep(0.01)


def kill_at_random(out: Path, proc: subprocess.Popen, low: int, high: int) -> None:
    """SIGKILL the run in ``out`` once it has logged a random number of epochs in [low, high], and
    anywhere inside an epoch or a checkpoint write; it must not have finished."""
    rng = random.Random(os.getpid())
    wait_for_epochs(out, proc, rng.randint(low, high))
    time.sleep(rng.uniform(0.0, 0.05))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "config.json").exists(), "the run finished before the kill: make it longer"


def stop_with(out: Path, proc: subprocess.Popen, sig: int, code: int) -> None:
    """Send ``sig`` to the run in ``out`` after its second epoch: it exits with ``code`` and one line
    naming ``--resume``, no traceback, and has checkpointed past its start."""
    wait_for_epochs(out, proc, 2)
    proc.send_signal(sig)
    returncode, _, err = finish(proc)
    assert returncode == code, err
    assert "Traceback" not in err and f"attnfuse train --resume {out}" in err
    assert len(err.strip().splitlines()) == 1, err
    _, meta = load_state(out / "last")
    assert meta["step"] > 0 or meta["epoch"] > 0


def same_run(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert json.loads((a / "metrics.json").read_text()) == json.loads((b / "metrics.json").read_text())
    assert (a / "log.csv").read_text() == (b / "log.csv").read_text()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run every resumed run must equal, bit for bit."""
    tmp = tmp_path_factory.mktemp("resume")
    data = write_data(tmp / "d.npz")
    out = tmp / "uninterrupted"
    code, _, err = finish(attnfuse("train", "--data", data, *LONG, "--epochs", EPOCHS, "--repeat", "2", "--out", out))
    assert code == 0, err
    return data, out


def test_sigkill_at_a_random_moment_then_resume_is_bitwise_the_same(reference, tmp_path):
    data, expected = reference
    out = tmp_path / "killed"
    proc = attnfuse("train", "--data", data, *LONG, "--epochs", EPOCHS, "--repeat", "2", "--out", out)
    # In the second seed's run (the first's finished model then lives in the checkpoint too; the
    # signal tests below stop the first), after a random number of its epochs.
    kill_at_random(out, proc, int(EPOCHS), 2 * int(EPOCHS) - 2)
    assert (out / "last" / "state" / "trainer.json").is_file()
    code, _, err = finish(attnfuse("train", "--resume", out))
    assert code == 0, err
    assert not (out / "last").exists()  # the finished run's checkpoints are gone
    same_run(out, expected)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_at_a_step_writes_last_and_resumes_bitwise(reference, tmp_path, sig, code):
    data, expected = reference
    out = tmp_path / "stopped"
    proc = attnfuse("train", "--data", data, *LONG, "--epochs", EPOCHS, "--repeat", "2", "--out", out)
    stop_with(out, proc, sig, code)
    returncode, _, err = finish(attnfuse("train", "--resume", out))
    assert returncode == 0, err
    same_run(out, expected)


# --fusion auto with an ensemble: 4 candidates (the data has a sequence modality) x 2 members, in 2 bags.
AUTO = ["--fusion", "auto", "--ensemble", "2", "--bags", "2", "--d-model", "8", "--heads", "2", "--layers", "1",
        "--batch-size", "8", "--epochs", "3"]  # fmt: skip


def test_sigkill_inside_auto_with_halved_validation_then_resume_is_bitwise_the_same(tmp_path):
    """Unbagged auto on enough rows: the candidates early-stop on one half of the validation rows
    and the ensemble is weighed on the other; a run killed between candidates resumes on the same
    halves and ends bit for bit as the uninterrupted one."""
    data = write_data(tmp_path / "d.npz", n=700)  # 105 validation rows: halved
    halved = [*AUTO[:2], "--bags", "0", *AUTO[6:]]  # no ensemble, no bags
    expected = tmp_path / "uninterrupted"
    code, _, err = finish(attnfuse("train", "--data", data, *halved, "--out", expected))
    assert code == 0, err
    assert json.loads((expected / "metrics.json").read_text())["weighted"]["fitted_on"] == "held-out validation"
    out = tmp_path / "killed"
    proc = attnfuse("train", "--data", data, *halved, "--out", out)
    kill_at_random(out, proc, 4, 9)  # the second candidate or later
    code, _, err = finish(attnfuse("train", "--resume", out))
    assert code == 0, err
    same_run(out, expected)


def test_sigkill_inside_auto_with_an_ensemble_then_resume_is_bitwise_the_same(tmp_path):
    """A checkpoint says which candidate and member (of which bag) was training and keeps the models
    trained before it: a resumed run retrains none of them and ends bit for bit as the uninterrupted
    one, its weighted ensemble too."""
    data = write_data(tmp_path / "d.npz")
    expected = tmp_path / "uninterrupted"
    code, _, err = finish(attnfuse("train", "--data", data, *AUTO, "--out", expected))
    assert code == 0, err
    # 4 candidates x 2 members x 2 bags (auto bags small data) x 3 epochs
    assert len((expected / "log.csv").read_text().splitlines()) - 1 == 4 * 2 * 2 * 3
    out = tmp_path / "killed"
    proc = attnfuse("train", "--data", data, *AUTO, "--out", out)
    # Row 5 of log.csv is written after epoch 4 was checkpointed: the first epoch of the second model.
    kill_at_random(out, proc, 5, 16)
    _, meta = load_state(out / "last")
    position = (meta["candidate"], meta["member"])
    assert position != (0, 0) and (meta["candidates"] or meta["members"]), position  # finished models are kept
    code, _, err = finish(attnfuse("train", "--resume", out))
    assert code == 0, err
    same_run(out, expected)
    config = json.loads((out / "config.json").read_text())
    assert config["auto"] == json.loads((expected / "config.json").read_text())["auto"]


def test_resume_refuses_other_settings_and_missing_state(reference, tmp_path):
    data, _ = reference
    out = tmp_path / "run"
    proc = attnfuse("train", "--data", data, *LONG, "--epochs", "50", "--out", out)
    wait_for_epochs(out, proc, 1)
    proc.send_signal(signal.SIGINT)
    finish(proc)
    code, _, err = finish(attnfuse("train", "--resume", out, "--lr", "0.1"))
    assert code == 2 and "resume: lr 0.1 conflicts with the run's 0.001" in err
    code, _, err = finish(attnfuse("train", "--resume", tmp_path / "nothing"))
    assert code == 2 and "has no run in progress" in err and "Traceback" not in err


def test_trainer_state_round_trip_continues_identically():
    """In process: stop after 7 steps, restore into a fresh trainer, and continue: the same
    weights, history and optimizer state as a trainer that never stopped."""
    data = MultimodalDataset(
        {"a": np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32)}, np.arange(64) % 2
    ).to_batch()
    cfg = TrainConfig(epochs=3, batch_size=16, seed=4)

    def fresh() -> Trainer:
        torch.manual_seed(cfg.seed)
        from attnfuse.fusion import build_model

        model = build_model("self", {"modalities": [{"name": "a", "dim": 3, "length": 1, "is_sequence": False}],
                                     "out_dim": 2, "d_model": 8, "nhead": 2, "num_layers": 1})  # fmt: skip
        return Trainer(model, "classification", cfg)

    whole = fresh()
    whole.fit(data, data)
    steps = []
    stopped = fresh()
    with pytest.raises(Exception, match="interrupted at epoch 2, step 3"):
        stopped.fit(data, data, control=Control(stop=lambda: len(steps) >= 7 or steps.append(1) or 0,
                                                checkpoint=lambda t: steps.append(t.state_dict())))  # fmt: skip
    tensors, meta = steps[-1]
    torch.manual_seed(123)  # the global RNG is restored from the state, whatever it is now
    resumed = fresh()
    resumed.load_state_dict(tensors, meta)
    resumed.fit(data, data)
    assert resumed.history == whole.history
    for k, v in whole.net.state_dict().items():
        assert torch.equal(v, resumed.net.state_dict()[k]), k


def test_log_csv_has_one_row_per_epoch(tmp_path):
    data = write_data(tmp_path / "d.npz", n=90)
    spec = TrainSpec.from_options({"data": str(data), "fusion": "concat", "d_model": 8, "epochs": 3, "repeat": 2})
    result = train(spec, out=tmp_path / "m")
    with open(tmp_path / "m" / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["run"]), int(r["epoch"])) for r in rows] == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3)]
    assert {r["valid_metric"] for r in rows} == {"accuracy"}
    assert [float(r["train_loss"]) for r in rows[:3]] == [h["train_loss"] for h in result.first.history]


def test_tensorboard_without_the_package_is_a_clear_error(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    data = write_data(tmp_path / "d.npz", n=60)
    spec = TrainSpec.from_options({"data": str(data), "fusion": "concat", "epochs": 1, "tensorboard": True})
    with pytest.raises(ValueError, match="tensorboard: the tensorboard package is not installed"):
        train(spec, out=tmp_path / "m")


# ---------------------------------------------------------------------------------------------
# Mixed precision and compilation


def test_bf16_stays_close_to_fp32_on_the_planted_task():
    """bf16 autocast (CPU) against float32, same seed and split: test R² within 0.05."""
    data = make_planted(n=600, seed=0)
    small = {"d_model": 32, "nhead": 4, "num_layers": 1, "dropout": 0.0}
    r2 = {
        p: train_one(data, "cross", small, TrainConfig(epochs=40, batch_size=32, lr=3e-3, precision=p)).metrics["test"][
            "r2"
        ]
        for p in ("32", "bf16")
    }
    assert r2["32"] > 0.8, r2
    assert abs(r2["bf16"] - r2["32"]) < 0.05, r2


def test_compile_wraps_the_model_that_trains(monkeypatch):
    compiled = []

    def spy(module, **kwargs):
        compiled.append(module)
        return module  # the wiring is what is tested; inductor itself takes minutes on this CPU

    monkeypatch.setattr(torch, "compile", spy)
    data = MultimodalDataset({"a": np.random.default_rng(0).normal(size=(40, 3)).astype(np.float32)}, np.arange(40) % 2)
    result = train_one(data, "concat", {"d_model": 8}, TrainConfig(epochs=1, compile=True))
    assert compiled == [result.model]
