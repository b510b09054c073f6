"""Pictures of attention (matplotlib, Agg backend) and a self-contained HTML report."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from .explain import ModalityAttention
from .modules import AttentionMap

__all__ = ["plot_heads", "plot_modality_matrices", "plot_received", "save_figure", "write_html_report"]

MAX_TICKS = 32  # label at most this many tokens per axis, evenly spaced


def _ticks(ax, labels: list[str], axis: str) -> None:
    step = max(1, int(np.ceil(len(labels) / MAX_TICKS)))
    idx = list(range(0, len(labels), step))
    if axis == "x":
        ax.set_xticks(idx, [labels[i] for i in idx], rotation=90, fontsize=7)
    else:
        ax.set_yticks(idx, [labels[i] for i in idx], fontsize=7)


def plot_heads(m: AttentionMap, sample: int, title: str) -> Figure:
    """One panel per head: the (L, S) weights of ``sample``, query tokens down, keys across."""
    w = m.weights[sample].float().numpy()  # (H, L, S)
    heads, L, S = w.shape
    cols = min(heads, 4)
    rows = int(np.ceil(heads / cols))
    cell_w = max(2.6, 0.22 * S + 1.2)
    cell_h = max(1.6, 0.22 * L + 1.2)
    fig, axes = plt.subplots(
        rows, cols, figsize=(cell_w * cols + 1.2, cell_h * rows + 1.0), squeeze=False, layout="constrained"
    )
    vmax = float(w.max()) if w.size else 1.0
    image = None
    for h in range(rows * cols):
        ax = axes[h // cols][h % cols]
        if h >= heads:
            ax.axis("off")
            continue
        image = ax.imshow(w[h], vmin=0.0, vmax=vmax, cmap="viridis", aspect="auto", interpolation="nearest")
        ax.set_title(f"head {h}", fontsize=9)
        _ticks(ax, m.key_tokens, "x")
        _ticks(ax, m.query_tokens, "y")
        ax.set_xlabel("key (attended to)", fontsize=8)
        if h % cols == 0:
            ax.set_ylabel("query", fontsize=8)
    fig.colorbar(image, ax=axes, shrink=0.9, label="attention weight")
    fig.suptitle(title, fontsize=10)
    return fig


def plot_modality_matrices(attn: ModalityAttention, title: str) -> Figure:
    """One panel per block: rows = querying modality, columns = attended modality (rows sum to 1)."""
    blocks = list(attn.matrices.items())
    cols = min(len(blocks), 3)
    rows = int(np.ceil(len(blocks) / cols))
    sizes = [max(len(q), len(k)) for _, (q, k, _) in blocks]
    cell = max(3.0, 0.55 * max(sizes) + 1.6)
    fig, axes = plt.subplots(
        rows, cols, figsize=(cell * cols + 1.2, cell * rows + 0.8), squeeze=False, layout="constrained"
    )
    # One colour scale for all panels, stretched to the largest value so differences show.
    vmax = max(float(mat.max()) for _, (_, _, mat) in blocks) or 1.0
    image = None
    for i in range(rows * cols):
        ax = axes[i // cols][i % cols]
        if i >= len(blocks):
            ax.axis("off")
            continue
        name, (q_mods, k_mods, mat) = blocks[i]
        image = ax.imshow(mat, vmin=0.0, vmax=vmax, cmap="magma", aspect="auto")
        ax.set_xticks(range(len(k_mods)), k_mods, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(q_mods)), q_mods, fontsize=8)
        ax.set_xlabel("attended modality", fontsize=8)
        ax.set_ylabel("querying modality", fontsize=8)
        ax.set_title(name, fontsize=9)
        if mat.size <= 64:
            for (r, c), v in np.ndenumerate(mat):
                ax.text(
                    c, r, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.6 * vmax else "black"
                )
    fig.colorbar(image, ax=axes, shrink=0.9, label="mean attention weight")
    fig.suptitle(title, fontsize=10)
    return fig


def plot_received(attn: ModalityAttention, title: str) -> Figure:
    """Bar chart: the share of all attention that lands on each modality's tokens."""
    names = list(attn.received)
    shares = [100.0 * attn.received[n] for n in names]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(names) + 2.0), 3.6), layout="constrained")
    bars = ax.bar(names, shares, color="#3b6ea8")
    ax.bar_label(bars, fmt="%.1f%%", fontsize=8)
    ax.set_ylabel("share of attention received (%)")
    ax.set_xlabel("modality")
    ax.set_ylim(0, max(shares + [1.0]) * 1.18)
    ax.set_title(title, fontsize=10)
    ax.tick_params(axis="x", labelrotation=30)
    return fig


def save_figure(fig: Figure, path: Path) -> bytes:
    """Write a PNG and return its bytes (for embedding in the HTML report)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    data = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def write_html_report(
    path: Path, title: str, summary: list[tuple[str, str]], sections: list[tuple[str, list[bytes]]]
) -> None:
    """A single HTML file with every image embedded (base64), readable offline."""
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in summary)
    body = []
    for heading, images in sections:
        body.append(f"<h2>{html.escape(heading)}</h2>")
        for png in images:
            body.append(
                f'<img alt="{html.escape(heading)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
            )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 1.5em; }}
th, td {{ text-align: left; padding: 0.25em 1em 0.25em 0; border-bottom: 1px solid #ddd; }}
img {{ max-width: 100%; display: block; margin: 0.5em 0 1.5em; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<table>{rows}</table>
{"".join(body)}
</body></html>
"""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(page)
    tmp.replace(path)
