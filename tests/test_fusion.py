"""Tests for attnfuse.fusion: the five fusion models (build, train, masks, attention maps, configs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnfuse.data import Batch, MultimodalDataset, make_planted
from attnfuse.fusion import FUSIONS, build_model, config_from_dict
from attnfuse.modules import AttentionMap
from attnfuse.training import TrainConfig, model_config
from trainkit import train_one

ALL = ["concat", "self", "cross", "bicross", "mult"]
ATTENTION = ["self", "cross", "bicross", "mult"]
SMALL = {"d_model": 16, "nhead": 2, "num_layers": 1, "dropout": 0.0}


def small(fusion: str, **extra) -> dict:
    """Small, fast model overrides for ``fusion`` (concat takes no attention settings)."""
    over = {"d_model": 16, "dropout": 0.0} if fusion == "concat" else dict(SMALL)
    if fusion == "mult":
        over["self_layers"] = 1
    return {**over, **extra}


def make_data(kind: str, n: int = 12, num_classes: int = 3, seed: int = 0) -> MultimodalDataset:
    """Three modalities: all vectors ("vector"), or a vector, a sequence (T=4) and a vector ("mixed")."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % num_classes
    b = rng.normal(size=(n, 3)) if kind == "vector" else rng.normal(size=(n, 4, 3))
    feats = {"a": rng.normal(size=(n, 5)), "b": b, "c": rng.normal(size=(n, 7))}
    return MultimodalDataset({k: v.astype(np.float32) for k, v in feats.items()}, y)


def build(fusion: str, data: MultimodalDataset, seed: int = 0, **extra) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(fusion, model_config(fusion, data, **small(fusion, **extra)))


def clone(batch: Batch) -> Batch:
    return Batch(
        {k: v.clone() for k, v in batch.x.items()},
        {k: v.clone() for k, v in batch.mask.items()},
        None if batch.y is None else batch.y.clone(),
    )


# ---------------------------------------------------------------------------------------------
# Building


@pytest.mark.parametrize("kind", ["vector", "mixed"])
@pytest.mark.parametrize("fusion", ALL)
def test_every_model_builds_and_outputs_b_by_out_dim(fusion, kind):
    data = make_data(kind, n=10, num_classes=4)
    model = build(fusion, data)
    assert model.config.out_dim == 4
    for mode in (model.train, model.eval):
        mode()
        out = model(data.to_batch())
        assert out.shape == (10, 4) and out.dtype == torch.float32
        assert torch.isfinite(out).all()
    # A batch of one works too (no squeezing of the batch axis anywhere).
    assert model(data.to_batch([3])).shape == (1, 4)


def test_registry_names_all_five_models():
    assert sorted(FUSIONS) == sorted(ALL)
    assert FUSIONS["concat"].has_attention is False
    assert all(FUSIONS[f].has_attention for f in ATTENTION)


@pytest.mark.parametrize("fusion", ALL)
def test_regression_outputs_have_target_dim(fusion):
    rng = np.random.default_rng(1)
    data = MultimodalDataset(
        {"a": rng.normal(size=(8, 4)), "b": rng.normal(size=(8, 3, 2))}, rng.normal(size=(8, 3)), task="regression"
    )
    model = build(fusion, data).eval()
    assert model(data.to_batch()).shape == (8, 3)


# ---------------------------------------------------------------------------------------------
# Training beats chance; attention solves the planted lookup, concat cannot


