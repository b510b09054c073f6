"""Tests for attnfuse.data.splits: carved validation parts, K folds, tiny data."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attnfuse.data import MultimodalDataset, Split, bags, carve_valid, halve_valid, kfold, make_split


def dataset(y: np.ndarray, split: np.ndarray | None = None, task: str = "auto") -> MultimodalDataset:
    return MultimodalDataset({"a": np.zeros((len(y), 2), np.float32)}, y, split=split, task=task)


def assert_partition(parts, n: int) -> None:
    rows = np.concatenate([parts[s] for s in ("train", "valid", "test")])
    assert rows.size == n and np.array_equal(np.sort(rows), np.arange(n))  # disjoint and covering


# --- a split column with only train and test rows -------------------------------------------


def test_train_test_column_carves_valid_out_of_train_and_leaves_test_alone():
    y = np.arange(200) % 4
    split = np.array(["train", "test"] * 100)
    split[120:] = "train"  # 140 train rows: 50, 20, 50, 20 of the classes 0, 1, 2, 3
    d = dataset(y, split)
    s = make_split(d, seed=3, valid_fraction=0.2)
    assert isinstance(s, Split) and s.how == "carved" and s.carved
    assert "carved 28 of its 140 'train' rows (20%" in s.note and "'test' rows untouched" in s.note
    original_train = np.flatnonzero(split == "train")
    np.testing.assert_array_equal(s["test"], np.flatnonzero(split == "test"))  # test untouched
    assert set(s["valid"]) < set(original_train) and set(s["train"]) < set(original_train)
    assert_partition(s, 200)
    # Stratified: every class is in valid in proportion to its share of train (20% of each).
    np.testing.assert_array_equal(np.bincount(y[s["valid"]], minlength=4), [10, 4, 10, 4])
    # The default is 15% of the train rows, also through the dataset's method (used by training today).
    default = make_split(d, seed=3)
    assert len(default["valid"]) == round(0.15 * 140)
    again = dict(make_split(d, 3))
    assert all(np.array_equal(again[k], default[k]) for k in default)
    assert not np.array_equal(make_split(d, seed=4)["valid"], default["valid"])  # the seed draws it


@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    counts=st.lists(st.integers(2, 40), min_size=2, max_size=5),
    test_share=st.floats(0.1, 0.8),
    fraction=st.floats(0.05, 0.5),
    seed=st.integers(0, 2**16),
)
def test_carving_never_moves_test_rows_and_stratifies(counts, test_share, fraction, seed):
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.repeat(np.arange(len(counts)), counts))
    split = np.where(rng.random(y.size) < test_share, "test", "train")
    split[:2] = "train"  # at least two train rows
    split[2] = "test"
    s = make_split(dataset(y, split), seed, valid_fraction=fraction)
    train = np.flatnonzero(split == "train")
    np.testing.assert_array_equal(s["test"], np.flatnonzero(split == "test"))
    assert set(s["valid"]) | set(s["train"]) == set(train) and not set(s["valid"]) & set(s["train"])
    assert len(s["valid"]) == min(train.size - 1, max(1, round(fraction * train.size)))
    expected = np.bincount(y[train], minlength=len(counts)) * len(s["valid"]) / train.size
    assert np.abs(np.bincount(y[s["valid"]], minlength=len(counts)) - expected).max() < 1.5


def test_regression_carve_is_random_and_valid_fraction_checked():
    y = np.linspace(0, 1, 100).astype(np.float32)
    split = np.array(["train"] * 60 + ["test"] * 40)
    s = make_split(dataset(y, split), seed=0, valid_fraction=0.25)
    assert len(s["valid"]) == 15 and s["valid"].max() - s["valid"].min() > 30  # spread, not a block
    assert "at random" in s.note
    for bad in (0, 1, 1.5, -0.1):
        with pytest.raises(ValueError, match="valid_fraction"):
            make_split(dataset(y, split), seed=0, valid_fraction=bad)


@pytest.mark.parametrize("values, missing", [(["valid", "test"], "train"), (["train"], "test")])
def test_split_column_without_train_or_test_is_an_error(values, missing):
    with pytest.raises(ValueError, match=f"split: the dataset's split column has no '{missing}' rows"):
        make_split(dataset(np.arange(6) % 2, np.array(values * (6 // len(values)))), seed=0)


def test_a_column_of_train_and_valid_rows_is_a_split_with_an_empty_test_part():
    split = np.array(["train", "valid", "train"] * 4)
    s = make_split(dataset(np.arange(12) % 2, split), seed=0)
    assert s.how == "column" and "0 test" in s.note
    np.testing.assert_array_equal(s["train"], np.flatnonzero(split == "train"))
    np.testing.assert_array_equal(s["valid"], np.flatnonzero(split == "valid"))
    assert s["test"].size == 0 and s["test"].dtype == np.int64
    # Cross-validation keeps a column's test rows fixed in every fold: it still needs some.
    with pytest.raises(ValueError, match="split column has no 'test' rows"):
        kfold(dataset(np.arange(12) % 2, split), 2, seed=0)


def test_one_train_row_cannot_be_carved():
    with pytest.raises(ValueError, match="1 training rows are too few to carve"):
        make_split(dataset(np.array([0, 1, 0, 1]), np.array(["train", "test", "test", "test"])), seed=0)


def test_full_column_and_drawn_split_say_how():
    d = dataset(np.arange(12) % 3, np.array(["train", "valid", "test"] * 4))
    assert make_split(d, 0).how == "column" and not make_split(d, 0).carved
    drawn = make_split(dataset(np.arange(40) % 2), seed=5)
    assert drawn.how == "drawn" and "70/15/15" in drawn.note and "seed 5" in drawn.note
    assert_partition(drawn, 40)


# --- tiny data --------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2])
def test_tiny_data_is_named_with_its_size(n):
    with pytest.raises(ValueError) as err:
        make_split(dataset(np.arange(n, dtype=np.float32)), seed=0)
    msg = str(err.value)
    assert f"N={n} samples are too few for a train/valid/test split" in msg and "fractions" not in msg


@pytest.mark.parametrize("n", [3, 4, 5, 6])
def test_small_data_gets_every_part(n):
    s = make_split(dataset(np.arange(n, dtype=np.float32)), seed=0)
    assert_partition(s, n)
    assert all(len(s[k]) >= 1 for k in ("train", "valid", "test"))


# --- K folds ----------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_kfold_test_parts_partition_the_rows(task):
    y = np.arange(60) % 3 if task == "classification" else np.linspace(-1, 1, 60).astype(np.float32)
    d = dataset(y)
    folds = kfold(d, 5, seed=1)
    assert len(folds) == 5 and all(f.how == "fold" for f in folds)
    tests = np.concatenate([f["test"] for f in folds])
    np.testing.assert_array_equal(np.sort(tests), np.arange(60))  # every row tested exactly once
    for f in folds:
        assert_partition(f, 60)
        assert len(f["test"]) == 12 and len(f["valid"]) == round(0.15 * 48)
    if task == "classification":  # StratifiedKFold: 4 of each class per test fold
        for f in folds:
            np.testing.assert_array_equal(np.bincount(y[f["test"]]), [4, 4, 4])
    again = kfold(d, 5, seed=1)
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(folds, again) for k in a)


def test_kfold_matches_scikit_learn():
    from sklearn.model_selection import StratifiedKFold

    y = np.random.default_rng(0).integers(0, 3, 50)
    folds = kfold(dataset(y), 4, seed=7)
    expected = [test for _, test in StratifiedKFold(4, shuffle=True, random_state=7).split(np.zeros(50), y)]
    for fold, test in zip(folds, expected):
        np.testing.assert_array_equal(fold["test"], np.sort(test))


def test_kfold_with_a_split_column_keeps_test_and_folds_train_and_valid():
    split = np.array(["train"] * 30 + ["valid"] * 10 + ["test"] * 20)
    d = dataset(np.arange(60) % 2, split)
    folds = kfold(d, 4, seed=0)
    valids = np.concatenate([f["valid"] for f in folds])
    np.testing.assert_array_equal(np.sort(valids), np.arange(40))  # valid parts partition train+valid
    for f in folds:
        np.testing.assert_array_equal(f["test"], np.arange(40, 60))  # test stays test
        assert_partition(f, 60)
        assert "test rows fixed" in f.note


@pytest.mark.parametrize(
    "k, y, words",
    [
        (1, np.arange(10) % 2, ["folds", ">= 2", "1"]),
        (2.5, np.arange(10) % 2, ["folds", "2.5"]),
        (20, np.arange(10) % 2, ["k=20", "at least 20", "10"]),
        (6, np.array([0] * 5 + [1] * 5), ["k=6", "every class", "5"]),
    ],
)
def test_kfold_bad_k(k, y, words):
    with pytest.raises((ValueError, TypeError)) as err:  # TypeError: not an int
        kfold(dataset(y), k, seed=0)
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_carve_valid_uses_only_the_given_rows():
    d = dataset(np.arange(100) % 2)
    rows = np.arange(0, 100, 3)
    train, valid = carve_valid(d, rows, seed=0, valid_fraction=0.2)
    assert set(train) | set(valid) == set(rows) and len(valid) == 7


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(30, 200),
    classes=st.integers(2, 4),
    k=st.integers(2, 6),
    seed=st.integers(0, 2**16),
    classify=st.booleans(),
)
def test_bags_validate_every_train_and_valid_row_exactly_once(n, classes, k, seed, classify):
    """Out-of-fold training: every train + valid row of a split is held out by exactly one bag, the
    bag trains on the others, and the test rows are the test part of every bag."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes if classify else rng.normal(size=n).astype(np.float32)
    data = MultimodalDataset({"a": rng.normal(size=(n, 2))}, y)
    split = make_split(data, seed)
    cuts = bags(data, split, k, seed)
    pool = np.sort(np.concatenate([split["train"], split["valid"]]))
    held = np.concatenate([cut["valid"] for cut in cuts])
    np.testing.assert_array_equal(np.sort(held), pool)  # each row once
    for cut in cuts:
        np.testing.assert_array_equal(np.sort(np.concatenate([cut["train"], cut["valid"]])), pool)
        np.testing.assert_array_equal(cut["test"], split["test"])
        if classify:  # stratified: each class in each held-out part in proportion, within a row
            share = np.bincount(y[cut["valid"]], minlength=classes) / len(cut["valid"])
            assert np.all(np.abs(share - np.bincount(y[pool], minlength=classes) / len(pool)) <= 2 / len(cut["valid"]))
    assert bags(data, split, k, seed)[0]["valid"].tolist() == cuts[0]["valid"].tolist()  # deterministic


