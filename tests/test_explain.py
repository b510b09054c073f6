"""attnfuse.explain on untrained models: the walkthrough's numbers, the maps a model returns,
masking (exact), gradients (against autograd and a Riemann sum), rollout (against a direct
product of the layers), agreement, and explain_model for every fusion.

Trained-model checks against planted truth are in test_explain_planted.py; figures, the HTML
report, the browser and the command line in test_explain_report.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import rankdata
from typer.testing import CliRunner

from attnfuse.cli import app
from attnfuse.data import Batch, MultimodalDataset
from attnfuse.explain import (
    agreement,
    attention_rollout,
    bertviz_export,
    collect_maps,
    explain_model,
    gradient_attribution,
    hide,
    masking_importance,
    modality_attention,
    parse_vectors,
    resolve_methods,
    rollout_stack,
    token_modality,
    walkthrough,
)
from attnfuse.fusion import FUSIONS, build_model
from attnfuse.metrics import compute_metrics
from attnfuse.modules import AttentionMap
from attnfuse.training import model_config, to_predictions

runner = CliRunner()
ATTENTION_FUSIONS = ["self", "cross", "bicross", "mult"]


def mixed_data(n: int = 40, task: str = "classification") -> MultimodalDataset:
    """Three modalities: a vector (text), a vector absent for every 4th sample (audio) and a
    5-step sequence whose last two steps are padding for about half the samples (video)."""
    rng = np.random.default_rng(0)
    present = np.ones(n, dtype=bool)
    present[::4] = False
    steps = np.ones((n, 5), dtype=bool)
    steps[:, 3:] = rng.random((n, 2)) < 0.5
    y = rng.integers(0, 3, n) if task == "classification" else rng.normal(size=n).astype(np.float32)
    return MultimodalDataset(
        {
            "text": rng.normal(size=(n, 6)).astype(np.float32),
            "audio": rng.normal(size=(n, 4)).astype(np.float32),
            "video": rng.normal(size=(n, 5, 3)).astype(np.float32),
        },
        y,
        masks={"audio": present, "video": steps},
    )


def tiny_model(fusion: str, data: MultimodalDataset, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    extra = {} if fusion == "concat" else {"nhead": 2, "num_layers": 2}
    return build_model(fusion, model_config(fusion, data, d_model=16, **{**extra, **overrides})).eval()


# -- the walkthrough ---------------------------------------------------------------------------------


def test_walkthrough_cross_example_unscaled():
    w = walkthrough(parse_vectors("1,2", "q"), parse_vectors("2,3;1,0", "k"), scale=False)
    np.testing.assert_allclose(w.scores, [[8.0, 1.0]])
    np.testing.assert_allclose(w.weights, [[0.99909, 0.00091]], atol=5e-6)
    np.testing.assert_allclose(w.output, [[1.99909, 2.99727]], atol=5e-6)  # ≈ V1 = K1
    np.testing.assert_allclose(w.products, [[[2.0, 6.0], [1.0, 0.0]]])


def test_walkthrough_scaled_uses_sqrt_dk():
    w = walkthrough(parse_vectors("1,2", "q"), parse_vectors("2,3;1,0", "k"), scale=True)
    assert w.scale == pytest.approx(1 / np.sqrt(2))
    expected = np.exp(np.array([8.0, 1.0]) / np.sqrt(2))
    np.testing.assert_allclose(w.weights[0], expected / expected.sum(), rtol=1e-12)


def test_walkthrough_self_example_is_not_the_identity():
    x = parse_vectors("1,0;0,1", "self")
    w = walkthrough(x, x, scale=False)
    e = np.e
    np.testing.assert_allclose(w.weights, [[e / (e + 1), 1 / (e + 1)], [1 / (e + 1), e / (e + 1)]], rtol=1e-12)
    assert not np.allclose(w.weights, np.eye(2))


def test_walkthrough_explicit_values():
    w = walkthrough(parse_vectors("1,0", "q"), parse_vectors("1,0;0,1", "k"), parse_vectors("10;20", "v"), scale=False)
    a = np.exp(1) / (np.exp(1) + 1)
    np.testing.assert_allclose(w.output, [[10 * a + 20 * (1 - a)]])


def test_cli_walkthrough_prints_the_numbers():
    result = runner.invoke(app, ["explain", "--query", "1,2", "--keys", "2,3;1,0", "--no-scale"])
    assert result.exit_code == 0, result.output
    for text in ("1×2 + 2×3", "8 → 0.99909", "1 → 0.00091", "skipped"):
        assert text in result.output
    result = runner.invoke(app, ["explain", "--self", "1,0;0,1", "--no-scale"])
    assert result.exit_code == 0
    assert "0.73106" in result.output and "0.26894" in result.output
    assert "strictly between 0 and 1" in result.output and "e/(e + 1) = 0.7311" in result.output
    assert "notes" not in result.output  # the reason is mathematics, not a reference to a text


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--query", "1,2", "--keys", "2,3;1"], "--keys: expected vectors of one length"),
        (["--query", "1,2,3", "--keys", "2,3;1,0"], "keys: expected vectors of length 3"),
        (["--query", "1,x", "--keys", "2,3"], "--query: expected numbers"),
        (["--query", "1,2"], "give both --query and --keys"),
        (["--query", "1,0", "--keys", "1,0;0,1", "--values", "1;2;3"], "values: expected 2 vectors"),
    ],
)
def test_cli_walkthrough_bad_vectors(args, fragment):
    result = runner.invoke(app, ["explain", *args])
    assert result.exit_code == 2
    assert fragment in result.output
    assert "Traceback" not in result.output


# -- maps returned by the models -------------------------------------------------------------------


@pytest.mark.parametrize("fusion", ATTENTION_FUSIONS)
def test_maps_shapes_labels_and_masks(fusion):
    data = mixed_data()
    model = tiny_model(fusion, data)
    batch = data.to_batch()
    out, maps = collect_maps(model, batch)
    assert maps and torch.allclose(out, model(batch), atol=1e-5)  # same prediction with or without maps
    names = [m.name for m in maps]
    assert len(names) == len(set(names))
    for m in maps:
        B, H, L, S = m.weights.shape
        assert (len(data), 2) == (B, H) and (len(m.query_tokens), len(m.key_tokens)) == (L, S)
        assert m.query_valid.shape == (B, L)
        assert torch.isfinite(m.weights).all()
        # Keys of absent modalities / invalid steps get exactly zero weight.
        key_valid = torch.cat(
            [batch.mask[mod] for mod in dict.fromkeys(map(token_modality, m.key_tokens)) if mod != "[CLS]"], dim=1
        )
        assert key_valid.shape[1] == S  # the check below must not be skipped
        assert (m.weights.masked_select(~key_valid[:, None, None, :].expand_as(m.weights)) == 0).all()
        rows = m.weights.sum(-1)  # (B, H, L): 1, or 0 where a query has no visible key
        assert torch.all(((rows - 1).abs() < 1e-5) | (rows == 0))
    assert any("video[4]" in m.key_tokens or "video[4]" in m.query_tokens for m in maps)


def test_concat_has_no_attention_maps():
    data = mixed_data()
    with pytest.raises(ValueError, match="no attention to show"):
        collect_maps(tiny_model("concat", data), data.to_batch())


def test_return_attention_false_takes_the_fused_kernel(monkeypatch):
    data = mixed_data()
    model = build_model("cross", model_config("cross", data, d_model=16, nhead=2)).eval()
    calls = {"sdpa": 0, "softmax": 0}
    real_sdpa, real_softmax = torch.nn.functional.scaled_dot_product_attention, torch.softmax

    def sdpa(*a, **k):
        calls["sdpa"] += 1
        return real_sdpa(*a, **k)

    def softmax(*a, **k):
        calls["softmax"] += 1
        return real_softmax(*a, **k)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)
    monkeypatch.setattr(torch, "softmax", softmax)
    with torch.no_grad():
        model(data.to_batch())
    assert calls == {"sdpa": 2, "softmax": 0}
    with torch.no_grad():
        model(data.to_batch(), return_attention=True)
    assert calls["softmax"] == 2 and calls["sdpa"] == 2


def test_modality_attention_rows_sum_to_one_and_steps_match_the_maps():
    data = mixed_data()
    model = tiny_model("self", data)
    batch = data.to_batch()
    attn = modality_attention(model, batch, batch_size=7)  # several chunks
    assert set(attn.received) == {"text", "audio", "video"}
    assert sum(attn.received.values()) == pytest.approx(1.0)
    for q_mods, k_mods, mat in attn.matrices.values():
        assert q_mods == k_mods == ["text", "audio", "video"]
        np.testing.assert_allclose(mat.sum(1), 1.0, atol=1e-6)
    # Step maps: the mean over samples with a valid query, computed here in one go.
    _, maps = collect_maps(model, batch)
    for m in maps:
        q_tokens, k_tokens, steps = attn.steps[m.name]
        w = m.weights.double().mean(1) * m.query_valid[..., None]
        expected = (w.sum(0) / m.query_valid.double().sum(0).clamp_min(1)[:, None]).numpy()
        np.testing.assert_allclose(steps, expected, atol=1e-10)
        assert (q_tokens, k_tokens) == (m.query_tokens, m.key_tokens)
        j = k_tokens.index("video[4]")
        assert attn.key_valid[m.name][j] == pytest.approx(data.valid_mask("video")[:, 4].mean())
        assert attn.key_valid[m.name][k_tokens.index("audio")] == 0.75


def test_bertviz_layout():
    data = mixed_data(8)
    model = tiny_model("bicross", data)
    _, maps = collect_maps(model, data.to_batch())
    export = json.loads(json.dumps(bertviz_export(maps, 3)))
    assert export["self"] == [] and len(export["cross"]) == 4
    first = export["cross"][0]
    assert np.array(first["attention"]).shape == (1, 2, len(first["query_tokens"]), len(first["key_tokens"]))


# -- masking -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fusion", list(FUSIONS))
def test_masking_is_exactly_the_difference_of_two_forward_passes(fusion):
    data = mixed_data()
    model = tiny_model(fusion, data)
    batch = data.to_batch()
    imp = masking_importance(model, batch, "classification")
    assert imp.hidden[:3] == [("text",), ("audio",), ("video",)] and len(imp.hidden) == 3 + 3  # + pairs
    rows = np.arange(len(data))
    with torch.no_grad():
        full = model(batch)
        assert np.array_equal(imp.target, full.argmax(-1).numpy())  # the predicted class is explained
        for k, hidden in enumerate(imp.hidden):
            without = model(hide(batch, hidden))
            assert torch.isfinite(without).all()
            assert np.array_equal(imp.delta[:, k], (full - without).numpy()[rows, imp.target])  # exactly
            metrics = compute_metrics("classification", data.y, to_predictions("classification", without))
            assert imp.hidden_metrics[k] == metrics
    # A modality that is absent anyway: hiding it changes nothing, bit for bit.
    audio_absent = ~imp.present[:, 1]
    assert audio_absent.sum() == 10 and (imp.delta[audio_absent, 1] == 0).all()
    assert imp.drop("audio") == imp.metrics["accuracy"] - imp.hidden_metrics[1]["accuracy"]
    a, b = "text", "video"
    assert imp.interaction(a, b) == pytest.approx(imp.drop(a, b) - imp.drop(a) - imp.drop(b))
    np.testing.assert_allclose(imp.share().sum(), 1.0, rtol=1e-6)  # a float32 sum of float32 quotients


def test_masking_regression_metric_and_direction():
    data = mixed_data(task="regression")
    model = tiny_model("self", data)
    imp = masking_importance(model, data.to_batch(), "regression", pairs=False, metric="mae")
    assert len(imp.hidden) == 3 and (imp.target == 0).all()
    for k, name in enumerate(imp.modalities):  # mae: lower is better, so a drop is hidden - full
        assert imp.drop(name) == imp.hidden_metrics[k]["mae"] - imp.metrics["mae"]


def test_masking_without_targets_and_bad_input():
    data = mixed_data()
    model = tiny_model("cross", data)
    batch = data.to_batch()
    imp = masking_importance(model, Batch(batch.x, batch.mask), "classification")
    assert imp.metrics is None and np.isnan(imp.drop("text")) and imp.delta.shape == (40, 6)
    with pytest.raises(ValueError, match=r"modalities: expected names from .* got \['sound'\]"):
        hide(batch, ["sound"])
    with pytest.raises(ValueError, match="metric: expected one of"):
        masking_importance(model, batch, "classification", metric="r2")
    with pytest.raises(ValueError, match="task: expected"):
        masking_importance(model, batch, "ranking")
    with pytest.raises(ValueError, match="were not hidden together"):
        masking_importance(model, batch, "classification", pairs=False).drop("text", "audio")


# -- gradients ----------------------------------------------------------------------------------


def _explained(model, batch: Batch, x: dict, target: np.ndarray) -> torch.Tensor:
    out = model(Batch(x, batch.mask))
    return out[torch.arange(len(target)), torch.from_numpy(target)]


@pytest.mark.parametrize("fusion", list(FUSIONS))
def test_integrated_gradients_is_complete(fusion):
    data = mixed_data(12)
    model = tiny_model(fusion, data)
    batch = data.to_batch()
    ig = gradient_attribution(model, batch, "classification", "ig", n_steps=32, batch_size=5)
    # From forward passes of our own: the sum of attributions is f(x) - f(0), up to Captum's delta.
    with torch.no_grad():
        fx = _explained(model, batch, batch.x, ig.target).numpy()
        f0 = _explained(model, batch, {k: torch.zeros_like(v) for k, v in batch.x.items()}, ig.target).numpy()
    total = sum(a.sum(axis=(1, 2)) for a in ig.attributions.values())
    np.testing.assert_allclose(ig.output, fx, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ig.baseline_output, f0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ig.delta, total - (fx - f0), atol=1e-5)
    assert ig.complete() and np.abs(ig.delta).max() < 0.05  # Captum's tolerance for IG


def test_integrated_gradients_in_smaller_passes_gives_the_same_attributions():
    """Captum splits the path's points into passes of at most max_points rows; the masks must
    travel with their rows."""
    data = mixed_data(12)
    model = tiny_model("bicross", data)
    whole = gradient_attribution(model, data.to_batch(), "classification", "ig", n_steps=16, batch_size=12)
    parts = gradient_attribution(
        model, data.to_batch(), "classification", "ig", n_steps=16, batch_size=12, max_points=24
    )
    for k in whole.attributions:
        np.testing.assert_allclose(parts.attributions[k], whole.attributions[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fusion", ["cross", "mult"])
def test_integrated_gradients_matches_a_riemann_sum(fusion):
    """The path integral by an independent midpoint Riemann sum (200 points, autograd), all points
    of the path in one batch."""
    data = mixed_data(6)
    model = tiny_model(fusion, data)
    batch = data.to_batch()
    ig = gradient_attribution(model, batch, "classification", "ig", n_steps=32)
    points = 200
    alphas = (torch.arange(points, dtype=torch.float32) + 0.5) / points  # (P,)
    n = len(data)
    x = {
        k: (alphas[:, None, None, None] * v).reshape(points * n, *v.shape[1:]).requires_grad_()
        for k, v in batch.x.items()
    }
    path = Batch(x, {k: v.repeat(points, 1) for k, v in batch.mask.items()})
    target = np.tile(ig.target, points)
    out = model(path)[torch.arange(points * n), torch.from_numpy(target)]
    grads = torch.autograd.grad(out.sum(), list(x.values()))
    for (k, v), g in zip(batch.x.items(), grads):
        mean_grad = g.reshape(points, n, *v.shape[1:]).mean(0)
        np.testing.assert_allclose(ig.attributions[k], (v * mean_grad).numpy(), atol=2e-4)


@pytest.mark.parametrize("fusion", ["concat", "mult"])
def test_gradient_x_input_is_input_times_gradient(fusion):
    data = mixed_data(10, task="regression")
    model = tiny_model(fusion, data)
    batch = data.to_batch()
    gxi = gradient_attribution(model, batch, "regression", "gxi")
    assert gxi.delta is None and gxi.complete() is None and (gxi.target == 0).all()
    x = {k: v.clone().requires_grad_() for k, v in batch.x.items()}
    grads = torch.autograd.grad(_explained(model, batch, x, gxi.target).sum(), list(x.values()))
    for (k, v), g in zip(batch.x.items(), grads):
        np.testing.assert_allclose(gxi.attributions[k], (v * g).numpy(), rtol=1e-5, atol=1e-7)


def test_gradient_views_and_padding():
    data = mixed_data(16)
    ig = gradient_attribution(tiny_model("self", data), data.to_batch(), "classification", "ig", n_steps=8)
    video, valid = ig.attributions["video"], ig.valid["video"]
    assert video.shape == (16, 5, 3) and (video[~valid] == 0).all()  # padded steps: input = baseline
    assert (ig.attributions["audio"][::4] == 0).all()  # absent modality
    np.testing.assert_allclose(ig.per_step("video").sum(1), ig.per_modality()[:, 2], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(ig.per_feature("video").sum(1), ig.per_modality()[:, 2], rtol=1e-5, atol=1e-7)
    assert ig.share().sum() == pytest.approx(1.0) and ig.step_share("video").sum() == pytest.approx(1.0)
    model = tiny_model("self", data)
    with pytest.raises(ValueError, match="method: expected one of"):
        gradient_attribution(model, data.to_batch(), "classification", "shap")
    with pytest.raises(ValueError, match="n_steps: expected an integer >= 1"):
        gradient_attribution(model, data.to_batch(), "classification", n_steps=0)
    with pytest.raises(ValueError, match=r"target: expected an integer <= 2, got 3"):
        gradient_attribution(model, data.to_batch(), "classification", target=3)


# -- rollout ------------------------------------------------------------------------------------


def _roll(weights: list[np.ndarray]) -> np.ndarray:
    """Abnar & Zuidema's rollout written out: Ã = (A + I) / 2 with rows renormalised, R = Ã_L … Ã_1."""
    r = np.eye(weights[0].shape[-1])
    for a in weights:
        a = 0.5 * a + 0.5 * np.eye(a.shape[-1])
        r = (a / a.sum(-1, keepdims=True)) @ r
    return r


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_rollout_of_self_fusion_is_the_product_of_the_layers(pooling):
    data = mixed_data(6)
    model = tiny_model("self", data, pooling=pooling)
    batch = data.to_batch()
    ro = attention_rollout(model, batch, batch_size=4)
    _, maps = collect_maps(model, batch)
    for b in range(len(data)):
        r = _roll([m.weights[b].double().mean(0).numpy() for m in maps])
        valid = maps[0].query_valid[b].numpy()
        expected = r[0] if pooling == "cls" else r[valid].mean(0)
        np.testing.assert_allclose(ro.relevance[b], expected, atol=1e-10)
    np.testing.assert_allclose(ro.relevance.sum(1), 1.0)
    assert (ro.relevance[~ro.valid] == 0).all()  # padding and absent modalities get none
    assert ro.tokens[0] == ("[CLS]" if pooling == "cls" else "text")


