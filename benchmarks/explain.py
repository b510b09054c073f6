"""Explanation benchmarks (a script, not a test): what each method costs, and what it finds.

    python benchmarks/explain.py                # everything, writes its section of benchmarks/RESULTS.md
    python benchmarks/explain.py --quick        # a smoke run (few rows and epochs), prints only
    python benchmarks/explain.py --part timing  # one part: timing, planted or masking

timing   seconds per method on mfeat (`self`, test split) and on a MOSEI-sized `mult` (random
         features, T=50, dims 300/74/35, d_model 30, 5 heads, 5 cross + 5 self layers).
planted  share of the video attribution on the planted step of the synthetic lookup, per method,
         for `cross` with 1 and 2 layers.
masking  masking importance on a data set with a pure-noise modality and two copies of one
         informative modality, trained with and without modality dropout.
"""

from __future__ import annotations

import argparse
import platform
import re
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from attnfuse.data import MultimodalDataset, load_mfeat, make_planted, make_split
from attnfuse.explain import (
    attention_rollout,
    gradient_attribution,
    masking_importance,
    modality_attention,
)
from attnfuse.fusion import build_model
from attnfuse.training import Parts, TrainConfig, fit_model, model_config
from fusion import mosei_like  # the MOSEI-sized random data of the fusion benchmark (benchmarks/ is on sys.path)

SECTION = "## Explanations"
METHODS = ("attention", "mask", "gxi", "ig", "rollout")


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        "unknown CPU",
    )
    threads = torch.get_num_threads()
    return (
        f"{cpu}, {threads} thread{'s' if threads != 1 else ''}, torch {torch.__version__}, "
        f"Python {platform.python_version()}"
    )


def time_methods(model, batch, task: str, n_steps: int) -> dict[str, float]:
    """Seconds for each method over ``batch`` (one run each, after a warm-up on 4 rows)."""
    calls = {
        "attention": lambda b: modality_attention(model, b),
        "mask": lambda b: masking_importance(model, b, task),
        "gxi": lambda b: gradient_attribution(model, b, task, "gxi"),
        "ig": lambda b: gradient_attribution(model, b, task, "ig", n_steps=n_steps),
        "rollout": lambda b: attention_rollout(model, b),
    }
    small = batch.select(torch.arange(4))
    out = {}
    for name in METHODS:
        calls[name](small)
        start = time.perf_counter()
        calls[name](batch)
        out[name] = time.perf_counter() - start
    return out


def timing(quick: bool) -> list[str]:
    epochs, mosei_rows = (2, 16) if quick else (30, 128)
    data = load_mfeat()
    result = fit_model(
        Parts.of(data, make_split(data, 0)), "self", {"modality_dropout": 0.2}, TrainConfig(epochs=epochs, seed=0)
    )
    test = dict(make_split(data, seed=0))["test"]
    mfeat = time_methods(result.model, result.standardizer.transform(data).to_batch(test), "classification", 50)
    print("mfeat", mfeat, flush=True)
    mosei = mosei_like(mosei_rows)
    torch.manual_seed(0)
    overrides = {"d_model": 30, "num_layers": 5, "self_layers": 5, "nhead": 5}
    mult = build_model("mult", model_config("mult", mosei, **overrides)).eval()
    big = time_methods(mult, mosei.to_batch(), "regression", 50)
    print("mosei", big, flush=True)
    lines = [
        "### Time per method",
        "",
        f"`self` on mfeat (defaults, {epochs} epochs, modality dropout 0.2; test split, 300 rows; test accuracy "
        f"{result.metrics['test']['accuracy']:.4f}) and an untrained MOSEI-sized `mult` (random features, T=50, "
        f"dims 300/74/35, d_model 30, 5 heads, 5 cross + 5 self layers; {mosei_rows} rows; the weights do not change "
        "the cost). One run per method after a warm-up on 4 rows; IG with 50 steps. mask = 6 hidden sets for mult "
        "(3 modalities + 3 pairs), 21 for mfeat (6 + 15 pairs).",
        "",
        "| method | mfeat `self`, 300 rows (s) | MOSEI-sized `mult`, "
        + f"{mosei_rows} rows (s) | `mult`: ms per row |",
        "|---|---:|---:|---:|",
    ]
    for name in METHODS:
        lines.append(f"| {name} | {mfeat[name]:.2f} | {big[name]:.2f} | {1000 * big[name] / mosei_rows:.0f} |")
    return [*lines, ""]


