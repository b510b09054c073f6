"""What the timing scripts share when they write their results: a part's block of RESULTS.md,
replaced in place so that one part can be re-run alone. Imported as a sibling module (the scripts
run as ``python benchmarks/NAME.py``, which puts this folder on the path)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["write_part"]


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
