"""``attnfuse tune``: its options are generated from :class:`attnfuse.tune.TuneOptions` and from those
of ``attnfuse train`` (given ones are fixed, the rest searched); the work is :func:`attnfuse.tune.tune`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from ..options import Option
from ..pipeline import RunOptions, TrainSpec, read_options
from ..threads import set_threads
from ..training import TrainConfig
from ..tune import TuneOptions, TuneResult, trial_summary, tune, tune_options
from .common import console
from .options import given, with_options
from .train import print_result

TOP = 5  # best trials printed


def _panel(opt: Option) -> str:
    if opt.owner is TuneOptions:
        return "Search"
    if opt.owner is RunOptions:
        return "Data and run"
    return (
        "Training (given: fixed, else searched)" if opt.owner is TrainConfig else "Model (given: fixed, else searched)"
    )


@with_options(tune_options(), _panel)
def tune_cmd(
    ctx: typer.Context,
    out: Path = typer.Option(..., help="Directory the best configuration is trained into.", rich_help_panel="Search"),
    config: Path | None = typer.Option(
        None, help="Read fixed options from a YAML or JSON file; options given here win.", rich_help_panel="Search"
    ),
    **values: Any,
) -> None:
    """Search the fusion and its hyper-parameters with Optuna, then train the best into --out.

    Trials are scored on the validation split; the best configuration is trained as `attnfuse
    train` would, so OUT/run.yaml reproduces it. The study (an SQLite file) can be continued."""
    options = {**(read_options(config) if config else {}), **given(ctx, values)}
    own = {o.name for o in tune_options() if o.owner is TuneOptions}
    tune_opts = TuneOptions(**{k: v for k, v in options.items() if k in own})
    train_values = {k: v for k, v in options.items() if k not in own}

    def on_trial(trial) -> None:
        t = trial_summary(trial)
        value = "" if t["value"] is None else f" {t['value']:.4f}"
        settings = ", ".join(f"{k}={_short(v)}" for k, v in t["options"].items() if k not in train_values)
        console.print(f"trial {t['number']}: {t['state']}{value}  {escape(settings)}", highlight=False)

    threads = train_values.get("threads")
    set_threads(int(threads) if threads is not None else None)  # the free cores, unless --threads says
    result = tune(train_values, tune_opts, out, on_trial=on_trial)
    console.print(_best_trials(result))
    print_result(result.final, TrainSpec.from_options(result.best_options).run)
    console.print(
        f"best configuration trained into [bold]{escape(str(out))}[/] (run.yaml reproduces it); "
        f"study in {escape(str(result.study_db))}",
        highlight=False,
    )


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _best_trials(result: TuneResult) -> Table:
    study = result.study
    done = [t for t in study.trials if t.value is not None and t.state.name == "COMPLETE"]
    done.sort(key=lambda t: t.value, reverse=study.direction.name == "MAXIMIZE")
    pruned = sum(t.state.name == "PRUNED" for t in study.trials)
    title = f"best trials of {len(study.trials)} ({pruned} pruned): validation score"
    table = Table(title=title, title_justify="left")
    for column in ("trial", "value", "settings"):
        table.add_column(column, justify="right" if column != "settings" else "left")
    for t in done[:TOP]:
        options = trial_summary(t)["options"]
        table.add_row(
            str(t.number), f"{t.value:.4f}", escape(", ".join(f"{k}={_short(v)}" for k, v in options.items()))
        )
    return table
