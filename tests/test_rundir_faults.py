"""Run directories under attack: a reader racing the writer, links inside a run directory, a
checkpoint of one run under the options of another, tampered checkpoints, and the user's explain/
report when a run directory is replaced. Each failure is one line and exit 2, and nothing outside
the output changes."""

from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing
import os
import shutil
import struct
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import attnfuse.fit
import attnfuse.pipeline
from attnfuse.checkpoint import CONFIG, WEIGHTS, load_model, read_config, run_directory
from attnfuse.runstate import LAST, RunLog, load_state, save_state, write_options
from clikit import TINY, assert_complete_run, assert_one_line, cli, ok, write_npz

# --------------------------------------------------------------------------------------------
# Helpers


def tree_sums(root: Path, skip: Path | None = None) -> dict[str, str]:
    """sha256 of every file under ``root`` (links as their target's name), but under ``skip``."""
    sums = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(directory) / name
            if skip is not None and (path == skip or skip in path.parents):
                continue
            rel = str(path.relative_to(root))
            if path.is_symlink():
                sums[rel] = "-> " + os.readlink(path)
            elif path.is_file():
                sums[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return sums


def one_line(result, *needles: str) -> str:
    """Exit 2, one line under 1 KB on stderr, no traceback."""
    err = assert_one_line(result, 2, *needles)
    assert len(err.encode()) < 1024, err
    return err


def fail_at(monkeypatch, name: str, error: BaseException, module=attnfuse.pipeline) -> None:
    """``module.NAME`` (default: of attnfuse.pipeline) raises ``error``: a run that stops there."""

    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr(module, name, broken)


def disk_full() -> OSError:
    return OSError(errno.ENOSPC, "No space left on device")


# --------------------------------------------------------------------------------------------
# A reader never sees a mix


def _replace_repeatedly(out: str, sources: list[str], times: int, started) -> None:
    """Replace ``out`` ``times`` times with the files of each source in turn, as training does."""
    started.set()
    for i in range(times):
        src = Path(sources[i % len(sources)])
        with run_directory(out) as tmp:
            for name in (WEIGHTS, CONFIG):  # weights first, as write_model does: a config never precedes them
                shutil.copyfile(src / name, tmp / name)


def test_a_reader_never_sees_a_mixed_directory_while_another_process_replaces_it(tmp_path):
    data = write_npz(tmp_path / "d.npz")
    sources = []
    for seed in (0, 1):
        src = tmp_path / f"run{seed}"
        ok(cli("train", "--data", data, *TINY, "--seed", seed, "--out", src))
        sources.append(str(src))
    out = tmp_path / "out"
    shutil.copytree(sources[0], out)
    ctx = multiprocessing.get_context("spawn")
    started = ctx.Event()
    writer = ctx.Process(target=_replace_repeatedly, args=(str(out), sources, 60, started))
    writer.start()
    started.wait(60)
    loads, failures = 0, []
    while writer.is_alive() or loads == 0:
        try:
            load_model(out)
        except (ValueError, OSError) as e:
            failures.append(str(e))
        loads += 1
    writer.join()
    assert writer.exitcode == 0
    assert failures == [], f"{len(failures)} of {loads} loads failed: {failures[0]}"


def test_a_config_read_before_the_directory_was_replaced_is_refused_with_that_reason(tmp_path):
    data = write_npz(tmp_path / "d.npz")
    a, b = tmp_path / "a", tmp_path / "b"
    ok(cli("train", "--data", data, *TINY, "--seed", 0, "--out", a))
    ok(cli("train", "--data", data, *TINY, "--seed", 1, "--out", b))
    config = read_config(a)
    with run_directory(a) as tmp:  # another run replaces it meanwhile
        for name in (WEIGHTS, CONFIG):
            shutil.copyfile(b / name, tmp / name)
    with pytest.raises(ValueError, match="was replaced by another run while it was being read"):
        load_model(a, config=config)
    load_model(a)  # read afresh: the new run, whole


def test_a_directory_really_mixed_is_still_refused(tmp_path):
    data = write_npz(tmp_path / "d.npz")
    a, b = tmp_path / "a", tmp_path / "b"
    ok(cli("train", "--data", data, *TINY, "--seed", 0, "--out", a))
    ok(cli("train", "--data", data, *TINY, "--seed", 1, "--out", b))
    shutil.copyfile(b / WEIGHTS, a / WEIGHTS)
    with pytest.raises(ValueError, match="holds other weights"):
        load_model(a)


# --------------------------------------------------------------------------------------------
# Links inside a run directory are never followed


def user_folder(root: Path) -> Path:
    """A folder of the user's that a link may point to: notes named like checkpoints, a log, options."""
    notes = root / "mine"
    (notes / "state-of-the-art-notes").mkdir(parents=True)
    (notes / "state-of-the-art-notes" / "paper.txt").write_text("precious\n")
    (notes / "log.csv").write_text("my,own,log\n")
    (notes / "run.yaml").write_text("mine: true\n")
    return notes


@pytest.mark.parametrize("resume", [False, True])
def test_training_into_a_directory_whose_last_is_a_link_refuses_and_leaves_the_target(tmp_path, resume):
    data = write_npz(tmp_path / "d.npz")
    out = tmp_path / "out"
    ok(cli("train", "--data", data, *TINY, "--out", out))
    notes = user_folder(tmp_path)
    (out / LAST).symlink_to(notes)
    before = tree_sums(tmp_path)
    args = ["--resume", out] if resume else ["--data", data, *TINY, "--out", out]
    one_line(cli("train", *args), "symbolic link")
    assert tree_sums(tmp_path) == before


@pytest.mark.parametrize("entry", ["log.csv", "run.yaml", "tensorboard", "state-x"])
def test_a_link_among_the_entries_of_last_is_refused(tmp_path, entry):
    data = write_npz(tmp_path / "d.npz")
    out = tmp_path / "out"
    ok(cli("train", "--data", data, *TINY, "--out", out))
    notes = user_folder(tmp_path)
    (out / LAST).mkdir()
    (out / LAST / entry).symlink_to(notes / "log.csv" if "." in entry else notes)
    before = tree_sums(tmp_path)
    one_line(cli("train", "--data", data, *TINY, "--out", out), "symbolic link")
    assert tree_sums(tmp_path) == before


def test_the_runstate_writers_refuse_a_linked_last_themselves(tmp_path):
    """Even when called directly (a link made after the run directory was checked)."""
    notes = user_folder(tmp_path)
    last = tmp_path / "out" / LAST
    last.parent.mkdir()
    last.symlink_to(notes)
    before = tree_sums(notes)
    with pytest.raises(ValueError, match="symbolic link"):
        save_state(last, {"x": torch.zeros(1)}, {"epoch": 0, "step": 0})
    with pytest.raises(ValueError, match="symbolic link"):
        write_options(last, {"a": 1})
    with pytest.raises(ValueError, match="symbolic link"):
        RunLog(last)
    with pytest.raises(ValueError, match="symbolic link"):
        load_state(last)
    assert tree_sums(notes) == before


def test_the_clean_up_of_stale_checkpoints_removes_links_not_their_targets(tmp_path):
    notes = user_folder(tmp_path)
    last = tmp_path / "out" / LAST
    last.mkdir(parents=True)
    (last / ".link-999.tmp").symlink_to(notes / "state-of-the-art-notes")  # a crash's next `state` link
    before = tree_sums(notes)
    save_state(last, {"x": torch.zeros(1)}, {"epoch": 0, "step": 0})
    assert not os.path.lexists(last / ".link-999.tmp")
    assert tree_sums(notes) == before


# --------------------------------------------------------------------------------------------
# A checkpoint belongs to its options


def checkpointed(tmp_path: Path, monkeypatch, *extra: str) -> tuple[Path, Path]:
    """A run that checkpointed every epoch, then failed at its final write (a full disk): its
    last/ is what --resume continues."""
    data = write_npz(tmp_path / "d.npz")
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        fail_at(m, "write_run", disk_full())
        one_line(cli("train", "--data", data, *TINY, "--checkpoint-every", "1", *extra, "--out", out))
    assert (out / LAST / "state" / "trainer.json").is_file()
    return data, out


def test_resume_refuses_a_checkpoint_of_another_run_than_its_options(tmp_path, monkeypatch):
    data, out = checkpointed(tmp_path, monkeypatch)
    # A second run into the same --out, other options, stopped before a checkpoint of its own.
    with monkeypatch.context() as m:
        fail_at(m, "fit_model", disk_full(), attnfuse.fit)
        one_line(cli("train", "--data", data, *TINY, "--lr", "0.5", "--checkpoint-every", "0", "--out", out))
    assert "lr: 0.5" in (out / LAST / "run.yaml").read_text()
    before = tree_sums(tmp_path)
    one_line(cli("train", "--resume", out), "checkpoint of another run", "without --resume")
    assert tree_sums(tmp_path) == before


def test_resume_of_its_own_checkpoint_still_works(tmp_path, monkeypatch):
    _, out = checkpointed(tmp_path, monkeypatch)
    ok(cli("train", "--resume", out))
    assert_complete_run(out)


# --------------------------------------------------------------------------------------------
# A checkpoint is checked before it is used


def _json(change):
    def tamper(state: Path) -> None:
        path = state / "trainer.json"
        meta = json.loads(path.read_text())
        change(meta)
        path.write_text(json.dumps(meta))

    return tamper


def _tensors(change):
    def tamper(state: Path) -> None:
        path = state / "trainer.safetensors"
        tensors = load_file(path)
        change(tensors)
        save_file(tensors, path)

    return tamper


def _first(tensors: dict, prefix: str) -> str:
    return next(k for k in sorted(tensors) if k.startswith(prefix))


def _reshape(prefix: str):
    def change(t: dict) -> None:
        key = _first(t, prefix)
        t[key] = torch.zeros(3, 5)

    return change


def _truncate(name: str, keep: float):
    def tamper(state: Path) -> None:
        path = state / name
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * keep)])

    return tamper