def test_rollout_of_a_cross_stack_is_a_weighted_mean_of_its_layers():
    data = mixed_data(6)
    model = tiny_model("cross", data)  # text queries audio + video, 2 layers
    batch = data.to_batch()
    ro = attention_rollout(model, batch, keep_stacks=True)
    assert attention_rollout(model, batch).stacks == {}  # by default only the relevance
    _, (m0, m1) = collect_maps(model, batch)
    a0, a1 = (m.weights.double().mean(1)[:, 0].numpy() for m in (m0, m1))  # (B, S): the one text query
    # Rows renormalised by their sums, which carry the float32 softmax's rounding (CPU-dependent):
    np.testing.assert_allclose(ro.relevance[:, 0], 0.25, rtol=1e-6)  # text keeps ½ · ½ through its residual
    np.testing.assert_allclose(ro.relevance[:, 1:], 0.25 * a0 + 0.5 * a1, rtol=1e-6)
    name, (rows, cols, r) = next(iter(ro.stacks.items()))
    assert name == "cross:text->audio+video" and rows == ["text"] and cols[0] == "text" and r.shape == (6, 1, 7)


@pytest.mark.parametrize("fusion", ["bicross", "mult"])
def test_rollout_of_every_fusion_sums_to_one(fusion):
    data = mixed_data(8)
    ro = attention_rollout(tiny_model(fusion, data), data.to_batch())
    assert ro.tokens == ["text", "audio", *(f"video[{t}]" for t in range(5))]
    np.testing.assert_allclose(ro.relevance.sum(1), 1.0)
    assert (ro.relevance >= 0).all() and (ro.relevance[~ro.valid] == 0).all()
    assert sum(ro.modality_share().values()) == pytest.approx(1.0)
    rel = ro.step_relevance("video")
    np.testing.assert_allclose(rel.sum(1), 1.0)
    with pytest.raises(ValueError, match="modality: expected one of"):
        ro.step_relevance("sound")


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.integers(2, 6), st.integers(0, 2**31 - 1))
def test_rollout_stack_rows_stay_distributions(layers, n, seed):
    """For any attention (rows summing to 1, or 0 for a query that sees no key), every rollout row
    is a probability distribution, and a layer that attends only to itself changes nothing."""
    g = torch.Generator().manual_seed(seed)
    tokens = [f"t[{i}]" for i in range(n)]
    maps = []
    for i in range(layers):
        w = torch.rand(3, 2, n, n, generator=g) ** 4
        w = w / w.sum(-1, keepdim=True)
        w[0, :, 0] = 0.0  # sample 0, query 0: no visible key
        maps.append([AttentionMap(f"s/layer{i}", w, tokens, tokens, torch.ones(3, n, dtype=torch.bool))])
    r = rollout_stack(maps, tokens)
    torch.testing.assert_close(r.sum(-1), torch.ones(3, n, dtype=torch.float64))
    assert (r >= 0).all()
    eye = torch.eye(n).expand(3, 2, n, n)
    same = rollout_stack(
        [*maps, [AttentionMap("s/layerX", eye, tokens, tokens, torch.ones(3, n, dtype=torch.bool))]], tokens
    )
    torch.testing.assert_close(same, r)


