"""Data-parallel training on torch.distributed: the process group that ``torchrun`` describes in
the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), which rows each rank reads, and
the gathering of per-rank predictions. Gradients are averaged by DistributedDataParallel; nothing
here reduces gradients by hand.

A plain process (no torchrun) is world size 1, rank 0: every function is then a no-op.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Dist", "setup", "teardown", "local_device", "is_main_process"]


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: ``rank`` of ``world`` processes."""

    rank: int = 0
    world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """Rank 0 alone writes files and prints."""
        return self.rank == 0

    def shard(self, index: Tensor) -> Tensor:
        """This rank's share of a global batch's row indices: every ``world``-th row from ``rank``
        (as DistributedSampler interleaves), so the ranks together read each row once."""
        return index[self.rank :: self.world] if self.enabled else index

    def gather_rows(self, values: Tensor, n: int) -> Tensor:
        """Reassemble per-rank outputs of :meth:`shard`-ed rows ``0..n-1`` into ``(n, ...)`` in row
        order on every rank (an all-gather of equal-sized, padded pieces)."""
        if not self.enabled:
            return values
        size = -(-n // self.world)  # ceil: rank r holds rows r, r + world, ...
        padded = values.new_zeros((size, *values.shape[1:]))
        padded[: values.shape[0]] = values
        pieces = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(pieces, padded)
        out = torch.stack(pieces, dim=1).reshape(size * self.world, *values.shape[1:])  # interleave back
        return out[:n]

    def all_true(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on every rank (e.g. "stop now")."""
        if not self.enabled:
            return flag
        t = torch.tensor([0 if flag else 1], device=_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return int(t.item()) == 0

    def any_true(self, flag: bool) -> bool:
        if not self.enabled:
            return flag
        t = torch.tensor([1 if flag else 0], device=_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return int(t.item()) > 0

    def gather_objects(self, obj: object) -> list[object]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: list[object] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def setup(device: torch.device, timeout_s: float = 600.0) -> Dist:
    """Join the job torchrun started (backend ``nccl`` on CUDA, ``gloo`` on the CPU), or return the
    single-process Dist when there is none. On CUDA each rank uses ``cuda:LOCAL_RANK``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return Dist(dist.get_rank(), dist.get_world_size())


def local_device(device: torch.device) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` under torchrun on CUDA, else ``device``."""
    if device.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a plain process: the one that prints and writes."""
    return int(os.environ.get("RANK", "0")) == 0


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
