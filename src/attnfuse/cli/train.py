"""``attnfuse train``: its options are generated from the dataclasses that hold them (the run's,
every fusion config's, the training config's); the work is :func:`attnfuse.pipeline.train`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..data import MultimodalDataset
from ..options import Option
from ..pipeline import RunOptions, TrainSpec, read_options, train_options
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
        bars: dict[int, Any] = {}

        def on_progress(event: str, info: dict) -> None:
            if event == "data":
                console.print(_headline(info["data"], spec.run.fusion), highlight=False)
            elif event == "run":
                label = f"run {info['index'] + 1}/{spec.run.repeat} seed {info['seed']}"
                bars[info["index"]] = progress.add_task(label, total=info["epochs"], status="")
            elif event == "epoch":
                metric = next(k for k in info if k.startswith("valid_") and k != "valid_loss")
                status = f"loss {info['train_loss']:.4f}  {metric} {info[metric]:.4f}  best@{info['best_epoch']}"
                progress.update(bars[info["index"]], completed=info["epoch"], status=status)
            elif event == "run_end":  # stopped early: the bar ends where training did
                progress.update(bars[info["index"]], total=info["epochs"], completed=info["epochs"])
            elif event == "diverged":
                console.print(
                    f"[bold yellow]warning:[/] {escape(info['message'])}; the weights of epoch {info['best_epoch']} "
                    "(the best before it) are kept",
                    highlight=False,
                )

        result = train_run(spec, out, on_progress)

    data = result.data
    fusion = spec.run.fusion
    if spec.run.repeat == 1:
        title = f"{fusion} on {data.name} (best epoch {result.first.best_epoch})"
        console.print(_metrics_table(title, result.report))
    else:
        title = f"{fusion} on {data.name}: mean ± std over {spec.run.repeat} runs"
        console.print(_metrics_table(title, result.report["summary"]))
    console.print(f"model, config, metrics and run.yaml written to [bold]{escape(str(out))}[/]", highlight=False)


def _headline(data: MultimodalDataset, fusion: str) -> str:
    mods = ", ".join(f"{m.name}{[m.length, m.dim] if m.is_sequence else [m.dim]}" for m in data.modalities)
    return (
        f"[bold]attnfuse train[/]: {escape(data.name)} ({data.n} samples, {data.task}, modalities "
        f"{escape(mods)}), fusion={escape(fusion)}"
    )
