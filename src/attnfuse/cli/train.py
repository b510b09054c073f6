"""``attnfuse train``: its options are generated from the dataclasses that hold them (the run's,
every fusion config's, the training config's); the work is :func:`attnfuse.pipeline.train`, whose
progress events :class:`_ProgressView` shows."""

from __future__ import annotations

import signal
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Column, Table

from ..baselines import skipped, verdict_line
from ..checkpoint import CONFIG, WEIGHTS
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
from ..threads import set_threads
from ..training import Interrupted, TrainConfig
from .common import console, err_console, metrics_table
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
        spec, out = _new_spec(config, out, given(ctx, values))

    # The cores other processes leave free, unless --threads says. The count is part of the run:
    # float32 sums differ in their last bits between thread counts, so run.yaml records the count
    # used, and --resume and --config run.yaml compute with it again (bitwise the same).
    spec = replace(spec, train=replace(spec.train, threads=set_threads(spec.train.threads)))
    with _progress_bars(console, enabled=is_main_process() and console.is_terminal) as bars:
        view = _ProgressView(bars, spec.run)
        try:
            result = train_run(spec, out, view, resume=resume is not None, handle_signals=True)
        except Interrupted as stop:
            bars.stop()
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


def _new_spec(config: Path | None, out: Path | None, flags: dict) -> tuple[TrainSpec, Path]:
    """The request of a new run: options of ``--config`` (if any) under the flags given, and its
    output directory (on rank 0 with a note when there is something to say about it)."""
    options = {**(read_options(config) if config else {}), **flags}
    spec = TrainSpec.from_options(options, where=str(config) if config else "options")
    out, note = _output(out, spec.run) if is_main_process() else (out or _default_out(spec.run), None)
    if note:
        console.print(f"note: {escape(note)}", highlight=False, soft_wrap=True)
    return spec, out


class _ProgressView:
    """The progress callback of :func:`attnfuse.pipeline.train` (events: see
    :data:`attnfuse.fit.ProgressCallback`) as the command shows it: one bar per model on a
    terminal; without one (a pipe, a CI or cluster log, nohup) plain lines instead."""

    def __init__(self, bars: Progress, run: RunOptions) -> None:
        self.bars, self.run = bars, run
        self.tasks: dict[tuple[int, str, int], Any] = {}
        self.lines = _EpochLines(enabled=is_main_process() and not console.is_terminal)

    def __call__(self, event: str, info: dict) -> None:
        handler = getattr(self, f"_on_{event}", None)
        if handler is not None:
            handler(info, (info.get("index", 0), info.get("candidate", ""), info.get("member", 0)))

    def _on_data(self, info: dict, key: tuple) -> None:
        console.print(_headline(info["data"], self.run.fusion), highlight=False)

    def _on_model_start(self, info: dict, key: tuple) -> None:
        label = _model_label(info, self.run)
        self.tasks[key] = self.bars.add_task(escape(label), total=info["epochs"], status="")
        self.lines.start(key, label, info["epochs"])

    def _on_epoch(self, info: dict, key: tuple) -> None:
        status = _epoch_status(info)
        self.bars.update(self.tasks[key], completed=info["epoch"], status=status)
        self.lines.epoch(key, info["epoch"], status)

    def _on_model_end(self, info: dict, key: tuple) -> None:  # stopped early: the bar ends where training did
        self.bars.update(self.tasks[key], total=info["epochs"], completed=info["epochs"])
        self.lines.end(key, info["epochs"], info["best_epoch"])

    def _on_note(self, info: dict, key: tuple) -> None:
        self.bars.console.print(f"note: {escape(info['message'])}", highlight=False)

    def _on_diverged(self, info: dict, key: tuple) -> None:
        self.bars.console.print(
            f"[bold yellow]warning:[/] {escape(info['message'])}; the weights of epoch {info['best_epoch']} "
            "(the best before it) are kept",
            highlight=False,
        )


