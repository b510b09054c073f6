"""A model trained on a table records each modality's columns by name (config.json
``data.columns``) and reads any other table by those names, in the model's order: a table whose
columns come in another order, without the target, by another path, from another working
directory, gets the same predictions without repeating a reading option."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from attnfuse.data import load_data
from clikit import assert_one_line, cli, ok

FAST = ["--fusion", "concat", "--epochs", "2", "--d-model", "8", "--no-baselines"]


def rows_of(n: int = 90, seed: int = 0) -> list[dict]:
    """txt_0..3 and aud_0..2 features with distinct scales (a permutation changes predictions),
    an id column no modality uses, a numeric target y."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        txt = rng.normal(size=4) * np.array([1.0, 3.0, 0.3, 2.0])
        aud = rng.normal(size=3) * np.array([5.0, 0.5, 1.0])
        row = {"id": f"r{i}"} | {f"txt_{j}": round(float(v), 4) for j, v in enumerate(txt)}
        row |= {f"aud_{j}": round(float(v), 4) for j, v in enumerate(aud)}
        row["y"] = round(float(txt @ [1.0, -2.0, 0.5, 0.0] + aud @ [0.3, 2.0, -1.0]), 4)
        out.append(row)
    return out


def write(path: Path, rows: list[dict], columns: list[str]) -> Path:
    if path.suffix == ".csv":
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    else:
        pq.write_table(pa.table({c: [r[c] for r in rows] for c in columns}), path)
    return path


def predictions(path: Path) -> np.ndarray:
    with open(path, newline="") as f:
        return np.array([float(r["y_pred"]) for r in csv.DictReader(f)])


READING = {
    "globs": ["--modality", "text=txt_*", "--modality", "audio=aud_", "--target", "y"],
    "prefixes": [],  # default: one modality per <name>_ prefix, target y
    "mapping": ["--mapping", "map.yaml"],
}


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
@pytest.mark.parametrize("reading", list(READING))
def test_reordered_table_without_target_elsewhere_gets_the_same_predictions(tmp_path, monkeypatch, suffix, reading):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    (work / "map.yaml").write_text("modalities: {text: 'txt_*', audio: aud_}\ntarget: y\n")
    rows = rows_of()
    columns = list(rows[0])
    table = write(
        work / f"train{suffix}", rows, [c for c in columns if c != "id"] if reading == "prefixes" else columns
    )
    ok(cli("train", "--data", table.name, *READING[reading], *FAST, "--out", "run"))
    config = json.loads((work / "run" / "config.json").read_text())
    names = {"globs": ("text", "audio"), "mapping": ("text", "audio"), "prefixes": ("txt", "aud")}[reading]
    assert config["data"]["columns"]["modalities"] == {
        names[0]: ["txt_0", "txt_1", "txt_2", "txt_3"],
        names[1]: ["aud_0", "aud_1", "aud_2"],
    }
    assert config["data"]["columns"]["target"] == "y"
    ok(cli("predict", "--model", "run", "--data", table.name, "--out", "same.csv"))
    expected = predictions(work / "same.csv")

    # Another directory, a relative path, the columns reversed, no target, an extra column: no options.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    reversed_columns = [c for c in reversed(columns) if c != "y"] + ["unused"]
    for r in rows:
        r["unused"] = 1.0
    write(elsewhere / f"new{suffix}", rows, reversed_columns)
    monkeypatch.chdir(elsewhere)
    ok(cli("predict", "--model", "../work/run", "--data", f"new{suffix}", "--out", "pred.csv"))
    np.testing.assert_allclose(predictions(elsewhere / "pred.csv"), expected, rtol=1e-5, atol=1e-6)

    # With the target, evaluate reports what training reported on all rows.
    write(elsewhere / f"with-y{suffix}", rows, list(reversed(columns)))
    ok(cli("evaluate", "--model", "../work/run", "--data", f"with-y{suffix}", "--out", "eval.json"))
    ok(cli("evaluate", "--model", "../work/run", "--data", f"../work/{table.name}", "--out", "eval0.json"))
    got = json.loads((elsewhere / "eval.json").read_text())["all"]
    want = json.loads((elsewhere / "eval0.json").read_text())["all"]
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_the_table_is_read_in_the_models_column_order(tmp_path):
    rows = rows_of(20)
    columns = [c for c in rows[0] if c != "id"]
    a = write(tmp_path / "a.csv", rows, columns)
    b = write(tmp_path / "b.csv", rows, list(reversed(columns)))
    trained = load_data(a)
    again = load_data(b, model_columns=trained.columns)
    assert [m.name for m in again.modalities] == [m.name for m in trained.modalities] == ["txt", "aud"]
    for name in ("txt", "aud"):
        np.testing.assert_array_equal(again.features[name], trained.features[name])
    # Without the model's columns the reversed table is another feature order (what went wrong before).
    assert not np.array_equal(load_data(b).features["txt"], trained.features["txt"])
    # A glob given again for the model is put in the model's order too.
    globbed = load_data(b, modalities={"txt": "txt_*", "aud": "aud_*"}, model_columns=trained.columns)
    np.testing.assert_array_equal(globbed.features["txt"], trained.features["txt"])


