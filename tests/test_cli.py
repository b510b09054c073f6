"""Tests for the ``attnfuse`` command line (train, evaluate, predict, datasets).

Most tests call the typer app in-process with ``CliRunner``; one goes through the installed
``attnfuse`` script in a real subprocess.
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import typer.main

from attnfuse.cli import app
from attnfuse.data import load_npz, make_split
from clikit import assert_one_line, cli, ok

# Small, fast models for every training run in this file.
FAST = ["--epochs", "2", "--d-model", "16", "--heads", "2", "--layers", "1", "--batch-size", "32"]
FAST_CONCAT = ["--epochs", "2", "--d-model", "16", "--batch-size", "32"]  # concat has no layers or heads
REPO = Path(__file__).resolve().parents[1]


def assert_clean_error(result, *needles: str) -> str:
    """Exit code 2, exactly one line on stderr naming the problem, no traceback."""
    return assert_one_line(result, 2, *needles)


def write_npz(
    path: Path, n: int = 90, num_classes: int = 3, seed: int = 0, b_dim: int = 2, split: bool = False, **arrays
) -> Path:
    """x_a (N, 4) vector, x_b (N, 3, b_dim) sequence with a step mask, integer labels y."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % num_classes
    out = {
        "x_a": (rng.normal(size=(n, 4)) + y[:, None]).astype(np.float32),
        "x_b": rng.normal(size=(n, 3, b_dim)).astype(np.float32),
        "mask_b": np.arange(3)[None, :] < rng.integers(1, 4, size=n)[:, None],
        "y": y,
    }
    if split:
        out["split"] = np.array(["train", "valid", "test"])[np.arange(n) % 5 % 3]
    out.update(arrays)
    out = {k: v for k, v in out.items() if v is not None}
    np.savez(path, **out)
    return path


def read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def npz(workdir) -> Path:
    return write_npz(workdir / "toy.npz")


@pytest.fixture(scope="module")
def model_dir(workdir, npz) -> Path:
    out = workdir / "model"
    ok(cli("train", "--data", npz, "--fusion", "cross", *FAST, "--out", out))
    return out


# ---------------------------------------------------------------------------------------------
# train / evaluate / predict on an .npz


def test_train_writes_model_config_and_metrics(model_dir, npz):
    assert sorted(p.name for p in model_dir.iterdir()) == [
        "config.json",
        "log.csv",
        "metrics.json",
        "model.safetensors",
        "run.yaml",
    ]
    config = json.loads((model_dir / "config.json").read_text())
    assert config["fusion"] == "cross" and config["data"]["name"] == "toy" and config["data"]["n"] == 90
    assert config["model"]["d_model"] == 16 and config["model"]["nhead"] == 2 and config["model"]["num_layers"] == 1
    assert config["train"]["epochs"] == 2 and config["train"]["batch_size"] == 32
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert set(metrics) == {"train", "valid", "test", "baselines", "calibration"}
    assert set(metrics["test"]) == {"accuracy", "f1_macro"}
    for path in model_dir.iterdir():  # safetensors and JSON only: nothing is a pickle or a torch.save zip
        head = path.read_bytes()[:2]
        assert not head.startswith(b"\x80") and head != b"PK", path.name


def test_evaluate_reproduces_the_training_metrics(model_dir, npz, workdir):
    out = workdir / "eval.json"
    ok(cli("evaluate", "--model", model_dir, "--data", npz, "--out", out))
    report = json.loads(out.read_text())
    trained = json.loads((model_dir / "metrics.json").read_text())
    # No split column: the training split is recomputed from the saved split seed.
    assert set(report) == {"train", "valid", "test", "all", "calibration"}
    for split in ("train", "valid", "test"):
        assert report[split] == pytest.approx(trained[split], rel=1e-6), split
    # Without --out the report goes into the model directory.
    try:
        ok(cli("evaluate", "--model", model_dir, "--data", npz))
        assert json.loads((model_dir / "evaluation.json").read_text()) == report
    finally:
        (model_dir / "evaluation.json").unlink(missing_ok=True)


