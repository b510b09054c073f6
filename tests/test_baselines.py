"""Baselines on the same split: pooled features, the scikit-learn models, the rows in metrics.json
and the printed table, and the one warning line when a baseline beats the fusion."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression, RidgeCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from typer.testing import CliRunner

from attnfuse.baselines import (
    BASELINES,
    RIDGE_ALPHAS,
    fit_baselines,
    make_baseline,
    pooled_features,
    skipped,
    summarize_baselines,
    verdict,
    verdict_line,
)
from attnfuse.cli import app
from attnfuse.data import MultimodalDataset
from attnfuse.metrics import compute_metrics
from attnfuse.pipeline import TrainSpec, train

TINY = ["--epochs", "2", "--d-model", "8", "--batch-size", "32"]


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def linear_npz(path, n=160, seed=0):
    """A regression whose target is a linear function of both modalities (plus a little noise):
    ridge regression is the right model, and a fusion trained for two epochs is not close."""
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(n, 3)), rng.normal(size=(n, 4, 2))
    y = a @ np.array([1.0, -2.0, 0.5]) + b.mean(axis=1) @ np.array([1.5, 1.0]) + 0.05 * rng.normal(size=n)
    np.savez(path, x_a=a.astype(np.float32), x_b=b.astype(np.float32), y=(10 + 3 * y).astype(np.float32))
    return path


def absent_data(n=60, seed=0) -> MultimodalDataset:
    rng = np.random.default_rng(seed)
    present = np.arange(n) % 3 != 0  # modality b absent in every third sample
    steps = np.arange(4)[None, :] < rng.integers(1, 5, size=n)[:, None]  # (N, 4) valid steps
    return MultimodalDataset(
        {"a": rng.normal(size=(n, 3)), "b": rng.normal(size=(n, 4, 2))},
        (np.arange(n) % 2).astype(np.int64),
        masks={"b": steps & present[:, None]},
    )


# ---------------------------------------------------------------------------------------------
# Features and models


def test_pooled_features_mean_over_valid_steps_nan_and_presence_when_absent():
    data = absent_data()
    x = pooled_features(data)
    assert x.shape == (data.n, 3 + 2 + 1)  # a (3), b pooled (2), b's presence column
    np.testing.assert_allclose(x[:, :3], data.features["a"], rtol=1e-6)
    valid = data.valid_mask("b")
    for i in range(data.n):
        if valid[i].any():
            expected = data.features["b"][i][valid[i]].mean(axis=0)
            np.testing.assert_allclose(x[i, 3:5], expected, rtol=1e-5)
            assert x[i, 5] == 1.0
        else:
            assert np.isnan(x[i, 3:5]).all() and x[i, 5] == 0.0
    # Always-present modalities get no presence column.
    full = MultimodalDataset({"a": data.features["a"]}, data.y)
    assert pooled_features(full).shape == (data.n, 3)


def test_an_absent_modality_is_zero_after_standardisation_for_the_linear_models():
    data = absent_data()
    x = pooled_features(data)
    model = make_baseline("logistic", "classification").fit(x, data.y)
    impute_and_scale = model[:-1]  # SimpleImputer -> StandardScaler
    z = impute_and_scale.transform(x)
    absent = ~data.valid_mask("b").any(axis=1)
    assert absent.any()
    np.testing.assert_allclose(z[absent][:, 3:5], 0.0, atol=1e-12)
    # Gradient boosting reads the NaN natively.
    fit_baselines(data, {"train": np.arange(40), "valid": np.arange(40, 50), "test": np.arange(50, 60)})


def test_linear_baselines_are_the_scikit_learn_models_on_pooled_features():
    rng = np.random.default_rng(1)
    data = MultimodalDataset({"a": rng.normal(size=(80, 3)), "b": rng.normal(size=(80, 5, 2))}, rng.normal(size=80))
    x = pooled_features(data)
    ours = make_baseline("ridge", "regression").fit(x[:60], data.y[:60]).predict(x[60:])
    ref = make_pipeline(StandardScaler(), RidgeCV(alphas=RIDGE_ALPHAS)).fit(x[:60], data.y[:60]).predict(x[60:])
    np.testing.assert_allclose(ours, ref, rtol=1e-6)

    labels = (x[:, 0] + x[:, 3] > 0).astype(np.int64)
    ours = make_baseline("logistic", "classification").fit(x[:60], labels[:60]).predict_proba(x[60:])
    ref = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x[:60], labels[:60])
    np.testing.assert_allclose(ours, ref.predict_proba(x[60:]), rtol=1e-6)


def test_fit_baselines_scores_every_split_with_the_fusion_metrics():
    rng = np.random.default_rng(2)
    data = MultimodalDataset({"a": rng.normal(size=(90, 3))}, rng.normal(size=(90, 2)))  # two targets
    splits = {"train": np.arange(60), "valid": np.arange(60, 75), "test": np.arange(75, 90)}
    result = fit_baselines(data, splits, sentiment=False)
    assert list(result.metrics) == list(BASELINES["regression"]) == list(result.seconds)
    x = pooled_features(data)
    pred = make_baseline("ridge", "regression").fit(x[:60], data.y[:60]).predict(x)
    for split, rows in splits.items():
        assert result.metrics["ridge"][split] == pytest.approx(compute_metrics("regression", data.y[rows], pred[rows]))
    assert all(s >= 0 for s in result.seconds.values())


def test_unknown_baseline_names_the_choices():
    with pytest.raises(ValueError, match=r"baseline: expected one of \('ridge', 'hist_gb'\) for regression"):
        make_baseline("logistic", "regression")


@pytest.mark.parametrize(
    ("classes", "rows_per_class", "early_stopping"),
    [(5, 8, False), (10, 10, False), (5, 19, False), (5, 20, True), (10, 140, True), (2, 700, True)],
)
def test_gradient_boosting_stops_early_only_when_its_part_holds_every_class_twice(
    classes, rows_per_class, early_stopping
):
    y = np.arange(classes * rows_per_class) % classes
    model = make_baseline("hist_gb", "classification", y=y)
    assert model.early_stopping is early_stopping
    assert model.min_samples_leaf == max(1, min(20, y.size // 10))
    model.fit(np.random.default_rng(0).normal(size=(y.size, 3)), y)  # scikit-learn accepts it


def test_gradient_boosting_regression_stops_early_from_200_rows():
    assert make_baseline("hist_gb", "regression", y=np.zeros(199)).early_stopping is False
    assert make_baseline("hist_gb", "regression", y=np.zeros(200)).early_stopping is True
    assert make_baseline("hist_gb", "regression").early_stopping is True  # rows unknown: as before


def test_gradient_boosting_fits_forty_rows_of_five_classes():
    """scikit-learn refused the default early-stopping part: test_size = 3 < 5 classes."""
    rng = np.random.default_rng(0)
    y = np.arange(40) % 5
    data = MultimodalDataset({"a": rng.normal(size=(40, 3)) + y[:, None], "b": rng.normal(size=(40, 2, 2))}, y)
    splits = {"train": np.arange(28), "valid": np.arange(28, 34), "test": np.arange(34, 40)}
    result = fit_baselines(data, splits)
    assert set(result.metrics) == {"logistic", "hist_gb"} and not skipped(result.metrics)
    assert set(result.metrics["hist_gb"]) == {"train", "valid", "test"}


def test_a_baseline_that_cannot_be_fitted_is_skipped_with_the_reason():
    """A training part of one class: logistic regression refuses it; the others are still fitted."""
    rng = np.random.default_rng(0)
    y = np.arange(30) % 2
    data = MultimodalDataset({"a": rng.normal(size=(30, 3))}, y)
    train_rows = np.flatnonzero(y == 0)
    splits = {"train": train_rows, "valid": np.flatnonzero(y == 1)[:8], "test": np.flatnonzero(y == 1)[8:]}
    result = fit_baselines(data, splits)
    reasons = skipped(result.metrics)
    assert set(reasons) == {"logistic"}
    assert reasons["logistic"].startswith("cannot be fitted on 15 training rows of 1 class: ")
    assert "logistic" not in result.seconds and "hist_gb" in result.seconds


def test_summaries_keep_a_baseline_skipped_in_some_runs():
    fitted = {"valid": {"accuracy": 0.5}, "test": {"accuracy": 0.25}}
    runs = [
        {"logistic": fitted, "hist_gb": {"skipped": "no"}},
        {"logistic": {"skipped": "why"}, "hist_gb": {"skipped": "no"}},
    ]
    summary = summarize_baselines(runs)
    assert summary["logistic"]["valid"]["accuracy"]["mean"] == 0.5
    assert summary["logistic"]["skipped"] == "in 1 of 2 runs: why"
    assert summary["hist_gb"] == {"skipped": "no"}


# ---------------------------------------------------------------------------------------------
# The verdict


def test_the_verdict_leaves_out_skipped_baselines_and_undefined_scores():
    selection = ("accuracy", "max")
    ours = {"accuracy": 0.5}
    assert verdict(selection, ours, {"logistic": {"skipped": "why"}}) is None
    assert verdict(selection, ours, {"logistic": {"valid": {"accuracy": float("nan")}}}) is None
    found = verdict(selection, ours, {"logistic": {"skipped": "why"}, "hist_gb": {"valid": {"accuracy": 0.75}}})
    assert found["baseline"] == "hist_gb"


def test_verdict_compares_on_the_selection_metric_of_the_validation_split():
    mae, acc = ("mae", "min"), ("accuracy", "max")
    base = {"ridge": {"valid": {"mae": 1.0, "r2": 0.5}}, "hist_gb": {"valid": {"mae": 2.0, "r2": 0.1}}}
    found = verdict(mae, {"mae": 1.5, "r2": 0.9}, base)  # lower MAE wins even with a worse R²
    assert found == {
        "baseline": "ridge",
        "metric": "mae",
        "higher_is_better": False,
        "baseline_score": 1.0,
        "fusion_score": 1.5,
        "standard_error": None,
        "clear": True,
    }
    assert verdict(mae, {"mae": 0.9}, base) is None
    assert verdict(mae, {"mae": 1.0}, base) is None  # a tie is not "beats"
    summary = {"logistic": {"valid": {"accuracy": {"mean": 0.9, "std": 0.1}}}}
    assert verdict(acc, {"accuracy": {"mean": 0.8, "std": 0.0}}, summary)["baseline"] == "logistic"
    assert verdict(acc, {"accuracy": 0.95}, {"logistic": {"valid": {"accuracy": 0.9}}}) is None
    line = verdict_line(found, "self")
    assert "ridge" in line and "self" in line and "1.0000 vs 1.5000 (lower is better)" in line and "\n" not in line
    # Ahead by less than the fusion's standard error: level, not "beats".
    level = verdict(acc, {"accuracy": 0.990}, {"hist_gb": {"valid": {"accuracy": 0.9933}}}, se=0.0058)
    assert level["clear"] is False
    assert "is level with the concat fusion" in verdict_line(level, "concat") and "(0.0058)" in verdict_line(
        level, "concat"
    )
    assert verdict(acc, {"accuracy": 0.98}, {"hist_gb": {"valid": {"accuracy": 0.9933}}}, se=0.0058)["clear"]


# ---------------------------------------------------------------------------------------------
# Through attnfuse train


def test_ridge_wins_on_a_planted_linear_signal_rows_and_warning(tmp_path):
    data = linear_npz(tmp_path / "lin.npz")
    out = tmp_path / "m"
    result = cli("train", "--data", data, "--fusion", "concat", *TINY, "--out", out)
    assert result.exit_code == 0, result.stdout + result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["baselines"]) == {"ridge", "hist_gb"}
    for name in ("ridge", "hist_gb"):
        assert set(metrics["baselines"][name]) == {"train", "valid", "test"}
        assert set(metrics["baselines"][name]["test"]) == set(metrics["test"])  # the same metric names
    assert metrics["baselines"]["ridge"]["test"]["r2"] > 0.99 > metrics["test"]["r2"]
    text = " ".join(result.stdout.split())
    assert "ridge (baseline) valid" in text and "hist_gb (baseline) test" in text
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, result.stdout
    assert "the ridge baseline beats the concat fusion on the validation split" in text
    ridge = metrics["baselines"]["ridge"]["valid"]["rmse"]  # the loss is MSE: selection on RMSE
    assert f"rmse {ridge:.4f} vs {metrics['valid']['rmse']:.4f}" in text


def test_no_baselines_turns_them_off(tmp_path):
    data = linear_npz(tmp_path / "lin.npz")
    out = tmp_path / "m"
    result = cli("train", "--data", data, "--fusion", "concat", "--no-baselines", *TINY, "--out", out)
    assert result.exit_code == 0, result.stdout + result.stderr
    assert "baselines" not in json.loads((out / "metrics.json").read_text())
    assert "(baseline)" not in result.stdout and "warning:" not in result.stdout and "fitted in" not in result.stdout


def test_with_repeat_baselines_are_mean_and_std_over_the_same_splits(tmp_path):
    data = linear_npz(tmp_path / "lin.npz")
    spec = TrainSpec.from_options({"data": str(data), "fusion": "concat", "repeat": 2, "epochs": 2, "d_model": 8})
    result = train(spec)
    runs, summary = result.report["runs"], result.report["baselines"]
    for name in ("ridge", "hist_gb"):
        r2 = [r["baselines"][name]["test"]["r2"] for r in runs]
        assert summary[name]["test"]["r2"]["mean"] == pytest.approx(np.mean(r2))
        assert summary[name]["test"]["r2"]["std"] == pytest.approx(np.std(r2, ddof=1))
    # Each run's baselines were fitted on that run's training rows (the splits differ by seed).
    assert runs[0]["baselines"]["ridge"]["test"] != runs[1]["baselines"]["ridge"]["test"]
    assert result.verdict is not None and result.verdict["baseline"] == "ridge"
    assert result.verdict["fusion_score"] == pytest.approx(result.report["summary"]["valid"]["rmse"]["mean"])
