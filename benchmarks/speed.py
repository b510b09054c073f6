"""Fusion-model speed: training steps and inference of attnfuse's fusion models, side by side in
one process, interleaved, against the reference MulT, against the torch.nn compositions a user
would write instead, and (with --before or --src) against another version of attnfuse.

    python benchmarks/speed.py --threads 1         # the default parts; writes their blocks in RESULTS.md
    python benchmarks/speed.py --quick             # 3 rounds, prints only
    python benchmarks/speed.py --part mult         # one part (repeatable): mult, nn, infer, profile,
                                                   # kernel, accuracy, compile, guard; its block alone is replaced
    python benchmarks/speed.py --device cuda --precision bf16   # on a GPU, under bf16 autocast
    python benchmarks/speed.py --before REV        # adds "before" = attnfuse at git revision REV (git archive)
    python benchmarks/speed.py --src PATH          # adds "before" = the attnfuse package in PATH (a checkout's src/)

Sizes are MulT's on CMU-MOSEI: batch 24, T = 50, text/audio/vision features 300/74/35, d_model 30,
5 heads, 5 cross-modal and 5 self-attention layers, dropout 0.1; one training step = forward, L1
loss, backward, Adam (lr 1e-3). CPU float32 unless --device says otherwise. Every block names
the CPU (model and vendor, from /proc/cpuinfo) it was measured on: a ratio measured on one vendor's
CPU need not hold on another's.

Contenders of a part run in one process, round-robin with a rotating start (benchmarks/attention.py's
``interleave``), so a shared machine's drifting load hits them alike; reported are medians and bests
over the rounds, and for ratios the median of the per-round ratios. Threads: attnfuse's default
(the cores other processes leave free, attnfuse.threads) unless --threads N; on a shared machine
use ``--threads 1``. "before" is the whole attnfuse package of another revision, loaded under the
name ``attnfuse_before`` next to the current one.

The ``compile`` part (not in the default set: compiling takes minutes on a small CPU) times
``torch.compile`` of one fusion model against eager: its first steps (the compilation) and its
steady state, separately. The ``guard`` part (not in the default set either: off the CPU the
guard always runs, so it is a GPU question) times a training step with attnfuse's non-finite guard
and with it switched off, beside torch.nn, and counts the kernels each launches.

The reference MulT (yaohungt/Multimodal-Transformer, MIT) is imported at run time from
``../shared/anchors/mult-reference`` (beside the checkout, or beside the main checkout of a git
worktree; --anchors overrides), never copied here; without it its rows are skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib.util
import io
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import _report
import attnfuse
from _machine import machine
from attnfuse.nn import kernels
from attnfuse.threads import set_threads

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Fusion model speed"
DIMS = {"text": 300, "audio": 74, "vision": 35}
T, D_MODEL, HEADS, LAYERS, P = 50, 30, 5, 5, 0.1
MOSEI = {"d_model": D_MODEL, "nhead": HEADS, "num_layers": LAYERS, "dropout": P}
MULT = {**MOSEI, "self_layers": LAYERS}
# The reference's own hyper-parameters at MOSEI sizes (shared/anchors/mult-reference/README.md).
MULT_REFERENCE = dict(
    orig_d_l=300,
    orig_d_a=74,
    orig_d_v=35,
    lonly=True,
    aonly=True,
    vonly=True,
    num_heads=5,
    layers=5,
    attn_dropout=0.1,
    attn_dropout_a=0.0,
    attn_dropout_v=0.0,
    relu_dropout=0.1,
    res_dropout=0.1,
    out_dropout=0.0,
    embed_dropout=0.25,
    attn_mask=True,
    output_dim=1,
)
MATMULS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm")


# --------------------------------------------------------------------------- what is compared


def load_before(args) -> types.ModuleType | None:
    """The attnfuse package of --src, or of git revision --before, as ``attnfuse_before``; None
    when neither is given."""
    if args.src is None and args.before is None:
        return None
    if args.src is not None:
        folder = Path(args.src)
    else:
        try:
            tar = subprocess.run(
                ["git", "archive", args.before, "src/attnfuse"], cwd=ROOT, capture_output=True, check=True
            ).stdout
        except (OSError, subprocess.CalledProcessError) as e:
            print(f"no 'before' package (git archive {args.before}: {e}); its columns are skipped", file=sys.stderr)
            return None
        folder = Path(tempfile.mkdtemp(prefix="attnfuse_before_")) / "src"
        with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
            archive.extractall(folder.parent, filter="data")
    init = folder / "attnfuse" / "__init__.py"
    if not init.exists():
        sys.exit(f"--src: expected a folder holding attnfuse/__init__.py, got {folder}")
    spec = importlib.util.spec_from_file_location(
        "attnfuse_before", init, submodule_search_locations=[str(init.parent)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["attnfuse_before"] = module
    spec.loader.exec_module(module)
    return module


def anchor_folder(args) -> Path | None:
    """shared/anchors/mult-reference beside this checkout or beside the main checkout."""
    if args.anchors is not None:
        return Path(args.anchors) if Path(args.anchors).is_dir() else None
    roots = [ROOT.parent]
    try:
        common = subprocess.run(
            ["git", "rev-parse", "--path-format=absolute", "--git-common-dir"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        roots.append(Path(common).parent.parent)  # <main checkout>/.git -> beside the main checkout
    except (OSError, subprocess.CalledProcessError):
        pass
    for root in roots:
        folder = root / "shared" / "anchors" / "mult-reference"
        if (folder / "src" / "models.py").exists():
            return folder
    return None


def reference_mult(folder: Path) -> nn.Module:
    """The reference MulT (imported from its folder, never copied) with its MOSEI hyper-parameters."""
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    from src.models import MULTModel  # the reference's own package layout

    return MULTModel(types.SimpleNamespace(**MULT_REFERENCE))


class TorchEmbedding(nn.Module):
    """What a user writes: a Linear per modality plus learned type and position embeddings, dropout."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.proj = nn.ModuleDict({n: nn.Linear(k, d) for n, k in DIMS.items()})
        self.modality = nn.Parameter(torch.randn(len(DIMS), d) * 0.02)
        self.position = nn.Parameter(torch.randn(T, d) * 0.02)
        self.drop = nn.Dropout(P)

    def forward(self, x: dict[str, Tensor]) -> dict[str, Tensor]:
        return {n: self.drop(self.proj[n](x[n]) + self.modality[i] + self.position) for i, n in enumerate(self.proj)}