def test_rollout_needs_attention():
    data = mixed_data(4)
    with pytest.raises(ValueError, match="no attention to show"):
        attention_rollout(tiny_model("concat", data), data.to_batch())
    with pytest.raises(ValueError, match=r"residual: expected a value in \[0, 1\)"):
        attention_rollout(tiny_model("self", data), data.to_batch(), residual=1.0)


# -- agreement ----------------------------------------------------------------------------------


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = rankdata(a), rankdata(b)
    return float(np.corrcoef(ra, rb)[0, 1])


def test_agreement_correlations_and_sentences():
    data = mixed_data()
    model = tiny_model("self", data)
    imp = masking_importance(model, data.to_batch(), "classification")
    # Attention that favours audio while hiding audio costs least.
    drops = imp.drops()
    weakest = imp.modalities[int(np.argmin(drops))]
    attention = {m: (0.6 if m == weakest else 0.2) for m in imp.modalities}
    ig = np.array([0.5, 0.3, 0.2])
    agree = agreement(imp.modalities, {"attention": attention, "ig": ig}, imp)
    assert agree.metric == "accuracy" and np.array_equal(agree.drops, drops)
    att = agree.shares["attention"]
    assert agree.spearman[("attention", "ig")] == pytest.approx(_spearman(att, ig))
    if np.ptp(drops) > 0:
        assert agree.spearman[("ig", "drop")] == pytest.approx(_spearman(ig, drops))
    else:  # a constant ranking has no correlation
        assert np.isnan(agree.spearman[("ig", "drop")])
    said = " ".join(agree.sentences)
    assert f"attention received favours `{weakest}` (60%), but hiding `{weakest}` changes accuracy by" in said


