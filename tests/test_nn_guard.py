"""Non-finite inputs: a NaN or inf in a key or value that a mask hides reaches no output and no
gradient (torch: 0 · NaN turns every output NaN); the rows that do depend on it are NaN.

The oracle: the same call with the non-finite entries replaced by finite numbers. Every output row
that does not depend on them must be identical to it, on both attention paths, with and without
autograd, and every gradient must be finite (and equal to the oracle's where the loss ignores the
poisoned rows). The guard that GPUs always run is checked on the CPU by forcing it."""

from __future__ import annotations

import pytest
import torch

import attnfuse.nn.attention as attention_module
import attnfuse.nn.functional as AF
from attnfuse.nn import (
    BidirectionalCrossAttention,
    CrossAttention,
    KeyPaddingMask,
    MultiheadAttention,
    TransformerEncoder,
)
from helpers import randomize_

N, L, S, E, H = 2, 4, 5, 8, 2
BOTH_PATHS = pytest.mark.parametrize("need_weights", [False, True], ids=["fused", "explicit"])
BAD = [float("nan"), float("inf"), float("-inf")]


def qkv(seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(N, H, n, E, generator=g, requires_grad=requires_grad) for n in (L, S, S)]


def spoil(t: torch.Tensor, index, value: float) -> torch.Tensor:
    t = t.detach().clone()
    t[index] = value
    return t.requires_grad_()


@pytest.fixture(params=["sum-check", "forced"])
def guard_mode(request, monkeypatch):
    """'forced': the guard runs on every call, as on a GPU (no host sync to decide)."""
    if request.param == "forced":
        monkeypatch.setattr(AF, "needs_guard", lambda *inputs: True)
        monkeypatch.setattr(attention_module, "needs_guard", lambda *inputs: True)
    return request.param


# --------------------------------------------------------------------------- functional


@BOTH_PATHS
@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("which", ["key", "value", "both"])
@pytest.mark.parametrize("grad", [True, False])
def test_padded_key_or_value_does_not_leak(guard_mode, need_weights, bad, which, grad):
    q, k, v = qkv(requires_grad=grad)
    kpm = torch.zeros(N, S, dtype=torch.bool)
    kpm[0, 3] = True  # key 3 of sample 0 is padding
    k2 = spoil(k, (0, slice(None), 3, 1), bad) if which in ("key", "both") else k
    v2 = spoil(v, (0, slice(None), 3, 2), bad) if which in ("value", "both") else v
    with torch.set_grad_enabled(grad):
        out, w = AF.scaled_dot_product_attention(q, k2, v2, key_padding_mask=kpm, need_weights=need_weights)
        ref, w_ref = AF.scaled_dot_product_attention(q, k, v, key_padding_mask=kpm, need_weights=need_weights)
    torch.testing.assert_close(out, ref)
    if need_weights:
        torch.testing.assert_close(w, w_ref)
    if grad:
        g = torch.autograd.grad(out.sum(), (q, k2, v2))
        g_ref = torch.autograd.grad(ref.sum(), (q, k, v))
        for a, b in zip(g, g_ref):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b)


@BOTH_PATHS
@pytest.mark.parametrize("bad", BAD)
def test_rows_that_see_a_non_finite_value_are_nan_and_only_they(guard_mode, need_weights, bad):
    # Causal: the last key is hidden from every query but the last one.
    q, k, v = qkv()
    v2 = spoil(v, (..., S - 1, 0), bad)
    q, k, v2 = q[..., :S, :], k, v2
    q = torch.randn(N, H, S, E, requires_grad=True)
    out, w = AF.scaled_dot_product_attention(q, k, v2, is_causal=True, need_weights=need_weights)
    ref, _ = AF.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.isnan(out[..., S - 1, :]).all()
    torch.testing.assert_close(out[..., : S - 1, :], ref[..., : S - 1, :])
    if need_weights:
        assert torch.isfinite(w).all()  # a value does not change the weights
    loss = out[..., : S - 1, :].sum()
    for g in torch.autograd.grad(loss, (q, k, v2)):
        assert torch.isfinite(g).all()


