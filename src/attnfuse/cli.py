"""The ``attnfuse`` command line: train, evaluate, predict, datasets (and explain, in explain_cli).

Bad input never shows a traceback: every ValueError/TypeError/OSError becomes one line on stderr
and exit code 2, and nothing is written (files are written whole, after the work succeeded).
"""

from __future__ import annotations

import csv
import functools
import io
from collections.abc import Callable
from dataclasses import asdict
from enum import Enum
from pathlib import Path

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .checkpoint import METRICS, atomic_write, check_compatible, fingerprint, load_model, save_model, write_json
from .data import BUILTINS, MultimodalDataset, Standardizer, load_data
from .fusion import FUSIONS, FusionModel
from .metrics import PRIMARY_METRIC, compute_metrics, summarize
from .training import TrainConfig, predict, run, to_predictions

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Attention-based multimodal fusion: train, evaluate, predict and explain.",
)
console = Console()
err_console = Console(stderr=True)


class Task(str, Enum):
    auto = "auto"
    classification = "classification"
    regression = "regression"


class MetricSet(str, Enum):
    default = "default"
    sentiment = "sentiment"


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


@app.command()
@cli_errors
def train(
    data: str = typer.Option("mfeat", help="Built-in dataset name (see `attnfuse datasets`) or a .npz/.pkl file."),
    fusion: str = typer.Option("self", help=f"Fusion model: {', '.join(FUSIONS)}."),
    task: Task = typer.Option(Task.auto, help="auto: classification for integer labels, else regression."),
    epochs: int = typer.Option(100, help="Maximum epochs (early stopping on the validation metric)."),
    batch_size: int = typer.Option(64, help="Mini-batch size."),
    lr: float = typer.Option(1e-3, help="AdamW learning rate."),
    weight_decay: float = typer.Option(1e-2, help="AdamW weight decay."),
    patience: int = typer.Option(20, help="Stop after this many epochs without validation improvement."),
    d_model: int | None = typer.Option(None, help="Model width (default 64)."),
    layers: int | None = typer.Option(None, help="Attention layers per stack (default 2)."),
    heads: int | None = typer.Option(None, help="Attention heads (default 4)."),
    dropout: float | None = typer.Option(None, help="Dropout (default 0.1)."),
    pooling: str | None = typer.Option(
        None,
        help="Aggregation: mean (default), attention, cls or modality (self fusion: per-modality means, concatenated).",
    ),
    query: str | None = typer.Option(None, help="cross/bicross: the modality whose tokens ask (default: the first)."),
    modality_dropout: float | None = typer.Option(
        None, help="Training: hide each modality of a sample with this probability (default 0)."
    ),
    label_smoothing: float = typer.Option(0.0, help="Classification: label smoothing of the cross-entropy."),
    loss: str = typer.Option("auto", help="Regression loss: l1 or mse (classification: cross-entropy)."),
    metrics: MetricSet = typer.Option(MetricSet.default, help="'sentiment' adds the MOSI/MOSEI metrics."),
    seed: int = typer.Option(0, help="Random seed (model init, shuffling, and the split when the data has none)."),
    repeat: int = typer.Option(1, help="Run this many seeds (and splits, when the data has none); report mean ± std."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow reading a pickle file (it can run code)."),
    out: Path | None = typer.Option(None, help="Output directory (default runs/<data>-<fusion>)."),
) -> None:
    """Train a fusion model; write model.safetensors, config.json and metrics.json."""
    if repeat < 1:
        raise ValueError(f"repeat: expected >= 1, got {repeat}")
    dataset = _load(data, allow_pickle, seed, task.value)
    if metrics is MetricSet.sentiment and (dataset.task != "regression" or dataset.target_dim != 1):
        raise ValueError(
            "metrics: 'sentiment' needs one regression target per sample (a sentiment score), the data has "
            + (f"{dataset.target_dim} targets" if dataset.task == "regression" else "class labels")
        )
    if label_smoothing and dataset.task != "classification":
        raise ValueError("label-smoothing: applies to classification only, the data is regression")
    overrides = {
        "d_model": d_model,
        "num_layers": layers,
        "nhead": heads,
        "dropout": dropout,
        "pooling": pooling,
        "modality_dropout": modality_dropout,
        "query": query,
    }
    # An option that the chosen fusion does not have is an error, not silently ignored.
    unused = {"concat": ("num_layers", "nhead", "pooling", "query"), "self": ("query",), "mult": ("query",)}
    for name in unused.get(fusion, ()):
        if overrides.pop(name) is not None:
            flag = {"num_layers": "layers", "nhead": "heads"}.get(name, name)
            raise ValueError(f"{flag}: the '{fusion}' fusion has no such setting")
    if fusion == "mult" and layers is not None:
        overrides["self_layers"] = layers  # --layers sets both its cross-modal and its self-attention depth
    configs = [
        TrainConfig(
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            patience=patience,
            seed=seed + i,
            device=device,
            loss=loss,
            label_smoothing=label_smoothing,
            sentiment_metrics=metrics is MetricSet.sentiment,
        )
        for i in range(repeat)
    ]
    out = out or Path("runs") / f"{dataset.name}-{fusion}"
    metric, _ = PRIMARY_METRIC[dataset.task]
    console.print(
        f"[bold]attnfuse train[/]: {escape(dataset.name)} ({dataset.n} samples, {dataset.task}, modalities "
        f"{', '.join(f'{m.name}{[m.length, m.dim] if m.is_sequence else [m.dim]}' for m in dataset.modalities)}), "
        f"fusion={escape(fusion)}",
        highlight=False,
    )

    first, runs = None, []  # the first run's model is saved; of the others only the metrics are kept
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        for i, cfg in enumerate(configs):
            bar = progress.add_task(f"run {i + 1}/{repeat} seed {cfg.seed}", total=cfg.epochs, status="")

            def on_epoch(r: dict, bar=bar) -> None:
                progress.update(
                    bar,
                    completed=r["epoch"],
                    status=f"loss {r['train_loss']:.4f}  valid {metric} {r[f'valid_{metric}']:.4f}  best@{r['best_epoch']}",
                )

            # Without a split in the data, each repeat also draws its own split (seed + i).
            result = run(dataset, fusion, overrides, cfg, split_seed=cfg.seed, on_epoch=on_epoch)
            progress.update(bar, total=result.history[-1]["epoch"], completed=result.history[-1]["epoch"])
            runs.append({"seed": cfg.seed, "best_epoch": result.best_epoch, **result.metrics})
            first = first or result

    save_model(
        out,
        first.model,
        fusion,
        dataset,
        first.standardizer,
        asdict(configs[0]),
        split_seed=configs[0].seed,
        source=data if data in BUILTINS else str(Path(data).resolve()),
    )
    if repeat == 1:
        report = first.metrics
        console.print(_metrics_table(f"{fusion} on {dataset.name} (best epoch {first.best_epoch})", report))
    else:
        summary = {s: summarize([r[s] for r in runs]) for s in first.metrics}
        report = {"runs": runs, "summary": summary}
        console.print(_metrics_table(f"{fusion} on {dataset.name}: mean ± std over {repeat} runs", summary))
    write_json(out / METRICS, report)
    console.print(f"model, config and metrics written to [bold]{escape(str(out))}[/]", highlight=False)


@app.command()
@cli_errors
def evaluate(
    model: Path = typer.Option(..., help="A model directory written by `attnfuse train`."),
    data: str = typer.Option(..., help="Built-in dataset name or a .npz/.pkl file."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow reading a pickle file (it can run code)."),
    out: Path | None = typer.Option(None, help="Where to write the metrics (default MODEL/evaluation.json)."),
) -> None:
    """Metrics of a trained model on a data set (per split when the data has one, and on all rows)."""
    net, config, standardizer, dataset = _load_for_model(model, data, allow_pickle)
    batch = standardizer.transform(dataset).to_batch()
    sentiment = config["train"].get("sentiment_metrics", False)
    y_pred = to_predictions(dataset.task, predict(net, batch))
    parts = _parts(dataset, config)
    report = {
        s: compute_metrics(dataset.task, dataset.y[idx], y_pred[idx], sentiment=sentiment)
        for s, idx in parts.items()
        if idx.size
    }
    write_json(out or Path(model) / "evaluation.json", report)
    console.print(_metrics_table(f"{config['fusion']} model {model} on {dataset.name}", report))


@app.command("predict")
@cli_errors
def predict_cmd(
    model: Path = typer.Option(..., help="A model directory written by `attnfuse train`."),
    data: str = typer.Option(..., help="Built-in dataset name or a .npz/.pkl file."),
    out: Path = typer.Option(Path("predictions.csv"), help="CSV file to write, one row per sample."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow reading a pickle file (it can run code)."),
) -> None:
    """Write one prediction per sample (with class probabilities for classification) to a CSV file."""
    net, _config, standardizer, dataset = _load_for_model(model, data, allow_pickle)
    outputs = predict(net, standardizer.transform(dataset).to_batch())
    y_pred = to_predictions(dataset.task, outputs)

    header, columns = ["index"], [np.arange(dataset.n)]
    if dataset.split is not None:
        header.append("split"), columns.append(dataset.split)
    y_true = dataset.y.reshape(dataset.n, -1)
    y_hat = y_pred.reshape(dataset.n, -1)
    k = y_true.shape[1]
    header += ["y_true"] if k == 1 else [f"y_true_{j}" for j in range(k)]
    header += ["y_pred"] if k == 1 else [f"y_pred_{j}" for j in range(k)]
    columns += [y_true[:, j] for j in range(k)] + [y_hat[:, j] for j in range(k)]
    if dataset.task == "classification":
        probs = outputs.softmax(dim=-1).numpy()
        header += [f"prob_{c}" for c in range(probs.shape[1])]
        columns += [np.round(probs[:, c], 6) for c in range(probs.shape[1])]

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(zip(*columns))
    atomic_write(out, lambda tmp: Path(tmp).write_text(buffer.getvalue()))
    console.print(f"{dataset.n} predictions written to [bold]{escape(str(out))}[/]", highlight=False)


@app.command()
def datasets() -> None:
    """List the built-in datasets."""
    table = Table(title="built-in datasets (use the name with --data)", title_justify="left")
    table.add_column("name")
    table.add_column("description")
    for name, (_, description) in BUILTINS.items():
        table.add_row(name, description)
    console.print(table)


@app.command()
@cli_errors
def explain(
    model: Path | None = typer.Option(None, help="A model directory written by `attnfuse train`."),
    data: str | None = typer.Option(None, help="Data to explain (default: the model's training data)."),
    samples: str | None = typer.Option(None, help="Row indices for the heatmaps, e.g. '0,5,9' (default: 2 test rows)."),
    split: str = typer.Option("test", help="Split to average the modality attention over (train, valid, test, all)."),
    out: Path | None = typer.Option(None, help="Output directory (default MODEL/explain)."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow reading a pickle file (it can run code)."),
    query: str | None = typer.Option(None, help="Walkthrough: query vector(s), e.g. '1,2'."),
    keys: str | None = typer.Option(None, help="Walkthrough: key vectors, e.g. '2,3;1,0'."),
    values: str | None = typer.Option(None, help="Walkthrough: value vectors (default: the keys)."),
    self_vectors: str | None = typer.Option(
        None, "--self", help="Walkthrough of self-attention: Q = K = V = these vectors."
    ),
    no_scale: bool = typer.Option(
        False, "--no-scale", help="Walkthrough without the 1/sqrt(d_k) scaling (as in the notes)."
    ),
) -> None:
    """Show where a model's attention looked (heatmaps, modality attribution, HTML report), or walk
    through the attention arithmetic for hand-made vectors (--query/--keys or --self)."""
    from .explain_cli import explain_model, print_walkthrough

    walkthrough_args = query is not None or keys is not None or self_vectors is not None or values is not None
    if walkthrough_args:
        if model is not None:
            raise ValueError(
                "explain: --model explains a trained model, --query/--keys/--values/--self a "
                "hand-made example; give one or the other"
            )
        print_walkthrough(console, query, keys, values, self_vectors, scale=not no_scale)
        return
    if no_scale:
        raise ValueError("--no-scale: applies to the walkthrough (--query/--keys or --self) only")
    if model is None:
        raise ValueError("explain: give --model DIR (a trained model), or --query/--keys or --self for a walkthrough")
    net, config, standardizer, dataset = _load_for_model(model, data, allow_pickle)
    explain_model(
        console,
        net,
        config,
        standardizer,
        dataset,
        _parts(dataset, config),
        samples,
        split,
        out or Path(model) / "explain",
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