def _write(name: str, data: bytes):
    def tamper(state: Path) -> None:
        (state / name).write_bytes(data)

    return tamper


def _huge_header(state: Path) -> None:
    (state / "trainer.safetensors").write_bytes(struct.pack("<Q", 2**62) + b"{}")


def _relink(state: Path) -> None:
    link = state.parent / "state"
    link.unlink()
    link.symlink_to(state.parent.parent.parent / "d.npz")


TAMPERINGS = {
    "missing step": _json(lambda m: m.pop("step")),
    "missing python_rng": _json(lambda m: m.pop("python_rng")),
    "history an integer": _json(lambda m: m.update(history=5)),
    "epoch a string": _json(lambda m: m.update(epoch="3")),
    "step negative": _json(lambda m: m.update(step=-1)),
    "best_epoch after epoch": _json(lambda m: m.update(best_epoch=99)),
    "best_key a string": _json(lambda m: m.update(best_key="x")),
    "candidate a list": _json(lambda m: m.update(candidate=[0])),
    "members longer than the member under way": _json(lambda m: m.update(members=[{}])),
    "finished an object": _json(lambda m: m.update(finished={})),
    "finished too short": _json(lambda m: m.update(finished=[])),
    "optimizer groups empty": _json(lambda m: m.update(optimizer_groups=[])),
    "optimizer lr a string": _json(lambda m: m["optimizer_groups"][0].update(lr="fast")),
    "python rng of zeros": _json(lambda m: m["python_rng"].update(rank0=[3, [0] * 625, None])),
    "python rng short": _json(lambda m: m["python_rng"].update(rank0=[3, [1, 2], None])),
    "first model huge": _json(lambda m: m["first"]["model"].update(d_model=16384)),
    "first fusion unknown": _json(lambda m: m["first"].update(fusion="quantum")),
    "first standardizer bad": _json(lambda m: m["first"].update(standardizer={"a": {"mean": [0], "std": [-1]}})),
    "world of 2": _json(lambda m: m.update(world=2)),
    "not JSON": _write("trainer.json", b"{not json"),
    "JSON with NaN": _write("trainer.json", b'{"epoch": NaN}'),
    "JSON a list": _write("trainer.json", b"[1, 2]"),
    "truncated JSON": _truncate("trainer.json", 0.5),
    "truncated tensors": _truncate("trainer.safetensors", 0.5),
    "empty tensors file": _write("trainer.safetensors", b""),
    "huge tensors header": _huge_header,
    "shuffle rng of 7 bytes": _tensors(lambda t: t.update({"rng.shuffle": torch.zeros(7, dtype=torch.uint8)})),
    "shuffle rng of zeros": _tensors(lambda t: t.update({"rng.shuffle": torch.zeros(5056, dtype=torch.uint8)})),
    "torch rng of zeros": _tensors(lambda t: t.update({"rng.rank0.torch": torch.zeros(5056, dtype=torch.uint8)})),
    "numpy rng of zeros": _tensors(lambda t: t.update({"rng.rank0.numpy_keys": torch.zeros(624, dtype=torch.int64)})),
    "numpy position out of range": _tensors(
        lambda t: t.update({"rng.rank0.numpy_rest": torch.tensor([9999, 0], dtype=torch.int64)})
    ),
    "missing numpy rng": _tensors(lambda t: t.pop("rng.rank0.numpy_gauss")),
    "model tensor of the wrong shape": _tensors(_reshape("model.")),
    "best tensor of the wrong shape": _tensors(_reshape("best.")),
    "optimizer moment of the wrong shape": _tensors(lambda t: t.update({_first(t, "optim.0.exp_avg"): torch.zeros(2)})),
    "first tensor of the wrong shape": _tensors(_reshape("first.")),
    "first tensor missing": _tensors(lambda t: t.pop(_first(t, "first."))),
    "first tensor NaN": _tensors(lambda t: t[_first(t, "first.")].fill_(float("nan"))),
    "unknown tensor": _tensors(lambda t: t.update({"pickle.payload": torch.zeros(1)})),
    "loss sum of integers": _tensors(lambda t: t.update({"loop.loss_sum": torch.zeros((), dtype=torch.int64)})),
    "state link to another file": _relink,
}


