"""Bounded inputs and one copy of the data: .npz headers checked before reading, float32 range,
no needless copies, and the streaming Standardizer (fit, transform, transform_batch)."""

from __future__ import annotations

import io
import tracemalloc
import warnings
import zipfile

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnfuse.data import Batch, MultimodalDataset, Standardizer, load_npz
from attnfuse.data import preprocessing as preprocessing_module
from attnfuse.data.io import npz as npz_module


def npy_bytes(shape: tuple, dtype: str, data: bytes = b"") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue() + data


def write_zip(path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)


# --- .npz headers before data -------------------------------------------------------------------


def test_an_archive_larger_than_memory_is_refused_before_reading(tmp_path, monkeypatch):
    path = tmp_path / "bomb.npz"
    # A header that promises 4 TB of float32 and no data: only the header may be read.
    write_zip(path, {"x_a.npy": npy_bytes((10**12,), "<f4"), "y.npy": npy_bytes((2,), "<i8", bytes(16))})
    with pytest.raises(ValueError) as err:
        load_npz(path)
    msg = str(err.value)
    assert "bomb.npz" in msg and "3725.29 GiB decompressed" in msg and "available" in msg and "convert" in msg
    # The numbers come from the headers and /proc/meminfo: with little memory a small file is refused too.
    monkeypatch.setattr(npz_module, "available_memory", lambda: 1000)
    small = tmp_path / "small.npz"
    np.savez(small, x_a=np.zeros((100, 10), np.float32), y=np.zeros(100, np.int64))
    with pytest.raises(ValueError, match=r"4\.7 KiB decompressed, more than the 1000 bytes"):
        load_npz(small)


@pytest.mark.parametrize(
    "members, words",
    [
        ({"x_a.npy": npy_bytes((2,), "|O")}, ["'x_a'", "Python objects", "dtype object"]),
        ({"x_a.npy": b"not an array"}, ["'x_a'", "not a readable .npy array"]),
        ({"notes.txt": b"hello"}, ["not a readable .npz file", "'notes.txt'"]),
        (
            {"x_a.npy": npy_bytes((4, 2), "<f4", bytes(8)), "y.npy": npy_bytes((4,), "<i8", bytes(32))},
            ["not a readable .npz file", "'x_a'"],  # truncated data
        ),
    ],
)
def test_damaged_archives_are_one_clear_line(tmp_path, members, words):
    path = tmp_path / "d.npz"
    write_zip(path, members)
    with pytest.raises(ValueError) as err:
        load_npz(path)
    msg = str(err.value)
    assert "allow_pickle" not in msg and "\n" not in msg
    for word in words:
        assert word in msg, (word, msg)


def test_garbage_and_single_arrays(tmp_path):
    garbage = tmp_path / "g.npz"
    garbage.write_bytes(b"\x80\x04garbage bytes that look a little like a pickle")
    with pytest.raises(ValueError) as err:
        load_npz(garbage)
    assert "g.npz: not a readable .npz file" in str(err.value) and "allow_pickle" not in str(err.value)
    single = tmp_path / "s.npz"
    with single.open("wb") as f:
        np.save(f, np.zeros(3))
    with pytest.raises(ValueError, match="single .npy array"):
        load_npz(single)


