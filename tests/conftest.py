"""Shared test set-up."""

import os
import shutil
import subprocess

import pytest
import torch

# One thread everywhere, also in the processes the tests start: results are bitwise comparable
# only at one thread count, and the default (the cores other processes leave free) depends on the
# machine's load at the moment a command starts.
os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The tests use tiny tensors: one intra-op thread is fastest for them, and immune to the
    thread contention of a busy shared machine (where two spinning threads can slow small ops by
    orders of magnitude)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_filesystem(tmp_path):
    """An 8 KiB tmpfs mounted at ``tmp_path / "small"`` (a real full disk; needs root and
    mount(8), skipped elsewhere), unmounted afterwards."""
    mount = tmp_path / "small"
    mount.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)
