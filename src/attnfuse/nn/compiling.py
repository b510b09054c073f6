"""``torch.compile`` of a model, with what it costs where it was measured.

The models record as one graph in training mode (no graph break: while a graph is recorded,
dropout is torch's and attention with dropout is plain ops, see :mod:`.dropout` and
:mod:`.kernels`). Whether the compiled step then pays depends on the machine. Measured side by
side with eager in one process (benchmarks/RESULTS.md, "Fusion model speed"), a compiled training
step of the ``cross`` fusion model at CMU-MOSEI sizes ran, in steady state:

* at 1.39x eager's samples/s on an NVIDIA H200 (first step 34 s);
* at 1.43x on an Intel Xeon at 16 threads (first step 70 s, a cold compiler cache);
* at 0.35x on an AMD EPYC at 1 thread, 2 shared cores (first step 12.5 s on a warm cache; 473 s
  cold in an earlier trial, which ran at 0.50x). There inductor's CPU code for these narrow
  layers (width 30, 6-wide heads) is slower than the library kernels eager calls.

So off the CPU :func:`compile_model` compiles without a word; on the CPU it compiles as asked
and warns with these numbers (``python benchmarks/speed.py --part compile`` measures a machine).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

__all__ = ["compile_model", "CPU_VERDICT"]

CPU_VERDICT = (
    "on the CPU torch.compile paid on one machine and not on another: a cross-modal model's training "
    "step ran at 1.43x eager once compiled on an Intel Xeon at 16 threads (after a 70 s first step), "
    "but at 0.35x eager once compiled on an AMD EPYC at 1 thread; measure yours with "
    "'python benchmarks/speed.py --part compile' (benchmarks/RESULTS.md, 'Fusion model speed')"
)


def compile_model(model: nn.Module, device: torch.device) -> nn.Module:
    """``torch.compile(model)``; on the CPU with a warning that states the measured cost."""
    if torch.device(device).type == "cpu":
        warnings.warn(f"--compile: {CPU_VERDICT}", RuntimeWarning, stacklevel=2)
    return torch.compile(model)
