"""Calibrated outputs of a trained model: the temperature of a classifier and the split-conformal
intervals of a regression, fitted on the chosen model's validation rows by ``attnfuse train``,
kept in config.json and metrics.json, applied by ``predict``, ``evaluate``, FusionPredictor and
the export; misuse refused in one line; a directory without the block still loads."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from attnfuse import FusionPredictor
from attnfuse.calibration import (
    TEMPERATURE_BOUNDS,
    expected_calibration_error,
    fit_temperature,
    laplace_smoothing,
    softmax,
    temperature_nll,
)
from attnfuse.checkpoint import load_model, read_config
from attnfuse.data import MultimodalDataset, RowBatches
from attnfuse.export import export_model, run_exported
from attnfuse.fit import RunLoopState
from attnfuse.pipeline import TrainSpec, split_parts, train
from attnfuse.runstate import last_dir
from attnfuse.training import predict
from clikit import assert_one_line, cli, ok

FAST = {"fusion": "concat", "epochs": 4, "d_model": 8, "batch_size": 32, "baselines": False}
FAST_FLAGS = ["--fusion", "concat", "--epochs", "4", "--d-model", "8", "--batch-size", "32", "--no-baselines"]


def classes(n: int = 240, seed: int = 0) -> dict[str, np.ndarray]:
    """Three classes, two noisy views: a model that is right on most rows and unsure on some."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    a = rng.normal(size=(n, 4)) + 0.8 * np.eye(3, 4)[y]
    b = rng.normal(size=(n, 3)) + 0.5 * np.eye(3)[y]
    return {"x_a": a.astype(np.float32), "x_b": b.astype(np.float32), "y": y.astype(np.int64)}


def values(n: int = 300, seed: int = 0, targets: int = 1) -> dict[str, np.ndarray]:
    """A regression with noise of a known scale; with 2 targets the second is 10x the first."""
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(n, 3)), rng.normal(size=(n, 2))
    y = a[:, 0] - 0.5 * b[:, 1] + rng.normal(scale=0.5, size=n)
    if targets == 2:
        y = np.stack([y, 10 * (a[:, 1] + rng.normal(scale=0.5, size=n))], axis=1)
    return {"x_a": a.astype(np.float32), "x_b": b.astype(np.float32), "y": y.astype(np.float32)}


def dataset(arrays: dict[str, np.ndarray], **kw) -> MultimodalDataset:
    return MultimodalDataset({"a": arrays["x_a"], "b": arrays["x_b"]}, arrays["y"], **kw)


def read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="") as f:
        header, *rows = list(csv.reader(f))
    return header, rows


def outputs_of(model_dir: Path, data: MultimodalDataset) -> np.ndarray:
    """The saved model's raw outputs (N, out_dim) on ``data``, float64."""
    net, _, standardizer = load_model(model_dir)
    return predict(net, RowBatches(data, None, standardizer)).double().numpy()


def trained(tmp: Path, arrays: dict[str, np.ndarray], *flags: str) -> tuple[Path, Path]:
    """``arrays`` saved to TMP/data.npz and `attnfuse train` on it (FAST_FLAGS and ``flags``) to
    TMP/model: (the data's path, the model directory)."""
    npz, out = tmp / "data.npz", tmp / "model"
    np.savez(npz, **arrays)
    ok(cli("train", "--data", npz, *FAST_FLAGS, *flags, "--out", out))
    return npz, out


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> tuple[Path, Path]:
    """A calibrated classifier of two ensemble members (the temperature divides their mean logits)."""
    return trained(tmp_path_factory.mktemp("calibrated"), classes(), "--ensemble", "2")


@pytest.fixture(scope="module")
def regressor(tmp_path_factory) -> tuple[Path, Path]:
    """A regression with 80% intervals."""
    return trained(tmp_path_factory.mktemp("intervals"), values(), "--interval", "0.8")


# ---------------------------------------------------------------------------------------------
# Classification: the temperature