def planted_shares(layers: int, epochs: int) -> dict[str, float]:
    """Share of each method's video mass on the planted step, over the test split."""
    data = make_planted(n=1200, seed=1)
    result = fit_model(
        Parts.of(data, make_split(data, 0)),
        "cross",
        {"num_layers": layers},
        TrainConfig(epochs=epochs, patience=15, seed=0),
    )
    test = dict(make_split(data, seed=0))["test"]
    batch = result.standardizer.transform(data).to_batch(test)
    step, rows = data.info["planted_step"][test], np.arange(len(test))
    out = {"r2": result.metrics["test"]["r2"]}
    with torch.no_grad():
        _, maps = result.model(batch, return_attention=True)
    for i, m in enumerate(maps):
        out[f"attention, layer {i}"] = float(m.weights.mean(1)[:, 0].numpy()[rows, step].mean())
    out["rollout"] = float(attention_rollout(result.model, batch).step_relevance("video")[rows, step].mean())
    for method in ("ig", "gxi"):
        per_step = np.abs(gradient_attribution(result.model, batch, "regression", method).per_step("video"))
        out[f"{method} (mass)"] = float(per_step[rows, step].sum() / per_step.sum())
        out[f"{method} (top step)"] = float((per_step.argmax(1) == step).mean())
    return out


def planted(quick: bool) -> list[str]:
    epochs = 3 if quick else 60
    results = {layers: planted_shares(layers, epochs) for layers in (1, 2)}
    print("planted", results, flush=True)
    keys = [k for k in results[2] if k != "r2"]
    lines = [
        "### Planted lookup: share of the video attribution on the planted step",
        "",
        f"`cross` fusion (d_model 64, {epochs} epochs, lr 1e-3) on `make_planted(n=1200, seed=1)`, test split "
        "(180 rows). attention / rollout: mean weight on the planted step (rollout normalised within video); "
        "IG / gradient × input: the planted step's share of Σ|per-step attribution| over the rows (mass), and "
        "the share of rows whose largest step is the planted one (top step).",
        "",
        "| measure | 1 layer | 2 layers |",
        "|---|---:|---:|",
        f"| test R² | {results[1]['r2']:.3f} | {results[2]['r2']:.3f} |",
    ]
    for k in keys:
        one = f"{results[1][k]:.3f}" if k in results[1] else "—"
        lines.append(f"| {k} | {one} | {results[2][k]:.3f} |")
    return [*lines, ""]


def noise_and_copies(n: int = 600, seed: int = 0) -> MultimodalDataset:
    rng = np.random.default_rng(seed)
    signal, shared, noise = (rng.normal(size=(n, 6)).astype(np.float32) for _ in range(3))
    y = signal @ rng.normal(size=6) + shared @ rng.normal(size=6)
    features = {"signal": signal, "copy_a": shared, "copy_b": shared.copy(), "noise": noise}
    return MultimodalDataset(features, (y / y.std()).astype(np.float32))


def masking(quick: bool) -> list[str]:
    epochs = 3 if quick else 40
    data = noise_and_copies()
    test = dict(make_split(data, seed=0))["test"]
    lines = [
        "### Masking importance: a pure-noise modality and two copies",
        "",
        f"y = f(signal) + g(shared), modalities signal, copy_a = copy_b = shared, noise (600 samples, 6 features "
        f"each); d_model 16 (1 layer, 2 heads for `self`), {epochs} epochs; R² lost on the test split (90 rows) "
        "when the modality is hidden through its mask.",
        "",
        "| fusion | modality dropout | test R² | signal | noise | copy_a | copy_b | copy_a + copy_b | interaction |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for fusion in ("concat", "self"):
        for p in (0.0, 0.3):
            overrides = {
                "d_model": 16,
                "modality_dropout": p,
                **({"nhead": 2, "num_layers": 1} if fusion == "self" else {}),
            }
            result = fit_model(
                Parts.of(data, make_split(data, 0)), fusion, overrides, TrainConfig(epochs=epochs, seed=0)
            )
            imp = masking_importance(result.model, result.standardizer.transform(data).to_batch(test), "regression")
            d = {m: imp.drop(m) for m in imp.modalities}
            lines.append(
                f"| {fusion} | {p} | {result.metrics['test']['r2']:.3f} | {d['signal']:.3f} | {d['noise']:.3f} | "
                f"{d['copy_a']:.3f} | {d['copy_b']:.3f} | {imp.drop('copy_a', 'copy_b'):.3f} | "
                f"{imp.interaction('copy_a', 'copy_b'):.3f} |"
            )
            print(lines[-1], flush=True)
    return [*lines, ""]


def write_section(path: Path, text: str) -> None:
    """Replace this script's section of RESULTS.md (or append it), leaving the others alone."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    new = pattern.sub(lambda _: text, old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
    path.write_text(new)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: few rows and epochs, nothing written")
    parser.add_argument("--part", choices=["all", "timing", "planted", "masking"], default="all")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 resists a busy machine best")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    parts = {"timing": timing, "planted": planted, "masking": masking}
    body = []
    for name, part in parts.items():
        if args.part in ("all", name):
            body += part(args.quick)
    end = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    lines = [
        SECTION,
        "",
        f"Machine: {machine()}; {date.today().isoformat()}; load average {load} at the start, {end} at the end "
        "(a shared machine: the times are upper bounds). CPU float32. Command: `python benchmarks/explain.py"
        + (f" --threads {args.threads}" if args.threads else "")
        + "`.",
        "",
        *body,
    ]
    text = "\n".join(lines)
    print(text)
    if not args.quick and args.part == "all":
        write_section(args.out, text)


if __name__ == "__main__":
    main()
