"""Data-parallel scaling on the CPU: training samples/s of one process against N processes (gloo,
DistributedDataParallel) at the same global batch, and the share of a step spent in the gradient
all-reduce (the step timed with and without DDP's gradient synchronisation).

    python benchmarks/scaling.py                 # mult at MOSEI sizes, 1 vs 2 processes
    python benchmarks/scaling.py --steps 20 --procs 1 2 4

With P processes on a C-core machine each process gets C // P threads, so the comparison is
"the same cores, split between processes": it shows the cost of the all-reduce and of running
smaller per-process batches, not a gain from more hardware.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from attnfuse.data import Batch
from attnfuse.distributed import Dist
from attnfuse.fusion import build_model
from attnfuse.training import TrainConfig, Trainer

MOSEI = {"text": (50, 300), "audio": (50, 74), "vision": (50, 35)}
MODEL = {"d_model": 30, "nhead": 5, "num_layers": 5, "self_layers": 5, "dropout": 0.1}


def make_batch(n: int, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x = {m: torch.randn(n, t, d, generator=g) for m, (t, d) in MOSEI.items()}
    mask = {m: torch.ones(n, t, dtype=torch.bool) for m, (t, _) in MOSEI.items()}
    return Batch(x, mask, torch.randn(n, generator=g))


def worker(rank: int, world: int, port: int, threads: int, steps: int, batch: int, out: dict) -> None:
    torch.set_num_threads(threads)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    specs = [{"name": m, "dim": d, "length": t, "is_sequence": True} for m, (t, d) in MOSEI.items()]
    torch.manual_seed(0)
    model = build_model("mult", {"modalities": specs, "out_dim": 1, **MODEL})
    trainer = Trainer(model, "regression", TrainConfig(batch_size=batch, device="cpu"), Dist(rank, world))
    data = make_batch(steps * batch)
    order = torch.arange(steps * batch).split(batch)

    def timed(sync: bool) -> float:
        model.train()
        trainer._train_step(data, order[0])  # warm-up
        start = time.perf_counter()
        for index in order[1:]:
            if sync or world == 1:
                trainer._train_step(data, index)
            else:
                with trainer.model.no_sync():
                    trainer._train_step(data, index)
        return (time.perf_counter() - start) / (len(order) - 1)

    with_sync = timed(True)
    without = timed(False) if world > 1 else with_sync
    if rank == 0:
        out[world] = (with_sync, without)
    if world > 1:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=24, help="global batch (MulT's MOSEI batch: 24)")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    results = mp.Manager().dict()
    for world in args.procs:
        threads = max(1, cores // world)
        mp.spawn(worker, (world, free_port(), threads, args.steps, args.batch, results), nprocs=world, join=True)
        step, local = results[world]
        print(f"{world} process(es) x {threads} thread(s): {args.batch / step:.1f} samples/s, step {step * 1e3:.0f} ms, "
              f"all-reduce {max(step - local, 0) / step:.0%} of the step", flush=True)  # fmt: skip

    print(f"\nmachine: {platform.processor() or platform.machine()}, {cores} cores, torch {torch.__version__}")
    print("| processes | threads each | samples/s | step (ms) | all-reduce share | speed-up |")
    print("|---:|---:|---:|---:|---:|---:|")
    base = results[args.procs[0]][0]
    for world in args.procs:
        step, local = results[world]
        print(f"| {world} | {max(1, cores // world)} | {args.batch / step:.1f} | {step * 1e3:.0f} | "
              f"{max(step - local, 0) / step:.0%} | {base / step:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
