"""--ensemble K: K members from different seeds whose outputs are averaged, saved in one model
directory; and regression targets learned in standardised units."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from attnfuse.checkpoint import load_model
from attnfuse.cli import app
from attnfuse.data import MultimodalDataset, RowBatches
from attnfuse.ensemble import Ensemble, EnsembleSpec, build_ensemble
from attnfuse.fusion import build_model
from attnfuse.pipeline import TrainSpec, train
from attnfuse.training import TrainConfig, model_config, predict
from trainkit import train_one

SMALL = {"d_model": 8, "nhead": 2, "num_layers": 1}


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def toy(n=80, seed=0, task="classification", offset=0.0) -> MultimodalDataset:
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(n, 3)), rng.normal(size=(n, 4, 2))
    signal = a[:, 0] - b[:, :, 1].mean(axis=1)
    y = (signal > 0).astype(np.int64) if task == "classification" else (offset + 10 * signal).astype(np.float32)
    return MultimodalDataset({"a": a, "b": b}, y, masks={"b": np.arange(n) % 4 != 0})


def test_ensemble_output_is_the_mean_of_the_members_outputs():
    data = toy()
    config = model_config("self", data, **SMALL)
    torch.manual_seed(0)
    ensemble = build_ensemble("self", config, 3).eval()
    assert isinstance(ensemble, Ensemble) and len(ensemble.members) == 3
    batch = data.to_batch()
    members = torch.stack([m(batch) for m in ensemble.members])  # (K, B, C)
    torch.testing.assert_close(ensemble(batch), members.mean(dim=0))
    out, maps = ensemble(batch, return_attention=True)
    torch.testing.assert_close(out, members.mean(dim=0))
    assert [m.name for m in maps] == [f"member{k}/self/layer0" for k in range(3)]
    assert isinstance(build_ensemble("self", config, 1), type(build_model("self", config)))
    with pytest.raises(ValueError, match="ensemble: expected an integer >= 1, got 0"):
        build_ensemble("self", config, 0)


def test_train_fits_members_from_distinct_seeds_and_evaluates_their_average(tmp_path):
    path = tmp_path / "toy.npz"
    data = toy()
    np.savez(path, x_a=data.features["a"], x_b=data.features["b"], mask_b=data.masks["b"], y=data.y)
    options = {"data": str(path), "fusion": "concat", "d_model": 8, "epochs": 3, "batch_size": 16, "seed": 5,
               "baselines": False}  # fmt: skip
    events = []
    result = train(TrainSpec.from_options({**options, "ensemble": 3}), progress=lambda e, i: events.append((e, i)))
    model = result.first.model
    assert isinstance(model, Ensemble)
    assert sorted({i["member"] for e, i in events if e == "epoch"}) == [0, 1, 2]
    weights = [m.embed.proj["a"].weight for m in model.members]
    assert not torch.equal(weights[0], weights[1]) and not torch.equal(weights[1], weights[2])
    # Member 0 is the single model of that seed.
    single = train(TrainSpec.from_options(options)).first
    torch.testing.assert_close(model.members[0].state_dict(), single.model.state_dict())
    # The metrics are those of the averaged outputs.
    loaded = result.data
    batch = RowBatches(loaded, result.first.split["test"], result.first.standardizer).to_batch()
    mean = torch.stack([predict(m, batch) for m in model.members]).mean(dim=0)
    accuracy = (mean.argmax(dim=-1) == batch.y).double().mean().item()
    assert result.report["test"]["accuracy"] == pytest.approx(accuracy)
    # No two runs of --repeat (seeds 5, 6) share a member.
    seeds = {EnsembleSpec(3).seed(s, k) for s in (5, 6) for k in range(3)}
    assert len(seeds) == 6


def test_ensemble_model_directory_round_trip(tmp_path):
    path = tmp_path / "toy.npz"
    data = toy(task="regression")
    np.savez(path, x_a=data.features["a"], x_b=data.features["b"], mask_b=data.masks["b"], y=data.y)
    out = tmp_path / "m"
    result = cli("train", "--data", path, "--fusion", "concat", "--d-model", "8", "--epochs", "2", "--ensemble", "2",
                 "--no-baselines", "--out", out)  # fmt: skip
    assert result.exit_code == 0, result.stdout + result.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["ensemble"] == 2 and config["fusion"] == "concat"
    keys = load_file(out / "model.safetensors")
    assert {k.split(".")[1] for k in keys} == {"0", "1"} and all(k.startswith("members.") for k in keys)
    model, _, _ = load_model(out)
    assert isinstance(model, Ensemble) and len(model.members) == 2
    evaluated = tmp_path / "eval.json"
    assert cli("evaluate", "--model", out, "--data", path, "--out", evaluated).exit_code == 0
    trained = json.loads((out / "metrics.json").read_text())
    assert json.loads(evaluated.read_text())["test"] == pytest.approx(trained["test"], rel=1e-5)


def test_regression_targets_far_from_zero_train_as_well_as_centred_ones():
    # Before targets were standardised, an offset of 1000 left the network thousands of
    # lr-sized steps away from the right output scale: R² far below the centred data's.
    cfg = TrainConfig(epochs=30, batch_size=16, seed=0)
    centred = train_one(toy(200, task="regression"), "concat", {"d_model": 8}, cfg)
    shifted = train_one(toy(200, task="regression", offset=1000.0), "concat", {"d_model": 8}, cfg)
    assert centred.metrics["test"]["r2"] > 0.5
    assert shifted.metrics["test"]["r2"] == pytest.approx(centred.metrics["test"]["r2"], abs=0.02)
    model = shifted.model
    assert model.config.target_mean[0] == pytest.approx(1000.0, abs=5.0)
    assert model.target_std.item() == pytest.approx(model.config.target_std[0])
    assert "target_mean" not in model.state_dict()  # in config.json, not among the weights


def test_an_ensemble_is_explained_by_its_average_and_its_first_members_attention():
    from attnfuse.explain import explain_model

    data = toy()
    torch.manual_seed(0)
    ensemble = build_ensemble("self", model_config("self", data, **SMALL), 2).eval()
    expl = explain_model(ensemble, data, None, np.arange(20), methods="attention,mask,gxi,rollout", samples=[0])
    assert expl.fusion == "self (ensemble of 2)"
    assert any("ensemble of 2 members" in n for n in expl.notes)
    # Masking explains the ensemble's averaged output; attention is the first member's.
    alone = explain_model(ensemble.members[0], data, None, np.arange(20), methods="attention,mask", samples=[])
    assert expl.attention.received == pytest.approx(alone.attention.received)
    assert expl.masking.share() != pytest.approx(alone.masking.share())
