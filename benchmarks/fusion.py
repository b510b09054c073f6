"""Fusion benchmarks (a script, not a test): accuracy on UCI mfeat, R² on the planted synthetic task,
and MulT training throughput at MOSEI sizes with the fused vs the explicit attention path.

    python benchmarks/fusion.py                 # everything, writes benchmarks/RESULTS.md
    python benchmarks/fusion.py --quick         # a smoke run (2 splits, few epochs), prints only
    python benchmarks/fusion.py --part mfeat    # one part: mfeat, planted or throughput

mfeat protocol: 10 stratified splits (seeds 0..9), 80% train+valid (70% train, 10% validation for
early stopping) and 20% test; the same splits for every model; mean ± sample std of test accuracy.
"""

from __future__ import annotations

import argparse
import platform
import re
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from attnfuse.data import MultimodalDataset, iter_batches, load_mfeat, make_planted
from attnfuse.fusion import FUSIONS, build_model
from attnfuse.training import TrainConfig, model_config, run

SECTION = "## Fusion models"
MFEAT_FRACTIONS = (0.7, 0.1, 0.2)


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, Python {platform.python_version()}, "
        f"{date.today().isoformat()}"
    )


# (label, fusion, model overrides, training overrides): every fusion at its defaults, plus the
# best setting found for `self` (per-modality pooling, label smoothing).
# mult runs narrower: at d_model 64 its six per-target self-attention stacks are (6-1)*64 = 320 wide
# (25M parameters, 5 s an epoch here), far more than 2,000 samples call for.
MFEAT_VARIANTS = [(f, f, {}, {}) for f in FUSIONS if f != "mult"] + [
    ("mult, --d-model 32, 1 self-attention layer", "mult", {"d_model": 32, "self_layers": 1}, {}),
    ("self, --pooling modality --label-smoothing 0.1", "self", {"pooling": "modality"}, {"label_smoothing": 0.1}),
]


