"""Signals and a closed stdout, sent to real ``attnfuse`` processes.

Ctrl-C (SIGINT) or SIGTERM at any moment of a run ends it with one line on stderr and exit code
130 or 143, through the console script and ``python -m attnfuse`` alike: while torch is imported
(where a KeyboardInterrupt inside a pybind11 callback would be std::terminate), while a command
runs, and while the process ends (where Python's own exit would have put back the default
dispositions: death without a word). A reader that closes stdout early ends the program quietly
with exit code 141.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clikit import cli

# What the generated console script (.venv/bin/attnfuse) runs, with this tree's attnfuse_cli.
CONSOLE_SCRIPT = "import sys; sys.argv[0] = 'attnfuse'; import attnfuse_cli; sys.exit(attnfuse_cli.main())"
ENTRY_POINTS = {
    "console script": [sys.executable, "-c", CONSOLE_SCRIPT],
    "python -m attnfuse": [sys.executable, "-m", "attnfuse"],
}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
EXPECTED = {
    signal.SIGINT: (130, r"error: interrupted \(Ctrl-C\)|stopped by SIGINT at epoch \d+, step \d+; .*"),
    signal.SIGTERM: (143, r"error: terminated \(SIGTERM\)|stopped by SIGTERM at epoch \d+, step \d+; .*"),
}
# The sweep: moments from 0.05 s to 2 s after the start (importing torch takes ~1-5 s: most land
# in it; on a fast machine the last ones land in the command), each signal at every moment.
MOMENTS = [0.05 + k * (2.0 - 0.05) / 19 for k in range(20)]


def start(entry: str, *args: str | Path, **kwargs) -> subprocess.Popen:
    kwargs = {"stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE, "text": True, "env": ENV, **kwargs}
    return subprocess.Popen([*ENTRY_POINTS[entry], *map(str, args)], **kwargs)


def started(pid: int) -> bool:
    """Whether the process is past Python's own start-up (tens of milliseconds, more on a busy
    machine), where no program can handle a signal yet: it has a handler for SIGTERM (the guard,
    attnfuse's first line of code) or, in a program without one, has begun loading torch's
    libraries. True where there is no /proc, or when the process is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        caught = re.search(r"^SigCgt:\s*([0-9a-fA-F]+)", status, re.MULTILINE)
        if caught is None or int(caught.group(1), 16) >> (signal.SIGTERM - 1) & 1:
            return True
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return True


def send_at(proc: subprocess.Popen, t0: float, moment: float, signum: int) -> None:
    """``signum`` to ``proc`` ``moment`` seconds after ``t0``, or as soon after as Python's own
    start-up is over (see :func:`started`)."""
    time.sleep(max(0.0, t0 + moment - time.monotonic()))
    give_up = time.monotonic() + 60
    while not started(proc.pid) and time.monotonic() < give_up:
        time.sleep(0.002)
    proc.send_signal(signum)


def check(proc: subprocess.Popen, signum: int, what: str) -> str | None:
    """None if ``proc`` ended as ``signum`` should end it (its exit code, one line on stderr, no
    traceback); else what went wrong."""
    try:
        _, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        return f"{what}: still running 120 s after the signal"
    code, line = EXPECTED[signum]
    err = stderr.strip()
    if proc.returncode == code and "\n" not in err and "Traceback" not in err and re.fullmatch(line, err):
        return None
    return f"{what}: exit {proc.returncode}, stderr {stderr[-600:]!r}"


def test_ctrl_c_and_sigterm_at_any_moment_of_start_up_are_one_line(tmp_path):
    """SIGINT and SIGTERM at 20 moments each over the first 2 s of `attnfuse train` (mfeat, 1000
    epochs: it never ends by itself that soon), through both entry points: every run ends with
    130 or 143 and one line. Two runs at a time (one per signal, the entry points alternating),
    so both entry points meet both signals and every moment."""
    failures = []
    for k, moment in enumerate(MOMENTS):
        entries = list(ENTRY_POINTS)[:: 1 if k % 2 == 0 else -1]
        runs = []
        for signum, entry in zip((signal.SIGINT, signal.SIGTERM), entries):
            out = tmp_path / f"run{k}-{signum}"
            runs.append((start(entry, "train", "--data", "mfeat", "--epochs", "1000", "--out", out), signum, entry))
            runs[-1] += (time.monotonic(),)
        for proc, signum, _, begun in runs:
            send_at(proc, begun, moment, signum)
        for proc, signum, entry, _ in runs:
            failure = check(proc, signum, f"{signal.Signals(signum).name} at {moment:.2f} s to the {entry}")
            if failure:
                failures.append(failure)
    assert not failures, "\n".join(failures)


# Sends the process a signal from an atexit handler: while the program ends, after its command.
SIGNAL_AT_EXIT = """
import atexit, os, signal, sys, time
signum = int(sys.argv.pop(1))
def signal_now():
    os.kill(os.getpid(), signum)
    time.sleep(30)  # ended by the signal: never reached
atexit.register(signal_now)
sys.argv[0] = "attnfuse"
import attnfuse_cli
attnfuse_cli.main()
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_the_program_ends_is_one_line(signum):
    """After `attnfuse datasets` has printed its table, while the process ends: still one line
    and 130/143 (Python's own exit would restore the default dispositions before tearing down
    torch's modules: a signal there killed the process without a word, -2 or -15)."""
    code, line = EXPECTED[signum]
    run = subprocess.run(
        [sys.executable, "-c", SIGNAL_AT_EXIT, str(int(signum)), "datasets"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    assert "mfeat" in run.stdout, run.stderr  # the command had run, and printed its table
    assert run.returncode == code, run.stderr
    assert re.fullmatch(line, run.stderr.strip()), run.stderr


def test_a_closed_stdout_ends_quietly_with_141():
    """The reader of stdout is gone before anything is written (`attnfuse datasets | head -0`), for
    a command, --version and --help: exit code 141 (128 + SIGPIPE, what the shell reports for cat
    or git there), nothing on stderr (no traceback, no "Exception ignored ... BrokenPipeError" at
    exit). The three run side by side."""
    procs = {}
    for args in (["datasets"], ["--version"], ["--help"]):
        read, write = os.pipe()
        os.close(read)
        try:
            procs[args[0]] = start("python -m attnfuse", *args, stdout=write)
        finally:
            os.close(write)
    for what, proc in procs.items():
        _, stderr = proc.communicate(timeout=120)
        assert (proc.returncode, stderr) == (141, ""), what


def test_a_command_whose_stdout_closes_ends_quietly_with_141(monkeypatch):
    """A BrokenPipeError from a command's printing (in-process) is the same quiet exit 141, not the
    "error: broken pipe" of an input/output error."""
    from attnfuse.cli import data

    def closed(*args, **kwargs):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(data.console, "print", closed)
    result = cli("datasets")
    assert result.exit_code == 141, result.stderr
    assert result.stderr == ""