def test_agreement_when_everything_agrees_and_with_two_modalities():
    shares = {"attention": np.array([0.7, 0.3]), "ig": np.array([0.8, 0.2])}
    agree = agreement(["a", "b"], shares)
    assert np.isnan(agree.spearman[("attention", "ig")])
    assert any("fewer than 3 modalities" in s for s in agree.sentences)
    assert not any("favour different" in s for s in agree.sentences)
    ig = np.array([0.1, 0.2, 0.7])
    differ = agreement(["a", "b", "c"], {"attention": np.array([0.6, 0.2, 0.2]), "ig": ig})
    assert (
        "The methods favour different modalities: attention received: `a`; Integrated Gradients: `c`."
        in differ.sentences
    )
    spread = agreement(["a", "b", "c"], {"attention": np.array([0.34, 0.33, 0.33]), "ig": ig})
    assert not any("favour different" in s for s in spread.sentences)  # an even spread favours nothing
    tied = {"attention": np.array([0.45, 0.44, 0.1, 0.01]), "ig": np.array([0.1, 0.1, 0.1, 0.7])}
    said = " ".join(agreement(["a", "b", "c", "d"], tied).sentences)
    assert "attention received: `a` and `b`; Integrated Gradients: `d`" in said  # tied for first: both named
    with pytest.raises(ValueError, match="shares: expected methods from"):
        agreement(["a"], {"shap": np.array([1.0])})
    with pytest.raises(ValueError, match=r"shares\['ig'\]: expected 2 values"):
        agreement(["a", "b"], {"ig": np.array([1.0])})


