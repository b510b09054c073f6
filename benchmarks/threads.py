"""Threads on a shared machine: wall time of one fixed small training (mfeat, ``self`` fusion,
d_model 64, 8 epochs, no baselines) per thread setting, with the cores idle and with one core
held by a busy loop (another process), each setting in a fresh process (OpenMP reads its
environment when torch loads).

    python benchmarks/threads.py                 # prints a Markdown table
    python benchmarks/threads.py --rounds 3      # best and median of 3 rounds per cell

Settings: torch's default (a thread per core), OMP_NUM_THREADS=1, OMP_WAIT_POLICY=PASSIVE (a
waiting thread sleeps), ``attnfuse.threads.set_threads()`` (the cores other processes leave free),
and both. The busy loop starts ``--settle`` seconds before the busy rounds."""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import subprocess
import sys
import time

TRAIN = """
import time, sys
{setup}
import torch
from attnfuse.pipeline import TrainSpec, train
{threads}
spec = TrainSpec.from_options({{"data": "mfeat", "fusion": "self", "d_model": 64, "epochs": 8, "baselines": False}})
start = time.perf_counter()
train(spec)
print(torch.get_num_threads(), time.perf_counter() - start)
"""

SETTINGS = {
    "torch default (1 thread per core)": ({}, "", ""),
    "OMP_NUM_THREADS=1": ({"OMP_NUM_THREADS": "1"}, "", ""),
    "OMP_WAIT_POLICY=PASSIVE": ({"OMP_WAIT_POLICY": "PASSIVE"}, "", ""),
    "set_threads() (free cores)": ({}, "", "from attnfuse.threads import set_threads; set_threads()"),
    "PASSIVE + set_threads()": (
        {},
        "import os; os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')",
        "from attnfuse.threads import set_threads; set_threads()",
    ),
}


def once(env: dict, setup: str, threads: str) -> tuple[int, float]:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    out = subprocess.run(
        [sys.executable, "-c", TRAIN.format(setup=setup, threads=threads)],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return int(out[-2]), float(out[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--settle", type=float, default=2.0, help="seconds the busy loop runs before timing")
    args = parser.parse_args()
    results: dict[tuple[str, str], list[float]] = {}
    used: dict[tuple[str, str], int] = {}
    for state in ("idle", "1 core busy"):
        busy = None
        if state != "idle":
            busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            time.sleep(args.settle)
        try:
            for r in range(args.rounds):
                for name, (env, setup, threads) in SETTINGS.items():
                    n, seconds = once(env, setup, threads)
                    results.setdefault((name, state), []).append(seconds)
                    used[name, state] = n
                    print(f"{state} round {r + 1} {name}: {n} threads, {seconds:.1f} s", file=sys.stderr, flush=True)
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        cpu = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), cpu)
    print(f"{os.cpu_count()} cores ({cpu}); best (median) of {args.rounds} rounds, seconds of training\n")
    print("| setting | idle: threads | idle: s | 1 core busy: threads | 1 core busy: s |")
    print("|---|---|---|---|---|")
    for name in SETTINGS:
        cells = []
        for state in ("idle", "1 core busy"):
            t = results[name, state]
            cells += [str(used[name, state]), f"{min(t):.1f} ({statistics.median(t):.1f})"]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
