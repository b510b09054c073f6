"""attnfuse tune against a hostile environment: two processes on one study file, a second tune into
a locked --out, study files that are not studies (garbage, truncated, another program's SQLite
database, a directory), a full disk (a real tiny file system, and one injected mid-search), and
the umask of a new study file."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy.exc

from attnfuse.files import BusyError, lock
from attnfuse.tune import check_study_db, default_study_db
from clikit import assert_one_line, cli, entries, ok, process_umask, write_npz

# One trial of one epoch of a tiny model: a tune in about a second.
QUICK = [
    "--trials",
    "1",
    "--fusion",
    "concat",
    "--epochs",
    "1",
    "--d-model",
    "8",
    "--batch-size",
    "32",
    "--no-baselines",
]


def load_study(db):
    return optuna.load_study(study_name="attnfuse", storage=f"sqlite:///{db}")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_npz(tmp_path_factory.mktemp("tunedata") / "d.npz")


@pytest.fixture(scope="module")
def study_db(tmp_path_factory, data):
    """A real study file of one trial, to damage in copies."""
    tmp = tmp_path_factory.mktemp("study")
    ok(cli("tune", "--data", data, *QUICK, "--out", tmp / "m"))
    return default_study_db(tmp / "m")


# ---------------------------------------------------------------------------------------------
# Two processes


# Each tune runs in a fresh interpreter (not a fork of this one: a child forked from a process
# whose OpenMP threads are running can deadlock in its first parallel operation). Both wait for
# `go`, so they open the study at the same instant, where Optuna's schema creation collided.
_TUNE = """
import sys, time
from pathlib import Path
from typer.testing import CliRunner
from attnfuse.cli import app
ready, go, err = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
ready.touch()
while not go.exists():
    time.sleep(0.001)