@pytest.fixture(scope="module")
def checkpoint_of_two_runs(tmp_path_factory):
    """A checkpoint taken in the second of two runs (so it holds the first's model and record)."""
    tmp = tmp_path_factory.mktemp("tamper")
    with pytest.MonkeyPatch.context() as m:
        checkpointed(tmp, m, "--repeat", "2")
    return tmp


@pytest.mark.parametrize("tampering", list(TAMPERINGS))
def test_a_tampered_checkpoint_is_refused_with_one_line(checkpoint_of_two_runs, tmp_path, tampering):
    shutil.copytree(checkpoint_of_two_runs, tmp_path, dirs_exist_ok=True, symlinks=True)
    out = tmp_path / "out"
    state = out / LAST / os.readlink(out / LAST / "state")
    TAMPERINGS[tampering](state)
    before = tree_sums(tmp_path, skip=out)
    one_line(cli("train", "--resume", out), "resume")
    assert tree_sums(tmp_path, skip=out) == before


def test_the_untampered_checkpoint_of_two_runs_resumes(checkpoint_of_two_runs, tmp_path):
    shutil.copytree(checkpoint_of_two_runs, tmp_path, dirs_exist_ok=True, symlinks=True)
    ok(cli("train", "--resume", tmp_path / "out"))
    assert_complete_run(tmp_path / "out")


