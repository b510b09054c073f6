"""``attnfuse serve``: a trained model behind HTTP (:mod:`attnfuse.serve`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from ..options import options_of
from ..serve import ModelService, ServeOptions, serve
from ..threads import set_threads
from .common import console
from .options import with_options


@with_options(options_of(ServeOptions))
def serve_cmd(
    model: Path = typer.Option(..., help="A model directory (attnfuse train --out)."),
    **values: Any,
) -> None:
    """Serve a model over HTTP: POST /predict {"instances": [...]}, GET /health, GET /schema.
    Requests arriving within a few milliseconds run as one batch; SIGTERM answers the requests
    already received, then exits with code 0."""
    options = ServeOptions(**values)  # serve() says first, before loading the model, when FastAPI or uvicorn is missing
    set_threads()

    def ready(url: str, service: ModelService) -> None:
        checked = (
            "" if service.parity is None else f", checked against the model: max |difference| {service.parity:.2g}"
        )
        console.print(
            f"serving {escape(str(model))} ({service.config['fusion']}, {service.task}) at {url} "
            f"(backend {service.backend}{checked}); POST /predict, GET /health, GET /schema; Ctrl-C or SIGTERM stops",
            highlight=False,
            soft_wrap=True,
        )

    done = serve(model, options, ready)
    why = f" ({done['signal']})" if done["signal"] else ""
    console.print(
        f"stopped{why}: {_count(done['requests'], 'request')} answered in {_count(done['batches'], 'batch')}, "
        f"{done['refused']} refused",
        highlight=False,
        soft_wrap=True,
    )


def _count(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}{'es' if word.endswith('ch') else 's'}"
