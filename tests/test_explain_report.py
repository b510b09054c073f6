"""The explanation report: figures (sized to their content, padding hatched), file names, the
self-contained HTML (rendered in a real headless browser when one is installed), and the
``attnfuse explain`` command on trained models."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import matplotlib.image as mpimg
import numpy as np
import pytest
from matplotlib.colors import to_hex
from matplotlib.patches import Rectangle
from typer.testing import CliRunner

from attnfuse.cli import app
from attnfuse.data import make_planted, save_npz
from attnfuse.explain import collect_maps, explain_model, key_valid, modality_attention, write_report
from attnfuse.explain.report import (
    LOWERS,
    PADDED,
    RAISES,
    feature_effects,
    feature_labels,
    file_name,
    plot_features,
    plot_heads,
    plot_received,
)
from attnfuse.explain.run import column_names
from attnfuse.pipeline import load_trained, split_parts
from test_explain import mixed_data, tiny_model

runner = CliRunner()
BROWSER = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


def test_file_names_keep_block_names_readable():
    assert file_name("cross:text->video/layer0") == "cross_text-to-video_layer0"
    assert file_name("cross:text->audio+video/layer1") == "cross_text-to-audio+video_layer1"
    assert file_name("self:text/layer0") == "self_text_layer0"
    assert file_name("self/layer2") == "self_layer2"


def _hatched(ax) -> list[Rectangle]:
    return [p for p in ax.patches if isinstance(p, Rectangle) and p.get_hatch() == PADDED["hatch"]]


def test_heatmaps_hatch_padded_keys_and_queries():
    data = mixed_data()
    model = tiny_model("self", data)
    batch = data.to_batch()
    _, maps = collect_maps(model, batch)
    m = maps[0]
    valid = key_valid(m, batch)
    sample = 0  # audio absent; video steps 3 and 4 may be padding
    invalid = int((~valid[sample]).sum())
    assert invalid >= 1
    fig = plot_heads(m, sample, "title", valid[sample].numpy())
    heads = [ax for ax in fig.axes if ax.get_title().startswith("head")]
    assert len(heads) == 2
    for ax in heads:  # self-attention: an invalid token is an invalid key column and query row
        assert len(_hatched(ax)) == 2 * invalid
    assert any(t.get_text() == "padded step / absent modality" for leg in fig.legends for t in leg.get_texts())
    # A padded key got weight exactly 0, but is drawn hatched, not as a zero-attention cell.
    assert (m.weights[sample][..., ~valid[sample]] == 0).all()


def test_received_chart_is_sized_to_its_title():
    """The figure grows and the title wraps, so a long title is never cut at the figure's edges."""
    data = mixed_data()
    attn = modality_attention(tiny_model("self", data), data.to_batch())
    title = "Attention received per modality — self fusion on a data set with a long name: test accuracy 0.9933"
    fig = plot_received(attn, title)
    fig.draw_without_rendering()  # runs the layout, as saving does
    box = fig.bbox
    for ax in fig.axes:
        extent = ax.title.get_window_extent()
        assert box.x0 <= extent.x0 and extent.x1 <= box.x1 and extent.y1 <= box.y1
        assert ax.title.get_text().replace("\n", " ") == title


REPORTED = ["concat", "self", "cross", "mult"]  # bicross's report is drawn by the command tests below


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """One report per fusion, on untrained tiny models over data with padding and absent modalities
    (mult without per-sample views: its 9 blocks would add 9 heatmaps to draw)."""
    root = tmp_path_factory.mktemp("reports")
    data = mixed_data(30)
    out = {}
    for fusion in REPORTED:
        layers = {"concat": {}, "self": {}, "cross": {"num_layers": 1}, "mult": {"num_layers": 1, "self_layers": 1}}
        model = tiny_model(fusion, data, **layers[fusion])
        samples = [] if fusion == "mult" else [0]  # row 0: audio absent, video padded
        rows = np.arange(10, 30)
        expl = explain_model(model, data, None, rows, split="test", methods="all", samples=samples, n_steps=8)
        out[fusion] = (expl, root / fusion, write_report(expl, root / fusion))
    return out


