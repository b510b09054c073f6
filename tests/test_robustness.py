"""``attnfuse evaluate --missing`` (attnfuse.robustness): a modality absent from a share of the
test rows, or noisy, for the model and the baselines, on planted truth."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from attnfuse import robustness
from attnfuse.baselines import make_baseline, pooled_features
from attnfuse.data import MultimodalDataset, RowBatches, make_planted
from attnfuse.metrics import compute_metrics
from attnfuse.pipeline import TrainSpec, load_trained, split_parts, train
from attnfuse.robustness import FRACTIONS, NOISE_SCALES, _columns, missing_modalities, robustness_table
from attnfuse.training import predict, to_predictions
from clikit import TINY, assert_one_line, cli, ok, strict_loads


def planted_with_noise(n: int = 1200) -> MultimodalDataset:
    """The planted lookup (text queries the video step whose key matches; y is that step's value)
    plus a third modality of pure noise: video carries everything the text query unlocks, noise
    carries nothing."""
    planted = make_planted(n=n, seed=1)
    noise = np.random.default_rng(5).standard_normal((n, 8)).astype(np.float32)
    features = {"text": planted.features["text"], "video": planted.features["video"], "noise": noise}
    return MultimodalDataset(features, planted.y, name="planted-noise")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`cross` (text queries video and noise; 1 layer) trained on the planted lookup with a noise
    modality: test R² ≈ 0.96 (about 35 s on one thread)."""
    data = planted_with_noise()
    out = tmp_path_factory.mktemp("robust") / "model"
    options = {"data": "planted-noise", "fusion": "cross", "layers": 1, "epochs": 60, "patience": 15, "seed": 0}
    train(TrainSpec.from_options(options), out, data=data)
    net, config, standardizer, data = load_trained(out, data=data)
    result = missing_modalities(net, config, standardizer, data)
    return out, (net, config, standardizer, data), result


def test_a_modality_that_carries_nothing_costs_nothing_and_one_that_carries_everything_almost_all(trained):
    """Measured: without noise R² moves by < 0.001; without video it falls from 0.96 to below 0
    (nothing to look up), and falls at every step of the share absent."""
    _, _, result = trained
    full = result.curve("absent", "video", "cross")[0]
    assert full > 0.9
    assert abs(result.cost("noise")) < 0.02
    assert result.cost("video") > 0.9 * full
    video = result.curve("absent", "video", "cross")
    assert all(a > b for a, b in itertools.pairwise(video))
    # noise on the noise modality costs little too, noise on the video much
    noisy = result.curve("noise", "noise", "cross")
    assert max(noisy) - min(noisy) < 0.02
    assert result.curve("noise", "video", "cross")[-1] < full - 0.3


def test_at_zero_the_curves_are_the_metrics_of_training(trained):
    """At 0% absent and noise 0 the model and each baseline score what metrics.json says on test:
    the baselines are fitted as training fits them, on the same rows and columns."""
    out, _, result = trained
    metrics = json.loads((out / "metrics.json").read_text())
    assert result.rows == "test" and result.n == 180 and result.models == ["cross", "ridge", "hist_gb"]
    for m in ("text", "video", "noise"):
        assert result.absent[m]["cross"][0] == pytest.approx(metrics["test"], rel=1e-5)
        for name in ("ridge", "hist_gb"):
            assert result.absent[m][name][0] == pytest.approx(metrics["baselines"][name]["test"], rel=1e-12)
        for name in result.models:
            assert result.noise[m][name][0] == result.absent[m][name][0]


def test_absent_is_the_mask_a_sample_without_the_modality_has(trained):
    """100% absent is exactly the data with that modality's presence mask all False."""
    _, (net, config, standardizer, data), result = trained
    test = split_parts(data, config)["test"]
    without = MultimodalDataset(data.features, data.y, masks={"noise": np.zeros(data.n, dtype=bool)}, name=data.name)
    pred = to_predictions("regression", predict(net, RowBatches(without, test, standardizer).to_batch()))
    assert result.absent["noise"]["cross"][-1] == compute_metrics("regression", data.y[test], pred)


def test_the_baselines_get_the_training_mean_of_an_absent_modality(trained):
    """Ridge with the noise modality absent from every test row scores what ridge scores when those
    features are NaN and its own imputer fills in the training rows' mean: mean imputation."""
    _, (_, config, _, data), result = trained
    parts = split_parts(data, config)
    x = pooled_features(data)  # (N, F): no modality is absent anywhere, no presence columns
    ridge = make_baseline("ridge", "regression", seed=0, y=data.y[parts["train"]])
    ridge.fit(x[parts["train"]], data.y[parts["train"]])
    test = x[parts["test"]].copy()
    test[:, -8:] = np.nan  # the noise modality's 8 columns come last
    expected = compute_metrics("regression", data.y[parts["test"]], ridge.predict(test))
    assert result.absent["noise"]["ridge"][-1] == pytest.approx(expected, rel=1e-9)


def test_the_draws_are_seeded(trained):
    _, loaded, result = trained
    again = missing_modalities(*loaded, fractions=(0.5,), scales=(1.0,), baselines=False)
    assert again.absent["video"]["cross"][0] == result.absent["video"]["cross"][2]
    assert again.noise["video"]["cross"][0] == result.noise["video"]["cross"][3]
    other = missing_modalities(*loaded, fractions=(0.5,), scales=(1.0,), seed=1, baselines=False)
    assert other.absent["video"]["cross"][0] != again.absent["video"]["cross"][0]
    assert other.models == ["cross"] and other.note is None


def test_rows_are_measured_in_chunks_with_the_same_absent_rows(trained, monkeypatch):
    """Read 64 rows at a time (180 test rows: three chunks), the rows made absent and so the
    absent curves are those of one chunk (the noise is drawn per chunk: another draw)."""
    _, loaded, result = trained
    monkeypatch.setattr(robustness, "CHUNK", 64)
    chunked = missing_modalities(*loaded, scales=(0.0, 1.0), baselines=False)
    for m in ("text", "video", "noise"):
        for got, expected in zip(chunked.absent[m]["cross"], result.absent[m]["cross"]):
            assert got == pytest.approx(expected, rel=1e-5)
        assert chunked.noise[m]["cross"][0] == pytest.approx(result.noise[m]["cross"][0], rel=1e-5)
    # read in chunks indeed: the noise of scale 1 is another draw, so the video's curve moves
    assert chunked.noise["video"]["cross"][1] != pytest.approx(result.noise["video"]["cross"][3], rel=1e-5)


def test_other_data_is_measured_for_the_model_only(trained):
    """The baselines need the model's training rows: on data that is not the training data the
    table holds the model alone and says why."""
    _, (net, config, standardizer, _), _ = trained
    other = planted_with_noise(n=300)  # other rows (other targets): not the training data
    result = missing_modalities(net, config, standardizer, other, fractions=(0.0, 1.0), scales=(0.0,))
    assert result.models == ["cross"] and result.rows == "all" and result.n == 300
    assert "training rows" in result.note


def test_the_table_and_the_json_block(trained):
    _, _, result = trained
    block = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert block["fractions"] == list(FRACTIONS) and block["noise_scales"] == list(NOISE_SCALES)
    assert set(block["absent"]) == {"text", "video", "noise"} and "r2" in block["absent"]["text"]["ridge"][0]
    (absent_title, header, rows), (noise_title, _, _) = robustness_table(result)
    assert header == ["modality", "model", "0%", "25%", "50%", "75%", "100%"]
    assert rows[0][:2] == ["text", "cross (fusion)"] and rows[1][:2] == ["text", "ridge"] and len(rows) == 9
    assert "r2 on the 180 test rows" in absent_title and "noise" in noise_title


def test_presence_columns_are_found_where_the_baselines_have_them():
    """A modality absent for some rows gets a presence column after all the features; the one
    :func:`_columns` names is that column."""
    rng = np.random.default_rng(0)
    present_b = np.arange(40) % 4 != 0
    data = MultimodalDataset(
        {"a": rng.normal(size=(40, 3)), "b": rng.normal(size=(40, 2)), "c": rng.normal(size=(40, 5, 2))},
        rng.normal(size=40),
        masks={"b": present_b},
    )
    used = np.arange(40)
    x = pooled_features(data, used)
    columns = _columns(data, used)
    assert columns["a"][1] is None and columns["c"][1] is None
    np.testing.assert_array_equal(columns["b"][0], [3, 4])
    np.testing.assert_array_equal(x[:, columns["b"][1]], present_b.astype(float))
    assert x.shape[1] == 3 + 2 + 2 + 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"fractions": (0.5, 1.5)}, r"fractions: expected one or more finite numbers in \[0, 1\], got \[0.5, 1.5\]"),
        ({"scales": ()}, r"scales: expected one or more finite numbers >= 0, got \[\]"),
        ({"scales": (-1,)}, "scales: expected one or more finite numbers >= 0"),
        ({"seed": -1}, "seed: expected an integer >= 0, got -1"),
        ({"fractions": "abc"}, r"fractions: expected one or more finite numbers in \[0, 1\], got 'abc'"),
        ({"scales": (True,)}, "scales: expected one or more finite numbers >= 0"),
    ],
)
def test_bad_arguments_are_one_line_errors(trained, kwargs, match):
    _, loaded, _ = trained
    with pytest.raises(ValueError, match=match):
        missing_modalities(*loaded, **kwargs)