@BOTH_PATHS
def test_non_finite_key_poisons_the_weights_of_the_queries_that_see_it(guard_mode, need_weights):
    q, k, v = qkv()
    mask = torch.zeros(L, S, dtype=torch.bool)
    mask[:2, 4] = True  # queries 0 and 1 do not see key 4
    k2 = spoil(k, (..., 4, 0), float("nan"))
    out, w = AF.scaled_dot_product_attention(q, k2, v, attn_mask=mask, need_weights=need_weights)
    ref, w_ref = AF.scaled_dot_product_attention(q, k, v, attn_mask=mask, need_weights=need_weights)
    torch.testing.assert_close(out[..., :2, :], ref[..., :2, :])
    assert torch.isnan(out[..., 2:, :]).all()
    if need_weights:
        torch.testing.assert_close(w[..., :2, :], w_ref[..., :2, :])
        assert torch.isnan(w[..., 2:, :]).all()


@BOTH_PATHS
def test_non_finite_query_row_poisons_only_itself_and_dead_rows_stay_zero(guard_mode, need_weights):
    q, k, v = qkv()
    q2 = spoil(q, (0, 0, 1, 3), float("nan"))
    q2 = spoil(q2, (1, 0, 2, 0), float("inf"))
    kpm = torch.zeros(N, S, dtype=torch.bool)
    kpm[1] = True  # sample 1 sees no key: its rows are dead, output 0 whatever its query
    out, _ = AF.scaled_dot_product_attention(q2, k, v, key_padding_mask=kpm, need_weights=need_weights)
    ref, _ = AF.scaled_dot_product_attention(q, k, v, key_padding_mask=kpm, need_weights=need_weights)
    nan_rows = torch.isnan(out).any(-1)
    expected = torch.zeros(N, H, L, dtype=torch.bool)
    expected[0, 0, 1] = True
    assert torch.equal(nan_rows, expected)
    torch.testing.assert_close(out[~expected], ref[~expected])
    assert (out[1] == 0).all()


# --------------------------------------------------------------------------- layers


def layer_case(kind: str, norm_first: bool):
    torch.manual_seed(0)
    kw = dict(dropout=0.0, batch_first=True, norm_first=norm_first)
    if kind == "mha":
        return randomize_(MultiheadAttention(E, H, batch_first=True, kdim=6, vdim=6))
    if kind == "encoder":
        return randomize_(TransformerEncoder(E, H, 2, 16, **kw))
    if kind == "cross":
        return randomize_(CrossAttention(E, 6, H, 16, **kw))
    return randomize_(BidirectionalCrossAttention(E, 6, H, 16, **kw))


def run(module, kind, x, ctx, kpm_x, kpm_ctx):
    if kind == "mha":
        return [module(x, ctx, ctx, key_padding_mask=kpm_ctx, need_weights=False)[0]]
    if kind == "encoder":
        return [module(x, src_key_padding_mask=kpm_x)]
    if kind == "cross":
        return [module(x, ctx, kpm_ctx)]
    return list(module(x, ctx, kpm_x, kpm_ctx))


@pytest.mark.parametrize("kind", ["mha", "encoder", "cross", "bicross"])
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("prepared", [False, True])
def test_layers_hidden_nan_reaches_no_output_and_no_gradient(guard_mode, kind, norm_first, prepared):
    """NaN at the padded positions of every input the layer knows the padding of (the context; for
    the encoder and the bidirectional block also the queries): the valid positions' outputs equal
    those of the same input with zeros there, and the parameters' gradients of a loss over valid
    positions are finite and equal."""
    module = layer_case(kind, norm_first)
    g = torch.Generator().manual_seed(4)
    x, ctx = torch.randn(N, L, E, generator=g), torch.randn(N, S, 6, generator=g)
    kpm_x = torch.zeros(N, L, dtype=torch.bool)
    kpm_x[0, 3] = True
    kpm_ctx = torch.zeros(N, S, dtype=torch.bool)
    kpm_ctx[1, 2:] = True
    valid = [~kpm_x, ~kpm_ctx] if kind == "bicross" else [~kpm_x]
    masks = (KeyPaddingMask(kpm_x), KeyPaddingMask(kpm_ctx)) if prepared else (kpm_x, kpm_ctx)

    results = []
    for fill in (0.0, float("nan")):
        xf = x.masked_fill(kpm_x.unsqueeze(-1), fill if kind in ("encoder", "bicross") else 0.0)
        cf = ctx.masked_fill(kpm_ctx.unsqueeze(-1), fill)
        module.zero_grad()
        outs = run(module, kind, xf, cf, *masks)
        sum(o[m].sum() for o, m in zip(outs, valid)).backward()
        results.append(([o[m] for o, m in zip(outs, valid)], {n: p.grad.clone() for n, p in module.named_parameters()}))
    (outs_zero, grads_zero), (outs_nan, grads_nan) = results
    for a, b in zip(outs_nan, outs_zero):
        torch.testing.assert_close(a, b)
    for name in grads_zero:
        assert torch.isfinite(grads_nan[name]).all(), name
        torch.testing.assert_close(grads_nan[name], grads_zero[name], msg=name)


