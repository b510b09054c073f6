"""Attention-core benchmark: attnfuse.nn.MultiheadAttention vs torch.nn.MultiheadAttention vs the
lower bound (projections + raw SDPA), CPU float32, same weights, interleaved rounds.

    python benchmarks/attention.py            # full run, prints the table and writes RESULTS.md
    python benchmarks/attention.py --quick    # small sizes, prints only

What the contenders are, and what the numbers mean, is written next to the table in RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import attnfuse.nn
from _machine import machine

CONTENDERS = ("attnfuse", "torch", "lower bound")
BEGIN, END = "<!-- begin: benchmarks/attention.py -->", "<!-- end: benchmarks/attention.py -->"


class LowerBound(nn.Module):
    """The least work any multi-head attention does: one packed input linear (three for kdim != E),
    a head split, raw SDPA (an explicit softmax(QKᵀ)V with need_weights), the output linear. No
    checks, no masks, batch_first only. Parameter names are torch's, so its state_dict loads."""

    def __init__(self, E: int, H: int, kdim: int | None = None) -> None:
        super().__init__()
        self.H, self.packed = H, kdim in (None, E)
        if self.packed:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * E, E))
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(E, E))
            self.k_proj_weight = nn.Parameter(torch.empty(E, kdim))
            self.v_proj_weight = nn.Parameter(torch.empty(E, kdim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * E))
        self.out_proj = nn.Linear(E, E)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, need_weights: bool = False):
        N, L, E = q.shape
        if self.packed:
            q, k, v = F.linear(q, self.in_proj_weight, self.in_proj_bias).split(E, dim=-1)
        else:
            bq, bk, bv = self.in_proj_bias.chunk(3)
            q, k, v = (
                F.linear(q, self.q_proj_weight, bq),
                F.linear(k, self.k_proj_weight, bk),
                F.linear(v, self.v_proj_weight, bv),
            )
        q, k, v = (t.view(N, -1, self.H, E // self.H).transpose(1, 2) for t in (q, k, v))  # (N, H, L|S, hd)
        weights = None
        if need_weights:
            weights = torch.softmax((q * (E // self.H) ** -0.5) @ k.transpose(-2, -1), dim=-1)
            out, weights = weights @ v, weights.mean(dim=1)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(N, L, E)), weights


def build(name: str, E: int, H: int, kdim: int | None, state: dict) -> nn.Module:
    if name == "lower bound":
        m = LowerBound(E, H, kdim)
    else:
        cls = attnfuse.nn.MultiheadAttention if name == "attnfuse" else nn.MultiheadAttention
        m = cls(E, H, kdim=kdim, vdim=kdim, batch_first=True)
    m.load_state_dict(state)
    return m


def interleave(steps: dict, rounds: int, warmup: int = 1, number: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each step (the mean of ``number`` calls in a row), round-robin with a
    rotating start, so drifting load on a shared machine hits every contender alike. The one
    timing helper of the benchmarks."""
    names, times = list(steps), {n: [] for n in steps}
    for r in range(warmup + rounds):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            gc.collect()
            t0 = time.perf_counter()
            for _ in range(number):
                steps[n]()
            if r >= warmup:
                times[n].append((time.perf_counter() - t0) / number)
    return times


def steps_for(mods: dict, q: Tensor, kv: Tensor, mode: str, need_weights: bool) -> dict:
    """A training step (forward + backward, inputs require grad) or an inference call per contender."""
    grad = torch.randn(q.shape)

    def train(m):
        def step():
            m.train()
            m.zero_grad(set_to_none=True)
            q.grad = kv.grad = None
            m(q, kv, kv, need_weights=need_weights)[0].backward(grad)

        return step

    def infer(m):
        qd = q.detach()
        kvd = qd if kv is q else kv.detach()  # keep `query is key`: torch's fast path needs it

        def step():
            m.eval()
            with torch.inference_mode():
                m(qd, kvd, kvd, need_weights=need_weights)

        return step

    return {n: (train if mode == "train" else infer)(m) for n, m in mods.items()}


def run_block(title: str, B: int, L: int, E: int, H: int, kdim: int | None, args) -> list[dict]:
    torch.manual_seed(0)
    state = nn.MultiheadAttention(E, H, kdim=kdim, vdim=kdim, batch_first=True).state_dict()
    mods = {n: build(n, E, H, kdim, state) for n in CONTENDERS}
    q = torch.randn(B, L, E, requires_grad=True)
    kv = q if kdim is None else torch.randn(B, L, kdim, requires_grad=True)
    with torch.inference_mode():  # the contenders must agree before their times mean anything
        ref = mods["torch"].eval()(q.detach(), kv.detach(), kv.detach())
        for n in CONTENDERS:
            for a, b in zip(mods[n].eval()(q.detach(), kv.detach(), kv.detach(), need_weights=True), ref):
                torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m, n=n: f"{n} vs torch: {m}")
    rows = []
    for mode in ("train", "infer"):
        for nw in (False, True):
            t = interleave(steps_for(mods, q, kv, mode, nw), args.rounds, args.warmup)
            row = {"case": f"{title}, {'training step' if mode == 'train' else 'inference'}, need_weights={nw}"}
            row.update({n: (min(v), statistics.median(v)) for n, v in t.items()})
            for other in ("torch", "lower bound"):
                paired = statistics.median(a / b for a, b in zip(t["attnfuse"], t[other]))
                row[f"/{other}"] = (min(t["attnfuse"]) / min(t[other]), paired)
            print(fmt_row(row), flush=True)
            rows.append(row)
    return rows


def fmt_row(r: dict) -> str:
    times = " | ".join(f"{r[n][0] * 1e3:.0f} ({r[n][1] * 1e3:.0f})" for n in CONTENDERS)
    ratios = " | ".join(f"{r[k][0]:.3f} ({r[k][1]:.3f})" for k in ("/torch", "/lower bound"))
    return f"| {r['case']} | {times} | {ratios} |"


def long_sequence(name: str, mode: str, L: int, E: int, H: int) -> dict:
    """One contender, one call, in this (fresh) process: time and peak resident memory above the
    resident memory before the call (VmHWM, reset through /proc/self/clear_refs when allowed)."""

    def status_kib(field: str) -> int:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
        return int(line.split()[1])

    torch.manual_seed(0)
    m = build(name, E, H, None, nn.MultiheadAttention(E, H, batch_first=True).state_dict())
    x = torch.randn(1, 128, E, requires_grad=True)
    steps_for({name: m}, x, x, mode, False)[name]()  # one-time costs (kernel selection, allocator) not counted
    x = torch.randn(1, L, E, requires_grad=True)
    step = steps_for({name: m}, x, x, mode, False)[name]
    gc.collect()
    with contextlib.suppress(OSError):  # "5": reset the peak (VmHWM) to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
    before, t0 = status_kib("VmRSS"), time.perf_counter()
    step()
    return {"time_s": time.perf_counter() - t0, "peak_mib": (status_kib("VmHWM") - before) / 1024}


def fits_in_memory(nbytes: int) -> bool:
    """MemAvailable leaves room for ``nbytes`` plus 4 GiB (the machine is shared)."""
    line = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemAvailable:"))
    return int(line.split()[1]) * 1024 > 1.25 * nbytes + 4 * 1024**3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes, few rounds; writes nothing")
    p.add_argument("--rounds", type=int, default=9, help="timed rounds per case (default 9)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds per case (default 2)")
    p.add_argument("--long", type=int, default=16384, help="sequence length of the memory case (0: skip)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    p.add_argument("--child", nargs=5, help=argparse.SUPPRESS)  # NAME MODE L E H: one long-sequence call
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        name, mode, *sizes = args.child
        print(json.dumps(long_sequence(name, mode, *map(int, sizes))))
        return
    B, L, E, H = (4, 128, 512, 8) if args.quick else (32, 512, 512, 8)
    if args.quick:
        args.rounds, args.warmup, args.long = 2, 1, 2048
    args.machine = machine()
    print(args.machine)
    print("| case | attnfuse (ms) | torch (ms) | lower bound (ms) | attnfuse / torch | attnfuse / lower bound |")
    rows = run_block(f"self-attention B={B} L=S={L} E={E}", B, L, E, H, None, args)
    rows += run_block(f"cross-attention B={B} L=S={L} E={E} kdim=vdim=256", B, L, E, H, 256, args)
    long = []
    for mode in ("infer", "train") if args.long else ():
        for name in CONTENDERS:
            # torch's CPU inference fast path builds the (H, L, L) scores even without weights.
            if name == "torch" and mode == "infer" and not fits_in_memory(H * args.long**2 * 4):
                long.append({"mode": mode, "contender": name, "skipped": "not run: the (H, L, L) scores do not fit"})
                continue
            cmd = [sys.executable, __file__, "--child", name, mode, str(args.long), str(E), str(H)]
            cmd += ["--threads", str(torch.get_num_threads())]
            r = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
            long.append({"mode": mode, "contender": name, **r})
            print(f"L={args.long} {mode} {name}: {r['time_s']:.2f} s, peak +{r['peak_mib']:.0f} MiB", flush=True)
    if not args.quick:
        write_tables(args.out, rows, long, args, B, L, E, H)


def write_tables(path: Path, rows: list[dict], long: list[dict], args, B: int, L: int, E: int, H: int) -> None:
    """Replace what this script generates in `path`, between its BEGIN and END markers (the run
    line and the two tables); the prose around them is RESULTS.md's own."""
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        BEGIN,
        f"Run: {date}, `python benchmarks/attention.py{' --threads ' + str(args.threads) if args.threads else ''}`; "
        f"{args.machine}; B={B}, L=S={L}, E={E}, {H} heads; "
        f"{args.warmup} warm-up + {args.rounds} timed rounds.",
        "",
        "| case | attnfuse (ms) | torch (ms) | lower bound (ms) | attnfuse / torch | attnfuse / lower bound |",
        "|---|---:|---:|---:|---:|---:|",
        *(fmt_row(r) for r in rows),
        "",
        f"Long sequence: B=1, L=S={args.long}, E={E}, {H} heads, need_weights=False.",
        "",
        "| mode | contender | time (s) | peak memory above baseline (MiB) |",
        "|---|---|---:|---:|",
        *(
            f"| {r['mode']} | {r['contender']} | – | {r['skipped']} |"
            if "skipped" in r
            else f"| {r['mode']} | {r['contender']} | {r['time_s']:.2f} | {r['peak_mib']:.1f} |"
            for r in long
        ),
        END,
    ]
    text = path.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    path.write_text(text[:start] + "\n".join(lines) + text[end:])
    print(f"wrote the tables between the markers of benchmarks/attention.py in {path}")


if __name__ == "__main__":
    main()
