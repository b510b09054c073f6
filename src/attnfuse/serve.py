"""``attnfuse serve``: a trained model behind HTTP (FastAPI on uvicorn), with dynamic micro-batching.

Endpoints:

* ``POST /predict``: ``{"instances": [{"text": [...], "audio": [[...], ...]}, ...]}``. A vector
  modality is a list of D numbers; a sequence modality a list of at most T steps of D numbers (a
  shorter one is padded at the end and the padding masked, ``[]`` is no step). An absent modality
  is a missing key or ``null`` (an all-False mask, exactly as in training); every instance needs at
  least one. The answer: ``{"predictions": [...]}`` (the user's class labels, or values), and for
  classification ``"classes"`` and ``"probabilities"`` (one list per instance, in that order).
* ``GET /health``: ``{"status": "ok", ...}`` once the model is loaded.
* ``GET /schema``: the modalities, shapes, task and classes the model expects (from ``config.json``)
  and the server's limits.

The numbers are ``attnfuse predict``'s: the same weights, the standardisation fitted in training
(inside :class:`attnfuse.export.PlainTensorModel`) and the same classes. Two backends: ``eager``
(the PyTorch model) and ``onnxruntime`` (the model exported at start-up with
:func:`attnfuse.export.export_model`, which checks the graph against the model on masked rows
before anything is served).

Why micro-batching: one forward pass of B rows costs far less than B passes of one row (the
weights are read once, the matrix products are larger). Requests wait in a bounded queue; the
batcher takes the first one, then whatever arrives within ``batch_wait_ms`` (up to ``max_batch``
instances), runs them as one batch in a worker thread (the event loop keeps reading requests
meanwhile) and answers each request with its rows. A full queue answers 503 at once rather than
letting latency grow without bound.

Bad requests never reach the model: every check happens while the request is read, and each
failure is one line of JSON ``{"error": "..."}`` with a 4xx status: 413 for a body larger than
``max_body_mb`` or more instances than ``max_instances``, 400 for a body that is not JSON (or nests
deeper than Python's parser allows), 422 for JSON that does not describe instances the model takes
(an unknown modality, a wrong shape, a value that is not a finite number).

SIGTERM (or Ctrl-C) stops the server the way an orchestrator expects: no new connections, every
request already received is answered (the batcher runs until the last one is), then the process
exits with code 0. uvicorn would raise the signal again once it has stopped (for the previous
handler, which in ``attnfuse`` ends the process with code 143): :class:`_Server` does not.

No ``from __future__ import annotations`` here: FastAPI reads the endpoints' annotations (the
``Request`` parameter) as objects, and ``Request`` is imported inside :func:`build_app` (so that this
module imports without the ``serve`` extra).
"""

import asyncio
import contextlib
import json
import os
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .calibration import half_width_of, temperature_of
from .checkpoint import load_model
from .data import decode_labels
from .export import PlainTensorModel, export_model, input_names
from .options import check_bounds, option

__all__ = ["BACKENDS", "ModelService", "RequestError", "ServeOptions", "build_app", "require_server", "serve"]

BACKENDS = ("eager", "onnxruntime")
INLINE_PARSE = 64 * 1024  # bytes of a body parsed on the event loop itself (a thread hop costs more)
INSTALL = "pip install 'attnfuse[serve]'"


