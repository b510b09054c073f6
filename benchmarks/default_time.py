"""Wall time of the default `attnfuse train` against an earlier version of the code, side by side
(a script, not a test): each version trains the same table at its defaults in a fresh process, on
one thread, the versions interleaved round by round; the median of the rounds is printed.

    python benchmarks/default_time.py --before ../old/src             # mfeat, seed 0's split
    python benchmarks/default_time.py --before ../old/src --data diabetes --rounds 3
    python benchmarks/default_time.py --before ../old/src --threads default   # the cores the command would use

``--before`` is the ``src`` folder of another checkout (e.g. ``git worktree add ../old e8cd12f``);
this checkout's ``src`` is "now". The split is the one `benchmarks/fusion.py --part baselines`
uses for the seed. Nothing is written: the figures go into RESULTS.md by hand, with the machine
line printed here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# Run in a fresh process with PYTHONPATH set to one version's src: save the seed's split of the
# table (by this checkout's benchmark code), train at the defaults, print the seconds.
CHILD = """
import json, sys, time
sys.path.insert(0, {benchmarks!r})
import torch
from threadpoolctl import threadpool_limits
if {one_thread}:
    torch.set_num_threads(1)
    threadpool_limits(1)
else:  # what the attnfuse command does: torch on the free cores; scikit-learn's own default
    from attnfuse.threads import set_threads
    set_threads()
from attnfuse.pipeline import TrainSpec, train
result = train(TrainSpec.from_options({{"data": {path!r}, "seed": {seed}, **{options!r}}}))
print(json.dumps({{"seconds": {{k: round(v, 2) for k, v in result.seconds.items()}},
                  "test": result.report["test"]}}))
"""


def save_table(name: str, seed: int, path: Path) -> None:
    from attnfuse.data import save_npz
    from fusion import BASELINE_SETS, with_split

    loader, _, fractions, _, _ = BASELINE_SETS[name]
    save_npz(with_split(loader(seed), seed, fractions), path)


def one(src: Path, path: Path, seed: int, one_thread: bool, options: dict) -> tuple[float, dict]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    if one_thread:
        env["OMP_NUM_THREADS"] = "1"
    else:
        env.pop("OMP_NUM_THREADS", None)
    code = CHILD.format(benchmarks=str(HERE), path=str(path), seed=seed, one_thread=one_thread, options=options)
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return time.perf_counter() - start, json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True, help="the src folder of the earlier version")
    parser.add_argument("--data", default="mfeat", help="a table of benchmarks/fusion.py's BASELINE_SETS")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--threads", choices=["1", "default"], default="1", help="1, or what the attnfuse command picks (free cores)"
    )
    parser.add_argument("--now", default="{}", help='options of "now" only, as JSON (e.g. \'{"bags": 0}\')')
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    from fusion import machine

    versions = {"before": args.before.resolve(), "now": (HERE.parent / "src").resolve()}
    times: dict[str, list[float]] = {v: [] for v in versions}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{args.data}.npz"
        save_table(args.data, args.seed, path)
        for r in range(args.rounds):
            for name, src in versions.items():
                options = json.loads(args.now) if name == "now" else {}
                seconds, record = one(src, path, args.seed, args.threads == "1", options)
                times[name].append(seconds)
                print(f"round {r + 1} {name}: {seconds:.1f} s, parts {record['seconds']}, test {record['test']}")
    before, now = statistics.median(times["before"]), statistics.median(times["now"])
    print(
        f"threads: {args.threads}, now with {args.now}; {args.data} seed {args.seed}: before {before:.1f} s, now {now:.1f} s, ratio {now / before:.2f}x"
    )
    print(f"{machine()}, load average {', '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
