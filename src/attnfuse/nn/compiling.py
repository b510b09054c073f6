"""``torch.compile`` of a model, with what it costs where it was measured.

The models record as one graph in training mode (no graph break: while a graph is recorded,
dropout is torch's and attention with dropout is plain ops, see :mod:`.dropout` and
:mod:`.kernels`). On the CPU that is still not enough for the compiled step to pay: measured side by
side with eager on the same machine, a compiled training step of the ``cross`` fusion model at
CMU-MOSEI sizes ran at 0.35x eager's samples/s in steady state (AMD EPYC, 2 shared cores;
benchmarks/RESULTS.md, "Fusion model speed"; its first step took 12.5 s on a warm compiler cache,
473 s on a cold one in an earlier trial, which ran at 0.50x), and ``mult`` at 0.34x after 67 s on
an Intel Xeon (with the graph breaks since removed). Inductor's CPU code for these narrow layers
(width 30, 6-wide heads) is slower than the library kernels eager calls. So on the CPU :func:`compile_model` warns with these numbers; it still
compiles, as asked (a newer torch, or wider models, may change the verdict:
``python benchmarks/speed.py --part compile`` measures it).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

__all__ = ["compile_model", "CPU_VERDICT"]

CPU_VERDICT = (
    "torch.compile on the CPU made training slower than eager where it was measured: a cross-modal "
    "model's step ran at 0.35x eager once compiled (0.50x in a trial whose first step took 473 s; AMD "
    "EPYC), mult at 0.34x after 67 s "
    "(Intel Xeon); leave --compile off on the CPU (benchmarks/RESULTS.md, 'Fusion model speed')"
)


def compile_model(model: nn.Module, device: torch.device) -> nn.Module:
    """``torch.compile(model)``; on the CPU with a warning that states the measured cost."""
    if torch.device(device).type == "cpu":
        warnings.warn(f"--compile: {CPU_VERDICT}", RuntimeWarning, stacklevel=2)
    return torch.compile(model)