def torch_head(d: int) -> nn.Module:
    return nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.GELU(), nn.Dropout(P), nn.Linear(2 * d, 1))


def torch_mean(x: Tensor, valid: Tensor) -> Tensor:
    w = valid.unsqueeze(-1).to(x.dtype)  # (B, T, 1)
    return (x * w).sum(1) / w.sum(1).clamp_min(1.0)


class TorchCrossBlock(nn.Module):
    """Pre-norm cross-attention block from torch.nn parts: x + MHA(LN(x), LN(c)), then x + FF(LN(x))."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm_q, self.norm_c, self.norm_ff = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, HEADS, dropout=P, batch_first=True)
        self.drop = nn.Dropout(P)
        self.ff = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Dropout(P), nn.Linear(4 * d, d), nn.Dropout(P))

    def forward(self, x: Tensor, context: Tensor, pad: Tensor) -> Tensor:
        c = self.norm_c(context)
        x = x + self.drop(self.attn(self.norm_q(x), c, c, key_padding_mask=pad, need_weights=False)[0])
        return x + self.ff(self.norm_ff(x))


class TorchFusion(nn.Module):
    """``self``, ``cross`` or ``bicross`` as a user would write them with torch.nn (the widths,
    depths, pooling and head of attnfuse's defaults): forward(x, valid) -> (B, 1)."""

    def __init__(self, kind: str, d: int = D_MODEL) -> None:
        super().__init__()
        self.kind, self.embed, self.norm, self.head = kind, TorchEmbedding(d), nn.LayerNorm(d), torch_head(d)
        if kind == "self":
            layer = nn.TransformerEncoderLayer(d, HEADS, 4 * d, P, activation="gelu", batch_first=True, norm_first=True)
            self.encoder = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
        else:
            self.ab = nn.ModuleList(TorchCrossBlock(d) for _ in range(LAYERS))
            self.ba = nn.ModuleList(TorchCrossBlock(d) for _ in range(LAYERS)) if kind == "bicross" else None

    def forward(self, x: dict[str, Tensor], valid: dict[str, Tensor]) -> Tensor:
        h = self.embed(x)
        if self.kind == "self":
            tokens, ok = torch.cat(list(h.values()), 1), torch.cat(list(valid.values()), 1)
            return self.head(torch_mean(self.norm(self.encoder(tokens, src_key_padding_mask=~ok)), ok))
        a, a_ok = h["text"], valid["text"]
        b, b_ok = torch.cat([h["audio"], h["vision"]], 1), torch.cat([valid["audio"], valid["vision"]], 1)
        for i in range(LAYERS):
            if self.ba is None:
                a = self.ab[i](a, b, ~b_ok)
            else:
                a, b = self.ab[i](a, b, ~b_ok), self.ba[i](b, a, ~a_ok)
        if self.ba is None:
            return self.head(torch_mean(self.norm(a), a_ok))
        return self.head(torch_mean(self.norm(torch.cat([a, b], 1)), torch.cat([a_ok, b_ok], 1)))


def mosei_inputs(batch: int, device: torch.device, seed: int = 0) -> tuple[dict, dict, Tensor]:
    """Random features of MOSEI's sizes, every token valid, regression targets (B, 1)."""
    g = torch.Generator().manual_seed(seed)
    x = {n: torch.randn(batch, T, k, generator=g).to(device) for n, k in DIMS.items()}
    valid = {n: torch.ones(batch, T, dtype=torch.bool, device=device) for n in DIMS}
    return x, valid, torch.randn(batch, 1, generator=g).to(device)


def attnfuse_model(lib: types.ModuleType, fusion: str, overrides: dict, device: torch.device) -> nn.Module:
    modalities = [{"name": n, "dim": k, "length": T, "is_sequence": True} for n, k in DIMS.items()]
    torch.manual_seed(0)
    return lib.fusion.build_model(fusion, {"modalities": modalities, "out_dim": 1, **overrides}).to(device)


class Contender:
    """A model and how to call it: ``forward()`` -> (B, 1) on fixed inputs of ``batch`` samples.
    ``autocast`` (set once by --precision, alike for every contender): the mixed-precision dtype
    the forward passes run under, or None for float32."""

    autocast: torch.dtype | None = None

    def __init__(self, model: nn.Module, forward: Callable[[], Tensor], y: Tensor) -> None:
        self.model, self.forward, self.y = model, forward, y
        self.optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def _precision(self) -> contextlib.AbstractContextManager:
        if self.autocast is None:
            return contextlib.nullcontext()  # float32: the step runs what it ran before --precision existed
        return torch.autocast(self.y.device.type, dtype=self.autocast)

    def train_step(self) -> None:
        self.model.train()
        with self._precision():
            loss = F.l1_loss(self.forward().float(), self.y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def train_forward(self) -> None:
        self.model.train()
        with self._precision():
            self.forward()

    def inference(self) -> None:
        self.model.eval()
        with torch.inference_mode(), self._precision():
            self.forward()


def of_attnfuse(lib, fusion: str, overrides: dict, batch: int, device: torch.device) -> Contender:
    model = attnfuse_model(lib, fusion, overrides, device)
    x, valid, y = mosei_inputs(batch, device)
    b = lib.data.Batch(x, valid, y)
    return Contender(model, lambda: model(b), y)


def of_torch(kind: str, batch: int, device: torch.device) -> Contender:
    torch.manual_seed(0)
    model = TorchFusion(kind).to(device)
    x, valid, y = mosei_inputs(batch, device)
    return Contender(model, lambda: model(x, valid), y)


def of_reference(folder: Path, batch: int, device: torch.device) -> Contender:
    torch.manual_seed(0)
    model = reference_mult(folder).to(device)
    x, _, y = mosei_inputs(batch, device)
    return Contender(model, lambda: model(x["text"], x["audio"], x["vision"])[0], y)


def same_weights(after: Contender, before: Contender | None) -> None:
    """Load after's weights into before and check that both compute the same function (eval)."""
    if before is None:
        return
    before.model.load_state_dict(after.model.state_dict())
    after.model.eval(), before.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(after.forward(), before.forward(), atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(steps: dict[str, Callable[[], None]], args, number: int | None = None) -> dict[str, list[float]]:
    """Seconds per call of each step (mean of --number calls), round-robin with a rotating start
    (as benchmarks/attention.py's ``interleave``, with a device sync around each round)."""
    names, times = list(steps), {n: [] for n in steps}
    number = number or args.number
    for r in range(args.warmup + args.rounds):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            gc.collect()
            sync(args.torch_device)
            t0 = time.perf_counter()
            for _ in range(number):
                steps[n]()
            sync(args.torch_device)
            if r >= args.warmup:
                times[n].append((time.perf_counter() - t0) / number)
    return times


def unguarded(step: Callable[[], None]) -> Callable[[], None]:
    """``step`` with the non-finite guard switched off (``needs_guard`` answers False, where the
    attention core asks it): exact for finite inputs, so it times what the guard costs."""
    from attnfuse.nn import attention as attention_module
    from attnfuse.nn import functional as functional_module

    def run() -> None:
        real = functional_module.needs_guard
        attention_module.needs_guard = functional_module.needs_guard = lambda *inputs: False
        try:
            step()
        finally:
            attention_module.needs_guard = functional_module.needs_guard = real

    return run


def rates(times: list[float], samples: int) -> tuple[float, float]:
    """(median, best) samples/s over the rounds."""
    return samples / statistics.median(times), samples / min(times)


def paired(times: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of (a's samples/s) / (b's samples/s) in the same round."""
    return statistics.median(tb / ta for ta, tb in zip(times[a], times[b]))


# --------------------------------------------------------------------------- parts


def part_mult(args, before, anchors) -> list[str]:
    dev = args.torch_device
    contenders = {"attnfuse": of_attnfuse(attnfuse, "mult", MULT, 24, dev)}
    if before is not None:
        contenders["attnfuse before"] = of_attnfuse(before, "mult", MULT, 24, dev)
        same_weights(contenders["attnfuse"], contenders["attnfuse before"])
    if anchors is not None:
        contenders["reference MulT"] = of_reference(anchors, 24, dev)
    else:
        print("reference MulT: no shared/anchors/mult-reference folder, its row is skipped", file=sys.stderr)
    times = interleaved({n: c.train_step for n, c in contenders.items()}, args)
    lines = [
        "| model | parameters | samples/s, median | samples/s, best | attnfuse / this (median of per-round ratios) |",
        "|---|---:|---:|---:|---:|",
    ]
    for n, c in contenders.items():
        med, best = rates(times[n], 24)
        ratio = "–" if n == "attnfuse" else f"{paired(times, 'attnfuse', n):.2f}"
        lines.append(f"| {n} | {c.params:,} | {med:.1f} | {best:.1f} | {ratio} |")
        print(lines[-1], flush=True)
    args.profiled = contenders
    return lines


def part_nn(args, before) -> list[str]:
    dev = args.torch_device
    lines = [
        "| fusion | contender | parameters | samples/s, median | samples/s, best | attnfuse / this |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for fusion in ("self", "cross", "bicross"):
        contenders = {"attnfuse": of_attnfuse(attnfuse, fusion, MOSEI, 24, dev)}
        if before is not None:
            contenders["attnfuse before"] = of_attnfuse(before, fusion, MOSEI, 24, dev)
            same_weights(contenders["attnfuse"], contenders["attnfuse before"])
        contenders["torch.nn composition"] = of_torch(fusion, 24, dev)
        times = interleaved({n: c.train_step for n, c in contenders.items()}, args)
        for n, c in contenders.items():
            med, best = rates(times[n], 24)
            ratio = "–" if n == "attnfuse" else f"{paired(times, 'attnfuse', n):.2f}"
            lines.append(f"| {fusion} | {n} | {c.params:,} | {med:.1f} | {best:.1f} | {ratio} |")
            print(lines[-1], flush=True)
    return lines


def part_infer(args, before, anchors) -> list[str]:
    dev, batch = args.torch_device, 256
    lines = [
        "| fusion | inference (eval, inference_mode), samples/s | training-mode forward, samples/s | "
        "inference / training forward | inference, before (samples/s) | after / before |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    reference = "not measured (no reference MulT)"
    for fusion in ("concat", "self", "cross", "bicross", "mult"):
        overrides = {"concat": {"d_model": D_MODEL, "dropout": P}, "mult": MULT}.get(fusion, MOSEI)
        after = of_attnfuse(attnfuse, fusion, overrides, batch, dev)
        steps = {"inference": after.inference, "training forward": after.train_forward}
        if before is not None:
            old = of_attnfuse(before, fusion, overrides, batch, dev)
            same_weights(after, old)
            steps["before"] = old.inference
        if fusion == "mult" and anchors is not None:
            steps["reference MulT"] = of_reference(anchors, batch, dev).inference
        times = interleaved(steps, args)
        if "reference MulT" in times:
            reference = f"{paired(times, 'inference', 'reference MulT'):.2f}"
        inf, fwd = rates(times["inference"], batch)[0], rates(times["training forward"], batch)[0]
        old_cells = "– | –"
        if before is not None:
            old_cells = f"{rates(times['before'], batch)[0]:.0f} | {paired(times, 'inference', 'before'):.2f}"
        lines.append(
            f"| {fusion} | {inf:.0f} | {fwd:.0f} | {paired(times, 'inference', 'training forward'):.2f} | {old_cells} |"
        )
        print(lines[-1], flush=True)
    lines += ["", f"`mult` inference against the reference MulT (eval, inference_mode, batch 256): {reference}x."]
    print(lines[-1], flush=True)
    return lines


def profiles(steps: dict[str, Callable[[], None]], rounds: int = 3) -> dict[str, dict[str, float]]:
    """Self CPU milliseconds per call of each op, per contender: torch.profiler around one call
    of each contender per round, rounds interleaved with a rotating start (as :func:`interleaved`),
    summed over the rounds and divided by their number."""
    from torch.profiler import ProfilerActivity  # only this part needs the profiler
    from torch.profiler import profile as torch_profile

    names = list(steps)
    totals: dict[str, dict[str, float]] = {n: {} for n in names}
    for r in range(1 + rounds):  # round 0 warms up
        for n in names[r % len(names) :] + names[: r % len(names)]:
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                steps[n]()
            if r == 0:
                continue
            for e in prof.key_averages():
                totals[n][e.key] = totals[n].get(e.key, 0.0) + e.self_cpu_time_total / 1e3 / rounds
    return totals


def part_profile(args, before, anchors, top: int = 12) -> list[str]:
    dev = args.torch_device
    contenders = getattr(args, "profiled", None)
    if contenders is None:
        contenders = {"attnfuse": of_attnfuse(attnfuse, "mult", MULT, 24, dev)}
        if before is not None:
            contenders["attnfuse before"] = of_attnfuse(before, "mult", MULT, 24, dev)
        if anchors is not None:
            contenders["reference MulT"] = of_reference(anchors, 24, dev)
    order = [n for n in ("attnfuse before", "attnfuse", "reference MulT") if n in contenders]
    ms = profiles({n: contenders[n].train_step for n in order})
    ranked = {n: sorted(ms[n].items(), key=lambda kv: kv[1], reverse=True) for n in order}
    total = {n: sum(ms[n].values()) for n in order}

    def cell(n: str, op: str, t: float) -> str:
        return f"`{op}` {t:.1f} ({t / total[n]:.0%})"

    def row(title: str, keep: Callable[[str], bool]) -> str:
        return (
            f"| {title} | "
            + " | ".join(
                f"{sum(t for op, t in ms[n].items() if keep(op)):.1f} "
                f"({sum(t for op, t in ms[n].items() if keep(op)) / total[n]:.0%})"
                for n in order
            )
            + " |"
        )

    lines = [
        "| rank | " + " | ".join(order) + " |",
        "|---:|" + "---|" * len(order),
        *(f"| {i + 1} | " + " | ".join(cell(n, *ranked[n][i]) for n in order) + " |" for i in range(top)),
        row("matrix products (" + ", ".join(m.removeprefix("aten::") for m in MATMULS) + ")", lambda op: op in MATMULS),
        row("dropout masks (random_, bernoulli_)", lambda op: op in ("aten::random_", "aten::bernoulli_")),
        row("optimizer (Adam.step, self time)", lambda op: op.startswith("Optimizer.step")),
        "| total self CPU, ms per step | " + " | ".join(f"{total[n]:.0f}" for n in order) + " |",
    ]
    print("\n".join(lines), flush=True)
    return lines


def part_kernel(args) -> list[str]:
    """The two CPU kernels of attention with dropout (attnfuse.nn.kernels) forced in turn, forward +
    backward, at MulT's head sizes, the GEMM layouts behind them, and what kernels.choose picks here."""
    from attnfuse.nn import functional as AF  # the attention core's internals

    g = torch.Generator().manual_seed(0)
    lines = ["| computation | ms, median | ms, best |", "|---|---:|---:|"]
    picks = []
    for hd in (D_MODEL // HEADS, 2 * D_MODEL // HEADS):  # cross-modal heads (6) and mult's self heads (12)
        q, k, v = (torch.randn(24, HEADS, T, hd, generator=g, requires_grad=True) for _ in range(3))
        masks = AF.Masks(None, None)

        def run(kernel: str, q=q, k=k, v=v, masks=masks) -> Callable[[], None]:
            def step() -> None:
                with kernels.forced(kernel):
                    AF.attend(q, k, v, masks, P, None, False)[0].sum().backward()

            return step

        probs = torch.softmax(torch.randn(24 * HEADS, T, T, generator=g), dim=-1)
        val = torch.randn(24 * HEADS, T, hd, generator=g)
        steps = {
            f"q, k, v (24, 5, 50, {hd}): explicit kernel (explicit_attention)": run("explicit"),
            f"q, k, v (24, 5, 50, {hd}): autograd kernel (plain ops)": run("autograd"),
            f"bmm(P, V): output (120, 50, {hd})": lambda probs=probs, val=val: torch.bmm(probs, val),
            f"bmm(Vᵀ, Pᵀ): output (120, {hd}, 50)": lambda probs=probs, val=val: torch.bmm(
                val.transpose(1, 2), probs.transpose(1, 2)
            ),
        }
        times = interleaved(steps, args, number=max(args.number, 5))
        for n, t in times.items():
            lines.append(f"| {n} | {1e3 * statistics.median(t):.2f} | {1e3 * min(t):.2f} |")
        kernels.clear()
        AF.attend(q, k, v, masks, P, None, False)  # the first call of this problem: timed by kernels.choose
        picks.append(f"{hd}-wide heads: {next(iter(kernels.choices().values()))}")
    lines.append("")
    lines.append(f"Chosen by `attnfuse.nn.kernels` in this process: {'; '.join(picks)}.")
    print("\n".join(lines), flush=True)
    return lines


def part_compile(args) -> list[str]:
    """torch.compile (what --compile does) against eager, one fusion model's training step: the
    first steps (compilation) timed alone, then interleaved rounds of the steady state."""
    dev, fusion = args.torch_device, args.compile_fusion
    overrides = MULT if fusion == "mult" else MOSEI
    eager = of_attnfuse(attnfuse, fusion, overrides, 24, dev)
    compiled = of_attnfuse(attnfuse, fusion, overrides, 24, dev)
    fn = torch.compile(compiled.model)
    x, valid, y = mosei_inputs(24, dev)
    batch = attnfuse.data.Batch(x, valid, y)
    compiled.forward = lambda: fn(batch)
    first = []
    for _ in range(3):
        sync(dev)
        t0 = time.perf_counter()
        compiled.train_step()
        sync(dev)
        first.append(time.perf_counter() - t0)
    times = interleaved({"eager": eager.train_step, "compiled": compiled.train_step}, args)
    e, c = (1e3 * statistics.median(times[n]) for n in ("eager", "compiled"))
    lines = [
        "| fusion | first 3 compiled steps, s | eager step, ms (median) | compiled step, ms (median) | "
        "compiled / eager samples/s (median of per-round ratios) |",
        "|---|---|---:|---:|---:|",
        f"| {fusion} | {', '.join(f'{t:.1f}' for t in first)} | {e:.0f} | {c:.0f} | "
        f"{paired(times, 'compiled', 'eager'):.2f} |",
    ]
    print("\n".join(lines), flush=True)
    return lines


def part_guard(args) -> list[str]:
    """What the non-finite guard costs a training step (``attnfuse.nn.functional.needs_guard``; off
    the CPU it always runs): attnfuse with it, attnfuse with it switched off (``needs_guard`` made
    ``False`` during its steps, exact for these finite inputs) and the torch.nn composition, with
    the kernels (CUDA) and aten ops one step launches."""
    from torch.profiler import ProfilerActivity  # only this part needs the profiler
    from torch.profiler import profile as torch_profile

    dev = args.torch_device

    def launched(step: Callable[[], None]) -> tuple[int, int]:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with torch_profile(activities=activities) as prof:
            step()
            sync(dev)
        events = prof.events()
        launches = sum(1 for e in events if str(getattr(e, "device_type", "")).endswith("CUDA"))
        return launches, sum(1 for e in events if e.name.startswith("aten::"))

    lines = [
        "| fusion | contender | ms per step, median | attnfuse / this | CUDA kernels per step | aten ops per step |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for fusion in ("cross", "self"):
        ours = of_attnfuse(attnfuse, fusion, MOSEI, 24, dev)
        steps = {
            "attnfuse": ours.train_step,
            "attnfuse, guard off": unguarded(ours.train_step),
            "torch.nn composition": of_torch(fusion, 24, dev).train_step,
        }
        times = interleaved(steps, args)
        for n, step in steps.items():
            ratio = "–" if n == "attnfuse" else f"{paired(times, 'attnfuse', n):.2f}"
            k, ops = launched(step)
            lines.append(f"| {fusion} | {n} | {1e3 * statistics.median(times[n]):.2f} | {ratio} | {k} | {ops} |")
            print(lines[-1], flush=True)
    return lines


# Recorded in RESULTS.md, "Fusion models" (benchmarks/fusion.py, 2026-11-21).
RECORDED = {"planted cross": "0.9664 ± 0.0043", "planted self": "0.9660 ± 0.0056", "mfeat self": "98.78 ± 0.63"}


def part_accuracy(args) -> list[str]:
    from attnfuse.data import load_mfeat, make_planted, make_split  # only this part needs them
    from attnfuse.training import Parts, TrainConfig, fit_model

    seeds, splits = (1, 1) if args.quick else (3, args.mfeat_splits)
    epochs = 5 if args.quick else 100
    scores: dict[str, list[float]] = {}
    for seed in range(seeds):
        data = make_planted(seed=seed)
        for fusion in ("cross", "self"):
            result = fit_model(
                Parts.of(data, make_split(data, seed)), fusion, {}, TrainConfig(epochs=epochs, seed=seed, loss="l1")
            )
            scores.setdefault(f"planted {fusion}", []).append(result.metrics["test"]["r2"])
            print(f"planted {fusion} seed {seed}: test R² {scores[f'planted {fusion}'][-1]:.4f}", flush=True)
    data = load_mfeat()
    for seed in range(splits):
        result = fit_model(
            Parts.of(data, make_split(data, seed, (0.7, 0.1, 0.2))), "self", {}, TrainConfig(epochs=epochs, seed=seed)
        )
        scores.setdefault("mfeat self", []).append(100 * result.metrics["test"]["accuracy"])
        print(f"mfeat self split {seed}: test accuracy {scores['mfeat self'][-1]:.2f}", flush=True)
    lines = [
        "| task | runs | now: mean ± std | values | recorded (RESULTS.md, Fusion models) |",
        "|---|---|---|---|---|",
    ]
    for name, s in scores.items():
        digits = 2 if name.startswith("mfeat") else 4
        std = statistics.stdev(s) if len(s) > 1 else 0.0
        runs = f"seeds 0..{len(s) - 1}" if name.startswith("planted") else f"splits 0..{len(s) - 1}"
        values = ", ".join(f"{v:.{digits}f}" for v in s)
        lines.append(
            f"| {name} | {runs} | {statistics.mean(s):.{digits}f} ± {std:.{digits}f} | {values} | {RECORDED[name]} |"
        )
    print("\n".join(lines), flush=True)
    return lines


# --------------------------------------------------------------------------- report


PARTS = ("mult", "nn", "infer", "profile", "kernel", "accuracy", "compile", "guard")
DEFAULT_PARTS = PARTS[:-2]  # compile (minutes of compilation) and guard (a GPU question): only when asked
TITLES = {
    "mult": "`mult` against the reference MulT, training step (batch 24)",
    "nn": "`self`, `cross`, `bicross` against torch.nn compositions, training step (batch 24)",
    "infer": "Inference (batch 256): `model.eval()` under `torch.inference_mode()` against the same "
    "model's training-mode forward (dropout on, autograd recording, no backward)",
    "profile": "Where a `mult` training step goes: torch.profiler, self CPU ms per step (share of the step), "
    "top ops, mean of 3 interleaved profiled steps",
    "kernel": "The two CPU kernels of attention with dropout 0.1 (`attnfuse.nn.kernels`), forward + backward, "
    "and the GEMM layouts behind them",
    "compile": "`torch.compile` (`--compile`) against eager, training step (batch 24): compilation and steady state",
    "guard": "The non-finite guard's cost, training step (batch 24): with it, switched off, and torch.nn",
    "accuracy": 'Accuracy on the final code (planted: `TrainConfig(seed=s, loss="l1")`, defaults otherwise; '
    "mfeat: `TrainConfig(seed=s)`, fractions 0.7/0.1/0.2)",
}


def write_part(out: Path, part: str, text: str) -> None:
    """Replace ``part``'s block in ``out``, or append it to this script's section (created at the end
    when absent): a part can be re-run alone."""
    _report.write_part(out, "benchmarks/speed.py", part, text, SECTION)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", action="append", choices=PARTS)
    p.add_argument(
        "--before", default=None, help="a git revision whose attnfuse is compared as 'before' (default: none)"
    )
    p.add_argument("--src", type=Path, default=None, help="a folder holding the 'before' attnfuse package")
    p.add_argument("--anchors", type=Path, default=None, help="the mult-reference folder (default: found)")
    p.add_argument("--rounds", type=int, default=11, help="timed rounds per contender (default 11)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds (default 1)")
    p.add_argument("--number", type=int, default=1, help="calls per round (default 1)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: attnfuse's, the free cores; 1 on a loaded machine)",
    )
    p.add_argument("--compile-fusion", default="cross", help="the fusion model of the compile part (default cross)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument(
        "--precision", default="32", choices=("32", "bf16"), help="32 (default) or bf16 autocast, for every contender"
    )
    p.add_argument("--mfeat-splits", type=int, default=3, help="mfeat splits of the accuracy part (default 3)")
    p.add_argument("--quick", action="store_true", help="3 rounds of 1 call, prints only")
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = p.parse_args()
    set_threads(args.threads)  # attnfuse's default (the free cores) unless --threads
    if args.quick:
        args.rounds, args.warmup, args.number = 3, 1, 1
    args.torch_device = torch.device(args.device)
    Contender.autocast = torch.bfloat16 if args.precision == "bf16" else None
    parts = [x for x in PARTS if x in (args.part or DEFAULT_PARTS)]
    before = load_before(args) if {"mult", "nn", "infer", "profile"} & set(parts) else None
    anchors = anchor_folder(args)
    what = f"--src {args.src}" if args.src else f"attnfuse at {args.before} (git archive)"
    for part in parts:
        machine_line = machine()
        print(f"-- {part}\n{machine_line}", flush=True)
        body = {
            "mult": lambda: part_mult(args, before, anchors),
            "nn": lambda: part_nn(args, before),
            "infer": lambda: part_infer(args, before, anchors),
            "profile": lambda: part_profile(args, before, anchors),
            "kernel": lambda: part_kernel(args),
            "accuracy": lambda: part_accuracy(args),
            "compile": lambda: part_compile(args),
            "guard": lambda: part_guard(args),
        }[part]()
        command = f"python benchmarks/speed.py --part {part}" + (f" --threads {args.threads}" if args.threads else "")
        if part in ("mult", "nn", "infer", "profile") and before is not None:
            command += f" --src {args.src}" if args.src else f" --before {args.before}"
        if part == "compile":
            command += f" --compile-fusion {args.compile_fusion}"
        if args.device != "cpu":
            command += f" --device {args.device}"
        if args.precision != "32":
            command += f" --precision {args.precision}"
        if part not in ("profile", "accuracy"):
            command += f" --rounds {args.rounds} --number {args.number}"
        run = f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}, `{command}`; {machine_line}"
        if part in ("mult", "nn", "infer", "profile") and before is not None:
            run += f"; before = {what}"
        if part not in ("profile", "accuracy"):
            run += f"; {args.rounds} interleaved rounds after {args.warmup} warm-up round(s)"
        text = f"**{TITLES[part]}**\n\nRun: {run}.\n\n" + "\n".join(body)
        if not args.quick:
            write_part(args.out, part, text)
            print(f"wrote the {part} block of benchmarks/speed.py in {args.out}", flush=True)


if __name__ == "__main__":
    main()