@dataclass
class ServeOptions:
    """The options of ``attnfuse serve`` (and of :func:`serve`)."""

    host: str = option("127.0.0.1", "The address to listen on (0.0.0.0: every interface).")
    port: int = option(8000, "The port to listen on (0: any free port; the one chosen is printed).", bounds=(0, 65535))
    backend: str = option(
        "eager",
        "eager: the PyTorch model; onnxruntime: the model exported to ONNX at start-up (checked against it) and "
        "run by onnxruntime (needs attnfuse[export]).",
        choices=BACKENDS,
    )
    max_batch: int = option(256, "Most instances run as one batch by the micro-batcher.", bounds=(1, 65536))
    batch_wait_ms: float = option(
        2.0, "How long the micro-batcher waits for more requests after the first one (milliseconds)."
    )
    max_instances: int = option(1024, "Most instances in one request (more: 413).", bounds=(1, 1 << 20))
    max_body_mb: float = option(32.0, "Largest request body in MB (larger: 413).")
    queue: int = option(256, "Most requests waiting for the model (more: 503 at once).", bounds=(1, 1 << 20))

    def __post_init__(self) -> None:
        check_bounds(self)
        if self.backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if not isinstance(self.host, str) or not self.host:
            raise ValueError(f"host: expected an address, got {self.host!r}")
        for name, low, high in (("batch_wait_ms", 0.0, 10_000.0), ("max_body_mb", 0.001, 4096.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise ValueError(f"{name}: expected a number in [{low:g}, {high:g}], got {value!r}")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1_000_000)


class RequestError(Exception):
    """A request the server refuses: an HTTP ``status`` (4xx, or 503) and a one-line reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def require_server() -> None:
    """A ValueError naming the install command when FastAPI or uvicorn is missing."""
    for name in ("fastapi", "uvicorn"):
        try:
            __import__(name)
        except ImportError:
            raise ValueError(f"attnfuse serve needs FastAPI and uvicorn ({name} is missing): {INSTALL}") from None


def _refuse_constant(name: str) -> float:
    raise RequestError(422, f"body: {name} is not a feature value (and not JSON): expected finite numbers")


class ModelService:
    """A model directory ready to answer instances: parsing and checking requests, running batches.

    ``run`` is called from one worker thread at a time (the batcher's)."""

    def __init__(self, model_dir: str | os.PathLike, backend: str = "eager") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
        self.model_dir = Path(model_dir)
        self.backend = backend
        net, config, standardizer = load_model(self.model_dir)
        self.config = config
        self.task: str = config["data"]["task"]
        # The temperature inside the wrapper (as export_model puts it in the graph): both backends
        # answer the calibrated probabilities that `attnfuse predict` writes.
        self.wrapper = PlainTensorModel(net, standardizer, self.task, temperature=temperature_of(config)).eval()
        self.half_width = half_width_of(config)  # (K,) of --interval, or None
        self.specs = self.wrapper.specs
        self.names = input_names(self.wrapper)
        self.out_dim = int(config["data"]["num_classes" if self.task == "classification" else "target_dim"])
        classes = config["data"].get("classes")
        self.classes = (
            decode_labels(np.arange(self.out_dim), classes).tolist() if self.task == "classification" else None
        )
        self.parity: float | None = None
        self._session = None
        if backend == "onnxruntime":
            self._session = self._onnx_session()

    def _onnx_session(self):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ValueError("backend onnxruntime: needs onnxruntime (pip install 'attnfuse[export]')") from None
        with tempfile.TemporaryDirectory(prefix="attnfuse-serve-") as tmp:
            path = Path(tmp) / "model.onnx"
            info = export_model(self.model_dir, path, "onnx")  # refuses a graph that disagrees on masked rows
            graph = path.read_bytes()
        self.parity = info["max_abs_difference"]
        settings = ort.SessionOptions()
        settings.intra_op_num_threads = torch.get_num_threads()
        settings.inter_op_num_threads = 1
        return ort.InferenceSession(graph, settings, providers=["CPUExecutionProvider"])

    def schema(self, options: ServeOptions | None = None) -> dict:
        """What a request must hold, from ``config.json``."""
        modalities = []
        for s in self.specs:
            if s.is_sequence:
                shape, form = [s.length, s.dim], f"a list of at most {s.length} steps, each a list of {s.dim} numbers"
            else:
                shape, form = [s.dim], f"a list of {s.dim} numbers"
            modalities.append({"name": s.name, "is_sequence": s.is_sequence, "shape": shape, "input": form})
        out: dict[str, Any] = {
            "model": str(self.model_dir),
            "fusion": self.config["fusion"],
            "task": self.task,
            "modalities": modalities,
            "absent": "a missing key or null (at least one modality per instance)",
            "output": "probabilities" if self.task == "classification" else "values",
            "output_dim": self.out_dim,
            "classes": self.classes,
            "calibration": self.config.get("calibration"),  # the temperature, or --interval's level and half-widths
            "backend": self.backend,
        }
        if options is not None:
            out["limits"] = {
                "max_instances": options.max_instances,
                "max_body_bytes": options.max_body_bytes,
                "max_batch": options.max_batch,
            }
        return out

    def parse(self, body: bytes, max_instances: int) -> tuple[list[np.ndarray], int]:
        """A request body -> the graph's inputs (``x`` (n, T, D) float32 and ``mask`` (n, T) bool per
        modality, in the model's order) and n; a :class:`RequestError` says what is wrong."""
        try:
            request = json.loads(body, parse_constant=_refuse_constant)
        except RequestError:
            raise
        except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
            raise RequestError(400, f"body: not valid JSON ({e})") from None
        except RecursionError:
            raise RequestError(400, "body: JSON nested too deeply") from None
        return self.inputs(request, max_instances)

    def inputs(self, request: Any, max_instances: int) -> tuple[list[np.ndarray], int]:
        """:meth:`parse` for a request already decoded from JSON."""
        if not isinstance(request, dict) or "instances" not in request:
            raise RequestError(422, 'body: expected a JSON object {"instances": [...]}')
        extra = sorted(set(request) - {"instances"})
        if extra:
            raise RequestError(422, f"body: unknown key {extra[0]!r} (expected only 'instances')")
        instances = request["instances"]
        if not isinstance(instances, list) or not instances:
            raise RequestError(422, "instances: expected a non-empty list of objects, one per instance")
        n = len(instances)
        if n > max_instances:
            raise RequestError(413, f"instances: at most {max_instances} per request, got {n}")
        xs = [np.zeros((n, s.length, s.dim), dtype=np.float32) for s in self.specs]  # (n, T, D) each
        masks = [np.zeros((n, s.length), dtype=bool) for s in self.specs]  # (n, T) each
        index = {s.name: i for i, s in enumerate(self.specs)}
        for row, instance in enumerate(instances):
            where = f"instances[{row}]"
            if not isinstance(instance, dict):
                raise RequestError(422, f"{where}: expected an object of modality -> features, got {_kind(instance)}")
            unknown = [k for k in instance if k not in index]
            if unknown:
                raise RequestError(422, f"{where}: unknown modality {unknown[0][:60]!r} (expected {', '.join(index)})")
            present = 0
            for name, value in instance.items():
                if value is None:
                    continue
                i = index[name]
                steps = self._features(value, self.specs[i], f"{where}.{name}")  # (t, D)
                xs[i][row, : len(steps)] = steps
                masks[i][row, : len(steps)] = True
                present += len(steps) > 0
            if not present:
                raise RequestError(422, f"{where}: no modality given (expected at least one of {', '.join(index)})")
        return [t for pair in zip(xs, masks) for t in pair], n

    @staticmethod
    def _features(value: Any, spec, where: str) -> np.ndarray:
        """One modality of one instance as (t, D) float32, t <= T (t = 1 for a vector)."""
        if not isinstance(value, list):
            raise RequestError(422, f"{where}: expected a list of numbers, got {_kind(value)}")
        if spec.is_sequence and not value:
            return np.zeros((0, spec.dim), dtype=np.float32)
        try:
            array = np.array(value)
        except (ValueError, TypeError):  # ragged lists
            array = None
        expected = f"{spec.dim} numbers" if not spec.is_sequence else f"up to {spec.length} steps of {spec.dim} numbers"
        wanted = 2 if spec.is_sequence else 1
        if array is None or array.ndim != wanted or array.dtype.kind not in "iuf":
            shape = "a ragged or non-numeric list" if array is None or array.dtype.kind not in "iufb" else None
            raise RequestError(422, f"{where}: expected {expected}, got {shape or _shape(array)}")
        if any(bool in set(map(type, r)) for r in (value if spec.is_sequence else [value])):  # numpy reads True as 1
            raise RequestError(422, f"{where}: expected {expected}, got booleans")
        steps = array.reshape(1, -1) if not spec.is_sequence else array  # (t, D)
        if steps.shape[1] != spec.dim or steps.shape[0] > spec.length:
            raise RequestError(422, f"{where}: expected {expected}, got {_shape(array)}")
        with np.errstate(over="ignore"):
            steps = steps.astype(np.float32)
        if not np.isfinite(steps).all():
            raise RequestError(422, f"{where}: a value is not a finite float32 number")
        return steps

    def run(self, inputs: list[np.ndarray]) -> np.ndarray:
        """Probabilities (B, C) or values (B, K) for the graph's inputs (see :meth:`parse`)."""
        if self._session is not None:
            return self._session.run(None, dict(zip(self.names, inputs)))[0]
        with torch.inference_mode():
            return self.wrapper(*(torch.from_numpy(a) for a in inputs)).numpy()

    def answer(self, outputs: np.ndarray) -> dict:
        """The JSON answer for ``outputs`` (n, C) or (n, K), as :meth:`run` returns them."""
        if self.task == "classification":
            codes = outputs.argmax(axis=1)
            return {
                "predictions": [self.classes[c] for c in codes.tolist()],
                "classes": self.classes,
                "probabilities": outputs.astype(np.float64).tolist(),
            }
        values = outputs.astype(np.float64)
        answer = {"predictions": values[:, 0].tolist() if values.shape[1] == 1 else values.tolist()}
        if self.half_width is not None:  # the split-conformal interval of --interval, per target
            for key, bound in (("lower", values - self.half_width), ("upper", values + self.half_width)):
                answer[key] = bound[:, 0].tolist() if values.shape[1] == 1 else bound.tolist()
        return answer


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def _shape(array: np.ndarray) -> str:
    return f"shape {list(array.shape)}"


@dataclass
class _Pending:
    inputs: list[np.ndarray]
    n: int
    future: asyncio.Future


@dataclass
class Stats:
    """What the server did (shown by ``/health`` and returned by :func:`serve`)."""

    requests: int = 0  # answered with predictions
    running: int = 0  # instances in the model now
    refused: int = 0  # answered with a 4xx or 503
    batches: int = 0
    instances: int = 0
    started: float = field(default_factory=time.monotonic)


class MicroBatcher:
    """Requests arriving within ``wait_s`` of the first one run as one batch (at most ``max_batch``
    instances; a larger request runs alone). One worker thread runs the model, so batches never
    overlap and the event loop stays free to read requests."""

    def __init__(self, service: ModelService, max_batch: int, wait_s: float, queue: int, stats: Stats) -> None:
        self.service, self.max_batch, self.wait_s, self.stats = service, max_batch, wait_s, stats
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue(queue)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="attnfuse-model")
        self.task: asyncio.Task | None = None
        self._carry: _Pending | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """After the last request was answered (the server drains connections first)."""
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self.executor.shutdown(wait=True)

    async def submit(self, inputs: list[np.ndarray], n: int) -> np.ndarray:
        future = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait(_Pending(inputs, n, future))
        except asyncio.QueueFull:
            raise RequestError(
                503, f"server busy: the queue is full ({self.queue.maxsize} waiting); retry later"
            ) from None
        return await future

    async def _next(self, timeout: float | None) -> _Pending | None:
        if self._carry is not None:
            item, self._carry = self._carry, None
            return item
        if timeout is None:
            return await self.queue.get()
        if timeout <= 0:
            return None if self.queue.empty() else self.queue.get_nowait()
        try:
            return await asyncio.wait_for(self.queue.get(), timeout)
        except asyncio.TimeoutError:
            return None

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._next(None)
            items, count = [first], first.n
            deadline = loop.time() + self.wait_s
            while count < self.max_batch:
                item = await self._next(deadline - loop.time())
                if item is None:
                    break
                if count + item.n > self.max_batch:
                    self._carry = item  # the next batch's first
                    break
                items.append(item)
                count += item.n
            items = [i for i in items if not i.future.done()]  # a client that went away
            if not items:
                continue
            inputs = [np.concatenate(parts) for parts in zip(*(i.inputs for i in items))]
            self.stats.running = count
            try:
                outputs = await loop.run_in_executor(self.executor, self.service.run, inputs)
            except Exception as e:  # a failure of the model: every waiting request gets it (a 500)
                for i in items:
                    if not i.future.done():
                        i.future.set_exception(e)
                continue
            finally:
                self.stats.running = 0
            self.stats.batches += 1
            self.stats.instances += count
            start = 0
            for i in items:
                if not i.future.done():
                    i.future.set_result(outputs[start : start + i.n])
                start += i.n


def build_app(service: ModelService, options: ServeOptions, stats: Stats | None = None):
    """The FastAPI application serving ``service`` with ``options``' limits."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    stats = stats if stats is not None else Stats()
    batcher: MicroBatcher | None = None

    @contextlib.asynccontextmanager
    async def lifespan(app):
        nonlocal batcher
        batcher = MicroBatcher(service, options.max_batch, options.batch_wait_ms / 1000, options.queue, stats)
        batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(title="attnfuse", lifespan=lifespan, docs_url="/docs", redoc_url=None)

    def refuse(status: int, message: str) -> JSONResponse:
        stats.refused += 1
        return JSONResponse({"error": " ".join(str(message).split())[:1000]}, status_code=status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:  # 404, 405: one line too
        return refuse(e.status_code, str(e.detail))

    @app.get("/health")
    async def health() -> dict:
        return _health(service, stats, batcher)

    @app.get("/schema")
    async def schema() -> dict:
        return service.schema(options)

    @app.post("/predict")
    async def predict(request: Request):
        try:
            body = await _read_body(request, options.max_body_bytes)
            if len(body) > INLINE_PARSE:  # a large body is parsed in a thread: /health and small requests go on
                inputs, n = await run_in_threadpool(service.parse, body, options.max_instances)
            else:
                inputs, n = service.parse(body, options.max_instances)
            outputs = await batcher.submit(inputs, n)
        except RequestError as e:
            return refuse(e.status, str(e))
        except Exception as e:  # the model failed: a bug, not the request's fault
            return refuse(500, f"internal error: {type(e).__name__}: {e}")
        stats.requests += 1
        return service.answer(outputs)

    return app


def _health(service: ModelService, stats: Stats, batcher: MicroBatcher | None) -> dict:
    """GET /health: the backend and the server's counters."""
    return {
        "status": "ok",
        "backend": service.backend,
        "requests": stats.requests,
        "refused": stats.refused,
        "batches": stats.batches,
        "running": stats.running,
        "waiting": batcher.queue.qsize() if batcher is not None else 0,
        "uptime_s": round(time.monotonic() - stats.started, 3),
    }


async def _read_body(request, limit: int) -> bytes:
    """The body, refused (413) beyond ``limit`` bytes: by its Content-Length before reading, and
    while reading one that has none (chunked)."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise RequestError(400, f"Content-Length: expected a number of bytes, got {length[:40]!r}")
        if int(length) > limit:
            raise RequestError(413, f"body: at most {limit} bytes, got {int(length)}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"body: at most {limit} bytes, got more")
        chunks.append(chunk)
    return b"".join(chunks)


def _server_class():
    import uvicorn

    class _Server(uvicorn.Server):
        """uvicorn's server, but a SIGTERM or Ctrl-C that stopped it gracefully is not raised again
        once it has stopped (that was the signal's whole work: the process ends with code 0)."""

        signal_received: int | None = None

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {s: signal.signal(s, self._stop) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)

        def _stop(self, signum: int, frame: object) -> None:
            self.signal_received = signum
            self.handle_exit(signum, frame)  # a second Ctrl-C stops waiting for open connections

    return _Server


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (an OSError naming the address when it is taken)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit it (Linux): a response's head and body are written separately,
    # and with Nagle's algorithm the body waited for the client's delayed ACK, ~40 ms a request on
    # asyncio's loop (benchmarks/RESULTS.md: 64 -> 18 ms at one client).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(e.errno, e.strerror, f"{host}:{port}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


DRAIN_TIMEOUT = 60.0  # seconds a stopping server waits for the requests it has received


def serve(
    model_dir: str | os.PathLike,
    options: ServeOptions | None = None,
    ready: Callable[[str, ModelService], None] | None = None,
) -> dict:
    """Serve ``model_dir`` until SIGTERM or Ctrl-C; then answer what was received and return what
    was done (``requests``, ``refused``, ``batches``, ``instances``, ``signal``). ``ready(url,
    service)`` is called once the model is loaded and the port is bound."""
    options = options or ServeOptions()
    require_server()
    import uvicorn

    service = ModelService(model_dir, options.backend)
    sock = bind(options.host, options.port)
    host, port = sock.getsockname()[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    stats = Stats()
    app = build_app(service, options, stats)
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=DRAIN_TIMEOUT,
        lifespan="on",
    )
    server = _server_class()(config)
    if ready is not None:
        ready(url, service)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if not server.started:
        raise ValueError(f"serve: the server did not start on {url}")
    signum = server.signal_received
    return {
        "url": url,
        "requests": stats.requests,
        "refused": stats.refused,
        "batches": stats.batches,
        "instances": stats.instances,
        "signal": None if signum is None else signal.Signals(signum).name,
        "seconds": round(time.monotonic() - stats.started, 1),
    }