def test_the_temperature_is_fitted_on_the_validation_rows_only(tmp_path):
    """The same train and valid rows with other test rows (features and labels): the same
    temperature, bit for bit, while the test rows' ECE changes."""
    arrays = classes(n=200)
    split = np.array(["train"] * 120 + ["valid"] * 40 + ["test"] * 40)
    other = {k: v.copy() for k, v in arrays.items()}
    rng = np.random.default_rng(1)
    other["x_a"][160:] = rng.normal(size=(40, 4))
    other["y"][160:] = rng.integers(0, 3, 40)
    spec = TrainSpec.from_options(FAST)
    first = train(spec, tmp_path / "a", data=dataset(arrays, split=split))
    second = train(spec, tmp_path / "b", data=dataset(other, split=split))
    assert first.calibration == second.calibration
    assert first.calibration["fitted_on"] == "valid" and first.calibration["rows"] == 40
    assert first.calibration["smoothing"] == 1 / 42  # Laplace: one error expected in n + 2 rows
    assert first.report["calibration"]["valid"] == second.report["calibration"]["valid"]
    assert first.report["calibration"]["test"] != second.report["calibration"]["test"]
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["calibration"] == first.calibration and first.calibration["method"] == "temperature"


def separated(n: int = 60, classes: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose argmax is every row's label (a small validation part a model gets all right)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    return rng.normal(size=(n, classes)) + 4.0 * np.eye(classes)[y], y


def test_on_rows_without_an_error_the_smoothed_fit_keeps_a_finite_temperature():
    """The plain NLL falls as T -> 0 on perfectly separated rows (its fit is the lower bound); with
    Laplace's smoothing the minimum is interior, and it is the minimum of a dense grid."""
    logits, y = separated()
    assert fit_temperature(logits, y) == pytest.approx(TEMPERATURE_BOUNDS[0])
    e = laplace_smoothing(len(y))
    t = fit_temperature(logits, y, smoothing=e)
    assert 0.5 < t < 5.0

    def objective(temperature: float) -> float:  # the cross-entropy against the smoothed targets
        p = softmax(logits, temperature)
        targets = np.full(p.shape, e / (p.shape[1] - 1))
        targets[np.arange(len(y)), y] = 1 - e
        return float(-np.mean(np.sum(targets * np.log(p), axis=1)))

    grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 4001))
    best = grid[np.argmin([objective(g) for g in grid])]
    assert t == pytest.approx(best, rel=2e-3)
    assert objective(t) <= min(objective(g) for g in grid) + 1e-12


def test_predict_writes_the_calibrated_probabilities(classifier, tmp_path):
    """prob_c = softmax(logits / T): the ensemble's mean logits divided by the fitted temperature;
    the predicted class is the logits' argmax, as without calibration."""
    npz, model_dir = classifier
    t = read_config(model_dir)["calibration"]["temperature"]
    assert t != 1.0
    out = tmp_path / "p.csv"
    ok(cli("predict", "--model", model_dir, "--out", out))
    header, rows = read_csv(out)
    assert header[-3:] == ["prob_0", "prob_1", "prob_2"]
    probs = np.array([[float(v) for v in r[-3:]] for r in rows])
    logits = outputs_of(model_dir, dataset(dict(np.load(npz))))
    expected = softmax(logits, t)
    np.testing.assert_allclose(probs, expected, rtol=0, atol=6e-7)  # the CSV rounds to 6 decimals
    assert [int(r[3]) for r in rows] == logits.argmax(axis=1).tolist()
    assert not np.allclose(probs, softmax(logits), atol=1e-3)  # calibration changed them

    predictor = FusionPredictor.load(model_dir)
    np.testing.assert_allclose(predictor.predict_proba(str(npz)), expected, rtol=1e-6, atol=1e-12)
    assert predictor.predict(str(npz)).tolist() == logits.argmax(axis=1).tolist()


