"""The fusion models' training paths compute the same function.

Oracle: the same model asked for its attention maps, which runs attention as plain autograd ops
(scores, softmax, dropout, matmul); without maps, CPU attention with dropout runs the kernel
attnfuse.nn.kernels chose (each is forced here in turn: attnfuse.nn.explicit's hand-written
backward, or plain ops without the maps), and the key padding is prepared once per forward. All
draw the same dropout masks from the same seed, so outputs and gradients must agree."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnfuse.data import MultimodalDataset
from attnfuse.fusion import build_model
from attnfuse.modules import MLPHead, ModalityEmbedding
from attnfuse.nn import Dropout, KeyPaddingMask, kernels
from attnfuse.nn import functional as AF
from attnfuse.training import model_config

# Sequences of 16 steps, batch 16, 2 heads: every attention-probability tensor has >= 4096
# elements, so both paths draw it with the packed mask (the same random numbers for a seed).
N, T = 16, 16


def sequences(seed: int = 0) -> MultimodalDataset:
    rng = np.random.default_rng(seed)
    feats = {name: rng.normal(size=(N, T, dim)).astype(np.float32) for name, dim in (("a", 5), ("b", 3), ("c", 4))}
    return MultimodalDataset(feats, rng.normal(size=(N, 1)).astype(np.float32))


def padded_batch(data: MultimodalDataset):
    batch = data.to_batch()
    batch.mask["b"][1, 5:] = False  # padding
    batch.mask["c"][2] = False  # an absent modality
    batch.mask["a"][3, :12] = False
    return batch


def model(fusion: str, data: MultimodalDataset):
    over = {"d_model": 16, "nhead": 2, "num_layers": 2, "dropout": 0.2}
    if fusion == "mult":
        over["self_layers"] = 2
    torch.manual_seed(0)
    return build_model(fusion, model_config(fusion, data, **over)).train()


def step(net, batch, maps: bool, seed: int):
    net.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = net(batch, return_attention=True)[0] if maps else net(batch)
    out.square().sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kernel", kernels.KERNELS)
@pytest.mark.parametrize("padded", [False, True], ids=["all-valid", "padded"])
@pytest.mark.parametrize("fusion", ["self", "cross", "bicross", "mult"])
def test_each_attention_kernel_matches_the_path_with_maps(fusion, padded, kernel, monkeypatch):
    data = sequences()
    batch = padded_batch(data) if padded else data.to_batch()
    net = model(fusion, data)
    calls = []
    real = AF.explicit_attention
    monkeypatch.setattr(AF, "explicit_attention", lambda *a: calls.append(1) or real(*a))
    with kernels.forced(kernel):
        fast, fast_grads = step(net, batch, maps=False, seed=3)
    assert bool(calls) == (kernel == "explicit"), "the training path did not take the forced kernel"
    calls.clear()
    plain, plain_grads = step(net, batch, maps=True, seed=3)
    assert not calls
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    assert fast_grads.keys() == plain_grads.keys()
    for name in fast_grads:
        assert torch.isfinite(fast_grads[name]).all(), name
        torch.testing.assert_close(fast_grads[name], plain_grads[name], rtol=1e-4, atol=1e-5, msg=name)
    with kernels.forced(kernel):
        other, _ = step(net, batch, maps=False, seed=4)
    assert not torch.allclose(other, fast)  # dropout is on: another seed, another output


@pytest.mark.parametrize(("fusion", "expected"), [("mult", 3), ("cross", 1), ("bicross", 2), ("self", 1)])
def test_key_padding_is_prepared_once_per_forward(fusion, expected, monkeypatch):
    data = sequences()
    net = model(fusion, data)
    built = []
    init = KeyPaddingMask.__init__

    def counting(self, *args, **kwargs):
        built.append(1)
        init(self, *args, **kwargs)

    monkeypatch.setattr(KeyPaddingMask, "__init__", counting)
    for batch in (data.to_batch(), padded_batch(data)):
        built.clear()
        net(batch)
        assert len(built) == expected  # one per key set, not one per layer


def test_clean_padding_with_a_prepared_mask_and_nothing_padded_is_the_input():
    x = torch.randn(2, 4, 3)
    x[0, 1, 1] = float("nan")  # a non-finite value in a valid row is data: left alone
    assert AF.clean_padding(x, KeyPaddingMask(torch.zeros(2, 4, dtype=torch.bool)), True) is x
    padded = torch.zeros(2, 4, dtype=torch.bool)
    padded[0, 1] = True
    cleaned = AF.clean_padding(x, KeyPaddingMask(padded), True)
    assert torch.isfinite(cleaned).all() and torch.equal(cleaned[1], x[1])


def test_embedding_and_head_use_attnfuse_dropout():
    data = sequences()
    net = model("cross", data)
    assert isinstance(net.embed, ModalityEmbedding) and isinstance(net.embed.dropout, Dropout)
    assert isinstance(net.head, MLPHead) and any(isinstance(m, Dropout) for m in net.head.net)
    assert net.embed.dropout.p == 0.2


def test_training_forward_records_as_one_graph():
    # torch.compile (--compile) breaks a graph at every op it cannot record (a dropout's packed draw,
    # a branch on a tensor's value); each break costs a compiled step several eager ones. One fusion
    # model here (recording the others takes minutes): the layers are shared.
    import torch._dynamo

    data = sequences()
    net = model("cross", data)
    explained = torch._dynamo.explain(net)(padded_batch(data))
    assert explained.graph_break_count == 0, [str(r.reason)[:200] for r in explained.break_reasons]
    assert explained.graph_count == 1
