"""Tests for attnfuse.files: atomic files, directory transactions, locks, modes, strict JSON."""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from attnfuse import files
from attnfuse.files import (
    BusyError,
    atomic_file,
    check_writable,
    lock,
    remove_debris,
    to_json,
    transaction,
    umask,
    write_json,
    write_text,
)
from clikit import entries, process_umask, strict_loads


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---------------------------------------------------------------------------------------------
# modes


def test_umask_is_read_without_changing_it():
    with process_umask(0o027):
        assert umask() == 0o027
        assert os.umask(0o027) == 0o027  # still set


@pytest.mark.parametrize("mask, file_bits, dir_bits", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_files_and_directories_get_the_umask_mode(tmp_path, mask, file_bits, dir_bits):
    with process_umask(mask):
        write_text(tmp_path / "a.txt", "x")
        with transaction(tmp_path / "run") as tmp:
            write_json(tmp / "m.json", {"a": 1})
    assert mode(tmp_path / "a.txt") == file_bits  # not mkstemp's 0600
    assert mode(tmp_path / "run") == dir_bits  # not mkdtemp's 0700
    assert mode(tmp_path / "run" / "m.json") == file_bits


# ---------------------------------------------------------------------------------------------
# atomic files


def test_atomic_file_replaces_or_leaves_the_old_file(tmp_path):
    target = tmp_path / "out.csv"
    write_text(target, "old\n")
    with pytest.raises(KeyboardInterrupt), atomic_file(target, "w") as f:
        f.write("half of the new")
        raise KeyboardInterrupt
    assert target.read_text() == "old\n" and entries(tmp_path) == ["out.csv"]  # no temporary left
    with atomic_file(target) as f:
        f.write(b"new\n")
    assert target.read_text() == "new\n" and entries(tmp_path) == ["out.csv"]


def test_atomic_file_creates_missing_parents(tmp_path):
    write_text(tmp_path / "a" / "b" / "c.txt", "x")
    assert (tmp_path / "a" / "b" / "c.txt").read_text() == "x"


def test_an_error_names_the_target_not_the_temporary(tmp_path):
    target = tmp_path / "out.json"

    class Full:
        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError) as info, atomic_file(target, "w"):
        Full().write("x")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert entries(tmp_path) == []


def test_debris_of_killed_writers_is_removed_and_live_temporaries_are_kept(tmp_path):
    target = tmp_path / "model.safetensors"
    dead = tmp_path / ".model.safetensors.abcd1234.tmp"  # nobody holds it: a killed writer's
    dead.write_bytes(b"\0" * 1000)
    dead_dir = tmp_path / ".model.safetensors.dir_5678.tmp"
    dead_dir.mkdir()
    (dead_dir / "x").write_text("x")
    live = tmp_path / ".model.safetensors.live0000.tmp"
    live.write_bytes(b"")
    neighbour = tmp_path / ".model.safetensors.v2.abcd1234.tmp"  # the target "model.safetensors.v2"'s
    neighbour.write_bytes(b"")
    other = tmp_path / ".model.safetensors.notours.tmp"  # not the shape of our temporaries
    other.write_bytes(b"")
    with open(live, "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)  # a live writer holds its temporary
        write_text(target, "new")
    assert entries(tmp_path) == sorted([target.name, live.name, neighbour.name, other.name])
    assert remove_debris(target) == [live]  # released now


# ---------------------------------------------------------------------------------------------
# strict JSON


def test_to_json_refuses_nan_and_names_where():
    with pytest.raises(ValueError, match=r"test\.r2 is nan"):
        to_json({"train": {"r2": 0.5}, "test": {"r2": float("nan")}})
    with pytest.raises(ValueError, match=r"runs\.1 is inf"):
        to_json({"runs": [1.0, math.inf]})


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=3), c, max_size=3),
        max_leaves=10,
    )
)
def test_to_json_is_strict_json_or_a_value_error(value):
    try:
        text = to_json(value)
    except ValueError as e:
        assert "JSON cannot hold" in str(e)
        return
    assert strict_loads(text) == json.loads(text)


# ---------------------------------------------------------------------------------------------
# transactions and locks