@pytest.mark.parametrize("fusion", REPORTED)
def test_report_files_and_sections(reports, fusion):
    expl, out, written = reports[fusion]
    names = {p.relative_to(out).as_posix() for p in written}
    assert {"report.html", "explanation.json", "agreement.png", "masking.png", "steps.png", "features.png"} <= names
    attention, views = fusion != "concat", fusion != "mult"
    assert ("samples/sample0.png" in names) == views
    assert ("bertviz/sample0.json" in names) == (attention and views)
    assert ("samples/sample0_rollout.png" in names) == (attention and views)  # rolled-out maps next to raw ones
    if fusion == "cross":  # one query modality: step-by-step maps instead of a 1x1 modality matrix
        assert "step_maps.png" in names and "modality_matrix.png" not in names
        assert "heatmaps/sample0/cross_text-to-audio+video_layer0.png" in names
    assert ("modality_matrix.png" in names) == (fusion == "self")  # the only fusion mixing modalities in a query
    assert ("step_maps.png" in names) == (fusion in ("cross", "mult"))
    heatmaps = [n for n in names if n.startswith("heatmaps/sample0/")]
    assert len(heatmaps) == (len(expl.samples[0].maps) if attention and views else 0)
    assert not any("_-_" in n or n.endswith("-_video_layer0.png") for n in names)  # "->" is "-to-", not "_"
    page = (out / "report.html").read_text()
    pngs = [n for n in names if n.endswith(".png")]
    assert page.count("data:image/png;base64,") == len(pngs)  # self-contained: every figure embedded
    sections = page.count("<h2")
    assert page.count("How to read this.") == sections - (
        1 if expl.notes else 0
    )  # every figure section explains itself
    assert "modality dropout" in page  # untrained without modality dropout: masking is out of distribution
    summary = json.loads((out / "explanation.json").read_text())
    assert summary["methods"] == list(expl.methods) and summary["rows"] == 20
    assert set(summary["shares"]["mask"]) == {"text", "audio", "video"}
    assert summary["ig"]["complete"] is True
    for png in pngs:
        image = mpimg.imread(out / png)
        assert image.shape[0] > 50 and image.shape[1] > 50


def _browser(*args: str, profile) -> subprocess.CompletedProcess:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
    ]
    return subprocess.run([BROWSER, *flags, *args], capture_output=True, text=True, timeout=120, check=True)


# Marks <body> with the number of images and of those the browser could not decode.
PROBE = (
    "<script>window.addEventListener('load', () => { const imgs = [...document.images];"
    " document.body.dataset.images = imgs.length;"
    " document.body.dataset.broken = imgs.filter(i => !i.complete || i.naturalWidth === 0).length; });</script>"
)


@pytest.mark.skipif(BROWSER is None, reason="no headless browser (chromium) installed")
@pytest.mark.parametrize("fusion", ["self", "concat"])
def test_report_renders_in_a_headless_browser(reports, tmp_path, fusion):
    _, out, written = reports[fusion]
    page = (out / "report.html").read_text()
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", PROBE + "</body>"))
    dom = _browser("--virtual-time-budget=10000", "--dump-dom", probe.as_uri(), profile=tmp_path / "profile").stdout
    body = re.search(r'<body data-images="(\d+)" data-broken="(\d+)"', dom)
    assert body, dom[:500]
    images, broken = map(int, body.groups())
    assert images == sum(p.suffix == ".png" for p in written) and broken == 0
    shot = tmp_path / "shot.png"
    _browser(f"--screenshot={shot}", "--window-size=1100,1400", (out / "report.html").as_uri(), profile=tmp_path / "p2")
    pixels = mpimg.imread(shot)
    assert pixels.shape[:2] == (1400, 1100) and pixels.std() > 0.05  # rendered, not blank


def test_the_probe_detects_a_broken_image(tmp_path):
    if BROWSER is None:
        pytest.skip("no headless browser (chromium) installed")
    probe = tmp_path / "broken.html"
    probe.write_text(f'<html><body><img src="data:image/png;base64,AAAA">{PROBE}</body></html>')
    dom = _browser("--virtual-time-budget=5000", "--dump-dom", probe.as_uri(), profile=tmp_path / "profile").stdout
    assert 'data-images="1" data-broken="1"' in dom


# -- the command on trained models ---------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain")
    data = make_planted(n=300, seq_len=4, num_keys=6, seed=3, task="classification")
    save_npz(data, root / "planted.npz")
    dirs = {}
    for fusion in ("bicross", "concat"):
        out = root / fusion
        heads = ["--heads", "2"] if fusion != "concat" else []
        args = ["train", "--data", str(root / "planted.npz"), "--fusion", fusion, "--epochs", "3", "--d-model", "16"]
        result = runner.invoke(app, [*args, *heads, "--out", str(out)])
        assert result.exit_code == 0, result.output
        dirs[fusion] = out
    return root, dirs


def _test_rows(root, model_dir) -> np.ndarray:
    """The data rows of the model's test split, in the order explain takes them."""
    _net, config, _standardizer, dataset = load_trained(model_dir, str(root / "planted.npz"))
    return split_parts(dataset, config)["test"]


def _explain(root, model_dir, *args):
    return runner.invoke(app, ["explain", "--model", str(model_dir), "--data", str(root / "planted.npz"), *args])


