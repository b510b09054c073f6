"""attnfuse.nn speed primitives at MOSEI sizes, against the plain torch formulation, side by side in one
process, interleaved: dropout, attention with dropout, padding masks, the non-finite guard, and a
MulT-like stack built from attnfuse.nn layers.

    python benchmarks/nn_primitives.py                  # prints, and writes its tables in RESULTS.md
    python benchmarks/nn_primitives.py --quick          # few rounds, prints only
    python benchmarks/nn_primitives.py --before REV     # "before" = attnfuse/nn at git revision REV

"Before" is the plain torch formulation of each primitive or, for the rows that compare two versions of
attnfuse.nn, the package at git revision --before (read with `git archive` into a temporary package, so both
run in this process; without --before those rows are skipped).
Sizes: batch 24, T=50, d_model 30, 5 heads, dropout 0.1 (MulT on CMU-MOSEI); CPU float32.
"""

from __future__ import annotations

import argparse
import datetime
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import attnfuse.nn as after
from _machine import machine
from attention import interleave
from attnfuse.nn import functional as AF
from attnfuse.nn.dropout import dropout
from speed import load_before as load_package
from speed import unguarded

B, T, D, H, P = 24, 50, 30, 5, 0.1
BEGIN, END = "<!-- begin: benchmarks/nn_primitives.py -->", "<!-- end: benchmarks/nn_primitives.py -->"


def load_before(rev: str):
    """attnfuse.nn of git revision ``rev`` (None if git cannot): the whole package is loaded, as
    ``attnfuse_before`` (speed.py's loader), since attnfuse.nn imports from its parent package."""
    package = load_package(argparse.Namespace(src=None, before=rev))
    return None if package is None else package.nn


def timed(steps: dict, args, number: int = 1) -> dict[str, float]:
    """Minimum over interleaved rounds of the seconds per call (the mean of ``number`` calls)."""
    return {n: min(v) for n, v in interleave(steps, args.rounds, args.warmup, number).items()}


def fwd_bwd(fn, *shape_or_tensors):
    """A step that runs ``fn`` on fresh-grad inputs and backpropagates a fixed random gradient."""
    xs = [t if isinstance(t, torch.Tensor) else torch.randn(t, requires_grad=True) for t in shape_or_tensors]
    grad = None

    def step():
        nonlocal grad
        out = fn(*xs)
        grad = torch.randn(out.shape) if grad is None else grad
        out.backward(grad)

    return step


# --------------------------------------------------------------------------- the cases


def dropout_rows(args) -> list[tuple[str, float, float]]:
    rows = []
    for label, shape in [
        ("attention probabilities (B, H, T, T)", (B, H, T, T)),
        ("feed-forward hidden (B, T, 4d)", (B, T, 4 * D)),
        ("residual (B, T, d)", (B, T, D)),
    ]:
        t = timed(
            {
                "before": fwd_bwd(lambda x: F.dropout(x, P, True), shape),
                "after": fwd_bwd(lambda x: dropout(x, P), shape),
            },
            args,
            number=20,
        )
        rows.append((f"dropout, {label}, forward + backward", t["before"], t["after"]))
    return rows


