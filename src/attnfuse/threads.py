"""How many CPU threads torch computes with: one place decides (:func:`default_threads`,
:func:`set_threads`).

Why not torch's default (one thread per core): torch's OpenMP threads meet at a barrier after
every operation, and a thread waiting there spins. When another process holds one of the cores,
the thread that shares that core runs only in its time slices, and every barrier waits for it: on
a 2-core machine with one core busy, the ``make demo`` training took 3.4 minutes with 2 threads
against 31 s with one (benchmarks/RESULTS.md, "Threads on a shared machine"). So the default is
the number of cores that are free now: the cores this process may run on
(:func:`os.sched_getaffinity`) less those other processes kept busy over a fifth of a second
(:func:`busy_cores`; the load average where the kernel's counters cannot be read), at least one.
A machine to itself gets every core; a busy one gets what is left. The count is taken once, when
a command starts.

A bagged ``--fusion auto`` run on the CPU spends the count on processes instead: that many workers
of one thread each train its models side by side (:mod:`attnfuse.workers`).

``--threads N`` sets it; the environment's ``OMP_NUM_THREADS`` (the OpenMP convention, which
torch reads when it is imported) is respected when set and no ``--threads`` is given.

Not chosen: ``OMP_WAIT_POLICY=PASSIVE`` (a waiting thread sleeps instead of spinning). It must be
set before torch is imported, it helped two threads on a busy machine less than one thread did,
and it made training on idle cores nearly twice as slow (the same benchmark).
"""

from __future__ import annotations

import math
import os
import time

from .checks import check_int

__all__ = ["available_cores", "busy_cores", "free_cores", "default_threads", "set_threads"]


SAMPLE_SECONDS = 0.2  # how long busy_cores watches the other processes


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's or ``taskset``'s
    share), else the machine's."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def busy_cores(seconds: float = SAMPLE_SECONDS) -> float | None:
    """How many of this process's cores other processes kept busy over the next ``seconds`` (this
    process sleeps meanwhile), from the kernel's per-core counters (``/proc/stat``); None where
    there are none (not Linux). Unlike the load average it sees a job that started a moment ago,
    and not this process's own past work (a training run just before)."""
    try:
        cores = sorted(os.sched_getaffinity(0))
        before = _cpu_times(cores)
        time.sleep(seconds)
        after = _cpu_times(cores)
    except (AttributeError, OSError, ValueError):
        return None
    busy = 0.0
    for (work0, total0), (work1, total1) in zip(before, after):
        if total1 > total0:
            busy += (work1 - work0) / (total1 - total0)
    return busy


def _cpu_times(cores: list[int]) -> list[tuple[int, int]]:
    """(busy, total) clock ticks of each core in ``cores`` since boot (``/proc/stat``)."""
    times = {}
    with open("/proc/stat", encoding="ascii") as f:
        for line in f:
            name, *fields = line.split()
            if name.startswith("cpu") and name != "cpu":
                ticks = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
                times[int(name[3:])] = (sum(ticks) - ticks[3] - ticks[4], sum(ticks))
    return [times[c] for c in cores]


def free_cores(busy: float | None = None, cores: int | None = None) -> int:
    """Cores not used by other processes: ``cores`` (default :func:`available_cores`) less the
    ``busy`` ones (default :func:`busy_cores`, else the load average of the last minute), rounded
    to the nearest (a core busy more than half the time is busy); at least one."""
    cores = available_cores() if cores is None else cores
    if busy is None:
        busy = busy_cores()
    if busy is None:
        try:
            busy = os.getloadavg()[0]
        except (AttributeError, OSError):  # no load average (Windows): assume the cores are free
            busy = 0.0
    if not math.isfinite(busy) or busy < 0:
        busy = 0.0
    return max(1, min(cores, math.floor(cores - busy + 0.5)))


def default_threads() -> int:
    """The thread count when none is asked for: ``OMP_NUM_THREADS`` when the environment sets a
    positive integer, else :func:`free_cores`."""
    given = os.environ.get("OMP_NUM_THREADS", "").strip()
    if given.isdigit() and int(given) > 0:
        return int(given)
    return free_cores()


def set_threads(threads: int | None = None) -> int:
    """Make torch compute with ``threads`` threads (default :func:`default_threads`); returns the
    count. A ``threads`` that is not a positive int is an error naming it (see :mod:`attnfuse.checks`)."""
    threads = default_threads() if threads is None else check_int("threads", threads)
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads
