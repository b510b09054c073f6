"""attnfuse.scaled_dot_product_attention against torch and against a float64 reference.

The reference is the formula itself, softmax(Q Kᵀ · scale + mask) V, computed in float64 with an
explicit "a row with no allowed key gets weights 0 and output 0" rule. Both paths of ours
(``need_weights=False``: fused kernel; ``need_weights=True``: explicit scores) must agree with it,
with each other, and with ``torch.nn.functional.scaled_dot_product_attention`` wherever torch is
finite.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from attnfuse import scaled_dot_product_attention as sdpa

ATOL = RTOL = 1e-5
BOTH_PATHS = pytest.mark.parametrize("need_weights", [False, True], ids=["fused", "explicit"])


# --------------------------------------------------------------------------- reference helpers


def blocked_additive(mask: torch.Tensor) -> torch.Tensor:
    """A bool (True = blocked) or float mask as a float64 additive mask."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=torch.float64).masked_fill(mask, float("-inf"))
    return mask.double()


def reference(q, k, v, attn_mask=None, key_padding_mask=None, is_causal=False, scale=None):
    """softmax(QKᵀ·scale + mask)V in float64; dead rows -> weights 0, output 0.

    key_padding_mask here is already in the batch + (S,) layout (or (S,) for rank-2 inputs).
    """
    q, k, v = q.double(), k.double(), v.double()
    L, S = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale
    add = torch.zeros(scores.shape, dtype=torch.float64)
    if attn_mask is not None:
        add = add + blocked_additive(attn_mask)
    if key_padding_mask is not None:
        add = add + blocked_additive(key_padding_mask).unsqueeze(-2)
    if is_causal:
        add = add + blocked_additive(torch.ones(L, S, dtype=torch.bool).triu(1))
    scores = scores + add
    dead = torch.isneginf(scores).all(-1, keepdim=True)
    weights = torch.softmax(scores.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    return weights @ v, weights


def rand_qkv(batch=(2, 3), L=4, S=5, E=6, Ev=7, dtype=torch.float32, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(*batch, L, E, generator=g, dtype=dtype)
    k = torch.randn(*batch, S, E, generator=g, dtype=dtype)
    v = torch.randn(*batch, S, Ev, generator=g, dtype=dtype)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def rand_bool_mask(shape, p=0.4, seed=1, keep_first=True):
    """True = blocked; ``keep_first`` keeps key 0 allowed so no row is dead."""
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(shape, generator=g) < p
    if keep_first:
        m[..., 0] = False
    return m


def as_float_mask(bool_mask, seed=2):
    """A float mask with -inf where ``bool_mask`` blocks and random finite biases elsewhere."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(bool_mask.shape, generator=g).masked_fill(bool_mask, float("-inf"))


def assert_close(a, b, atol=ATOL, rtol=RTOL):
    torch.testing.assert_close(a, b.to(a.dtype), atol=atol, rtol=rtol)


# --------------------------------------------------------------------------- parity with torch / reference


@BOTH_PATHS
def test_no_mask_matches_torch_and_reference(need_weights):
    q, k, v = rand_qkv()
    out, w = sdpa(q, k, v, need_weights=need_weights)
    assert_close(out, F.scaled_dot_product_attention(q, k, v))
    ref_out, ref_w = reference(q, k, v)
    assert_close(out, ref_out)
    assert (w is not None) == need_weights
    if need_weights:
        assert w.shape == (2, 3, 4, 5)
        assert_close(w, ref_w)


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize(
    "mask_shape",
    [(4, 5), (2, 3, 4, 5), (1, 3, 4, 5), (2, 1, 4, 5), (1, 1, 4, 5)],
    ids=["2d", "full", "bcast-N", "bcast-H", "bcast-both"],
)
@BOTH_PATHS
def test_attn_mask_matches_torch_and_reference(kind, mask_shape, need_weights):
    q, k, v = rand_qkv()
    blocked = rand_bool_mask(mask_shape)
    mask = blocked if kind == "bool" else as_float_mask(blocked)
    out, w = sdpa(q, k, v, attn_mask=mask, need_weights=need_weights)
    # torch's bool convention is the opposite one (True = allowed).
    torch_mask = ~blocked if kind == "bool" else mask
    assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=torch_mask))
    ref_out, ref_w = reference(q, k, v, attn_mask=mask)
    assert_close(out, ref_out)
    if need_weights:
        assert_close(w, ref_w)
        if kind == "bool":
            assert (w.expand(2, 3, 4, 5)[blocked.expand(2, 3, 4, 5)] == 0).all()


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("layout", ["NS", "full"])
@BOTH_PATHS
def test_key_padding_mask(kind, layout, need_weights):
    """(N, S) applies to every head and query; batch + (S,) is per (n, h)."""
    q, k, v = rand_qkv()
    shape = (2, 5) if layout == "NS" else (2, 3, 5)
    blocked = rand_bool_mask(shape, seed=3)
    kpm = blocked if kind == "bool" else as_float_mask(blocked)
    out, w = sdpa(q, k, v, key_padding_mask=kpm, need_weights=need_weights)
    full = kpm if layout == "full" else kpm[:, None, :].expand(2, 3, 5)
    ref_out, ref_w = reference(q, k, v, key_padding_mask=full)
    assert_close(out, ref_out)
    blocked_full = blocked if layout == "full" else blocked[:, None, :].expand(2, 3, 5)
    torch_mask = ~blocked_full[..., None, :] if kind == "bool" else full[..., None, :]
    assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=torch_mask))
    if need_weights:
        assert_close(w, ref_w)


def test_key_padding_mask_for_rank2_and_rank3_inputs():
    # Unbatched (L, E) inputs take an (S,) padding mask; (N, L, E) inputs take (N, S).
    q, k, v = rand_qkv(batch=())
    kpm = torch.tensor([False, True, False, True, False])
    for nw in (False, True):
        out, _ = sdpa(q, k, v, key_padding_mask=kpm, need_weights=nw)
        assert_close(out, reference(q, k, v, key_padding_mask=kpm)[0])
    q, k, v = rand_qkv(batch=(2,))
    kpm = rand_bool_mask((2, 5))
    for nw in (False, True):
        out, _ = sdpa(q, k, v, key_padding_mask=kpm, need_weights=nw)
        assert_close(out, reference(q, k, v, key_padding_mask=kpm)[0])


@pytest.mark.parametrize("L,S", [(4, 4), (3, 5), (5, 3)])
@BOTH_PATHS
def test_is_causal_alone(L, S, need_weights):
    q, k, v = rand_qkv(L=L, S=S)
    out, w = sdpa(q, k, v, is_causal=True, need_weights=need_weights)
    # Top-left aligned, as torch.
    assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    ref_out, ref_w = reference(q, k, v, is_causal=True)
    assert_close(out, ref_out)
    if need_weights:
        assert_close(w, ref_w)
        assert (w[..., torch.ones(L, S, dtype=torch.bool).triu(1)] == 0).all()


@pytest.mark.parametrize("kind", ["bool", "float"])
@BOTH_PATHS
def test_is_causal_is_combined_with_masks_never_replaces_them(kind, need_weights):
    q, k, v = rand_qkv(L=5, S=5)
    blocked = rand_bool_mask((5, 5), p=0.5, seed=4)
    mask = blocked if kind == "bool" else as_float_mask(blocked)
    kpm = torch.zeros(2, 5, dtype=torch.bool)
    kpm[1, 2] = True
    out, w = sdpa(q, k, v, attn_mask=mask, key_padding_mask=kpm, is_causal=True, need_weights=need_weights)
    ref_out, ref_w = reference(
        q, k, v, attn_mask=mask, key_padding_mask=kpm[:, None, :].expand(2, 3, 5), is_causal=True
    )
    assert_close(out, ref_out)
    # Not the same as either mask alone.
    assert not torch.allclose(out, sdpa(q, k, v, is_causal=True)[0], atol=1e-4)
    assert not torch.allclose(out, sdpa(q, k, v, attn_mask=mask, key_padding_mask=kpm)[0], atol=1e-4)
    if need_weights:
        assert_close(w, ref_w)


@pytest.mark.parametrize("scale", [1.0, 0.25, 2.0])
@BOTH_PATHS
def test_custom_scale(scale, need_weights):
    q, k, v = rand_qkv()
    mask = rand_bool_mask((4, 5))
    out, w = sdpa(q, k, v, attn_mask=mask, scale=scale, need_weights=need_weights)
    assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=~mask, scale=scale))
    ref_out, ref_w = reference(q, k, v, attn_mask=mask, scale=scale)
    assert_close(out, ref_out)
    if need_weights:
        assert_close(w, ref_w)


def test_both_paths_agree_with_everything_on():
    q, k, v = rand_qkv(L=5, S=5)
    mask = as_float_mask(rand_bool_mask((2, 3, 5, 5), seed=7, keep_first=False))
    kpm = rand_bool_mask((2, 5), seed=8, keep_first=False)
    kw = dict(attn_mask=mask, key_padding_mask=kpm, is_causal=True, scale=0.7)
    fused, none = sdpa(q, k, v, **kw)
    explicit, w = sdpa(q, k, v, need_weights=True, **kw)
    assert none is None
    assert_close(fused, explicit)
    assert_close(explicit, w @ v)
    assert torch.isfinite(fused).all() and torch.isfinite(w).all()


# --------------------------------------------------------------------------- fully-masked rows


def dead_row_masks():
    """Masks that kill query row 1 of every (n, h) and row 2 of batch 0 only."""
    blocked = torch.zeros(2, 3, 4, 5, dtype=torch.bool)
    blocked[:, :, 1, :] = True
    blocked[0, :, 2, :] = True
    blocked[1, 2, 3, 1:] = True  # a partial row stays alive
    return blocked


@pytest.mark.parametrize("kind", ["bool", "float"])
@BOTH_PATHS
def test_fully_masked_rows_give_zero_output_zero_weights_finite_grads(kind, need_weights):
    q, k, v = rand_qkv(requires_grad=True)
    blocked = dead_row_masks()
    mask = blocked if kind == "bool" else as_float_mask(blocked)
    out, w = sdpa(q, k, v, attn_mask=mask, need_weights=need_weights)
    dead = blocked.all(-1)  # (2, 3, 4)
    assert torch.isfinite(out).all()
    assert (out[dead] == 0).all()
    ref_out, ref_w = reference(q, k, v, attn_mask=mask)
    assert_close(out, ref_out)
    if need_weights:
        assert (w[dead] == 0).all()
        assert_close(w, ref_w)
        (out.sum() + w.sum()).backward()
    else:
        out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    # A dead query row has no influence on anything: its gradient is exactly 0.
    assert (q.grad[dead] == 0).all()


@BOTH_PATHS
def test_all_keys_padded_for_one_batch_item(need_weights):
    q, k, v = rand_qkv(requires_grad=True)
    kpm = torch.tensor([[True] * 5, [False, True, False, False, True]])
    out, w = sdpa(q, k, v, key_padding_mask=kpm, is_causal=True, need_weights=need_weights)
    assert (out[0] == 0).all() and torch.isfinite(out).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert (k.grad[0] == 0).all() and (v.grad[0] == 0).all()
    if need_weights:
        assert (w[0] == 0).all()


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_gradients_of_both_paths_agree_with_dead_rows(kind):
    blocked = dead_row_masks()
    mask = blocked if kind == "bool" else as_float_mask(blocked)
    grads = []
    for nw in (False, True):
        q, k, v = rand_qkv(requires_grad=True)
        out, _ = sdpa(q, k, v, attn_mask=mask, need_weights=nw)
        out.pow(2).sum().backward()
        grads.append([q.grad, k.grad, v.grad])
    for a, b in zip(*grads):
        assert_close(a, b, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- gradcheck (float64)


@pytest.mark.parametrize("kind", ["none", "bool", "float", "kpm+causal"])
@BOTH_PATHS
def test_gradcheck(kind, need_weights):
    q, k, v = rand_qkv(batch=(2, 2), L=3, S=4, E=3, Ev=2, dtype=torch.float64, requires_grad=True)
    blocked = torch.zeros(2, 2, 3, 4, dtype=torch.bool)
    blocked[0, 1, 2, :] = True  # a dead row
    blocked[1, 0, :, 1] = True
    blocked[1, 1, 0, 2:] = True
    kw: dict = {}
    if kind == "bool":
        kw["attn_mask"] = blocked
    elif kind == "float":
        kw["attn_mask"] = as_float_mask(blocked).double()
    elif kind == "kpm+causal":
        kw.update(
            key_padding_mask=torch.tensor([[False, False, True, False], [True, True, True, True]]), is_causal=True
        )

    def f(q, k, v):
        out, w = sdpa(q, k, v, need_weights=need_weights, **kw)
        return (out, w) if need_weights else out

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-5)


# --------------------------------------------------------------------------- dropout


@BOTH_PATHS
def test_dropout_is_unbiased_and_weights_are_pre_dropout(need_weights):
    torch.manual_seed(0)
    q, k, v = rand_qkv(batch=(1,), L=3, S=4, E=2, Ev=2)
    reps = 4000
    qq, kk, vv = (t.expand(reps, *t.shape[1:]) for t in (q, k, v))
    out, w = sdpa(qq, kk, vv, dropout_p=0.5, need_weights=need_weights)
    exact, exact_w = sdpa(q, k, v, need_weights=True)
    assert not torch.allclose(out[0], exact[0], atol=1e-3)  # dropout did something
    torch.testing.assert_close(out.mean(0), exact[0], atol=0.06, rtol=0)
    if need_weights:
        assert_close(w[0], exact_w[0])


def test_dropout_p_out_of_range():
    q, k, v = rand_qkv()
    for p in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="dropout_p"):
            sdpa(q, k, v, dropout_p=p)


# --------------------------------------------------------------------------- errors


def _raises(match_all, *args, **kwargs):
    with pytest.raises(ValueError) as info:
        sdpa(*args, **kwargs)
    msg = str(info.value)
    for s in match_all:
        assert s in msg, f"{s!r} not in {msg!r}"
    return msg


def test_error_wrong_rank():
    q, k, v = rand_qkv(batch=(2,))
    _raises(["query", "(6,)"], torch.randn(6), k, v)
    _raises(["query", "key", str(tuple(q.shape)), "(5, 6)"], q, torch.randn(5, 6), v)


def test_error_mismatched_batch_dims():
    q, _, _ = rand_qkv(batch=(2, 3))
    _, k, v = rand_qkv(batch=(2, 4))
    _raises(["key", str(tuple(q.shape)), str(tuple(k.shape))], q, k, v)


def test_error_mismatched_feature_size_and_length():
    q, k, v = rand_qkv(batch=(2,), E=6)
    k_bad = torch.randn(2, 5, 4)
    _raises(["key", "6", "4", str(tuple(q.shape)), str(tuple(k_bad.shape))], q, k_bad, v)
    v_bad = torch.randn(2, 3, 7)
    _raises(["value", "5", "3", str(tuple(k.shape)), str(tuple(v_bad.shape))], q, k, v_bad)


def test_error_dtypes():
    q, k, v = rand_qkv()
    _raises(["query", "int64"], q.long(), k, v)
    _raises(["float64", "float32"], q, k.double(), v)
    with pytest.raises(TypeError, match="key"):
        sdpa(q, [[1.0]], v)


@pytest.mark.parametrize("shape", [(5, 4), (4, 6), (3, 3, 4, 5), (2, 3, 2, 5), (3, 4, 5), (2, 2, 3, 4, 5)])
def test_error_attn_mask_shape(shape):
    q, k, v = rand_qkv()
    for nw in (False, True):
        _raises(
            ["attn_mask", "(4, 5)", str(shape)],
            q,
            k,
            v,
            attn_mask=torch.zeros(shape, dtype=torch.bool),
            need_weights=nw,
        )


@pytest.mark.parametrize("shape", [(2, 4), (3, 5), (5,), (2, 3, 4), (2, 1, 5, 1)])
def test_error_key_padding_mask_shape(shape):
    q, k, v = rand_qkv()
    _raises(["key_padding_mask", "(2, 5)", str(shape)], q, k, v, key_padding_mask=torch.zeros(shape, dtype=torch.bool))


@pytest.mark.parametrize("name", ["attn_mask", "key_padding_mask"])
def test_error_mask_dtype(name):
    q, k, v = rand_qkv()
    shape = (4, 5) if name == "attn_mask" else (2, 5)
    _raises([name, "int64"], q, k, v, **{name: torch.zeros(shape, dtype=torch.long)})


def test_device_of_causal_mask_follows_the_inputs():
    # On the meta device no CPU tensor may sneak in (it would on CUDA too).
    for requires_grad in (False, True):
        q = torch.randn(2, 3, 4, device="meta", requires_grad=requires_grad)
        for nw in (False, True):
            out, w = sdpa(q, q, q, is_causal=True, need_weights=nw)
            assert out.device.type == "meta" and out.shape == (2, 3, 4)
            if nw:
                assert w.device.type == "meta" and w.shape == (2, 3, 3)


# --------------------------------------------------------------------------- properties (hypothesis)

dims = st.integers(1, 4)


@st.composite
def problems(draw):
    batch = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
    L, S, E, Ev = draw(dims), draw(dims), draw(dims), draw(dims)
    seed = draw(st.integers(0, 2**16))
    mask_kind = draw(st.sampled_from(["none", "bool", "float"]))
    p = draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
    causal = draw(st.booleans())
    return batch, L, S, E, Ev, seed, mask_kind, p, causal


SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)


@SETTINGS
@given(problems())
def test_property_shapes_row_sums_and_masked_keys(problem):
    batch, L, S, E, Ev, seed, mask_kind, p, causal = problem
    q, k, v = rand_qkv(batch, L, S, E, Ev, seed=seed)
    blocked = rand_bool_mask(batch + (L, S), p=p, seed=seed + 1, keep_first=False)
    mask = None if mask_kind == "none" else blocked if mask_kind == "bool" else as_float_mask(blocked, seed)
    out, w = sdpa(q, k, v, attn_mask=mask, is_causal=causal, need_weights=True)
    fused, none = sdpa(q, k, v, attn_mask=mask, is_causal=causal)
    assert out.shape == fused.shape == batch + (L, Ev)
    assert w.shape == batch + (L, S) and none is None
    assert torch.isfinite(out).all() and torch.isfinite(fused).all()
    assert_close(fused, out)

    all_blocked = torch.zeros(batch + (L, S), dtype=torch.bool)
    if mask is not None:
        all_blocked |= blocked
    if causal:
        all_blocked |= torch.ones(L, S, dtype=torch.bool).triu(1)
    assert (w[all_blocked] == 0).all(), "a masked key got weight"
    dead = all_blocked.all(-1)
    sums = w.sum(-1)
    assert_close(sums, (~dead).to(sums.dtype))
    assert (out[dead] == 0).all()
    assert_close(out, reference(q, k, v, attn_mask=mask, is_causal=causal)[0])


@SETTINGS
@given(
    batch=st.sampled_from([(), (2,), (2, 2)]),
    L=st.integers(2, 6),
    E=dims,
    seed=st.integers(0, 2**16),
    use_kpm=st.booleans(),
    need_weights=st.booleans(),
)
def test_property_self_attention_is_permutation_equivariant(batch, L, E, seed, use_kpm, need_weights):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch, L, E, generator=g)
    perm = torch.randperm(L, generator=g)
    kpm = rand_bool_mask(batch + (L,), p=0.3, seed=seed, keep_first=False) if use_kpm else None
    out, w = sdpa(x, x, x, key_padding_mask=kpm, need_weights=need_weights)
    xp = x[..., perm, :]
    out_p, w_p = sdpa(xp, xp, xp, key_padding_mask=None if kpm is None else kpm[..., perm], need_weights=need_weights)
    assert_close(out_p, out[..., perm, :])
    if need_weights:
        assert_close(w_p, w[..., perm, :][..., perm])


# --------------------------------------------------------------------------- dtypes and devices


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float16, 3e-3), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("kind", ["bool", "float"])
@BOTH_PATHS
def test_other_dtypes_with_dead_rows(dtype, tol, kind, need_weights):
    q, k, v = rand_qkv(dtype=dtype)
    blocked = dead_row_masks()
    mask = blocked if kind == "bool" else as_float_mask(blocked)  # a float32 mask on any input dtype
    out, w = sdpa(q, k, v, attn_mask=mask, need_weights=need_weights)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert (out[blocked.all(-1)] == 0).all()
    ref_out, ref_w = reference(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out.double(), ref_out, atol=tol, rtol=tol)
    if need_weights:
        assert w.dtype == dtype
        torch.testing.assert_close(w.double(), ref_w, atol=tol, rtol=tol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["none", "causal", "bool", "float", "kpm+causal"])
@BOTH_PATHS
def test_cuda_matches_cpu(kind, need_weights):
    q, k, v = rand_qkv(batch=(2, 3), L=5, S=5, requires_grad=True)
    blocked = rand_bool_mask((2, 3, 5, 5), keep_first=False)
    kw: dict = {}
    if kind == "causal":
        kw["is_causal"] = True
    elif kind == "bool":
        kw["attn_mask"] = blocked
    elif kind == "float":
        kw["attn_mask"] = as_float_mask(blocked)
    elif kind == "kpm+causal":
        kw.update(key_padding_mask=rand_bool_mask((2, 5), keep_first=False), is_causal=True)
    out, w = sdpa(q, k, v, need_weights=need_weights, **kw)
    qc, kc, vc = (t.detach().cuda().requires_grad_() for t in (q, k, v))
    kw_c = {n: (m.cuda() if isinstance(m, torch.Tensor) else m) for n, m in kw.items()}
    out_c, w_c = sdpa(qc, kc, vc, need_weights=need_weights, **kw_c)
    assert out_c.device.type == "cuda"
    torch.testing.assert_close(out_c.cpu(), out, atol=1e-4, rtol=1e-4)
    if need_weights:
        torch.testing.assert_close(w_c.cpu(), w, atol=1e-4, rtol=1e-4)
    out.sum().backward()
    out_c.sum().backward()
    for a, b in ((q, qc), (k, kc), (v, vc)):
        assert torch.isfinite(b.grad).all()
        torch.testing.assert_close(b.grad.cpu(), a.grad, atol=1e-3, rtol=1e-3)
