"""The baselines as torch heads: on a standardised Batch they give what the fitted scikit-learn model
gives on the pooled features (the oracle), rebuild from their record without pickle, ignore values
at invalid steps, and export with torch.export."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from torch import nn

from attnfuse import export, heads
from attnfuse.baselines import fit_baseline, pooled_features
from attnfuse.data import MultimodalDataset, Standardizer
from attnfuse.data.dataset import Batch
from attnfuse.heads import (
    ABSENT_LOGIT,
    LinearHead,
    Pooling,
    TreeHead,
    build_head,
    head_from_baseline,
    presence_columns,
)

N, TRAIN = 240, 180  # rows; the first TRAIN are the training rows


def make_data(task: str, classes: int = 2, targets: int = 1, seed: int = 0) -> MultimodalDataset:
    """A sequence modality with padded steps, a vector modality, and a sequence modality absent in
    every fourth row; features far from standard units (the head must undo the standardisation).
    Classification with ``classes`` labels, class 1 only in rows after TRAIN when ``classes``
    is 3 or more (a class the baselines never see); regression with ``targets`` targets."""
    rng = np.random.default_rng(seed)
    seq = 3.0 + 2.0 * rng.normal(size=(N, 5, 3))
    vec = -1.0 + 0.5 * rng.normal(size=(N, 4))
    opt = 10.0 + 4.0 * rng.normal(size=(N, 3, 2))
    steps = np.arange(5)[None, :] < rng.integers(1, 6, size=N)[:, None]  # (N, 5)
    present = np.arange(N) % 4 != 1  # (N,)
    score = seq[:, :2, 0].mean(axis=1) - 2 * vec[:, 1] + np.where(present, opt[:, :, 1].mean(axis=1) / 4, 0.0)
    score = score + 0.3 * rng.normal(size=N)
    if task == "classification":
        seen = classes - 1 if classes >= 3 else classes
        y = np.digitize(score, np.quantile(score, np.linspace(0, 1, seen + 1)[1:-1])).astype(np.int64)
        if classes >= 3:  # class 1 only in rows the baselines are not fitted on
            y[y >= 1] += 1
            y[TRAIN + 1 :: 7] = 1
    else:
        y = np.stack([10 + 3 * score, score - vec[:, 0]][:targets], axis=1).astype(np.float32)
        y = y[:, 0] if targets == 1 else y
    return MultimodalDataset(
        {"seq": seq, "vec": vec, "opt": opt},
        y,
        masks={"seq": steps, "opt": present},
        num_classes=classes if task == "classification" else None,
    )


def fitted_head(name: str, data: MultimodalDataset):
    """(head, fitted estimator, pooled features of every row (N, F), standardised batch of every row)."""
    train = np.arange(TRAIN)
    x = pooled_features(data)
    presence = presence_columns(data)
    model = fit_baseline(name, data, x[train], data.y[train])
    standardizer = Standardizer.fit(data, train)
    out_dim = data.num_classes if data.task == "classification" else data.target_dim
    head = head_from_baseline(name, model, data.modalities, standardizer, presence, data.task, out_dim)
    return head, model, x, standardizer.transform(data).to_batch()


def expected_logits(model, x: np.ndarray, out_dim: int) -> np.ndarray:
    """The head's logits from scikit-learn: decision_function ([0, d] when binary) in the columns of
    the classes the model saw, ABSENT_LOGIT in the others."""
    d = model.decision_function(x)
    d = np.stack([np.zeros_like(d), d], axis=1) if d.ndim == 1 else d
    out = np.full((x.shape[0], out_dim), ABSENT_LOGIT)
    out[:, model.classes_] = d
    return out


CLASSIFICATION = [(name, k) for name in ("logistic", "hist_gb") for k in (2, 3, 4)]
REGRESSION = [(name, k) for name in ("ridge", "hist_gb") for k in (1, 2)]


@pytest.mark.parametrize("name, classes", CLASSIFICATION)
def test_classification_head_gives_the_baselines_decision_function_and_probabilities(name, classes):
    data = make_data("classification", classes=classes)
    head, model, x, batch = fitted_head(name, data)
    with torch.no_grad():
        logits = head(batch)  # (N, C)
    assert logits.shape == (N, classes) and logits.dtype == torch.float32
    np.testing.assert_allclose(logits.numpy(), expected_logits(model, x, classes), rtol=1e-5, atol=1e-5)
    proba = torch.softmax(logits, dim=1).numpy()
    np.testing.assert_allclose(proba[:, model.classes_], model.predict_proba(x), rtol=1e-5, atol=1e-6)
    assert np.array_equal(logits.argmax(dim=1).numpy(), model.predict(x))
    if classes >= 3:  # class 1 never in the training rows: probability ~0, finite
        assert 1 not in model.classes_ and model.classes_.size == classes - 1
        assert np.isfinite(logits.numpy()).all() and proba[:, 1].max() < 1e-30


@pytest.mark.parametrize("name, targets", REGRESSION)
def test_regression_head_gives_the_baselines_predictions_in_target_units(name, targets):
    data = make_data("regression", targets=targets)
    head, model, x, batch = fitted_head(name, data)
    with torch.no_grad():
        values = head(batch)  # (N, K)
    assert values.shape == (N, targets) and values.dtype == torch.float32
    expected = model.predict(x).reshape(N, targets)
    np.testing.assert_allclose(values.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_tree_head_follows_the_missing_value_branches_of_an_absent_modality():
    """The absent modality's NaN features take scikit-learn's learned branch: rows without it
    agree too (and some tree does split on its features, so the branch is exercised)."""
    data = make_data("regression")
    head, model, x, batch = fitted_head("hist_gb", data)
    absent = np.isnan(x).any(axis=1)
    opt_columns = torch.arange(3 + 4, 3 + 4 + 2)  # seq (3), vec (4), then opt (2)
    inner = ~head.is_leaf
    assert absent.any() and torch.isin(head.feature_idx[inner], opt_columns).any()
    with torch.no_grad():
        values = head(batch).numpy()[:, 0]
    np.testing.assert_allclose(values[absent], model.predict(x[absent]), rtol=1e-5, atol=1e-5)


def test_tree_head_sends_a_row_at_a_threshold_left_as_scikit_learn_does(monkeypatch):
    """Gradient boosting's thresholds are often training rows' own values (its bins' edges are
    percentiles), and scikit-learn sends a value equal to the threshold left. The head rebuilds
    the pooled values from standardised float32 features, a rounding away from the originals:
    without its slack some of those rows would take the other branch."""
    data = make_data("classification")
    head, model, x, batch = fitted_head("hist_gb", data)
    inner = ~head.is_leaf
    on_threshold = np.isin(x[:TRAIN], head.num_threshold[inner].numpy()).any(axis=1)
    assert on_threshold.sum() >= 5  # rows that sit exactly on a split of some tree
    expected = expected_logits(model, x, 2)
    with torch.no_grad():
        np.testing.assert_allclose(head(batch).numpy(), expected, rtol=1e-5, atol=1e-5)
        monkeypatch.setattr(heads, "ROUNDING", 0.0)  # the fault: no slack at the thresholds
        off = np.abs(head(batch).numpy() - expected).max(axis=1) > 1e-3
    assert off.any() and off[:TRAIN].sum() <= on_threshold.sum()


def test_pooling_gives_the_pooled_features_of_the_baselines():
    data = make_data("regression")
    standardizer = Standardizer.fit(data, np.arange(TRAIN))
    pooling = Pooling([(m.name, m.dim) for m in data.modalities], ["opt"]).set_standardizer(standardizer)
    x = pooled_features(data)  # (N, 3 + 4 + 2 + 1)
    with torch.no_grad():
        pooled = pooling(standardizer.transform(data).to_batch())[0].numpy()
    assert pooled.shape == x.shape == (N, pooling.num_features)
    assert np.array_equal(np.isnan(pooled), np.isnan(x))
    np.testing.assert_allclose(pooled, x, rtol=1e-5, atol=1e-5)


def with_garbage(batch: Batch, value: float) -> Batch:
    """``batch`` with ``value`` at every invalid step (absent modalities included)."""
    x = {k: torch.where(batch.mask[k].unsqueeze(-1), v, torch.full_like(v, value)) for k, v in batch.x.items()}
    return Batch(x, batch.mask, batch.y)


@pytest.mark.parametrize(
    "name, task", [("ridge", "regression"), ("logistic", "classification"), ("hist_gb", "classification")]
)
def test_values_at_invalid_steps_change_nothing(name, task):
    head, _, _, batch = fitted_head(name, make_data(task, classes=3))
    with torch.no_grad():
        clean = head(batch)
        for value in (float("nan"), 1e6, -float("inf")):
            assert torch.equal(head(with_garbage(batch, value)), clean)


@pytest.mark.parametrize(
    "name, task",
    [("ridge", "regression"), ("logistic", "classification"), ("hist_gb", "regression"), ("hist_gb", "classification")],
)
def test_record_and_state_dict_rebuild_the_head_bitwise(name, task):
    data = make_data(task, classes=3, targets=2)
    head, _, _, batch = fitted_head(name, data)
    assert list(head.parameters()) == [] and len(head.state_dict()) > 0  # buffers only
    record = json.loads(json.dumps(head.record()))  # JSON-able
    rebuilt = build_head(record)
    assert type(rebuilt) is type(head) and rebuilt.record() == head.record()
    # What a weights file must hold for the record, computed without building the head:
    assert heads.record_shapes(record) == {k: tuple(v.shape) for k, v in head.state_dict().items()}
    rebuilt.load_state_dict(head.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(batch), head(batch))


def test_presence_columns_are_the_modalities_absent_in_some_of_the_rows():
    data = make_data("regression")  # opt absent in rows 1, 5, 9, ...
    assert presence_columns(data) == ["opt"]
    assert presence_columns(data, np.arange(0, N, 4)) == []
    assert pooled_features(data, np.arange(0, N, 4)).shape[1] == 3 + 4 + 2  # no presence column there


def test_tree_head_refuses_a_regressor_whose_predict_is_not_its_raw_prediction():
    from sklearn.ensemble import HistGradientBoostingRegressor

    data = make_data("regression")
    x = pooled_features(data)
    model = HistGradientBoostingRegressor(loss="poisson", max_iter=3).fit(x, np.exp(data.y / 10))
    with pytest.raises(ValueError, match="baseline loss: expected one of .*, got 'poisson'"):
        head_from_baseline("hist_gb", model, data.modalities, Standardizer.fit(data), ["opt"], "regression", 1)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"kind": "forest"}, "head.kind: expected 'linear' or 'tree'"),
        ({"n_iter": -1}, "head.n_iter: expected a non-negative integer, got -1"),
        ({"nodes": 2.5}, "head.nodes: expected a non-negative integer, got 2.5"),
        ({"modalities": [["a", 0]]}, "head.modalities: expected a list of \\[name, dim\\] pairs"),
        ({"presence": "a"}, "head.presence: expected a list of modality names"),
    ],
)
def test_record_shapes_refuse_what_no_head_records(change, match):
    record = {"kind": "tree", "task": "regression", "out_dim": 1, "raw_dim": 1, "modalities": [["a", 3]]}
    record |= {"presence": [], "n_iter": 2, "nodes": 7, "depth": 3}
    assert heads.record_shapes(record)["value"] == (2, 7)
    with pytest.raises(ValueError, match=match):
        heads.record_shapes(record | change)


def test_build_head_refuses_an_unknown_kind():
    with pytest.raises(ValueError, match="record kind: expected one of"):
        build_head({"kind": "forest"})


def test_head_from_baseline_refuses_an_unknown_baseline():
    data = make_data("regression")
    standardizer = Standardizer.fit(data)
    with pytest.raises(ValueError, match="name: expected 'ridge', 'logistic' or 'hist_gb', got 'lasso'"):
        head_from_baseline("lasso", None, data.modalities, standardizer, [], "regression", 1)


def test_presence_must_name_modalities():
    with pytest.raises(ValueError, match=r"presence: expected modalities among \['a'\], got \['b'\]"):
        Pooling([("a", 2)], ["b"])


class PlainInputs(nn.Module):
    """A head behind plain tensors (x_1, mask_1, x_2, mask_2, ...), as the export path feeds
    models; its inputs are already standardised (export's wrapper standardises before the model)."""

    def __init__(self, head: nn.Module, specs: list) -> None:
        super().__init__()
        self.head, self.specs = head, list(specs)  # specs: what export.example_inputs reads

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        x = {s.name: inputs[2 * i] for i, s in enumerate(self.specs)}
        mask = {s.name: inputs[2 * i + 1] for i, s in enumerate(self.specs)}
        return self.head(Batch(x, mask, None))


def exported_bytes(wrapper: PlainInputs, format: str, example: tuple) -> bytes:
    """The graph ``attnfuse export`` would write for ``wrapper`` in ``format``."""
    if format == "onnx":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")
        return export._to_onnx(wrapper, example, export.input_names(wrapper), "out", 18)
    buffer = io.BytesIO()
    if format == "torchscript":
        torch.jit.save(torch.jit.trace(wrapper, example, check_trace=False), buffer)
    else:
        torch.export.save(export._exported(wrapper, example), buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("format", export.FORMATS)
@pytest.mark.parametrize("kind", [LinearHead, TreeHead])
def test_heads_export_and_agree_on_padded_rows_and_another_batch_size(kind, format):
    name = "logistic" if kind is LinearHead else "hist_gb"
    data = make_data("classification", classes=3)
    head, _, _, batch = fitted_head(name, data)
    wrapper = PlainInputs(head, data.modalities).eval()
    example = export.example_inputs(wrapper, batch_size=4)  # padding, absent modalities, NaN at invalid steps
    with torch.no_grad():
        graph = exported_bytes(wrapper, format, example)
        names = export.input_names(wrapper)
        for rows in (slice(0, 7), slice(7, 60)):  # data rows at two batch sizes, then the example itself
            inputs = tuple(t[rows] for s in data.modalities for t in (batch.x[s.name], batch.mask[s.name]))
            got = export.run_exported(graph, format, inputs, names)
            np.testing.assert_allclose(got, head(batch)[rows].numpy(), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(export.run_exported(graph, format, example, names), wrapper(*example).numpy())
