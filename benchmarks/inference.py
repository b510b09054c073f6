"""Inference of a trained model where it is deployed: the eager PyTorch model against the same model
exported to ONNX and run by ONNX Runtime, and ``attnfuse serve`` under load on 127.0.0.1.

    python benchmarks/inference.py --threads 1       # both parts; writes its section of RESULTS.md
    python benchmarks/inference.py --quick           # fewer rounds and requests, prints only
    python benchmarks/inference.py --part backends   # one part (repeatable): backends, serve, frameworks

Models: ``self`` and ``mult`` at MulT's CMU-MOSEI sizes (benchmarks/speed.py): T = 50 steps of
text/audio/vision features 300/74/35, d_model 30, 5 heads, 5 layers; trained for one epoch on 48
random rows (the weights do not change the speed) into a model directory, as a user's would be.

backends: both run what ``attnfuse serve`` runs (:class:`attnfuse.serve.ModelService`: the
standardisation inside :class:`attnfuse.export.PlainTensorModel`, probabilities out), on the same
inputs: sequences of random lengths 25..50 (padded, masked), the serving case. Latency per sample at
batch 1 (``--number`` calls per round) and throughput at batch 256, the contenders round-robin in
one process (benchmarks/attention.py's ``interleave``); medians over the rounds, and the median of
the per-round ratios.

serve: ``attnfuse serve`` in its own process (both backends, one after the other), a warm-up of 20
requests, then a bounded number of requests of one instance each from N concurrent clients (threads
of this process, one keep-alive connection each, bodies encoded beforehand: features rounded to 4
decimals, ~130 KB of JSON per instance). Reported: requests/s, p50/p99 latency, errors (anything but
200), the mean batch the micro-batcher formed, and the server's RSS after the warm-up, at the end
and at its highest (sampled every 50 ms). Clients and server share the machine's cores.

nodelay: ``attnfuse serve`` as it is and with Nagle's algorithm back on its socket, the same load.

frameworks (when litserve is found; ``--litserve-path DIR`` puts a ``pip install --target DIR
litserve`` on the LitServe process's path only, so that ``attnfuse serve`` runs on its own
dependencies, not on LitServe's uvloop and httptools): the same service behind LitServe, the same load; the
installed size of each server's packages, what a malformed body gets, and what SIGTERM does to a
request in the model.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from _machine import machine
from _report import finished, write_part
from attention import interleave
from attnfuse.serve import ModelService
from scaling import free_port

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Inference: eager vs ONNX Runtime, and `attnfuse serve` under load"
DIMS = {"text": 300, "audio": 74, "vision": 35}
T, D_MODEL, HEADS, LAYERS = 50, 30, 5, 5
PARTS = ("backends", "serve", "nodelay", "frameworks")


def model_dir(root: Path, fusion: str, threads: int) -> Path:
    """A model directory of ``fusion`` at MOSEI sizes (one epoch on 48 random rows)."""
    data = root / "mosei-shaped.npz"
    if not data.exists():
        rng = np.random.default_rng(0)
        arrays = {f"x_{n}": rng.normal(size=(48, T, d)).astype(np.float32) for n, d in DIMS.items()}
        np.savez(data, **arrays, y=rng.normal(size=48).astype(np.float32))
    out = root / fusion
    layers = ["--layers", str(LAYERS), "--heads", str(HEADS), "--dropout", "0.1"]
    command = [sys.executable, "-m", "attnfuse", "train", "--data", str(data), "--fusion", fusion, "--epochs", "1"]
    command += ["--d-model", str(D_MODEL), *layers, "--no-baselines", "--batch-size", "24", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    return out


def mosei_inputs(service: ModelService, batch: int, seed: int = 0) -> list[np.ndarray]:
    """The graph's inputs for ``batch`` samples: every sequence valid for its first 25..50 steps."""
    rng = np.random.default_rng(seed)
    inputs = []
    for spec in service.specs:
        x = rng.normal(size=(batch, spec.length, spec.dim)).astype(np.float32)  # (B, T, D)
        valid = np.arange(spec.length)[None] < rng.integers(25, spec.length + 1, size=batch)[:, None]  # (B, T)
        inputs += [x, valid]
    return inputs


