"""The weighted ensemble ``--fusion auto`` saves: the candidates and the baselines averaged with the
weights greedy ensemble selection fitted on the validation rows; the mathematics of the average, the
model directory that holds it, and every command that reads one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from attnfuse.checkpoint import load_model, read_config
from attnfuse.cli import app
from attnfuse.data import Batch, MultimodalDataset, save_npz
from attnfuse.ensemble import WeightedEnsemble, build_recorded, weighted_record
from attnfuse.pipeline import TrainSpec, train

FAST = {"d_model": 16, "nhead": 2, "num_layers": 1, "epochs": 4, "batch_size": 32, "bags": 3}  # 3 bags: the tests' time


class Fixed(nn.Module):
    """Returns the same outputs for every batch (B rows of ``out``), counting its calls."""

    def __init__(self, out: list[float]) -> None:
        super().__init__()
        self.out = nn.Parameter(torch.tensor(out))
        self.calls = 0

    def forward(self, batch: Batch, return_attention: bool = False):
        self.calls += 1
        out = self.out.expand(len(batch), -1)
        return (out, []) if return_attention else out


def batch_of(n: int) -> Batch:
    return Batch(x={"a": torch.zeros(n, 1, 2)}, mask={"a": torch.ones(n, 1, dtype=torch.bool)})


def test_regression_is_the_weighted_mean_of_the_values():
    net = WeightedEnsemble({"f": Fixed([1.0]), "g": Fixed([5.0])}, {"f": 0.75, "g": 0.25}, "regression", "f")
    torch.testing.assert_close(net(batch_of(3)), torch.full((3, 1), 2.0))


def test_classification_is_the_mixture_of_the_probabilities_as_logits():
    f, g = [2.0, 0.0, -1.0], [0.0, 3.0, 0.0]
    net = WeightedEnsemble({"f": Fixed(f), "g": Fixed(g)}, {"f": 0.4, "g": 0.6}, "classification", "f")
    expected = 0.4 * torch.softmax(torch.tensor(f), -1) + 0.6 * torch.softmax(torch.tensor(g), -1)
    got = torch.softmax(net(batch_of(2)), dim=-1)
    torch.testing.assert_close(got, expected.expand(2, -1), rtol=1e-6, atol=1e-7)


def test_a_part_of_weight_zero_is_not_run_and_attention_comes_from_the_primary():
    f, g = Fixed([1.0]), Fixed([2.0])
    net = WeightedEnsemble({"f": f, "g": g}, {"f": 0.0, "g": 1.0}, "regression", "f")
    torch.testing.assert_close(net(batch_of(2)), torch.full((2, 1), 2.0))
    assert f.calls == 0
    _out, maps = net(batch_of(2), return_attention=True)
    assert f.calls == 1 and maps == []  # the primary's maps, though it carries nothing


@pytest.mark.parametrize(
    ("weights", "primary", "match"),
    [
        ({"f": 0.5}, "f", "one weight per part"),
        ({"f": 0.5, "g": 0.6}, "f", "summing to 1"),
        ({"f": -0.5, "g": 1.5}, "f", "summing to 1"),
        ({"f": 0.5, "g": 0.5}, "h", "primary"),
    ],
)
def test_bad_weights_are_refused(weights, primary, match):
    with pytest.raises(ValueError, match=match):
        WeightedEnsemble({"f": Fixed([1.0]), "g": Fixed([2.0])}, weights, "regression", primary)


def linear_table(n: int = 240, seed: int = 0) -> MultimodalDataset:
    """A target linear in two vector views, with noise: ridge regression is the right model, and a
    network trained a few epochs on a few hundred rows is not."""
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(n, 4)), rng.normal(size=(n, 3))
    y = a @ np.array([1.0, -2.0, 0.5, 0.0]) + b @ np.array([1.5, 0.0, -1.0]) + 0.3 * rng.normal(size=n)
    return MultimodalDataset({"a": a, "b": b}, y.astype(np.float32), name="linear")


def two_classes(n: int = 240, seed: int = 0) -> MultimodalDataset:
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(n, 4)), rng.normal(size=(n, 3))
    y = (a[:, 0] - b[:, 1] + 0.5 * rng.normal(size=n) > 0).astype(np.int64)
    return MultimodalDataset({"a": a, "b": b}, y, name="two-classes")


@pytest.fixture(scope="module", params=["regression", "classification"])
def trained(request, tmp_path_factory):
    """``attnfuse train`` at its defaults (auto, baselines) on a small table: the saved model, its data."""
    tmp = tmp_path_factory.mktemp(request.param)
    data = linear_table() if request.param == "regression" else two_classes()
    path = tmp / "data.npz"
    save_npz(data, path)
    out = tmp / "model"
    result = train(TrainSpec.from_options({"data": str(path), **FAST}), out)
    return out, path, result


def test_auto_saves_the_weighted_ensemble_it_reports(trained):
    out, _, _result = trained
    config = read_config(out)
    report = json.loads((out / "metrics.json").read_text())
    weights = report["weighted"]["weights"]
    assert abs(sum(weights.values()) - 1) < 1e-9
    assert set(weights) == {"concat", "self", "self-modality", "ridge" if "ridge" in weights else "logistic", "hist_gb"}
    kept = {n for n, w in weights.items() if w > 0}
    if "weighted" in config:
        saved = {p["name"]: p["weight"] for p in config["weighted"]["parts"]}
        assert {n for n, w in saved.items() if w > 0} == kept
        assert saved == pytest.approx({n: weights[n] for n in saved}, abs=1e-12)
        assert config["fusion"] == next(
            p["fusion"] for p in config["weighted"]["parts"] if p["name"] == config["weighted"]["primary"]
        )
    else:  # the ensemble is one candidate: saved as that model
        assert len(kept) == 1 and kept <= {"concat", "self", "self-modality"}


def test_the_ensemble_is_never_worse_than_its_best_member_on_the_validation_rows(trained):
    _, _, result = trained
    record = result.report["weighted"]
    better = max if record["higher_is_better"] else min
    assert record["score"] == better(record["score"], *record["members"].values())


def test_evaluate_of_the_saved_model_gives_the_numbers_of_metrics_json(trained, tmp_path):
    out, path, _ = trained
    report = json.loads((out / "metrics.json").read_text())
    written = tmp_path / "evaluation.json"
    result = CliRunner().invoke(app, ["evaluate", "--model", str(out), "--data", str(path), "--out", str(written)])
    assert result.exit_code == 0, result.output
    evaluated = json.loads(written.read_text())
    for metric, value in report["test"].items():
        assert evaluated["test"][metric] == pytest.approx(value, rel=1e-5, abs=1e-6), metric


def test_evaluate_counts_a_bagged_models_validation_rows_as_training_rows(trained, tmp_path):
    """The fixture's models are bagged (240 rows): every bag but one trained on each validation
    row, so evaluate lists those rows under "train", not as a held-out "valid", and says why."""
    out, path, _ = trained
    assert read_config(out)["auto"]["bags"] == 3
    written = tmp_path / "evaluation.json"
    result = CliRunner().invoke(app, ["evaluate", "--model", str(out), "--data", str(path), "--out", str(written)])
    assert result.exit_code == 0, result.output
    assert "its bags trained on the validation rows too" in " ".join(result.output.split())
    evaluated = json.loads(written.read_text())
    assert "valid" not in evaluated and {"train", "test", "all"} <= set(evaluated)


def test_robustness_measures_and_names_the_whole_ensemble(trained):
    """evaluate --missing on an auto model measures the weighted ensemble (not its primary fusion)
    and names it so, beside the baselines."""
    from attnfuse.pipeline import load_trained
    from attnfuse.robustness import ENSEMBLE, missing_modalities, robustness_table

    out, path, _ = trained
    net, config, standardizer, data = load_trained(out, str(path))
    if "weighted" not in config:
        pytest.skip("this run's ensemble is one candidate")
    result = missing_modalities(net, config, standardizer, data, fractions=[0.0, 1.0], scales=[0.0])
    assert result.models[0] == ENSEMBLE and len(result.models) == 3
    (_title, _header, rows), *_ = robustness_table(result)
    assert rows[0][1] == f"{ENSEMBLE} (the model)"


def test_predict_of_the_saved_model_gives_its_test_predictions(trained, tmp_path):
    out, path, _ = trained
    written = tmp_path / "predictions.csv"
    result = CliRunner().invoke(app, ["predict", "--model", str(out), "--data", str(path), "--out", str(written)])
    assert result.exit_code == 0, result.output
    assert written.exists() and len(written.read_text().splitlines()) == 241  # a header and every row


def test_the_saved_record_rebuilds_the_model_with_the_same_tensors(trained):
    out, _, _result = trained
    net, config, _ = load_model(out)
    rebuilt = build_recorded({**config, "ensemble": config["train"].get("ensemble", 1)})
    assert {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} == {
        k: tuple(v.shape) for k, v in net.state_dict().items()
    }
    if isinstance(net, WeightedEnsemble):
        assert weighted_record(net) == config["weighted"]


def test_no_baselines_keeps_the_ensemble_to_fusion_models(tmp_path):
    path = tmp_path / "data.npz"
    save_npz(linear_table(), path)
    result = train(TrainSpec.from_options({"data": str(path), "baselines": False, **FAST}), tmp_path / "m")
    assert set(result.report["weighted"]["weights"]) == {"concat", "self", "self-modality"}
    assert "baselines" not in result.report


def with_config(model: Path, copy: Path, config: dict) -> Path:
    """A copy of the model directory ``model`` at ``copy`` whose config.json is ``config``."""
    copy.mkdir()
    for f in model.iterdir():
        if f.is_file():
            (copy / f.name).write_bytes(f.read_bytes())
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def test_a_damaged_weighted_block_is_refused_in_one_line(trained, tmp_path):
    out, _path, _ = trained
    config = read_config(out)
    if "weighted" not in config:
        pytest.skip("this run's ensemble is one candidate")
    for damage in (
        lambda w: w["parts"][0].update(weight=2.0),
        lambda w: w.update(primary="nobody"),
        lambda w: w["parts"][0].update(kind="pickle"),
        lambda w: w.update(parts=[]),
    ):
        bad = json.loads(json.dumps(config))
        damage(bad["weighted"])
        copy = with_config(out, tmp_path / f"m{id(damage)}", bad)
        with pytest.raises(ValueError, match=r"^model: .*config.json: weighted") as e:
            read_config(copy)
        assert "\n" not in str(e.value)


def test_a_head_record_larger_than_its_weights_is_refused_before_anything_is_allocated(trained, tmp_path):
    """A config.json whose baseline head claims a billion nodes (a hostile or damaged file): read_config
    compares the record's buffer shapes with the weights file's header and refuses in one line."""
    out, _path, _ = trained
    config = read_config(out)
    if "weighted" not in config or not any(p["kind"] == "baseline" for p in config["weighted"]["parts"]):
        pytest.skip("this run's ensemble holds no baseline")
    bad = json.loads(json.dumps(config))
    head = next(p for p in bad["weighted"]["parts"] if p["kind"] == "baseline")["head"]
    head.update({"n_iter": 10**9, "nodes": 10**9} if head["kind"] == "tree" else {"raw_dim": 10**9})
    copy = with_config(out, tmp_path / "m", bad)
    with pytest.raises(ValueError, match=r"^model: .*config.json's head describes .* as shape \[") as e:
        read_config(copy)
    assert "\n" not in str(e.value)


def test_out_of_fold_outputs_come_from_the_bag_that_held_each_row_out(monkeypatch):
    """A bagged candidate's out-of-fold outputs cover every train + valid row of the run once, each
    the output of the models of the one bag that did not train on it."""
    import attnfuse.fit as fit_module
    from attnfuse.training import predict

    seen = []
    real = fit_module._bag

    def spy(fit, parts, bagged, members):
        model = real(fit, parts, bagged, members)
        seen.append((parts, bagged, members, model))
        return model

    monkeypatch.setattr(fit_module, "_bag", spy)
    options = {
        "fusion": "auto",
        "ensemble": 2,
        "bags": 3,
        "baselines": False,
        "d_model": 8,
        "epochs": 2,
        "batch_size": 32,
    }
    train(TrainSpec.from_options(options), data=two_classes(120))
    assert len(seen) == 3  # one per candidate
    for parts, bagged, members, model in seen:
        pool = np.sort(np.concatenate([parts.split["train"], parts.split["valid"]]))
        np.testing.assert_array_equal(model.valid_rows, pool)
        assert len(bagged) == 3 and len(members) == 3 * 2
        for b, bag in enumerate(bagged):
            out = torch.stack([predict(m.model, bag.sources["valid"]) for m in members[2 * b : 2 * b + 2]]).mean(0)
            at = np.searchsorted(pool, bag.split["valid"])
            np.testing.assert_array_equal(model.valid_outputs[at], out.numpy())
            assert not np.isin(bag.split["valid"], bag.split["train"]).any()


def test_the_weighted_ensemble_exports_to_onnx_with_its_baselines(trained, tmp_path):
    """`attnfuse export` of the saved ensemble (fusion models and baseline heads in one graph), checked
    by the command itself against the model on rows with padding and absent modalities."""
    pytest.importorskip("onnxruntime")
    out, _, _ = trained
    result = CliRunner().invoke(app, ["export", "--model", str(out), "--out", str(tmp_path / "m.onnx")])
    assert result.exit_code == 0, result.output
    assert "checked against the model" in result.output


def test_unbagged_auto_early_stops_on_one_validation_half_and_weighs_on_the_other(monkeypatch):
    """With enough validation rows and no bags, the candidates early-stop on one half of the
    validation rows; the ensemble is weighed, and its intervals fitted, on the other half, rows
    no choice was made on; the run's model is still assessed on all of them."""
    from attnfuse.fit import HELD_ROWS
    from attnfuse.training import Trainer

    stopped_on = []
    real = Trainer.fit

    def spy(self, train_source, valid_source, *args, **kwargs):
        stopped_on.append(np.asarray(valid_source.rows))
        return real(self, train_source, valid_source, *args, **kwargs)

    monkeypatch.setattr(Trainer, "fit", spy)
    options = {**FAST, "epochs": 2, "bags": 0, "interval": 0.8}
    result = train(TrainSpec.from_options(options), data=linear_table(800))  # 120 validation rows
    assert HELD_ROWS <= 120
    weighted = result.report["weighted"]
    assert weighted["fitted_on"] == "held-out validation" and weighted["rows"] == 60
    held, valid = result.first.valid_rows, result.first.split["valid"]
    assert len(stopped_on) == 3 and len(valid) == 120  # three candidates; the model assessed on all 120
    for rows in stopped_on:  # each candidate early-stopped on the other half
        np.testing.assert_array_equal(np.sort(np.concatenate([rows, held])), np.sort(valid))
    assert result.report["calibration"]["rows"] == 60


def test_bags_zero_weighs_on_the_validation_rows_and_one_bag_is_refused(tmp_path):
    options = {"baselines": False, **FAST, "epochs": 2, "bags": 0}
    result = train(TrainSpec.from_options(options), data=linear_table(120))
    assert result.report["weighted"]["fitted_on"] == "validation" and "bags" not in result.report["weighted"]
    three = train(TrainSpec.from_options({**options, "bags": 3}), data=linear_table(120))
    assert three.report["weighted"]["bags"] == 3
    with pytest.raises(ValueError, match="bags: expected 0 \\(no bagging\\) or an integer >= 2, got 1"):
        TrainSpec.from_options({"bags": 1})
