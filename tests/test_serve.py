"""``attnfuse serve`` (:mod:`attnfuse.serve`): the real server, started in a fresh interpreter on a
free 127.0.0.1 port, answers what ``attnfuse predict`` answers on the same rows (padded steps and
absent modalities included, requests sent concurrently so that they share batches), with both
backends; bad requests get a 4xx with a one-line reason and leave the server alive; SIGTERM while a
request is in the model lets it complete, then the process exits with code 0. Without FastAPI and
uvicorn the command says how to install them (these tests skip)."""

from __future__ import annotations

import csv
import importlib.util
import itertools
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from attnfuse.calibration import half_width_of, temperature_of
from attnfuse.checkpoint import load_model, read_config
from attnfuse.data import load_data
from attnfuse.serve import ModelService, RequestError
from attnfuse.training import predict
from clikit import assert_one_line, cli, ok

ROOT = Path(__file__).resolve().parents[1]
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "COLUMNS": "300",
    "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
}
TINY = ["--epochs", "2", "--d-model", "8", "--batch-size", "32", "--no-baselines"]
LABELS = np.array(["cat", "dog", "eel"])
START_DEADLINE = 120.0  # seconds for a server to load torch and the model on a busy machine
# A model call that takes a while, injected in the server's interpreter (no hook in the code).
SLOW_MODEL = (
    "import sys, time; sys.argv[0] = 'attnfuse'; delay = float(sys.argv.pop(1)); import attnfuse.serve as s; "
    "run = s.ModelService.run; s.ModelService.run = lambda self, inputs: (time.sleep(delay), run(self, inputs))[1]; "
    "import attnfuse_cli; attnfuse_cli.main()"
)
MISSING = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
has_server = pytest.mark.skipif(bool(MISSING), reason="attnfuse serve needs FastAPI and uvicorn (attnfuse[serve])")
has_onnxruntime = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime") is None, reason="needs onnxruntime (attnfuse[export])"
)


def write_data(path: Path, n: int = 60, seed: int = 0, regression: bool = False) -> Path:
    """a: (N, 4) vectors, absent in every 5th row; b: (N, 3, 2) sequences with padded steps, absent
    in every 5th row from the third; string labels (or a regression target)."""
    rng = np.random.default_rng(seed)
    codes = np.arange(n) % 3
    mask_a = np.ones(n, dtype=bool)
    mask_a[::5] = False
    mask_b = np.arange(3)[None] < rng.integers(1, 4, size=n)[:, None]  # (N, 3)
    mask_b[2::5] = False
    x_b = rng.normal(size=(n, 3, 2)).astype(np.float32)
    x_b[~mask_b] = np.nan  # never read
    y = rng.normal(size=n).astype(np.float32) if regression else LABELS[codes]
    x_a = (rng.normal(size=(n, 4)) + codes[:, None]).astype(np.float32)
    np.savez(path, x_a=x_a, x_b=x_b, mask_a=mask_a, mask_b=mask_b, y=y)
    return path


def instances(path: Path, rows) -> list[dict]:
    """The rows of ``path`` as JSON instances: an absent modality left out (or null), a sequence
    as its valid steps only."""
    with np.load(path) as f:
        data = {k: f[k] for k in f.files}
    out = []
    for i in rows:
        instance: dict = {"b": data["x_b"][i][data["mask_b"][i]].tolist()} if data["mask_b"][i].any() else {}
        if data["mask_a"][i]:
            instance["a"] = data["x_a"][i].tolist()
        elif i % 2:
            instance["a"] = None  # absent as null (else as a missing key)
        out.append(instance)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    data = write_data(root / "labels.npz")
    ok(cli("train", "--data", data, "--fusion", "self", "--layers", "1", "--heads", "2", *TINY, "--out", root / "cls"))
    values = write_data(root / "values.npz", regression=True)
    ok(cli("train", "--data", values, "--fusion", "concat", "--interval", "0.8", *TINY, "--out", root / "reg"))
    return {"root": root, "data": data, "cls": root / "cls", "values": values, "reg": root / "reg"}