def calls(eager: ModelService, ort: ModelService, inputs: list[np.ndarray]) -> dict:
    return {"eager": lambda: eager.run(inputs), "ort": lambda: ort.run(inputs)}


def part_backends(args, root: Path) -> list[str]:
    lines = [
        "| fusion | batch 1: eager, ms/sample | batch 1: ONNX Runtime | ORT / eager time | "
        "batch 256: eager, samples/s | batch 256: ONNX Runtime | ORT / eager rate | max abs difference |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for fusion in ("self", "mult"):
        directory = model_dir(root, fusion, args.threads)
        eager, ort = ModelService(directory, "eager"), ModelService(directory, "onnxruntime")
        one, many = mosei_inputs(eager, 1), mosei_inputs(eager, 256, seed=1)
        difference = float(np.abs(eager.run(many) - ort.run(many)).max())
        small = interleave(calls(eager, ort, one), args.rounds, number=args.number)
        large = interleave(calls(eager, ort, many), args.rounds, number=1)
        ms = {k: statistics.median(v) * 1000 for k, v in small.items()}
        rate = {k: 256 / statistics.median(v) for k, v in large.items()}
        time_ratio = statistics.median(o / e for o, e in zip(small["ort"], small["eager"]))
        rate_ratio = statistics.median(e / o for o, e in zip(large["ort"], large["eager"]))
        lines.append(
            f"| {fusion} | {ms['eager']:.2f} | {ms['ort']:.2f} | {time_ratio:.2f} | {rate['eager']:.0f} | "
            f"{rate['ort']:.0f} | {rate_ratio:.2f} | {difference:.1e} |"
        )
        print(lines[-1], flush=True)
    return lines


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Server:
    """``attnfuse serve`` on a free port, ready once /health answers."""

    def __init__(self, directory: Path, backend: str, threads: int, python: list[str] | None = None) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        python = python or [sys.executable, "-m", "attnfuse"]
        command = [*python, "serve", "--model", str(directory), "--port", "0"]
        self.proc = subprocess.Popen(
            [*command, "--backend", backend], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        banner = self.proc.stdout.readline()
        if not banner.startswith("serving "):
            raise RuntimeError(f"attnfuse serve did not start: {banner}{self.proc.stderr.read()}")
        self.host, port = banner.split(" at http://")[1].split()[0].split(":")
        self.port = int(port)
        self.wait_ready(120, 0.05)

    def wait_ready(self, seconds: float, pause: float) -> None:
        """Poll GET /health until it answers 200; a RuntimeError with the server's stderr when its
        process ends first or ``seconds`` pass (the process is killed then)."""
        deadline = time.monotonic() + seconds
        while True:
            try:
                if self.request("GET", "/health")[0] == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.proc.kill()
                raise RuntimeError(f"{type(self).__name__} did not start: {self.proc.stderr.read()}")
            time.sleep(pause)

    def connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=120)

    def request(self, method: str, path: str, body: bytes | None = None, conn=None) -> tuple[int, bytes]:
        own = conn is None
        conn = conn or self.connect()
        try:
            conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            if own:
                conn.close()

    def stop(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=120)
        return code, self.proc.stdout.read().strip()


def bodies(count: int, seed: int = 0) -> list[bytes]:
    """``count`` requests of one MOSEI-sized instance (sequences of 25..50 steps), encoded."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        instance = {n: np.round(rng.normal(size=(rng.integers(25, T + 1), d)), 4).tolist() for n, d in DIMS.items()}
        out.append(json.dumps({"instances": [instance]}).encode())
    return out


def load_test(server: Server, payloads: list[bytes], clients: int, total: int) -> dict:
    """``total`` requests from ``clients`` concurrent clients; latencies, errors, RSS."""
    work: queue.Queue[int] = queue.Queue()
    for i in range(total):
        work.put(i)
    latencies: list[float] = []
    errors: list[int] = []
    lock = threading.Lock()
    peak = [rss_mib(server.proc.pid)]
    done = threading.Event()

    def client() -> None:
        conn = server.connect()
        try:
            while True:
                try:
                    i = work.get_nowait()
                except queue.Empty:
                    return
                t0 = time.perf_counter()
                try:
                    status, _ = server.request("POST", "/predict", payloads[i % len(payloads)], conn)
                except OSError:
                    status = -1
                    conn.close()
                    conn = server.connect()
                elapsed = time.perf_counter() - t0
                with lock:
                    latencies.append(elapsed)
                    if status != 200:
                        errors.append(status)
        finally:
            conn.close()

    def monitor() -> None:
        while not done.wait(0.05):
            peak[0] = max(peak[0], rss_mib(server.proc.pid))

    before = None if isinstance(server, LitServer) else json.loads(server.request("GET", "/health")[1])
    start_rss = rss_mib(server.proc.pid)
    watcher = threading.Thread(target=monitor)
    watcher.start()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    done.set()
    watcher.join()
    ms = np.array(latencies) * 1000
    batch = float("nan")
    if before is not None:
        after = json.loads(server.request("GET", "/health")[1])
        batch = (after["requests"] - before["requests"]) / max(after["batches"] - before["batches"], 1)
    return {
        "requests": total,
        "errors": len(errors),
        "rate": total / wall,
        "p50": float(np.percentile(ms, 50)),
        "p99": float(np.percentile(ms, 99)),
        "batch": batch,
        "rss_start": start_rss,
        "rss_end": rss_mib(server.proc.pid),
        "rss_max": peak[0],
    }


def load_runs(server: Server, payloads: list[bytes], args, runs: list[int]) -> Iterator[tuple[int, dict]]:
    """20 warm-up requests, then a :func:`load_test` per number of clients in ``runs``: ``--requests``
    requests, a quarter of them (at least 20) for one client."""
    for body in payloads + payloads[:4]:
        server.request("POST", "/predict", body)
    for clients in runs:
        total = args.requests if clients > 1 else max(args.requests // 4, 20)
        yield clients, load_test(server, payloads, clients, total)


def part_serve(args, root: Path) -> list[str]:
    directory = model_dir(root, "self", args.threads)
    payloads = bodies(16)
    size = statistics.mean(len(b) for b in payloads) / 1000
    lines = [
        f"`self` at MOSEI sizes, one instance per request ({size:.0f} KB of JSON on average), "
        f"`attnfuse serve` defaults (batch wait 2 ms, at most 256 instances per batch).",
        "",
        "| backend | clients | requests | errors | requests/s | p50 ms | p99 ms | mean batch (requests) | "
        "RSS after warm-up, MiB | RSS at the end | RSS highest |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for backend in ("eager", "onnxruntime"):
        server = Server(directory, backend, args.threads)
        try:
            runs = [*args.clients, args.clients[-1]]  # the last again: is the memory flat?
            for k, (clients, r) in enumerate(load_runs(server, payloads, args, runs)):
                again = ", again" if k == len(runs) - 1 else ""
                lines.append(
                    f"| {backend} | {clients}{again} | {r['requests']} | {r['errors']} | {r['rate']:.1f} | {r['p50']:.1f} | "
                    f"{r['p99']:.1f} | {r['batch']:.2f} | {r['rss_start']:.0f} | {r['rss_end']:.0f} | "
                    f"{r['rss_max']:.0f} |"
                )
                print(lines[-1], flush=True)
        finally:
            code, said = server.stop()
        if code != 0:
            raise RuntimeError(f"attnfuse serve exited with {code} after SIGTERM: {said}")
    return lines


NAGLE = (
    "import socket, sys; sys.argv[0] = 'attnfuse'; import attnfuse.serve as s; bind = s.bind; "
    "s.bind = lambda *a: (lambda sock: (sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0), sock)[1])(bind(*a)); "
    "import attnfuse_cli; attnfuse_cli.main()"
)


def part_nodelay(args, root: Path) -> list[str]:
    """``attnfuse serve`` as it is (TCP_NODELAY on its socket) and with Nagle's algorithm back (the
    option cleared after :func:`attnfuse.serve.bind`, injected in the server's interpreter)."""
    directory = model_dir(root, "self", args.threads)
    payloads = bodies(16)
    lines = [
        "`self` at MOSEI sizes, eager backend, one instance per request, uvicorn on asyncio's loop and h11.",
        "",
        "| server socket | clients | requests | errors | requests/s | p50 ms | p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, command in (("TCP_NODELAY (attnfuse serve)", None), ("Nagle's algorithm", [sys.executable, "-c", NAGLE])):
        server = Server(directory, "eager", args.threads, command)
        try:
            for clients, r in load_runs(server, payloads, args, args.clients):
                lines.append(
                    f"| {name} | {clients} | {r['requests']} | {r['errors']} | {r['rate']:.1f} | {r['p50']:.1f} | "
                    f"{r['p99']:.1f} |"
                )
                print(lines[-1], flush=True)
        finally:
            server.stop()
    return lines


class LitServer(Server):
    """LitServe in a process of its own, with ``--litserve-path`` (only there) on its PYTHONPATH."""

    path: str = ""

    def __init__(self, directory: Path, threads: int, port: int, delay: float = 0.0) -> None:
        python_path = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), self.path]))
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": python_path}
        command = [
            sys.executable,
            str(Path(__file__).with_name("litserve_api.py")),
            str(directory),
            str(port),
            str(delay),
        ]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        self.host, self.port = "127.0.0.1", port
        self.wait_ready(180, 0.2)

    def stop(self) -> tuple[int, str]:
        """SIGTERM to LitServe's process; its descendants still running afterwards are counted
        (``left``) and killed."""
        family = descendants(self.proc.pid)
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=120)
        time.sleep(2.0)
        self.left = [p for p in family if Path(f"/proc/{p}").exists()]
        for pid in self.left:
            os.kill(pid, signal.SIGKILL)
        return code, ""


