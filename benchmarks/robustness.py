"""Robustness benchmark (a script, not a test): what `attnfuse evaluate --missing` measures, on the
planted lookup and on mfeat.

    python benchmarks/robustness.py            # both, writes its section of benchmarks/RESULTS.md
    python benchmarks/robustness.py --quick    # a smoke run (few epochs), prints only
    python benchmarks/robustness.py --datasets planted
    python benchmarks/robustness.py --render   # RESULTS.md from the raw numbers in results/

planted  `attnfuse train --data synthetic-regression --fusion cross` (the README's runs/planted),
         seed 0: text queries the video step whose key matches it; the answer is that step's value.
mfeat    `attnfuse train` (the default: --fusion auto, with the baselines), seed 0.

Each model is trained by `attnfuse.pipeline.train` at its defaults on one thread, then
`attnfuse.robustness.missing_modalities` (what `evaluate --missing` runs, seed 0) measures it and
the baselines on the test split. Raw numbers: benchmarks/results/robustness-<name>.json; plots:
benchmarks/results/robustness-<name>.png.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path

from _report import finished, one_thread, parser  # benchmarks/ is on sys.path
from attnfuse.pipeline import TrainSpec, load_trained, train
from attnfuse.robustness import Robustness, missing_modalities, plot_robustness
from fusion import machine, write_section

SECTION = "## When a modality goes missing"
RESULTS_DIR = Path(__file__).with_name("results")
# name -> (training options, what the run is, in words)
RUNS = {
    "planted": (
        {"data": "synthetic-regression", "fusion": "cross", "seed": 0},
        "`attnfuse train --data synthetic-regression --fusion cross` (seed 0)",
    ),
    "mfeat": ({"data": "mfeat", "seed": 0}, "`attnfuse train` (mfeat, `--fusion auto`, seed 0)"),
}


def measure(name: str, epochs: int | None) -> dict:
    options, described = RUNS[name]
    if epochs is not None:
        options = {**options, "epochs": epochs}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        train(TrainSpec.from_options(options), Path(tmp) / "model")
        trained_s = time.perf_counter() - start
        net, config, standardizer, data = load_trained(Path(tmp) / "model")
        metrics = json.loads((Path(tmp) / "model" / "metrics.json").read_text())
    result = missing_modalities(net, config, standardizer, data)
    return {
        "name": name,
        "run": described,
        "fusion": config["fusion"],
        "picked": (config.get("auto") or {}).get("picked"),
        "weights": {n: w for n, w in (metrics.get("weighted") or {}).get("weights", {}).items() if w > 0},
        "test": metrics["test"],
        "missing": result.to_dict(),
        "seconds": {"training": trained_s, "robustness": result.seconds},
        "machine": machine(),
        "finished": finished(),
        "load": [round(x, 1) for x in os.getloadavg()],
        "python": platform.python_version(),
        "_result": result,
    }


def from_json(entry: dict) -> Robustness:
    """The measurement of a results/robustness-<name>.json (to plot it again)."""
    m = entry["missing"]
    task = "regression" if m["metric"] == "r2" else "classification"
    same = {k: m[k] for k in ("metric", "rows", "n", "seed", "fractions", "models", "absent", "noise")}
    return Robustness(task=task, scales=m["noise_scales"], **same)


def plot(entry: dict, result: Robustness) -> None:
    title = f"{entry['missing']['models'][0]} on {entry['name']} (seed 0): test rows"
    plot_robustness(result, RESULTS_DIR / f"robustness-{entry['name']}.png", title=title)


def _cell(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def render(entry: dict) -> str:
    m = entry["missing"]
    metric = "R²" if m["metric"] == "r2" else m["metric"]
    fusion = m["models"][0]
    weights = ", ".join(f"{n} {w:.2f}" for n, w in sorted(entry.get("weights", {}).items(), key=lambda t: -t[1]))
    described = f"the {fusion} of {weights}" if weights else f"`{fusion}`"
    lines = [
        f"### {entry['name']}: {metric} on the {m['n']} test rows",
        "",
        f"{entry['run']}: the model is {described}"
        + (f" (its best single candidate: {entry['picked']})" if entry.get("picked") else "")
        + f"; {entry['machine']}; finished {entry['finished']}, load average "
        + ", ".join(map(str, entry["load"]))
        + f". Training {entry['seconds']['training']:.0f} s, the robustness measurement "
        f"{entry['seconds']['robustness']:.1f} s (model and baselines, every level). Plot: "
        f"[results/robustness-{entry['name']}.png](results/robustness-{entry['name']}.png).",
        "",
        f"A modality absent from a share of the test rows ({metric}):",
        "",
        "| modality | model | " + " | ".join(f"{f:.0%}" for f in m["fractions"]) + " |",
        "|---|---|" + "---:|" * len(m["fractions"]),
    ]
    for kind, levels in (("absent", m["fractions"]), ("noise", m["noise_scales"])):
        if kind == "noise":
            lines += [
                "",
                f"Gaussian noise on a modality, standard deviations of its training rows ({metric}):",
                "",
                "| modality | model | " + " | ".join(f"{s:g}" for s in levels) + " |",
                "|---|---|" + "---:|" * len(levels),
            ]
        for modality, models in m[kind].items():
            for model in m["models"]:
                label = (f"**{model}**" + ("" if weights else " (fusion)")) if model == fusion else model
                cells = " | ".join(_cell(c[m["metric"]]) for c in models[model])
                lines.append(f"| {modality} | {label} | {cells} |")
    costs = ", ".join(
        f"{mod} {cells[fusion][0][m['metric']] - cells[fusion][-1][m['metric']]:.4f}"
        for mod, cells in m["absent"].items()
    )
    lines += [
        "",
        f"The {metric} the {fusion if weights else fusion + ' model'} loses when a modality is absent from every test row (0% minus 100%; "
        f"negative: better without it): {costs}.",
        "",
    ]
    return "\n".join(lines)


def render_section(entries: list[dict]) -> str:
    head = [
        SECTION,
        "",
        "Command: `python benchmarks/robustness.py` (what `attnfuse evaluate --missing` measures, seed 0 for the rows "
        "made absent and the noise). For each modality in turn: absent (an all-False mask for the fusion; mean "
        "imputation of its pooled features for the baselines) from 0-100% of the test rows, the same rows for every "
        "model; then Gaussian noise on its features in standardised units, on every test row. Baselines fitted on the "
        "model's training rows as `attnfuse train` fits them. One thread.",
        "",
    ]
    return "\n".join(head + [render(e) for e in entries])


def main() -> None:
    options = parser(
        __doc__, "smoke run: 3 epochs, nothing written", "only render RESULTS.md and the plots from results/"
    )
    options.add_argument("--datasets", nargs="+", choices=list(RUNS), default=list(RUNS))
    args = options.parse_args()
    one_thread()
    for name in [] if args.render else args.datasets:
        entry = measure(name, 3 if args.quick else None)
        result = entry.pop("_result")
        print(render(entry), flush=True)
        if not args.quick:
            RESULTS_DIR.mkdir(exist_ok=True)
            (RESULTS_DIR / f"robustness-{name}.json").write_text(json.dumps(entry, indent=1) + "\n")
            plot(entry, result)
    if not args.quick:
        found = [RESULTS_DIR / f"robustness-{n}.json" for n in RUNS]
        entries = [json.loads(p.read_text()) for p in found if p.exists()]
        if args.render:
            for entry in entries:
                plot(entry, from_json(entry))
        write_section(args.out, render_section(entries), SECTION)


if __name__ == "__main__":
    main()
