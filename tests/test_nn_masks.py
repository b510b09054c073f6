"""KeyPaddingMask: a padding mask prepared once gives exactly what the raw mask gives, in every
layer that takes a key_padding_mask; nothing padded means no mask at all (the unmasked kernel);
stacks prepare it once, not per layer. Float masks: finite values or -inf only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnfuse.nn.functional as AF
from attnfuse.nn import (
    BidirectionalCrossAttention,
    CrossAttention,
    KeyPaddingMask,
    MultiheadAttention,
    TransformerEncoder,
    TransformerEncoderLayer,
)
from helpers import Spy, randomize_

N, L, S, E, H = 3, 4, 5, 8, 2
BOTH_PATHS = pytest.mark.parametrize("need_weights", [False, True], ids=["fused", "explicit"])


def padding(kind: str) -> torch.Tensor:
    """(N, S): 'none' nothing padded; 'some' ragged; 'dead' sample 2 has no key at all; 'float'."""
    kpm = torch.zeros(N, S, dtype=torch.bool)
    if kind in ("some", "dead", "float"):
        kpm[1, 3:] = True
    if kind == "dead":
        kpm[2] = True
    if kind == "float":
        return torch.randn(N, S, generator=torch.Generator().manual_seed(0)).masked_fill(kpm, float("-inf"))
    return kpm


KINDS = ["none", "some", "dead", "float"]


def grads(outputs, tensors):
    return torch.autograd.grad(outputs.sum(), tensors)


def test_fields():
    none = KeyPaddingMask(padding("none"))
    assert none.allowed is None and none.dead is None
    some = KeyPaddingMask(padding("some"))
    assert torch.equal(some.allowed, ~padding("some")) and some.dead is None
    dead = KeyPaddingMask(padding("dead"))
    assert dead.dead.tolist() == [False, False, True]
    assert dead.allowed[2].all() and not dead.allowed[1, 3:].any()  # a dead sample sees all (finite softmax)
    assert (some.batch_size, some.src_len) == (N, S)
    zeros = KeyPaddingMask(torch.zeros(N, S))
    assert zeros.allowed is None
    assert "KeyPaddingMask(shape=(3, 5)" in repr(dead)


@BOTH_PATHS
@pytest.mark.parametrize("kind", KINDS)
def test_functional_equals_raw_mask(kind, need_weights):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(N, H, n, E, generator=g, requires_grad=True) for n in (L, S, S))
    kpm = padding(kind)
    raw = AF.scaled_dot_product_attention(q, k, v, key_padding_mask=kpm, need_weights=need_weights)
    prep = AF.scaled_dot_product_attention(q, k, v, key_padding_mask=KeyPaddingMask(kpm), need_weights=need_weights)
    for a, b in zip(raw, prep):
        if a is not None:
            torch.testing.assert_close(b, a)
    for a, b in zip(grads(raw[0], (q, k, v)), grads(prep[0], (q, k, v))):
        torch.testing.assert_close(b, a)
    if kind == "dead":
        assert (prep[0][2] == 0).all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("extras", [{}, {"add_bias_kv": True}, {"add_zero_attn": True}, {"kdim": 6, "vdim": 6}])
@pytest.mark.parametrize("combine", ["alone", "attn_mask", "causal"])
def test_multihead_attention_equals_raw_mask(kind, extras, combine):
    kdim = extras.get("kdim", E)
    mha = randomize_(MultiheadAttention(E, H, batch_first=True, **extras))
    g = torch.Generator().manual_seed(2)
    q = torch.randn(N, L, E, generator=g, requires_grad=True)
    kv = torch.randn(N, S, kdim, generator=g, requires_grad=True)
    kw = {}
    if combine == "attn_mask":
        kw["attn_mask"] = torch.rand(L, S, generator=g) < 0.3
    elif combine == "causal":
        kw["is_causal"] = True
    kpm = padding(kind)
    raw, w_raw = mha(q, kv, kv, key_padding_mask=kpm, **kw)
    prep, w_prep = mha(q, kv, kv, key_padding_mask=KeyPaddingMask(kpm), **kw)
    torch.testing.assert_close(prep, raw)
    torch.testing.assert_close(w_prep, w_raw)
    for a, b in zip(grads(raw, (q, kv)), grads(prep, (q, kv))):
        torch.testing.assert_close(b, a)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("norm_first", [False, True])
def test_layers_equal_raw_mask(kind, norm_first):
    torch.manual_seed(3)
    kw = dict(dropout=0.0, batch_first=True, norm_first=norm_first)
    x, ctx = torch.randn(N, S, E), torch.randn(N, S, 6)
    kpm, pm = padding(kind), KeyPaddingMask(padding(kind))
    layer = randomize_(TransformerEncoderLayer(E, H, 16, **kw))
    torch.testing.assert_close(layer(x, src_key_padding_mask=pm), layer(x, src_key_padding_mask=kpm))
    cross = randomize_(CrossAttention(E, 6, H, 16, **kw))
    torch.testing.assert_close(cross(x, ctx, pm), cross(x, ctx, kpm))
    bi = randomize_(BidirectionalCrossAttention(E, 6, H, 16, **kw))
    kpm_a = padding("some")
    for a, b in zip(bi(x, ctx, KeyPaddingMask(kpm_a), pm), bi(x, ctx, kpm_a, kpm)):
        torch.testing.assert_close(a, b)


def test_nothing_padded_runs_the_unmasked_kernel(monkeypatch):
    sdpa = Spy(F.scaled_dot_product_attention)
    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
    enc = TransformerEncoder(E, H, 3, 16, dropout=0.0, batch_first=True)
    x = torch.randn(N, S, E)
    enc(x, src_key_padding_mask=padding("none"))
    enc(x, src_key_padding_mask=KeyPaddingMask(padding("none")))
    mha = MultiheadAttention(E, H, batch_first=True)
    mha(x, x, x, key_padding_mask=padding("none"), need_weights=False)
    assert sdpa.calls == 7 and all(m is None for m in sdpa.masks)
    enc(x, src_key_padding_mask=padding("some"))
    assert all(m is not None for m in sdpa.masks[7:])


def test_encoder_prepares_the_padding_once(monkeypatch):
    built, merged, init = [], Spy(AF.merge_masks), KeyPaddingMask.__init__

    def counting_init(self, *args):
        built.append(1)
        init(self, *args)

    monkeypatch.setattr(KeyPaddingMask, "__init__", counting_init)
    monkeypatch.setattr(AF, "merge_masks", merged)
    enc = TransformerEncoder(E, H, 4, 16, dropout=0.0, batch_first=True)
    x = torch.randn(N, S, E)
    out = enc(x, src_key_padding_mask=padding("dead"))
    assert len(built) == 1 and merged.calls == 0
    assert (out[2] != 0).any()  # a dead sample still flows through the residuals and norms
    # A mask that cannot be prepared alone (combined with src_mask) merges per layer, as before.
    enc(x, mask=torch.zeros(S, S, dtype=torch.bool), src_key_padding_mask=padding("some"))
    assert merged.calls == 4


def test_errors():
    with pytest.raises(ValueError, match=r"key_padding_mask: expected shape \(N, S\), got \(3,\)"):
        KeyPaddingMask(torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_padding_mask.*int64"):
        KeyPaddingMask(torch.zeros(N, S, dtype=torch.long))
    with pytest.raises(TypeError, match="key_padding_mask"):
        KeyPaddingMask([[True]])
    pm = KeyPaddingMask(padding("some"))
    mha = MultiheadAttention(E, H, batch_first=True)
    x = torch.randn(N + 1, S, E)
    with pytest.raises(ValueError, match=r"key_padding_mask: expected shape \(4, 5\), got \(3, 5\)"):
        mha(x, x, x, key_padding_mask=pm)
    q = torch.randn(N, H, L, E)
    with pytest.raises(ValueError, match=r"key_padding_mask: expected shape \(3, 6\), got a KeyPaddingMask"):
        AF.scaled_dot_product_attention(q, torch.randn(N, H, S + 1, E), torch.randn(N, H, S + 1, E), None, pm)
    with pytest.raises(TypeError, match="key_padding_mask"):
        mha(x, x, x, key_padding_mask="padding")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["attn_mask", "key_padding_mask", "prepared"])
def test_float_mask_with_nan_or_plus_inf_is_an_error(bad, where):
    q = torch.randn(N, L, E)
    m = torch.zeros(L, S) if where == "attn_mask" else torch.zeros(N, S)
    m[0, 1] = bad
    m[0, 2] = float("-inf")  # -inf is fine
    k = torch.randn(N, S, E)
    with pytest.raises(ValueError, match=f"{'attn_mask' if where == 'attn_mask' else 'key_padding_mask'}.*NaN or"):
        if where == "prepared":
            KeyPaddingMask(m)
        else:
            AF.scaled_dot_product_attention(q, k, k, **{where: m})
    mha = MultiheadAttention(E, H, batch_first=True)
    with pytest.raises(ValueError, match="NaN or"):
        mha(q, k, k, **({where: m} if where != "prepared" else {"key_padding_mask": m}))
    layer = TransformerEncoderLayer(E, H, 16, batch_first=True)
    if where == "attn_mask":
        with pytest.raises(ValueError, match="attn_mask.*NaN or"):
            layer(torch.randn(N, L, E), src_mask=torch.full((L, L), bad))


# --- float masks that record gradients: they get them, as in torch ---------------------------


def float_padding(kind: str) -> torch.Tensor:
    """(N, S) float: 'zeros' (adds nothing, yet has a gradient), 'randn', 'some-inf' (no dead row)."""
    m = torch.zeros(N, S) if kind == "zeros" else torch.randn(N, S, generator=torch.Generator().manual_seed(4))
    if kind == "some-inf":
        m[1, 3:] = float("-inf")
    return m


@BOTH_PATHS
@pytest.mark.parametrize("kind", ["zeros", "randn", "some-inf"])
@pytest.mark.parametrize("attn", [None, "float"])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("prepared", [False, True])
def test_a_float_mask_gets_the_gradient_torch_gives_it(kind, attn, batch_first, prepared, need_weights):
    """The oracle: torch.nn.MultiheadAttention with the same weights, the gradient of the same loss
    with respect to the key_padding_mask (and a float attn_mask), both additive."""
    oracle = randomize_(torch.nn.MultiheadAttention(E, H, batch_first=batch_first))
    ours = MultiheadAttention(E, H, batch_first=batch_first)
    ours.load_state_dict(oracle.state_dict())
    g = torch.Generator().manual_seed(5)
    shape = (N, L, E) if batch_first else (L, N, E)
    q, kv = torch.randn(shape, generator=g), torch.randn((N, S, E) if batch_first else (S, N, E), generator=g)
    am = torch.randn(L, S, generator=g) if attn else None
    found = []
    for module in (oracle, ours):
        kpm = float_padding(kind).requires_grad_()
        mask = am.clone().requires_grad_() if am is not None else None
        given = KeyPaddingMask(kpm) if prepared and module is ours else kpm
        out, _ = module(q, kv, kv, key_padding_mask=given, attn_mask=mask, need_weights=need_weights)
        wrt = (kpm,) if mask is None else (kpm, mask)
        found.append((out, torch.autograd.grad(out.square().sum(), wrt)))
    (out_t, grads_t), (out_o, grads_o) = found
    torch.testing.assert_close(out_o, out_t, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_o, grads_t):
        assert a.abs().sum() > 0  # the test would pass vacuously on zeros
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@BOTH_PATHS
@pytest.mark.parametrize("kind", ["zeros", "randn", "some-inf"])
def test_functional_float_mask_gradient_matches_torch_sdpa(kind, need_weights):
    """scaled_dot_product_attention's key_padding_mask is torch's additive attn_mask over keys."""
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(N, H, n, E, generator=g) for n in (L, S, S))
    kpm = float_padding(kind).requires_grad_()
    ours, _ = AF.scaled_dot_product_attention(q, k, v, key_padding_mask=kpm, need_weights=need_weights)
    (mine,) = torch.autograd.grad(ours.square().sum(), kpm)
    ref_mask = float_padding(kind).requires_grad_()
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=ref_mask[:, None, None, :])
    (theirs,) = torch.autograd.grad(ref.square().sum(), ref_mask)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


def test_a_zero_float_mask_without_autograd_still_means_no_mask():
    """The shortcut (no mask, the unmasked kernel) stays where no gradient is asked for."""
    assert KeyPaddingMask(torch.zeros(N, S)).allowed is None
    with torch.no_grad():
        assert KeyPaddingMask(torch.zeros(N, S, requires_grad=True)).allowed is None
    kept = KeyPaddingMask(torch.zeros(N, S, requires_grad=True))
    assert kept.allowed is not None and kept.allowed.requires_grad and kept.dead is None