def print_result(result: TrainResult, run: RunOptions) -> None:
    """The candidates of --fusion auto, the metrics table with the baselines' rows, and one
    warning line when a baseline beats the fusion on the validation split."""
    data, report, runs = result.data, result.report, run.runs
    what = f"{run.folds} folds" if run.folds else f"{run.repeat} runs"
    if result.selection is not None:
        console.print(_candidates_table(result), highlight=False)
        saved = f" (the saved model: the first of the {what})" if runs > 1 else ""
        picked, reason = escape(result.selection["picked"]), escape(result.selection["reason"])
        weighted = report.get("weighted") if runs == 1 else (result.runs[0].get("weighted") if result.runs else None)
        if weighted is None:
            console.print(f"auto: picked [bold]{picked}[/]{saved}: {reason}")
        else:
            console.print(f"auto: the best single candidate is [bold]{picked}[/]: {reason}")
            console.print(_weights_line(weighted, saved), highlight=False)
    rows = dict(report["summary"] if runs > 1 else {s: report[s] for s in ("train", "valid", "test") if s in report})
    first = report.get("weighted") if runs == 1 else (result.runs[0].get("weighted") if result.runs else None)
    if (first or {}).get("fitted_on") == "out-of-fold" and "valid" in rows:  # all train + valid rows, held out
        rows = {("out-of-fold" if k == "valid" else k): v for k, v in rows.items()}
    for name, parts in report.get("baselines", {}).items():
        rows.update({f"{name} (baseline) {s}": parts[s] for s in ("valid", "test") if s in parts})
    fusion = result.first.fusion if result.selection is None else result.selection["picked"]
    weighted = report.get("weighted") if runs == 1 else (result.runs[0].get("weighted") if result.runs else None)
    if runs == 1 and weighted is not None:
        title = f"the weighted ensemble on {data.name}"
    elif runs == 1:
        title = f"{fusion} on {data.name} (best epoch {result.first.best_epoch})"
    elif result.selection is not None:
        kept = "weighted ensemble" if weighted is not None else "picked model"
        title = f"auto on {data.name}: mean ± std over {what} (each run's {kept})"
    else:
        title = f"{fusion} on {data.name}: mean ± std over {what}"
    console.print(metrics_table(title, rows))
    if result.calibration is not None and "calibration" in report:
        held = (weighted or {}).get("fitted_on", "validation")  # the rows the ensemble was weighed on
        console.print(_calibration_line(result.calibration, report["calibration"], runs, held), highlight=False)
    if "baselines" in report:
        spent = ", ".join(
            f"{n} {s:.1f} s" for n, s in result.seconds.items() if not n.startswith("fusion") and n != "weighing"
        )
        weighing = f", weighing {result.seconds['weighing']:.1f} s" if "weighing" in result.seconds else ""
        if spent:
            console.print(f"baselines fitted in {spent} (fusion training {result.seconds['fusion']:.1f} s{weighing})")
        for name, why in skipped(report["baselines"]).items():
            console.print(f"note: the {name} baseline was skipped: {escape(why)}", highlight=False)
    if result.verdict is not None and weighted is None:  # an ensemble holds the baselines: its weights say it
        label = "[bold yellow]warning:[/]" if result.verdict["clear"] else "note:"
        console.print(f"{label} {escape(verdict_line(result.verdict, fusion))}", highlight=False)


def _weights_line(weighted: dict, saved: str) -> str:
    """The saved model as the weighted ensemble it is: ``auto: the model is a weighted ensemble of
    concat 0.64, ridge 0.36 (fitted on 66 validation rows: rmse 51.2; concat alone 53.0)``."""
    weights = sorted(((w, n) for n, w in weighted["weights"].items() if w > 0), key=lambda t: -t[0])
    parts = ", ".join(f"{escape(n)} {w:.2f}" for w, n in weights)
    metric, best = weighted["metric"], weighted["best_member"]
    scores = f"{metric} {weighted['score']:.4g}; {escape(best)} alone {weighted['members'][best]:.4g}"
    rows = weighted["fitted_on"]  # validation, held-out validation (early stopping's other half), out-of-fold
    return (
        f"auto: the model{saved} is a weighted ensemble of {parts} (fitted on {weighted['rows']} {rows} rows: {scores})"
    )