def test_metrics_json_ece_is_the_one_recomputed_from_the_model(classifier, tmp_path):
    """metrics.json's ECE and NLL before/after on valid and test equal expected_calibration_error
    and the NLL recomputed from the saved model's logits; evaluate reports the calibrated ECE."""
    npz, model_dir = classifier
    config = read_config(model_dir)
    report = json.loads((model_dir / "metrics.json").read_text())["calibration"]
    t = config["calibration"]["temperature"]
    assert report["temperature"] == t and report["rows"] == config["calibration"]["rows"]
    data = dataset(dict(np.load(npz)))
    logits = outputs_of(model_dir, data)
    parts = split_parts(data, config)
    for part in ("valid", "test"):
        z, y = logits[parts[part]], data.y[parts[part]]
        assert report[part]["ece_before"] == pytest.approx(expected_calibration_error(softmax(z), y), rel=1e-6)
        assert report[part]["ece_after"] == pytest.approx(expected_calibration_error(softmax(z, t), y), rel=1e-6)
        assert report[part]["nll_before"] == pytest.approx(temperature_nll(z, y), rel=1e-6)
        assert report[part]["nll_after"] == pytest.approx(temperature_nll(z, y, t), rel=1e-6)
    assert report["valid"]["nll_after"] <= report["valid"]["nll_before"]  # T minimises it there
    ok(cli("evaluate", "--model", model_dir, "--out", tmp_path / "e.json"))
    evaluation = json.loads((tmp_path / "e.json").read_text())["calibration"]
    assert evaluation["temperature"] == t
    for part in ("valid", "test"):
        assert evaluation[part]["ece"] == pytest.approx(report[part]["ece_after"], rel=1e-6)
        assert evaluation[part]["nll"] == pytest.approx(report[part]["nll_after"], rel=1e-6)
    assert FusionPredictor.load(model_dir).evaluate(str(npz))["calibration"]["test"]["ece"] == pytest.approx(
        report["test"]["ece_after"], rel=1e-6
    )


def test_no_calibrate_writes_no_block_and_predicts_the_plain_softmax(tmp_path):
    spec = TrainSpec.from_options({**FAST, "calibrate": False})
    result = train(spec, tmp_path / "m", data=dataset(classes(n=120)))
    assert result.calibration is None and "calibration" not in result.report
    assert "calibration" not in read_config(tmp_path / "m")


def test_a_model_directory_without_the_block_loads_as_uncalibrated(classifier, tmp_path):
    """A directory written before calibration existed: no block, temperature 1 (the weights, and
    so their weights_id, are the same)."""
    npz, model_dir = classifier
    old = tmp_path / "old"
    old.mkdir()
    for path in model_dir.iterdir():
        if path.is_file():
            (old / path.name).write_bytes(path.read_bytes())
    config = json.loads((old / "config.json").read_text())
    del config["calibration"]
    (old / "config.json").write_text(json.dumps(config))
    data = dataset(dict(np.load(npz)))
    logits = outputs_of(old, data)
    np.testing.assert_allclose(FusionPredictor.load(old).predict_proba(str(npz)), softmax(logits), rtol=1e-6)
    ok(cli("evaluate", "--model", old, "--out", tmp_path / "e.json"))
    evaluation = json.loads((tmp_path / "e.json").read_text())["calibration"]
    assert evaluation["temperature"] == 1.0
    test = split_parts(data, config)["test"]
    ece = expected_calibration_error(softmax(logits[test]), data.y[test])
    assert evaluation["test"]["ece"] == pytest.approx(ece, rel=1e-6)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"temperature": -1.0}, r"calibration\.temperature: expected a finite number > 0"),
        ({"method": "conformal"}, r"calibration\.method: expected 'temperature' for a classification model"),
        ({"rows": 0}, r"calibration\.rows: expected an integer >= 1"),
        ({"smoothing": 1.0}, r"calibration\.smoothing: expected a number in \[0, 1\)"),
        ({"extra": 1}, r"calibration: unknown key 'extra'"),
    ],
)
def test_a_damaged_calibration_block_is_refused_naming_the_key(classifier, tmp_path, change, message):
    _, model_dir = classifier
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("model.safetensors", "config.json"):
        (broken / name).write_bytes((model_dir / name).read_bytes())
    config = json.loads((broken / "config.json").read_text())
    config["calibration"].update(change)
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"^model: .*config\.json: " + message):
        read_config(broken)


