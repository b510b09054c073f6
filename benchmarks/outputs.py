"""The default's outputs a user acts on, on every table of the baselines benchmark (a script, not a
test): for classification the expected calibration error (15 bins) and NLL of the test rows before
and after temperature scaling, for regression the coverage and mean width of the 90%
split-conformal intervals (`--interval 0.9`) on the test rows.

    python benchmarks/outputs.py                          # every table: results/outputs-<name>.json, RESULTS.md
    python benchmarks/outputs.py --datasets diabetes fair # some tables (the others' results are kept)
    python benchmarks/outputs.py --render                 # only RESULTS.md, from results/

Every model is `attnfuse.pipeline.train` at its defaults (`--fusion auto`: the weighted ensemble of
the candidates and the baselines, bagged below 10,000 rows), one thread, on the splits of
`benchmarks/fusion.py --part baselines` (seeds 0-2; mfeat: seed 0). The temperature and the
intervals are fitted on the rows the ensemble was weighed on (a bagged run's out-of-fold
predictions of all train + valid rows, or, from 10,000 rows, the half of the validation rows early
stopping did not see); the test rows never.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

from _report import one_thread  # benchmarks/ is on sys.path
from attnfuse.pipeline import TrainSpec, train
from fusion import BASELINE_SETS, machine, with_split, write_section  # benchmarks/ is on sys.path

SECTION = "## The default's calibrated outputs on every table"
RESULTS_DIR = Path(__file__).with_name("results")
LEVEL = 0.9
SEEDS = {"mfeat": [0], "planted": [0, 1, 2], "fair": [0, 1, 2]}  # the others: seeds 0-2 as well
DEFAULT_SEEDS = [0, 1, 2]


def one_run(name: str, seed: int) -> dict:
    """The default training of one split; its test metrics, calibration record and weights."""
    loader, _, fractions, _, _ = BASELINE_SETS[name]
    data = with_split(loader(seed), seed, fractions)
    options = {"data": name, "seed": seed, **({"interval": LEVEL} if data.task == "regression" else {})}
    start = time.perf_counter()
    result = train(TrainSpec.from_options(options), data=data)
    weighted = result.report["weighted"]
    return {
        "seed": seed,
        "task": data.task,
        "test": result.report["test"],
        "calibration": result.report["calibration"],
        "fitted_on": weighted["fitted_on"],
        "rows": weighted["rows"],
        "target_std": float(data.y.std()) if data.task == "regression" else None,
        "seconds": time.perf_counter() - start,
    }


def mean_std(values: list[float], digits: int = 4) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"


def render(results: dict[str, dict]) -> str:
    first = next(iter(results.values()))
    lines = [
        SECTION,
        "",
        "Command: `python benchmarks/outputs.py` (raw numbers: `benchmarks/results/outputs-<name>.json`). The "
        "default `attnfuse train` (the weighted ensemble of the candidates and the baselines; regression with "
        f"`--interval {LEVEL:g}`), one thread, on the splits of the baselines table (seeds given). "
        f"{first['machine']}; finished {first['finished']}. Mean ± std over the seeds.",
        "",
        "| data | seeds | fitted on | accuracy (test) | temperature | test ECE before → after | test NLL before → after |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        runs = r["runs"]
        if runs[0]["task"] != "classification":
            continue
        cal = [x["calibration"] for x in runs]
        lines.append(
            f"| {name} | {', '.join(str(x['seed']) for x in runs)} | {runs[0]['rows']} {runs[0]['fitted_on']} rows "
            f"| {mean_std([100 * x['test']['accuracy'] for x in runs], 2)} % | {mean_std([c['temperature'] for c in cal], 3)} "
            f"| {mean_std([c['test']['ece_before'] for c in cal])} → {mean_std([c['test']['ece_after'] for c in cal])} "
            f"| {mean_std([c['test']['nll_before'] for c in cal])} → {mean_std([c['test']['nll_after'] for c in cal])} |"
        )
    lines += [
        "",
        f"Prediction intervals at {LEVEL:g} (split-conformal on the held-out residuals): the share of test targets "
        "inside their interval, and its mean width next to the target's standard deviation.",
        "",
        "| data | seeds | fitted on | test R² | coverage (test) | coverage − 0.9 | mean width | target std |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        runs = r["runs"]
        if runs[0]["task"] != "regression":
            continue
        cal = [x["calibration"] for x in runs]
        coverage = [c["test"]["coverage"] for c in cal]
        lines.append(
            f"| {name} | {', '.join(str(x['seed']) for x in runs)} | {runs[0]['rows']} {runs[0]['fitted_on']} rows "
            f"| {mean_std([x['test']['r2'] for x in runs])} | {mean_std(coverage)} "
            f"| {statistics.mean(coverage) - LEVEL:+.4f} | {mean_std([c['test']['width'] for c in cal], 3)} "
            f"| {runs[0]['target_std']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", choices=list(BASELINE_SETS), default=list(BASELINE_SETS))
    parser.add_argument("--render", action="store_true", help="only render RESULTS.md from results/")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = parser.parse_args()
    one_thread()
    if not args.render:
        for name in args.datasets:
            runs = []
            for seed in SEEDS.get(name, DEFAULT_SEEDS):
                runs.append(one_run(name, seed))
                print(name, json.dumps(runs[-1]), flush=True)
            finished = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
            record = {"runs": runs, "machine": machine(), "finished": finished, "load": os.getloadavg()}
            (RESULTS_DIR / f"outputs-{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    found = {n: RESULTS_DIR / f"outputs-{n}.json" for n in BASELINE_SETS}
    results = {n: json.loads(p.read_text()) for n, p in found.items() if p.exists()}
    text = render(results)
    print(text)
    write_section(args.out, text, SECTION)


if __name__ == "__main__":
    main()
