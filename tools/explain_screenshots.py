"""Screenshots of an ``attnfuse explain`` report, as the README shows them (needs chromium).

The README's two images were made with:

    attnfuse train --fusion self --modality-dropout 0.2 --epochs 40 --out runs/mfeat
    attnfuse explain --model runs/mfeat --method all --samples 3
    python tools/explain_screenshots.py runs/mfeat/explain --top docs/images/explain_report.png --top-height 1450

    attnfuse train --data synthetic-regression --fusion cross --layers 1 --modality-dropout 0.1 --epochs 60 \
        --out runs/planted
    attnfuse explain --model runs/planted --method all --samples 3
    python tools/explain_screenshots.py runs/planted/explain --sample 3 docs/images/explain_sample.png \
        --sample-height 1420

``--top`` captures the start of the report (summary, agreement); ``--sample ROW PNG`` one
per-sample section, cut out of the report into a page of its own so that it starts at the top.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


def screenshot(page: Path, png: Path, width: int, height: int) -> None:
    browser = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    if browser is None:
        raise SystemExit("no chromium found (Debian: apt-get install chromium)")
    png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        args = [
            *FLAGS,
            f"--user-data-dir={profile}",
            f"--screenshot={png.resolve()}",
            f"--window-size={width},{height}",
        ]
        subprocess.run([browser, *args, page.resolve().as_uri()], check=True, capture_output=True, timeout=120)
    print(f"{png} ({width}x{height})")


def section(report: str, anchor: str) -> str:
    """The report's page with only the section whose heading has id ``anchor``."""
    start = report.index(f'<h2 id="{anchor}">')
    end = report.find("<h2", start + 1)
    head = report[: report.index("<h1")]
    return head + report[start : end if end >= 0 else report.index("</body>")] + "</body></html>"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report_dir", type=Path, help="an explain output directory (with report.html)")
    parser.add_argument("--top", type=Path, help="PNG of the start of the report")
    parser.add_argument("--top-height", type=int, default=1250)
    parser.add_argument("--sample", nargs=2, metavar=("ROW", "PNG"), help="PNG of one per-sample section")
    parser.add_argument("--sample-height", type=int, default=1250)
    parser.add_argument("--width", type=int, default=1100)
    args = parser.parse_args()
    report = args.report_dir / "report.html"
    if args.top:
        screenshot(report, args.top, args.width, args.top_height)
    if args.sample:
        row, png = args.sample
        text = report.read_text()
        if not re.search(rf'<h2 id="sample-{row}">', text):
            raise SystemExit(f"{report}: no per-sample section for row {row}")
        with tempfile.TemporaryDirectory() as tmp:
            page = Path(tmp) / "sample.html"
            page.write_text(section(text, f"sample-{row}"))
            screenshot(page, Path(png), args.width, args.sample_height)


if __name__ == "__main__":
    main()