def descendants(pid: int) -> list[int]:
    children = [
        int(c) for c in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    ]
    return children + [d for c in children for d in descendants(c)]


def tree_rss_mib(pid: int) -> float:
    """RSS of a process and its descendants (LitServe runs its server and its model in processes of their own)."""
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return rss_mib(pid) + sum(tree_rss_mib(int(c)) for c in children)


def distribution(name: str, path: list[str]):
    """The distribution ``name``, the first found on ``path``."""
    from importlib import metadata

    return next(iter(metadata.distributions(name=name, path=path)))


def installed_mb(names: list[str], path: list[str]) -> float:
    """The installed size of the distributions ``names`` (the first found on ``path`` each)."""
    return sum(f.size or 0 for name in names for f in distribution(name, path).files or []) / 1e6


SERVE_DEPS = ["fastapi", "starlette", "pydantic", "pydantic-core", "anyio", "uvicorn", "h11", "click", "idna"]
LITSERVE_EXTRA = ["litserve", "pyzmq", "uvloop", "httptools", "watchfiles", "websockets", "python-dotenv"]


def part_frameworks(args, root: Path) -> list[str]:
    import importlib.machinery

    LitServer.path = args.litserve_path or ""
    path = [p for p in [args.litserve_path, *sys.path] if p]
    if importlib.machinery.PathFinder.find_spec("litserve", path) is None:
        return ["(skipped: litserve was not found; `pip install --target DIR litserve` and --litserve-path DIR)"]
    directory = model_dir(root, "self", args.threads)
    payloads = bodies(16)
    lines = [
        "The same `ModelService` (parsing, checks, model) behind `attnfuse serve` (FastAPI + uvicorn on asyncio's "
        f"loop and h11, its own micro-batcher and model thread) and behind LitServe {distribution('litserve', path).version} "
        "(uvicorn on uvloop and httptools, "
        "`LitAPI(max_batch_size=256, batch_timeout=0.002)`, the model in one worker process); `self` at MOSEI "
        "sizes, one instance per request, eager backend. Installed: the packages each adds to attnfuse's own.",
        "",
        "| server | clients | requests | errors | requests/s | p50 ms | p99 ms | RSS of its processes, MiB | "
        "malformed JSON | installed, MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    size = {"attnfuse serve": installed_mb(SERVE_DEPS, sys.path)}
    size["LitServe"] = size["attnfuse serve"] + installed_mb(LITSERVE_EXTRA, path)
    for name in ("attnfuse serve", "LitServe"):
        if name == "LitServe":
            server = LitServer(directory, args.threads, free_port())
        else:
            server = Server(directory, "eager", args.threads)
        try:
            for clients, r in load_runs(server, payloads, args, args.clients):
                bad = server.request("POST", "/predict", b'{"instances": [{')[0]
                lines.append(
                    f"| {name} | {clients} | {r['requests']} | {r['errors']} | {r['rate']:.1f} | {r['p50']:.1f} | "
                    f"{r['p99']:.1f} | {tree_rss_mib(server.proc.pid):.0f} | {bad} | {size[name]:.0f} |"
                )
                print(lines[-1], flush=True)
        finally:
            server.stop()
            if name == "LitServe":
                lines_left = [f"{len(server.left)} of its processes were still running after SIGTERM"]
    # SIGTERM while a request is in the model (each call 2 s longer): answered? exit code?
    server = LitServer(directory, args.threads, free_port(), delay=2.0)
    answer: dict = {}
    sender = threading.Thread(target=lambda: answer.update(r=server.request("POST", "/predict", payloads[0])))
    sender.start()
    time.sleep(1.0)
    try:
        code, _ = server.stop()
    except subprocess.TimeoutExpired:
        server.proc.kill()
        code = "none (killed after 120 s)"
    sender.join(timeout=10)
    got = answer.get("r", ("no answer",))[0]
    left = len(getattr(server, "left", []))
    lines += [
        "",
        f"LitServe, SIGTERM 1 s into a request that takes 2 s: the request got {got}, the server's process exited "
        f"with code {code}, {left} of its processes were still running 2 s later (killed here); after the load "
        f"tests above, {lines_left[0]}. (`attnfuse serve`: the request is answered, exit code 0, one process: "
        f"tests/test_serve.py.)",
    ]
    print(lines[-1], flush=True)
    return lines


NOTE = (
    "The machine: 2 cores shared with other engineers' processes (load averages from 1 to 9 during these runs, each block says its own), so "
    "absolute figures are low and noisy; compare the columns of one table (measured in one run, interleaved), "
    "not tables or runs."
)
TITLES = {
    "backends": "Eager PyTorch vs ONNX Runtime (both as `attnfuse serve` runs them)",
    "serve": "`attnfuse serve` under load on 127.0.0.1",
    "nodelay": "`attnfuse serve` with TCP_NODELAY and with Nagle's algorithm",
    "frameworks": "FastAPI + uvicorn (`attnfuse serve`) vs LitServe, same model and load",
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", action="append", choices=PARTS)
    p.add_argument("--rounds", type=int, default=11, help="timed rounds per contender (default 11)")
    p.add_argument("--number", type=int, default=20, help="batch-1 calls per round (default 20)")
    p.add_argument("--threads", type=int, default=1, help="torch/ONNX Runtime threads (default 1: a shared machine)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8], help="concurrent clients (default 1 8)")
    p.add_argument("--requests", type=int, default=400, help="requests per load test (default 400; 1 client: 1/4)")
    p.add_argument("--quick", action="store_true", help="3 rounds, 80 requests, prints only")
    p.add_argument("--litserve-path", default=None, help="a folder holding litserve, for its server process only")
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.rounds, args.number, args.requests = 3, 5, 80
    parts = [x for x in PARTS if x in (args.part or PARTS)]
    with tempfile.TemporaryDirectory(prefix="attnfuse-inference-") as tmp:
        for part in parts:
            machine_line = machine()
            print(f"-- {part}\n{machine_line}", flush=True)
            body = {
                "backends": part_backends,
                "serve": part_serve,
                "nodelay": part_nodelay,
                "frameworks": part_frameworks,
            }[part](args, Path(tmp))
            command = f"python benchmarks/inference.py --part {part} --threads {args.threads}"
            command += f" --rounds {args.rounds} --number {args.number}" if part == "backends" else ""
            command += (
                f" --requests {args.requests} --clients {' '.join(map(str, args.clients))}"
                if part != "backends"
                else ""
            )
            if part == "frameworks" and args.litserve_path:
                command += " --litserve-path DIR"
            run = f"{finished()}, `{command}`; {machine_line}"
            if part == "backends":
                run += f"; {args.rounds} interleaved rounds after 1 warm-up round"
            text = f"### {TITLES[part]}\n\nRun: {run}.\n\n" + "\n".join(body)
            if not args.quick:
                write_part(args.out, "benchmarks/inference.py", part, text, SECTION, NOTE)
                print(f"wrote the {part} block of benchmarks/inference.py in {args.out}", flush=True)


if __name__ == "__main__":
    main()
