"""What every command shares: the consoles, the error boundary, loading data for a model, and
the metrics table."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..checkpoint import check_compatible, fingerprint, load_model
from ..data import MultimodalDataset, Standardizer, load_data
from ..fusion import FusionModel

console = Console()
err_console = Console(stderr=True)


def cli_errors(command: Callable) -> Callable:
    """One clear line and exit code 2 for bad input, instead of a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (ValueError, TypeError, OSError) as e:
            message = (
                str(e) if not isinstance(e, FileNotFoundError) or not e.filename else f"no such file: {e.filename}"
            )
            # escape: a message quoting a path or value with [brackets] is text, not rich markup.
            err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=2) from None

    return wrapper


def _load(
    source: str, allow_pickle: bool, seed: int = 0, task: str = "auto", num_classes: int | None = None
) -> MultimodalDataset:
    # A file is read with the task (and label space) asked for; validation says if its labels cannot fit.
    data = load_data(source, allow_pickle=allow_pickle, seed=seed, task=task, num_classes=num_classes)
    if task != "auto" and task != data.task:
        # A built-in: rebuild with the task the user asked for.
        data = MultimodalDataset(
            data.features, data.y, masks=data.masks, split=data.split, task=task, name=data.name, info=data.info
        )
    return data


def _load_for_model(
    model_dir: Path, source: str | None, allow_pickle: bool
) -> tuple[FusionModel, dict, Standardizer, MultimodalDataset]:
    """A trained model with data checked to fit it (default data: the model's training data).

    A generated built-in (synthetic-*) is regenerated with the seed it was trained with (`train
    --seed`), so it is the same data, not a fresh draw. Labels are read in the model's label space,
    so data holding fewer classes (even one) can be evaluated."""
    net, config, standardizer = load_model(model_dir)
    trained = config["data"]
    dataset = _load(
        source or trained.get("source", trained["name"]),
        allow_pickle,
        seed=config["train"].get("seed", 0),
        task=trained["task"],
        num_classes=trained.get("num_classes") if trained["task"] == "classification" else None,
    )
    check_compatible(config, dataset)
    return net, config, standardizer, dataset


def _parts(dataset: MultimodalDataset, config: dict) -> dict[str, np.ndarray]:
    """Row indices per split: the data's split column, or, for the training data itself (e.g. a
    built-in without a split), the split drawn in training; always also "all"."""
    parts = {}
    trained = config["data"]
    if dataset.split is not None:
        parts = {s: np.flatnonzero(dataset.split == s) for s in ("train", "valid", "test")}
    elif trained.get("fingerprint") == fingerprint(dataset):
        parts = dataset.split_indices(config["split_seed"])
    parts["all"] = np.arange(dataset.n)
    return parts


def _fmt(v: float) -> str:
    return f"{v:.4f}"


def _metrics_table(title: str, metrics: dict[str, dict]) -> Table:
    """Rows: splits; columns: metrics. Values are floats or {'mean', 'std'} summaries."""
    table = Table(title=escape(title), title_justify="left")  # titles quote paths/names: plain text
    names = list(next(iter(metrics.values())))
    table.add_column("split")
    for n in names:
        table.add_column(n, justify="right")
    for split, values in metrics.items():
        cells = [
            f"{values[n]['mean']:.4f} ± {values[n]['std']:.4f}" if isinstance(values[n], dict) else _fmt(values[n])
            for n in names
        ]
        table.add_row(split, *cells)
    return table
