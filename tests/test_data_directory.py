"""Tests for directory datasets (memory-mapped), convert, and lazy batches (RowBatches)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from attnfuse.data import (
    Batch,
    MultimodalDataset,
    RowBatches,
    Standardizer,
    convert,
    iter_batches,
    load_data,
    load_directory,
    make_planted,
    make_split,
    save_directory,
    save_npz,
)
from attnfuse.data._memory import is_mapped, read_rows

N, T = 30, 6


def make_data(seed: int = 0) -> MultimodalDataset:
    """A sequence modality with padded steps (NaN in the padding), a vector one absent for some
    samples, labels {2, 5, 9} (encoded), a split and an info array."""
    rng = np.random.default_rng(seed)
    seq = rng.normal(2.0, 3.0, (N, T, 4)).astype(np.float32)
    steps = np.arange(T)[None, :] < rng.integers(1, T + 1, N)[:, None]
    seq[~steps] = np.nan
    present = rng.random(N) < 0.8
    return MultimodalDataset(
        {"seq": seq, "vec": rng.standard_normal((N, 3))},
        np.array([2, 5, 9])[np.arange(N) % 3],
        masks={"seq": steps, "vec": present},
        split=np.array(["train", "valid", "test"])[np.arange(N) % 3],
        info={"step": np.arange(N)},
        name="toy",
    )


def assert_same_data(a: MultimodalDataset, b: MultimodalDataset) -> None:
    assert a.spec_dict() == b.spec_dict()
    for m in a.modalities:
        np.testing.assert_array_equal(a.gather(m.name), b.gather(m.name))
        np.testing.assert_array_equal(a.valid_mask(m.name), b.valid_mask(m.name))
    np.testing.assert_array_equal(a.y, b.y)
    np.testing.assert_array_equal(a.split, b.split)


def test_directory_round_trip_is_memory_mapped(tmp_path):
    d = make_data()
    save_directory(d, tmp_path / "dir")
    files = sorted(p.name for p in (tmp_path / "dir").iterdir())
    assert files == ["attnfuse.json", "info_step.npy", "mask_seq.npy", "mask_vec.npy", "split.npy", "x_seq.npy"] + [
        "x_vec.npy",
        "y.npy",
    ]
    back = load_data(str(tmp_path / "dir"))
    assert back.name == "dir" and back.is_mapped and is_mapped(back.features["seq"])
    assert back.classes == [2, 5, 9] and back.features["seq"].dtype == np.float32
    assert_same_data(d, back)
    np.testing.assert_array_equal(back.info["step"], np.arange(N))
    sub = back.subset(np.array([0, 4, 7]))  # gathered into memory
    assert not sub.is_mapped and sub.n == 3 and sub.classes == [2, 5, 9]
    np.testing.assert_array_equal(sub.gather("seq"), d.gather("seq", [0, 4, 7]))
    with pytest.raises(FileExistsError, match="not empty"):
        save_directory(d, tmp_path / "dir")


def test_directory_order_and_errors(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    np.save(d / "x_b.npy", np.ones((4, 2), np.float32))
    np.save(d / "x_a.npy", np.ones((4, 3), np.float32))
    np.save(d / "y.npy", np.array([0, 1, 0, 1]))
    assert [m.name for m in load_directory(d).modalities] == ["a", "b"]  # name order without a manifest
    (d / "attnfuse.json").write_text(json.dumps({"modalities": ["b", "a"]}))
    assert [m.name for m in load_directory(d).modalities] == ["b", "a"]
    (d / "attnfuse.json").write_text(json.dumps({"modalities": ["b"]}))
    with pytest.raises(ValueError, match="attnfuse.json"):
        load_directory(d)
    (d / "attnfuse.json").unlink()
    np.save(d / "labels.npy", np.zeros(4))
    with pytest.raises(ValueError, match="not a modality: 'labels'"):
        load_directory(d)
    (d / "labels.npy").unlink()
    np.save(d / "info_obj.npy", np.array([1, None, 2, 3], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="info_obj.npy.*Python objects"):
        load_directory(d)
    (d / "info_obj.npy").unlink()
    x = np.ones((4, 3), np.float32)
    x[2, 1] = np.nan
    np.save(d / "x_a.npy", x)
    with pytest.raises(ValueError, match=r"features\['a'\]: 1 non-finite.*sample 2"):
        load_directory(d)
    with pytest.raises(FileNotFoundError):
        load_directory(tmp_path / "absent")


def test_rows_are_read_from_the_file_not_through_the_map(tmp_path):
    x = np.arange(5 * 3 * 2, dtype=np.float32).reshape(5, 3, 2)
    np.save(tmp_path / "x.npy", x)
    m = np.load(tmp_path / "x.npy", mmap_mode="r")
    rows = np.array([4, 0, 4, 2])
    got = read_rows(m, rows)
    assert type(got) is np.ndarray
    np.testing.assert_array_equal(got, x[rows])
    np.testing.assert_array_equal(read_rows(m.reshape(5, 6), rows), x.reshape(5, 6)[rows])  # a view of the map
    np.testing.assert_array_equal(read_rows(m[1:], np.array([0, 3])), x[1:][[0, 3]])  # a view with an offset
    assert read_rows(x, rows) is None  # not a memory map: index it as usual
    assert read_rows(m[:, ::2], rows) is None  # not row-major


def test_convert_npz_streams_and_matches(tmp_path):
    d = make_data()
    save_npz(d, tmp_path / "toy.npz")
    out = convert(tmp_path / "toy.npz", tmp_path / "toy")
    assert out.is_mapped and out.name == "toy"
    assert [m.name for m in out.modalities] == ["seq", "vec"]  # the .npz order, kept by the manifest
    assert_same_data(d, out)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_convert_builtin_and_failure_leaves_nothing(tmp_path):
    out = convert("synthetic-regression", tmp_path / "planted", seed=3)
    assert_same_data(make_planted(seed=3), out)
    np.testing.assert_array_equal(out.info["planted_step"], make_planted(seed=3).info["planted_step"])

    bad = tmp_path / "bad.npz"
    x = np.zeros((4, 2))
    x[1, 0] = 1e39  # finite in float64, not in float32
    np.savez(bad, x_a=x, y=np.array([0, 1, 0, 1]))
    with pytest.raises(ValueError, match=r"features\['a'\]: 1 finite values out of float32 range.*sample 1"):
        convert(bad, tmp_path / "never")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.npz", "planted"]  # nothing half-written
    with pytest.raises(FileExistsError):
        convert("synthetic-regression", tmp_path / "planted")


def test_row_batches_equal_the_standardised_copy(tmp_path):
    d = make_data()
    save_directory(d, tmp_path / "dir")
    mapped = load_directory(tmp_path / "dir")
    split = make_split(mapped, seed=0)
    scaler = Standardizer.fit(mapped, split["train"])
    reference = Standardizer.fit(d, split["train"]).transform(d)
    source = RowBatches(mapped, split["train"], scaler)
    assert isinstance(source, RowBatches) and len(source) == len(split["train"])
    gen = torch.Generator().manual_seed(0)
    chunks = list(iter_batches(source, 4, shuffle=True, generator=gen))
    assert [len(c) for c in chunks] == [4, 4, 2] and all(isinstance(c, Batch) for c in chunks)
    # The rows come back in the shuffled order, standardised like the whole-dataset copy.
    order = torch.randperm(len(source), generator=torch.Generator().manual_seed(0))
    expected = reference.to_batch(split["train"][order.numpy()])
    for name in ("seq", "vec"):
        got = torch.cat([c.x[name] for c in chunks])
        torch.testing.assert_close(got, expected.x[name], rtol=1e-6, atol=1e-6)
        assert torch.equal(torch.cat([c.mask[name] for c in chunks]), expected.mask[name])
        assert (got[~expected.mask[name]] == 0).all()  # invalid tokens stay 0
    assert torch.equal(torch.cat([c.y for c in chunks]), expected.y)
    assert torch.equal(source.y, torch.from_numpy(d.y[split["train"]]))
    whole = source.to_batch()
    torch.testing.assert_close(whole.x["seq"], reference.to_batch(split["train"]).x["seq"])


def test_same_batches_from_npz_and_directory(tmp_path):
    d = make_data()
    save_npz(d, tmp_path / "toy.npz")
    save_directory(d, tmp_path / "dir")
    a, b = load_data(str(tmp_path / "toy.npz")), load_data(str(tmp_path / "dir"))
    scaler = Standardizer.fit(a, make_split(a, 0)["train"])
    for x, y in zip(iter_batches(RowBatches(a, None, scaler), 7), iter_batches(RowBatches(b, None, scaler), 7)):
        for name in x.x:
            assert torch.equal(x.x[name], y.x[name]) and torch.equal(x.mask[name], y.mask[name])


def mapped_rss_kib(path) -> int:
    """Resident KiB of this process's mappings of ``path`` (from /proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if "-" in line.split(" ", 1)[0]:  # a mapping's header line: "start-end perms offset dev inode path"
            inside = line.endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux's /proc/self/smaps")
def test_a_pass_over_a_directory_keeps_its_pages_out_of_rss(tmp_path):
    # 24 MB of features: larger than a chunk of the value checks (16 MB), so a map left resident
    # would show here; gathering reads rows with pread, never through the map.
    rng = np.random.default_rng(0)
    d = tmp_path / "big"
    d.mkdir()
    np.save(d / "x_s.npy", rng.standard_normal((3000, 40, 50), dtype=np.float32))
    np.save(d / "y.npy", np.arange(3000) % 2)
    data = load_directory(d)  # checks every value, chunk by chunk
    path = (d / "x_s.npy").resolve()
    assert mapped_rss_kib(path) < 4096
    scaler = Standardizer.fit(data, np.arange(2000))
    for _ in iter_batches(RowBatches(data, None, scaler), 256, shuffle=True):
        pass
    assert mapped_rss_kib(path) < 4096