def _calibration_line(block: dict, report: dict, runs: int, held: str = "validation") -> str:
    """What the calibration of the saved model is, and what it did on the test rows (means over
    several runs): ``calibration: temperature 1.84 (fitted on 300 validation rows); test ECE
    0.0712 -> 0.0214, NLL 0.3311 -> 0.2902``. ``held``: which rows (``validation``, or the
    ``held-out validation`` half that early stopping did not see, or the ``out-of-fold`` predictions
    of a bagged run's train + valid rows)."""

    def at(part: str, key: str) -> float:
        value = report.get(part, {}).get(key)
        return value["mean"] if isinstance(value, dict) else value

    over = f" (means over {runs} runs)" if runs > 1 else ""
    if block["method"] == "temperature":
        head = f"calibration: temperature {block['temperature']:.3g} (fitted on {block['rows']} {held} rows)"
        if "test" not in report:
            return head
        return (
            f"{head}; test ECE {at('test', 'ece_before'):.4f} -> {at('test', 'ece_after'):.4f}, "
            f"NLL {at('test', 'nll_before'):.4f} -> {at('test', 'nll_after'):.4f}{over}"
        )
    widths = ", ".join(f"{q:.4g}" for q in block["half_width"])
    head = f"intervals at {block['level']:g}: ± {widths} (from {block['rows']} {held} rows)"
    if "test" not in report:
        return head
    return f"{head}; test coverage {at('test', 'coverage'):.4f}, mean width {at('test', 'width'):.4g}{over}"


def _candidates_table(result: TrainResult) -> Table:
    """One row per candidate: its settings and validation score (mean ± std over several runs),
    and which runs picked it."""
    selection, runs = result.selection, result.runs
    metric = selection["metric"]
    summary = result.report.get("candidates") if len(runs) > 1 else None
    spread = "mean ± std over runs" if summary is not None else "± its standard error"
    weighted = result.runs[0].get("weighted") if result.runs else None
    held = "out-of-fold" if (weighted or {}).get("fitted_on") == "out-of-fold" else "validation"
    table = Table(title=f"--fusion auto: candidates ({held} {metric}, {spread})", title_justify="left")
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


def _default_out(run: RunOptions) -> Path:
    return Path("runs") / f"{Path(run.data).stem}-{run.fusion}"


def _output(out: Path | None, run: RunOptions) -> tuple[Path, str | None]:
    """The output directory and, when there is something to say about it, a note.

    The default (``runs/<data>-<fusion>``) never replaces a run: ``table.csv`` and then
    ``table.parquet`` both default to ``runs/table-auto``, so the second takes the next free name
    (``runs/table-auto-2``, ...) and says so. An explicit ``--out`` holding a run is replaced (when
    the new one finishes; a failed run leaves it as it was), with one line that says so."""
    if out is None:
        base = _default_out(run)
        out, k = base, 1
        while _occupied(out):
            k += 1
            out = base.with_name(f"{base.name}-{k}")
        return out, None if out == base else f"{base} holds another run: this one is written to {out}"
    if not _occupied(out) or not out.is_dir():
        return out, None
    if (out / CONFIG).exists() or (out / WEIGHTS).exists():
        return out, f"--out {out} holds a run; this one replaces it when it finishes"
    if last_dir(out).exists():
        return out, (
            f"--out {out} holds an interrupted run ({last_dir(out).name}/); this one replaces it when it "
            f"finishes (attnfuse train --resume {out} would continue it instead)"
        )
    return out, None


