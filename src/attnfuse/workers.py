"""The models of one run trained side by side on the CPU: one process per core, one thread each.

Why: the models that bagging trains on small data (under 10,000 rows, :func:`attnfuse.fit.bags_for`)
are small, and torch spreads the operations of one small model over several threads poorly: the
default ``attnfuse train`` on mfeat took 25.1 s with two threads and 27.9 s with one
(benchmarks/RESULTS.md). K models on K cores, one thread each, come close to K times one. Python
threads would not: a model's Python code holds the GIL between its operations.

How: :class:`SideBySide` keeps a pool of worker processes forked from the command (:data:`FORK`:
each starts with the command's data, copied only where written) and the run's :class:`Job` s in
the order the loops of :mod:`attnfuse.fit` train them; :meth:`SideBySide.take` returns one job's
model while every worker trains the jobs after it. The
loops take the jobs in order, so they see what they would have seen training the models one after
another:

- a job's model is the one it would have been trained alone (each model is a function of its seed
  and rows; at one thread, bitwise: a test compares them);
- a job's progress events are passed on when the loops reach it, in their order;
- only the job the loops wait on (the *head*) sends its trainer's checkpoints (and any job when it
  is stopped, kept until the loops reach it), so a checkpoint is one position of the loops, as one
  after another; on resume the jobs after it are trained again (bitwise the same);
- a stop (SIGINT/SIGTERM to the command, polled by the loops) is passed to every worker, whose
  trainers stop at a step boundary. The workers ignore SIGINT (a Ctrl-C reaches the whole process
  group); a SIGTERM ends them (and the command, told too, stops at its last checkpoint: a
  process group's SIGTERM). They end when the command's process is gone; a worker that dies ends
  the command with one line (:class:`ChildProcessError`).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch

from .data import MultimodalDataset, Standardizer
from .training import Control, Interrupted, Parts, TrainConfig, TrainedModel, fit_model

__all__ = ["FORK", "Job", "SideBySide"]

# Forked, not spawned: a spawned process imports the command's main module again, and a script
# that calls attnfuse.train without an ``if __name__ == "__main__":`` guard would train again in
# each worker (and fail there). A forked worker inherits the command's OpenMP state; its first act
# is torch.set_num_threads(1), after which torch starts no OpenMP team (as torch's DataLoader
# workers do). Only on Linux: macOS's system libraries are not fork-safe (Python spawns there by
# default); elsewhere the models train one after another (attnfuse.fit.workers_for).
FORK = sys.platform == "linux"

POLL_SECONDS = 0.05  # how often the command looks for a stop while it waits on a worker
ORPHAN_POLL_SECONDS = 0.5  # how often a worker looks for the command's process


@dataclass(frozen=True)
class Job:
    """One model to train: :func:`~attnfuse.training.fit_model`'s arguments, its rows as a split
    (``split``, ``fitted_on``, ``standardizer``: the worker builds the :class:`Parts` from its own
    copy of the data), whether it checkpoints (every ``every`` epochs, and when stopped) and the
    trainer state to continue from (``resume``)."""

    fusion: str
    settings: dict
    train: TrainConfig
    split: Mapping[str, np.ndarray]
    standardizer: Standardizer
    fitted_on: np.ndarray | None = None
    checkpoint: bool = False
    every: int = 1
    resume: tuple[dict, dict] | None = None


class SideBySide:
    """A pool of ``workers`` processes that train :class:`Job` s on ``data`` (on the CPU, one torch
    thread each). :meth:`plan` queues a run's jobs by name, in order; :meth:`take` returns one's
    model; :meth:`close` ends the pool (also as a context manager)."""

    def __init__(self, data: MultimodalDataset, workers: int) -> None:
        context = multiprocessing.get_context("fork")  # see FORK
        self.workers = workers
        self._events = context.Queue()
        self._head = context.Value("q", -1, lock=False)  # the key of the job the loops wait on
        self._stop = context.Value("i", 0, lock=False)  # the signal that stops every worker (0: none)
        initargs = (data, self._events, self._head, self._stop, os.getpid())
        self._pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_start, initargs=initargs)
        self._keys: dict[Any, int] = {}
        self._waiting: dict[int, Job] = {}  # planned, not yet given to a worker, in order
        self._running: dict[int, Future] = {}
        self._held: dict[int, list[tuple[str, Any]]] = {}  # events of jobs the loops have not reached
        self._done: set[int] = set()
        self._position = (0, 0)  # (epoch, step) of the last checkpoint

    def plan(self, jobs: Mapping[Any, Job]) -> None:
        """Queue ``jobs`` (name -> job, in the order they will be taken), after any planned before."""
        for name, job in jobs.items():
            key = len(self._keys)
            self._keys[name] = key
            self._waiting[key] = job
        self._fill()

    def take(
        self,
        name: Any,
        on_epoch: Callable[[dict], None],
        on_checkpoint: Callable[[tuple[dict, dict]], None],
        stop: Callable[[], int] | None = None,
    ) -> tuple[TrainedModel, float]:
        """The model of job ``name`` and the seconds it trained, once trained; meanwhile its
        progress goes to ``on_epoch`` and its checkpoints (trainer states) to ``on_checkpoint``,
        and ``stop`` is polled. Raises :class:`~attnfuse.training.Interrupted` when the job was
        stopped (its state was checkpointed first), and the job's error when it failed."""
        try:
            return self._take(self._keys[name], on_epoch, on_checkpoint, stop)
        except BrokenProcessPool:
            signum = (stop() if stop is not None else 0) or self._stop.value
            if signum:  # a SIGTERM to the whole process group ended the workers: stopped all the same
                raise Interrupted(*self._position, signum) from None
            raise ChildProcessError(
                "a worker process training models side by side ended abruptly (killed, or out of memory?); "
                "--threads 1 trains them one after another in this process"
            ) from None

    def _take(
        self,
        key: int,
        on_epoch: Callable[[dict], None],
        on_checkpoint: Callable[[tuple[dict, dict]], None],
        stop: Callable[[], int] | None,
    ) -> tuple[TrainedModel, float]:
        self._head.value = key
        handlers = {"epoch": on_epoch, "checkpoint": partial(self._checkpointed, on_checkpoint)}
        for kind, payload in self._held.pop(key, []):
            handlers[kind](_loaded(kind, payload))
        future = self._running[key] if key in self._running else self._submit(key)
        while not (future.done() and (key in self._done or future.exception() is not None)):
            signum = stop() if stop is not None else 0
            if signum and not self._stop.value:
                self._stop.value = signum
            try:
                kind, job, payload = self._events.get(timeout=POLL_SECONDS)
            except queue.Empty:
                continue
            if kind == "done":
                self._done.add(job)
            elif job == key:
                handlers[kind](_loaded(kind, payload))
            else:
                self._held.setdefault(job, []).append((kind, payload))
        del self._running[key]
        self._fill()
        outcome, payload, seconds = future.result()  # a failed job raises its error here
        if outcome == "interrupted":
            raise Interrupted(*payload)
        return pickle.loads(payload), seconds

    def _checkpointed(self, on_checkpoint: Callable[[tuple[dict, dict]], None], state: tuple[dict, dict]) -> None:
        on_checkpoint(state)
        self._position = (state[1].get("epoch", 0), state[1].get("step", 0))

    def _fill(self) -> None:
        """Give waiting jobs, in order, to the workers that are free."""
        while self._waiting and len(self._running) < self.workers:
            self._submit(next(iter(self._waiting)))

    def _submit(self, key: int) -> Future:
        future = self._pool.submit(_run, key, pickle.dumps(self._waiting.pop(key)))  # by value: see _run
        self._running[key] = future
        return future

    def close(self) -> None:
        """End the workers, whatever they are doing: what they hold is lost (a stopped job's
        checkpoint has reached the command before its result), and none waits on another. A
        graceful shutdown can wait forever: a worker killed while it held the lock of the queue
        the workers read their jobs from leaves the others blocked on it."""
        self._stop.value = self._stop.value or signal.SIGTERM
        processes = list(getattr(self._pool, "_processes", None) or {})  # (the executor's own, by pid)
        self._pool.shutdown(wait=False, cancel_futures=True)
        for pid in processes:
            with contextlib.suppress(ProcessLookupError):  # ended already
                os.kill(pid, signal.SIGKILL)
        self._pool.shutdown(wait=True)

    def __enter__(self) -> SideBySide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _loaded(kind: str, payload: Any) -> Any:
    """An event's payload as its handler takes it: a checkpoint arrives pickled (see :func:`_run`)."""
    return pickle.loads(payload) if kind == "checkpoint" else payload


