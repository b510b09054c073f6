"""Tests for attnfuse.data.builtins: the vendored mfeat data and the planted synthetic tasks."""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from attnfuse.data import BUILTINS, load_data, load_mfeat, make_planted, make_split

# The original UCI CSV files, when a checkout sits next to them (the project's own machines):
# the first ancestor directory holding shared/data/uci-mfeat.
SHARED_MFEAT = next(
    (p / "shared" / "data" / "uci-mfeat" for p in Path(__file__).resolve().parents if (p / "shared").is_dir()),
    Path("/nonexistent"),
)
# sha256 over every view's name and float32 values, then the int64 labels, of the vendored file;
# computed when test_mfeat_equals_every_csv_value passed against those CSV files, so that the
# vendored data is checked in every clone, with or without them.
MFEAT_SHA256 = "b7832253c5777ae70cafa4b1e76921fe7c4e64353bf683ff4ff70c1e5368674f"


@pytest.fixture(scope="module")
def mfeat():
    return load_mfeat()


def test_mfeat_shapes_and_labels(mfeat):
    assert mfeat.name == "mfeat" and mfeat.n == 2000 and mfeat.task == "classification"
    assert [(m.name, m.dim, m.is_sequence) for m in mfeat.modalities] == [
        ("fou", 76, False),
        ("fac", 216, False),
        ("kar", 64, False),
        ("pix", 240, False),
        ("zer", 47, False),
        ("mor", 6, False),
    ]
    assert mfeat.y.dtype == np.int64 and mfeat.num_classes == 10
    np.testing.assert_array_equal(np.bincount(mfeat.y), [200] * 10)
    np.testing.assert_array_equal(mfeat.y[199:201], [0, 1])  # rows are grouped by digit, 200 each
    assert mfeat.split is None
    parts = dict(make_split(mfeat, 0))
    for part, per_class in (("train", 140), ("valid", 30), ("test", 30)):
        np.testing.assert_array_equal(np.bincount(mfeat.y[parts[part]]), [per_class] * 10)


def test_mfeat_values_match_the_csv_first_row(mfeat):
    f = mfeat.features
    assert f["fou"][0, 0] == np.float32(0.065882) and f["fou"][0, 1] == np.float32(0.19731)
    np.testing.assert_array_equal(f["fac"][0, :6], [98, 236, 531, 673, 607, 647])
    assert f["kar"][0, 0] == np.float32(-10.297)
    np.testing.assert_array_equal(f["pix"][0, :5], [0, 3, 4, 4, 6])
    assert f["zer"][0, 0] == np.float32(0.011033) and f["zer"][0, -1] == np.float32(539.21)
    np.testing.assert_array_equal(f["mor"][0], np.float32([1, 0, 0, 133.15, 1.3117, 1620.2]))


def test_mfeat_file_is_small_and_attributed():
    data_dir = resources.files("attnfuse") / "resources"
    assert (data_dir / "mfeat.npz").stat().st_size < 3_000_000
    attribution = (data_dir / "ATTRIBUTION.md").read_text()
    assert "CC BY 4.0" in attribution and "Duin" in attribution and "Kybernetika" in attribution


def test_mfeat_is_the_verified_data(mfeat):
    h = hashlib.sha256()
    for m in mfeat.modalities:
        h.update(m.name.encode())
        h.update(np.ascontiguousarray(mfeat.features[m.name]).tobytes())
    h.update(mfeat.y.astype("<i8").tobytes())
    assert h.hexdigest() == MFEAT_SHA256


@pytest.mark.skipif(not SHARED_MFEAT.is_dir(), reason="needs the original CSVs in shared/data/uci-mfeat")
def test_mfeat_equals_every_csv_value(mfeat):
    for view in ("fou", "fac", "kar", "pix", "zer", "mor"):
        csv = np.loadtxt(SHARED_MFEAT / f"mfeat-{view}.csv", delimiter=",", skiprows=1)
        np.testing.assert_array_equal(mfeat.features[view], csv[:, :-1].astype(np.float32), err_msg=view)
        np.testing.assert_array_equal(mfeat.y, csv[:, -1].astype(np.int64))


