"""``attnfuse train``: its options are generated from the dataclasses that hold them (the run's,
every fusion config's, the training config's); the work is :func:`attnfuse.pipeline.train`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..baselines import verdict_line
from ..data import MultimodalDataset
from ..options import Option
from ..pipeline import RunOptions, TrainResult, TrainSpec, read_options, train_options
from ..pipeline import train as train_run
from ..training import TrainConfig
from .common import _metrics_table, console
from .options import given, with_options


def _panel(opt: Option) -> str:
    if opt.owner is RunOptions:
        return "Data and run"
    return "Training" if opt.owner is TrainConfig else "Model (settings a fusion lacks are errors)"


@with_options(train_options(), _panel)
def train(
    ctx: typer.Context,
    config: Path | None = typer.Option(
        None,
        help="Read options from a YAML or JSON file (e.g. a run's run.yaml); options given here win.",
        rich_help_panel="Data and run",
    ),
    out: Path | None = typer.Option(
        None, help="Output directory (default runs/<data>-<fusion>).", rich_help_panel="Data and run"
    ),
    **values: Any,
) -> None:
    """Train a fusion model; write model.safetensors, config.json, metrics.json and run.yaml."""
    options = {**(read_options(config) if config else {}), **given(ctx, values)}
    spec = TrainSpec.from_options(options, where=str(config) if config else "options")
    out = out or Path("runs") / f"{Path(spec.run.data).stem}-{spec.run.fusion}"

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        bars: dict[tuple[int, str], Any] = {}

        def on_progress(event: str, info: dict) -> None:
            if event == "data":
                console.print(_headline(info["data"], spec.run.fusion), highlight=False)
            elif event == "run":
                label = f"run {info['index'] + 1}/{spec.run.repeat} seed {info['seed']} {info['candidate']}"
                bars[info["index"], info["candidate"]] = progress.add_task(
                    escape(label), total=info["epochs"], status=""
                )
            elif event == "epoch":
                metric = next(k for k in info if k.startswith("valid_") and k != "valid_loss")
                member = f"member {info['member'] + 1}/{spec.train.ensemble}  " if spec.train.ensemble > 1 else ""
                status = (
                    f"{member}loss {info['train_loss']:.4f}  {metric} {info[metric]:.4f}  best@{info['best_epoch']}"
                )
                progress.update(bars[info["index"], info["candidate"]], completed=info["epoch"], status=status)
            elif event == "run_end":  # stopped early: the bar ends where training did
                bar = bars[info["index"], info["candidate"]]
                progress.update(bar, total=info["epochs"], completed=info["epochs"])

        result = train_run(spec, out, on_progress)

    print_result(result, spec.run.repeat)
    console.print(f"model, config, metrics and run.yaml written to [bold]{escape(str(out))}[/]", highlight=False)


def print_result(result: TrainResult, repeat: int) -> None:
    """The candidates of --fusion auto, the metrics table with the baselines' rows, and one
    warning line when a baseline beats the fusion on the validation split."""
    data, report = result.data, result.report
    if result.selection is not None:
        console.print(_candidates_table(result), highlight=False)
        saved = " (the saved model: the first run's)" if repeat > 1 else ""
        picked, reason = escape(result.selection["picked"]), escape(result.selection["reason"])
        console.print(f"auto: picked [bold]{picked}[/]{saved}: {reason}")
    rows = dict(report["summary"] if repeat > 1 else {s: report[s] for s in ("train", "valid", "test")})
    for name, splits in report.get("baselines", {}).items():
        rows.update({f"{name} (baseline) {s}": splits[s] for s in ("valid", "test")})
    fusion = result.first.fusion if result.selection is None else result.selection["picked"]
    if repeat == 1:
        title = f"{fusion} on {data.name} (best epoch {result.first.best_epoch})"
    elif result.selection is not None:
        title = f"auto on {data.name}: mean ± std over {repeat} runs (each run's picked model)"
    else:
        title = f"{fusion} on {data.name}: mean ± std over {repeat} runs"
    console.print(_metrics_table(title, rows))
    if "baselines" in report:
        spent = ", ".join(f"{n} {s:.1f} s" for n, s in result.seconds.items() if not n.startswith("fusion"))
        console.print(f"baselines fitted in {spent} (fusion training {result.seconds['fusion']:.1f} s)")
    if result.verdict is not None:
        console.print(f"[bold yellow]warning:[/] {escape(verdict_line(result.verdict, fusion))}", highlight=False)


def _candidates_table(result: TrainResult) -> Table:
    """One row per candidate: its settings and validation score (mean ± std with --repeat), and
    which run picked it."""
    selection, runs = result.selection, result.runs
    metric = selection["metric"]
    summary = result.report.get("candidates") if len(runs) > 1 else None
    spread = "mean ± std over runs" if summary is not None else "± its standard error"
    table = Table(title=f"--fusion auto: candidates (validation {metric}, {spread})", title_justify="left")
    for column in ("candidate", "fusion", "settings", f"valid {metric}", "picked"):
        table.add_column(column, justify="right" if column.startswith("valid") else "left")
    for name, cand in selection["candidates"].items():
        settings = ", ".join(f"{k}={v}" for k, v in cand["settings"].items() if k in _DISTINCT)
        if summary is not None:
            s = summary[name]["valid"][metric]
            score = f"{s['mean']:.4f} ± {s['std']:.4f}"
            picks = sum(r.get("picked") == name for r in runs)
            picked = f"{picks} of {len(runs)} runs" if picks else ""
        else:
            score = f"{cand['valid']:.4f} ± {cand['valid_se']:.4f}"
            picked = "yes" if name == selection["picked"] else "best score" if name == selection["best"] else ""
        table.add_row(escape(name), cand["fusion"], escape(settings), score, picked)
    for name, why in selection["left_out"].items():
        table.add_row(escape(name), "", escape(f"left out: {why}"), "", "")
    return table


# Settings that tell the candidates apart in the printed table (all are in config.json).
_DISTINCT = ("pooling", "d_model", "num_layers", "nhead")


def _headline(data: MultimodalDataset, fusion: str) -> str:
    mods = ", ".join(f"{m.name}{[m.length, m.dim] if m.is_sequence else [m.dim]}" for m in data.modalities)
    return (
        f"[bold]attnfuse train[/]: {escape(data.name)} ({data.n} samples, {data.task}, modalities "
        f"{escape(mods)}), fusion={escape(fusion)}"
    )
