"""``attnfuse evaluate`` and ``attnfuse predict``: a trained model on data."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np
import typer
from rich.markup import escape

from ..calibration import calibrated_probabilities, half_width_of, prediction_interval
from ..checkpoint import EVALUATION, metrics_for_json
from ..data import RowBatches, decode_labels
from ..files import check_writable, write_json, write_text
from ..pipeline import bagged_on_valid, data_options, metrics_per_part, split_parts
from ..robustness import missing_modalities, plot_robustness, robustness_table
from ..threads import set_threads
from ..training import predict, to_predictions
from .common import console, describe_os_error, load_for_model, metrics_table
from .options import with_options


@with_options(data_options())
def evaluate(
    model: Path = typer.Option(..., help="A model directory written by `attnfuse train`."),
    data: str | None = typer.Option(None, help="Data to evaluate on (default: the model's training data)."),
    out: Path | None = typer.Option(None, help="Where to write the metrics (default MODEL/evaluation.json)."),
    missing: bool = typer.Option(
        False,
        "--missing",
        metavar="",
        help="Also measure how the model and the baselines hold up when each modality is absent from 0-100% of "
        'the test rows or gets Gaussian noise: tables, a "missing" block in the metrics file and a plot.',
    ),
    plot: Path | None = typer.Option(
        None, help="With --missing: the PNG to write (default MODEL.missing.png, beside the model directory)."
    ),
    **read: Any,
) -> None:
    """Metrics of a trained model on a data set (per split when the data has one, and on all rows).

    Then the calibration, per part: for classification the expected calibration error (ece, 15
    bins) and the NLL of the model's probabilities (calibrated when it was trained with
    --calibrate); for a regression trained with --interval the intervals' coverage (the share of
    targets inside) and mean width.

    The metrics are printed first and then written: when the file cannot be written (a read-only
    model directory) they are still shown, and the error line names the file and the way out."""
    if plot is not None and not missing:
        raise ValueError(f"plot: --plot {plot} names the plot of --missing, which was not asked for; add --missing")
    set_threads()
    target = out or Path(model) / EVALUATION
    # Beside the model directory, not in it: a model directory holds only the files of a run.
    figure = (plot or _beside(Path(model), ".missing.png")) if missing else None
    unwritable = _unwritable(target)  # known now; reported once the metrics are on the screen
    unplottable = _unwritable(figure) if figure is not None else None
    net, config, standardizer, dataset = load_for_model(model, data, read)
    if dataset.y is None:
        raise ValueError(f"data: {dataset.name} has no targets to evaluate against; attnfuse predict works without")
    report = metrics_for_json(metrics_per_part(net, config, standardizer, dataset))
    title = f"{config['fusion']} model {model} on {dataset.name}"
    console.print(metrics_table(title, {k: v for k, v in report.items() if k != "calibration"}))
    if bagged_on_valid(dataset, config):
        console.print(
            "note: a bagged model: its bags trained on the validation rows too, so they are counted as "
            'training rows here; their out-of-fold metrics are metrics.json\'s "valid"',
            highlight=False,
        )
    if "calibration" in report:
        console.print(_calibration_table(report["calibration"]))
    robustness = None
    if missing:
        robustness = missing_modalities(net, config, standardizer, dataset)
        _print_robustness(robustness)
        report["missing"] = metrics_for_json(robustness.to_dict())
    _write_or_explain(target, unwritable, "the metrics above", "--out", lambda: write_json(target, report))
    if robustness is not None:
        _write_or_explain(
            figure, unplottable, "the robustness plot", "--plot", lambda: plot_robustness(robustness, figure, title)
        )
        console.print(f"robustness plot written to [bold]{escape(str(figure))}[/]", highlight=False)


def _calibration_table(block: dict):
    """evaluate's ``calibration`` block as a table: a row per part."""
    if "temperature" in block:
        title = f"calibration: temperature {block['temperature']:.3g}"
    else:
        title = f"intervals at {block['level']:g}: ± {', '.join(f'{q:.4g}' for q in block['half_width'])}"
    return metrics_table(title, {k: v for k, v in block.items() if isinstance(v, dict)})


def _write_or_explain(path: Path, unwritable: OSError | None, what: str, flag: str, write) -> None:
    """``write()`` ``path``, or an error naming ``what`` could not be written and the ``flag`` that
    writes it elsewhere (``unwritable``: the error known before the work, raised now)."""
    try:
        if unwritable is not None:
            raise unwritable
        write()
    except OSError as e:
        raise OSError(
            f"{what} could not be written ({describe_os_error(e)}); {flag} FILE writes it elsewhere"
        ) from None


def _unwritable(path: Path) -> OSError | None:
    """The error that writing ``path`` would raise, or None."""
    try:
        check_writable(path)
    except OSError as e:
        return e
    return None


def _beside(directory: Path, suffix: str) -> Path:
    """``DIR<suffix>`` in DIR's parent (``runs/planted`` -> ``runs/planted.missing.png``)."""
    directory = directory if directory.name else directory.resolve()
    return directory.with_name(directory.name + suffix)


def _print_robustness(result) -> None:
    """The robustness tables (:func:`attnfuse.robustness.robustness_table`) and their notes."""
    from rich.table import Table

    for title, header, rows in robustness_table(result):
        table = Table(title=escape(title), title_justify="left")
        for k, name in enumerate(header):
            table.add_column(name, justify="right" if k >= 2 else "left")
        for row in rows:
            table.add_row(*map(escape, row))
        console.print(table)
    for name, why in result.skipped.items():
        console.print(f"note: the {name} baseline could not be fitted: {escape(why)}", highlight=False)
    if result.note:
        console.print(f"note: {escape(result.note)}", highlight=False)
    console.print(f"robustness measured in {result.seconds:.1f} s", highlight=False)


@with_options(data_options())
def predict_cmd(
    model: Path = typer.Option(..., help="A model directory written by `attnfuse train`."),
    data: str | None = typer.Option(
        None, help="Data to predict (default: the model's training data); it needs no targets."
    ),
    out: Path = typer.Option(Path("predictions.csv"), help="CSV file to write, one row per sample."),
    **read: Any,
) -> None:
    """Write one prediction per sample to a CSV file: with class probabilities for classification
    (calibrated when the model was: softmax(logits / T)), with lower/upper for a regression trained
    with --interval."""
    check_writable(out)  # before the work: the file is the result
    set_threads()
    net, config, standardizer, dataset = load_for_model(model, data, read)
    outputs = predict(net, RowBatches(dataset, None, standardizer))
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
        probs = calibrated_probabilities(outputs, config)  # softmax(logits / T); T = 1 uncalibrated
        header += [f"prob_{c}" for c in decode_labels(np.arange(probs.shape[1]), classes)]
        columns += [np.round(probs[:, c], 6) for c in range(probs.shape[1])]
    elif half_width_of(config) is not None:
        lower, upper = prediction_interval(outputs, config)  # (N, K) each
        for name, bound in (("lower", lower), ("upper", upper)):
            header += [name] if k == 1 else [f"{name}_{j}" for j in range(k)]
            columns += [bound[:, j] for j in range(k)]

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(zip(*columns))
    write_text(out, buffer.getvalue())
    console.print(f"{dataset.n} predictions written to [bold]{escape(str(out))}[/]", highlight=False)