def test_the_export_divides_the_logits_by_the_temperature(classifier, tmp_path):
    npz, model_dir = classifier
    t = read_config(model_dir)["calibration"]["temperature"]
    info = export_model(model_dir, tmp_path / "m.pt", "torchscript")
    assert info["temperature"] == t and info["interval"] is None
    arrays = dict(np.load(npz))
    rows = slice(0, 16)
    inputs = []
    for name in ("a", "b"):
        x = torch.from_numpy(arrays[f"x_{name}"][rows]).unsqueeze(1)  # (B, 1, D): a vector modality
        inputs += [x, torch.ones(x.shape[:2], dtype=torch.bool)]
    got = run_exported(tmp_path / "m.pt", "torchscript", inputs, [])
    logits = outputs_of(model_dir, dataset(arrays))[rows]
    np.testing.assert_allclose(got, softmax(logits, t), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Regression: the intervals


def test_interval_coverage_is_near_the_level_over_seeds(tmp_path):
    """Five runs (each its own drawn split, as --repeat draws them): the mean test coverage of the
    90% intervals lies within three standard deviations of its expectation k / (n + 1) >= 0.9.

    The variance of one run's test coverage: the coverage given the calibration rows is
    Beta(k, n + 1 - k) (variance ~ a(1 - a) / (n + 2)) plus the binomial spread over m test rows
    (~ a(1 - a) / m); the mean over R independent runs divides it by R."""
    level, runs = 0.9, 5
    result = train(TrainSpec.from_options({**FAST, "interval": level, "repeat": runs}), data=dataset(values()))
    records = [r["calibration"] for r in result.runs]
    n, m = records[0]["rows"], len(result.first.split["test"])
    k = math.ceil((n + 1) * level)
    expected = k / (n + 1)
    sd = math.sqrt(expected * (1 - expected) * (1 / (n + 2) + 1 / m) / runs)
    mean = result.report["calibration"]["test"]["coverage"]["mean"]
    assert mean == pytest.approx(np.mean([r["test"]["coverage"] for r in records]), rel=1e-12)
    assert abs(mean - expected) <= 3 * sd, (mean, expected, sd)
    assert result.calibration["half_width"] == records[0]["half_width"]  # the saved model: the first run's
    assert all(r["valid"]["coverage"] >= level for r in records)  # on its own rows, by construction


def test_each_target_has_its_own_half_width(tmp_path):
    result = train(TrainSpec.from_options({**FAST, "interval": 0.9}), data=dataset(values(targets=2)))
    q = result.calibration["half_width"]
    assert len(q) == 2 and q[1] > 5 * q[0]  # the second target has 10x the scale (and the noise)


def test_predict_writes_lower_and_upper_and_evaluate_recomputes_their_coverage(regressor, tmp_path):
    npz, model_dir = regressor
    config = read_config(model_dir)
    q = config["calibration"]["half_width"][0]
    assert config["calibration"]["level"] == 0.8
    out = tmp_path / "p.csv"
    ok(cli("predict", "--model", model_dir, "--out", out))
    header, rows = read_csv(out)
    assert header == ["index", "split", "y_true", "y_pred", "lower", "upper"]
    y, pred, lower, upper = (np.array([float(r[j]) for r in rows]) for j in range(2, 6))
    np.testing.assert_allclose(lower, pred - q, rtol=1e-6)
    np.testing.assert_allclose(upper, pred + q, rtol=1e-6)
    ok(cli("evaluate", "--model", model_dir, "--out", tmp_path / "e.json"))
    evaluation = json.loads((tmp_path / "e.json").read_text())["calibration"]
    assert evaluation["level"] == 0.8 and evaluation["half_width"] == [q]
    split = np.array([r[1] for r in rows])
    for part in ("train", "valid", "test"):
        inside = (lower <= y) & (y <= upper)
        assert evaluation[part]["coverage"] == pytest.approx(inside[split == part].mean(), rel=1e-9)
        assert evaluation[part]["width"] == pytest.approx(2 * q, rel=1e-6)
    metrics = json.loads((model_dir / "metrics.json").read_text())["calibration"]
    assert metrics["test"]["coverage"] == pytest.approx(evaluation["test"]["coverage"], rel=1e-9)

    predictor = FusionPredictor.load(model_dir)
    low, high = predictor.predict_interval(str(npz))
    assert low.shape == (len(rows),)
    np.testing.assert_allclose(low, lower, rtol=1e-6)
    np.testing.assert_allclose(high, upper, rtol=1e-6)
    info = export_model(model_dir, tmp_path / "m.pt", "torchscript")
    assert info["interval"] == {"level": 0.8, "half_width": [q]} and info["temperature"] is None


# ---------------------------------------------------------------------------------------------
# Misuse: one line each


def test_misused_options_are_refused_in_one_line(classifier, regressor, tmp_path):
    npz, model_dir = classifier
    reg_npz, _ = regressor
    assert_one_line(
        cli("train", "--data", reg_npz, "--interval", "1.5", "--out", tmp_path / "x"),
        2,
        r"interval: expected a coverage level in \(0, 1\), e\.g\. 0\.9 for 90% intervals, got 1\.5",
    )
    assert_one_line(
        cli("train", "--data", npz, "--interval", "0.9", *FAST_FLAGS, "--out", tmp_path / "x"),
        2,
        r"interval: prediction intervals are for regression targets, the task is classification",
    )
    assert_one_line(  # known before the data is read
        cli("train", "--data", "nowhere.npz", "--task", "classification", "--interval", "0.9"),
        2,
        r"interval: prediction intervals are for regression targets",
    )
    assert_one_line(  # 300 rows: 45 validation rows are too few for a finite 99% interval
        cli("train", "--data", reg_npz, "--interval", "0.99", *FAST_FLAGS, "--out", tmp_path / "x"),
        2,
        r"interval: 0\.99 needs at least 99 validation rows for a finite interval, the validation part has 45",
    )
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match=r"^interval: expected a coverage level in \(0, 1\)"):
        FusionPredictor(interval=0.0)
    with pytest.raises(ValueError, match=r"^predict_interval: the model predicts classes"):
        FusionPredictor.load(model_dir).predict_interval(str(npz))
    plain = tmp_path / "plain"
    train(TrainSpec.from_options(FAST), plain, data=dataset(values(n=80)))
    with pytest.raises(ValueError, match=r"^predict_interval: the model was trained without intervals"):
        FusionPredictor.load(plain).predict_interval(dataset(values(n=80)))