# -- in a worker process -------------------------------------------------------------------------

_worker: dict[str, Any] = {}


def _start(data: MultimodalDataset, events: Any, head: Any, stop: Any, parent: int) -> None:
    """A worker's start: the signals are the command's to handle; one torch thread; the data."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C reaches the whole process group
    torch.set_num_threads(1)
    # Exit without waiting for the events still in the pipe: once the command stops reading (it
    # stopped, or failed), a worker waiting to write a checkpoint into a full pipe would never end.
    events.cancel_join_thread()
    _worker.update(data=data, events=events, head=head, stop=stop)
    threading.Thread(target=_end_with, args=(parent,), daemon=True).start()


def _end_with(parent: int) -> None:
    """End this worker when the command's process is gone (killed), whether it waits for a job
    (on a pipe it holds a copy of itself: no end of file tells it) or trains one."""
    while os.getppid() == parent:
        time.sleep(ORPHAN_POLL_SECONDS)
    os._exit(1)


def _stopped() -> int:
    """The signal this worker's trainer stops on: the command's (0: none)."""
    return _worker["stop"].value


def _run(key: int, job: bytes) -> tuple[str, Any, float]:
    """Train job ``key`` (a pickled :class:`Job`): ``("model", the pickled TrainedModel, seconds)``,
    or ``("interrupted", (epoch, step, signal), seconds)``. Events go to the queue: ``("epoch", key, record)``,
    ``("checkpoint", key, pickled trainer state)`` and, last, ``("done", key, None)``.

    What crosses between the processes is pickled here, by value: torch's own reduction for
    multiprocessing would pass each tensor as shared memory, one file descriptor each."""
    events, job = _worker["events"], pickle.loads(job)

    def checkpoint(trainer: Any) -> None:
        if _worker["head"].value == key or _stopped():
            events.put(("checkpoint", key, pickle.dumps(trainer.state_dict())))

    start = time.perf_counter()
    try:
        parts = Parts.of(_worker["data"], job.split, "cpu", fitted_on=job.fitted_on, standardizer=job.standardizer)
        control = Control(
            resume=job.resume, checkpoint=checkpoint if job.checkpoint else None, every=job.every, stop=_stopped
        )
        on_epoch = lambda record: events.put(("epoch", key, record))  # noqa: E731
        model = fit_model(parts, job.fusion, job.settings, job.train, on_epoch=on_epoch, control=control)
        return "model", pickle.dumps(model), time.perf_counter() - start
    except Interrupted as stopped:
        return "interrupted", (stopped.epoch, stopped.step, stopped.signal), time.perf_counter() - start
    finally:
        events.put(("done", key, None))
