"""Output a person can read: every table at 80 columns with no cell cut, a progress bar that keeps
its epoch count and time, plain epoch lines without a terminal, and output directories that are
never replaced without a word."""

from __future__ import annotations

import importlib
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
from rich.console import Console
from rich.table import Table

from attnfuse.cli.common import Fitted, _FittingConsole, fit_table, metrics_table
from clikit import cli, ok, write_npz

# The command modules (attnfuse.cli's own names train, predict, ... are the command functions).
COMMANDS = [
    importlib.import_module(f"attnfuse.cli.{m}") for m in ("common", "train", "predict", "tune", "explain", "data")
]
train = importlib.import_module("attnfuse.cli.train")

QUICK = ["--epochs", "2", "--d-model", "8", "--batch-size", "32"]


@pytest.fixture
def screen(monkeypatch):
    """Every command prints to one 80-column console (not a terminal); returns its text so far."""
    console = _FittingConsole(width=80, file=io.StringIO(), force_terminal=False, color_system=None)
    for module in COMMANDS:
        monkeypatch.setattr(module, "console", console)
    return lambda: console.file.getvalue()


def assert_fits(text: str, width: int = 80) -> None:
    assert "…" not in text, text
    too_wide = [line for line in text.splitlines() if len(line) > width]
    assert not too_wide, "\n".join(too_wide)


def render(table: Table, width: int = 80) -> str:
    console = Console(width=width, file=io.StringIO(), force_terminal=False, color_system=None)
    console.print(Fitted(table))
    return console.file.getvalue()


def sentiment_rows(summary: bool) -> dict:
    metrics = dict.fromkeys(
        ("mae", "rmse", "r2", "corr", "acc2", "acc2_has0", "f1", "f1_has0", "acc7", "acc5"), 0.123456
    )
    if summary:
        metrics = {n: {"mean": v, "std": 0.0123} for n, v in metrics.items()}
    parts = ("train", "valid", "test", "ridge (baseline) valid", "ridge (baseline) test", "hist_gb (baseline) test")
    return dict.fromkeys(parts, metrics)


# ---------------------------------------------------------------------------------------------
# Tables


@pytest.mark.parametrize("summary", [False, True])
def test_the_sentimentmetrics_table_fits_80_columns_in_parts_with_every_value(summary):
    rows = sentiment_rows(summary)
    text = render(metrics_table("self on mosi: mean ± std over 5 runs", rows))
    assert_fits(text)
    value = "0.1235 ± 0.0123" if summary else "0.1235"
    assert text.count(value) == 10 * len(rows)  # every cell of every metric, whole
    for name in ("acc2_has0", "f1_has0", "acc5", "hist_gb (baseline) test"):
        assert name in text
    assert "(continued)" in text


def test_a_table_that_fits_is_printed_as_it_is():
    table = metrics_table("concat on x", {"train": {"accuracy": 0.5}, "test": {"accuracy": 0.25}})
    console = Console(width=80, file=io.StringIO())
    assert fit_table(table, console, 80) == [table]


def test_a_word_wider_than_the_screen_is_folded_not_cut():
    table = Table(title="paths")
    table.add_column("name")
    table.add_column("path")
    table.add_row("a", "/very/long/" + "x" * 120 + "/file.csv")
    text = render(table)
    assert_fits(text)
    assert "x" * 60 in text.replace("│", "").replace(" ", "").replace("\n", "")


def test_train_and_evaluate_print_within_80_columns(tmp_path, screen):
    """--fusion auto (the candidates table), --metrics sentiment (ten metrics), baselines: nothing cut."""
    rng = np.random.default_rng(0)
    y = rng.uniform(-3, 3, size=90).astype(np.float32)
    npz = tmp_path / "scores.npz"
    np.savez(
        npz, x_text=(rng.normal(size=(90, 4)) + y[:, None]).astype(np.float32), x_audio=rng.normal(size=(90, 3, 2)), y=y
    )
    out = tmp_path / "run"
    ok(cli("train", "--data", npz, "--metrics", "sentiment", *QUICK, "--out", out))
    trained = screen()
    assert "--fusion auto: candidates" in trained and "acc2_has0" in trained and "ridge (baseline) valid" in trained
    ok(cli("evaluate", "--model", out))
    evaluated = screen()[len(trained) :]
    assert "acc5" in evaluated
    assert_fits(screen())


def test_tune_prints_within_80_columns(tmp_path, screen):
    out = tmp_path / "tuned"
    ok(cli("tune", "--data", write_npz(tmp_path / "d.npz"), "--trials", "2", *QUICK, "--out", out))
    assert "best trials of 2" in screen()
    assert_fits(screen())


def test_explain_prints_within_80_columns(tmp_path, screen):
    out = tmp_path / "run"
    ok(cli("train", "--data", write_npz(tmp_path / "d.npz"), "--fusion", "self", *QUICK, "--out", out))
    ok(cli("explain", "--model", out, "--steps", "4", "--max-rows", "8"))
    ok(cli("explain", "--query", "1,2,3,4,5", "--keys", "2,3,1,0,7;1,0,2,2,2;5,5,5,5,5;1,1,1,1,1", "--no-scale"))
    assert "per modality" in screen() and "score → weight" in screen()
    assert_fits(screen())


# ---------------------------------------------------------------------------------------------
# Progress


def test_the_progress_bar_keeps_its_epoch_count_and_time_at_80_columns():
    console = Console(width=80, file=io.StringIO(), force_terminal=True, color_system=None)
    progress = train._progress_bars(console, enabled=True)
    label = "run 12/20 seed 11 self-modality member 3/5"
    task = progress.add_task(label, total=100, status="")
    progress.update(task, completed=37, status=train._epoch_status(
        {"train_loss": 0.61234, "valid_loss": 0.7, "valid_f1_macro": 0.81234, "best_epoch": 35}
    ))  # fmt: skip
    console.print(progress.make_tasks_table(progress.tasks))
    line = console.file.getvalue()
    assert "37/100" in line and "0:00:00" in line and label in line
    assert max(len(row) for row in line.splitlines()) <= 80


def test_without_a_terminal_a_run_prints_plain_epoch_lines(tmp_path):
    out = tmp_path / "run"
    result = cli("train", "--data", write_npz(tmp_path / "d.npz"), "--fusion", "concat", *QUICK, "--out", out)
    ok(result)
    assert "concat epoch 1/2: loss " in result.stdout
    assert "concat done: 2 epochs" in result.stdout
    assert not [line for line in result.stdout.splitlines() if line.startswith("concat") and "━" in line]  # no bar


def test_epoch_lines_come_at_most_every_interval(monkeypatch, screen):
    now = [0.0]
    monkeypatch.setattr(train.time, "monotonic", lambda: now[0])
    lines = train._EpochLines(enabled=True, every=10.0)
    lines.start("m", "self", 100)
    for epoch in range(1, 31):
        now[0] = epoch * 1.5  # an epoch every 1.5 s: a line at epoch 1, then every 7 epochs (10.5 s)
        lines.epoch("m", epoch, "loss 1.0")
    lines.end("m", 30, 12)
    printed = [line for line in screen().splitlines() if line]
    assert [line.split(":")[0] for line in printed[:-1]] == [f"self epoch {e}/100" for e in (1, 8, 15, 22, 29)]
    assert printed[-1].startswith("self done: 30 epochs (stopped early of 100), best epoch 12")


# ---------------------------------------------------------------------------------------------
# Output directories


def test_a_default_output_directory_never_replaces_a_run(tmp_path, monkeypatch):
    """table.csv and then table.parquet both default to runs/table-concat: the second is written to
    runs/table-concat-2 and says so."""
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    table = pa.table({"a_0": rng.normal(size=40), "b_0": rng.normal(size=40), "y": np.arange(40) % 2})
    pa_csv.write_csv(table, "table.csv")
    pq.write_table(table, "table.parquet")
    first = cli("train", "--data", "table.csv", "--fusion", "concat", *QUICK)
    ok(first)
    config = (tmp_path / "runs" / "table-concat" / "config.json").read_text()
    second = cli("train", "--data", "table.parquet", "--fusion", "concat", *QUICK)
    ok(second)
    assert "note: runs/table-concat holds another run: this one is written to runs/table-concat-2" in second.stdout
    assert (tmp_path / "runs" / "table-concat" / "config.json").read_text() == config  # untouched
    assert json.loads((tmp_path / "runs" / "table-concat-2" / "config.json").read_text())["data"]["source"].endswith(
        "table.parquet"
    )
    ok(cli("train", "--data", "table.csv", "--fusion", "concat", *QUICK))
    assert (tmp_path / "runs" / "table-concat-3").is_dir()


def test_an_empty_default_output_directory_is_used(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_npz(tmp_path / "d.npz")
    (tmp_path / "runs" / "d-concat").mkdir(parents=True)
    result = cli("train", "--data", "d.npz", "--fusion", "concat", *QUICK)
    ok(result)
    assert "note:" not in result.stdout.split("fusion=concat")[1].split("epoch")[0]
    assert (tmp_path / "runs" / "d-concat" / "config.json").exists()


def test_an_explicit_out_that_replaces_a_run_says_so_in_one_line(tmp_path):
    data, out = write_npz(tmp_path / "d.npz"), tmp_path / "run"
    first = cli("train", "--data", data, "--fusion", "concat", *QUICK, "--out", out)
    ok(first)
    assert "holds a run" not in first.stdout
    second = cli("train", "--data", data, "--fusion", "concat", *QUICK, "--out", out)
    ok(second)
    notes = [line for line in second.stdout.splitlines() if "holds a run" in line]
    assert notes == [f"note: --out {out} holds a run; this one replaces it when it finishes"]


def test_an_explicit_out_holding_an_interrupted_run_names_resume(tmp_path):
    data, out = write_npz(tmp_path / "d.npz"), tmp_path / "run"
    (out / "last").mkdir(parents=True)
    result = cli("train", "--data", data, "--fusion", "concat", *QUICK, "--out", out)
    ok(result)
    assert f"attnfuse train --resume {out} would continue it instead" in " ".join(result.stdout.split())