# ---------------------------------------------------------------------------------------------
# Resume: the first run's calibration is part of the loop's state


def test_the_run_loop_state_keeps_the_first_runs_calibration():
    block = {"method": "temperature", "temperature": 1.5, "fitted_on": "valid", "rows": 9}
    _, meta = RunLoopState(calibration=block).to_dict()
    assert json.loads(json.dumps(meta))["calibration"] == block
    assert "calibration" not in RunLoopState().to_dict()[1]  # none: as checkpoints written before it


def test_a_run_resumed_in_its_second_seed_saves_the_same_calibration(tmp_path):
    """Stopped in the second run (the first one's model and calibration then live in the
    checkpoint) and resumed: config.json and metrics.json as the run that never stopped."""
    npz = tmp_path / "v.npz"
    np.savez(npz, **values(n=160))
    spec = TrainSpec.from_options({**FAST, "data": str(npz), "interval": 0.8, "repeat": 2})
    train(spec, tmp_path / "whole")

    class Stop(Exception):
        pass

    def stop_in_the_second_run(event: str, info: dict) -> None:
        if event == "epoch" and info["index"] == 1 and info["epoch"] == 3:
            raise Stop

    with pytest.raises(Stop):
        train(spec, tmp_path / "stopped", stop_in_the_second_run)
    assert (last_dir(tmp_path / "stopped") / "state").exists()
    train(spec, tmp_path / "stopped", resume=True)
    for name in ("config.json", "metrics.json"):
        assert json.loads((tmp_path / "stopped" / name).read_text()) == json.loads(
            (tmp_path / "whole" / name).read_text()
        ), name
