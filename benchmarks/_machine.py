"""What a reader needs to weigh a benchmark's time: the CPU (model and vendor), its cores, torch and
its threads, the load. One helper for the benchmark scripts (imported as a sibling module: the
scripts run as ``python benchmarks/NAME.py``, which puts this folder on the path)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

__all__ = ["cpu", "machine"]


def cpu() -> tuple[str, str]:
    """``(model, vendor)`` of the CPU: /proc/cpuinfo's ``model name`` and ``vendor_id`` (e.g.
    ``GenuineIntel``, ``AuthenticAMD``) on Linux, else what :mod:`platform` knows."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            fields.setdefault(name.strip(), value.strip())
    except OSError:
        pass
    model = fields.get("model name") or platform.processor() or platform.machine() or "unknown CPU"
    vendor = fields.get("vendor_id") or platform.processor() or "unknown vendor"
    return model, vendor


def machine() -> str:
    """CPU model and vendor, cores, torch and its threads, load average: one line."""
    model, vendor = cpu()
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (
        f"{model} ({vendor}), {os.cpu_count()} cores{gpu}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}, load average {load} at the start"
    )