def _occupied(path: Path) -> bool:
    """A path a default output directory must not take: anything but an empty directory."""
    if not path.exists():
        return False
    return not path.is_dir() or any(path.iterdir())


def _progress_bars(console: Console, enabled: bool) -> Progress:
    """One bar per model: its label, the bar, the epoch count, the time, then the metrics. The
    metrics come last and are the one column that may shrink: at 80 columns they give way, never
    the epoch count or the time."""
    fixed = {"table_column": Column(no_wrap=True)}
    return Progress(
        TextColumn("{task.description}", **fixed),
        BarColumn(bar_width=10),
        MofNCompleteColumn(**fixed),
        TimeElapsedColumn(**fixed),
        TextColumn("{task.fields[status]}", table_column=Column(no_wrap=False, overflow="ellipsis")),
        console=console,
        disable=not enabled,
    )


def _model_label(info: dict, run: RunOptions) -> str:
    """The model a bar or line is about: its candidate (or fusion), with the run and seed only when
    there are several runs, and the member of an ensemble."""
    label = info["candidate"]
    if run.runs > 1:
        label = f"{'fold' if run.folds else 'run'} {info['index'] + 1}/{run.runs} seed {info['seed']} {label}"
    if info["members"] > 1:
        label += f" member {info['member'] + 1}/{info['members']}"
    return label


def _epoch_status(info: dict) -> str:
    """``loss 0.6269  accuracy 0.9120  best 2``: the training loss, the validation metric, the best epoch."""
    metric = next(k for k in info if k.startswith("valid_") and k != "valid_loss")
    return (
        f"loss {info['train_loss']:.4f}  {metric.removeprefix('valid_')} {info[metric]:.4f}  best {info['best_epoch']}"
    )


PLAIN_EVERY_S = 10.0  # without a terminal: a line at a model's first epoch, then at most every this many seconds


class _EpochLines:
    """Progress without a terminal, as plain lines a log file keeps: ``concat epoch 1/100: loss
    0.6931  accuracy 0.5000  best 1 (0:00:01)`` at each model's first epoch and then at most every
    :data:`PLAIN_EVERY_S` seconds, and one line when it ends (how many epochs, the best one)."""

    def __init__(self, enabled: bool, every: float = PLAIN_EVERY_S) -> None:
        self.enabled, self.every = enabled, every
        self.models: dict[tuple, list] = {}  # key -> [label, epochs, start, last line's time]

    def start(self, key: tuple, label: str, epochs: int) -> None:
        now = time.monotonic()
        self.models[key] = [label, epochs, now, None]

    def epoch(self, key: tuple, epoch: int, status: str) -> None:
        model = self.models.get(key)
        if not self.enabled or model is None:
            return
        label, epochs, start, last = model
        now = time.monotonic()
        if last is None or now - last >= self.every:
            model[3] = now
            self._print(f"{label} epoch {epoch}/{epochs}: {status} ({_elapsed(now - start)})")

    def end(self, key: tuple, epochs: int, best: int) -> None:
        model = self.models.pop(key, None)
        if self.enabled and model is not None:
            label, planned, start, _ = model
            stopped = f" (stopped early of {planned})" if epochs < planned else ""
            self._print(
                f"{label} done: {epochs} epochs{stopped}, best epoch {best} ({_elapsed(time.monotonic() - start)})"
            )

    @staticmethod
    def _print(line: str) -> None:
        console.print(escape(line), highlight=False, soft_wrap=True)


def _elapsed(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


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
    free = ("device", "threads", *CONSENT_OPTIONS)  # may differ from the saved run's
    conflicts = [k for k in after if k not in free and after[k] != before.get(k)]
    if conflicts:
        k = conflicts[0]
        raise ValueError(
            f"resume: {k} {after[k]!r} conflicts with the run's {before.get(k)!r}; a resumed run keeps its options"
        )
    return asked, directory
