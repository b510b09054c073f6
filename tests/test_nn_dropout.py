"""attnfuse.nn.dropout: still dropout (rate, scaling, expectation, independence), eval is the
identity, reproducible for a seed, gradients against a plain reference that uses the same mask,
and used by every layer of the package (attention probabilities included)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attnfuse.nn import CrossAttention, Dropout, FeedForward, PositionalEncoding, TransformerEncoderLayer
from attnfuse.nn import functional as AF
from attnfuse.nn.dropout import dropout, dropout_mask, packed_rate
from helpers import Spy

RATES = [0.1, 0.25, 0.5, 0.9]


def binomial_bound(n: int, p: float, sigmas: float = 6.0) -> float:
    """Half-width of a (very safe) interval for the observed fraction of n Bernoulli(p) draws."""
    return sigmas * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("p", RATES)
def test_rate_and_scaling(p):
    torch.manual_seed(0)
    n = 400_000
    out = dropout(torch.ones(n), p)
    rate = packed_rate(p)
    assert abs(rate - p) <= 2**-17
    kept = out != 0
    assert abs(kept.float().mean().item() - (1 - rate)) < binomial_bound(n, rate)
    # Every kept element is scaled by exactly 1/(1 - rate): E[out] = x.
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / (1 - rate)))
    assert abs(out.mean().item() - 1.0) < binomial_bound(n, rate) / (1 - rate)


def test_expectation_is_the_input_elementwise():
    torch.manual_seed(1)
    x = torch.randn(8)
    reps = 50_000
    out = dropout(x.expand(reps, 8).contiguous(), 0.3)
    rate = packed_rate(0.3)
    bound = 6 * x.abs() * math.sqrt(rate / (1 - rate) / reps)  # std of the mean of x·keep/(1-rate)
    assert ((out.mean(0) - x).abs() <= bound).all()


def test_elements_are_independent_within_and_across_words():
    # Four elements share one 64-bit draw: neighbours must still be independent.
    torch.manual_seed(2)
    n, p = 400_000, 0.5
    drop = dropout(torch.ones(n), p) == 0
    for lag in (1, 2, 3, 4, 5):
        both = (drop[:-lag] & drop[lag:]).float().mean().item()
        assert abs(both - p * p) < binomial_bound(n, p * p), lag


def test_eval_and_p0_are_the_identity():
    x = torch.randn(4, 5)
    assert dropout(x, 0.5, training=False) is x
    assert dropout(x, 0.0) is x
    m = Dropout(0.5).eval()
    assert m(x) is x


def test_reproducible_for_a_seed_and_with_a_generator():
    x = torch.randn(1000)
    torch.manual_seed(7)
    a = dropout(x, 0.2)
    torch.manual_seed(7)
    b = dropout(x, 0.2)
    torch.manual_seed(8)
    c = dropout(x, 0.2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(dropout(x, 0.2, generator=g1), dropout(x, 0.2, generator=g2))
    # A generator leaves the global one alone.
    torch.manual_seed(7)
    dropout(x, 0.2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(dropout(x, 0.2), a)


# (rate, shape): packed masks from 4096 elements on; 0.001 and small tensors: torch's Bernoulli mask.
@pytest.mark.parametrize("p,shape", [(0.1, (64, 64)), (0.5, (64, 65)), (0.001, (64, 64)), (0.1, (3, 7))])
def test_gradients_against_a_plain_reference_with_the_same_mask(p, shape):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)

    def ours(t):
        return dropout(t, p, generator=torch.Generator().manual_seed(11))

    mask = dropout_mask(x.shape, p, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(ours(x), x * mask)
    assert torch.autograd.gradcheck(ours, (x,), fast_mode=True)
    g = torch.randn(shape, dtype=torch.float64)
    (grad,) = torch.autograd.grad(ours(x), x, g)
    torch.testing.assert_close(grad, g * mask)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_dtypes(dtype):
    out = dropout(torch.ones(10_000, dtype=dtype), 0.25)
    assert out.dtype == dtype
    values = set(out.unique().tolist())
    assert values == {0.0, torch.tensor(1 / (1 - packed_rate(0.25)), dtype=dtype).item()}


def test_edges_rates_and_inplace():
    x = torch.randn(100, requires_grad=True)
    zeros = dropout(x, 1.0)
    assert torch.equal(zeros, torch.zeros(100)) and zeros.requires_grad
    assert (dropout(torch.ones(100), 1.0, generator=torch.Generator()) == 0).all()
    for p in (-0.1, 1.5):
        with pytest.raises(ValueError, match="p"):
            dropout(x, p)
    y = torch.ones(1000)
    out = dropout(y, 0.5, inplace=True)
    assert out is y and (y == 0).any()


def test_module_is_a_torch_dropout():
    m = Dropout(0.3)
    assert isinstance(m, nn.Dropout) and m.p == 0.3
    assert repr(m) == repr(nn.Dropout(0.3))
    with pytest.raises(ValueError):
        Dropout(1.5)


def test_every_layer_drops_out_with_it():
    layers = [
        TransformerEncoderLayer(8, 2, 16, dropout=0.1),
        CrossAttention(8, 6, 2, 16, dropout=0.1),
        FeedForward(8, 16, dropout=0.1),
        PositionalEncoding(8, dropout=0.1),
    ]
    for layer in layers:
        drops = [m for m in layer.modules() if isinstance(m, nn.Dropout)]
        assert drops and all(type(m) is Dropout for m in drops), type(layer).__name__


def test_attention_dropout_on_cpu_takes_the_explicit_path_with_the_cheap_mask(monkeypatch):
    """Dropout on the CPU: no SDPA (it would fall back to its math path with F.dropout) and no
    F.dropout for tensors of 4096 elements or more; without dropout the fused kernel runs."""
    sdpa, f_dropout = Spy(F.scaled_dot_product_attention), Spy(F.dropout)
    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
    monkeypatch.setattr(F, "dropout", f_dropout)
    q = torch.randn(4, 4, 32, 8, requires_grad=True)  # probabilities: 4·4·32·32 = 16384 elements
    out, w = AF.scaled_dot_product_attention(q, q, q, dropout_p=0.2)
    out.sum().backward()
    assert w is None and sdpa.calls == 0 and f_dropout.calls == 0
    layer = TransformerEncoderLayer(16, 2, 64, dropout=0.1, batch_first=True)
    x = torch.randn(8, 32, 16)  # residuals 4096 elements, feed-forward 16384, probabilities 16384
    layer(x).sum().backward()
    assert sdpa.calls == 0 and f_dropout.calls == 0
    AF.scaled_dot_product_attention(q, q, q)
    layer.eval()(x)
    assert sdpa.calls == 2 and f_dropout.calls == 0


def test_small_tensors_use_torchs_mask(monkeypatch):
    """Below 4096 elements torch's one-op Bernoulli mask is cheaper than the packed one."""
    f_dropout = Spy(F.dropout)
    monkeypatch.setattr(F, "dropout", f_dropout)
    dropout(torch.randn(4095), 0.1)
    assert f_dropout.calls == 1
    dropout(torch.randn(4096), 0.1)
    assert f_dropout.calls == 1