# --------------------------------------------------------------------------------------------
# The user's explain/ report survives retraining


@pytest.mark.parametrize("linked", [False, True])
def test_retraining_keeps_the_directory_s_explain_report(tmp_path, linked):
    data = write_npz(tmp_path / "d.npz")
    out = tmp_path / "out"
    ok(cli("train", "--data", data, *TINY, "--out", out))
    if linked:
        report = tmp_path / "reports" / "first"
        report.mkdir(parents=True)
        (out / "explain").symlink_to(report)
    else:
        report = out / "explain"
        report.mkdir()
    (report / "index.html").write_text("<p>my report</p>")
    outside = tree_sums(tmp_path, skip=out)
    ok(cli("train", "--data", data, *TINY, "--seed", "1", "--out", out))
    assert (out / "explain" / "index.html").read_text() == "<p>my report</p>"
    assert (out / "explain").is_symlink() == linked
    assert tree_sums(tmp_path, skip=out) == outside
    load_model(out)


def test_an_explain_report_made_while_training_runs_is_kept(tmp_path):
    data = write_npz(tmp_path / "d.npz")
    out = tmp_path / "out"
    ok(cli("train", "--data", data, *TINY, "--out", out))
    made = threading.Event()
    real_fit = attnfuse.fit.fit_model

    def run_then_explain(*args, **kwargs):  # the user explains the old model while the new one trains
        if not made.is_set():
            (out / "explain").mkdir()
            (out / "explain" / "index.html").write_text("late")
            made.set()
        return real_fit(*args, **kwargs)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(attnfuse.fit, "fit_model", run_then_explain)
        ok(cli("train", "--data", data, *TINY, "--seed", "1", "--out", out))
    assert (out / "explain" / "index.html").read_text() == "late"


def test_load_trained_reads_again_when_the_directory_was_replaced(tmp_path, monkeypatch):
    """evaluate/predict read the data as config.json says, then the model: a run swapped in between
    makes load_trained read everything again (model and data of one run), never a mix."""
    data = write_npz(tmp_path / "d.npz")
    out = tmp_path / "run"
    ok(cli("train", "--data", data, *TINY, "--out", out))
    real = attnfuse.pipeline.load_model
    calls = []

    def swapped_once(model_dir, *args, **kwargs):
        net, config, standardizer = real(model_dir, *args, **kwargs)
        calls.append(1)
        if len(calls) == 1:  # the first time: as if another run had been swapped in meanwhile
            config = {**config, "weights_id": "0" * 16}
        return net, config, standardizer

    monkeypatch.setattr(attnfuse.pipeline, "load_model", swapped_once)
    _, config, _, _ = attnfuse.pipeline.load_trained(out)
    assert len(calls) == 2 and config["weights_id"] == read_config(out)["weights_id"]
    monkeypatch.setattr(attnfuse.pipeline, "load_model", lambda d, *a, **k: (None, {"weights_id": "x"}, None))
    with pytest.raises(ValueError, match="replaced by other runs"):
        attnfuse.pipeline.load_trained(out)