def mfeat_accuracy(splits: int, epochs: int) -> dict[str, list[float]]:
    data = load_mfeat()
    scores: dict[str, list[float]] = {}
    for label, fusion, overrides, train in MFEAT_VARIANTS:
        scores[label] = []
        for seed in range(splits):
            start = time.perf_counter()
            config = TrainConfig(epochs=epochs, seed=seed, **train)
            result = run(data, fusion, overrides, config, fractions=MFEAT_FRACTIONS)
            scores[label].append(result.metrics["test"]["accuracy"])
            print(
                f"mfeat {label}, split {seed}: test accuracy {scores[label][-1]:.4f} "
                f"(best epoch {result.best_epoch}, {time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    return scores


def planted_r2(seeds: int, epochs: int, fusions: list[str]) -> dict[str, list[float]]:
    scores: dict[str, list[float]] = {f: [] for f in fusions}
    for seed in range(seeds):
        data = make_planted(seed=seed)
        for fusion in fusions:
            result = run(data, fusion, {}, TrainConfig(epochs=epochs, seed=seed))
            scores[fusion].append(result.metrics["test"]["r2"])
            print(f"planted {fusion:8s} seed {seed}: test R² {scores[fusion][-1]:.4f}", flush=True)
    return scores


def mosei_like(n: int, seed: int = 0) -> MultimodalDataset:
    """Random features with MOSEI's aligned sizes (T=50; text 300, audio 74, vision 35)."""
    rng = np.random.default_rng(seed)
    features = {
        name: rng.normal(size=(n, 50, dim)).astype(np.float32)
        for name, dim in (("text", 300), ("audio", 74), ("vision", 35))
    }
    return MultimodalDataset(features, rng.uniform(-3, 3, n).astype(np.float32))


def mult_throughput(steps: int, repeats: int) -> dict[str, float]:
    """Training samples/s of mult (d_model 30, 5 layers, 5 heads, batch 24), fused kernels vs the
    explicit-matmul attention path (return_attention=True computes every weight matrix)."""
    data = mosei_like(24 * steps)
    overrides = {"d_model": 30, "num_layers": 5, "self_layers": 5, "nhead": 5, "dropout": 0.1}
    torch.manual_seed(0)
    model = build_model("mult", model_config("mult", data, **overrides))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = data.to_batch()

    def epoch(explicit: bool) -> float:
        model.train()
        start = time.perf_counter()
        for b in iter_batches(batch, 24):
            out = model(b, return_attention=True)[0] if explicit else model(b)
            loss = torch.nn.functional.l1_loss(out.squeeze(-1), b.y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return len(batch) / (time.perf_counter() - start)

    epoch(False), epoch(True)  # warm-up
    fused, explicit = [], []
    for _ in range(repeats):  # interleaved, so machine noise hits both alike
        fused.append(epoch(False))
        explicit.append(epoch(True))
    return {"fused": statistics.median(fused), "explicit": statistics.median(explicit)}


def fmt(scores: list[float], pct: bool) -> str:
    k = 100.0 if pct else 1.0
    std = statistics.stdev(scores) if len(scores) > 1 else 0.0
    return f"{k * statistics.mean(scores):.2f} ± {k * std:.2f}" if pct else f"{statistics.mean(scores):.4f} ± {std:.4f}"


def write_section(path: Path, text: str) -> None:
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    new = pattern.sub(lambda _: text, old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
    path.write_text(new)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer splits/epochs, nothing written")
    parser.add_argument("--part", choices=["all", "mfeat", "planted", "throughput"], default="all")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = parser.parse_args()
    fusions = list(FUSIONS)
    splits, epochs, seeds, steps, repeats = (2, 15, 1, 5, 1) if args.quick else (10, 100, 3, 40, 3)

    lines = [SECTION, "", f"Machine: {machine()}. CPU float32. Command: `python benchmarks/fusion.py`.", ""]
    if args.part in ("all", "throughput"):
        t = mult_throughput(steps, repeats)
        print(f"mult throughput: {t}", flush=True)
        lines += [
            "### `mult` training throughput at MOSEI sizes",
            "",
            "T=50, dims 300/74/35, d_model 30, 5 cross layers + 5 self layers, 5 heads, batch 24, "
            f"{24 * steps} samples per epoch, median of {repeats} interleaved epochs.",
            "",
            "| attention path | samples/s | ratio |",
            "|---|---|---|",
            f"| fused kernels (`F.scaled_dot_product_attention`) | {t['fused']:.0f} | 1.00 |",
            f"| explicit matmul + softmax (weights materialised) | {t['explicit']:.0f} | "
            f"{t['explicit'] / t['fused']:.2f} |",
            "",
        ]
    if args.part in ("all", "mfeat"):
        acc = mfeat_accuracy(splits, epochs)
        lines += [
            f"### UCI mfeat: test accuracy (%), {splits} stratified 80/20 splits (seeds 0..{splits - 1}; "
            "10% of the data carved from the 80% for early stopping)",
            "",
            "Default settings of `attnfuse train` (d_model 64, 2 layers, 4 heads, dropout 0.1, AdamW 1e-3, "
            f"batch 64, up to {epochs} epochs, patience 20). Simple baselines reach 98.6–98.7% and TMC 98.5% "
            "(published figures, not run here).",
            "",
            "| fusion | mean ± std | min | max |",
            "|---|---|---|---|",
        ]
        lines += [f"| {f} | {fmt(s, True)} | {100 * min(s):.2f} | {100 * max(s):.2f} |" for f, s in acc.items()]
        lines.append("")
    if args.part in ("all", "planted"):
        r2 = planted_r2(seeds, epochs, fusions)
        lines += [
            f"### Planted cross-modal lookup (synthetic regression): test R², {seeds} seeds",
            "",
            "`make_planted()` defaults: 2,000 samples, text query (16-d), video of 8 steps (key 16-d + value "
            "8-d), noise 0.1; split 70/15/15 by seed. Pooling destroys which step matches; attention can find it.",
            "",
            "| fusion | R² mean ± std |",
            "|---|---|",
        ]
        lines += [f"| {f} | {fmt(s, False)} |" for f, s in r2.items()]
        lines.append("")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.quick:
        write_section(args.out, text)
        print(f"written to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