# ---------------------------------------------------------------------------------------------
# The command line


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A classifier on two views, one of them absent for a quarter of the rows (a presence column
    for the baselines), trained in a second."""
    d = tmp_path_factory.mktemp("robust-cli")
    rng = np.random.default_rng(0)
    y = np.arange(120) % 3
    np.savez(
        d / "toy.npz",
        x_a=(rng.normal(size=(120, 4)) + y[:, None]).astype(np.float32),
        x_b=rng.normal(size=(120, 3, 2)).astype(np.float32),
        mask_b=np.arange(120) % 4 != 0,
        y=y,
    )
    ok(cli("train", "--data", d / "toy.npz", *TINY, "--out", d / "model"))
    return d


def test_evaluate_missing_prints_writes_json_and_a_plot(tiny_model):
    d = tiny_model
    result = cli("evaluate", "--model", d / "model", "--missing")
    ok(result)
    assert "accuracy on the 18 test rows with a modality absent" in " ".join(result.stdout.split())
    report = strict_loads((d / "model" / "evaluation.json").read_text())
    assert report["missing"]["models"] == ["concat", "logistic", "hist_gb"]
    assert report["missing"]["metric"] == "accuracy" and set(report["missing"]["absent"]) == {"a", "b"}
    plot = d / "model.missing.png"  # beside the model directory: a model directory holds a run's files only
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (d / "model").iterdir()) == sorted(
        ["config.json", "evaluation.json", "log.csv", "metrics.json", "model.safetensors", "run.yaml"]
    )
    ok(cli("evaluate", "--model", d / "model", "--missing", "--plot", d / "elsewhere.png", "--out", d / "e.json"))
    assert (d / "elsewhere.png").exists() and "missing" in json.loads((d / "e.json").read_text())


def test_an_unwritable_plot_is_one_line_after_the_metrics(tiny_model):
    """The metrics and the tables are shown and evaluation.json is written; then one line names
    the plot that could not be written and the way out."""
    d = tiny_model
    (d / "model" / "evaluation.json").unlink(missing_ok=True)
    result = cli("evaluate", "--model", d / "model", "--missing", "--plot", d)  # a directory
    assert_one_line(result, 2, "the robustness plot could not be written", "--plot FILE writes it elsewhere")
    assert "modality absent" in " ".join(result.stdout.split())
    assert "missing" in json.loads((d / "model" / "evaluation.json").read_text())


def test_plot_without_missing_is_one_line(tiny_model):
    result = cli("evaluate", "--model", tiny_model / "model", "--plot", tiny_model / "p.png")
    assert_one_line(
        result, 2, "plot: --plot .*p.png names the plot of --missing, which was not asked for; add --missing"
    )
