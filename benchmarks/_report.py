"""What the benchmark scripts that write a section of RESULTS.md share: their command line
(``--quick``, ``--render``, ``--out``), one thread for torch and scikit-learn's pools, the time
stamp of a finished run, and the writing of one part's block of a section. Imported as a sibling module (the scripts run as
``python benchmarks/NAME.py``, which puts this folder on the path)."""

from __future__ import annotations

import argparse
from datetime import datetime, timezone
from pathlib import Path

import torch
from threadpoolctl import threadpool_limits

__all__ = ["parser", "one_thread", "finished", "write_part"]

RESULTS_MD = Path(__file__).with_name("RESULTS.md")


def parser(doc: str, quick: str, render: str) -> argparse.ArgumentParser:
    """A parser described by the script's ``doc`` with the options every such script has:
    ``--quick`` (help ``quick``: what the smoke run does), ``--render`` (help ``render``: what is
    rendered from the raw numbers) and ``--out`` (the RESULTS.md to write the section into)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=quick)
    p.add_argument("--render", action="store_true", help=render)
    p.add_argument("--out", type=Path, default=RESULTS_MD)
    return p


def one_thread() -> None:
    """torch, and the BLAS / OpenMP pools of scikit-learn, on one thread: on a shared 2-core machine
    spinning threads slow small models down."""
    torch.set_num_threads(1)
    threadpool_limits(1)


def finished() -> str:
    """Now, as the results record when a run finished: ``2026-12-03 15:15 UTC``."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def write_part(out: Path, script: str, part: str, text: str, section: str, intro: str = "") -> None:
    """Replace ``part``'s block of ``script`` (between its markers) in ``out``, or add it after the
    last block of ``section`` (the section is created at the end when absent, with ``intro`` under
    its title): the other parts keep their place."""
    begin, end = f"<!-- begin: {script} {part} -->", f"<!-- end: {script} {part} -->"
    block = f"{begin}\n{text}\n{end}"
    old = out.read_text()
    if begin in old:
        new = old[: old.index(begin)] + block + old[old.index(end) + len(end) :]
    elif section in old:
        head = old.index(section)
        nxt = old.find("\n## ", head + len(section))
        nxt = len(old) if nxt < 0 else nxt
        new = old[:nxt].rstrip("\n") + f"\n\n{block}\n" + old[nxt:]
    else:
        title = f"{section}\n\n{intro}" if intro else section
        new = old.rstrip("\n") + f"\n\n{title}\n\n{block}\n"
    out.write_text(new)
