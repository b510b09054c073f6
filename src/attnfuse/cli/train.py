"""``attnfuse train``: its options are generated from the dataclasses that hold them (the run's,
every fusion config's, the training config's); the work is :func:`attnfuse.pipeline.train`."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..baselines import skipped, verdict_line
from ..data import MultimodalDataset
from ..distributed import is_main_process
from ..options import Option
from ..pipeline import (
    CONSENT_OPTIONS,
    RunOptions,
    TrainResult,
    TrainSpec,
    read_options,
    train_options,
    without_consent,
)
from ..pipeline import train as train_run
from ..runstate import last_dir, read_run_options
from ..training import Interrupted, TrainConfig
from .common import _metrics_table, console, err_console
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
    resume: Path | None = typer.Option(
        None,
        help="Continue the interrupted run in this directory (from DIR/last/), with its own options.",
        rich_help_panel="Data and run",
    ),
    **values: Any,
) -> None:
    """Train a fusion model; write model.safetensors, config.json, metrics.json, run.yaml and log.csv.

    Under torchrun (torchrun --nproc-per-node N -m attnfuse train ...) it trains with
    DistributedDataParallel; --batch-size stays the global batch of one optimiser step."""
    if resume is not None:
        spec, out = _resumed(resume, config, out, given(ctx, values))
    else:
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
        disable=not is_main_process(),
    ) as progress:
        bars: dict[tuple[int, str, int], Any] = {}

        def on_progress(event: str, info: dict) -> None:
            key = (info.get("index", 0), info.get("candidate", ""), info.get("member", 0))
            if event == "data":
                console.print(_headline(info["data"], spec.run.fusion), highlight=False)
            elif event == "run":
                kind = "fold" if spec.run.folds else "run"
                member = f" member {info['member'] + 1}/{info['members']}" if info["members"] > 1 else ""
                label = f"{kind} {info['index'] + 1}/{spec.run.runs} seed {info['seed']} {info['candidate']}{member}"
                bars[key] = progress.add_task(escape(label), total=info["epochs"], status="")
            elif event == "epoch":
                metric = next(k for k in info if k.startswith("valid_") and k != "valid_loss")
                status = f"loss {info['train_loss']:.4f}  {metric} {info[metric]:.4f}  best@{info['best_epoch']}"
                progress.update(bars[key], completed=info["epoch"], status=status)
            elif event == "run_end":  # stopped early: the bar ends where training did
                progress.update(bars[key], total=info["epochs"], completed=info["epochs"])
            elif event == "note":
                progress.console.print(f"note: {escape(info['message'])}", highlight=False)
            elif event == "diverged":
                progress.console.print(
                    f"[bold yellow]warning:[/] {escape(info['message'])}; the weights of epoch {info['best_epoch']} "
                    "(the best before it) are kept",
                    highlight=False,
                )

        try:
            result = train_run(spec, out, on_progress, resume=resume is not None, handle_signals=True)
        except Interrupted as stop:
            progress.stop()
            name = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}.get(stop.signal, "a signal")
            err_console.print(
                f"[bold yellow]stopped[/] by {name} at epoch {stop.epoch + 1}, step {stop.step}; the state is in "
                f"{escape(str(last_dir(out)))}; continue with: attnfuse train --resume {escape(str(out))}",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(128 + stop.signal if stop.signal else 130) from None

    if not is_main_process():
        return  # under torchrun, rank 0 reports
    print_result(result, spec.run)
    console.print(f"model, config, metrics and run.yaml written to [bold]{escape(str(out))}[/]", highlight=False)


def print_result(result: TrainResult, run: RunOptions) -> None:
    """The candidates of --fusion auto, the metrics table with the baselines' rows, and one
    warning line when a baseline beats the fusion on the validation split."""
    data, report, runs = result.data, result.report, run.runs
    what = f"{run.folds} folds" if run.folds else f"{run.repeat} runs"
    if result.selection is not None:
        console.print(_candidates_table(result), highlight=False)
        saved = f" (the saved model: the first of the {what})" if runs > 1 else ""
        picked, reason = escape(result.selection["picked"]), escape(result.selection["reason"])
        console.print(f"auto: picked [bold]{picked}[/]{saved}: {reason}")
    rows = dict(report["summary"] if runs > 1 else {s: report[s] for s in ("train", "valid", "test") if s in report})
    for name, parts in report.get("baselines", {}).items():
        rows.update({f"{name} (baseline) {s}": parts[s] for s in ("valid", "test") if s in parts})
    fusion = result.first.fusion if result.selection is None else result.selection["picked"]
    if runs == 1:
        title = f"{fusion} on {data.name} (best epoch {result.first.best_epoch})"
    elif result.selection is not None:
        title = f"auto on {data.name}: mean ± std over {what} (each run's picked model)"
    else:
        title = f"{fusion} on {data.name}: mean ± std over {what}"
    console.print(_metrics_table(title, rows))
    if "baselines" in report:
        spent = ", ".join(f"{n} {s:.1f} s" for n, s in result.seconds.items() if not n.startswith("fusion"))
        if spent:
            console.print(f"baselines fitted in {spent} (fusion training {result.seconds['fusion']:.1f} s)")
        for name, why in skipped(report["baselines"]).items():
            console.print(f"note: the {name} baseline was skipped: {escape(why)}", highlight=False)
    if result.verdict is not None:
        label = "[bold yellow]warning:[/]" if result.verdict["clear"] else "note:"
        console.print(f"{label} {escape(verdict_line(result.verdict, fusion))}", highlight=False)


def _candidates_table(result: TrainResult) -> Table:
    """One row per candidate: its settings and validation score (mean ± std over several runs),
    and which runs picked it."""
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


def _resumed(directory: Path, config: Path | None, out: Path | None, flags: dict) -> tuple[TrainSpec, Path]:
    """The spec of the run in progress in ``directory``; options given now must agree with it."""
    if config is not None or (out is not None and out != directory):
        raise ValueError("resume: continues a run with its own options and directory; drop --config and --out")
    # The saved options less consent (allow_pickle): a resumed pickle run needs --allow-pickle again.
    saved_options = without_consent(read_run_options(last_dir(directory)))
    saved = TrainSpec.from_options(saved_options, where=str(last_dir(directory)))
    asked = TrainSpec.from_options({**saved.to_options(), **flags})
    before, after = saved.to_options(), asked.to_options()
    free = ("device", *CONSENT_OPTIONS)  # may differ from the saved run's
    conflicts = [k for k in after if k not in free and after[k] != before.get(k)]
    if conflicts:
        k = conflicts[0]
        raise ValueError(
            f"resume: {k} {after[k]!r} conflicts with the run's {before.get(k)!r}; a resumed run keeps its options"
        )
    return asked, directory
