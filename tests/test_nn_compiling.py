"""attnfuse.nn.compiling.compile_model: --compile on the CPU warns with the measured cost and still
compiles as asked (torch.compile itself is replaced by a spy: inductor takes minutes here)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from attnfuse.nn.compiling import CPU_VERDICT, compile_model


def test_on_the_cpu_it_warns_with_the_measured_numbers_and_compiles(monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module, **kw: compiled.append(module) or module)
    model = nn.Linear(2, 2)
    with pytest.warns(RuntimeWarning, match=r"--compile: .*0\.35x eager once compiled"):
        assert compile_model(model, torch.device("cpu")) is model
    assert compiled == [model]
    assert "AMD EPYC" in CPU_VERDICT and "Intel Xeon" in CPU_VERDICT and "1.43x" in CPU_VERDICT


def test_off_the_cpu_it_compiles_without_a_word(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda module, **kw: module)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compile_model(nn.Linear(2, 2), torch.device("meta"))