# --- planted synthetic task ---------------------------------------------------------------


def test_planted_is_deterministic_by_seed():
    a, b, c = make_planted(n=300, seed=5), make_planted(n=300, seed=5), make_planted(n=300, seed=6)
    for name in ("text", "video"):
        np.testing.assert_array_equal(a.features[name], b.features[name])
    np.testing.assert_array_equal(a.y, b.y)
    np.testing.assert_array_equal(a.info["planted_step"], b.info["planted_step"])
    assert not np.array_equal(a.features["text"], c.features["text"])


def test_planted_shapes_and_info():
    d = make_planted(n=100, seq_len=6, num_keys=10, key_dim=12, value_dim=5)
    assert d.features["text"].shape == (100, 12) and d.features["video"].shape == (100, 6, 17)
    assert [m.is_sequence for m in d.modalities] == [False, True]
    assert d.task == "regression" and d.y.dtype == np.float32
    assert d.info["planted_step"].shape == (100,) and d.info["planted_step"].max() < 6
    keys = d.info["key_ids"]
    assert all(len(set(row)) == 6 for row in keys.tolist())  # distinct keys within a sample


def test_planted_step_key_matches_the_query():
    d = make_planted(n=500, seed=3)
    rows, step = np.arange(d.n), d.info["planted_step"]
    np.testing.assert_array_equal(d.info["key_ids"][rows, step], d.info["query_id"])
    # In feature space too: the planted step's key is the one closest to the text query.
    keys = d.features["video"][:, :, :16]
    dist = np.linalg.norm(keys - d.features["text"][:, None, :], axis=2)
    np.testing.assert_array_equal(dist.argmin(axis=1), step)
    assert np.all(dist[rows, step] < 1.0)  # only noise apart (noise 0.1 x 2 x sqrt(16) on average)


def test_pooled_linear_model_fails_while_the_oracle_is_exact():
    d = make_planted(n=2000, seed=0)
    rows, step = np.arange(d.n), d.info["planted_step"]
    np.testing.assert_array_equal(d.y, d.info["values"][rows, step])  # oracle: value at the planted step

    pooled = np.concatenate([d.features["text"], d.features["video"].mean(axis=1), np.ones((d.n, 1))], axis=1)
    w, *_ = np.linalg.lstsq(pooled, d.y, rcond=None)
    r2 = 1 - np.sum((d.y - pooled @ w) ** 2) / np.sum((d.y - d.y.mean()) ** 2)
    assert r2 < 0.3


def test_planted_classification_bins_the_planted_value():
    d = make_planted(n=400, task="classification", num_classes=5, seed=2)
    assert d.task == "classification" and d.num_classes == 5 and d.y.dtype == np.int64
    value = d.info["values"][np.arange(d.n), d.info["planted_step"]]
    np.testing.assert_array_equal(d.y, np.clip(np.floor((value + 1) / 2 * 5), 0, 4))
    assert set(np.unique(d.y)) == set(range(5))


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(n=0), "n"),
        (dict(seq_len=8, num_keys=4), "num_keys"),
        (dict(noise=-1.0), "noise"),
        (dict(task="ranking"), "task"),
        (dict(num_classes=1), "num_classes"),
        (dict(key_dim=2.5), "key_dim"),
    ],
)
def test_planted_rejects_bad_arguments(kwargs, word):
    with pytest.raises((ValueError, TypeError), match=word):  # TypeError: a float where an int belongs
        make_planted(**kwargs)


def test_builtins_registry():
    assert {"mfeat", "synthetic-regression", "synthetic-classification"} <= set(BUILTINS)
    for name, (factory, description) in BUILTINS.items():
        assert callable(factory) and description and "\n" not in description, name
    assert load_data("synthetic-classification", seed=1).task == "classification"
    assert load_data("mfeat").n == 2000