def test_cli_explain_writes_report(trained_dirs):
    root, dirs = trained_dirs
    out = root / "report"
    result = _explain(root, dirs["bicross"], "--samples", "0,7", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert (out / "report.html").is_file() and (out / "agreement.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    first, eighth = json.loads((out / "explanation.json").read_text())["samples"]  # data rows of the test split
    assert (first, eighth) == tuple(_test_rows(root, dirs["bicross"])[[0, 7]])
    heatmaps = sorted(p.name for p in (out / "heatmaps" / f"sample{eighth}").iterdir())
    assert heatmaps == sorted(
        f"cross_{a}-to-{b}_layer{i}.png" for a, b in (("text", "video"), ("video", "text")) for i in (0, 1)
    )
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(list(out.rglob("*.png")))
    assert "test accuracy" in page
    export = json.loads((out / "bertviz" / f"sample{first}.json").read_text())
    assert export["format"] == "bertviz" and len(export["cross"]) == 4
    # The default methods are the cheap ones, and the table says what each found.
    header = next(line for line in result.output.splitlines() if "modality" in line and "masking" in line)
    for column in ("attention", "rollout", "masking", "grad×input", "accuracy"):
        assert column in header
    assert "IG" not in header
    assert json.loads((out / "explanation.json").read_text())["methods"] == ["attention", "mask", "gxi", "rollout"]


def test_cli_explain_method_and_rows(trained_dirs):
    root, dirs = trained_dirs
    out = root / "ig-only"
    result = _explain(root, dirs["bicross"], "--method", "ig", "--steps", "16", "--max-rows", "20", "--out", str(out))
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "explanation.json").read_text())
    assert summary["methods"] == ["ig"] and summary["rows"] == 20 and summary["ig"]["n_steps"] == 16
    assert not (out / "heatmaps").exists() and "IG" in result.output


def test_cli_explain_concat_explains_without_attention(trained_dirs):
    root, dirs = trained_dirs
    out = root / "concat-explain"
    result = _explain(root, dirs["concat"], "--out", str(out))
    assert result.exit_code == 0, result.output
    assert json.loads((out / "explanation.json").read_text())["methods"] == ["mask", "gxi"]
    assert not (out / "heatmaps").exists() and (out / "masking.png").is_file()
    result = _explain(root, dirs["concat"], "--method", "attention", "--out", str(root / "concat-attention"))
    assert result.exit_code == 2 and "no attention to show" in result.output
    assert not (root / "concat-attention").exists()


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--samples", "999"], "samples: expected positions in 0..44 (the 45 test rows explained), got 999"),
        (["--samples", "45"], "samples: expected positions in 0..44 (the 45 test rows explained), got 45"),
        (["--samples", "-1,3"], "samples: expected positions in 0..44 (the 45 test rows explained), got -1"),
        (["--samples", "a,b"], "samples: expected positions among the explained rows"),
        (["--split", "nope"], "split: expected one of"),
        (["--method", "shap"], "method: expected 'auto', 'all' or a comma-separated list"),
    ],
)
def test_cli_explain_bad_input_writes_nothing(trained_dirs, args, fragment):
    root, dirs = trained_dirs
    out = root / f"bad-{abs(hash(tuple(args)))}"
    result = _explain(root, dirs["bicross"], "--out", str(out), *args)
    assert result.exit_code == 2
    assert fragment in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_cli_explain_defaults_to_the_training_file(trained_dirs):
    root, dirs = trained_dirs
    out = root / "default-data"
    result = runner.invoke(app, ["explain", "--model", str(dirs["bicross"]), "--method", "mask", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "report.html").is_file()


def test_cli_explain_replaces_its_own_output_whole_and_refuses_a_foreign_folder(trained_dirs):
    root, dirs = trained_dirs
    out = root / "again"
    assert _explain(root, dirs["bicross"], "--samples", "0,7", "--out", str(out)).exit_code == 0
    first, eighth = _test_rows(root, dirs["bicross"])[[0, 7]]
    assert (out / "heatmaps" / f"sample{eighth}").is_dir()
    # A second run with other samples replaces the folder as one piece: no heatmaps of the eighth remain.
    assert _explain(root, dirs["bicross"], "--samples", "0", "--out", str(out)).exit_code == 0
    assert not (out / "heatmaps" / f"sample{eighth}").exists() and (out / "heatmaps" / f"sample{first}").is_dir()
    mine = root / "my-documents"
    mine.mkdir()
    (mine / "thesis.tex").write_text("keep me")
    result = _explain(root, dirs["bicross"], "--out", str(mine))
    assert result.exit_code != 0 and "not an attnfuse explanation" in result.output
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]


# -- the features figure on a planted linear table -----------------------------------------------

# y = 1.5 a_up - 2 a_down + 1 b_up + 0 b_flat (+ a little noise): the direction of every feature with
# a coefficient is known; b_flat's is not asserted (it has none).
COEFFICIENTS = {"a_up": 1.5, "a_down": -2.0, "b_up": 1.0, "b_flat": 0.0}


