"""Tests for attnfuse.data: validation, masks, splits, standardisation, batching and file I/O."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnfuse.data import (
    Batch,
    ModalitySpec,
    MultimodalDataset,
    Standardizer,
    iter_batches,
    load_data,
    load_npz,
    load_pickle,
    make_split,
    save_npz,
)

N, T = 12, 5


def make_data(task: str = "classification", seed: int = 0, **kwargs) -> MultimodalDataset:
    """12 samples: a vector modality 'a' (N, 3) and a sequence modality 'b' (N, 5, 4)."""
    rng = np.random.default_rng(seed)
    y = np.arange(N) % 3 if task == "classification" else rng.standard_normal(N).astype(np.float32)
    return MultimodalDataset({"a": rng.standard_normal((N, 3)), "b": rng.standard_normal((N, T, 4))}, y, **kwargs)


# --- construction and validation ------------------------------------------------------------


def test_specs_and_task_inference():
    d = make_data()
    assert len(d) == d.n == N
    assert d.task == "classification" and d.num_classes == 3 and d.target_dim is None
    assert d.modalities == [ModalitySpec("a", 3, 1, False), ModalitySpec("b", 4, T, True)]
    assert d.features["a"].dtype == np.float32 and d.features["b"].shape == (N, T, 4)

    r = make_data("regression")
    assert r.task == "regression" and r.num_classes is None and r.target_dim == 1
    multi = MultimodalDataset({"a": np.zeros((4, 2))}, np.zeros((4, 3)))
    assert multi.target_dim == 3

    spec = d.spec_dict()
    assert json.loads(json.dumps(spec)) == spec
    assert spec["modalities"][1] == {"name": "b", "dim": 4, "length": T, "is_sequence": True}


def test_whole_float_labels_accepted_for_classification():
    d = MultimodalDataset({"a": np.zeros((4, 2))}, np.array([0.0, 1.0, 2.0, 1.0]), task="classification")
    assert d.y.dtype == np.int64 and d.num_classes == 3


def test_integer_targets_as_regression():
    d = MultimodalDataset({"a": np.zeros((3, 2))}, np.array([1, 2, 3]), task="regression")
    assert d.task == "regression" and d.y.dtype == np.float32


X = {"a": np.zeros((4, 2))}
Y = np.array([0, 1, 0, 1])


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(features={}, y=Y), ValueError, ["features", "at least one modality"]),
        (dict(features=[np.zeros((4, 2))], y=Y), TypeError, ["features", "dict"]),
        (dict(features={"a": np.zeros((5, 2))}, y=Y), ValueError, ["'a'", "N=4", "5"]),
        (dict(features={"a": np.zeros(4)}, y=Y), ValueError, ["'a'", "(N, D) or (N, T, D)", "(4,)"]),
        (dict(features={"a": np.zeros((4, 2, 2, 2))}, y=Y), ValueError, ["'a'", "(4, 2, 2, 2)"]),
        (dict(features={"a": np.full((4, 2), "x")}, y=Y), TypeError, ["'a'", "dtype <U1"]),
        (dict(features={"a": np.zeros((4, 0))}, y=Y), ValueError, ["'a'", "(4, 0)"]),
        (dict(features=X, y=np.zeros((4, 2, 1))), ValueError, ["y", "(4, 2, 1)"]),
        (
            dict(features=X, y=np.array([0, 1, -1, 1]), num_classes=2),
            ValueError,
            ["y", ">= 0", "-1", "sample 2"],
        ),
        (dict(features=X, y=np.zeros(4, dtype=int)), ValueError, ["y", "at least 2 classes"]),
        (
            dict(features=X, y=np.array([0, 0.5, 1, 1]), task="classification"),
            ValueError,
            ["y", "integer labels", "0.5", "sample 1"],
        ),
        (dict(features=X, y=np.zeros((4, 2), dtype=int)), ValueError, ["y", "task='regression'"]),
        (dict(features=X, y=np.array([0.0, np.nan, 1.0, np.inf])), ValueError, ["y", "2 non-finite", "sample 1"]),
        (dict(features=X, y=np.array(["a", "b", None, "b"], dtype=object)), TypeError, ["y", "NoneType", "str"]),
        (dict(features=X, y=np.array(["a", "b", "a", "b"]), task="regression"), TypeError, ["y", "numeric", "<U1"]),
        (dict(features=X, y=Y, task="ranking"), ValueError, ["task", "'ranking'"]),
        (dict(features=X, y=np.array([0, 1, 5, 1]), num_classes=3), ValueError, ["num_classes=3", "5", "sample 2"]),
        (dict(features=X, y=Y.astype(float), num_classes=3), ValueError, ["num_classes", "regression"]),
        (dict(features=X, y=Y, masks={"z": np.ones(4, bool)}), ValueError, ["masks", "'z'", "not a modality"]),
        (dict(features=X, y=Y, masks={"a": np.ones(4)}), TypeError, ["masks['a']", "bool", "float64"]),
        (
            dict(features=X, y=Y, masks={"a": np.ones((4, 3), bool)}),
            ValueError,
            ["masks['a']", "(4,) or (4, 1)", "(4, 3)"],
        ),
        (
            dict(features=X, y=Y, masks={"a": np.array([True, False, True, True])}),
            ValueError,
            ["no valid token", "sample 1"],
        ),
        (
            dict(features=X, y=Y, split=np.array(["train", "val", "test", "test"])),
            ValueError,
            ["split", "'val'", "sample 1", "'valid'"],
        ),
        (dict(features=X, y=Y, split=np.array(["train"] * 3)), ValueError, ["split", "(4,)", "(3,)"]),
        (dict(features=X, y=Y, info={"step": np.zeros(3)}), ValueError, ["info['step']", "N=4", "(3,)"]),
    ],
)
def test_validation_errors_name_the_culprit(kwargs, exc, words):
    with pytest.raises(exc) as err:
        MultimodalDataset(**kwargs)
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_non_finite_features_report_modality_count_and_first_sample():
    x = np.zeros((6, 3, 2))
    x[4, 1, 0] = np.nan
    x[2, 0, 1] = np.inf
    x[4, 2, 1] = -np.inf
    with pytest.raises(ValueError) as err:
        MultimodalDataset({"a": np.zeros((6, 2)), "seq": x}, np.arange(6) % 2)
    msg = str(err.value)
    assert "'seq'" in msg and "3 non-finite" in msg and "sample 2" in msg


def test_non_finite_values_at_invalid_positions_are_ignored_and_zeroed():
    x = np.ones((3, 4, 2))
    x[1, 2:] = np.nan  # padding after a length-2 sequence
    steps = np.array([[True] * 4, [True, True, False, False], [True] * 4])
    d = MultimodalDataset({"s": x}, np.array([0, 1, 0]), masks={"s": steps})
    assert np.isfinite(d.features["s"]).all()
    assert (d.features["s"][1, 2:] == 0).all() and (d.features["s"][1, :2] == 1).all()


# --- masks --------------------------------------------------------------------------------


def test_valid_mask_combines_presence_and_steps():
    rng = np.random.default_rng(0)
    presence = np.array([True, False, True, True])  # sample 1 lacks the vector modality 'v'
    steps = np.array([[1, 1, 1], [1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=bool)  # sample 3 lacks 's'
    absent_s = np.array([True, True, False, True])  # presence mask for a second sequence modality
    d = MultimodalDataset(
        {
            "v": rng.standard_normal((4, 2)) + 5,
            "s": rng.standard_normal((4, 3, 2)) + 5,
            "p": rng.standard_normal((4, 3, 2)) + 5,
        },
        np.array([0, 1, 0, 1]),
        masks={"v": presence, "s": steps, "p": absent_s},
    )
    np.testing.assert_array_equal(d.valid_mask("v"), presence[:, None])
    np.testing.assert_array_equal(d.valid_mask("s"), steps)
    np.testing.assert_array_equal(d.valid_mask("p"), np.repeat(absent_s[:, None], 3, axis=1))
    b = d.to_batch()
    for name in ("v", "s", "p"):
        np.testing.assert_array_equal(b.mask[name].numpy(), d.valid_mask(name))
        # Invalid tokens carry zeros, valid ones the data (all values are far from 0).
        x = b.x[name].numpy()
        assert (x[~d.valid_mask(name)] == 0).all() and (x[d.valid_mask(name)] != 0).all()
    with pytest.raises(ValueError, match="modality.*'nope'"):
        d.valid_mask("nope")


# --- subset and batches -------------------------------------------------------------------


def test_subset_keeps_label_space_masks_split_and_info():
    split = np.array(["train"] * 6 + ["valid"] * 3 + ["test"] * 3)
    masks = {"b": np.arange(N * T).reshape(N, T) % 4 != 3}
    d = make_data(masks=masks, split=split, info={"step": np.arange(N) * 10}, name="toy")
    sub = d.subset(np.array([0, 3, 9]))  # labels 0, 0, 0: only one class present
    assert sub.num_classes == 3 and sub.task == "classification" and sub.name == "toy"
    np.testing.assert_array_equal(sub.info["step"], [0, 30, 90])
    np.testing.assert_array_equal(sub.split, ["train", "train", "test"])
    np.testing.assert_array_equal(sub.valid_mask("b"), d.valid_mask("b")[[0, 3, 9]])
    np.testing.assert_array_equal(sub.features["b"], d.features["b"][[0, 3, 9]])
    assert len(d.subset(np.arange(N) < 4)) == 4  # bool masks work too
    with pytest.raises(ValueError, match="indices"):
        d.subset(np.array([0, N]))


def test_to_batch_shapes_and_dtypes():
    b = make_data().to_batch(np.array([1, 2, 3]))
    assert len(b) == 3
    assert b.x["a"].shape == (3, 1, 3) and b.x["b"].shape == (3, T, 4)
    assert b.x["a"].dtype == torch.float32 and b.mask["b"].dtype == torch.bool
    assert b.y.dtype == torch.int64 and b.y.tolist() == [1, 2, 0]
    r = make_data("regression").to_batch()
    assert r.y.dtype == torch.float32 and r.y.shape == (N,)


def test_batch_select_and_to():
    b = make_data().to_batch()
    s = b.select(torch.tensor([4, 0])).to("cpu")
    assert isinstance(s, Batch) and len(s) == 2
    assert torch.equal(s.x["b"][0], b.x["b"][4]) and s.y.tolist() == [1, 0]


def test_iter_batches_cover_rows_and_shuffle_reproducibly():
    b = make_data().to_batch()
    chunks = list(iter_batches(b, 5))
    assert [len(c) for c in chunks] == [5, 5, 2]
    assert torch.equal(torch.cat([c.y for c in chunks]), b.y)

    def order(seed: int) -> list[float]:
        gen = torch.Generator().manual_seed(seed)
        return torch.cat([c.x["a"][:, 0, 0] for c in iter_batches(b, 4, shuffle=True, generator=gen)]).tolist()

    assert order(1) == order(1) and order(1) != order(2)
    assert sorted(order(1)) == sorted(b.x["a"][:, 0, 0].tolist())
    for bad, error in ((0, ValueError), (-1, ValueError), (2.5, TypeError)):
        with pytest.raises(error, match="batch_size: expected an integer"):
            next(iter_batches(b, bad))


# --- splits -------------------------------------------------------------------------------


def labelled(y: np.ndarray) -> MultimodalDataset:
    return MultimodalDataset({"a": np.zeros((len(y), 1))}, y)


def assert_partition(parts: dict[str, np.ndarray], n: int) -> None:
    assert set(parts) == {"train", "valid", "test"}
    allrows = np.concatenate(list(parts.values()))
    assert len(allrows) == n and set(allrows.tolist()) == set(range(n))  # disjoint and covering


def test_split_is_deterministic_disjoint_and_stratified():
    y = np.repeat(np.arange(4), [100, 60, 20, 20])
    d = labelled(np.random.default_rng(0).permutation(y))
    a, b, c = dict(make_split(d, 7)), dict(make_split(d, 7)), dict(make_split(d, 8))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["train"], c["train"])
    assert_partition(a, 200)
    assert [len(a[k]) for k in ("train", "valid", "test")] == [140, 30, 30]
    for part, f in zip(("train", "valid", "test"), (0.7, 0.15, 0.15)):
        np.testing.assert_array_equal(np.bincount(d.y[a[part]], minlength=4), np.array([100, 60, 20, 20]) * f)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(counts=st.lists(st.integers(5, 60), min_size=2, max_size=6), seed=st.integers(0, 2**16))
def test_split_stratifies_any_class_sizes(counts, seed):
    y = np.random.default_rng(seed).permutation(np.repeat(np.arange(len(counts)), counts))
    parts = dict(make_split(labelled(y), seed))
    assert_partition(parts, len(y))
    for part, f in zip(("train", "valid", "test"), (0.7, 0.15, 0.15)):
        per_class = np.bincount(y[parts[part]], minlength=len(counts))
        assert np.abs(per_class - f * np.array(counts)).max() < 2


def test_regression_split_is_random_with_requested_sizes():
    d = MultimodalDataset({"a": np.zeros((100, 1))}, np.linspace(0, 1, 100))
    parts = dict(make_split(d, 0, fractions=(0.6, 0.2, 0.2)))
    assert_partition(parts, 100)
    assert [len(parts[k]) for k in ("train", "valid", "test")] == [60, 20, 20]
    assert parts["test"].max() - parts["test"].min() > 50  # not a contiguous block


def test_predefined_split_is_used():
    split = np.array(["test", "train", "valid", "train"] * 3)
    d = make_data(split=split)
    parts = dict(make_split(d, 123))
    np.testing.assert_array_equal(parts["test"], [0, 4, 8])
    np.testing.assert_array_equal(parts["train"], [1, 3, 5, 7, 9, 11])
    # Only train and test rows: a validation part is carved out of train (tests/test_data_splits.py).
    carved = dict(make_split(make_data(split=np.array(["train", "test"] * 6)), 0))
    assert set(carved["valid"]) < set(range(0, N, 2)) and list(carved["test"]) == list(range(1, N, 2))
    with pytest.raises(ValueError, match="no 'train' rows"):
        make_split(make_data(split=np.array(["valid", "test"] * 6)), 0)
    # Train and valid rows only (a validation set given apart): the test part is empty.
    no_test = dict(make_split(make_data(split=np.array(["valid", "train"] * 6)), 0))
    assert no_test["test"].size == 0 and list(no_test["valid"]) == list(range(0, N, 2))


def test_bad_fractions():
    d = make_data()
    for bad in ((0.5, 0.5), (0.7, 0.2, 0.2), (1.2, -0.1, -0.1)):
        with pytest.raises(ValueError, match="fractions"):
            dict(make_split(d, 0, fractions=bad))
    with pytest.raises(ValueError, match="N=2 samples are too few for a train/valid/test split"):
        make_split(labelled(np.array([0, 1])), 0)


# --- standardisation ----------------------------------------------------------------------


def test_standardizer_fits_train_rows_and_valid_tokens_only():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(50, 6, 3))
    x[:, :, 2] = 7.0  # a constant feature
    steps = rng.random((50, 6)) < 0.7
    steps[:, 0] = True
    x[~steps] = 1e6  # padding garbage must not leak into the statistics
    d = MultimodalDataset({"s": x}, np.arange(50) % 2, masks={"s": steps})
    train = np.arange(35)
    scaler = Standardizer.fit(d, train)

    tokens = d.features["s"][train][steps[train]]
    np.testing.assert_allclose(scaler.mean["s"], tokens.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(scaler.std["s"][:2], tokens[:, :2].std(axis=0), rtol=1e-5)
    assert scaler.std["s"][2] == 1.0  # constant feature: std floored to 1

    out = scaler.transform(d)
    z = out.features["s"][train][steps[train]]
    np.testing.assert_allclose(z[:, :2].mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(z[:, :2].std(axis=0), 1, atol=1e-4)
    assert (z[:, 2] == 0).all()  # constant features map to 0
    assert (out.features["s"][~steps] == 0).all()  # invalid tokens stay 0
    np.testing.assert_array_equal(out.valid_mask("s"), d.valid_mask("s"))

    # Changing a test row does not change the statistics.
    x2 = x.copy()
    x2[40] = -500.0
    d2 = MultimodalDataset({"s": x2}, np.arange(50) % 2, masks={"s": steps})
    again = Standardizer.fit(d2, train)
    np.testing.assert_array_equal(again.mean["s"], scaler.mean["s"])
    np.testing.assert_array_equal(again.std["s"], scaler.std["s"])


def test_standardizer_round_trips_through_json_and_checks_modalities():
    d = make_data()
    scaler = Standardizer.fit(d)
    restored = Standardizer.from_dict(json.loads(json.dumps(scaler.to_dict())))
    np.testing.assert_allclose(restored.transform(d).features["b"], scaler.transform(d).features["b"], rtol=1e-6)

    wrong_dim = MultimodalDataset({"a": np.zeros((N, 7)), "b": np.zeros((N, T, 4))}, d.y)
    with pytest.raises(ValueError, match=r"'a'.*expected dim 3, got 7"):
        scaler.transform(wrong_dim)
    with pytest.raises(ValueError, match="'b'.*missing"):
        scaler.transform(MultimodalDataset({"a": np.zeros((N, 3))}, d.y))
    with pytest.raises(ValueError, match="'c'.*not fitted"):
        scaler.transform(
            MultimodalDataset({"a": np.zeros((N, 3)), "b": np.zeros((N, T, 4)), "c": np.zeros((N, 1))}, d.y)
        )
    with pytest.raises(ValueError, match="'a'"):
        Standardizer.from_dict({"a": {"mean": [0.0], "std": [0.0]}})


# --- npz ----------------------------------------------------------------------------------


def test_npz_round_trip(tmp_path):
    masks = {"a": np.arange(N) % 5 != 0, "b": np.arange(N * T).reshape(N, T) % 3 != 2}
    split = np.array(["train", "valid", "test"] * 4)
    d = make_data("regression", masks=masks, split=split, info={"step": np.arange(N) % T})
    path = tmp_path / "toy.npz"
    save_npz(d, path)
    assert [p.name for p in tmp_path.iterdir()] == ["toy.npz"]  # no temp file left behind
    back = load_npz(path)
    assert back.name == "toy" and back.spec_dict() == d.spec_dict()
    for name in ("a", "b"):
        np.testing.assert_array_equal(back.features[name], d.features[name])
        np.testing.assert_array_equal(back.valid_mask(name), d.valid_mask(name))
    np.testing.assert_array_equal(back.y, d.y)
    np.testing.assert_array_equal(back.split, split)
    np.testing.assert_array_equal(back.info["step"], d.info["step"])

    save_npz(make_data(), path)  # overwriting works (os.replace)
    assert load_npz(path).task == "classification"


def test_npz_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        load_npz(tmp_path / "missing.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"definitely not a zip file")
    with pytest.raises(ValueError, match="bad.npz"):
        load_npz(bad)
    extra = tmp_path / "extra.npz"
    np.savez(extra, x_a=np.zeros((3, 2)), y=np.array([0, 1, 0]), labels=np.zeros(3))
    with pytest.raises(ValueError, match="not a modality: 'labels'"):
        load_npz(extra)
    no_y = tmp_path / "no_y.npz"
    np.savez(no_y, x_a=np.zeros((3, 2)))
    with pytest.raises(ValueError, match="^y: the data has no targets; training and evaluating need them"):
        load_npz(no_y)
    unlabelled = load_npz(no_y, task="classification", num_classes=2)  # data to predict on
    assert unlabelled.y is None and unlabelled.n == 3 and unlabelled.to_batch().y is None
    obj = tmp_path / "obj.npz"
    np.savez(obj, x_a=np.zeros((2, 2)), y=np.array([0, 1]), split=np.array(["train", None], dtype=object))
    with pytest.raises(ValueError, match="obj.npz"):
        load_npz(obj)
    with pytest.raises(FileNotFoundError, match="directory"):
        save_npz(make_data(), tmp_path / "nowhere" / "x.npz")


# --- MulT / MMSA pickles ------------------------------------------------------------------


def mult_part(rng: np.random.Generator, n: int) -> dict:
    audio = rng.standard_normal((n, 6, 5)).astype(np.float32)
    audio[0, 0, :] = -np.inf  # MulT/MMSA audio has -inf entries
    return {
        "text": rng.standard_normal((n, 6, 7)).astype(np.float32),
        "audio": audio,
        "vision": rng.standard_normal((n, 6, 3)).astype(np.float32),
        "labels": rng.uniform(-3, 3, (n, 1, 1)).astype(np.float32),
        "id": np.array([[f"clip{i}", "0", "1"] for i in range(n)]),
    }


def test_mult_pickle(tmp_path):
    rng = np.random.default_rng(0)
    raw = {"train": mult_part(rng, 5), "valid": mult_part(rng, 2), "test": mult_part(rng, 3)}
    path = tmp_path / "mosi_data.pkl"
    path.write_bytes(pickle.dumps(raw))

    d = load_pickle(path, allow_pickle=True)
    assert [m.name for m in d.modalities] == ["text", "audio", "vision"] and d.n == 10
    assert d.task == "regression" and d.y.shape == (10,)
    labels = np.concatenate([raw[s]["labels"].reshape(-1) for s in ("train", "valid", "test")])
    np.testing.assert_array_equal(d.y, labels)
    np.testing.assert_array_equal(d.split, ["train"] * 5 + ["valid"] * 2 + ["test"] * 3)
    assert (d.features["audio"][[0, 5, 7], 0] == 0).all()  # -inf -> 0 in each part
    np.testing.assert_array_equal(d.features["text"][5:7], raw["valid"]["text"])
    assert d.valid_mask("audio").all()
    assert {k: len(v) for k, v in dict(make_split(d, 0)).items()} == {"train": 5, "valid": 2, "test": 3}


def test_mmsa_pickle_lengths_and_regression_labels(tmp_path):
    rng = np.random.default_rng(1)
    raw = {}
    for s, n in (("train", 4), ("valid", 2), ("test", 2)):
        part = mult_part(rng, n)
        part["regression_labels"] = rng.uniform(-3, 3, n).astype(np.float32)
        part["classification_labels"] = np.zeros(n)
        part["audio_lengths"] = list(rng.integers(1, 7, n))
        part["vision_lengths"] = np.array([0] + [6] * (n - 1))  # first sample has no vision
        part["text_bert"] = np.zeros((n, 3, 6))
        raw[s] = part
    path = tmp_path / "mmsa.pickle"
    path.write_bytes(pickle.dumps(raw))

    d = load_pickle(path, allow_pickle=True)
    labels = np.concatenate([raw[s]["regression_labels"] for s in ("train", "valid", "test")])
    np.testing.assert_array_equal(d.y, labels)  # regression_labels preferred over labels
    lengths = np.concatenate([raw[s]["audio_lengths"] for s in ("train", "valid", "test")])
    np.testing.assert_array_equal(d.valid_mask("audio"), np.arange(6)[None, :] < lengths[:, None])
    assert not d.valid_mask("vision")[[0, 4, 6]].any() and d.valid_mask("vision")[[1, 2, 3, 5, 7]].all()
    assert (d.features["audio"][~d.valid_mask("audio")] == 0).all()
    assert d.valid_mask("text").all()


def test_pickle_refused_without_allow_pickle(tmp_path):
    path = tmp_path / "data.pkl"
    path.write_bytes(pickle.dumps({"train": {}}))
    for load in (lambda: load_pickle(path), lambda: load_data(str(path))):
        with pytest.raises(ValueError) as err:
            load()
        assert "--allow-pickle" in str(err.value) and "execute" in str(err.value)
    with pytest.raises(ValueError, match="'train', 'valid', 'test'"):
        load_pickle(path, allow_pickle=True)


def test_pickle_bad_lengths(tmp_path):
    rng = np.random.default_rng(2)
    raw = {s: mult_part(rng, 2) for s in ("train", "valid", "test")}
    for s in raw:
        raw[s]["vision_lengths"] = np.array([3, 9])
    path = tmp_path / "bad.pkl"
    path.write_bytes(pickle.dumps(raw))
    with pytest.raises(ValueError, match="vision_lengths.*\\[0, 6\\]"):
        load_pickle(path, allow_pickle=True)


def _break_test_vision(raw):
    raw["test"]["vision"] = np.zeros((3, 6, 4), np.float32)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda raw: raw["valid"].pop("labels"), r"\['valid'\]: no labels"),
        (lambda raw: raw["test"].update(text="words"), r"\['test'\]\['text'\]: expected a float array"),
        (
            lambda raw: raw["train"].update(audio=np.zeros((4, 3))),
            r"\['train'\]\['audio'\]: expected shape \(5, \[T,\] D\)",
        ),
        (
            lambda raw: raw["valid"].update(audio_lengths=[1, 9]),
            r"\['valid'\]\['audio_lengths'\]: expected 2 lengths in \[0, 6\]",
        ),
        (_break_test_vision, "modality 'vision' has different shapes across train/valid/test"),
        (
            lambda raw: raw["test"].update(text_lengths=[6, 6, 6]),
            "'text_lengths' must be given in all of train/valid/test or none",
        ),
        (lambda raw: [raw[s].pop(m) for s in ("valid",) for m in ("text", "audio", "vision")], "no modality found"),
    ],
)
def test_a_bad_pickle_is_refused_naming_the_part_and_key(tmp_path, change, message):
    rng = np.random.default_rng(3)
    raw = {"train": mult_part(rng, 5), "valid": mult_part(rng, 2), "test": mult_part(rng, 3)}
    change(raw)
    path = tmp_path / "bad.pkl"
    path.write_bytes(pickle.dumps(raw))
    with pytest.raises(ValueError, match=message) as err:
        load_pickle(path, allow_pickle=True)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


# --- load_data ----------------------------------------------------------------------------


def test_load_data_dispatch(tmp_path):
    d = make_data()
    save_npz(d, tmp_path / "mine.npz")
    assert load_data(str(tmp_path / "mine.npz")).n == N
    a = load_data("synthetic-regression", seed=1)
    b = load_data("synthetic-regression", seed=2)
    assert a.task == "regression" and not np.array_equal(a.y, b.y)
    with pytest.raises(ValueError) as err:
        load_data("mnist")
    assert "'mnist'" in str(err.value) and "mfeat" in str(err.value) and "synthetic-classification" in str(err.value)
    with pytest.raises(FileNotFoundError):
        load_data(str(tmp_path / "absent.npz"))
