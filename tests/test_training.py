"""Tests for attnfuse.training: determinism, early stopping, standardisation, losses, metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attnfuse.data import MultimodalDataset, Standardizer, make_split
from attnfuse.metrics import PRIMARY_METRIC, summarize
from attnfuse.training import TrainConfig, model_config, predict, to_predictions
from trainkit import train_one

SMALL = {"d_model": 16, "nhead": 2, "num_layers": 1}


def classification_data(n: int = 150, seed: int = 0, noise: float = 1.0) -> MultimodalDataset:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, size=n)
    proto = rng.normal(size=(3, 4))
    a = proto[y] + noise * rng.normal(size=(n, 4))
    b = rng.normal(size=(n, 3, 2)) + y[:, None, None] * 0.5
    return MultimodalDataset({"a": a.astype(np.float32), "b": b.astype(np.float32)}, y)


def regression_data(n: int = 120, k: int | None = None, seed: int = 0, noise: float = 0.1) -> MultimodalDataset:
    rng = np.random.default_rng(seed)
    a, c = rng.normal(size=(n, 4)), rng.normal(size=(n, 3))
    w = rng.normal(size=(7, k or 1))
    y = np.concatenate([a, c], axis=1) @ w + noise * rng.normal(size=(n, k or 1))
    y = y[:, 0] if k is None else y
    return MultimodalDataset({"a": a.astype(np.float32), "c": c.astype(np.float32)}, y.astype(np.float32))


# ---------------------------------------------------------------------------------------------
# Determinism


@pytest.mark.parametrize("fusion", ["self", "cross"])
def test_same_seed_gives_identical_metrics_and_weights(fusion):
    data = classification_data()
    cfg = TrainConfig(epochs=3, batch_size=32, seed=5)
    r1, r2 = train_one(data, fusion, SMALL, cfg), train_one(data, fusion, SMALL, cfg)
    assert r1.metrics == r2.metrics and r1.history == r2.history and r1.best_epoch == r2.best_epoch
    s1, s2 = r1.model.state_dict(), r2.model.state_dict()
    assert s1.keys() == s2.keys()
    for key in s1:
        assert torch.equal(s1[key], s2[key]), key
    # A different seed gives a different model (the seed is really used).
    r3 = train_one(data, fusion, SMALL, TrainConfig(epochs=3, batch_size=32, seed=6))
    assert any(not torch.equal(s1[k], r3.model.state_dict()[k]) for k in s1)


def test_split_seed_overrides_the_split_only():
    data = classification_data()
    cfg = TrainConfig(epochs=1, batch_size=32, seed=0)
    a = train_one(data, "concat", {"d_model": 8}, cfg, split_seed=1)
    b = train_one(data, "concat", {"d_model": 8}, cfg, split_seed=2)
    # Standardiser statistics come from different training rows.
    assert not np.array_equal(a.standardizer.mean["a"], b.standardizer.mean["a"])


# ---------------------------------------------------------------------------------------------
# Early stopping


def test_early_stopping_restores_the_best_validation_weights():
    # Few, noisy samples and a high learning rate: validation MAE bottoms out early, then worsens.
    # (Training with L1, early stopping selects on the validation MAE.)
    data = regression_data(n=60, noise=1.0, seed=3)
    cfg = TrainConfig(epochs=80, batch_size=8, lr=1e-2, weight_decay=0.0, patience=4, seed=0, loss="l1")
    epochs_seen = []
    result = train_one(data, "self", {**SMALL, "dropout": 0.0}, cfg, on_epoch=epochs_seen.append)
    history = result.history
    assert [r["epoch"] for r in history] == list(range(1, len(history) + 1))
    assert len(history) < cfg.epochs, "expected early stopping"
    # Stopped exactly `patience` epochs after the best one.
    assert len(history) == result.best_epoch + cfg.patience
    maes = [r["valid_mae"] for r in history]
    assert result.best_epoch == int(np.argmin(maes)) + 1
    # The callback saw every epoch with the running best.
    assert [e["epoch"] for e in epochs_seen] == [r["epoch"] for r in history]
    assert epochs_seen[-1]["best_epoch"] == result.best_epoch
    # The returned model is the best epoch's, not the last epoch's.
    assert result.metrics["valid"]["mae"] == pytest.approx(maes[result.best_epoch - 1], rel=1e-5)
    assert result.metrics["valid"]["mae"] < maes[-1]


def test_classification_ties_on_accuracy_are_broken_by_validation_loss():
    data = classification_data(n=90)
    result = train_one(data, "concat", {"d_model": 8}, TrainConfig(epochs=15, batch_size=16, patience=15, seed=0))
    metric, _ = PRIMARY_METRIC["classification"]
    keys = [(r[f"valid_{metric}"], -r["valid_loss"]) for r in result.history]
    assert result.best_epoch == max(range(len(keys)), key=lambda i: keys[i]) + 1
    best = result.history[result.best_epoch - 1]
    assert result.metrics["valid"]["accuracy"] == pytest.approx(best["valid_accuracy"])


# ---------------------------------------------------------------------------------------------
# Standardisation: training rows only


def test_standardizer_uses_training_rows_only():
    data = classification_data(n=120)
    seed = 4
    train_idx = make_split(data, seed)["train"]
    other = np.setdiff1d(np.arange(data.n), train_idx)
    # Shift every non-training row far away: the statistics must not move.
    feats = {k: v.copy() for k, v in data.features.items()}
    for v in feats.values():
        v[other] += 1000.0
    shifted = MultimodalDataset(feats, data.y)
    assert np.array_equal(make_split(shifted, seed)["train"], train_idx)  # the split ignores features
    result = train_one(shifted, "concat", {"d_model": 8}, TrainConfig(epochs=1, seed=seed))
    for name, x in data.features.items():
        tokens = x[train_idx].reshape(-1, x.shape[-1])
        np.testing.assert_allclose(result.standardizer.mean[name], tokens.mean(axis=0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(result.standardizer.std[name], tokens.std(axis=0), rtol=1e-4)
        assert np.all(np.abs(result.standardizer.mean[name]) < 10)


def test_standardizer_uses_the_split_column_and_valid_tokens():
    rng = np.random.default_rng(0)
    n = 30
    split = np.array(["train"] * 20 + ["valid"] * 5 + ["test"] * 5)
    x = rng.normal(size=(n, 3, 2)).astype(np.float32)
    x[20:] += 500.0  # valid/test rows
    steps = np.ones((n, 3), dtype=bool)
    steps[:10, 2] = False
    x_raw = x.copy()
    x[:10, 2] = 1e6  # invalid steps: ignored
    data = MultimodalDataset(
        {"s": x, "v": rng.normal(size=(n, 2)).astype(np.float32)}, np.arange(n) % 2, masks={"s": steps}, split=split
    )
    result = train_one(data, "self", SMALL, TrainConfig(epochs=1, seed=0))
    tokens = x_raw[:20][steps[:20]]
    np.testing.assert_allclose(result.standardizer.mean["s"], tokens.mean(axis=0), rtol=1e-5, atol=1e-5)
    # The same statistics as fitting by hand.
    by_hand = Standardizer.fit(data, np.flatnonzero(split == "train"))
    np.testing.assert_array_equal(by_hand.mean["s"], result.standardizer.mean["s"])


# ---------------------------------------------------------------------------------------------
# Regression: (N, K) targets, losses


def _valid_outputs(result, data, seed):
    batch = result.standardizer.transform(data).to_batch(dict(make_split(data, seed))["valid"])
    return predict(result.model, batch), batch.y


@pytest.mark.parametrize("loss, fn", [("mse", F.mse_loss), ("l1", F.l1_loss), ("auto", F.mse_loss)])
def test_regression_with_k_targets_and_each_loss(loss, fn):
    data = regression_data(n=90, k=2)
    cfg = TrainConfig(epochs=1, batch_size=32, seed=0, loss=loss)
    result = train_one(data, "cross", SMALL, cfg)
    assert result.model.config.out_dim == 2
    out, y = _valid_outputs(result, data, cfg.seed)
    assert out.shape == y.shape == (len(y), 2)
    # best_epoch is 1 (the only one): its recorded validation loss is the chosen loss of the model,
    # in the units of the standardised targets it learns.
    mu, sd = result.model.target_mean, result.model.target_std
    assert result.history[0]["valid_loss"] == pytest.approx(fn((out - mu) / sd, (y - mu) / sd).item(), rel=1e-5)
    assert to_predictions("regression", out).shape == (len(y), 2)
    for split in ("train", "valid", "test"):
        assert set(result.metrics[split]) == {"mae", "rmse", "r2", "corr"}


def test_regression_learns_a_linear_target_with_mse():
    data = regression_data(n=200, k=2, noise=0.05)
    result = train_one(
        data,
        "concat",
        {"d_model": 16, "dropout": 0.0},
        TrainConfig(epochs=60, batch_size=32, lr=1e-2, patience=60, seed=0, loss="mse"),
    )
    assert result.metrics["test"]["r2"] > 0.8, result.metrics["test"]


def test_loss_must_fit_the_task():
    cls, reg = classification_data(n=60), regression_data(n=60)
    with pytest.raises(ValueError, match="loss"):
        train_one(cls, "concat", {"d_model": 8}, TrainConfig(epochs=1, loss="mse"))
    with pytest.raises(ValueError, match="loss"):
        train_one(reg, "concat", {"d_model": 8}, TrainConfig(epochs=1, loss="cross_entropy"))
    with pytest.raises(ValueError, match="loss"):
        TrainConfig(loss="huber")


@pytest.mark.parametrize(
    "field, value", [("epochs", 0), ("batch_size", 0), ("patience", 0), ("lr", 0.0), ("device", "tpu")]
)
def test_train_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field}: "):
        TrainConfig(**{field: value})


# ---------------------------------------------------------------------------------------------
# Metrics: sentiment, summaries over runs


def test_sentiment_metrics_appear_when_asked():
    rng = np.random.default_rng(0)
    n = 80
    a = rng.normal(size=(n, 4)).astype(np.float32)
    y = np.clip(a[:, 0] * 1.5, -3, 3).astype(np.float32)  # MOSI-like scores in [-3, 3]
    data = MultimodalDataset({"a": a, "b": rng.normal(size=(n, 2, 3)).astype(np.float32)}, y)
    plain = train_one(data, "concat", {"d_model": 8}, TrainConfig(epochs=2, seed=0))
    senti = train_one(data, "concat", {"d_model": 8}, TrainConfig(epochs=2, seed=0, metrics="sentiment"))
    extra = {"acc2", "acc2_has0", "f1", "f1_has0", "acc7", "acc5"}
    for split in ("train", "valid", "test"):
        assert not extra & set(plain.metrics[split])
        assert extra <= set(senti.metrics[split])
        # The regression metrics are the same with or without the extras.
        assert {k: senti.metrics[split][k] for k in plain.metrics[split]} == plain.metrics[split]
        assert all(0.0 <= senti.metrics[split][k] <= 1.0 for k in extra)


def test_sentiment_metrics_refuse_classification():
    with pytest.raises(ValueError, match="sentiment"):
        train_one(classification_data(n=60), "concat", {"d_model": 8}, TrainConfig(epochs=1, metrics="sentiment"))


def test_repeated_runs_summary():
    data = classification_data(n=90)
    results = [train_one(data, "concat", {"d_model": 8}, TrainConfig(epochs=2, seed=s), split_seed=s) for s in (0, 1)]
    summary = {split: summarize([r.metrics[split] for r in results]) for split in ("train", "valid", "test")}
    for split, stats in summary.items():
        assert set(stats) == {"accuracy", "f1_macro"}
        for metric, s in stats.items():
            values = np.array([r.metrics[split][metric] for r in results])
            assert s["mean"] == pytest.approx(values.mean())
            assert s["std"] == pytest.approx(values.std(ddof=1))


def test_model_config_fills_defaults_and_ignores_none():
    data = classification_data(n=30)
    cfg = model_config("self", data, d_model=32, nhead=None)
    assert cfg["d_model"] == 32 and cfg["nhead"] == 4 and cfg["out_dim"] == 3
    assert [m["name"] for m in cfg["modalities"]] == ["a", "b"]
    assert cfg["modalities"][1] == {"name": "b", "dim": 2, "length": 3, "is_sequence": True}