def test_transaction_swaps_the_whole_directory(tmp_path):
    out = tmp_path / "run"
    with transaction(out) as tmp:
        write_text(tmp / "a", "1")
        write_text(tmp / "b", "1")
    with transaction(out) as tmp:
        write_text(tmp / "a", "2")  # "b" is not written again: it must not survive
    assert entries(out) == ["a"] and (out / "a").read_text() == "2"
    assert entries(tmp_path) == ["run"]  # no temporary, no lock file


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_a_failed_transaction_leaves_the_old_directory(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    out = tmp_path / "run"
    with transaction(out) as tmp:
        write_text(tmp / "a", "old")
    for error in (KeyboardInterrupt, ValueError):
        with pytest.raises(error), transaction(out) as tmp:
            write_text(tmp / "a", "new")
            raise error
        assert entries(out) == ["a"] and (out / "a").read_text() == "old"
        assert entries(tmp_path) == ["run"]
    with transaction(out) as tmp:
        write_text(tmp / "a", "new")
    assert (out / "a").read_text() == "new" and entries(tmp_path) == ["run"]


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_transaction_keeps_the_entries_named_and_not_written(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    out, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    elsewhere.mkdir()
    write_text(elsewhere / "x", "theirs")
    with transaction(out) as tmp:
        write_text(tmp / "a", "1")
    write_text(out / "report" / "r", "mine")
    (out / "linked").symlink_to(elsewhere)
    with transaction(out, keep=("report", "linked", "absent")) as tmp:
        write_text(tmp / "a", "2")
    assert entries(out) == ["a", "linked", "report"] and (out / "report" / "r").read_text() == "mine"
    assert (out / "linked").is_symlink() and (elsewhere / "x").read_text() == "theirs"
    with transaction(out, keep=("report",)) as tmp:  # written by the block: the new one wins
        write_text(tmp / "report", "new")
    assert entries(out) == ["report"] and (out / "report").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "run"]


def test_kept_entries_go_back_when_the_swap_fails(tmp_path, monkeypatch):
    out = tmp_path / "run"
    with transaction(out) as tmp:
        write_text(tmp / "a", "1")
    write_text(out / "report" / "r", "mine")

    def broken(new, old):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(files, "_swap_in", broken)
    with pytest.raises(OSError), transaction(out, keep=("report",)) as tmp:
        write_text(tmp / "a", "2")
    assert entries(out) == ["a", "report"] and (out / "report" / "r").read_text() == "mine"
    assert (out / "a").read_text() == "1"


def test_a_failed_transaction_removes_the_parents_it_created(tmp_path):
    with pytest.raises(ValueError), transaction(tmp_path / "x" / "y" / "run"):
        raise ValueError
    assert entries(tmp_path) == []


def test_transaction_check_refuses_before_the_block(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "mine.txt").write_text("keep")

    def refuse(path: Path) -> None:
        raise ValueError(f"{path} is not ours")

    ran = False
    with pytest.raises(ValueError, match="not ours"), transaction(out, check=refuse):
        ran = True
    assert not ran and (out / "mine.txt").read_text() == "keep"


def test_transaction_through_a_symlink_replaces_the_target(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with transaction(tmp_path / "link") as tmp:
        write_text(tmp / "a", "1")
    assert (tmp_path / "link").is_symlink() and (tmp_path / "real" / "a").read_text() == "1"


def test_a_second_writer_fails_at_once_naming_the_first(tmp_path):
    out = tmp_path / "run"
    with transaction(out), pytest.raises(BusyError, match=rf"process {os.getpid()} is writing it"), transaction(out):
        pass
    with lock(out):  # released and removed after the first
        pass
    assert entries(tmp_path) == ["run"]


def test_an_output_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "run").write_text("a file")
    with pytest.raises(NotADirectoryError, match="exists and is not a directory"), transaction(tmp_path / "run"):
        pass
    assert (tmp_path / "run").read_text() == "a file"


# ---------------------------------------------------------------------------------------------
# writability


def test_check_writable(tmp_path):
    check_writable(tmp_path / "new" / "deeper" / "file.csv")  # parents are created on write
    assert entries(tmp_path) == []  # the probe leaves nothing
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        check_writable(tmp_path / "file" / "out.csv")
    with pytest.raises(IsADirectoryError):
        check_writable(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_check_writable_read_only_directory(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    try:
        with pytest.raises(PermissionError) as info:
            check_writable(ro / "out.csv")
        assert info.value.filename == str(ro)
    finally:
        ro.chmod(0o755)


def test_the_current_directory_is_not_replaced(tmp_path, monkeypatch):
    (tmp_path / "run" / "sub").mkdir(parents=True)
    for cwd in (tmp_path / "run", tmp_path / "run" / "sub"):
        monkeypatch.chdir(cwd)
        with pytest.raises(ValueError, match="is the current directory or contains it"), transaction(tmp_path / "run"):
            pass
        with pytest.raises(ValueError, match="current directory"), transaction("."):
            pass
    assert entries(tmp_path / "run") == ["sub"]
