"""Hostile and broken inputs, table-driven: damaged model directories (config.json and weights),
outputs that cannot be written, a diverging run, and every kind of exception at the CLI's
boundary. Each case asserts the exit code, one line on stderr without a traceback, and that
nothing was written. Also: the modes files get, strict JSON, divergence with a finite epoch to keep.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import signal
import stat
import struct
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from attnfuse import checkpoint, training
from attnfuse.checkpoint import CONFIG, METRICS, WEIGHTS, weights_id
from attnfuse.cli import common
from attnfuse.data import Batch, MultimodalDataset
from attnfuse.training import DivergedError, TrainConfig
from clikit import (
    RUN_FILES,
    TINY,
    assert_complete_run,
    assert_one_line,
    cli,
    entries,
    ok,
    process_umask,
    snapshot,
    strict_loads,
    write_npz,
)
from trainkit import train_one

SELF = ["--fusion", "self", "--epochs", "1", "--d-model", "8", "--heads", "2", "--layers", "1", "--batch-size", "32"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bad")
    data = write_npz(root / "toy.npz")
    model, other = root / "model", root / "other"
    ok(cli("train", "--data", data, *SELF, "--seed", "0", "--out", model))
    ok(cli("train", "--data", data, *SELF, "--seed", "1", "--out", other))  # same shapes, other weights
    return {"root": root, "data": data, "model": model, "other": other}


# ---------------------------------------------------------------------------------------------
# Damaged model directories: each case edits a copy of a good one


def edit_config(change: Callable[[dict], None]) -> Callable[[Path, dict], None]:
    def apply(model: Path, trained: dict) -> None:
        config = json.loads((model / CONFIG).read_text())
        change(config)
        (model / CONFIG).write_text(json.dumps(config))

    return apply


def raw_config(text: str) -> Callable[[Path, dict], None]:
    return lambda model, trained: (model / CONFIG).write_text(text)


def modality(key: str, value, where: tuple[str, ...] = ("data", "model")) -> Callable[[dict], None]:
    def change(config: dict) -> None:
        for part in where:
            config[part]["modalities"][1][key] = value  # "b", the sequence modality

    return change


def edit_weights(change: Callable[[dict], None], rehash: bool = False) -> Callable[[Path, dict], None]:
    """Change the tensors; ``rehash``: record their new hash in config.json (as a run that saved
    such weights would have), so that the check under test is the one that fires."""

    def apply(model: Path, trained: dict) -> None:
        state = load_file(model / WEIGHTS)
        change(state)
        save_file(state, model / WEIGHTS)
        if rehash:
            edit_config(lambda c: c.update(weights_id=weights_id(state)))(model, trained)

    return apply


def poison(value: float) -> Callable[[dict], None]:
    def change(state: dict) -> None:
        name = sorted(state)[0]
        state[name] = state[name].clone().flatten().index_fill(0, torch.tensor([0]), value).view_as(state[name])

    return change


def first(state: dict) -> str:
    return sorted(state)[0]


def hostile_header(model: Path, trained: dict) -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [10**12], "data_offsets": [0, 4 * 10**12]}}).encode()
    (model / WEIGHTS).write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)


def deep(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


BAD_MODELS: dict[str, tuple[Callable[[Path, dict], None], list[str]]] = {
    # config.json: JSON itself
    "not-json": (raw_config("{not json"), ["config.json is not valid JSON"]),
    "nan-literal": (raw_config('{"fusion": NaN}'), ["not valid JSON", "NaN is not a JSON number"]),
    "deeply-nested": (raw_config(deep(10_000)), ["nested too deeply"]),
    "top-level-list": (raw_config("[]"), ["top level: expected an object, got list"]),
    "too-big": (raw_config(" " * 2000 + "{}"), ["is 2,002 bytes; a config.json is at most 1,000"]),
    # config.json: the schema
    "data-empty": (edit_config(lambda c: c.update(data={})), [r"data\.task: missing"]),
    "train-list": (edit_config(lambda c: c.update(train=[])), [r"train: expected an object, got \[\]"]),
    "no-fusion": (edit_config(lambda c: c.pop("fusion")), ["fusion: missing"]),
    "unknown-fusion": (edit_config(lambda c: c.update(fusion="gpt")), ["model: fusion: expected one of"]),
    "split-seed-string": (edit_config(lambda c: c["split"].update(seed="0")), ["split.seed: expected int"]),
    "task-unknown": (edit_config(lambda c: c["data"].update(task="ranking")), [r"data\.task: expected"]),
    "modality-dim-negative": (
        edit_config(modality("dim", -4)),
        [r"data\.modalities\[1\]\.dim: expected an integer >= 1, got -4"],
    ),
    "modality-dim-float": (edit_config(modality("dim", 2.5)), [r"modalities\[1\]\.dim: expected int, got 2.5"]),
    "modality-not-object": (edit_config(lambda c: c["data"].update(modalities=[1])), [r"modalities\[0\]"]),
    "modalities-differ": (edit_config(modality("dim", 3, ("model",))), [r"model\.modalities: differ"]),
    "vector-with-length": (edit_config(modality("is_sequence", False)), ["a vector modality has length 1"]),
    "num-classes-differ": (
        edit_config(lambda c: c["data"].update(num_classes=5)),
        [r"model\.out_dim: expected 5 \(from data\), got 3"],
    ),
    "nhead-zero": (edit_config(lambda c: c["model"].update(nhead=0)), ["model: nhead"]),
    "dropout-too-big": (edit_config(lambda c: c["model"].update(dropout=2.0)), ["model: dropout"]),
    "unknown-model-setting": (edit_config(lambda c: c["model"].update(wings=2)), ["wings"]),
    "standardizer-short": (
        edit_config(lambda c: c["standardizer"]["a"].update(mean=[0.0], std=[1.0])),
        ["standardizer: expected statistics of"],
    ),
    "standardizer-zero-std": (
        edit_config(lambda c: c["standardizer"]["a"].update(std=[0.0] * 4)),
        ["standardizer", "positive stds"],
    ),
    "train-unknown-setting": (edit_config(lambda c: c["train"].update(wings=1)), ["train: unknown setting 'wings'"]),
    "train-negative-lr": (edit_config(lambda c: c["train"].update(lr=-1.0)), ["train: lr"]),
    # config.json: the size of the model it describes, refused before anything is allocated
    "d-model-1e6": (edit_config(lambda c: c["model"].update(d_model=10**6)), ["at least", "d_model=1000000"]),
    "num-layers-1e6": (edit_config(lambda c: c["model"].update(num_layers=10**6)), ["num_layers=1000000"]),
    "sequence-length-1e9": (
        edit_config(modality("length", 10**9)),
        ["needs at least", "sequence length 1000000000", "8.0 GiB of memory is available"],
    ),
    # the weights
    "weights-absent": (lambda m, t: (m / WEIGHTS).unlink(), ["not a model directory", "no model.safetensors"]),
    "weights-truncated": (
        lambda m, t: (m / WEIGHTS).write_bytes((m / WEIGHTS).read_bytes()[:100]),
        ["not a readable safetensors file"],
    ),
    "weights-hostile-header": (hostile_header, ["not a readable safetensors file"]),
    "weights-integer": (
        edit_weights(lambda s: s.update({first(s): s[first(s)].to(torch.int64)})),
        ["expected floating-point weights", "I64"],
    ),
    "weights-nan": (edit_weights(poison(math.nan), rehash=True), ["hold NaN/inf", "diverged"]),
    "weights-inf": (edit_weights(poison(math.inf), rehash=True), ["hold NaN/inf"]),
    "weights-missing-tensor": (
        edit_weights(lambda s: s.pop(first(s))),
        ["does not hold this model's weights", "missing"],
    ),
    "weights-extra-tensor": (edit_weights(lambda s: s.update(extra=torch.zeros(2))), ["unexpected extra"]),
    "weights-wrong-shape": (
        edit_weights(lambda s: s.update({first(s): torch.zeros(7)})),
        ["does not hold this model's weights", "shape"],
    ),
    "weights-of-another-run": (
        lambda m, t: shutil.copyfile(t["other"] / WEIGHTS, m / WEIGHTS),
        ["holds other weights than the ones config.json was written with", "mixes two runs"],
    ),
}


@pytest.mark.parametrize("command", ["evaluate", "predict"])
@pytest.mark.parametrize("case", list(BAD_MODELS))
def test_a_damaged_model_directory_is_one_line(trained, tmp_path, monkeypatch, command, case):
    damage, needles = BAD_MODELS[case]
    monkeypatch.setattr(checkpoint, "MAX_CONFIG_BYTES", 1000 if case == "too-big" else checkpoint.MAX_CONFIG_BYTES)
    monkeypatch.setattr(checkpoint, "_available_memory", lambda: 8 << 30)  # the same answer on every machine
    model = tmp_path / "model"
    shutil.copytree(trained["model"], model)
    damage(model, trained)
    before = snapshot(model)
    out = tmp_path / "out" / ("pred.csv" if command == "predict" else "eval.json")
    args = ["--model", model, "--data", trained["data"]]
    result = cli(command, *args, *(["--out", out] if command == "predict" else []))  # evaluate: into the model
    assert_one_line(result, 2, *needles)
    assert snapshot(model) == before and not out.parent.exists()  # nothing written


def test_the_undamaged_copy_loads(trained, tmp_path):
    """The cases above start from a directory that is fine."""
    model = tmp_path / "model"
    shutil.copytree(trained["model"], model)
    ok(cli("evaluate", "--model", model, "--data", trained["data"], "--out", tmp_path / "eval.json"))


# ---------------------------------------------------------------------------------------------
# train: outputs that cannot be written are found before training; a diverging run saves nothing


def file_in_the_way(tmp: Path) -> Path:
    (tmp / "file").write_text("keep")
    return tmp / "file" / "run"


def out_is_a_file(tmp: Path) -> Path:
    (tmp / "run").write_text("keep")
    return tmp / "run"


def foreign_files(tmp: Path) -> Path:
    (tmp / "run").mkdir()
    (tmp / "run" / "thesis.tex").write_text("keep")
    (tmp / "run" / CONFIG).write_text("{}")
    return tmp / "run"


BAD_TRAIN: dict[str, tuple[Callable[[Path], Path], list[str], list[str]]] = {
    "diverges-at-once": (
        lambda t: t / "run",
        [*SELF, "--lr", "1e12"],
        ["training diverged at epoch 1", r"--lr, now 1e\+12"],
    ),
    "parent-is-a-file": (file_in_the_way, [], ["not a directory", "file"]),
    "out-is-a-file": (out_is_a_file, [], ["exists and is not a directory"]),
    "foreign-files-in-out": (foreign_files, [], ["not part of an attnfuse run", "thesis.tex"]),
}


@pytest.mark.parametrize("case", list(BAD_TRAIN))
def test_bad_train_output_is_one_line_and_writes_nothing(trained, tmp_path, case):
    make, args, needles = BAD_TRAIN[case]
    out = make(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert_one_line(cli("train", "--data", trained["data"], *TINY, *args, "--out", out), 2, *needles)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing written or lost


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--d-model", "1000000"], ["needs at least", "d_model=1000000"]),
        (["--num-layers", "1000000"], ["needs at least", "num_layers=1000000"]),
    ],
)
def test_a_model_too_big_for_the_memory_is_refused_before_training(trained, tmp_path, monkeypatch, args, needles):
    """Building it would not fail: layer after layer would allocate until the machine swaps."""
    monkeypatch.setattr(checkpoint, "_available_memory", lambda: 8 << 30)
    monkeypatch.setattr(training, "build_model", lambda *a: pytest.fail("built the model"))
    out = tmp_path / "run"
    base = ["--fusion", "self", "--heads", "2", "--epochs", "1"]
    assert_one_line(cli("train", "--data", trained["data"], *base, *args, "--out", out), 2, *needles)
    assert entries(tmp_path) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_train_into_a_read_only_directory_fails_before_training(trained, tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    monkeypatch.setattr(training, "fit", lambda *a, **k: pytest.fail("trained before checking --out"))
    try:
        assert_one_line(cli("train", "--data", trained["data"], *TINY, "--out", ro / "run"), 2, "permission denied")
    finally:
        ro.chmod(0o755)
    assert entries(ro) == []


def test_train_checks_the_output_before_loading_data(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr("attnfuse.pipeline.load", lambda *a, **k: pytest.fail("data loaded before checking --out"))
    assert_one_line(cli("train", "--data", "mfeat", *TINY, "--out", tmp_path / "file" / "run"), 2, "not a directory")


def test_deeply_nested_options_file_is_one_line(tmp_path):
    config = tmp_path / "deep.yaml"
    config.write_text("[" * 10_000 + "]" * 10_000)
    assert_one_line(cli("train", "--config", config, "--out", tmp_path / "run"), 2, "nested too deeply")
    assert entries(tmp_path) == ["deep.yaml"]


# ---------------------------------------------------------------------------------------------
# evaluate on a model directory it cannot write into


def test_evaluate_shows_the_metrics_when_it_cannot_write_them(trained, tmp_path, monkeypatch):
    model = tmp_path / "model"
    shutil.copytree(trained["model"], model)

    def read_only(path):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(model))

    monkeypatch.setattr("attnfuse.cli.predict.check_writable", read_only)
    result = cli("evaluate", "--model", model, "--data", trained["data"])
    assert "accuracy" in result.stdout and "test" in result.stdout  # the table, before the error
    assert_one_line(result, 2, "the metrics above could not be written", f"permission denied: {model}", "--out FILE")
    assert entries(model) == RUN_FILES


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_evaluate_on_a_really_read_only_model_directory(trained, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(trained["model"], model)
    model.chmod(0o555)
    try:
        result = cli("evaluate", "--model", model, "--data", trained["data"])
        assert "accuracy" in result.stdout
        assert_one_line(result, 2, "could not be written", "permission denied")
        ok(cli("evaluate", "--model", model, "--data", trained["data"], "--out", tmp_path / "eval.json"))
    finally:
        model.chmod(0o755)


def test_predict_checks_its_output_before_the_work(trained, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr("attnfuse.cli.predict.load_for_model", lambda *a: pytest.fail("worked before checking --out"))
    result = cli(
        "predict", "--model", trained["model"], "--data", trained["data"], "--out", tmp_path / "file" / "p.csv"
    )
    assert_one_line(result, 2, "not a directory")


# ---------------------------------------------------------------------------------------------
# The boundary: every exception is one line and an exit code


class Boom(Exception):
    pass


BOUNDARY: dict[str, tuple[BaseException, int, list[str]]] = {
    "value-error": (ValueError("data: bad"), 2, ["^error: data: bad$"]),
    "type-error": (TypeError("x: expected int"), 2, ["x: expected int"]),
    "no-space": (
        OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/srv/run/w"),
        2,
        ["no space left on device: /srv/run/w$"],
    ),
    "permission": (PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/srv"), 2, ["permission denied: /srv$"]),
    "file-not-found": (
        FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), "d.npz"),
        2,
        ["no such file or directory: d.npz"],
    ),
    "memory-error": (MemoryError(), 2, ["out of memory: try a smaller --batch-size"]),
    "torch-cpu-allocation": (
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
            "allocate 40000000000000 bytes. Error code 12 (Cannot allocate memory)"
        ),
        2,
        [r"out of memory \(tried to allocate 40000000000000 bytes\)"],
    ),
    "ctrl-c": (KeyboardInterrupt(), 130, ["^error: interrupted \\(Ctrl-C\\)$"]),
    "sigterm": (common.Terminated(), 143, ["^error: terminated \\(SIGTERM\\)$"]),
    "internal": (Boom("unexpected"), 1, ["internal error in `attnfuse train`: Boom: unexpected", "please report it"]),
}


@pytest.mark.parametrize("case", list(BOUNDARY))
def test_every_exception_is_one_line_with_its_exit_code(tmp_path, monkeypatch, case):
    error, code, needles = BOUNDARY[case]

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(sys.modules["attnfuse.cli.train"], "train_run", fail)
    err = assert_one_line(cli("train", "--out", tmp_path / "run"), code, *needles)
    if case == "internal":  # the traceback went to the file the line names
        saved = Path(err.split("traceback in ")[1].split(";")[0])
        try:
            assert "Boom: unexpected" in saved.read_text() and "Traceback" in saved.read_text()
        finally:
            saved.unlink()
    assert entries(tmp_path) == []


def test_debug_prints_the_traceback(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise Boom("unexpected")

    monkeypatch.setattr(sys.modules["attnfuse.cli.train"], "train_run", fail)
    result = cli("--debug", "train", "--out", tmp_path / "run")
    assert result.exit_code == 1
    assert "Traceback" in result.stderr and "Boom" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    ok(cli("datasets"))
    assert common.debug is False  # the flag holds for the invocation that gave it


def test_sigterm_handler_is_restored_after_a_command():
    before = signal.getsignal(signal.SIGTERM)
    ok(cli("datasets"))
    assert signal.getsignal(signal.SIGTERM) is before


# ---------------------------------------------------------------------------------------------
# Modes and strict JSON


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_every_output_gets_the_umask_mode(trained, tmp_path, mask):
    out = tmp_path / "run"
    with process_umask(mask):
        ok(cli("train", "--data", trained["data"], *TINY, "--out", out))
        ok(cli("evaluate", "--model", out, "--data", trained["data"]))
        ok(cli("predict", "--model", out, "--data", trained["data"], "--out", tmp_path / "p.csv"))
    written = [*out.iterdir(), tmp_path / "p.csv"]
    assert len(written) == 7  # model, config, metrics, run.yaml, log.csv, evaluation.json; p.csv
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path.name  # 0644 under umask 022
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask


def test_undefined_metrics_are_null_in_strict_json(tmp_path):
    """Sentiment acc2 and f1 are undefined when every target is 0: null in metrics.json and
    evaluation.json, "n/a" in the table; never a bare NaN."""
    data = write_npz(tmp_path / "zeros.npz", y=torch.zeros(60).numpy())
    out = tmp_path / "run"
    result = cli("train", "--data", data, *TINY, "--task", "regression", "--metrics", "sentiment", "--out", out)
    ok(result)
    assert "n/a" in result.stdout
    metrics = strict_loads((out / METRICS).read_text())
    assert metrics["test"]["acc2"] is None and metrics["test"]["f1"] is None and metrics["test"]["mae"] >= 0
    ok(cli("evaluate", "--model", out, "--data", data))
    assert strict_loads((out / "evaluation.json").read_text())["all"]["acc2"] is None
    strict_loads((out / CONFIG).read_text())


# ---------------------------------------------------------------------------------------------
# Divergence after a finite epoch: the best finite weights are kept, saved, and it is said


def test_divergence_keeps_the_best_finite_epoch(trained, tmp_path, monkeypatch):
    real = training.Trainer._train_step

    class Poisoned:
        """The training rows with NaN features: what a diverging model produces from epoch 2 on."""

        def __init__(self, source):
            self.source = source

        def select(self, index):
            b = self.source.select(index)
            return Batch({k: v * math.nan for k, v in b.x.items()}, b.mask, b.y)

    def nan_from_epoch_2(self, train, index):
        return real(self, Poisoned(train) if self.epoch >= 1 else train, index)

    monkeypatch.setattr(training.Trainer, "_train_step", nan_from_epoch_2)
    out = tmp_path / "run"
    result = cli("train", "--data", trained["data"], *TINY, "--epochs", "5", "--out", out)
    ok(result)
    said = " ".join(result.stdout.split())
    assert "warning: training diverged at epoch 2, step 1 of 2 (training loss nan)" in said
    assert "lower the learning rate (--lr, now 0.001); the weights of epoch 1" in said
    assert_complete_run(out)  # finite weights (load_model checks), strict JSON
    assert all(v is not None for split in strict_loads((out / METRICS).read_text()).values() for v in split.values())


def test_fit_raises_when_no_epoch_is_finite():
    rng = np.random.default_rng(0)
    y = np.arange(60) % 3
    x = {"a": (rng.normal(size=(60, 4)) + y[:, None]).astype(np.float32), "b": rng.normal(size=(60, 3, 2))}
    data = MultimodalDataset({k: v.astype(np.float32) for k, v in x.items()}, y)
    with pytest.raises(DivergedError, match=r"at epoch 1 .*--lr, now 1e\+12.*nothing is saved"):
        train_one(data, "self", {"d_model": 8, "nhead": 2, "num_layers": 1}, TrainConfig(epochs=3, lr=1e12))