def test_predict_writes_one_row_per_sample(model_dir, npz, workdir):
    out = workdir / "pred.csv"
    ok(cli("predict", "--model", model_dir, "--data", npz, "--out", out))
    header, rows = read_csv(out)
    # The training data has no split column: the split drawn in training is written.
    assert header == ["index", "split", "y_true", "y_pred", "prob_0", "prob_1", "prob_2"]
    assert len(rows) == 90
    assert [int(r[0]) for r in rows] == list(range(90))
    config = json.loads((model_dir / "config.json").read_text())
    parts = dict(make_split(load_npz(npz), config["split"]["seed"]))
    for name, rows_of_split in parts.items():
        assert {rows[i][1] for i in rows_of_split} == {name}
    y = np.load(npz)["y"]
    np.testing.assert_array_equal([int(r[2]) for r in rows], y)
    probs = np.array([[float(v) for v in r[4:]] for r in rows])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    np.testing.assert_array_equal([int(r[3]) for r in rows], probs.argmax(axis=1))
    # The predictions are the ones evaluate scores.
    ok(cli("evaluate", "--model", model_dir, "--data", npz, "--out", workdir / "eval2.json"))
    acc = json.loads((workdir / "eval2.json").read_text())["all"]["accuracy"]
    assert acc == pytest.approx(np.mean(probs.argmax(axis=1) == y))


def test_split_column_is_used_in_train_evaluate_and_predict(workdir):
    data = write_npz(workdir / "withsplit.npz", split=True)
    out = workdir / "model-split"
    ok(cli("train", "--data", data, "--fusion", "self", *FAST, "--out", out))
    trained = json.loads((out / "metrics.json").read_text())
    ok(cli("evaluate", "--model", out, "--data", data, "--out", workdir / "eval-split.json"))
    report = json.loads((workdir / "eval-split.json").read_text())
    for split in ("train", "valid", "test"):
        assert report[split] == pytest.approx(trained[split], rel=1e-6), split
    ok(cli("predict", "--model", out, "--data", data, "--out", workdir / "pred-split.csv"))
    header, rows = read_csv(workdir / "pred-split.csv")
    assert header[:4] == ["index", "split", "y_true", "y_pred"]
    assert [r[1] for r in rows] == list(np.load(data)["split"])
    test_rows = [r for r in rows if r[1] == "test"]
    acc = np.mean([r[2] == r[3] for r in test_rows])
    assert acc == pytest.approx(trained["test"]["accuracy"])


def test_regression_with_k_targets_predict_columns(workdir):
    rng = np.random.default_rng(0)
    path = workdir / "reg.npz"
    a = rng.normal(size=(60, 3)).astype(np.float32)
    np.savez(path, x_a=a, x_c=rng.normal(size=(60, 2)).astype(np.float32), y=(a[:, :2] * 2).astype(np.float32))
    out = workdir / "model-reg"
    ok(cli("train", "--data", path, "--fusion", "concat", "--loss", "mse", *FAST_CONCAT, "--out", out))
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["test"]) == {"mae", "rmse", "r2", "corr"}
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["loss"] == "mse" and config["model"]["out_dim"] == 2
    ok(cli("predict", "--model", out, "--data", path, "--out", workdir / "reg.csv"))
    header, rows = read_csv(workdir / "reg.csv")
    assert header == ["index", "split", "y_true_0", "y_true_1", "y_pred_0", "y_pred_1"]
    assert len(rows) == 60


