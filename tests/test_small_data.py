"""Small tables with several classes train with the default options: every run ends with exit 0,
the baselines that could be fitted, and a note for each that could not."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

from attnfuse.baselines import BASELINES
from clikit import cli, ok

QUICK = ["--epochs", "1", "--d-model", "8", "--batch-size", "32"]  # the fusion's settings: small and fast


def two_views(n_classes: int, per_class: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Two views of ``per_class`` rows of each of ``n_classes`` classes: a 4-feature vector that
    knows the class and a 3-step sequence of noise."""
    rng = np.random.default_rng(seed)
    y = np.arange(n_classes * per_class) % n_classes
    return {
        "x_a": (rng.normal(size=(y.size, 4)) + y[:, None]).astype(np.float32),
        "x_b": rng.normal(size=(y.size, 3, 2)).astype(np.float32),
        "y": y,
    }


def check_run(result, out) -> dict:
    """Exit 0, and each baseline either fitted (valid and test scores) or skipped with a note."""
    ok(result)
    metrics = json.loads((out / "metrics.json").read_text())
    baselines = metrics["baselines"] if "baselines" in metrics else metrics["summary"]["baselines"]
    assert set(baselines) == set(BASELINES["classification"])
    for name, parts in baselines.items():
        if "skipped" in parts:
            assert f"the {name} baseline was skipped" in result.stdout
        else:
            assert {"train", "valid", "test"} <= set(parts)
            assert f"{name} (baseline) valid" in result.stdout
    return baselines


# (classes, rows per class, fusion): concat for most, the default auto for a few.
GRID = [
    (classes, per_class, "auto" if (classes, per_class) in {(5, 8), (10, 8), (2, 40)} else "concat")
    for classes in (2, 5, 10)
    for per_class in (8, 15, 40)
]


@pytest.mark.parametrize(("classes", "per_class", "fusion"), GRID)
def test_a_small_table_with_several_classes_trains_with_the_default_options(tmp_path, classes, per_class, fusion):
    data = tmp_path / "small.npz"
    np.savez(data, **two_views(classes, per_class))
    out = tmp_path / "run"
    baselines = check_run(cli("train", "--data", data, "--fusion", fusion, *QUICK, "--out", out), out)
    # Gradient boosting without its early-stopping part on rows this few: every baseline fits.
    assert not any("skipped" in parts for parts in baselines.values())


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_small_table_file_of_five_classes_trains_with_the_default_options(tmp_path, suffix):
    arrays = two_views(5, 8)
    columns = {f"a_{j}": arrays["x_a"][:, j] for j in range(4)} | {f"b_{j}": arrays["x_b"][:, 0, j] for j in range(2)}
    table = pa.table({**columns, "y": arrays["y"]})
    data = tmp_path / f"small{suffix}"
    pa_csv.write_csv(table, data) if suffix == ".csv" else pq.write_table(table, data)
    out = tmp_path / "run"
    check_run(cli("train", "--data", data, "--fusion", "concat", *QUICK, "--out", out), out)


def test_a_baseline_that_cannot_be_fitted_is_skipped_with_a_note(tmp_path):
    """The data's split column puts a single class in the training rows: logistic regression
    refuses it; the run ends with exit 0, a note and the reason in metrics.json."""
    arrays = two_views(2, 15)
    split = np.array(["valid"] * arrays["y"].size, dtype=object)
    split[arrays["y"] == 0] = "train"
    split[-4:] = "test"
    data = tmp_path / "one_class.npz"
    np.savez(data, **arrays, split=split.astype(str))
    out = tmp_path / "run"
    baselines = check_run(cli("train", "--data", data, "--fusion", "concat", *QUICK, "--out", out), out)
    assert "skipped" in baselines["logistic"]
    assert "training rows of 1 class:" in baselines["logistic"]["skipped"]


def test_with_several_runs_a_baseline_skipped_in_every_run_is_noted_once(tmp_path, monkeypatch):
    import attnfuse.baselines as baselines_module

    real = baselines_module.make_baseline

    class Refuses:
        def fit(self, x, y):
            raise ValueError("injected: cannot fit")

    monkeypatch.setattr(
        baselines_module,
        "make_baseline",
        lambda name, *a, **k: Refuses() if name == "hist_gb" else real(name, *a, **k),
    )
    data = tmp_path / "small.npz"
    np.savez(data, **two_views(5, 8))
    out = tmp_path / "run"
    result = cli("train", "--data", data, "--fusion", "concat", "--repeat", "2", *QUICK, "--out", out)
    ok(result)
    metrics = json.loads((out / "metrics.json").read_text())
    assert "injected: cannot fit" in metrics["baselines"]["hist_gb"]["skipped"]
    assert all("injected" in run["baselines"]["hist_gb"]["skipped"] for run in metrics["runs"])
    assert "valid" in metrics["baselines"]["logistic"]
    assert result.stdout.count("the hist_gb baseline was skipped") == 1