def test_attention_dropout_drops_probabilities_at_the_rate():
    # Uniform attention over S keys with V = one-hot(key): each output coordinate is one weight.
    torch.manual_seed(5)
    n, S = 20_000, 8
    q = torch.zeros(n, 1, 4)
    k = torch.zeros(n, S, 4)
    v = torch.eye(S).expand(n, S, S)
    out, _ = AF.scaled_dot_product_attention(q, k, v, dropout_p=0.25)
    rate = packed_rate(0.25)
    dropped = (out == 0).float().mean().item()
    assert abs(dropped - rate) < binomial_bound(n * S, rate)
    torch.testing.assert_close(out[out != 0], torch.full_like(out[out != 0], 1 / S / (1 - rate)))


def test_a_recorded_graph_gets_torchs_dropout_not_the_packed_draw(monkeypatch):
    # torch.compile cannot record the packed mask's full-range random_ (a graph break per dropout).
    from attnfuse.nn import dropout as D

    x = torch.ones(64, 128)
    monkeypatch.setattr(D, "tracing", lambda: True)
    monkeypatch.setattr(torch.Tensor, "random_", lambda *a, **k: pytest.fail("the packed draw ran"))
    y = D.dropout(x, 0.25)
    kept = y[y != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / 0.75))
    assert 0.2 < (y == 0).float().mean().item() < 0.3
