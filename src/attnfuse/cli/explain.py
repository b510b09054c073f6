"""``attnfuse explain``: the printed walkthrough, and the explanation files for a model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..explain import explain_model, parse_vectors, walkthrough
from ..explain.agreement import METHOD_SHORT
from ..explain.run import Explanation, column_names
from ..explain.walkthrough import SOFTMAX_NEVER_ONE_HOT, Walkthrough
from ..pipeline import data_options, split_parts
from ..threads import set_threads
from .common import console, load_for_model
from .options import with_options


def _vec(v: np.ndarray) -> str:
    return "[" + ", ".join(f"{x:.5g}" for x in v) + "]"


def print_walkthrough(
    console: Console, query: str | None, keys: str | None, values: str | None, self_vectors: str | None, scale: bool
) -> None:
    """Print every step of softmax(Q Kᵀ/√d_k) V for the vectors given on the command line."""
    w = walkthrough(*_walkthrough_vectors(query, keys, values, self_vectors), scale=scale)
    single = w.query.shape[0] == 1

    def qname(i: int) -> str:
        return "Q" if single else f"Q{i + 1}"

    d_k = w.query.shape[1]
    console.print(f"[bold]Attention(Q, K, V) = softmax(Q Kᵀ / √d_k) V[/]   d_k = {d_k}", highlight=False)
    console.print("1. dot products: how similar each query is to each key", highlight=False)
    console.print(_dot_products_table(w, qname))
    if scale:
        console.print(
            f"2. scaling: scores × 1/√d_k = scores × 1/√{d_k} = scores × {w.scale:.5f} (keeps softmax out of "
            f"its flat, vanishing-gradient region as d_k grows)",
            highlight=False,
        )
    else:
        console.print(
            "2. scaling: skipped (--no-scale): the scores go into the softmax as they are, as in small hand-worked "
            "examples",
            highlight=False,
        )
    console.print("3. softmax over the keys: the attention weights (each row sums to 1)", highlight=False)
    console.print(_softmax_table(w, qname))
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
        console.print(f"Why no row is one-hot: {SOFTMAX_NEVER_ONE_HOT}", highlight=False)


def _walkthrough_vectors(
    query: str | None, keys: str | None, values: str | None, self_vectors: str | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Q, K and V (None: the keys) parsed from the command line: --self alone, or --query and
    --keys with --values optional."""
    if self_vectors is not None:
        if query is not None or keys is not None or values is not None:
            raise ValueError("--self: give either --self or --query/--keys/--values, not both")
        q = parse_vectors(self_vectors, "--self")
        return q, q, None
    if query is None or keys is None:
        raise ValueError("walkthrough: give both --query and --keys (or --self)")
    q, k = parse_vectors(query, "--query"), parse_vectors(keys, "--keys")
    return q, k, None if values is None else parse_vectors(values, "--values")


def _dot_products_table(w: Walkthrough, qname: Callable[[int], str]) -> Table:
    """Step 1: every query against every key, the products written out and summed."""
    dots = Table()
    for col in ("query", "key", "q · k", "score"):
        dots.add_column(col, justify="right" if col == "score" else "left")
    for i in range(w.query.shape[0]):
        for j in range(w.keys.shape[0]):
            terms = " + ".join(f"{a:g}×{b:g}" for a, b in zip(w.query[i], w.keys[j]))
            dots.add_row(f"{qname(i)}={_vec(w.query[i])}", f"K{j + 1}={_vec(w.keys[j])}", terms, f"{w.scores[i, j]:g}")
    return dots


def _softmax_table(w: Walkthrough, qname: Callable[[int], str]) -> Table:
    """Step 3: each query's (scaled) scores and the weights the softmax turns them into."""
    soft = Table()
    soft.add_column("query")
    for j in range(w.keys.shape[0]):
        soft.add_column(f"K{j + 1}: score → weight", justify="right")
    for i in range(w.query.shape[0]):
        soft.add_row(
            qname(i), *[f"{w.scores[i, j] * w.scale:.5g} → {w.weights[i, j]:.5f}" for j in range(w.keys.shape[0])]
        )
    return soft


def _parse_samples(samples: str | None) -> list[int] | None:
    if samples is None:
        return None
    try:
        return list(dict.fromkeys(int(s) for s in samples.split(",") if s.strip()))
    except ValueError:
        raise ValueError(
            f"samples: expected positions among the explained rows like '0,5,9', got {samples!r}"
        ) from None


def sample_rows(positions: list[int] | None, rows: np.ndarray, split: str) -> list[int] | None:
    """The data rows of the per-sample views: ``positions`` index the explained rows (those of
    ``split``, after ``--max-rows``), so 0 is the split's first row and the bound is their count;
    a user does not know which data rows a drawn split holds, and a row of another split would be
    shown in a report about this one."""
    if positions is None:
        return None
    bad = [i for i in positions if not 0 <= i < len(rows)]
    if bad:
        raise ValueError(
            f"samples: expected positions in 0..{len(rows) - 1} (the {len(rows)} {split} rows explained), got "
            f"{bad[0] if len(bad) == 1 else bad}"
        )
    return [int(rows[i]) for i in positions]


