"""``attnfuse train``: its options are generated from the dataclasses that hold them (the run's,
every fusion config's, the training config's); the work is :func:`attnfuse.pipeline.train`."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..data import MultimodalDataset
from ..distributed import is_main_process
from ..options import Option
from ..pipeline import RunOptions, TrainSpec, read_options, train_options
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
        bars: dict[int, Any] = {}

        def on_progress(event: str, info: dict) -> None:
            if event == "data":
                console.print(_headline(info["data"], spec.run.fusion), highlight=False)
            elif event == "run":
                kind = "fold" if spec.run.folds else "run"
                label = f"{kind} {info['index'] + 1}/{spec.run.runs} seed {info['seed']}"
                bars[info["index"]] = progress.add_task(label, total=info["epochs"], status="")
            elif event == "epoch":
                metric = next(k for k in info if k.startswith("valid_") and k != "valid_loss")
                status = f"loss {info['train_loss']:.4f}  {metric} {info[metric]:.4f}  best@{info['best_epoch']}"
                progress.update(bars[info["index"]], completed=info["epoch"], status=status)
            elif event == "run_end":  # stopped early: the bar ends where training did
                progress.update(bars[info["index"]], total=info["epochs"], completed=info["epochs"])
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
    data = result.data
    fusion = spec.run.fusion
    if spec.run.runs == 1:
        title = f"{fusion} on {data.name} (best epoch {result.first.best_epoch})"
        console.print(_metrics_table(title, result.report))
    else:
        what = f"{spec.run.folds} folds" if spec.run.folds else f"{spec.run.repeat} runs"
        title = f"{fusion} on {data.name}: mean ± std over {what}"
        console.print(_metrics_table(title, result.report["summary"]))
    console.print(f"model, config, metrics and run.yaml written to [bold]{escape(str(out))}[/]", highlight=False)


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
    saved = TrainSpec.from_options(read_run_options(last_dir(directory)), where=str(last_dir(directory)))
    asked = TrainSpec.from_options({**saved.to_options(), **flags})
    before, after = saved.to_options(), asked.to_options()
    conflicts = [k for k in after if k != "device" and after[k] != before.get(k)]
    if conflicts:
        k = conflicts[0]
        raise ValueError(
            f"resume: {k} {after[k]!r} conflicts with the run's {before.get(k)!r}; a resumed run keeps its options"
        )
    return asked, directory