def test_load_npz_holds_one_copy(tmp_path):
    path = tmp_path / "big.npz"
    x = np.random.default_rng(0).standard_normal((2000, 50, 20), dtype=np.float32)  # 8 MB
    np.savez(path, x_a=x, y=np.arange(2000) % 2)
    tracemalloc.start()
    d = load_npz(path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1.3 * x.nbytes, peak  # the array once, not a float32 copy of it
    np.testing.assert_array_equal(d.features["a"], x)


# --- float32 range and copies ---------------------------------------------------------------------


def test_values_beyond_float32_are_named_without_a_numpy_warning():
    x = np.zeros((5, 3))
    x[3, 1] = 1e39
    x[4, 2] = -2e39
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a raw "overflow encountered in cast" would fail here
        with pytest.raises(ValueError) as err:
            MultimodalDataset({"a": x}, np.arange(5) % 2)
        present = np.array([True, True, True, False, False])
        other = np.zeros((5, 2))
        x[0, 0] = 1e39  # at a valid position again: named, with the first sample
        with pytest.raises(ValueError, match=r"1 finite values out of float32 range.*sample 0"):
            MultimodalDataset({"a": x, "b": other}, np.arange(5) % 2, masks={"a": present})
        x[0, 0] = 0.0
        d = MultimodalDataset({"a": x, "b": other}, np.arange(5) % 2, masks={"a": present})  # absent there: fine
    assert "features['a']: 2 finite values out of float32 range" in str(err.value) and "NaN" not in str(err.value)
    assert "sample 3" in str(err.value)
    assert np.isfinite(d.features["a"]).all() and (d.features["a"][3:] == 0).all()
    with pytest.raises(ValueError, match="y: 1 targets out of float32 range"):
        MultimodalDataset({"a": np.zeros((2, 1))}, np.array([1.0, 1e39]))


def test_float32_features_are_not_copied():
    x = np.random.default_rng(0).standard_normal((10, 4, 3)).astype(np.float32)
    d = MultimodalDataset({"a": x}, np.arange(10) % 2)
    assert np.shares_memory(d.features["a"], x)
    steps = np.ones((10, 4), bool)
    steps[:, 3] = False
    d = MultimodalDataset({"a": x}, np.arange(10) % 2, masks={"a": steps})  # padding holds data: one copy
    assert not np.shares_memory(d.features["a"], x) and (d.features["a"][:, 3] == 0).all()
    assert (x[:, 3] != 0).all()  # the caller's array is untouched
    x[:, 3] = 0.0
    d = MultimodalDataset({"a": x}, np.arange(10) % 2, masks={"a": steps})  # padding already 0: no copy
    assert np.shares_memory(d.features["a"], x)


def test_split_messages_show_plain_strings():
    with pytest.raises(ValueError) as err:
        MultimodalDataset({"a": np.zeros((3, 1))}, np.array([0, 1, 0]), split=np.array(["train", "tst", "test"]))
    assert "got 'tst' at sample 1" in str(err.value) and "np.str_" not in str(err.value)


# --- Standardizer ------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    n=st.integers(1, 60),
    t=st.integers(1, 5),
    d=st.integers(1, 4),
    loc=st.sampled_from([0.0, 1e4, -3e5]),
    scale=st.sampled_from([1e-3, 1.0, 50.0]),
    seed=st.integers(0, 2**16),
)
def test_streaming_fit_matches_numpy(n, t, d, loc, scale, seed):
    rng = np.random.default_rng(seed)
    x = (loc + scale * rng.standard_normal((n, t, d))).astype(np.float32)
    steps = rng.random((n, t)) < 0.7
    steps[:, 0] = True
    data = MultimodalDataset({"s": x}, np.zeros(n, np.float32), masks={"s": steps})
    rows = np.flatnonzero(rng.random(n) < 0.8)
    old = preprocessing_module.FIT_CHUNK_BYTES
    preprocessing_module.FIT_CHUNK_BYTES = t * d * 4 * 3  # three rows per chunk: many merges
    try:
        scaler = Standardizer.fit(data, rows)
    finally:
        preprocessing_module.FIT_CHUNK_BYTES = old
    tokens = x[rows][steps[rows]].astype(np.float64)
    if tokens.shape[0] == 0:
        np.testing.assert_array_equal(scaler.mean["s"], 0)
        return
    np.testing.assert_allclose(scaler.mean["s"], tokens.mean(axis=0).astype(np.float32), rtol=1e-6)
    std = tokens.std(axis=0)
    expected = np.where(std < 1e-6, 1.0, std).astype(np.float32)
    np.testing.assert_allclose(scaler.std["s"], expected, rtol=1e-6)


def test_fit_never_holds_a_float64_copy_of_the_tokens(monkeypatch):
    x = np.random.default_rng(0).standard_normal((4000, 25, 10), dtype=np.float32)  # 4 MB
    data = MultimodalDataset({"s": x}, np.zeros(4000, np.float32))
    monkeypatch.setattr(preprocessing_module, "FIT_CHUNK_BYTES", 64 * 1024)
    tracemalloc.start()
    Standardizer.fit(data)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < x.nbytes / 4, peak  # a float64 copy would be 8 MB


def scaled_data() -> tuple[MultimodalDataset, Standardizer]:
    rng = np.random.default_rng(1)
    steps = rng.random((20, 4)) < 0.6
    steps[:, 0] = True
    data = MultimodalDataset(
        {"s": rng.normal(5, 2, (20, 4, 3)), "v": rng.normal(-1, 3, (20, 2))},
        np.arange(20) % 2,
        masks={"s": steps},
    )
    return data, Standardizer.fit(data, np.arange(14))


def test_transform_batch_equals_transform_and_keeps_invalid_tokens_zero():
    data, scaler = scaled_data()
    expected = scaler.transform(data).to_batch()
    batch = data.to_batch()
    out = scaler.transform_batch(batch)
    for name in ("s", "v"):
        torch.testing.assert_close(out.x[name], expected.x[name])
        assert (out.x[name][~batch.mask[name]] == 0).all()
    assert not torch.equal(batch.x["s"], out.x["s"])  # not in place by default
    same = scaler.transform_batch(batch, inplace=True)
    assert same.x["s"] is batch.x["s"] and torch.equal(batch.x["s"], expected.x["s"])
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        on = scaler.transform_batch(data.to_batch().to(device))
        torch.testing.assert_close(on.x["s"].cpu(), expected.x["s"])
    with pytest.raises(ValueError, match="'s'.*expected dim 3, got 5"):
        scaler.transform_batch(Batch({"s": torch.zeros(2, 4, 5), "v": torch.zeros(2, 1, 2)}, batch.mask))


def test_transform_in_place_and_copy():
    data, scaler = scaled_data()
    copy = scaler.transform(data)
    assert not np.shares_memory(copy.features["s"], data.features["s"])
    assert copy.masks is data.masks and copy.y is data.y  # everything but the features is shared
    before = data.features["s"]
    same = scaler.transform(data, inplace=True)
    assert same is data and data.features["s"] is before
    np.testing.assert_allclose(data.features["s"], copy.features["s"], rtol=1e-6)
