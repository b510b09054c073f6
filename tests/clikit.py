"""Shared by the tests that run the command line (test_cli, test_faults, test_bad_inputs, ...): the CLI, tiny data and
models, and what a complete run directory is."""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from attnfuse.checkpoint import CONFIG, LOG, METRICS, RUN, WEIGHTS, load_model
from attnfuse.cli import app
from attnfuse.runstate import LAST, load_state

RUN_FILES = sorted([CONFIG, LOG, METRICS, RUN, WEIGHTS])
# A tiny model that trains in a fraction of a second.
TINY = ["--fusion", "concat", "--epochs", "2", "--d-model", "8", "--batch-size", "32"]


def cli(*args: str | Path):
    return CliRunner().invoke(app, [str(a) for a in args])


def ok(result) -> None:
    assert result.exit_code == 0, f"exit {result.exit_code}\nstdout: {result.stdout}\nstderr: {result.stderr}"


def assert_one_line(result, code: int, *needles: str) -> str:
    """Exit ``code``, exactly one line on stderr starting with "error: ", no traceback."""
    assert result.exit_code == code, f"exit {result.exit_code}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    err = result.stderr.strip()
    assert err.startswith("error: "), err
    assert "\n" not in err, f"expected one line, got:\n{err}"
    assert "Traceback" not in result.stdout + result.stderr
    for needle in needles:
        assert re.search(needle, err), f"{needle!r} not in {err!r}"
    return err


@contextlib.contextmanager
def process_umask(mask: int):
    """Run the block under ``mask`` as the process umask (restored afterwards)."""
    before = os.umask(mask)
    try:
        yield
    finally:
        os.umask(before)


def strict_loads(text: str):
    """json.loads refusing NaN/Infinity, which Python's json accepts (they are not JSON)."""

    def refuse(name: str):
        raise AssertionError(f"not strict JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def write_npz(path: Path, n: int = 60, seed: int = 0, **arrays) -> Path:
    """x_a (N, 4) vectors, x_b (N, 3, 2) sequences, 3 integer classes."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    out = {
        "x_a": (rng.normal(size=(n, 4)) + y[:, None]).astype(np.float32),
        "x_b": rng.normal(size=(n, 3, 2)).astype(np.float32),
        "y": y,
        **arrays,
    }
    np.savez(path, **out)
    return path


def snapshot(directory: Path) -> dict[str, bytes]:
    """The files of a run directory (not ``last/``, the checkpoint of a later, unfinished run)."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.name != LAST}


def assert_complete_run(out: Path) -> None:
    """A whole run: its files, config and weights of the same run (load_model checks the weights'
    hash against config.json), strict JSON. A ``last/`` beside them is the checkpoint of a later run
    that failed after it was written (resumable with --resume): it must load."""
    if (out / LAST).exists():
        load_state(out / LAST)
    assert [e for e in entries(out) if e != LAST] == RUN_FILES, entries(out)
    load_model(out)
    strict_loads((out / CONFIG).read_text())
    strict_loads((out / METRICS).read_text())


def assert_evaluate_agrees(out: Path, data: Path, tmp: Path) -> None:
    """``evaluate`` on the training data reproduces metrics.json, split by split."""
    report = tmp / "agree.json"
    ok(cli("evaluate", "--model", out, "--data", data, "--out", report))
    evaluated, recorded = strict_loads(report.read_text()), strict_loads((out / METRICS).read_text())
    for split in ("train", "valid", "test"):
        assert evaluated[split] == pytest.approx(recorded[split], abs=1e-6), split
    report.unlink()
