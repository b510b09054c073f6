"""Helpers shared by the attention-core tests."""

import torch
from torch import nn


def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial values everywhere (torch initialises biases to 0, which would hide bias bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.rand(p.shape, generator=g) - 0.5)
    return module


class Spy:
    """Wraps a function to count its calls and keep the ``attn_mask`` keyword of each one."""

    def __init__(self, fn):
        self.fn, self.calls, self.masks = fn, 0, []

    def __call__(self, *args, **kwargs):
        self.calls += 1
        self.masks.append(kwargs.get("attn_mask"))
        return self.fn(*args, **kwargs)
