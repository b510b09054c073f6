"""Tests for attnfuse.checkpoint: safetensors + JSON model directories, compatibility checks."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from attnfuse.checkpoint import (
    CONFIG,
    METRICS,
    WEIGHTS,
    _finite,
    check_compatible,
    load_model,
    read_config,
    save_model,
)
from attnfuse.data import MultimodalDataset
from attnfuse.files import write_json
from attnfuse.fusion import build_model, config_from_dict
from attnfuse.training import TrainConfig, predict
from trainkit import train_one

FUSIONS = ["concat", "self", "cross", "bicross", "mult"]


def make_data(n: int = 60, num_classes: int = 3, seed: int = 0, b_dim: int = 2, steps: int = 3) -> MultimodalDataset:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % num_classes
    a = rng.normal(size=(n, 4)) + y[:, None]
    b = rng.normal(size=(n, steps, b_dim))
    mask = np.ones((n, steps), dtype=bool)
    mask[::4, -1] = False
    return MultimodalDataset({"a": a.astype(np.float32), "b": b.astype(np.float32)}, y, masks={"b": mask}, name="toy")


def overrides(fusion: str) -> dict:
    if fusion == "concat":
        return {"d_model": 8}
    over = {"d_model": 8, "nhead": 2, "num_layers": 1}
    return {**over, "self_layers": 1} if fusion == "mult" else over


def assert_not_pickle(path) -> None:
    head = path.read_bytes()[:4]
    assert not head.startswith(b"\x80"), f"{path.name} is a pickle"
    assert not head.startswith(b"PK"), f"{path.name} is a zip (torch.save) archive"


@pytest.mark.parametrize("fusion", FUSIONS)
def test_save_load_roundtrip_gives_the_same_predictions(tmp_path, fusion):
    data = make_data()
    cfg = TrainConfig(epochs=1, seed=0)
    result = train_one(data, fusion, overrides(fusion), cfg)
    save_model(
        tmp_path,
        result.model,
        fusion,
        data,
        result.standardizer,
        {"epochs": 1, "seed": 0},
        split={"how": "drawn", "seed": 0},
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([WEIGHTS, CONFIG])

    model, config, standardizer = load_model(tmp_path)
    assert not model.training
    assert type(model) is type(result.model) and config["fusion"] == fusion
    assert config["data"]["name"] == "toy" and config["data"]["n"] == data.n
    assert config["data"]["num_classes"] == 3 and config["split"] == {"how": "drawn", "seed": 0}
    for name in ("a", "b"):
        np.testing.assert_array_equal(standardizer.mean[name], result.standardizer.mean[name])
        np.testing.assert_array_equal(standardizer.std[name], result.standardizer.std[name])
    before = predict(result.model, result.standardizer.transform(data).to_batch())
    after = predict(model, standardizer.transform(data).to_batch())
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    # Every weight came back (none silently re-initialised).
    saved = result.model.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key


def test_checkpoint_files_are_safetensors_and_json_never_pickle(tmp_path):
    data = make_data()
    result = train_one(data, "cross", overrides("cross"), TrainConfig(epochs=1))
    save_model(
        tmp_path, result.model, "cross", data, result.standardizer, {"seed": 0}, split={"how": "drawn", "seed": 0}
    )
    write_json(tmp_path / METRICS, result.metrics)
    files = sorted(tmp_path.iterdir())
    assert [p.name for p in files] == sorted([WEIGHTS, CONFIG, METRICS])  # no stray temporary files
    for path in files:
        assert_not_pickle(path)
    # safetensors: 8-byte little-endian header size, then a JSON header.
    raw = (tmp_path / WEIGHTS).read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + size])
    assert header["__metadata__"] == {"fusion": "cross"}
    with safe_open(str(tmp_path / WEIGHTS), framework="pt") as f:
        assert set(f.keys()) == set(result.model.state_dict())
    for name in (CONFIG, METRICS):
        json.loads((tmp_path / name).read_text())


def test_config_json_holds_everything_to_rebuild(tmp_path):
    data = make_data()
    result = train_one(data, "bicross", overrides("bicross"), TrainConfig(epochs=1))
    save_model(
        tmp_path, result.model, "bicross", data, result.standardizer, {"lr": 0.5}, split={"how": "drawn", "seed": 7}
    )
    config = json.loads((tmp_path / CONFIG).read_text())
    assert config["model"]["d_model"] == 8 and config["model"]["query"] == "a" and config["model"]["context"] == ["b"]
    assert config["train"] == {"lr": 0.5} and config["split"]["seed"] == 7
    assert [m["name"] for m in config["data"]["modalities"]] == ["a", "b"]
    assert set(config["standardizer"]) == {"a", "b"}


@pytest.mark.parametrize(
    "change, needle",
    [
        (lambda c: c.pop("split"), "split: missing"),
        (lambda c: c.pop("weights_id"), "weights_id: missing"),
        (lambda c: c["split"].update(how="guessed"), "split.how: expected one of 'column', 'carved', 'drawn', 'fold'"),
        (lambda c: c["split"].update(how="fold", folds=3, fold=3), "split.fold: expected a fold in 0..2, got 3"),
    ],
)
def test_a_config_without_how_its_parts_were_made_or_its_weights_id_is_refused(tmp_path, change, needle):
    data = make_data()
    result = train_one(data, "concat", {"d_model": 8}, TrainConfig(epochs=1))
    save_model(tmp_path, result.model, "concat", data, result.standardizer, {}, split={"how": "drawn", "seed": 0})
    config = json.loads((tmp_path / CONFIG).read_text())
    change(config)
    (tmp_path / CONFIG).write_text(json.dumps(config))
    with pytest.raises(ValueError, match=needle):
        read_config(tmp_path)


def test_load_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        load_model(tmp_path)
    data = make_data()
    result = train_one(data, "concat", {"d_model": 8}, TrainConfig(epochs=1))
    save_model(tmp_path, result.model, "concat", data, result.standardizer, {}, split={"how": "drawn", "seed": 0})
    (tmp_path / CONFIG).write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        load_model(tmp_path)


def test_save_overwrites_in_place(tmp_path):
    data = make_data()
    for seed in (0, 1):
        result = train_one(data, "concat", {"d_model": 8}, TrainConfig(epochs=1, seed=seed))
        save_model(
            tmp_path,
            result.model,
            "concat",
            data,
            result.standardizer,
            {"seed": seed},
            split={"how": "drawn", "seed": seed},
        )
    _model, config, _ = load_model(tmp_path)
    assert config["train"] == {"seed": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([WEIGHTS, CONFIG])


@pytest.fixture(scope="module")
def trained_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    data = make_data()
    result = train_one(data, "self", overrides("self"), TrainConfig(epochs=1))
    save_model(path, result.model, "self", data, result.standardizer, {}, split={"how": "drawn", "seed": 0})
    return load_model(path)[1]


def test_check_compatible_accepts_the_same_layout(trained_config):
    check_compatible(trained_config, make_data(seed=3, n=10))
    check_compatible(trained_config, make_data(n=10, num_classes=2))  # fewer classes: fine


@pytest.mark.parametrize(
    "data, match",
    [
        (lambda: make_data(n=12, num_classes=4), "3 classes"),
        (lambda: make_data(n=12, b_dim=5), "'b'.*feature size 2.*got 5"),
        (lambda: make_data(n=12, steps=4), "'b'.*sequences of 3 steps.*got sequences of 4"),
        (lambda: make_data(n=12, steps=2), "'b'.*sequences of 3 steps.*pad shorter ones"),
        (lambda: MultimodalDataset({"a": np.zeros((4, 4), np.float32)}, np.array([0, 1, 2, 0])), "'b' is missing"),
        (
            lambda: MultimodalDataset(
                {
                    "a": np.zeros((4, 4), np.float32),
                    "b": np.zeros((4, 3, 2), np.float32),
                    "z": np.zeros((4, 1), np.float32),
                },
                np.array([0, 1, 2, 0]),
            ),
            "'z'",
        ),
        (
            lambda: MultimodalDataset(
                {"a": np.zeros((4, 4), np.float32), "b": np.zeros((4, 2), np.float32)}, np.array([0, 1, 2, 0])
            ),
            "'b'.*sequence",
        ),
        (
            lambda: MultimodalDataset(
                {"a": np.zeros((4, 4), np.float32), "b": np.zeros((4, 3, 2), np.float32)}, np.zeros(4, np.float32)
            ),
            "classification",
        ),
    ],
    ids=["classes", "dim", "longer", "shorter", "missing", "extra", "vector-vs-sequence", "task"],
)
def test_check_compatible_names_what_differs(trained_config, data, match):
    with pytest.raises(ValueError, match=match):
        check_compatible(trained_config, data())


def test_check_compatible_regression_target_count(tmp_path):
    rng = np.random.default_rng(0)
    data = MultimodalDataset({"a": rng.normal(size=(30, 3)).astype(np.float32)}, rng.normal(size=(30, 2)))
    result = train_one(data, "concat", {"d_model": 8}, TrainConfig(epochs=1))
    save_model(tmp_path, result.model, "concat", data, result.standardizer, {}, split={"how": "drawn", "seed": 0})
    config = load_model(tmp_path)[1]
    assert config["data"]["target_dim"] == 2 and config["model"]["out_dim"] == 2
    check_compatible(config, data)
    one = MultimodalDataset({"a": np.zeros((4, 3), np.float32)}, np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="predicts 2 targets.*has 1"):
        check_compatible(config, one)


def test_damaged_model_directory_is_a_value_error(tmp_path, trained_config):
    model_dir = tmp_path / "damaged"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(trained_config))
    (model_dir / "model.safetensors").write_bytes(b"\x00" * 40)  # truncated / not safetensors
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_model(model_dir)
    broken = {k: v for k, v in trained_config.items() if k != "standardizer"}
    (model_dir / "config.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="config.json: standardizer: missing"):
        load_model(model_dir)


# ---------------------------------------------------------------------------------------------
# The checks that bound an untrusted model directory


@settings(max_examples=40, deadline=None)
@given(
    fusion=st.sampled_from(FUSIONS),
    d_model=st.sampled_from([2, 4, 8, 12]),
    num_layers=st.integers(1, 3),
    ff=st.one_of(st.none(), st.integers(1, 24)),
    dims=st.lists(st.integers(1, 9), min_size=2, max_size=3),
    out_dim=st.integers(1, 7),
    hidden=st.one_of(st.none(), st.integers(1, 16)),
    pooling=st.sampled_from(["mean", "attention"]),
)
def test_num_parameters_is_a_lower_bound(fusion, d_model, num_layers, ff, dims, out_dim, hidden, pooling):
    """The bound used to refuse a config before building it never exceeds the real count."""
    modalities = [{"name": f"m{i}", "dim": d, "length": 1 + i, "is_sequence": i > 0} for i, d in enumerate(dims)]
    values = {"modalities": modalities, "out_dim": out_dim, "d_model": d_model, "head_hidden": hidden}
    if fusion != "concat":
        values.update(nhead=2, num_layers=num_layers, dim_feedforward=ff)
        values["pooling"] = "mean" if fusion == "mult" else pooling
    model = build_model(fusion, config_from_dict(fusion, values))
    assert model.config.num_parameters() <= sum(p.numel() for p in model.parameters())


@given(
    values=st.lists(
        st.one_of(st.floats(width=32), st.sampled_from([3e38, -3e38, math.inf, -math.inf, math.nan])), min_size=1
    )
)
def test_finite_check_agrees_with_numpy(values):
    """The fast check (a sum, element-wise only when the sum is not finite) against np.isfinite."""
    t = torch.tensor(values, dtype=torch.float32)
    assert _finite(t) == bool(np.isfinite(t.numpy()).all())
