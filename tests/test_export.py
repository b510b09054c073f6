"""Export (:mod:`attnfuse.export`): every fusion, as ONNX (run by onnxruntime), TorchScript and a
torch.export program, agrees with the eager model on rows with padded steps, absent modalities and
samples whose sequences are entirely absent; a graph recorded on rows without padding still obeys
the masks; an export that ignored a mask is refused before anything is written."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attnfuse.export as export
from attnfuse.checkpoint import load_model
from attnfuse.data import load_data
from attnfuse.training import predict
from clikit import assert_one_line, cli, ok

FUSIONS = ["concat", "self", "cross", "bicross", "mult"]
FORMATS = ["torchscript", "exported", "onnx"]
TINY = ["--epochs", "1", "--d-model", "8", "--batch-size", "32", "--no-baselines"]


def masked_npz(path, n: int = 48, seed: int = 0):
    """x_a (N, 4) vectors, x_b (N, 5, 3) and x_c (N, 4, 2) sequences with padded steps, every
    modality absent in some rows, NaN at invalid positions; a regression target."""
    rng = np.random.default_rng(seed)
    x_b = rng.normal(size=(n, 5, 3)).astype(np.float32)
    x_c = rng.normal(size=(n, 4, 2)).astype(np.float32)
    mask_b = np.arange(5)[None] < rng.integers(1, 6, size=n)[:, None]
    mask_c = np.arange(4)[None] < rng.integers(1, 5, size=n)[:, None]
    mask_a = np.ones(n, dtype=bool)
    mask_a[::5], mask_b[1::7], mask_c[2::6] = False, False, False  # absent modalities
    x_b[~mask_b], x_c[~mask_c] = np.nan, np.nan
    y = rng.normal(size=n).astype(np.float32)
    np.savez(path, x_a=rng.normal(size=(n, 4)).astype(np.float32), x_b=x_b, x_c=x_c,
             mask_a=mask_a, mask_b=mask_b, mask_c=mask_c, y=y)  # fmt: skip
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    data = masked_npz(root / "masked.npz")
    out = {}
    for fusion in FUSIONS:
        extra = ["--layers", "1", "--heads", "2"] if fusion != "concat" else []
        ok(cli("train", "--data", data, "--fusion", fusion, *TINY, *extra, "--out", root / fusion))
        out[fusion] = root / fusion
    return data, out


def eager_outputs(model_dir, data_path) -> np.ndarray:
    """The model through attnfuse's own path: load, standardise as a dataset, predict."""
    net, _, standardizer = load_model(model_dir)
    data = load_data(data_path)
    return predict(net, standardizer.transform(data).to_batch()).numpy()


def raw_inputs(model_dir, data_path) -> tuple[torch.Tensor, ...]:
    """The data as the graph takes it: raw features (NaN at invalid steps) and validity masks."""
    net, _, _ = load_model(model_dir)
    data = load_data(data_path)
    inputs = []
    for spec in net.config.modalities:
        x = np.asarray(data.features[spec.name], dtype=np.float32).reshape(data.n, spec.length, spec.dim)
        inputs += [torch.from_numpy(x.copy()), torch.from_numpy(data.valid_mask(spec.name).copy())]
    return tuple(inputs)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("fusion", FUSIONS)
def test_export_agrees_with_the_model_on_masked_rows(models, tmp_path, fusion, fmt):
    data, dirs = models
    path = tmp_path / f"model.{fmt}"
    info = export.export_model(dirs[fusion], path, fmt)
    assert info["max_abs_difference"] <= export.PARITY_TOLERANCE
    assert [i["name"] for i in info["inputs"]] == ["x_a", "mask_a", "x_b", "mask_b", "x_c", "mask_c"]
    inputs = raw_inputs(dirs[fusion], data)
    names = [i["name"] for i in info["inputs"]]
    got = export.run_exported(path, fmt, inputs, names)
    np.testing.assert_allclose(got, eager_outputs(dirs[fusion], data), rtol=1e-5, atol=1e-5)


def test_a_graph_recorded_without_padding_still_obeys_masks(models, tmp_path):
    """Traced on rows where nothing is padded, the graph is still right on padded rows."""
    _, dirs = models
    net, config, standardizer = load_model(dirs["self"])
    wrapper = export.PlainTensorModel(net, standardizer, config["data"]["task"]).eval()
    full = tuple(torch.ones_like(t) if t.dtype == torch.bool else t.nan_to_num(0.5)
                 for t in export.example_inputs(wrapper, 4))  # fmt: skip
    with torch.no_grad():
        traced = torch.jit.trace(wrapper, full, check_trace=False)
        padded = export.example_inputs(wrapper, 6, seed=3)
        torch.testing.assert_close(traced(*padded), wrapper(*padded), rtol=1e-5, atol=1e-6)


def test_an_export_that_ignores_masks_is_refused(models, tmp_path, monkeypatch):
    """With the recording guard switched off, a graph traced on unpadded rows freezes "nothing is
    padded": the parity check must catch it, and nothing is written."""
    _, dirs = models
    monkeypatch.setattr("attnfuse.nn.masks.tracing", lambda: False)
    monkeypatch.setattr("attnfuse.nn.functional.tracing", lambda: False)
    original = export.example_inputs

    def unpadded(model, batch_size=4, seed=0):
        return tuple(torch.ones_like(t) if t.dtype == torch.bool else t.nan_to_num(0.5)
                     for t in original(model, batch_size, seed))  # fmt: skip

    calls = iter([unpadded, original, original])
    monkeypatch.setattr(export, "example_inputs", lambda *a, **k: next(calls)(*a, **k))
    with pytest.raises(ValueError, match="differs from the model"):
        export.export_model(dirs["self"], tmp_path / "bad.pt", "torchscript")
    assert not (tmp_path / "bad.pt").exists()


def test_export_command(models, tmp_path):
    _, dirs = models
    result = cli("export", "--model", dirs["cross"], "--format", "torchscript", "--out", tmp_path / "m.pt")
    ok(result)
    said = " ".join(result.stdout.split())
    assert "x_a float32 (batch, 1, 4), mask_a bool (batch, 1)" in said and "max |difference|" in said
    assert (tmp_path / "m.pt").is_file()
    assert_one_line(cli("export", "--model", dirs["cross"], "--format", "tflite", "--out", tmp_path / "m.x"), 2,
                    "format", "tflite")  # fmt: skip
    assert_one_line(cli("export", "--model", tmp_path / "none", "--out", tmp_path / "m.y"), 2)
    assert not (tmp_path / "m.x").exists() and not (tmp_path / "m.y").exists()
