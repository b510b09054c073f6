"""CrossAttention / BidirectionalCrossAttention: shapes, equivalence to a hand composition of
MultiheadAttention(kdim=vdim=context_dim) + Add & Norm + feed-forward, and absent contexts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attnfuse import BidirectionalCrossAttention, CrossAttention, MultiheadAttention
from helpers import randomize_

QD, CD, NH, FF, N, L, S = 8, 6, 2, 16, 3, 4, 5


def close(a, b, atol=1e-5, rtol=1e-5):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


def inputs(batch_first: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((N, L, QD) if batch_first else (L, N, QD), generator=g).requires_grad_()
    ctx = torch.randn((N, S, CD) if batch_first else (S, N, CD), generator=g).requires_grad_()
    return x, ctx


def padding():
    kpm = torch.zeros(N, S, dtype=torch.bool)
    kpm[1, 3:] = True
    kpm[2] = True  # batch item 2: the whole context modality is absent
    return kpm


def hand_composition(block: CrossAttention, mha: nn.Module, x, ctx, kpm=None, attn_mask=None):
    """The block written out by hand from its own weights and an external attention module."""

    def ln(t, norm):
        return F.layer_norm(t, norm.normalized_shape, norm.weight, norm.bias, norm.eps)

    def ff(t):
        return block.linear2(block.activation(block.linear1(t)))

    if block.norm_first:
        c = ln(ctx, block.norm_context)
        q = ln(x, block.norm1)
        x = x + mha(q, c, c, key_padding_mask=kpm, attn_mask=attn_mask, need_weights=False)[0]
        return x + ff(ln(x, block.norm2))
    x = ln(x + mha(x, ctx, ctx, key_padding_mask=kpm, attn_mask=attn_mask, need_weights=False)[0], block.norm1)
    return ln(x + ff(x), block.norm2)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("norm_first", [False, True])
def test_shapes_and_weights(batch_first, norm_first):
    block = CrossAttention(QD, CD, NH, FF, dropout=0.0, batch_first=batch_first, norm_first=norm_first)
    x, ctx = inputs(batch_first)
    assert block.cross_attn.kdim == block.cross_attn.vdim == CD
    assert block.linear1.out_features == FF
    assert CrossAttention(QD, CD, NH).linear1.out_features == 4 * QD
    out = block(x, ctx)
    assert out.shape == x.shape
    out2, w = block(x, ctx, need_weights=True)
    close(out2, out)
    assert w.shape == (N, NH, L, S)
    close(w.sum(-1), torch.ones(N, NH, L))


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("which", ["torch", "ours"])
def test_equals_hand_composition(batch_first, norm_first, activation, which):
    block = randomize_(
        CrossAttention(
            QD, CD, NH, FF, dropout=0.0, activation=activation, batch_first=batch_first, norm_first=norm_first
        )
    )
    cls = nn.MultiheadAttention if which == "torch" else MultiheadAttention
    mha = cls(QD, NH, dropout=0.0, kdim=CD, vdim=CD, batch_first=batch_first)
    mha.load_state_dict(block.cross_attn.state_dict())  # strict: the keys are torch's
    x, ctx = inputs(batch_first)
    kpm = padding()
    kpm[2] = False  # torch's weights path would be NaN for an absent context
    attn_mask = torch.zeros(L, S, dtype=torch.bool)
    attn_mask[1, 1:] = True
    for mode in ("train", "eval"):
        getattr(block, mode)(), getattr(mha, mode)()
        out = block(x, ctx, context_key_padding_mask=kpm, attn_mask=attn_mask)
        expected = hand_composition(block, mha, x, ctx, kpm, attn_mask)
        close(out, expected)
    # Gradients flow to both sequences the same way.
    gx, gc = torch.autograd.grad(out.pow(2).sum(), (x, ctx))
    ex, ec = torch.autograd.grad(expected.pow(2).sum(), (x, ctx))
    close(gx, ex, atol=1e-4, rtol=1e-4)
    close(gc, ec, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_absent_context_contributes_nothing(norm_first, bias):
    block = randomize_(CrossAttention(QD, CD, NH, FF, dropout=0.0, norm_first=norm_first, bias=bias))
    x, ctx = inputs(False)
    kpm = padding()
    out, w = block(x, ctx, context_key_padding_mask=kpm, need_weights=True)
    assert torch.isfinite(out).all()
    assert (w[2] == 0).all()
    # The absent item's output does not depend on its context at all ...
    (gc,) = torch.autograd.grad(out[:, 2].sum(), ctx, retain_graph=True)
    assert (gc == 0).all() and torch.isfinite(gc).all()
    ctx2 = ctx.detach().clone()
    ctx2[:, 2] = 1e3 * torch.randn(S, CD)
    close(block(x, ctx2, context_key_padding_mask=kpm)[:, 2], out[:, 2])
    # ... and equals the block with the attention term replaced by 0 (with or without biases).
    attn_term = torch.zeros(QD)

    class Constant(nn.Module):
        def forward(self, q, *args, **kwargs):
            return attn_term.expand(q.shape), None

    close(out[:, 2], hand_composition(block, Constant(), x, ctx)[:, 2])
    # Literally nothing: pre-norm gives x + ff(norm2(x)), post-norm norm2(y + ff(y)) with y = norm1(x).
    x2 = x[:, 2]
    if norm_first:
        expected = x2 + block._ff_block(block.norm2(x2))
    else:
        y = block.norm1(x2)
        expected = block.norm2(y + block._ff_block(y))
    close(out[:, 2], expected)
    # Finite gradients for every parameter.
    block.zero_grad()
    out.sum().backward()
    for name, p in block.named_parameters():
        assert torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("batch_first", [False, True])
def test_bidirectional_shapes_and_directions(batch_first):
    da, db, la, lb = 8, 6, 4, 5
    bi = randomize_(BidirectionalCrossAttention(da, db, NH, dim_feedforward=FF, dropout=0.0, batch_first=batch_first))
    g = torch.Generator().manual_seed(0)
    a = torch.randn((N, la, da) if batch_first else (la, N, da), generator=g)
    b = torch.randn((N, lb, db) if batch_first else (lb, N, db), generator=g)
    kpm_a = torch.zeros(N, la, dtype=torch.bool)
    kpm_b = torch.zeros(N, lb, dtype=torch.bool)
    kpm_a[0, -1] = True
    kpm_b[1] = True  # b absent for item 1
    a_out, b_out = bi(a, b, kpm_a, kpm_b)
    assert a_out.shape == a.shape and b_out.shape == b.shape
    a2, b2, w_ab, w_ba = bi(a, b, kpm_a, kpm_b, need_weights=True)
    close(a2, a_out)
    close(b2, b_out)
    assert w_ab.shape == (N, NH, la, lb) and w_ba.shape == (N, NH, lb, la)
    assert (w_ab[1] == 0).all() and (w_ba[0, ..., -1] == 0).all()
    assert torch.isfinite(a_out).all() and torch.isfinite(b_out).all()
    # Each direction is the corresponding CrossAttention block.
    close(a_out, bi.a_to_b(a, b, kpm_b))
    close(b_out, bi.b_to_a(b, a, kpm_a))
    assert bi.a_to_b.cross_attn.kdim == db and bi.b_to_a.cross_attn.kdim == da