def test_missing_columns_are_one_line_naming_them(tmp_path):
    rows = rows_of(40)
    columns = [c for c in rows[0] if c != "id"]
    table = write(tmp_path / "t.csv", rows, columns)
    ok(cli("train", "--data", table, *FAST, "--out", tmp_path / "run"))
    short = write(tmp_path / "short.csv", rows, [c for c in columns if c not in ("txt_1", "txt_3")])
    assert_one_line(cli("predict", "--model", tmp_path / "run", "--data", short, "--out", tmp_path / "p.csv"), 2,
                    "modality 'txt'", "txt_1, txt_3")  # fmt: skip
    assert not (tmp_path / "p.csv").exists()
    # A pattern that matches other columns than the model's is refused (a list is taken as given).
    renamed = tmp_path / "renamed.csv"
    renamed.write_text(table.read_text().replace("txt_3", "txt_9"))
    assert_one_line(cli("predict", "--model", tmp_path / "run", "--data", renamed, "--modality", "txt=txt_*",
                        "--modality", "aud=aud_", "--out", tmp_path / "p.csv"), 2, "txt_9")  # fmt: skip


def test_a_mistyped_target_names_the_nearest_columns(tmp_path):
    rows = rows_of(30)
    columns = [c for c in rows[0] if c != "id"] + [f"extra_{i}" for i in range(20)] + ["target_value"]
    for r in rows:
        r.update({f"extra_{i}": 0.0 for i in range(20)}, target_value=r["y"])
    table = write(tmp_path / "t.csv", rows, columns)
    err = assert_one_line(cli("train", "--data", table, "--target", "target_valeu", *FAST, "--out", tmp_path / "r"), 2)
    assert "target_value" in err and "in all" in err


def test_a_table_without_y_names_target_as_the_fix(tmp_path):
    rows = rows_of(30)
    for r in rows:
        r["label"] = r.pop("y")
    table = write(tmp_path / "my_table.csv", rows, [c for c in rows[0] if c != "id"])
    assert_one_line(cli("train", "--data", table, *FAST, "--out", tmp_path / "r"), 2, "--target label")
    ok(cli("train", "--data", table, "--target", "label", *FAST, "--out", tmp_path / "r"))


def test_a_split_column_note_is_a_sentence(tmp_path):
    rows = rows_of(60)
    for i, r in enumerate(rows):
        r["split"] = ("train", "valid", "test")[i % 3]
    table = write(tmp_path / "t.csv", rows, [c for c in rows[0] if c != "id"])
    result = cli("train", "--data", table, *FAST, "--out", tmp_path / "r")
    ok(result)
    said = " ".join(result.stdout.split())
    assert "note: the split is the data's split column (20 train, 20 valid, 20 test rows)" in said


def test_a_missing_data_file_is_named_alone(tmp_path, monkeypatch):
    """The error names the data file, not the output directory the run would have written."""
    monkeypatch.chdir(tmp_path)
    err = assert_one_line(cli("train", "--data", "nonexist.csv"), 2)
    assert err == "error: data file not found: nonexist.csv"
    assert not (tmp_path / "runs").exists()


def test_a_billion_laughs_mapping_is_refused_with_a_short_line(tmp_path):
    """A YAML mapping whose aliases expand to billions of strings: the message quotes a few dozen
    characters of it (it once quoted the expanded value: hundreds of MB on stderr)."""
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 8)]
    (tmp_path / "map.yaml").write_text("\n".join(["modalities:", *("  " + line for line in lines), "  x: *a7"]))
    (tmp_path / "t.csv").write_text("x_0,y\n1,2\n")
    result = cli("train", "--data", tmp_path / "t.csv", "--mapping", tmp_path / "map.yaml", "--out", tmp_path / "o")
    err = assert_one_line(result, 2, "modality 'a1'")
    assert len(err) < 300


def test_the_training_rows_without_their_split_column_are_not_reported_as_a_test_part(tmp_path):
    """A model trained on a table's split column, evaluated on the same rows without that column:
    its parts cannot be rebuilt, so evaluate reports "all" rows only (before the split column was
    part of the data's fingerprint, a drawn 70/15/15 split was reported as if it were the test part,
    mixing training rows into "test")."""
    rows = rows_of(60)
    for i, r in enumerate(rows):
        r["split"] = ("train", "valid", "test")[i % 3]
    columns = [c for c in rows[0] if c != "id"]
    ok(cli("train", "--data", write(tmp_path / "t.csv", rows, columns), *FAST, "--out", tmp_path / "m"))
    ok(cli("evaluate", "--model", tmp_path / "m", "--out", tmp_path / "with.json"))
    assert set(json.loads((tmp_path / "with.json").read_text())) == {"train", "valid", "test", "all"}
    plain = write(tmp_path / "plain.csv", rows, [c for c in columns if c != "split"])
    ok(cli("evaluate", "--model", tmp_path / "m", "--data", plain, "--out", tmp_path / "without.json"))
    assert set(json.loads((tmp_path / "without.json").read_text())) - {"calibration"} == {"all"}