def test_train_on_synthetic_with_a_seed_then_evaluate(workdir):
    out = workdir / "model-synth"
    ok(
        cli(
            "train",
            "--data",
            "synthetic-classification",
            "--fusion",
            "concat",
            "--seed",
            "3",
            "--epochs",
            "1",
            "--d-model",
            "8",
            "--out",
            out,
        )
    )
    trained = json.loads((out / "metrics.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert config["data"]["name"] == "synthetic-classification" and config["data"]["num_classes"] == 4
    # evaluate regenerates the same data (seed 3, not a fresh draw) and recomputes the same split.
    ok(cli("evaluate", "--model", out, "--data", "synthetic-classification", "--out", workdir / "eval-synth.json"))
    report = json.loads((workdir / "eval-synth.json").read_text())
    for split in ("train", "valid", "test"):
        assert report[split] == pytest.approx(trained[split], rel=1e-6), split
    ok(cli("predict", "--model", out, "--data", "synthetic-classification", "--out", workdir / "synth.csv"))
    header, rows = read_csv(workdir / "synth.csv")
    assert len(rows) == 2000 and header[-4:] == ["prob_0", "prob_1", "prob_2", "prob_3"]
    assert np.mean([r[2] == r[3] for r in rows]) == pytest.approx(report["all"]["accuracy"])


def test_repeat_writes_runs_and_summary(workdir, npz):
    out = workdir / "model-repeat"
    ok(cli("train", "--data", npz, "--fusion", "concat", "--repeat", "2", "--seed", "4", *FAST_CONCAT, "--out", out))
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"runs", "summary", "baselines", "calibration"}
    runs = metrics["runs"]
    assert [r["seed"] for r in runs] == [4, 5]
    assert all(1 <= r["best_epoch"] <= 2 for r in runs)
    for split in ("train", "valid", "test"):
        for name, stats in metrics["summary"][split].items():
            values = np.array([r[split][name] for r in runs])
            assert stats["mean"] == pytest.approx(values.mean())
            assert stats["std"] == pytest.approx(values.std(ddof=1))
    # The saved model is the first run's: evaluate reproduces run 0.
    ok(cli("evaluate", "--model", out, "--data", npz, "--out", workdir / "eval-repeat.json"))
    report = json.loads((workdir / "eval-repeat.json").read_text())
    assert report["test"] == pytest.approx(runs[0]["test"], rel=1e-6)


def test_datasets_lists_the_builtins():
    result = cli("datasets")
    ok(result)
    for name in ("mfeat", "synthetic-regression", "synthetic-classification"):
        assert name in result.stdout


# ---------------------------------------------------------------------------------------------
# Pickles (MulT / MMSA layout)


def write_mult_pickle(path: Path, sizes=(30, 10, 10), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    raw = {}
    for split, n in zip(("train", "valid", "test"), sizes):
        text = rng.normal(size=(n, 4, 5)).astype(np.float32)
        audio = rng.normal(size=(n, 4, 3)).astype(np.float32)
        audio[0, 0, 0] = -np.inf  # as in MulT's audio features: read as 0
        raw[split] = {
            "text": text,
            "audio": audio,
            "vision": rng.normal(size=(n, 4, 2)).astype(np.float32),
            "labels": np.clip(text[:, :, 0].sum(axis=1), -3, 3).reshape(n, 1, 1).astype(np.float32),
            "id": np.array([f"{split}{i}" for i in range(n)]),
        }
    with open(path, "wb") as f:
        pickle.dump(raw, f)
    return path


def test_pickle_requires_allow_pickle(workdir):
    data = write_mult_pickle(workdir / "mosi.pkl")
    out = workdir / "model-pkl-refused"
    assert_clean_error(cli("train", "--data", data, *FAST, "--out", out), "--allow-pickle", "mosi.pkl")
    assert not out.exists()
    out = workdir / "model-pkl"
    ok(
        cli(
            "train", "--data", data, "--fusion", "mult", "--allow-pickle", "--metrics", "sentiment", *FAST, "--out", out
        )
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"mae", "corr", "acc2", "acc7"} <= set(metrics["test"])
    config = json.loads((out / "config.json").read_text())
    assert [m["name"] for m in config["data"]["modalities"]] == ["text", "audio", "vision"]
    assert config["data"]["task"] == "regression"
    # evaluate also needs the flag, and then uses the pickle's own train/valid/test parts.
    assert_clean_error(cli("evaluate", "--model", out, "--data", data), "--allow-pickle")
    ok(cli("evaluate", "--model", out, "--data", data, "--allow-pickle", "--out", workdir / "eval-pkl.json"))
    report = json.loads((workdir / "eval-pkl.json").read_text())
    for split in ("train", "valid", "test"):
        assert report[split] == pytest.approx(metrics[split], rel=1e-5, abs=1e-6), split
    ok(cli("predict", "--model", out, "--data", data, "--allow-pickle", "--out", workdir / "pkl.csv"))
    header, rows = read_csv(workdir / "pkl.csv")
    assert header == ["index", "split", "y_true", "y_pred"] and len(rows) == 50
    assert [r[1] for r in rows] == ["train"] * 30 + ["valid"] * 10 + ["test"] * 10


# ---------------------------------------------------------------------------------------------
# Bad input: exit 2, one line, nothing written


BAD_TRAIN_INPUTS = {
    "missing-file": (lambda d: d / "nope.npz", [], [r"nope\.npz"]),
    "brackets-in-path": (lambda d: d / "x[/y]" / "nope.npz", [], [r"x\[/y\]/nope\.npz"]),
    "not-npz": (lambda d: d / "data.txt", [], ["npz"]),
    "unknown-array": (lambda d: write_npz(d / "unknown.npz", extra=np.zeros(90)), [], ["not a modality", "'extra'"]),
    "different-n": (
        lambda d: write_npz(d / "diffn.npz", x_b=np.zeros((80, 3, 2), np.float32), mask_b=None),
        [],
        ["'b'", "N=90", "80"],
    ),
    "nan": (
        lambda d: write_npz(d / "nan.npz", x_a=nan_at(np.ones((90, 4), np.float32), [(5, 1), (7, 0), (7, 3)])),
        [],
        ["'a'", "3 non-finite", "sample 5"],
    ),
    "float-labels-for-classification": (
        lambda d: write_npz(d / "float.npz", y=np.linspace(0, 1, 90).astype(np.float32)),
        ["--task", "classification"],
        ["integer labels", "sample 1"],
    ),
    "bad-fusion": (lambda d: write_npz(d / "ok1.npz"), ["--fusion", "transformer"], ["fusion", "'transformer'"]),
    "heads-do-not-divide": (
        lambda d: write_npz(d / "ok2.npz"),
        ["--d-model", "10", "--heads", "4"],
        ["d_model", "nhead=4"],
    ),
    "zero-heads": (lambda d: write_npz(d / "ok3.npz"), ["--heads", "0"], ["nhead"]),
    "bad-pooling": (lambda d: write_npz(d / "ok4.npz"), ["--pooling", "max"], ["pooling"]),
    "bad-loss": (lambda d: write_npz(d / "ok5.npz"), ["--loss", "huber"], ["loss"]),
    "repeat-zero": (lambda d: write_npz(d / "ok6.npz"), ["--repeat", "0"], ["repeat"]),
    "unknown-builtin": (lambda d: "mnist", [], ["built-in", "'mnist'"]),
    "zero-epochs": (lambda d: write_npz(d / "ok7.npz"), ["--epochs", "0"], ["epochs"]),
    "dropout-too-big": (lambda d: write_npz(d / "ok8.npz"), ["--dropout", "1.5"], ["dropout"]),
    "sentiment-for-classification": (
        lambda d: write_npz(d / "ok9.npz"),
        ["--metrics", "sentiment"],
        ["sentiment", "regression"],
    ),
}


def nan_at(x: np.ndarray, where) -> np.ndarray:
    for i, j in where:
        x[i, j] = np.nan
    return x


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_is_a_clean_error(tmp_path, npz):
    assert_clean_error(cli("train", "--data", npz, "--device", "cuda", "--out", tmp_path / "out"), "device", "CUDA")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", list(BAD_TRAIN_INPUTS))
def test_bad_train_input_is_one_clean_line(tmp_path, case):
    make, args, needles = BAD_TRAIN_INPUTS[case]
    data = make(tmp_path)
    if case == "not-npz":
        data.write_text("a,b\n1,2\n")
    out = tmp_path / "out"
    # Flags after FAST win (typer keeps the last value of a repeated option).
    assert_clean_error(cli("train", "--data", data, *FAST, *args, "--out", out), *needles)
    assert not out.exists(), "nothing may be written on bad input"


BAD_MODEL_DATA = {
    "feature-size": (dict(b_dim=5), ["'b'", "feature size 2", "got 5"]),
    "more-classes": (dict(num_classes=5), ["label 3 at sample 3 is not one of the classes \\[0, 1, 2\\]"]),
    "float-labels": (dict(y=np.full(90, 0.5, np.float32)), ["integer labels"]),
    "missing-modality": (dict(x_b=None, mask_b=None), ["'b' is missing"]),
    "extra-modality": (dict(x_z=np.zeros((90, 2), np.float32)), ["'z'", "not seen in training"]),
}


@pytest.mark.parametrize("command", ["evaluate", "predict"])
@pytest.mark.parametrize("case", list(BAD_MODEL_DATA))
def test_evaluate_and_predict_reject_data_that_does_not_fit(tmp_path, model_dir, command, case):
    kwargs, needles = BAD_MODEL_DATA[case]
    data = write_npz(tmp_path / "other.npz", **kwargs)
    out = tmp_path / ("eval.json" if command == "evaluate" else "pred.csv")
    assert_clean_error(cli(command, "--model", model_dir, "--data", data, "--out", out), *needles)
    assert not out.exists()
    assert not (model_dir / "evaluation.json").exists()


def test_evaluate_and_predict_accept_data_with_fewer_classes(tmp_path, model_dir):
    """New data need not hold every class: one sample, or a file whose labels are all 0."""
    data = write_npz(tmp_path / "one-class.npz", n=5, num_classes=1)
    ok(cli("evaluate", "--model", model_dir, "--data", data, "--out", tmp_path / "eval.json"))
    report = json.loads((tmp_path / "eval.json").read_text())
    assert set(report) == {"all", "calibration"}  # not the training data: no split to recompute
    ok(cli("predict", "--model", model_dir, "--data", data, "--out", tmp_path / "pred.csv"))
    header, rows = read_csv(tmp_path / "pred.csv")
    assert len(rows) == 5 and header[-3:] == ["prob_0", "prob_1", "prob_2"]  # the model's 3 classes
    assert report["all"]["accuracy"] == pytest.approx(np.mean([r[2] == "0" for r in rows]))


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_evaluate_and_predict_need_a_model_directory(tmp_path, npz, command):
    out = tmp_path / "out.file"
    assert_clean_error(
        cli(command, "--model", tmp_path / "nothing", "--data", npz, "--out", out), "not a model directory"
    )
    assert not out.exists()


def test_no_traceback_through_the_real_script(tmp_path, npz):
    """The installed console script, in a subprocess: success, then a clean failure."""
    script = Path(sys.executable).with_name("attnfuse")
    if not script.exists():
        pytest.skip(f"console script not installed next to {sys.executable}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    out = tmp_path / "model"
    done = subprocess.run(
        [
            script,
            "train",
            "--data",
            npz,
            "--fusion",
            "bicross",
            "--epochs",
            "1",
            "--d-model",
            "8",
            "--heads",
            "2",
            "--layers",
            "1",
            "--out",
            out,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "log.csv",
        "metrics.json",
        "model.safetensors",
        "run.yaml",
    ]
    bad = subprocess.run(
        [script, "train", "--data", tmp_path / "missing.npz", "--out", tmp_path / "x"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "missing.npz" in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr + bad.stdout
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------
# `make demo` = `attnfuse train` with no arguments: --fusion auto on mfeat, with the baselines


def test_train_defaults_are_auto_fusion_on_mfeat():
    command = typer.main.get_command(app).commands["train"]
    defaults = {p.name: p.default for p in command.params}
    assert defaults["data"] == "mfeat" and defaults["fusion"] == "auto" and defaults["baselines"] is True
    assert defaults["out"] is None and defaults["repeat"] == 1 and defaults["allow_pickle"] is False


def test_train_with_defaults_for_one_epoch(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default output directory is runs/<data>-<fusion>
    result = cli("train", "--epochs", "1")
    ok(result)
    out = tmp_path / "runs" / "mfeat-auto"
    config = json.loads((out / "config.json").read_text())
    assert config["fusion"] == config["auto"]["fusion"] and set(config["auto"]["candidates"]) == {
        "concat",
        "self",
        "self-modality",
    }
    assert config["data"]["name"] == "mfeat" and config["data"]["num_classes"] == 10
    assert [m["name"] for m in config["data"]["modalities"]] == ["fou", "fac", "kar", "pix", "zer", "mor"]
    assert config["model"]["d_model"] == 64
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] > 0.5  # one epoch on mfeat is already far above chance (0.1)
    assert set(metrics["baselines"]) == {"logistic", "hist_gb"} and "logistic (baseline) test" in result.stdout


def test_sentiment_metrics_need_regression_and_fail_before_training(npz, tmp_path):
    out = tmp_path / "never"
    result = cli("train", "--data", npz, "--metrics", "sentiment", "--out", out)
    assert_clean_error(result, "metrics: 'sentiment' needs one regression target", "class labels")
    assert not out.exists()


def test_options_that_do_not_apply_are_errors(npz, workdir, tmp_path):
    reg = workdir / "reg2.npz"
    rng = np.random.default_rng(1)
    np.savez(reg, x_a=rng.normal(size=(40, 3)).astype(np.float32), y=rng.normal(size=(40, 2)).astype(np.float32))
    assert_clean_error(
        cli("train", "--data", reg, "--metrics", "sentiment", "--out", tmp_path / "x"), "sentiment", "2 targets"
    )
    assert_clean_error(
        cli("train", "--data", reg, "--label-smoothing", "0.1", "--out", tmp_path / "x"),
        "label_smoothing: applies to classification only",
    )
    assert_clean_error(cli("explain", "--model", tmp_path, "--query", "1,2", "--keys", "1,2"), "one or the other")
    assert_clean_error(cli("explain", "--model", tmp_path, "--no-scale"), "--no-scale: applies to the walkthrough")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("name", ["text.bert", "train", "to", "1st"])
def test_unusable_modality_names_are_one_line_errors(workdir, tmp_path, name):
    path = workdir / f"names-{name}.npz"
    rng = np.random.default_rng(0)
    np.savez(path, **{f"x_{name}": rng.normal(size=(30, 3)).astype(np.float32)}, y=rng.integers(0, 2, 30))
    assert_clean_error(cli("train", "--data", path, "--out", tmp_path / "x"), f"modality name '{name}'")


def test_an_npy_renamed_to_npz_and_a_corrupt_archive(workdir, tmp_path):
    npy = workdir / "array.npz"
    with open(npy, "wb") as f:
        np.save(f, np.zeros(3))
    assert_clean_error(cli("train", "--data", npy, "--out", tmp_path / "x"), "single .npy array")
    good = write_npz(workdir / "tocorrupt.npz")
    raw = bytearray(good.read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 64] = b"\xff" * 64  # damage the compressed payload
    bad = workdir / "corrupt.npz"
    bad.write_bytes(bytes(raw))
    assert_clean_error(cli("train", "--data", bad, "--out", tmp_path / "x"), "corrupt.npz")


@pytest.mark.parametrize(
    "fusion, option, flag",
    [
        ("concat", ["--layers", "2"], "layers"),
        ("concat", ["--pooling", "mean"], "pooling"),
        ("self", ["--query", "a"], "query"),
        ("mult", ["--query", "a"], "query"),
    ],
)
def test_an_option_the_fusion_lacks_is_an_error(npz, tmp_path, fusion, option, flag):
    result = cli("train", "--data", npz, "--fusion", fusion, *option, "--out", tmp_path / "never")
    assert_clean_error(result, f"{flag}: the '{fusion}' fusion has no such setting")
    assert not (tmp_path / "never").exists()


def test_pooling_and_query_options_reach_the_model(npz, tmp_path):
    out = tmp_path / "m"
    ok(
        cli(
            "train",
            "--data",
            npz,
            "--fusion",
            "self",
            "--pooling",
            "modality",
            "--modality-dropout",
            "0.3",
            "--label-smoothing",
            "0.1",
            *FAST,
            "--out",
            out,
        )
    )
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["pooling"] == "modality" and config["model"]["modality_dropout"] == 0.3
    assert config["train"]["label_smoothing"] == 0.1
    assert_clean_error(
        cli("train", "--data", npz, "--fusion", "cross", "--pooling", "cls", *FAST, "--out", out),
        "pooling: expected one of",
    )