def test_training_mode_with_dropout_stays_finite(guard_mode):
    torch.manual_seed(1)
    enc = TransformerEncoder(E, H, 2, 16, dropout=0.3, batch_first=True).train()
    x = torch.randn(N, L, E)
    kpm = torch.zeros(N, L, dtype=torch.bool)
    kpm[:, 3] = True
    x[:, 3] = float("nan")
    out = enc(x, src_key_padding_mask=kpm)
    assert torch.isfinite(out[:, :3]).all()
    out[:, :3].sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in enc.parameters())


def test_forced_guard_changes_nothing_for_finite_inputs(monkeypatch):
    """The always-on guard (GPU) is exact for finite inputs: outputs, weights and gradients."""
    mha = randomize_(MultiheadAttention(E, H, add_bias_kv=True, batch_first=False))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(L, N, E, generator=g, requires_grad=True)
    kpm = torch.zeros(N, L, dtype=torch.bool)
    kpm[1, 2:] = True
    mask = torch.rand(L, L, generator=g) < 0.3
    results = []
    for forced in (False, True):
        if forced:
            monkeypatch.setattr(attention_module, "needs_guard", lambda *inputs: True)
        out, w = mha(x, x, x, key_padding_mask=kpm, attn_mask=mask, is_causal=True, average_attn_weights=False)
        results.append((out, w, torch.autograd.grad(out.sum(), x)[0]))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a)


def test_the_cpu_check_is_one_cheap_sum_and_misses_nothing():
    x = torch.randn(3, 4)
    assert not AF.needs_guard(x, x, x)
    for bad in BAD:
        y = x.clone()
        y[1, 2] = bad
        assert AF.needs_guard(x, y)
    big = torch.full((4,), 60000.0, dtype=torch.float16)  # the sum overflows fp16: summed in fp32
    assert not AF.needs_guard(big)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("need_weights", [False, True])
def test_self_attention_padded_nan_rows_are_nan_and_nothing_else(guard_mode, batch_first, need_weights):
    """MultiheadAttention alone does not know which queries are padding: a NaN query row is a NaN
    output row; every other row is exact and the parameters' gradients are finite."""
    mha = randomize_(MultiheadAttention(E, H, batch_first=batch_first))
    g = torch.Generator().manual_seed(6)
    x = torch.randn(N, L, E, generator=g)
    kpm = torch.zeros(N, L, dtype=torch.bool)
    kpm[0, 2:] = True
    outs, grads = [], []
    for fill in (0.0, float("nan")):
        xf = x.masked_fill(kpm.unsqueeze(-1), fill)
        xf = xf if batch_first else xf.transpose(0, 1)
        mha.zero_grad()
        out, _ = mha(xf, xf, xf, key_padding_mask=kpm, need_weights=need_weights)
        out = out if batch_first else out.transpose(0, 1)
        out[~kpm].sum().backward()
        outs.append(out)
        grads.append([p.grad.clone() for p in mha.parameters()])
    assert torch.isnan(outs[1][kpm]).all()
    torch.testing.assert_close(outs[1][~kpm], outs[0][~kpm])
    for a, b in zip(grads[1], grads[0]):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)
