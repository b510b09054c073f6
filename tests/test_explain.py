"""attnfuse explain: the walkthrough numbers, the maps a model returns, attribution, files, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from attnfuse.cli import app
from attnfuse.data import MultimodalDataset, make_planted
from attnfuse.explain import (
    bertviz_export,
    collect_maps,
    modality_attention,
    parse_vectors,
    token_modality,
    walkthrough,
)
from attnfuse.fusion import build_model
from attnfuse.training import TrainConfig, model_config, run

runner = CliRunner()


# -- the notes' worked examples ------------------------------------------------------------------


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
    np.testing.assert_allclose(w.weights, [[0.7311, 0.2689], [0.2689, 0.7311]], atol=5e-5)
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
    assert "0.73106" in result.output and "0.26894" in result.output and "identity" in result.output


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


def _mixed_data(n: int = 40) -> MultimodalDataset:
    rng = np.random.default_rng(0)
    present = np.ones(n, dtype=bool)
    present[::4] = False  # audio absent for every 4th sample
    steps = np.ones((n, 5), dtype=bool)
    steps[:, 3:] = rng.random((n, 2)) < 0.5  # ragged video
    return MultimodalDataset(
        {
            "text": rng.normal(size=(n, 6)).astype(np.float32),
            "audio": rng.normal(size=(n, 4)).astype(np.float32),
            "video": rng.normal(size=(n, 5, 3)).astype(np.float32),
        },
        rng.integers(0, 3, n),
        masks={"audio": present, "video": steps},
    )


@pytest.mark.parametrize("fusion", ["self", "cross", "bicross", "mult"])
def test_maps_shapes_labels_and_masks(fusion):
    data = _mixed_data()
    torch.manual_seed(0)
    model = build_model(fusion, model_config(fusion, data, d_model=16, nhead=2, num_layers=2)).eval()
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


def test_concat_has_no_attention_to_show():
    data = _mixed_data()
    model = build_model("concat", model_config("concat", data))
    with pytest.raises(ValueError, match="no attention to show"):
        collect_maps(model, data.to_batch())


def test_return_attention_false_takes_the_fused_kernel(monkeypatch):
    data = _mixed_data()
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


def test_modality_attention_rows_sum_to_one():
    data = _mixed_data()
    torch.manual_seed(0)
    model = build_model("self", model_config("self", data, d_model=16, nhead=2)).eval()
    attn = modality_attention(model, data.to_batch(), batch_size=7)  # several chunks
    assert set(attn.received) == {"text", "audio", "video"}
    assert sum(attn.received.values()) == pytest.approx(1.0)
    for q_mods, k_mods, mat in attn.matrices.values():
        assert q_mods == k_mods == ["text", "audio", "video"]
        np.testing.assert_allclose(mat.sum(1), 1.0, atol=1e-6)


def test_bertviz_layout():
    data = _mixed_data(8)
    model = build_model("bicross", model_config("bicross", data, d_model=16, nhead=2, num_layers=2)).eval()
    _, maps = collect_maps(model, data.to_batch())
    export = json.loads(json.dumps(bertviz_export(maps, 3)))
    assert export["self"] == [] and len(export["cross"]) == 4
    first = export["cross"][0]
    assert np.array(first["attention"]).shape == (1, 2, len(first["query_tokens"]), len(first["key_tokens"]))


# -- the model finds the focus -----------------------------------------------------------------------


def test_attention_lands_on_the_planted_step():
    """Trained on the planted lookup, text->video attention puts ≥ 0.8 of its weight (mean over
    heads and test samples) on the step whose key matches the text query."""
    data = make_planted(n=1200, seed=1)
    result = run(data, "cross", {"num_layers": 1}, TrainConfig(epochs=60, patience=15, seed=0))
    assert result.metrics["test"]["r2"] > 0.9
    test = data.split_indices(seed=0)["test"]
    _, maps = collect_maps(result.model, result.standardizer.transform(data).to_batch(test))
    (m,) = maps
    assert m.query_tokens == ["text"] and m.key_tokens == [f"video[{t}]" for t in range(8)]
    planted = torch.from_numpy(data.info["planted_step"][test])
    weight_at_planted = m.weights.mean(dim=1)[torch.arange(len(test)), 0, planted]  # (B,)
    assert weight_at_planted.mean().item() >= 0.8


# -- the command on a trained model ------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain")
    data = make_planted(n=300, seq_len=4, num_keys=6, seed=3, task="classification")
    from attnfuse.data import save_npz

    save_npz(data, root / "planted.npz")
    dirs = {}
    for fusion in ("bicross", "concat"):
        out = root / fusion
        heads = ["--heads", "2"] if fusion != "concat" else []
        result = runner.invoke(
            app,
            [
                "train",
                "--data",
                str(root / "planted.npz"),
                "--fusion",
                fusion,
                "--epochs",
                "3",
                "--d-model",
                "16",
                *heads,
                "--out",
                str(out),
            ],
        )
        assert result.exit_code == 0, result.output
        dirs[fusion] = out
    return root, dirs


def test_cli_explain_writes_report(trained_dirs):
    root, dirs = trained_dirs
    out = root / "report"
    result = runner.invoke(
        app,
        [
            "explain",
            "--model",
            str(dirs["bicross"]),
            "--data",
            str(root / "planted.npz"),
            "--samples",
            "0,7",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert (out / "report.html").is_file() and (out / "modality_matrix.png").is_file()
    assert (out / "modality_received.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    heatmaps = sorted(p.name for p in (out / "heatmaps" / "sample7").iterdir())
    assert heatmaps == sorted(
        [
            "cross_text-_video_layer0.png",
            "cross_video-_text_layer0.png",
            "cross_text-_video_layer1.png",
            "cross_video-_text_layer1.png",
        ]
    )
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 + 2 * 4  # self-contained: every image embedded
    assert "test accuracy" in page
    export = json.loads((out / "bertviz" / "sample0.json").read_text())
    assert export["format"] == "bertviz" and len(export["cross"]) == 4


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--samples", "999"], "samples: expected row indices in 0..299"),
        (["--samples", "a,b"], "samples: expected row indices"),
        (["--split", "nope"], "split: expected one of"),
    ],
)
def test_cli_explain_bad_input_writes_nothing(trained_dirs, args, fragment):
    root, dirs = trained_dirs
    out = root / f"bad-{abs(hash(tuple(args)))}"
    result = runner.invoke(
        app, ["explain", "--model", str(dirs["bicross"]), "--data", str(root / "planted.npz"), "--out", str(out), *args]
    )
    assert result.exit_code == 2
    assert fragment in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_cli_explain_concat_says_it_has_no_attention(trained_dirs):
    root, dirs = trained_dirs
    result = runner.invoke(
        app,
        [
            "explain",
            "--model",
            str(dirs["concat"]),
            "--data",
            str(root / "planted.npz"),
            "--out",
            str(root / "concat-explain"),
        ],
    )
    assert result.exit_code == 2
    assert "no attention to show" in result.output
    assert not (root / "concat-explain").exists()


def test_cli_explain_defaults_to_the_training_file(trained_dirs):
    root, dirs = trained_dirs
    out = root / "default-data"
    result = runner.invoke(app, ["explain", "--model", str(dirs["bicross"]), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "report.html").is_file()
