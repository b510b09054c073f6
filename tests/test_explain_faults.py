"""attnfuse explain against a hostile user: two explanations into one --out, --samples out of the
explained rows, and the walkthrough given NaN, inf or numbers whose products overflow."""

from __future__ import annotations

import importlib
import json
import os

import numpy as np
import pytest

from attnfuse.explain import parse_vectors, walkthrough
from attnfuse.files import BusyError, lock
from clikit import TINY, assert_one_line, cli, entries, ok, write_npz

explain_command = importlib.import_module("attnfuse.cli.explain")  # (attnfuse.cli.explain is the function)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("explainfaults")
    data = write_npz(root / "d.npz")
    out = root / "m"
    ok(cli("train", "--data", data, *TINY, "--no-baselines", "--out", out))
    return out


def _explain(model, *args):
    return cli("explain", "--model", model, "--method", "mask", *args)


def test_a_second_explain_into_a_locked_out_is_refused_at_once(model, tmp_path):
    out = tmp_path / "x"
    with lock(out):  # as a first explain holds it while it works
        result = _explain(model, "--out", out)
    assert_one_line(result, 2, f"{out}: process {os.getpid()} is writing it")
    assert entries(tmp_path) == []


def test_out_is_locked_while_the_explanation_is_computed(model, tmp_path, monkeypatch):
    out, refused = tmp_path / "x", []
    real = explain_command.explain_model

    def explain_model(*args, **kwargs):  # a second explain starting now is refused
        try:
            with lock(os.path.realpath(out)):
                refused.append(False)
        except BusyError as e:
            refused.append(str(e))
        return real(*args, **kwargs)

    monkeypatch.setattr(explain_command, "explain_model", explain_model)
    ok(_explain(model, "--out", out))
    assert refused and "is writing it" in refused[0]
    assert (out / "report.html").is_file() and not (tmp_path / ".x.lock").exists()


def test_samples_are_positions_among_the_explained_rows(model, tmp_path):
    out = tmp_path / "x"
    ok(_explain(model, "--max-rows", "9", "--samples", "8,0", "--out", out))
    summary = json.loads((out / "explanation.json").read_text())
    assert summary["rows"] == 9 and len(summary["samples"]) == 2
    # Position 9 of 9 explained rows is past the end, even though the data has a row 9.
    result = _explain(model, "--max-rows", "9", "--samples", "9", "--out", tmp_path / "y")
    assert_one_line(result, 2, r"^error: samples: expected positions in 0\.\.8 \(the 9 test rows explained\), got 9$")
    assert not (tmp_path / "y").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--query", "nan,1", "--keys", "1,2"], "--query: expected finite numbers, got nan in 'nan,1'"),
        (["--query", "1,2", "--keys", "1,inf;0,1"], "--keys: expected finite numbers, got inf"),
        (["--query", "1,2", "--keys", "1,2", "--values", "-inf,0"], "--values: expected finite numbers, got -inf"),
        (["--self", "NaN,0;0,1"], "--self: expected finite numbers, got nan"),
        (["--query", "1e200,1", "--keys", "1e200,1"], "keys: the dot products q·k overflow float64"),
    ],
)
def test_walkthrough_refuses_numbers_that_are_not_finite(args, message):
    assert_one_line(cli("explain", *args), 2, message)


def test_walkthrough_function_refuses_non_finite_arrays():
    with pytest.raises(ValueError, match="query: expected finite numbers, got nan"):
        walkthrough(np.array([[np.nan, 1.0]]), np.array([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="values: expected finite numbers, got inf"):
        walkthrough(np.array([[0.0, 1.0]]), np.array([[1.0, 2.0]]), np.array([[np.inf]]))
    w = walkthrough(parse_vectors("1e150,0", "--query"), parse_vectors("1e150,0", "--keys"), scale=False)
    assert np.isfinite(w.scores).all() and w.weights.sum() == pytest.approx(1.0)  # large but finite: fine
