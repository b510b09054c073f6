"""Tests for attnfuse.data.io.table: CSV and Parquet tables mapped to modalities."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from attnfuse.data import convert, load_data, read_table
from attnfuse.data.io.table import load_mapping, parse_modality_options

N = 8


def columns(seed: int = 0) -> dict:
    """txt_0..2 (floats), aud_0..1 (ints), a string label, a split, and an ID column."""
    rng = np.random.default_rng(seed)
    return {
        "id": [f"s{i}" for i in range(N)],
        "txt_0": rng.standard_normal(N).round(3),
        "txt_1": rng.standard_normal(N).round(3),
        "txt_2": rng.standard_normal(N).round(3),
        "aud_0": rng.integers(0, 100, N),
        "aud_1": rng.integers(0, 100, N),
        "label": ["cat", "dog", "cat", "bird", "dog", "cat", "bird", "dog"],
        "fold": ["train", "train", "train", "valid", "train", "test", "train", "test"],
    }


def write(path, cols: dict, fmt: str | None = None) -> str:
    table = pa.table(cols)
    if (fmt or str(path).rsplit(".", 1)[-1]) == "csv":
        pcsv.write_csv(table, path)
    else:
        pq.write_table(table, path)
    return str(path)


MAPPING = {"text": "txt_*", "audio": "aud_"}


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_round_trip(tmp_path, suffix):
    cols = columns()
    path = write(tmp_path / f"table.{suffix}", cols)
    d = read_table(path, MAPPING, target="label", split_col="fold")
    assert d.name == "table" and d.n == N and [m.name for m in d.modalities] == ["text", "audio"]
    np.testing.assert_allclose(d.features["text"], np.stack([cols[f"txt_{i}"] for i in range(3)], 1), rtol=1e-6)
    np.testing.assert_array_equal(d.features["audio"], np.stack([cols["aud_0"], cols["aud_1"]], 1))
    assert d.task == "classification" and d.classes == ["bird", "cat", "dog"]
    np.testing.assert_array_equal(np.array(d.classes)[d.y], cols["label"])
    np.testing.assert_array_equal(d.split, cols["fold"])
    assert d.valid_mask("text").all() and d.valid_mask("audio").all()
    # The same through load_data, and through a mapping file (YAML or JSON).
    again = load_data(path, modalities=MAPPING, target="label", split_col="fold")
    np.testing.assert_array_equal(again.features["text"], d.features["text"])
    (tmp_path / "map.yaml").write_text("modalities:\n  text: txt_*\n  audio: aud_\ntarget: label\nsplit: fold\n")
    (tmp_path / "map.json").write_text(json.dumps({"modalities": MAPPING, "target": "label", "split": "fold"}))
    for mapping in ("map.yaml", "map.json"):
        m = load_data(path, mapping=tmp_path / mapping)
        assert [s.name for s in m.modalities] == ["text", "audio"] and m.split is not None
        np.testing.assert_array_equal(m.y, d.y)


def test_globs_lists_and_default_names(tmp_path):
    cols = columns()
    path = write(tmp_path / "t.parquet", cols)
    d = read_table(path, {"a": ["txt_2", "txt_0"], "b": "aud_[1]"}, target="label")
    np.testing.assert_allclose(d.features["a"][:, 0], cols["txt_2"], rtol=1e-6)
    assert d.features["b"].shape == (N, 1) and d.split is None  # no "split" column: no split
    # Without modalities: one per <prefix>_ (here txt and aud); "y" and "split" are the defaults.
    default = {k: v for k, v in cols.items() if k.startswith(("txt", "aud"))}
    default.update(y=np.arange(N) * 0.5, split=cols["fold"])
    d = read_table(write(tmp_path / "d.csv", default))
    assert [m.name for m in d.modalities] == ["txt", "aud"] and d.task == "regression"
    np.testing.assert_array_equal(d.split, cols["fold"])


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_missing_values_mark_the_modality_absent(tmp_path, suffix):
    cols = columns()
    cols["txt_1"] = [1.0, None, 2.0, float("nan"), 3.0, 4.0, 5.0, 6.0]  # rows 1 (null) and 3 (NaN)
    cols["aud_0"] = pa.array([1, 2, None, 4, 5, 6, 7, 8], pa.int64())  # row 2: an int column with a null
    path = write(tmp_path / f"t.{suffix}", cols)
    d = read_table(path, MAPPING, target="label")
    np.testing.assert_array_equal(d.valid_mask("text")[:, 0], [1, 0, 1, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(d.valid_mask("audio")[:, 0], [1, 1, 0, 1, 1, 1, 1, 1])
    for name in ("text", "audio"):
        x = d.features[name]
        assert np.isfinite(x).all() and (x[~d.valid_mask(name)[:, 0]] == 0).all()  # absent: 0, never NaN
    assert d.features["text"][0, 1] == 1.0  # present rows keep their values


def test_csv_null_spellings(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("a_0,a_1,b_0,y\n1,,3,0\nNA,2,3,1\n1,2,NaN,0\n1,2,3,1\n")
    d = read_table(path)
    np.testing.assert_array_equal(d.valid_mask("a")[:, 0], [0, 0, 1, 1])
    np.testing.assert_array_equal(d.valid_mask("b")[:, 0], [1, 1, 0, 1])


def bad_table(tmp_path, change: dict) -> str:
    cols = columns()
    cols.update(change)
    return write(tmp_path / "bad.csv", cols)


@pytest.mark.parametrize(
    "change, kwargs, words",
    [
        ({}, dict(modalities={"text": "vid_"}), ["modality 'text'", "'vid_'", "matches no column"]),
        ({}, dict(modalities={"text": "txt_*", "more": "txt_1"}), ["'txt_1'", "two modalities", "'text'", "'more'"]),
        ({}, dict(modalities=MAPPING, target="score"), ["no target column 'score'"]),
        ({}, dict(modalities=MAPPING, split_col="part"), ["no split column 'part'"]),
        ({}, dict(modalities={"text": "txt_*", "i": ["id"]}), ["column 'id'", "modality 'i'", "not numeric"]),
        ({}, dict(modalities={"text": ["txt_0", "txt_9"]}), ["modality 'text'", "'txt_9'"]),
        ({}, dict(modalities={"text": "txt_*", "l": ["label"]}), ["'label' is the target", "'l'"]),
        ({}, dict(), ["not named <modality>_<feature>", "'id'", "--modality"]),
        ({"fold": ["train", "tst", *["test"] * 6]}, dict(modalities=MAPPING, split_col="fold"), ["split", "'tst'"]),
        ({"label": ["a", None, *["b"] * 6]}, dict(modalities=MAPPING), ["target column 'label'", "row 1"]),
        ({"txt_0": [1e39, *[0.0] * 7]}, dict(modalities=MAPPING), ["'txt_0'", "row 0", "out of float32 range"]),
        (
            {"txt_0": [None] * 2 + [0.0] * 6, "aud_1": [None, None, *range(6)]},
            dict(modalities=MAPPING),
            ["row 0", "missing value in every modality", "2 rows"],
        ),
    ],
)
def test_bad_tables_are_one_line_naming_the_culprit(tmp_path, change, kwargs, words):
    kwargs = {"target": "label", **kwargs}
    with pytest.raises(ValueError) as err:
        read_table(bad_table(tmp_path, change), **kwargs)
    msg = str(err.value)
    assert "\n" not in msg and "np.str_" not in msg
    for word in words:
        assert word in msg, (word, msg)


@pytest.mark.parametrize(
    "text, words",
    [
        ("modalities: [a, b]\n", ["'modalities' must map names"]),
        ("modalities: {text: 3}\n", ["modality 'text'", "3"]),
        ("columns: {text: txt_}\n", ["unknown keys", "columns"]),
        ("target: [a]\n", ["'target' must be a column name"]),
        ("modalities: {text: [txt_\n", ["not a readable mapping file"]),
        ("- 1\n- 2\n", ["expected a mapping"]),
    ],
)
def test_bad_mapping_files(tmp_path, text, words):
    (tmp_path / "m.yaml").write_text(text)
    with pytest.raises(ValueError) as err:
        load_mapping(tmp_path / "m.yaml")
    assert "\n" not in str(err.value)
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_modality_options_and_table_options_elsewhere(tmp_path):
    assert parse_modality_options(["text=txt_*", " audio = aud_ "]) == {"text": "txt_*", "audio": "aud_"}
    for bad in (["text"], ["=txt_"], ["text="], ["a=x", "a=y"]):
        with pytest.raises(ValueError, match="modality"):
            parse_modality_options(bad)
    with pytest.raises(ValueError, match="target: only for tables"):
        load_data("mfeat", target="y")
    with pytest.raises(ValueError, match="modalities: only for tables"):
        load_data(str(tmp_path / "x.npz"), modalities={"a": "a_"})
    (tmp_path / "garbage.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match="garbage.parquet: not a readable parquet table"):
        read_table(tmp_path / "garbage.parquet")


def test_labels_in_a_models_label_space(tmp_path):
    path = write(tmp_path / "t.csv", columns())
    d = read_table(path, MAPPING, target="label", classes=["bird", "cat", "dog", "eel"])
    assert d.num_classes == 4 and d.classes == ["bird", "cat", "dog", "eel"]
    with pytest.raises(ValueError, match="'bird' at sample 3 is not one of the classes"):
        read_table(path, MAPPING, target="label", classes=["cat", "dog"])


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_convert_a_table_to_a_directory(tmp_path, suffix):
    cols = columns()
    cols["aud_1"] = pa.array([1, None, 3, 4, 5, 6, 7, 8], pa.int64())
    path = write(tmp_path / f"t.{suffix}", cols)
    table = read_table(path, MAPPING, target="label", split_col="fold")
    d = convert(path, tmp_path / "out", modalities=MAPPING, target="label", split_col="fold")
    assert d.is_mapped and d.name == "out" and d.classes == table.classes
    for m in ("text", "audio"):
        np.testing.assert_array_equal(d.gather(m), table.gather(m))
        np.testing.assert_array_equal(d.valid_mask(m), table.valid_mask(m))
    np.testing.assert_array_equal(d.y, table.y)
    np.testing.assert_array_equal(d.split, table.split)


def test_duplicate_column_names(tmp_path):
    path = tmp_path / "dup.csv"
    path.write_text("a_0,a_0,y\n1,2,0\n3,4,1\n")
    with pytest.raises(ValueError, match="column name 'a_0' appears more than once"):
        read_table(path)