class Server:
    """``attnfuse serve`` in a fresh interpreter on a free port (``--port 0``; the line it prints
    names the port), ready once GET /health answers."""

    def __init__(self, model: Path, *args: str, command: list[str] | None = None) -> None:
        command = command or [sys.executable, "-m", "attnfuse"]
        self.proc = subprocess.Popen(
            [*command, "serve", "--model", str(model), "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + START_DEADLINE
        self.banner = self._line(deadline)
        if not self.banner.startswith("serving "):
            self.proc.kill()
            raise AssertionError(f"{self.banner}; stderr: {self.proc.stderr.read()}")
        self.url = self.banner.split(" at ")[1].split()[0]
        while True:  # the banner comes as the port is bound; /health once the app runs
            try:
                if self.get("/health")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the server did not answer /health in time"
            assert self.proc.poll() is None, self.proc.stderr.read()
            time.sleep(0.05)

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put("")

    def _line(self, deadline: float) -> str:
        try:
            return self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            self.proc.kill()
            raise AssertionError(f"no line from the server in time; stderr: {self.proc.stderr.read()}") from None

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
        req = urllib.request.Request(self.url + path, data=body, method=method)
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def get(self, path: str) -> tuple[int, dict]:
        return self.request("GET", path)

    def predict(self, instances: list[dict], pad: int = 0) -> tuple[int, dict]:
        """POST /predict; ``pad`` spaces after the JSON (a body over 64 KB is parsed in a thread)."""
        return self.request("POST", "/predict", json.dumps({"instances": instances}).encode() + b" " * pad)

    def stop(self) -> tuple[int, str, str]:
        """SIGTERM; (exit code, the rest of stdout, stderr)."""
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=60)
        rest = []
        while (line := self._line(time.monotonic() + 10)) != "":
            rest.append(line)
        return code, "\n".join(rest), self.proc.stderr.read()


@pytest.fixture(scope="module", params=["eager", pytest.param("onnxruntime", marks=has_onnxruntime)])
def server(request, models):
    if MISSING:
        pytest.skip(f"needs {', '.join(MISSING)} (pip install 'attnfuse[serve]')")
    s = Server(models["cls"], "--backend", request.param, "--max-instances", "100", "--max-body-mb", "1")
    s.backend = request.param
    yield s
    code, out, err = s.stop()
    assert code == 0, err
    assert "stopped (SIGTERM)" in out
    assert "Traceback" not in err, err


def predict_csv(models, tmp_path) -> list[dict]:
    """``attnfuse predict``'s rows for the classification model's data."""
    out = tmp_path / "preds.csv"
    ok(cli("predict", "--model", models["cls"], "--data", models["data"], "--out", out))
    with open(out) as f:
        return list(csv.DictReader(f))


@has_server
def test_answers_equal_attnfuse_predict_with_concurrent_requests(server, models, tmp_path):
    rows = predict_csv(models, tmp_path)
    n = len(rows)
    sizes, chunks, start = itertools.cycle([1, 7, 3, 5, 2, 8]), [], 0
    while start < n:  # requests of several sizes, every row once
        chunks.append(range(start, min(start + (k := next(sizes)), n)))
        start += k
    with ThreadPoolExecutor(8) as pool:  # several requests in the queue at once: shared batches
        answers = list(
            pool.map(lambda c: server.predict(instances(models["data"], c), pad=70_000 * (c[0] % 2)), chunks)
        )
    got_labels, got_probs = [], []
    for (status, body), c in zip(answers, chunks):
        assert status == 200, body
        assert body["classes"] == LABELS.tolist()
        assert len(body["predictions"]) == len(body["probabilities"]) == len(c)
        got_labels += body["predictions"]
        got_probs += body["probabilities"]
    order = np.argsort([i for c in chunks for i in c])
    got_labels, got_probs = np.array(got_labels)[order], np.array(got_probs)[order]  # (N,), (N, 3)
    assert got_labels.tolist() == [r["y_pred"] for r in rows]
    written = np.array([[float(r[f"prob_{c}"]) for c in LABELS] for r in rows])  # rounded to 6 decimals
    np.testing.assert_allclose(got_probs, written, rtol=0, atol=1e-6)
    net, config, standardizer = load_model(models["cls"])  # the unrounded numbers behind the file
    logits = predict(net, standardizer.transform(load_data(models["data"])).to_batch())
    expected = (logits / temperature_of(config)).softmax(-1).numpy()  # calibrated, as predict writes them
    np.testing.assert_allclose(got_probs, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got_probs.sum(axis=1), 1.0, rtol=1e-6)


BAD = [
    (b'{"instances": [{"a": [1, 2, 3]}]}', 422, r"instances\[0\]\.a: expected 4 numbers, got shape \[3\]"),
    (b'{"instances": [{"b": [[1, 2], [3, 4], [5, 6], [7, 8]]}]}', 422, r"instances\[0\]\.b: expected up to 3 steps"),
    (b'{"instances": [{"b": [[1, 2], [3]]}]}', 422, r"ragged"),
    (b'{"instances": [{"a": [1, 2, 3, NaN]}]}', 422, r"NaN is not a feature value"),
    (b'{"instances": [{"a": [1, 2, 3, 1e999]}]}', 422, r"instances\[0\]\.a: a value is not a finite"),
    (b'{"instances": [{"a": [1, 2, 3, "4"]}]}', 422, r"non-numeric"),
    (b'{"instances": [{"a": [1, 2, true, 4]}]}', 422, r"booleans"),
    (b'{"instances": [{"a": [1, 2, 3, 4], "voice": [1]}]}', 422, r"unknown modality 'voice' \(expected a, b\)"),
    (b'{"instances": [{}, {"a": null, "b": []}]}', 422, r"instances\[0\]: no modality given"),
    (b'{"instances": []}', 422, r"non-empty list"),
    (b'{"rows": []}', 422, r'expected a JSON object \{"instances"'),
    (b'{"instances": [{"a": [1, 2, 3, 4]}], "extra": 1}', 422, r"unknown key 'extra'"),
    (b'{"instances": [{"a": [1, 2', 400, r"body: not valid JSON"),
    (b"\xff\xfe", 400, r"body: not valid JSON"),
    (b'{"instances": [{"a": [1, 2, 3, 4]}]}' + b" " * 70_000 + b"x", 400, r"body: not valid JSON \(Extra data"),
    (b"[" * 200_000, 400, r"body: JSON nested too deeply"),
    (json.dumps({"instances": [{"a": [1, 2, 3, 4]}] * 101}).encode(), 413, r"at most 100 per request, got 101"),
]


@has_server
@pytest.mark.parametrize("body, status, reason", BAD, ids=[f"{s}-{i}" for i, (_, s, _) in enumerate(BAD)])
def test_bad_requests_get_a_one_line_4xx_and_the_server_lives(server, models, body, status, reason):
    got, answer = server.request("POST", "/predict", body)
    assert got == status, answer
    assert set(answer) == {"error"} and "\n" not in answer["error"]
    assert re.search(reason, answer["error"]), answer["error"]
    assert server.get("/health")[0] == 200
    good, answer = server.predict(instances(models["data"], [0, 1]))
    assert good == 200 and len(answer["predictions"]) == 2


def send_raw(url: str, head: bytes, chunks) -> tuple[int, dict]:
    """Send ``head`` and then ``chunks`` on a raw connection until the server stops reading, then
    read its answer: a server that refuses a body answers and closes without reading the rest, and
    a client (urllib) that is still writing fails with EPIPE before it reads the answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        try:
            sock.sendall(head)
            for chunk in chunks:
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused: the answer is already in the receive buffer
        reader = sock.makefile("rb")
        status = int(reader.readline().split()[1])
        headers = dict(line.decode().strip().lower().split(": ", 1) for line in iter(reader.readline, b"\r\n"))
        return status, json.loads(reader.read(int(headers["content-length"])))


@has_server
@pytest.mark.parametrize("size", [1_000_001, 100_000_000])
def test_a_body_beyond_the_limit_is_refused_by_its_length_before_it_is_read(server, size):
    head = f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {size}\r\n\r\n"
    chunks = (b" " * min(65536, size - start) for start in range(0, size, 65536))  # exactly `size` bytes
    status, answer = send_raw(server.url, head.encode(), chunks)
    assert status == 413 and answer == {"error": f"body: at most 1000000 bytes, got {size}"}
    assert server.get("/health")[0] == 200


@has_server
def test_a_chunked_body_is_refused_once_it_passes_the_limit(server):
    head = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunks = (b"10000\r\n" + b" " * 65536 + b"\r\n" for _ in range(40))  # 2.6 MB, never finished
    status, answer = send_raw(server.url, head, chunks)
    assert status == 413 and answer == {"error": "body: at most 1000000 bytes, got more"}
    assert server.get("/health")[0] == 200


@has_server
def test_unknown_paths_and_methods_are_one_line_too(server):
    assert server.get("/nothing") == (404, {"error": "Not Found"})
    assert server.request("POST", "/health", b"{}") == (405, {"error": "Method Not Allowed"})


@has_server
def test_schema_and_health_describe_the_model(server, models):
    status, schema = server.get("/schema")
    config = read_config(models["cls"])
    assert status == 200
    assert schema["task"] == "classification" and schema["classes"] == LABELS.tolist()
    assert schema["fusion"] == config["fusion"] == "self"
    assert schema["calibration"] == config["calibration"] and schema["calibration"]["method"] == "temperature"
    assert [(m["name"], m["shape"], m["is_sequence"]) for m in schema["modalities"]] == [
        (m["name"], [m["length"], m["dim"]] if m["is_sequence"] else [m["dim"]], m["is_sequence"])
        for m in config["data"]["modalities"]
    ]
    assert schema["limits"]["max_instances"] == 100 and schema["limits"]["max_body_bytes"] == 1_000_000
    status, health = server.get("/health")
    assert status == 200 and health["status"] == "ok" and health["backend"] in ("eager", "onnxruntime")
    assert schema["backend"] == health["backend"] == server.backend  # the backend asked for runs
    # onnxruntime: the graph was exported and checked against the model before serving (the banner says by how much)
    assert ("checked against the model" in server.banner) == (server.backend == "onnxruntime"), server.banner


@has_server
def test_a_regression_model_answers_values_and_its_interval(models):
    """Values as the model computes them, and the split-conformal interval of ``--interval``."""
    s = Server(models["reg"])
    try:
        status, body = s.predict(instances(models["values"], range(20)))
    finally:
        code, _, err = s.stop()
    assert code == 0, err
    assert status == 200 and set(body) == {"predictions", "lower", "upper"}
    net, config, standardizer = load_model(models["reg"])
    batch = standardizer.transform(load_data(models["values"]).subset(np.arange(20))).to_batch()
    values = predict(net, batch).numpy()[:, 0]
    np.testing.assert_allclose(body["predictions"], values, rtol=1e-5, atol=1e-6)
    half = half_width_of(config)[0]
    np.testing.assert_allclose(body["lower"], values - half, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(body["upper"], values + half, rtol=1e-5, atol=1e-5)


def wait_for(server: Server, key: str, value: int, deadline: float) -> None:
    """Poll /health until its ``key`` is ``value``."""
    while server.get("/health")[1][key] != value:
        assert time.monotonic() < deadline, f"/health never showed {key} = {value}"
        time.sleep(0.02)


def send(server: Server, answers: dict, key: str, rows: list[int], data: Path) -> threading.Thread:
    """POST ``rows`` of ``data`` from a thread of its own; the answer lands in ``answers[key]``."""
    thread = threading.Thread(target=lambda: answers.update({key: server.predict(instances(data, rows))}))
    thread.start()
    return thread


@has_server
def test_requests_waiting_while_the_model_runs_share_the_next_batch(models):
    """The first request in the model (each call takes 1.5 s more, injected), two more waiting: the
    two run as one batch, and each gets its own rows back."""
    s = Server(models["cls"], command=[sys.executable, "-c", SLOW_MODEL, "1.5"])
    answers: dict = {}
    try:
        deadline = time.monotonic() + 30
        first = send(s, answers, "first", [0, 1, 2], models["data"])
        wait_for(s, "running", 3, deadline)  # in the model
        waiting = [send(s, answers, "second", [3], models["data"]), send(s, answers, "third", [4, 5], models["data"])]
        wait_for(s, "waiting", 2, deadline)  # both in the queue
        for thread in [first, *waiting]:
            thread.join(timeout=60)
        health = s.get("/health")[1]
    finally:
        code, _, err = s.stop()
    assert code == 0, err
    assert (health["requests"], health["batches"]) == (3, 2)
    service = ModelService(models["cls"])
    expected = service.run(service.inputs({"instances": instances(models["data"], [3, 4, 5])}, 10)[0])  # (3, C)
    for key, rows in (("second", slice(0, 1)), ("third", slice(1, 3))):
        status, body = answers[key]
        assert status == 200, body
        np.testing.assert_allclose(body["probabilities"], expected[rows], rtol=1e-5, atol=1e-6)


@has_server
def test_sigterm_answers_the_request_in_the_model_and_the_queued_one_then_exits_0(models):
    """With a queue of one request: the first request in the model (each call takes 1.5 s more,
    injected), the second waiting, a third refused at once (503); then SIGTERM: both are answered."""
    s = Server(models["cls"], "--queue", "1", command=[sys.executable, "-c", SLOW_MODEL, "1.5"])
    answers: dict = {}
    deadline = time.monotonic() + 30
    first = send(s, answers, "first", [0, 1, 2], models["data"])
    wait_for(s, "running", 3, deadline)  # in the model
    second = send(s, answers, "second", [3], models["data"])
    wait_for(s, "waiting", 1, deadline)  # in the queue
    status, refused = s.predict(instances(models["data"], [4]))
    assert status == 503 and refused == {"error": "server busy: the queue is full (1 waiting); retry later"}
    code, out, err = s.stop()
    first.join(timeout=60), second.join(timeout=60)
    assert code == 0, err
    assert answers["first"][0] == 200 and len(answers["first"][1]["predictions"]) == 3
    assert answers["second"][0] == 200 and len(answers["second"][1]["predictions"]) == 1
    assert "stopped (SIGTERM): 2 requests answered in 2 batches, 1 refused" in out
    assert "Traceback" not in err, err


def test_parse_pads_sequences_and_masks_absent_modalities(models):
    service = ModelService(models["cls"])
    inputs, n = service.parse(
        json.dumps({"instances": [{"a": [1, 2, 3, 4], "b": [[1, 2]]}, {"a": None, "b": [[1, 2], [3, 4], [5, 6]]}]}),
        max_instances=10,
    )
    x_a, mask_a, x_b, mask_b = inputs
    assert n == 2 and x_a.shape == (2, 1, 4) and x_b.shape == (2, 3, 2)
    assert mask_a.tolist() == [[True], [False]] and not x_a[1].any()  # absent: all False, zeros
    assert mask_b.tolist() == [[True, False, False], [True, True, True]]  # padded at the end, masked
    np.testing.assert_array_equal(x_b[0], [[1, 2], [0, 0], [0, 0]])
    with pytest.raises(RequestError, match="at most 1 per request"):
        service.parse(b'{"instances": [{"a": [1, 2, 3, 4]}, {"a": [1, 2, 3, 4]}]}', max_instances=1)


def test_without_fastapi_serve_says_how_to_install_it(models, monkeypatch):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi -> ImportError
    assert_one_line(cli("serve", "--model", models["cls"]), 2, r"pip install 'attnfuse\[serve\]'")


@pytest.mark.parametrize(
    "args, reason",
    [
        (["--port", "70000"], r"port: expected an integer <= 65,535"),
        (["--backend", "tensorrt"], r"backend: expected one of eager, onnxruntime"),
        (["--batch-wait-ms", "-1"], r"batch_wait_ms: expected a number in \[0, 10000\]"),
        (["--max-body-mb", "0"], r"max_body_mb: expected a number"),
    ],
)
def test_bad_options_are_one_line_and_exit_2(models, args, reason):
    assert_one_line(cli("serve", "--model", models["cls"], *args), 2, reason)


def test_a_missing_model_directory_is_one_line_and_exit_2(tmp_path):
    if MISSING:
        pytest.skip("needs FastAPI and uvicorn")
    assert_one_line(cli("serve", "--model", tmp_path / "nothing"), 2, "nothing")


@has_server
def test_a_port_in_use_is_one_line_and_exit_2(models):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert_one_line(cli("serve", "--model", models["cls"], "--port", port), 2, f"127.0.0.1:{port}")
