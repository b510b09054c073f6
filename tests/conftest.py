"""Shared test set-up."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The tests use tiny tensors: one intra-op thread is fastest for them, and immune to the
    thread contention of a busy shared machine (where two spinning threads can slow small ops by
    orders of magnitude)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