result = CliRunner().invoke(app, sys.argv[4:])
err.write_text(result.stderr)
sys.exit(result.exit_code)
"""


def test_two_tunes_on_one_study_db_share_it(tmp_path, data):
    db, go, work = tmp_path / "shared.db", tmp_path / "go", tmp_path / "work"
    work.mkdir()
    args = ["tune", "--data", str(data), *QUICK, "--study-db", str(db)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _TUNE, work / f"ready{i}", go, work / f"err{i}", *args, "--out", tmp_path / f"m{i}"]
        )
        for i in range(2)
    ]
    deadline = time.monotonic() + 300
    while not all((work / f"ready{i}").exists() for i in range(2)) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()
    codes = [p.wait(timeout=600) for p in procs]
    errors = [(work / f"err{i}").read_text() for i in range(2)]
    assert codes == [0, 0], errors  # the second waits for the first to create the study, then joins it
    study = load_study(db)
    assert len(study.trials) == 2 and study.user_attrs["runs"] == 2
    assert study.trials[0].params != study.trials[1].params  # each process drew its own start-up trial
    assert entries(tmp_path) == ["go", "m0", "m1", "shared.db", "work"]  # no lock left behind


def test_a_second_tune_into_a_locked_out_is_refused_at_once(tmp_path, data):
    out = tmp_path / "m"
    with lock(out):  # as a first tune (or train) holds it during its search
        result = cli("tune", "--data", data, *QUICK, "--out", out)
    assert_one_line(result, 2, f"{out}: process {os.getpid()} is writing it")
    assert "trial 0" not in result.stdout  # refused before any trial
    assert entries(tmp_path) == []  # neither the model nor the study


def test_out_is_locked_during_the_search(tmp_path, data, monkeypatch):
    import attnfuse.tune as tune_module

    out, refused = tmp_path / "m", []
    real_train = tune_module.train

    def train(spec, target, progress=None):
        if target is None:  # a trial: a second writer of --out is refused meanwhile
            try:
                with lock(os.path.realpath(out)):
                    refused.append(False)
            except BusyError as e:
                refused.append(str(e))
        return real_train(spec, target, progress)

    monkeypatch.setattr(tune_module, "train", train)
    ok(cli("tune", "--data", data, *QUICK, "--out", out))
    assert refused and f"process {os.getpid()} is writing it" in refused[0]
    assert (out / "model.safetensors").is_file()  # the final training took the lock after the search


# ---------------------------------------------------------------------------------------------
# Files that are not studies


def _garbage(path: Path, _db: Path) -> None:
    path.write_bytes(b"not a database\n" * 100)


def _truncated(path: Path, db: Path) -> None:
    path.write_bytes(db.read_bytes()[: db.stat().st_size // 2])


def _header_only(path: Path, db: Path) -> None:
    path.write_bytes(db.read_bytes()[:50])


def _damaged(path: Path, db: Path) -> None:
    raw = bytearray(db.read_bytes())
    page = int.from_bytes(raw[16:18], "big")
    raw[page : 3 * page] = b"\xff" * (2 * page)  # the second and third pages: b-tree pages of tables
    path.write_bytes(bytes(raw))


def _foreign(path: Path, _db: Path) -> None:
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE customers (id INTEGER, name TEXT)")
    con.commit()
    con.close()


def _directory(path: Path, _db: Path) -> None:
    path.mkdir()


@pytest.mark.parametrize(
    "make, message",
    [
        (_garbage, "does not start with SQLite's header"),
        (_truncated, r"is truncated: \d+ bytes, its header says \d+"),
        (_header_only, "is truncated: 50 bytes, shorter than SQLite's 100-byte header"),
        (_damaged, "is damaged"),
        (_foreign, r"is an SQLite database of something else \(tables customers\), not an Optuna study"),
        (_directory, "expected an SQLite file, got the directory"),
    ],
    ids=["garbage", "truncated", "header-only", "damaged", "foreign-sqlite", "directory"],
)
def test_a_study_db_that_is_not_a_study_is_refused(tmp_path, data, study_db, make, message):
    bad = tmp_path / "bad.db"
    make(bad, study_db)
    before = sorted(bad.iterdir()) if bad.is_dir() else bad.read_bytes()
    result = cli("tune", "--data", data, *QUICK, "--out", tmp_path / "m", "--study-db", bad)
    assert_one_line(result, 2, "^error: study-db: ", message)
    assert (sorted(bad.iterdir()) if bad.is_dir() else bad.read_bytes()) == before  # left as it was
    assert entries(tmp_path) == ["bad.db"]  # no model, no lock


def test_check_study_db_accepts_a_study_an_empty_file_and_nothing(tmp_path, study_db):
    check_study_db(study_db)
    (tmp_path / "empty.db").touch()
    check_study_db(tmp_path / "empty.db")
    check_study_db(tmp_path / "absent.db")


def test_an_empty_study_db_file_becomes_a_study(tmp_path, data):
    db = tmp_path / "s.db"
    db.touch()
    ok(cli("tune", "--data", data, *QUICK, "--out", tmp_path / "m", "--study-db", db))
    assert len(load_study(db).trials) == 1


# ---------------------------------------------------------------------------------------------
# A full disk


def test_tune_on_a_full_file_system(data, tiny_filesystem):
    out = tiny_filesystem / "run"
    result = cli("tune", "--data", data, *QUICK, "--out", out)
    assert_one_line(result, 2, f"no space left on device: {default_study_db(out)}$")
    assert entries(tiny_filesystem) == []  # the half-created study file is removed, the locks too


def test_a_full_disk_during_the_search_is_one_line(tmp_path, data, monkeypatch):
    def full(*args, **kwargs):
        raise sqlalchemy.exc.OperationalError("UPDATE trials", {}, sqlite3.OperationalError("database or disk is full"))

    monkeypatch.setattr(optuna.storages.RDBStorage, "set_trial_state_values", full)
    db = tmp_path / "s.db"
    result = cli("tune", "--data", data, *QUICK, "--out", tmp_path / "m", "--study-db", db)
    assert_one_line(result, 2, f"^error: no space left on device: {db}$")
    assert not (tmp_path / "m").exists()


# ---------------------------------------------------------------------------------------------
# Modes


@pytest.mark.parametrize("mask", [0o002, 0o077])
def test_a_new_study_file_has_the_umasks_mode(tmp_path, data, mask):
    db = tmp_path / "s.db"
    with process_umask(mask):
        ok(cli("tune", "--data", data, *QUICK, "--out", tmp_path / "m", "--study-db", db))
    assert db.stat().st_mode & 0o777 == 0o666 & ~mask