# -- explain_model --------------------------------------------------------------------------------


def test_resolve_methods():
    assert resolve_methods("auto", True) == ("attention", "mask", "gxi", "rollout")
    assert resolve_methods("auto", False) == ("mask", "gxi")
    assert resolve_methods("all", True) == ("attention", "mask", "ig", "gxi", "rollout")
    assert resolve_methods("all", False) == ("mask", "ig", "gxi")
    assert resolve_methods("rollout, ig", True) == ("ig", "rollout")
    with pytest.raises(ValueError, match="method: expected 'auto', 'all' or a comma-separated list"):
        resolve_methods("ig,shap", True)
    with pytest.raises(ValueError, match="method: expected"):
        resolve_methods(",", True)


@pytest.mark.parametrize("fusion", list(FUSIONS))
def test_explain_model_runs_every_method_on_every_fusion(fusion):
    data = mixed_data(24)
    model = tiny_model(fusion, data)
    expl = explain_model(model, data, None, np.arange(4, 24), split="test", methods="all", samples=[0, 1], n_steps=8)
    attention = fusion != "concat"
    assert expl.methods == (("attention", "mask", "ig", "gxi", "rollout") if attention else ("mask", "ig", "gxi"))
    assert set(expl.seconds) >= set(expl.methods)
    assert (expl.attention is not None) == attention and (expl.rollout is not None) == attention
    assert expl.masking.delta.shape == (20, 6) and set(expl.gradients) == {"ig", "gxi"}
    assert list(expl.agreement.shares) == [
        m for m in ("attention", "rollout", "mask", "ig", "gxi") if m in expl.methods
    ]
    assert (
        expl.score
        == compute_metrics(
            "classification", data.y[4:24], to_predictions("classification", model(data.to_batch(np.arange(4, 24))))
        )["accuracy"]
    )
    first, second = expl.samples
    assert (first.row, second.row) == (0, 1)
    assert first.present == {"text": True, "audio": False, "video": True}  # audio is absent in row 0
    assert first.masking["audio"] == 0.0 and first.gradients["ig"]["audio"] == 0.0
    assert set(first.steps) == {"video"} and first.step_valid["video"].shape == (5,)
    for values in first.steps["video"].values():
        assert values.sum() == pytest.approx(1.0) and (values[~first.step_valid["video"]] == 0).all()
    assert bool(first.maps) == attention
    assert any("modality dropout" in n for n in expl.notes)  # trained without it: masking is out of distribution