def print_explanation(console: Console, expl: Explanation, out: Path) -> None:
    """The headline, the agreement table and its sentences, the caveats (expl.notes), and where the files are."""
    headline = f"{expl.fusion} fusion on {expl.data}: {expl.split} {expl.metric} {expl.score:.4f}"
    masking = expl.masking
    if masking is not None and masking.metrics is not None and masking.metric != expl.metric:
        headline += f", {masking.metric} {masking.metrics[masking.metric]:.4f}"
    console.print(f"{headline} ({len(expl.rows)} rows)", highlight=False)
    agree = expl.agreement
    table = Table(title="per modality: each method's share, and the metric lost when hidden", title_justify="left")
    table.add_column("modality")
    for m in agree.shares:
        table.add_column(METHOD_SHORT[m], justify="right")
    if agree.drops is not None:
        table.add_column(f"{agree.metric} lost", justify="right")
    for i, mod in enumerate(agree.modalities):
        cells = [f"{agree.shares[m][i]:.1%}" if np.isfinite(agree.shares[m][i]) else "—" for m in agree.shares]
        if agree.drops is not None:
            cells.append(f"{agree.drops[i]:+.4f}")
        table.add_row(escape(mod), *cells)
    console.print(table)
    for sentence in agree.sentences:
        console.print(f"- {escape(sentence)}", highlight=False)
    for note in expl.notes:
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
    timing = ", ".join(f"{m} {expl.seconds[m]:.1f} s" for m in expl.methods)
    console.print(f"methods: {timing}", highlight=False)
    console.print(
        f"report and figures written to [bold]{escape(str(out))}[/] (open {escape(str(out / 'report.html'))})",
        highlight=False,
    )


@with_options(data_options())
def explain(
    model: Path | None = typer.Option(None, help="A model directory written by `attnfuse train`."),
    data: str | None = typer.Option(None, help="Data to explain (default: the model's training data)."),
    method: str = typer.Option(
        "auto",
        help="attention, mask, ig, gxi, rollout (comma-separated), 'all', or 'auto': attention, mask, gxi and "
        "rollout, which cost about one pass per sample (IG costs --steps).",
    ),
    samples: str | None = typer.Option(
        None,
        help="Samples for the per-sample views: positions among the explained rows (0 is the split's first), "
        "e.g. '0,5,9' (default: 0,1).",
    ),
    split: str = typer.Option("test", help="Rows to explain: train, valid, test or all."),
    max_rows: int | None = typer.Option(
        None, min=1, help="Explain at most this many rows of the split (the first ones)."
    ),
    steps: int = typer.Option(50, min=1, help="Integrated Gradients: points on the path from the baseline."),
    out: Path | None = typer.Option(None, help="Output directory (default MODEL/explain)."),
    query: str | None = typer.Option(None, help="Walkthrough: query vector(s), e.g. '1,2'."),
    keys: str | None = typer.Option(None, help="Walkthrough: key vectors, e.g. '2,3;1,0'."),
    values: str | None = typer.Option(None, help="Walkthrough: value vectors (default: the keys)."),
    self_vectors: str | None = typer.Option(
        None, "--self", help="Walkthrough of self-attention: Q = K = V = these vectors."
    ),
    no_scale: bool = typer.Option(False, "--no-scale", metavar="", help="Walkthrough without the 1/sqrt(d_k) scaling."),
    **read: Any,
) -> None:
    """Explain a model: which modalities and steps matter, and where its attention looked.

    The methods (masking, Integrated Gradients, gradient x input, attention maps, rollout) side by
    side, whether they agree, in an HTML report; or, with --query/--keys or --self, a walk through
    the attention arithmetic for hand-made vectors."""
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
    positions = _parse_samples(samples)  # checked before anything is loaded
    explain_into(model, data, read, positions, split, max_rows, out, method=method, n_steps=steps)


def explain_into(
    model: Path,
    data: str | None,
    read: dict[str, Any],
    positions: list[int] | None,
    split: str,
    max_rows: int | None,
    out: Path | None,
    *,
    method: str,
    n_steps: int,
) -> None:
    """Explain the trained ``model`` on the first ``max_rows`` rows of ``split`` (samples at
    ``positions`` among them), write the report into ``out`` (default MODEL/explain) and print its
    summary. ``method`` and ``n_steps``: as :func:`explain_model`'s ``methods`` and ``n_steps``."""
    set_threads()  # the cores other processes leave free
    net, config, standardizer, dataset = load_for_model(model, data, read)
    parts = split_parts(dataset, config)
    if split not in parts:
        raise ValueError(f"split: expected one of {list(parts)} for this data, got {split!r}")
    rows = parts[split][:max_rows]
    chosen = sample_rows(positions, rows, split)
    from ..explain.report import explanation_directory, write_report_into  # matplotlib loads only now

    target = out or Path(model) / "explain"
    # Locked (a second explain into it is refused at once) and proven writable before the work.
    with explanation_directory(target) as tmp:
        expl = explain_model(
            net,
            dataset,
            standardizer,
            rows,
            split=split,
            methods=method,
            samples=chosen,
            n_steps=n_steps,
            feature_names=column_names(config),
        )
        write_report_into(expl, tmp)
    print_explanation(console, expl, target)
