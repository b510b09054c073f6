"""Tests for attnfuse.data.labels: class labels used as they are or encoded to 0..C-1."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attnfuse.data import MAX_CLASSES, MultimodalDataset, decode_labels, encode_labels, load_npz, save_npz


def data(y, **kwargs) -> MultimodalDataset:
    return MultimodalDataset({"a": np.zeros((len(y), 2), np.float32)}, np.asarray(y), **kwargs)


def test_labels_zero_to_c_minus_one_are_used_as_they_are():
    d = data([0, 2, 1, 2])
    assert d.num_classes == 3 and d.classes == [0, 1, 2]
    np.testing.assert_array_equal(d.y, [0, 2, 1, 2])


@pytest.mark.parametrize(
    "y, classes, codes",
    [
        ([1, 2, 5, 2, 1], [1, 2, 5], [0, 1, 2, 1, 0]),  # gaps
        ([0, 1, 10**9, 1], [0, 1, 10**9], [0, 1, 2, 1]),  # a huge label: 3 outputs, not 10**9 + 1
        ([0, 1, 5 * 10**6], [0, 1, 5 * 10**6], [0, 1, 2]),
        ([-1, 1, 1, -1], [-1, 1], [0, 1, 1, 0]),  # the usual binary -1/+1
        ([0, 1, 3], [0, 1, 3], [0, 1, 2]),  # 0..C-1 with a class missing
        (["dog", "cat", "dog"], ["cat", "dog"], [1, 0, 1]),
        (np.array([b"no", b"yes"]), ["no", "yes"], [0, 1]),
        ([3.0, 7.0, 3.0], [3, 7], [0, 1, 0]),  # whole floats (from a CSV)
    ],
)
def test_other_labels_are_encoded_and_kept(y, classes, codes):
    d = data(y, task="classification")
    assert d.classes == classes and d.num_classes == len(classes)
    np.testing.assert_array_equal(d.y, codes)
    np.testing.assert_array_equal(decode_labels(d.y, d.classes), np.asarray(y).astype(type(classes[0])))
    assert json.loads(json.dumps(d.spec_dict()))["classes"] == classes  # JSON-able for config.json


@settings(max_examples=50, deadline=None, derandomize=True)
@given(st.lists(st.integers(-(2**40), 2**40), min_size=2, max_size=40).filter(lambda v: len(set(v)) >= 2))
def test_encode_decode_round_trip(values):
    y = np.array(values)
    codes, classes = encode_labels(y)
    assert codes.min() == 0 and codes.max() == len(classes) - 1 and classes == sorted(set(values))
    np.testing.assert_array_equal(decode_labels(codes, classes), y)
    again, _ = encode_labels(y, classes)  # a model's classes applied to the same labels
    np.testing.assert_array_equal(again, codes)


def test_a_models_label_space():
    # classes: new data is encoded as in training, even when it lacks some classes.
    d = data(["dog", "dog"], classes=["cat", "dog", "eel"])
    assert d.num_classes == 3 and d.y.tolist() == [1, 1]
    with pytest.raises(ValueError, match="'fox' at sample 1 is not one of the classes"):
        data(["dog", "fox"], classes=["cat", "dog"])
    with pytest.raises(ValueError, match="labels are numbers, the classes are not"):
        data([1, 2], classes=["1", "2"])
    # num_classes: integer labels used as they are.
    d = data([0, 0], num_classes=4)
    assert d.num_classes == 4 and d.classes == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="string labels need the model's list of classes"):
        data(["a", "b"], num_classes=2)
    with pytest.raises(ValueError, match="num_classes: 3 does not match the 2 classes"):
        data([0, 1], num_classes=3, classes=[0, 1])


def test_huge_label_spaces_are_errors():
    with pytest.raises(ValueError, match=f"num_classes: expected an integer <= {MAX_CLASSES:,}, got"):
        data([0, 1], num_classes=5 * 10**6)
    many = np.arange(MAX_CLASSES + 1)
    with pytest.raises(ValueError, match="10,001 distinct class labels"):
        data(many, task="classification")
    # Inferred from integer dtype: an ID or a regression target, not classes.
    with pytest.raises(ValueError, match="look like a regression target or an ID.*task='regression'"):
        data(np.arange(300) * 7)
    assert data(np.arange(300) * 7, task="regression").task == "regression"
    assert data(np.arange(300) % 150, task="classification").num_classes == 150  # insisting works


def test_decode_checks_codes():
    with pytest.raises(ValueError, match=r"codes: expected values in \[0, 2\)"):
        decode_labels(np.array([0, 2]), ["a", "b"])
    np.testing.assert_array_equal(decode_labels(np.array([1, 0]), None), [1, 0])


def test_encoded_labels_survive_npz(tmp_path):
    d = data(["b", "a", "c", "a"])
    save_npz(d, tmp_path / "d.npz")
    back = load_npz(tmp_path / "d.npz")
    assert back.classes == ["a", "b", "c"]
    np.testing.assert_array_equal(back.y, d.y)
    sub = d.subset([1, 3])  # one class only: the label space is kept
    assert sub.classes == ["a", "b", "c"] and sub.y.tolist() == [0, 0]
