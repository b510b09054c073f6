"""``attnfuse export``: a trained model as a graph over plain tensors (:mod:`attnfuse.export`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from ..export import ExportOptions, export_model
from ..options import options_of
from .common import console
from .options import with_options


@with_options(options_of(ExportOptions))
def export_cmd(
    model: Path = typer.Option(..., help="A model directory (attnfuse train --out)."),
    out: Path = typer.Option(..., help="The file to write (e.g. model.onnx)."),
    **values: Any,
) -> None:
    """Export a model for serving: inputs x_<modality> (B, T, D) float32 and mask_<modality> (B, T)
    bool per modality (absent: all False), standardisation inside, probabilities or values out."""
    options = ExportOptions(**values)
    info = export_model(model, out, options.format, check=options.check)
    inputs = ", ".join(f"{i['name']} {i['dtype']} ({', '.join(map(str, i['shape']))})" for i in info["inputs"])
    console.print(f"{options.format} graph written to [bold]{escape(str(out))}[/]", highlight=False)
    console.print(f"inputs: {escape(inputs)}; output: {info['output']} (batch, {info['output_dim']})", highlight=False)
    if info["max_abs_difference"] is not None:
        console.print(
            f"checked against the model on rows with padding and absent modalities: max |difference| "
            f"{info['max_abs_difference']:.2g}",
            highlight=False,
        )
