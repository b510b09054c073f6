"""``attnfuse train``."""

from __future__ import annotations

from dataclasses import asdict
from enum import Enum
from pathlib import Path

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..checkpoint import METRICS, save_model, write_json
from ..data import BUILTINS
from ..fusion import FUSIONS
from ..metrics import PRIMARY_METRIC, summarize
from ..training import TrainConfig, run
from .common import _load, _metrics_table, console


class Task(str, Enum):
    auto = "auto"
    classification = "classification"
    regression = "regression"


class MetricSet(str, Enum):
    default = "default"
    sentiment = "sentiment"


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