def attention_rows(args) -> list[tuple[str, float, float]]:
    """SDPA with dropout (CPU: its math path with F.dropout) vs the explicit path with the packed mask."""
    rows = []
    for label, (b, h, n, hd), number in [
        ("MulT cross layer, head dim 6", (B, H, T, D // H), 10),
        ("MulT self layer, head dim 12", (B, H, T, 2 * D // H), 10),
        ("large: B=8, 8 heads, L=S=256, head dim 64", (8, 8, 256, 64), 1),
    ]:
        q, k, v = (torch.randn(b, h, n, hd, requires_grad=True) for _ in range(3))
        masks = AF.Masks(None, None)
        t = timed(
            {
                "before": fwd_bwd(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, dropout_p=P), q, k, v),
                "after": fwd_bwd(lambda q, k, v, m=masks: AF.attend(q, k, v, m, P, None, False)[0], q, k, v),
            },
            args,
            number,
        )
        rows.append((f"attention with dropout, {label}, forward + backward", t["before"], t["after"]))
    return rows


def cross_stack(lib, layers: int = 5, dropout: float = P) -> nn.ModuleList:
    torch.manual_seed(0)
    return nn.ModuleList(
        lib.CrossAttention(D, D, H, 4 * D, dropout, "gelu", batch_first=True, norm_first=True) for _ in range(layers)
    )


def mask_rows(args, before) -> list[tuple[str, float, float]]:
    """Five cross-attention layers over one context, training step without dropout (so only the
    masking differs): before, the padding tensor is checked and merged again in every layer;
    after, it is prepared once as a KeyPaddingMask (and is no mask at all when nothing is padded)."""
    if before is None:
        return []
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(B, T, D, generator=g), torch.randn(B, T, D, generator=g)
    old, new = cross_stack(before, dropout=0.0), cross_stack(after, dropout=0.0)
    new.load_state_dict(old.state_dict())
    rows = []
    for label, padded in [("some keys padded", 10), ("nothing padded", 0)]:
        pad = torch.zeros(B, T, dtype=torch.bool)
        pad[0, T - padded :] = True

        def run(stack, prepare, pad=pad):
            def step():
                q, mask = x, after.KeyPaddingMask(pad) if prepare else pad
                for layer in stack:
                    q = layer(q, ctx, mask)
                q.sum().backward()

            return step

        t = timed({"before": run(old, False), "after": run(new, True)}, args, number=3)
        rows.append((f"5 cross layers, padding merged per layer vs KeyPaddingMask, {label}", t["before"], t["after"]))
    return rows


def overhead_rows(args, before) -> list[tuple[str, float, float]]:
    """Per-call cost where the tensors are tiny (B=2, T=3): the Python and dispatch overhead of one
    layer, training mode, forward only."""
    if before is None:
        return []
    g = torch.Generator().manual_seed(2)
    x, ctx = torch.randn(2, 3, D, generator=g), torch.randn(2, 3, D, generator=g)
    pad = torch.tensor([[False, False, True], [False, False, False]])
    old, new = cross_stack(before, layers=1).train(), cross_stack(after, layers=1).train()

    def call(layer, mask):
        def step():
            with torch.no_grad():
                layer(x, ctx, mask)

        return step

    t = timed({"before": call(old[0], pad), "after": call(new[0], after.KeyPaddingMask(pad))}, args, number=50)
    return [("one cross-attention layer at B=2, T=3 (per-call overhead), forward", t["before"], t["after"])]


def mult_block(lib):
    """One MulT target (Tsai et al., 2019) from attnfuse.nn layers: two sources x 5 cross layers
    (d 30), concatenated, then 5 self-attention layers of width 60; pre-norm, GELU, dropout 0.1."""
    torch.manual_seed(0)
    return nn.ModuleDict(
        {
            "cross": nn.ModuleList(cross_stack(lib) for _ in range(2)),
            "self": lib.TransformerEncoder(2 * D, H, 5, 8 * D, P, "gelu", batch_first=True, norm_first=True),
        }
    )


def mult_step(block, lib, prepared: bool):
    g = torch.Generator().manual_seed(1)
    target, sources = torch.randn(B, T, D, generator=g), [torch.randn(B, T, D, generator=g) for _ in range(2)]
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[0, 40:] = True  # one sample shorter: a real mask

    def step():
        outs = []
        for source, stack in zip(sources, block["cross"]):
            mask = lib.KeyPaddingMask(pad) if prepared else pad
            x = target
            for layer in stack:
                x = layer(x, source, mask)
            outs.append(x)
        block["self"](torch.cat(outs, dim=-1), src_key_padding_mask=pad).sum().backward()

    return step


def stack_rows(args, before) -> tuple[list[tuple[str, float, float]], dict]:
    new = mult_block(after).train()
    steps = {}
    if before is not None:
        old = mult_block(before).train()
        new.load_state_dict(old.state_dict())
        steps["before"] = mult_step(old, before, prepared=False)
    steps["after"] = mult_step(new, after, prepared=True)
    t = timed(steps, args)
    rows = [("MulT-like block (one target), training step", t.get("before", float("nan")), t["after"])]

    # The guard's cost: the same block with the CPU check answered "no" without summing.
    t = timed({"off": unguarded(steps["after"]), "on": steps["after"]}, args, number=3)
    rows.append(("same block, non-finite guard off (before) vs on (after)", t["off"], t["on"]))
    for shape in [(B, T, D), (32, 512, 512)]:  # a MOSEI layer's input; the attention benchmark's input
        x = torch.randn(shape, requires_grad=True)
        t = timed({"check": lambda x=x: AF.needs_guard(x)}, args, number=100 if x.numel() < 10**6 else 5)
        rows.append((f"the guard's check alone, one {tuple(shape)} input", float("nan"), t["check"]))
    return rows, {name: profile(step) for name, step in steps.items()}


def profile(step, top: int = 8) -> list[tuple[str, float]]:
    """(op, share of the step's self CPU time) for the ``top`` ops of 3 steps."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    step()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [(e.key, e.self_cpu_time_total / total) for e in events[:top]]


# --------------------------------------------------------------------------- report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", default=None, help="git revision whose attnfuse/nn is 'before' (default: none)")
    p.add_argument("--rounds", type=int, default=15, help="timed rounds per case (default 15)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds per case (default 2)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="3 rounds, prints only")
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.rounds, args.warmup = 3, 1
    args.machine = machine()
    print(args.machine, flush=True)
    before = load_before(args.before) if args.before else None
    rows = dropout_rows(args) + attention_rows(args) + mask_rows(args, before) + overhead_rows(args, before)
    stack, profiles = stack_rows(args, before)
    rows += stack
    lines = [
        BEGIN,
        f"Run: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}, `python benchmarks/nn_primitives.py"
        f"{' --threads ' + str(args.threads) if args.threads else ''}{' --before ' + args.before if args.before else ''}`; "
        f"{args.machine}; before = attnfuse/nn at "
        f"{args.before or '(not compared)'}; minimum of {args.rounds} interleaved rounds after {args.warmup} warm-up rounds.",
        "",
        "| primitive | before (ms) | after (ms) | after / before |",
        "|---|---:|---:|---:|",
        *(
            f"| {name} | – | {a * 1e3:.2f} | – |"
            if math.isnan(b)
            else f"| {name} | {b * 1e3:.2f} | {a * 1e3:.2f} | {a / b:.2f} |"
            for name, b, a in rows
        ),
        "",
        "Where the block's training step goes (torch.profiler, share of self CPU time, top ops):",
        "",
        "| " + " | ".join(profiles) + " |",
        "|" + "---|" * len(profiles),
        *(
            "| " + " | ".join(f"`{ops[i][0]}` {ops[i][1]:.1%}" for ops in profiles.values()) + " |"
            for i in range(min(len(ops) for ops in profiles.values()))
        ),
        END,
    ]
    print("\n".join(lines))
    if not args.quick:
        text = args.out.read_text()
        start, end = text.index(BEGIN), text.index(END) + len(END)
        args.out.write_text(text[:start] + "\n".join(lines) + text[end:])
        print(f"wrote the tables between the markers of benchmarks/nn_primitives.py in {args.out}")


if __name__ == "__main__":
    main()
