"""Users' data end to end through the command line: tables with string labels and missing values,
train/test-only splits, K folds, directory datasets, and predicting on data without targets."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from attnfuse.cli import app
from attnfuse.data import load_data, save_npz
from attnfuse.pipeline import TrainSpec, train
from clikit import assert_one_line

FAST = ["--fusion", "self", "--d-model", "8", "--heads", "2", "--layers", "1", "--epochs", "3", "--batch-size", "32"]


def cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result


def ok(result):
    assert result.exit_code == 0, f"{result.stdout}\n{result.stderr}"
    return " ".join(result.stdout.split())


def write_table(path: Path, n: int = 120, with_target: bool = True, split: bool = True, seed: int = 0) -> Path:
    """Columns txt_0..2 and aud_0..1 (two modalities), a string target, a train/test split column;
    every 7th row has no audio (missing values)."""
    rng = np.random.default_rng(seed)
    label = np.array(["cat", "dog", "owl"])[np.arange(n) % 3]
    rows = []
    for i in range(n):
        c = i % 3
        row = {f"txt_{j}": f"{c + rng.normal():.4f}" for j in range(3)}
        row |= {f"aud_{j}": "" if i % 7 == 0 else f"{-c + rng.normal():.4f}" for j in range(2)}
        if with_target:
            row["label"] = label[i]
        if split:
            row["fold"] = "test" if i % 5 == 0 else "train"
        rows.append(row)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_a_table_with_string_labels_and_a_train_test_split(tmp_path):
    table = write_table(tmp_path / "animals.csv")
    out = tmp_path / "run"
    said = ok(cli("train", "--data", table, "--target", "label", "--split-col", "fold", *FAST, "--out", out))
    assert "note: the split column has no 'valid' rows: carved" in said and "'test' rows untouched" in said
    config = json.loads((out / "config.json").read_text())
    assert config["data"]["classes"] == ["cat", "dog", "owl"]
    assert config["split"]["how"] == "carved" and config["read"]["target"] == "label"
    assert [m["name"] for m in config["data"]["modalities"]] == ["txt", "aud"]

    # evaluate reads the table as it was read in training (its target and split columns).
    ok(cli("evaluate", "--model", out, "--out", tmp_path / "eval.json"))
    recorded = json.loads((out / "metrics.json").read_text())
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    for part in ("train", "valid", "test"):
        assert evaluated[part] == pytest.approx(recorded[part], abs=1e-6), part

    # New rows without a target: predictions only, in the original labels.
    new = write_table(tmp_path / "new.csv", n=30, with_target=False, split=False, seed=1)
    ok(cli("predict", "--model", out, "--data", new, "--out", tmp_path / "pred.csv"))
    rows = read_csv(tmp_path / "pred.csv")
    assert len(rows) == 30 and "y_true" not in rows[0] and "split" not in rows[0]
    assert {r["y_pred"] for r in rows} <= {"cat", "dog", "owl"}
    assert [k for k in rows[0] if k.startswith("prob_")] == ["prob_cat", "prob_dog", "prob_owl"]

    # explain reads another table with the reading options given (here its target is "kind").
    other = tmp_path / "other.csv"
    other.write_text(table.read_text().replace("label", "kind"))
    result = cli("explain", "--model", out, "--data", other, "--split", "all", "--method", "mask",
                 "--out", tmp_path / "x")  # fmt: skip
    assert_one_line(result, 2, "needs the targets", "--target")  # the model's target column 'label' is absent
    ok(cli("explain", "--model", out, "--data", other, "--target", "kind", "--split-col", "fold", "--method", "mask",
           "--out", tmp_path / "x"))  # fmt: skip
    assert (tmp_path / "x" / "report.html").is_file()


def test_carved_validation_and_early_stopping_never_touch_test_rows(tmp_path):
    table = write_table(tmp_path / "t.csv")
    spec = TrainSpec.from_options(
        {"data": str(table), "target": "label", "split_col": "fold", "fusion": "concat", "epochs": 2, "d_model": 8}
    )
    result = train(spec)
    column = load_data(str(table), target="label", split_col="fold").split
    split = result.first.split
    assert split.carved
    np.testing.assert_array_equal(split["test"], np.flatnonzero(column == "test"))
    assert set(split["valid"]) <= set(np.flatnonzero(column == "train"))
    assert set(split["train"]).isdisjoint(split["valid"])


def test_evaluate_refuses_data_without_targets(tmp_path):
    out = tmp_path / "run"
    ok(cli("train", "--data", write_table(tmp_path / "t.csv", split=False), "--target", "label", *FAST, "--out", out))
    new = write_table(tmp_path / "new.csv", n=12, with_target=False, split=False)
    result = cli("evaluate", "--model", out, "--data", new, "--out", tmp_path / "e.json")
    assert result.exit_code == 2 and "has no targets to evaluate against" in result.stderr
    result = cli("train", "--data", new, "--task", "classification", *FAST, "--out", tmp_path / "never")
    assert result.exit_code == 2 and "training needs them" in result.stderr
    assert not (tmp_path / "never").exists() and not (tmp_path / "e.json").exists()


def test_folds_are_the_runs(tmp_path):
    data = write_table(tmp_path / "t.csv", split=False)
    out = tmp_path / "cv"
    said = ok(cli("train", "--data", data, "--target", "label", *FAST, "--folds", "3", "--out", out))
    assert "mean ± std over 3 folds" in said
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["fold"] for r in metrics["runs"]] == [0, 1, 2]
    assert set(metrics["summary"]["test"]) == {"accuracy", "f1_macro"}
    config = json.loads((out / "config.json").read_text())
    assert config["split"] == {"how": "fold", "seed": 0, "folds": 3, "fold": 0}
    # evaluate recovers the first fold's parts from the config.
    ok(cli("evaluate", "--model", out, "--out", tmp_path / "e.json"))
    evaluated = json.loads((tmp_path / "e.json").read_text())
    assert evaluated["test"] == pytest.approx(metrics["runs"][0]["test"], abs=1e-6)
    result = cli("train", "--data", data, *FAST, "--folds", "3", "--repeat", "2", "--out", tmp_path / "never")
    assert result.exit_code == 2 and "--repeat must be 1" in result.stderr


def test_a_directory_dataset_trains_like_its_npz(tmp_path):
    """The same rows memory-mapped from a directory or loaded from an .npz: the same run."""
    data = load_data("synthetic-classification", seed=3).subset(np.arange(300))
    npz = tmp_path / "d.npz"
    save_npz(data, npz)
    ok(cli("convert", npz, tmp_path / "d"))
    runs = {}
    for name, source in (("npz", npz), ("dir", tmp_path / "d")):
        ok(cli("train", "--data", source, *FAST, "--out", tmp_path / name))
        runs[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    assert runs["dir"] == runs["npz"]
