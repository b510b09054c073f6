"""``attnfuse explain``: the printed walkthrough, and the files for a model."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from ..data import MultimodalDataset, Standardizer
from ..explain import (
    bertviz_export,
    collect_maps,
    modality_attention,
    parse_vectors,
    require_attention,
    walkthrough,
)
from ..fusion import FusionModel
from ..metrics import PRIMARY_METRIC, compute_metrics
from ..report import plot_heads, plot_modality_matrices, plot_received, save_figure, write_html_report
from ..training import predict, to_predictions
from .common import _load_for_model, _parts, console

DEFAULT_SAMPLES = 2


def _vec(v: np.ndarray) -> str:
    return "[" + ", ".join(f"{x:.5g}" for x in v) + "]"


def print_walkthrough(
    console: Console, query: str | None, keys: str | None, values: str | None, self_vectors: str | None, scale: bool
) -> None:
    """Print every step of softmax(Q Kᵀ/√d_k) V for the vectors given on the command line."""
    if self_vectors is not None:
        if query is not None or keys is not None or values is not None:
            raise ValueError("--self: give either --self or --query/--keys/--values, not both")
        q = k = parse_vectors(self_vectors, "--self")
        v = None
    else:
        if query is None or keys is None:
            raise ValueError("walkthrough: give both --query and --keys (or --self)")
        q, k = parse_vectors(query, "--query"), parse_vectors(keys, "--keys")
        v = None if values is None else parse_vectors(values, "--values")
    w = walkthrough(q, k, v, scale=scale)
    d_k = q.shape[1]
    single = w.query.shape[0] == 1

    def qname(i: int) -> str:
        return "Q" if single else f"Q{i + 1}"

    console.print(f"[bold]Attention(Q, K, V) = softmax(Q Kᵀ / √d_k) V[/]   d_k = {d_k}", highlight=False)
    console.print("1. dot products: how similar each query is to each key", highlight=False)
    dots = Table()
    for col in ("query", "key", "q · k", "score"):
        dots.add_column(col, justify="right" if col == "score" else "left")
    for i in range(w.query.shape[0]):
        for j in range(w.keys.shape[0]):
            terms = " + ".join(f"{a:g}×{b:g}" for a, b in zip(w.query[i], w.keys[j]))
            dots.add_row(f"{qname(i)}={_vec(w.query[i])}", f"K{j + 1}={_vec(w.keys[j])}", terms, f"{w.scores[i, j]:g}")
    console.print(dots)

    if scale:
        console.print(
            f"2. scaling: scores × 1/√d_k = scores × 1/√{d_k} = scores × {w.scale:.5f} (keeps softmax out of "
            f"its flat, vanishing-gradient region as d_k grows)",
            highlight=False,
        )
    else:
        console.print("2. scaling: skipped (--no-scale), as in the study notes' simplified example", highlight=False)

    console.print("3. softmax over the keys: the attention weights (each row sums to 1)", highlight=False)
    soft = Table()
    soft.add_column("query")
    for j in range(w.keys.shape[0]):
        soft.add_column(f"K{j + 1}: score → weight", justify="right")
    for i in range(w.query.shape[0]):
        soft.add_row(
            qname(i), *[f"{w.scores[i, j] * w.scale:.5g} → {w.weights[i, j]:.5f}" for j in range(w.keys.shape[0])]
        )
    console.print(soft)

    console.print("4. weighted sum of the values:", highlight=False)
    for i in range(w.query.shape[0]):
        terms = " + ".join(f"{w.weights[i, j]:.5f}×{_vec(w.values[j])}" for j in range(w.values.shape[0]))
        console.print(f"   {qname(i)}: {terms} = {_vec(w.output[i])}", highlight=False)
    top = w.weights.argmax(axis=1)
    console.print(
        "The focus: "
        + "; ".join(f"{qname(i)} attends most to K{top[i] + 1} ({w.weights[i, top[i]]:.1%})" for i in range(len(top))),
        highlight=False,
    )
    if self_vectors is not None:
        console.print(
            "Note: softmax never gives exact 0/1 rows: softmax([1, 0]) = [0.7311, 0.2689]. The study notes print "
            "the identity matrix here, which is wrong.",
            highlight=False,
        )


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")


def explain_model(
    console: Console,
    model: FusionModel,
    config: dict,
    standardizer: Standardizer,
    dataset: MultimodalDataset,
    parts: dict[str, np.ndarray],
    samples: str | None,
    split: str,
    out: Path,
) -> None:
    """Heatmaps for chosen samples, modality attention over a split, bertviz export, report.html."""
    require_attention(model)
    if split not in parts:
        raise ValueError(f"split: expected one of {list(parts)} for this data, got {split!r}")
    rows = parts[split]
    if samples is None:
        chosen = rows[:DEFAULT_SAMPLES].tolist()
    else:
        try:
            chosen = [int(s) for s in samples.split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"samples: expected row indices like '0,5,9', got {samples!r}") from None
        bad = [i for i in chosen if not 0 <= i < dataset.n]
        if bad or not chosen:
            raise ValueError(f"samples: expected row indices in 0..{dataset.n - 1}, got {bad or samples!r}")

    scaled = standardizer.transform(dataset)
    split_batch = scaled.to_batch(rows)
    task = dataset.task
    metric, _ = PRIMARY_METRIC[task]
    score = compute_metrics(task, dataset.y[rows], to_predictions(task, predict(model, split_batch)))[metric]
    fusion = config["fusion"]
    headline = f"{fusion} fusion on {dataset.name}: {split} {metric} {score:.4f}"

    outputs, maps = collect_maps(model, scaled.to_batch(chosen))
    predictions = to_predictions(task, outputs)
    attribution = modality_attention(model, split_batch)

    # Build everything in a sibling temporary folder (same file system, so the moves are renames).
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}-", dir=out.parent) as tmp:
        tmp = Path(tmp)
        heat_sections = []
        for pos, row in enumerate(chosen):
            truth, pred = dataset.y[row], predictions[pos]
            fmt = (
                (lambda v: f"{int(v)}")
                if task == "classification"
                else (lambda v: np.array2string(np.asarray(v), precision=3))
            )
            images = [
                save_figure(
                    plot_heads(m, pos, f"{m.name} — sample {row} (true {fmt(truth)}, predicted {fmt(pred)})"),
                    tmp / "heatmaps" / f"sample{row}" / f"{_safe(m.name)}.png",
                )
                for m in maps
            ]
            heat_sections.append((f"Attention heatmaps, sample {row}", images))
            export = bertviz_export(maps, pos)
            (tmp / "bertviz").mkdir(exist_ok=True)
            (tmp / "bertviz" / f"sample{row}.json").write_text(json.dumps(export))
        matrix_png = save_figure(
            plot_modality_matrices(
                attribution, f"Modality-to-modality attention, mean over {split} ({len(rows)} samples)"
            ),
            tmp / "modality_matrix.png",
        )
        received_png = save_figure(
            plot_received(attribution, f"Attention received per modality — {headline}"), tmp / "modality_received.png"
        )
        summary = [
            ("model", f"{fusion} fusion ({sum(p.numel() for p in model.parameters()):,} parameters)"),
            ("data", f"{dataset.name}, {dataset.n} samples, {task}"),
            (f"{split} {metric}", f"{score:.4f}"),
            ("attention blocks", ", ".join(m.name for m in maps)),
        ]
        write_html_report(
            tmp / "report.html",
            f"attnfuse explain — {fusion} on {dataset.name}",
            summary,
            [("Where the attention goes, by modality", [received_png, matrix_png])] + heat_sections,
        )
        # Everything exists: move it into place (a failure above leaves `out` untouched).
        for path in sorted(tmp.rglob("*")):
            if path.is_file():
                target = out / path.relative_to(tmp)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, target)

    table = Table(title=f"attention received per modality ({split}, {len(rows)} samples)", title_justify="left")
    table.add_column("modality")
    table.add_column("share", justify="right")
    for name, share in sorted(attribution.received.items(), key=lambda kv: -kv[1]):
        table.add_row(name, f"{share:.1%}")
    console.print(headline, highlight=False)
    console.print(table)
    console.print(
        f"report, heatmaps and bertviz export written to [bold]{out}[/] (open {out / 'report.html'})", highlight=False
    )


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