def separable(n: int = 240, num_classes: int = 3, seed: int = 0) -> MultimodalDataset:
    """Each modality carries a noisy view of the class (vector a, sequence b whose valid steps
    vary per sample): any fusion that reads its inputs can beat chance."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_classes, size=n)
    proto_a, proto_b = rng.normal(size=(num_classes, 6)), rng.normal(size=(num_classes, 4))
    a = proto_a[y] + 0.8 * rng.normal(size=(n, 6))
    b = proto_b[y][:, None, :] + 1.0 * rng.normal(size=(n, 5, 4))
    steps = np.arange(5)[None, :] < rng.integers(2, 6, size=n)[:, None]  # 2..5 valid steps
    return MultimodalDataset({"a": a.astype(np.float32), "b": b.astype(np.float32)}, y, masks={"b": steps})


@pytest.mark.parametrize("fusion", ALL)
def test_every_model_trains_above_chance(fusion):
    data = separable()
    result = train_one(data, fusion, small(fusion), TrainConfig(epochs=12, batch_size=32, lr=3e-3, patience=12, seed=0))
    chance = 1 / data.num_classes
    assert result.metrics["test"]["accuracy"] >= chance + 0.3, result.metrics
    assert result.metrics["train"]["accuracy"] >= chance + 0.3, result.metrics


@pytest.fixture(scope="module")
def planted():
    # 6 steps per sample: pooled video tells only the mean of the 6 values (R^2 about 1/6).
    return make_planted(n=800, seq_len=6, num_keys=12, key_dim=8, value_dim=4, noise=0.05, seed=0)


PLANTED_TRAIN = TrainConfig(epochs=20, batch_size=32, lr=5e-3, patience=20, seed=0, loss="mse")


@pytest.mark.parametrize("fusion", ["cross", "self", "bicross"])
def test_attention_fusion_solves_planted_lookup(planted, fusion):
    over = {"d_model": 32, "nhead": 2, "num_layers": 1, "dropout": 0.0}
    result = train_one(planted, fusion, over, PLANTED_TRAIN)
    assert result.metrics["test"]["r2"] >= 0.9, result.metrics["test"]


def test_concat_cannot_solve_planted_lookup(planted):
    result = train_one(planted, "concat", {"d_model": 32, "dropout": 0.0}, PLANTED_TRAIN)
    assert result.metrics["test"]["r2"] <= 0.4, result.metrics["test"]


def test_cross_attention_looks_at_the_planted_step(planted):
    """After training, text->video attention (summed over heads) peaks at the planted step."""
    over = {"d_model": 32, "nhead": 2, "num_layers": 1, "dropout": 0.0}
    result = train_one(planted, "cross", over, PLANTED_TRAIN)
    batch = result.standardizer.transform(planted).to_batch(np.arange(200))
    result.model.eval()
    with torch.no_grad():
        _, maps = result.model(batch, return_attention=True)
    (m,) = maps
    assert m.key_tokens == [f"video[{t}]" for t in range(6)]
    looked = m.weights.sum(dim=1)[:, 0].argmax(dim=-1).numpy()  # (B,) step with most attention
    assert np.mean(looked == planted.info["planted_step"][:200]) >= 0.9


# ---------------------------------------------------------------------------------------------
# Masks: absent modalities and invalid steps are invisible


def masked_batch(data: MultimodalDataset) -> Batch:
    """Samples 0, 4, 5 keep everything; 1 lacks b; 2 has b steps 2, 3 invalid; 3 lacks a."""
    batch = data.to_batch()
    batch.mask["b"][1] = False
    batch.mask["b"][2, 2:] = False
    batch.mask["a"][3] = False
    return batch


FULL = [0, 4, 5]


@pytest.mark.parametrize(
    "extra",
    [{}, {"pooling": "attention"}, {"pooling": "cls"}, {"pooling": "modality"}, {"query": "b"}],
    ids=["mean", "attn", "cls", "modality", "query-b"],
)
@pytest.mark.parametrize("fusion", ALL)
def test_masked_tokens_do_not_change_predictions(fusion, extra):
    config_class = FUSIONS[fusion].config_class
    if extra.get("pooling", "mean") not in getattr(config_class, "POOLINGS", ("mean",)):
        pytest.skip(f"{fusion} has no {extra['pooling']} pooling")
    if "query" in extra and fusion not in ("cross", "bicross"):
        pytest.skip("only cross and bicross have a query modality")
    data = make_data("mixed", n=6)
    model = build(fusion, data, **extra).eval()
    with torch.no_grad():
        ref = model(data.to_batch())
        batch = masked_batch(data)
        out = model(batch)
        # Fully present samples are unaffected by other samples' missing modalities.
        torch.testing.assert_close(out[FULL], ref[FULL], rtol=0, atol=1e-6)
        # Garbage (large values) at absent / invalid positions changes nothing for anyone.
        noisy = clone(batch)
        g = torch.Generator().manual_seed(1)
        noisy.x["b"][1] = 1e3 * torch.randn(4, 3, generator=g)
        noisy.x["b"][2, 2:] = 1e3 * torch.randn(2, 3, generator=g)
        noisy.x["a"][3] = 1e3 * torch.randn(5, generator=g)
        out_noisy = model(noisy)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out_noisy, out, rtol=0, atol=1e-5)
    # The masked samples' own predictions did react to their masks (the test is not vacuous).
    assert not torch.allclose(out[[1, 2, 3]], ref[[1, 2, 3]])


@pytest.mark.parametrize("fusion", ALL)
def test_no_nan_in_outputs_or_gradients_with_absent_modalities(fusion):
    data = make_data("mixed", n=6)
    model = build(fusion, data).eval()
    batch = masked_batch(data)
    batch.mask["c"][:] = False  # c absent from the whole batch
    batch.x = {k: v.clone().requires_grad_(True) for k, v in batch.x.items()}
    out = model(batch)
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name
    for name, x in batch.x.items():
        assert torch.isfinite(x.grad).all(), name
    # Absent inputs receive no gradient: they cannot influence the output.
    assert torch.count_nonzero(batch.x["c"].grad) == 0
    assert torch.count_nonzero(batch.x["b"].grad[1]) == 0
    assert torch.count_nonzero(batch.x["b"].grad[2, 2:]) == 0
    assert torch.count_nonzero(batch.x["a"].grad[3]) == 0


@pytest.mark.parametrize("fusion", ALL)
def test_training_step_with_absent_modalities_and_dropout_is_finite(fusion):
    data = make_data("mixed", n=6)
    model = build(fusion, data, dropout=0.3).train()
    batch = masked_batch(data)
    batch.mask["c"][:] = False
    loss = torch.nn.functional.cross_entropy(model(batch), batch.y)
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("fusion", ALL)
def test_dataset_masks_reach_the_model(fusion):
    """Through the data layer: NaN at invalid positions is accepted, and the prediction of a sample
    does not depend on its masked values."""
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(4, 5)).astype(np.float32), rng.normal(size=(4, 3, 2)).astype(np.float32)
    masks = {"a": np.array([True, False, True, True]), "b": np.array([[1, 1, 0]] * 4, dtype=bool)}
    b2, a2 = b.copy(), a.copy()
    b2[:, 2] = np.nan
    a2[1] = np.nan
    d1 = MultimodalDataset({"a": a, "b": b}, np.array([0, 1, 0, 1]), masks=masks)
    d2 = MultimodalDataset({"a": a2, "b": b2}, np.array([0, 1, 0, 1]), masks=masks)
    model = build(fusion, d1).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(d2.to_batch()), model(d1.to_batch()), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Attention maps


def key_validity(labels: list[str], batch: Batch) -> torch.Tensor:
    """(B, S) bool from token labels ("m", "m[t]" or "[CLS]") and the batch masks."""
    cols = []
    for label in labels:
        if label == "[CLS]":
            cols.append(torch.ones(len(batch), dtype=torch.bool))
        elif label.endswith("]"):
            name, t = label[:-1].split("[")
            cols.append(batch.mask[name][:, int(t)])
        else:
            cols.append(batch.mask[label][:, 0])
    return torch.stack(cols, dim=1)


@pytest.mark.parametrize("kind", ["vector", "mixed"])
@pytest.mark.parametrize("fusion", ATTENTION)
def test_return_attention_maps(fusion, kind):
    data = make_data(kind, n=6)
    model = build(fusion, data).eval()
    batch = masked_batch(data) if kind == "mixed" else data.to_batch()
    with torch.no_grad():
        plain = model(batch)
        out, maps = model(batch, return_attention=True)
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-6)
    assert maps and all(isinstance(m, AttentionMap) for m in maps)
    assert len({m.name for m in maps}) == len(maps)  # names identify the blocks
    for m in maps:
        b, h, length, s = m.weights.shape
        assert (b, h) == (6, model.config.nhead), m.name
        assert (length, s) == (len(m.query_tokens), len(m.key_tokens)), m.name
        assert torch.isfinite(m.weights).all() and (m.weights >= 0).all(), m.name
        keys = key_validity(m.key_tokens, batch)  # (B, S)
        queries = key_validity(m.query_tokens, batch)  # (B, L)
        # Masked keys get exactly zero weight; rows of valid queries with a visible key sum to 1.
        assert (m.weights.masked_select(~keys[:, None, None, :].expand_as(m.weights)) == 0).all(), m.name
        sums = m.weights.sum(dim=-1)  # (B, H, L)
        live = (queries & keys.any(dim=1, keepdim=True))[:, None, :].expand_as(sums)
        torch.testing.assert_close(sums[live], torch.ones_like(sums[live]), msg=m.name)
        # A query that sees no key at all attends to nothing (weights 0, not NaN).
        dead = (~keys.any(dim=1))[:, None, None].expand_as(sums)
        assert (sums[dead] == 0).all(), m.name


def test_attention_map_labels_name_the_tokens():
    data = make_data("mixed", n=4)
    _, maps = build("cross", data).eval()(data.to_batch(), return_attention=True)
    (m,) = maps
    assert m.query_tokens == ["a"]
    assert m.key_tokens == ["b[0]", "b[1]", "b[2]", "b[3]", "c"]
    _, maps = build("self", data, pooling="cls").eval()(data.to_batch(), return_attention=True)
    assert maps[0].query_tokens == maps[0].key_tokens == ["[CLS]", "a", "b[0]", "b[1]", "b[2]", "b[3]", "c"]


def test_concat_returns_no_attention():
    data = make_data("mixed", n=4)
    model = build("concat", data).eval()
    assert model.has_attention is False
    out, maps = model(data.to_batch(), return_attention=True)
    assert maps == []
    torch.testing.assert_close(out, model(data.to_batch()))


# ---------------------------------------------------------------------------------------------
# Config validation


@pytest.mark.parametrize("fusion", ATTENTION)
def test_heads_must_divide_d_model(fusion):
    data = make_data("vector")
    with pytest.raises(ValueError, match="d_model"):
        model_config(fusion, data, d_model=10, nhead=4)
    with pytest.raises(ValueError, match="^nhead: "):  # the field's name, not a command-line flag
        model_config(fusion, data, d_model=16, nhead=0)


def test_unknown_fusion_is_named():
    with pytest.raises(ValueError, match="fusion.*'transformer'"):
        build_model("transformer", {"modalities": [], "out_dim": 2})
    with pytest.raises(ValueError, match="fusion"):
        model_config("Self", make_data("vector"))


@pytest.mark.parametrize("fusion", ["cross", "bicross", "mult"])
def test_cross_modal_fusion_needs_two_modalities(fusion):
    one = MultimodalDataset({"a": np.zeros((4, 3), np.float32)}, np.array([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="modalities"):
        model_config(fusion, one)
    # self and concat are fine with a single modality.
    for ok in ("self", "concat"):
        assert build(ok, one).eval()(one.to_batch()).shape == (4, 2)


def test_unknown_query_or_context_modality_is_named():
    data = make_data("vector")
    with pytest.raises(ValueError, match="query.*'video'"):
        model_config("cross", data, query="video")
    with pytest.raises(ValueError, match="context"):
        model_config("bicross", data, query="a", context=["a"])
    cfg = model_config("cross", data, query="b", context=["c"])
    assert (cfg["query"], cfg["context"]) == ("b", ["c"])


def test_other_config_errors_name_the_field():
    data = make_data("vector")
    with pytest.raises(ValueError, match="dropout"):
        model_config("self", data, dropout=1.0)
    with pytest.raises(ValueError, match="^num_layers: "):
        model_config("self", data, num_layers=0)
    with pytest.raises(ValueError, match="pooling"):
        model_config("self", data, pooling="max")
    with pytest.raises(ValueError, match="d_model"):
        model_config("concat", data, d_model=0)
    with pytest.raises(ValueError, match="^nhead: the 'concat' fusion has no such setting"):
        config_from_dict("concat", {"modalities": [], "out_dim": 2, "nhead": 2})


def test_a_config_without_modalities_checks_its_own_settings():
    """The command line checks options before loading data: a config without modalities
    validates its settings and leaves the modality-dependent checks for later."""
    assert config_from_dict("cross", {"query": "text", "nhead": 2, "d_model": 8}).query == "text"
    with pytest.raises(ValueError, match="^d_model: expected a multiple of nhead=3"):
        config_from_dict("self", {"nhead": 3})
    with pytest.raises(ValueError, match="^modalities: "):
        build_model("self", {})