def test_bags_refuse_a_class_rarer_than_the_bags():
    y = np.array([0] * 30 + [1] * 3)
    data = MultimodalDataset({"a": np.zeros((33, 1))}, y)
    split = {"train": np.arange(33), "valid": np.arange(0), "test": np.arange(0)}
    with pytest.raises(ValueError, match="bags: k=5 bags need at least 5 rows of every class, the smallest has 3"):
        bags(data, split, 5, 0)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(20, 300),
    classes=st.integers(2, 4),
    seed=st.integers(0, 2**16),
    classify=st.booleans(),
)
def test_halve_valid_cuts_the_validation_rows_in_two_stratified_halves(n, classes, seed, classify):
    """Early stopping's half and the held-out half: disjoint, together the validation rows, sizes
    within one row, each class in proportion (within a row per class), the other parts untouched."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes if classify else rng.normal(size=n).astype(np.float32)
    data = MultimodalDataset({"a": rng.normal(size=(n, 2))}, y)
    split = make_split(data, seed)
    stopping, held = halve_valid(data, split, seed)
    valid = split["valid"]
    np.testing.assert_array_equal(np.sort(np.concatenate([stopping["valid"], held])), valid)
    assert abs(len(stopping["valid"]) - len(held)) <= 1 and len(stopping["valid"]) <= len(held)
    for part in ("train", "test"):
        np.testing.assert_array_equal(stopping[part], split[part])
    if classify:
        for c in range(classes):
            assert abs(int((y[stopping["valid"]] == c).sum()) - int((y[held] == c).sum())) <= 1
    _, held_again = halve_valid(data, split, seed)
    np.testing.assert_array_equal(held_again, held)  # deterministic


def test_halve_valid_needs_two_rows():
    data = MultimodalDataset({"a": np.zeros((5, 1))}, np.zeros(5, np.float32))
    split = {"train": np.arange(4), "valid": np.arange(4, 5), "test": np.arange(0)}
    with pytest.raises(ValueError, match="halve_valid: 2 validation rows at least are needed to halve them, got 1"):
        halve_valid(data, split, 0)
