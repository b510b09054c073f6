"""``attnfuse evaluate`` and ``attnfuse predict``: a trained model on data."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np
import typer
from rich.markup import escape

from ..checkpoint import EVALUATION, metrics_for_json
from ..data import decode_labels
from ..files import check_writable, write_json, write_text
from ..metrics import compute_metrics
from ..pipeline import data_options, split_parts
from ..threads import set_threads
from ..training import predict, to_predictions
from .common import console, describe_os_error, load_for_model, metrics_table
from .options import with_options


@with_options(data_options())
def evaluate(
    model: Path = typer.Option(..., help="A model directory written by `attnfuse train`."),
    data: str | None = typer.Option(None, help="Data to evaluate on (default: the model's training data)."),
    out: Path | None = typer.Option(None, help="Where to write the metrics (default MODEL/evaluation.json)."),
    **read: Any,
) -> None:
    """Metrics of a trained model on a data set (per split when the data has one, and on all rows).

    The metrics are printed first and then written: when the file cannot be written (a read-only
    model directory) they are still shown, and the error line names the file and the way out."""
    set_threads()
    target = out or Path(model) / EVALUATION
    try:
        check_writable(target)  # known now; reported once the metrics are on the screen
        unwritable = None
    except OSError as e:
        unwritable = e
    net, config, standardizer, dataset = load_for_model(model, data, read)
    if dataset.y is None:
        raise ValueError(f"data: {dataset.name} has no targets to evaluate against; attnfuse predict works without")
    batch = dataset.batches(None, standardizer)
    sentiment = config["train"].get("metrics") == "sentiment"
    y_pred = to_predictions(dataset.task, predict(net, batch))
    parts = split_parts(dataset, config)
    report = {
        s: compute_metrics(dataset.task, dataset.y[idx], y_pred[idx], sentiment=sentiment)
        for s, idx in parts.items()
        if idx.size
    }
    report = metrics_for_json(report)
    console.print(metrics_table(f"{config['fusion']} model {model} on {dataset.name}", report))
    try:
        if unwritable is not None:
            raise unwritable
        write_json(target, report)
    except OSError as e:
        raise OSError(
            f"the metrics above could not be written ({describe_os_error(e)}); --out FILE writes them elsewhere"
        ) from None


@with_options(data_options())
def predict_cmd(
    model: Path = typer.Option(..., help="A model directory written by `attnfuse train`."),
    data: str | None = typer.Option(
        None, help="Data to predict (default: the model's training data); it needs no targets."
    ),
    out: Path = typer.Option(Path("predictions.csv"), help="CSV file to write, one row per sample."),
    **read: Any,
) -> None:
    """Write one prediction per sample (with class probabilities for classification) to a CSV file."""
    check_writable(out)  # before the work: the file is the result
    set_threads()
    net, config, standardizer, dataset = load_for_model(model, data, read)
    outputs = predict(net, dataset.batches(None, standardizer))
    y_pred = to_predictions(dataset.task, outputs)
    classes = config["data"].get("classes")  # the original labels of the codes 0..C-1

    header, columns = ["index"], [np.arange(dataset.n)]
    parts = split_parts(dataset, config)  # the data's split, or the one drawn in training for its own data
    if len(parts) > 1:
        split = np.empty(dataset.n, dtype=object)
        for name, rows in parts.items():
            if name != "all":
                split[rows] = name
        header.append("split"), columns.append(split)
    y_hat = y_pred.reshape(dataset.n, -1)
    if dataset.task == "classification":
        y_hat = decode_labels(y_hat[:, 0], classes).reshape(dataset.n, 1)
    k = y_hat.shape[1]
    if dataset.y is not None:  # data without targets gets predictions only
        y_true = dataset.y.reshape(dataset.n, -1)
        if dataset.task == "classification":
            y_true = decode_labels(y_true[:, 0], classes).reshape(dataset.n, 1)
        header += ["y_true"] if k == 1 else [f"y_true_{j}" for j in range(k)]
        columns += [y_true[:, j] for j in range(k)]
    header += ["y_pred"] if k == 1 else [f"y_pred_{j}" for j in range(k)]
    columns += [y_hat[:, j] for j in range(k)]
    if dataset.task == "classification":
        probs = outputs.softmax(dim=-1).numpy()
        header += [f"prob_{c}" for c in decode_labels(np.arange(probs.shape[1]), classes)]
        columns += [np.round(probs[:, c], 6) for c in range(probs.shape[1])]

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(zip(*columns))
    write_text(out, buffer.getvalue())
    console.print(f"{dataset.n} predictions written to [bold]{escape(str(out))}[/]", highlight=False)