def test_explain_model_bad_input():
    data = mixed_data(8)
    with pytest.raises(ValueError, match=r"samples: expected row indices in 0..7, got \[8\]"):
        explain_model(tiny_model("self", data), data, samples=[8])
    with pytest.raises(ValueError, match="no attention to show"):
        explain_model(tiny_model("concat", data), data, methods="rollout")
    with pytest.raises(ValueError, match="rows: expected a non-empty"):
        explain_model(tiny_model("self", data), data, rows=[])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_explain_model_with_the_model_on_cuda():
    data = mixed_data(12)
    cpu_model = tiny_model("mult", data)
    expl_cpu = explain_model(cpu_model, data, methods="all", n_steps=8)
    expl_gpu = explain_model(cpu_model.to("cuda"), data, methods="all", n_steps=8)
    np.testing.assert_allclose(expl_gpu.masking.delta, expl_cpu.masking.delta, atol=1e-4)
    np.testing.assert_allclose(expl_gpu.rollout.relevance, expl_cpu.rollout.relevance, atol=1e-4)
    for m in ("ig", "gxi"):
        for k in expl_cpu.modalities:
            np.testing.assert_allclose(
                expl_gpu.gradients[m].attributions[k], expl_cpu.gradients[m].attributions[k], atol=1e-3
            )
    assert set(expl_gpu.attention.matrices) == set(expl_cpu.attention.matrices)