@pytest.fixture(scope="module")
def linear_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("linear")
    rng = np.random.default_rng(0)
    split = np.array(["train"] * 200 + ["valid"] * 50 + ["test"] * 50)
    x = rng.normal(size=(300, 4))
    # The explained (test) rows lie below the training mean, the baseline: the mean of a feature's
    # attribution then has the sign opposite to its coefficient, the direction does not.
    x[split == "test"] -= 1.5
    y = x @ np.array(list(COEFFICIENTS.values())) + 0.05 * rng.normal(size=300)
    lines = [",".join([*COEFFICIENTS, "y", "split"])]
    lines += [",".join([*(f"{v:.6f}" for v in (*r, t)), part]) for r, t, part in zip(x, y, split)]
    (root / "linear.csv").write_text("\n".join(lines) + "\n")
    out = root / "model"
    args = ["--fusion", "concat", "--epochs", "30", "--d-model", "16", "--no-baselines"]
    result = runner.invoke(app, ["train", "--data", str(root / "linear.csv"), *args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    return root, out


def _explained_features(model_dir, method: str):
    net, config, standardizer, dataset = load_trained(model_dir)
    rows = split_parts(dataset, config)["test"]
    return explain_model(
        net, dataset, standardizer, rows, split="test", methods=method, samples=[], n_steps=16,
        feature_names=column_names(config),
    )  # fmt: skip


@pytest.mark.parametrize("method", ["ig", "gxi"])
def test_features_figure_colours_the_direction_of_a_linear_models_coefficients(linear_model, method):
    _root, model_dir = linear_model
    expl = _explained_features(model_dir, method)
    effects = feature_effects(expl)
    assert {mod: labels for mod, (labels, _, _) in effects.items()} == {
        "a": ["a_up", "a_down"],
        "b": ["b_up", "b_flat"],
    }
    direction = {n: d for labels, _, ds in effects.values() for n, d in zip(labels, ds)}
    for name in ("a_up", "a_down", "b_up"):
        assert np.sign(direction[name]) == np.sign(COEFFICIENTS[name]), (name, direction)
    mass = {n: m for labels, ms, _ in effects.values() for n, m in zip(labels, ms)}
    assert mass["b_flat"] < min(mass["a_up"], mass["a_down"], mass["b_up"])  # no coefficient: the least

    fig = plot_features(expl)
    for ax in fig.axes:
        names = [t.get_text() for t in ax.get_yticklabels()]
        colours = [to_hex(bar.get_facecolor()) for bar in ax.patches]
        for name, colour in zip(names, colours):
            if COEFFICIENTS[name] != 0:
                assert colour == to_hex(RAISES if COEFFICIENTS[name] > 0 else LOWERS), name
    legend = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
    assert legend == ["a larger value raises the output", "a larger value lowers it"]


def test_explain_labels_features_with_the_columns_the_model_recorded(linear_model):
    root, model_dir = linear_model
    out = root / "explained"
    result = runner.invoke(app, ["explain", "--model", str(model_dir), "--method", "gxi", "--out", str(out)])
    assert result.exit_code == 0, result.output
    features = json.loads((out / "explanation.json").read_text())["features"]
    assert {m: sorted(f["name"] for f in fs) for m, fs in features.items()} == {
        "a": ["a_down", "a_up"],
        "b": ["b_flat", "b_up"],
    }
    signs = {f["name"]: np.sign(f["direction"]) for fs in features.values() for f in fs}
    assert (signs["a_up"], signs["a_down"], signs["b_up"]) == (1, -1, 1)


def test_feature_names_come_from_config_data_columns_else_modality_and_index(tmp_path):
    data = mixed_data(12)
    model = tiny_model("concat", data)
    plain = explain_model(model, data, methods="gxi", samples=[])
    assert feature_labels(plain, "text", 6) == [f"text:{i}" for i in range(6)]
    columns = {"modalities": {"text": [f"word{i}" for i in range(6)], "audio": ["pitch", "volume", "rate", "pause"]}}
    config = {"data": {"columns": {**columns, "target": "y", "split": None}}}
    named = explain_model(model, data, methods="gxi", samples=[], feature_names=column_names(config))
    assert feature_labels(named, "text", 6) == [f"word{i}" for i in range(6)]
    assert feature_labels(named, "audio", 4) == ["pitch", "volume", "rate", "pause"]
    assert feature_labels(named, "video", 3) == ["video:0", "video:1", "video:2"]  # no names recorded for it
    fig = plot_features(named)
    text_axis = next(ax for ax in fig.axes if ax.get_title() == "text")
    assert {t.get_text() for t in text_axis.get_yticklabels()} <= set(columns["modalities"]["text"])
    assert column_names({"data": {"task": "classification"}}) is None  # a model trained on arrays
