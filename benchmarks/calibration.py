"""Calibrated outputs of the default `attnfuse train` (a script, not a test): the expected calibration
error (15 bins) and NLL before/after temperature scaling on mfeat (seed 0, the default split) and
on scikit-learn's breast_cancer as two views (its first 15 / last 15 columns; seeds 0-2), and the
coverage and width of the 90% split-conformal intervals on scikit-learn's diabetes as two views
(clinical [4] / serum [6]; seeds 0-2).

    python benchmarks/calibration.py            # everything: benchmarks/results/calibration.json, RESULTS.md
    python benchmarks/calibration.py --quick    # a smoke run (one seed, 3 epochs), prints only

Every model is `attnfuse.pipeline.train` at its defaults (`--fusion auto`, 100 epochs, the default
70/15/15 split drawn by the seed), without the baselines (the weighted ensemble of the fusion
candidates: calibration is the fusion's), on one thread. The temperature and the half-widths are
fitted on the rows the ensemble was weighed on: every table here is bagged (under 10,000 rows), so
on the out-of-fold outputs of all train + valid rows. The numbers on the test rows are what carries over. Seconds: the
whole `train` call, and separately the temperature's fit (the golden-section search) on those rows.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _report import finished, one_thread, parser  # benchmarks/ is on sys.path
from attnfuse.calibration import (
    expected_calibration_error,
    fit_temperature,
    laplace_smoothing,
    softmax,
    temperature_nll,
)
from attnfuse.data import MultimodalDataset, RowBatches
from attnfuse.pipeline import TrainSpec, train
from attnfuse.training import predict
from fusion import machine, write_section

SECTION = "## Calibrated probabilities and prediction intervals"
RESULTS = Path(__file__).with_name("results") / "calibration.json"
LEVEL = 0.9


def breast_cancer() -> MultimodalDataset:
    """569 tumours, 30 measures: the first 15 columns and the last 15 as two views."""
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    return MultimodalDataset({"first": x[:, :15], "last": x[:, 15:]}, y.astype(np.int64), name="breast_cancer")


def diabetes() -> MultimodalDataset:
    """442 patients: age, sex, BMI, blood pressure | six blood serum measures."""
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True, scaled=False)
    return MultimodalDataset({"clinical": x[:, :4], "serum": x[:, 4:]}, y.astype(np.float32), name="diabetes")


# name -> (data source: a built-in's name or a loader, seeds, extra options). The tables show
# seeds 0-2 (mfeat: 0); breast_cancer's seeds 3-9 add to the comparison of the temperature's fits.
SETS = {
    "mfeat": ("mfeat", [0], {}),
    "breast_cancer": (breast_cancer, list(range(10)), {}),
    "diabetes": (diabetes, [0, 1, 2], {"interval": LEVEL}),
}
SHOWN_SEEDS = 3


def one_run(name: str, seed: int, epochs: int | None) -> dict:
    """The default training of one seed; its calibration record, test metrics, picked fusion, seconds."""
    source, _, extra = SETS[name]
    options = {"seed": seed, "baselines": False, **extra}
    if epochs is not None:
        options["epochs"] = epochs
    data = None
    if callable(source):
        data = source()
        options["data"] = name
    else:
        options["data"] = source
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = train(TrainSpec.from_options(options), Path(tmp) / "model", data=data)
        seconds = time.perf_counter() - start
        fits = _compare_fits(result) if "interval" not in extra else None
    rows = {part: len(rows) for part, rows in result.first.split.items()}
    return {
        "seed": seed,
        "picked": (result.selection or {}).get("picked", result.first.fusion),
        "test": result.report["test"],
        "calibration": result.report["calibration"],
        "rows": {**rows, "fitted": result.report["calibration"]["rows"]},
        "seconds": seconds,
        "fits": fits,
    }


def _compare_fits(result) -> dict:
    """The model's test NLL and ECE uncalibrated (``none``), with the temperature of the plain
    NLL fit (``plain``) and with the one fitted against Laplace-smoothed targets, what `train` does
    (``smoothed``), each fitted on the rows `train` fits it on (``"valid"`` here: the held-out half
    of the validation rows, or out-of-fold); those rows' errors, and the seconds of the smoothed fit
    (median of 5)."""
    first, data = result.first, result.data
    test = first.split["test"]
    z = {"test": predict(first.model, RowBatches(data, test, first.standardizer))}
    y = {"test": data.y[test]}
    if first.valid_outputs is not None:  # the ensemble's outputs on the rows it was weighed on
        z["valid"], y["valid"] = torch.from_numpy(first.valid_outputs), data.y[first.valid_rows]
    else:
        valid = first.split["valid"]
        z["valid"], y["valid"] = predict(first.model, RowBatches(data, valid, first.standardizer)), data.y[valid]
    smoothing = laplace_smoothing(len(y["valid"]))
    times = []
    for _ in range(5):
        start = time.perf_counter()
        smoothed = fit_temperature(z["valid"], y["valid"], smoothing=smoothing)
        times.append(time.perf_counter() - start)
    fits = {"none": 1.0, "plain": fit_temperature(z["valid"], y["valid"]), "smoothed": smoothed}
    out = {
        name: {
            "temperature": t,
            "test_nll": temperature_nll(z["test"], y["test"], t),
            "test_ece": expected_calibration_error(softmax(z["test"], t), y["test"]),
        }
        for name, t in fits.items()
    }
    errors = int((z["valid"].argmax(dim=1).numpy() != y["valid"]).sum())
    return {**out, "valid_errors": errors, "seconds": statistics.median(times)}


def mean_std(values: list[float], digits: int = 4) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{values[0]:.{digits}f}"


def render(results: dict) -> str:
    lines = [SECTION, ""]
    lines += [
        "Command: `python benchmarks/calibration.py` (raw numbers: `benchmarks/results/calibration.json`). "
        "The default `attnfuse train` (`--fusion auto`, the default 70/15/15 split of each seed, no baselines), "
        f"one thread. {results['machine']}; finished {results['finished']}, load average {results['load']}.",
        "",
        "### Temperature scaling: expected calibration error (15 bins) and NLL, before → after",
        "",
        "Fitted on the rows the ensemble was weighed on (bagged: the out-of-fold outputs of all train + valid "
        "rows); test rows never seen by the fit. "
        "Over several seeds: mean ± std.",
        "",
        "| data | seeds | fitted on/test rows | accuracy (test) | temperature | ECE (fitted on) | ECE test | NLL test |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in ("mfeat", "breast_cancer"):
        runs = [r for r in results["sets"].get(name, []) if r["seed"] < SHOWN_SEEDS]
        if not runs:
            continue
        cal = [r["calibration"] for r in runs]
        lines.append(
            f"| {name} | {', '.join(str(r['seed']) for r in runs)} | {_fitted(runs[0])}/{runs[0]['rows']['test']} "
            f"| {mean_std([100 * r['test']['accuracy'] for r in runs], 2)} % "
            f"| {mean_std([c['temperature'] for c in cal], 3)} "
            f"| {mean_std([c['valid']['ece_before'] for c in cal])} → {mean_std([c['valid']['ece_after'] for c in cal])} "
            f"| {mean_std([c['test']['ece_before'] for c in cal])} → {mean_std([c['test']['ece_after'] for c in cal])} "
            f"| {mean_std([c['test']['nll_before'] for c in cal])} → {mean_std([c['test']['nll_after'] for c in cal])} |"
        )
    lines += ["", "Per run (test ECE before → after, the candidate `auto` picked, seconds of `train`):", ""]
    for name in ("mfeat", "breast_cancer"):
        for r in [r for r in results["sets"].get(name, []) if r["seed"] < SHOWN_SEEDS]:
            c = r["calibration"]
            lines.append(
                f"- {name} seed {r['seed']}: T = {c['temperature']:.3f}, test ECE {c['test']['ece_before']:.4f} → "
                f"{c['test']['ece_after']:.4f}, picked {r['picked']}, {r['seconds']:.1f} s (the temperature's fit: "
                f"{1000 * r['fits']['seconds']:.1f} ms)"
            )
    lines += _fits_table(results)
    runs = results["sets"].get("diabetes")
    if runs:
        cal = [r["calibration"] for r in runs]
        lines += [
            "",
            f"### Split-conformal intervals at {LEVEL:g}: diabetes, two views",
            "",
            "The half-width is the ⌈(n + 1)·0.9⌉-th smallest absolute residual of the n rows it is fitted on "
            "(bagged: the out-of-fold outputs of all train + valid rows); "
            "coverage is the share of test targets inside their interval (guaranteed ≥ 0.9 in expectation over "
            "draws of exchangeable rows, not on any one split of a few dozen rows).",
            "",
            "| seed | fitted on/test rows | test R² | half-width | coverage (fitted on) | coverage test | mean width | picked |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r, c in zip(runs, cal):
            lines.append(
                f"| {r['seed']} | {_fitted(r)}/{r['rows']['test']} | {r['test']['r2']:.4f} "
                f"| {c['half_width'][0]:.1f} | {c['valid']['coverage']:.4f} | {c['test']['coverage']:.4f} "
                f"| {c['test']['width']:.1f} | {r['picked']} |"
            )
        lines.append(
            f"| mean ± std | | {mean_std([r['test']['r2'] for r in runs])} "
            f"| {mean_std([c['half_width'][0] for c in cal], 1)} | {mean_std([c['valid']['coverage'] for c in cal])} "
            f"| {mean_std([c['test']['coverage'] for c in cal])} | {mean_std([c['test']['width'] for c in cal], 1)} | |"
        )
    return "\n".join(lines) + "\n"


def _fitted(run: dict) -> str:
    """How many rows the calibration was fitted on (runs recorded before that was kept: validation)."""
    return str(run["rows"].get("fitted", run["rows"]["valid"]))


def _span(values: list, spec: str) -> str:
    """``lo-hi``, or the one value."""
    lo, hi = format(min(values), spec), format(max(values), spec)
    return lo if lo == hi else f"{lo}-{hi}"


def _fits_table(results: dict) -> list[str]:
    """The test NLL and ECE of three temperatures: none, the plain NLL fit, the smoothed fit."""
    lines = [
        "",
        "### Why the temperature is fitted against smoothed targets",
        "",
        "The same models (every seed run), their test rows: uncalibrated, with the temperature that minimises the "
        "validation NLL, and with the one `attnfuse train` fits (targets 1 - 1/(n + 2) on the label). "
        "Mean over the seeds; T as min-max.",
        "",
        "| data | seeds | fitted-on rows without an error | fit | T | test NLL | test ECE |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in ("mfeat", "breast_cancer"):
        runs = [r for r in results["sets"].get(name, []) if r.get("fits")]
        if not runs:
            continue
        clean = sum(r["fits"]["valid_errors"] == 0 for r in runs)
        seeds = _span([r["seed"] for r in runs], "d")
        for fit in ("none", "plain", "smoothed"):
            ts = _span([r["fits"][fit]["temperature"] for r in runs], ".3g")
            lines.append(
                f"| {name} | {seeds} | {clean} of {len(runs)} | {fit} "
                f"| {ts} | {statistics.mean(r['fits'][fit]['test_nll'] for r in runs):.4f} "
                f"| {statistics.mean(r['fits'][fit]['test_ece'] for r in runs):.4f} |"
            )
    return lines


def main() -> None:
    options = parser(
        __doc__,
        "smoke run: one seed, 3 epochs, nothing written",
        "only render RESULTS.md from results/calibration.json",
    )
    options.add_argument("--sets", nargs="+", choices=list(SETS), default=list(SETS))
    args = options.parse_args()
    one_thread()
    if args.render:
        results = json.loads(RESULTS.read_text())
    else:
        previous = json.loads(RESULTS.read_text()) if RESULTS.exists() and not args.quick else {"sets": {}}
        results = {"machine": machine(), "sets": dict(previous["sets"])}  # the sets not run now: as they were
        for name in args.sets:
            results["sets"][name] = []
            seeds = SETS[name][1][:1] if args.quick else SETS[name][1]
            for seed in seeds:
                run = one_run(name, seed, 3 if args.quick else None)
                print(name, json.dumps(run), flush=True)
                results["sets"].setdefault(name, []).append(run)
        results["finished"] = finished()
        results["load"] = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    text = render(results)
    print(text)
    if not args.quick:
        if not args.render:
            RESULTS.write_text(json.dumps(results, indent=1) + "\n")
        write_section(args.out, text, SECTION)


if __name__ == "__main__":
    main()
