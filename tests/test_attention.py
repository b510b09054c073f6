"""attnfuse.MultiheadAttention is a drop-in for torch.nn.MultiheadAttention.

Same state_dict (both ways, strict), same outputs, weights and gradients (inputs and every
parameter) wherever torch is defined; and the documented improvements: fully-masked rows give 0
instead of NaN, ``is_causal`` works without a mask and combines with one, train == eval at dropout 0.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from attnfuse import MultiheadAttention
from helpers import randomize_

E, H, N, L, S = 8, 2, 3, 4, 5
KDIM, VDIM = 5, 7
ATOL, RTOL = 1e-5, 1e-5


def make_pair(reverse: bool = False, **kw) -> tuple[nn.MultiheadAttention, MultiheadAttention]:
    """torch's and ours with identical weights; ``reverse`` loads ours into torch instead."""
    ref = nn.MultiheadAttention(E, H, dropout=0.0, **kw)
    ours = MultiheadAttention(E, H, dropout=0.0, **kw)
    if reverse:
        randomize_(ours, 1)
        ref.load_state_dict(ours.state_dict())  # strict
    else:
        randomize_(ref, 1)
        ours.load_state_dict(ref.state_dict())  # strict
    return ref, ours


def close(a, b, atol=ATOL, rtol=RTOL, msg=""):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"{msg}: {m}")


# --------------------------------------------------------------------------- inputs and masks


def make_inputs(mode: str, batch_first: bool, kvdim: bool, seed: int = 0, batched: bool = True):
    """Leaf tensors (query, key, value) in the layer's layout; ``mode`` self / kv (key is value) / cross."""
    g = torch.Generator().manual_seed(seed)
    kd, vd = (KDIM, VDIM) if kvdim else (E, E)
    src_len = L if mode == "self" else S

    def t(seq, dim):
        if not batched:
            shape = (seq, dim)
        else:
            shape = (N, seq, dim) if batch_first else (seq, N, dim)
        return torch.randn(shape, generator=g).requires_grad_()

    q = t(L, E)
    if mode == "self":
        return q, q, q
    if mode == "kv":
        assert kd == vd
        kv = t(src_len, kd)
        return q, kv, kv
    return q, t(src_len, kd), t(src_len, vd)


def make_masks(kind: str, src_len: int, seed: int = 0, batched: bool = True):
    """(attn_mask, key_padding_mask) in torch's layouts; key 0 is never blocked (no dead rows)."""
    g = torch.Generator().manual_seed(100 + seed)
    n = N if batched else 1

    def blocked(shape, p=0.4):
        m = torch.rand(shape, generator=g) < p
        m[..., 0] = False
        return m

    def as_float(b):
        return (torch.rand(b.shape, generator=g) - 0.5).masked_fill(b, float("-inf"))

    attn_mask = kpm = None
    parts = kind.split("+")
    for part in parts:
        if part in ("bool2d", "float2d"):
            attn_mask = blocked((L, src_len))
        elif part in ("bool3d", "float3d"):
            attn_mask = blocked((n * H, L, src_len))
        elif part in ("kpm_bool", "kpm_float"):
            kpm = blocked((n, src_len) if batched else (src_len,))
        else:
            assert part == "none"
        if part.startswith("float"):
            attn_mask = as_float(attn_mask)
        if part == "kpm_float":
            kpm = as_float(kpm)
    return attn_mask, kpm


MASKS = [
    "none",
    "bool2d",
    "float2d",
    "bool3d",
    "float3d",
    "kpm_bool",
    "kpm_float",
    "bool2d+kpm_bool",
    "float3d+kpm_float",
]
CONFIGS = {
    "default": {},
    "nobias": {"bias": False},
    "kvdim": {"kdim": KDIM, "vdim": VDIM},
    "bias_kv": {"add_bias_kv": True},
    "zero_attn": {"add_zero_attn": True},
    "all_extras": {"add_bias_kv": True, "add_zero_attn": True, "bias": False, "kdim": KDIM, "vdim": VDIM},
}
WEIGHT_MODES = [(False, True), (True, True), (True, False)]  # (need_weights, average_attn_weights)


def grid():
    for cfg, bf, mode, mask in itertools.product(CONFIGS, [False, True], ["self", "kv", "cross"], MASKS):
        kvdim = "kdim" in CONFIGS[cfg]
        if kvdim and mode != "cross":
            continue  # self-attention and a shared key/value need kdim == vdim == embed_dim
        yield pytest.param(cfg, bf, mode, mask, id=f"{cfg}-{'bf' if bf else 'sf'}-{mode}-{mask}")


def run_both(ref, ours, inputs, attn_mask, kpm, need_weights, average, is_causal=False):
    kw = dict(key_padding_mask=kpm, need_weights=need_weights, attn_mask=attn_mask, average_attn_weights=average)
    theirs = ref(*inputs, is_causal=is_causal, **kw)
    mine = ours(*inputs, is_causal=is_causal, **kw)
    return theirs, mine


def grads_of(module, inputs):
    out = {f"input{i}": t.grad for i, t in enumerate(dict.fromkeys(inputs))}
    out.update({n: p.grad for n, p in module.named_parameters()})
    return out


def zero_grads(module, inputs):
    module.zero_grad(set_to_none=True)
    for t in inputs:
        t.grad = None


def check_parity(ref, ours, inputs, attn_mask, kpm, is_causal=False):
    """Train mode (outputs, weights, all gradients) then eval mode under no_grad (torch's fast path)."""
    g = torch.Generator().manual_seed(7)
    for need_weights, average in WEIGHT_MODES:
        ref.train(), ours.train()
        (out_r, w_r), (out_o, w_o) = run_both(ref, ours, inputs, attn_mask, kpm, need_weights, average, is_causal)
        close(out_o, out_r, msg="train output")
        assert out_o.shape == out_r.shape
        if need_weights:
            close(w_o, w_r, msg=f"weights (average={average})")
        else:
            assert w_o is None and w_r is None
        # The same loss on both; compare gradients of the inputs and of every parameter.
        proj = torch.randn(out_r.shape, generator=g)
        wproj = torch.randn(w_r.shape, generator=g) if need_weights else None
        grads = []
        for module, out, w in ((ref, out_r, w_r), (ours, out_o, w_o)):
            zero_grads(module, inputs)
            loss = (out * proj).sum() + ((w * wproj).sum() if need_weights else 0)
            loss.backward()
            grads.append(grads_of(module, inputs))
        assert grads[0].keys() == grads[1].keys()
        for name in grads[0]:
            close(grads[1][name], grads[0][name], atol=1e-4, rtol=1e-4, msg=f"grad of {name}")
        zero_grads(ours, inputs)

        ref.eval(), ours.eval()
        with torch.no_grad():
            (out_r, w_r), (out_o, w_o) = run_both(ref, ours, inputs, attn_mask, kpm, need_weights, average, is_causal)
        close(out_o, out_r, msg="eval output")
        if need_weights:
            close(w_o, w_r, msg="eval weights")


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("cfg,batch_first,mode,mask", list(grid()))
def test_parity_with_torch(cfg, batch_first, mode, mask):
    parity_case(cfg, batch_first, mode, mask)


def parity_case(cfg: str, batch_first: bool, mode: str, mask: str) -> None:
    kw = dict(CONFIGS[cfg], batch_first=batch_first)
    ref, ours = make_pair(**kw)
    inputs = make_inputs(mode, batch_first, "kdim" in kw)
    attn_mask, kpm = make_masks(mask, inputs[1].shape[1 if batch_first else 0])
    check_parity(ref, ours, inputs, attn_mask, kpm)


@pytest.mark.parametrize("mask", ["none", "bool2d", "bool3d+kpm_bool"])
def test_parity_covers_torchs_inference_fast_path(monkeypatch, mask):
    """The eval comparison above is against torch's fused inference kernel where it applies."""
    calls = []
    native = torch._native_multi_head_attention

    def spy(*args, **kwargs):
        calls.append(1)
        return native(*args, **kwargs)

    monkeypatch.setattr(torch, "_native_multi_head_attention", spy)
    parity_case("default", True, "self", mask)
    assert len(calls) == len(WEIGHT_MODES)


@pytest.mark.parametrize("cfg", list(CONFIGS))
@pytest.mark.parametrize("batch_first", [False, True])
def test_reverse_state_dict_load(cfg, batch_first):
    ref, ours = make_pair(reverse=True, batch_first=batch_first, **CONFIGS[cfg])
    assert list(ref.state_dict()) == list(ours.state_dict())
    for (n1, p1), (n2, p2) in zip(ref.named_parameters(), ours.named_parameters()):
        assert n1 == n2 and p1.shape == p2.shape
    mode = "cross"
    inputs = make_inputs(mode, batch_first, "kdim" in CONFIGS[cfg])
    attn_mask, kpm = make_masks("bool3d+kpm_bool", S)
    check_parity(ref, ours, inputs, attn_mask, kpm)


@pytest.mark.parametrize("cfg", ["default", "kvdim", "all_extras"])
@pytest.mark.parametrize("mask", ["none", "bool2d", "float3d", "kpm_bool", "bool3d+kpm_bool"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_unbatched_parity(cfg, mask, batch_first):
    kw = dict(CONFIGS[cfg], batch_first=batch_first)
    ref, ours = make_pair(**kw)
    inputs = make_inputs("cross", batch_first, "kdim" in kw, batched=False)
    attn_mask, kpm = make_masks(mask, S, batched=False)
    check_parity(ref, ours, inputs, attn_mask, kpm)
    out, w = ours(*inputs, key_padding_mask=kpm, attn_mask=attn_mask, average_attn_weights=False)
    extra = CONFIGS[cfg].get("add_bias_kv", False) + CONFIGS[cfg].get("add_zero_attn", False)
    assert out.shape == (L, E) and w.shape == (H, L, S + extra)


def test_default_init_and_head_dim():
    m = MultiheadAttention(512, 8)
    assert m.head_dim == 64
    ref = nn.MultiheadAttention(512, 8)
    assert sum(p.numel() for p in m.parameters()) == sum(p.numel() for p in ref.parameters())
    assert (m.in_proj_bias == 0).all() and (m.out_proj.bias == 0).all()
    bound = (6 / (512 + 3 * 512)) ** 0.5  # xavier_uniform on the packed (3E, E) weight, as torch
    assert m.in_proj_weight.abs().max() <= bound


@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_same_seed_same_initial_weights_as_torch(cfg):
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(E, H, **CONFIGS[cfg])
    torch.manual_seed(0)
    ours = MultiheadAttention(E, H, **CONFIGS[cfg])
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), name


# --------------------------------------------------------------------------- improvements over torch


@pytest.mark.parametrize("kind", ["kpm_bool", "kpm_float", "attn_mask_bool", "attn_mask_float3d"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_fully_masked_row_torch_nan_ours_zero(kind, batch_first):
    ref = nn.MultiheadAttention(E, H, batch_first=batch_first)
    ours = MultiheadAttention(E, H, batch_first=batch_first)
    ours.load_state_dict(ref.state_dict())  # fresh init: output biases 0
    x = torch.randn((N, L, E) if batch_first else (L, N, E), requires_grad=True)
    kpm = attn_mask = None
    if kind.startswith("kpm"):
        kpm = torch.zeros(N, L, dtype=torch.bool)
        kpm[1] = True  # batch item 1 has no keys at all
        if kind == "kpm_float":
            kpm = torch.zeros(N, L).masked_fill(kpm, float("-inf"))
        dead = torch.zeros(N, L, dtype=torch.bool)
        dead[1] = True
    else:
        attn_mask = torch.zeros(L, L, dtype=torch.bool)
        attn_mask[2] = True  # query 2 sees nothing
        if kind == "attn_mask_float3d":
            attn_mask = torch.zeros(N * H, L, L).masked_fill(attn_mask, float("-inf"))
        dead = torch.zeros(N, L, dtype=torch.bool)
        dead[:, 2] = True
    dead_out = dead if batch_first else dead.T  # index into the output layout

    out_r, w_r = ref(x, x, x, key_padding_mask=kpm, attn_mask=attn_mask, need_weights=True)
    assert torch.isnan(out_r[dead_out]).all(), "torch no longer gives NaN here?"

    for mode in ("train", "eval"):
        getattr(ours, mode)()
        out, w = ours(x, x, x, key_padding_mask=kpm, attn_mask=attn_mask, need_weights=True)
        assert torch.isfinite(out).all() and torch.isfinite(w).all()
        assert (out[dead_out] == 0).all()
        assert (w[dead] == 0).all()
        # The live rows are torch's.
        close(out[~dead_out], out_r[~dead_out])
        close(w[~dead], w_r[~dead])
        ours.zero_grad()
        x.grad = None
        (out.sum() + w.sum()).backward()
        assert torch.isfinite(x.grad).all()
        for name, p in ours.named_parameters():
            assert torch.isfinite(p.grad).all(), name
    with torch.no_grad():
        out, _ = ours.eval()(x, x, x, key_padding_mask=kpm, attn_mask=attn_mask, need_weights=False)
    assert (out[dead_out] == 0).all()


@pytest.mark.parametrize("batch_first", [False, True])
def test_fully_masked_row_outputs_zero_even_with_an_output_bias(batch_first):
    """Dead rows get output 0 on every path, also with a non-zero out_proj.bias: torch's fused
    (need_weights=False) path returns W_O·0 + b_O = b_O there, its weights path NaN. Live rows
    equal torch's."""
    ref, ours = make_pair(batch_first=batch_first)  # random, non-zero biases
    assert ours.out_proj.bias.abs().min() > 0
    x = torch.randn((N, L, E) if batch_first else (L, N, E), requires_grad=True)
    kpm = torch.zeros(N, L, dtype=torch.bool)
    kpm[0] = True
    dead = (slice(None), 0) if not batch_first else (0,)
    live = (slice(None), slice(1, None)) if not batch_first else (slice(1, None),)
    with torch.no_grad():
        theirs, _ = ref(x, x, x, key_padding_mask=kpm, need_weights=False)
        close(theirs[dead], ref.out_proj.bias.expand(L, E))
        assert torch.isnan(ref(x, x, x, key_padding_mask=kpm, need_weights=True)[0][dead]).all()
    for nw in (False, True):
        out, _ = ours(x, x, x, key_padding_mask=kpm, need_weights=nw)
        assert (out[dead] == 0).all()
        close(out[live], theirs[live])
        grads = torch.autograd.grad(out.sum(), [x, *ours.parameters()])
        assert all(torch.isfinite(g).all() for g in grads)
        assert (
            grads[1 + [n for n, _ in ours.named_parameters()].index("out_proj.bias")] == (N - 1) * L
        ).all()  # the dead rows add nothing to the bias gradient


def causal_mask(n_q, n_k):
    return torch.ones(n_q, n_k, dtype=torch.bool).triu(1)


@pytest.mark.parametrize("cfg", ["default", "bias_kv", "zero_attn", "all_extras"])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("need_weights", [False, True])
def test_is_causal_without_mask_equals_explicit_causal_mask(cfg, batch_first, need_weights):
    kw = dict(CONFIGS[cfg], batch_first=batch_first)
    ref, ours = make_pair(**kw)
    inputs = make_inputs("cross", batch_first, "kdim" in kw)
    with pytest.raises(RuntimeError):
        ref(*inputs, is_causal=True)  # torch needs attn_mask for its is_causal hint
    causal = causal_mask(L, S)
    out, w = ours(*inputs, is_causal=True, need_weights=need_weights)
    out_explicit, w_explicit = ours(*inputs, attn_mask=causal, need_weights=need_weights)
    out_r, w_r = ref(*inputs, attn_mask=causal, need_weights=need_weights)
    close(out, out_explicit)
    close(out, out_r)
    if need_weights:
        close(w, w_explicit)
        close(w, w_r)


@pytest.mark.parametrize("kind", ["bool2d", "float3d", "kpm_bool"])
@pytest.mark.parametrize("need_weights", [False, True])
def test_is_causal_with_a_mask_combines_both(kind, need_weights):
    ref, ours = make_pair()
    inputs = make_inputs("self", False, False)
    g = torch.Generator().manual_seed(3)
    # Block key 0 for some queries: combined with causal, query 0 of those is dead (kept finite).
    if kind == "bool2d":
        mask, kpm = torch.rand(L, L, generator=g) < 0.4, None
        combined = mask | causal_mask(L, L)
    elif kind == "float3d":
        blocked = torch.rand(N * H, L, L, generator=g) < 0.4
        mask, kpm = torch.randn(N * H, L, L, generator=g).masked_fill(blocked, float("-inf")), None
        combined = mask.masked_fill(causal_mask(L, L), float("-inf"))
    else:
        mask, kpm = None, torch.rand(N, L, generator=g) < 0.4
        kpm[:, 0] = False
        combined = causal_mask(L, L)
    out, w = ours(*inputs, attn_mask=mask, key_padding_mask=kpm, is_causal=True, need_weights=need_weights)
    out_c, w_c = ours(*inputs, attn_mask=combined, key_padding_mask=kpm, need_weights=need_weights)
    close(out, out_c)
    assert torch.isfinite(out).all()
    if need_weights:
        close(w, w_c)
    # Where torch is finite it agrees with the combined mask.
    out_r, _ = ref(*inputs, attn_mask=combined, key_padding_mask=kpm, need_weights=True)
    finite = torch.isfinite(out_r)
    close(out[finite], out_r[finite])
    if mask is not None:
        # Neither mask alone.
        assert not torch.allclose(out, ours(*inputs, attn_mask=mask, key_padding_mask=kpm)[0], atol=1e-4)
        assert not torch.allclose(out, ours(*inputs, is_causal=True, key_padding_mask=kpm)[0], atol=1e-4)


@pytest.mark.parametrize("cfg", ["default", "kvdim", "all_extras"])
def test_train_and_eval_agree_without_dropout(cfg):
    ours = randomize_(MultiheadAttention(E, H, dropout=0.0, **CONFIGS[cfg]))
    inputs = make_inputs("cross", False, "kdim" in CONFIGS[cfg])
    attn_mask, kpm = make_masks("bool3d+kpm_bool", S)
    for nw in (False, True):
        train = ours.train()(*inputs, attn_mask=attn_mask, key_padding_mask=kpm, need_weights=nw)
        ev = ours.eval()(*inputs, attn_mask=attn_mask, key_padding_mask=kpm, need_weights=nw)
        close(train[0], ev[0])
    # Dropout acts in training only.
    drop = MultiheadAttention(E, H, dropout=0.5, **CONFIGS[cfg])
    drop.load_state_dict(ours.state_dict())
    close(drop.eval()(*inputs)[0], ours.eval()(*inputs)[0])
    torch.manual_seed(0)
    assert not torch.allclose(drop.train()(*inputs)[0], ours(*inputs)[0], atol=1e-3)


# --------------------------------------------------------------------------- errors


def raises(match_all, fn, *args, **kwargs):
    with pytest.raises(ValueError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    for s in match_all:
        assert s in msg, f"{s!r} not in {msg!r}"


def test_constructor_errors():
    raises(["embed_dim", "10", "num_heads=3"], MultiheadAttention, 10, 3)
    raises(["dropout"], MultiheadAttention, 8, 2, dropout=1.0)
    raises(["embed_dim"], MultiheadAttention, 0, 2)


@pytest.mark.parametrize("batch_first", [False, True])
def test_input_errors(batch_first):
    m = MultiheadAttention(E, H, kdim=KDIM, vdim=VDIM, batch_first=batch_first)

    def shape(seq, dim, n=N):
        return (n, seq, dim) if batch_first else (seq, n, dim)

    q, k, v = torch.randn(shape(L, E)), torch.randn(shape(S, KDIM)), torch.randn(shape(S, VDIM))
    raises(["query", f"{E}", "6", str(shape(L, 6))], m, torch.randn(shape(L, 6)), k, v)
    raises(["key", f"{KDIM}", f"{E}", str(shape(S, E))], m, q, torch.randn(shape(S, E)), v)
    raises(["value", f"{VDIM}", f"{KDIM}"], m, q, k, torch.randn(shape(S, KDIM)))
    raises(["key", str(N), str(shape(S, KDIM, n=N + 1))], m, q, torch.randn(shape(S, KDIM, n=N + 1)), v)
    raises(["value", str(S), str(shape(S + 1, VDIM))], m, q, k, torch.randn(shape(S + 1, VDIM)))
    raises(["query", "(4,)"], m, torch.randn(4), k, v)
    raises(["key", str(tuple(q.shape)), "(5, 5)"], m, q, torch.randn(5, 5), v)
    for bad in [(L, S + 1), (S, L), (N, L, S), (N * H, L, S, 1), (1, L, S)]:
        raises(
            ["attn_mask", str((L, S)), str((N * H, L, S)), str(bad)],
            m,
            q,
            k,
            v,
            attn_mask=torch.zeros(bad, dtype=torch.bool),
        )
    for bad in [(N, S + 1), (N + 1, S), (S,), (N, 1, S)]:
        raises(
            ["key_padding_mask", str((N, S)), str(bad)], m, q, k, v, key_padding_mask=torch.zeros(bad, dtype=torch.bool)
        )
    raises(["attn_mask", "int64"], m, q, k, v, attn_mask=torch.zeros(L, S, dtype=torch.long))


def test_unbatched_input_errors():
    m = MultiheadAttention(E, H)
    x = torch.randn(L, E)
    raises(
        ["key_padding_mask", str((L,)), str((1, L))], m, x, x, x, key_padding_mask=torch.zeros(1, L, dtype=torch.bool)
    )
    raises(
        ["attn_mask", str((L, L)), str((H, L, L)), str((H + 1, L, L))],
        m,
        x,
        x,
        x,
        attn_mask=torch.zeros(H + 1, L, L, dtype=torch.bool),
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cfg", ["default", "all_extras"])
@pytest.mark.parametrize("need_weights", [False, True])
def test_cuda_matches_cpu(cfg, need_weights):
    ours = randomize_(MultiheadAttention(E, H, **CONFIGS[cfg]))
    inputs = make_inputs("cross", False, "kdim" in CONFIGS[cfg])
    attn_mask, kpm = make_masks("bool3d+kpm_bool", S)
    kw = dict(attn_mask=attn_mask, key_padding_mask=kpm, need_weights=need_weights, is_causal=True)
    out, w = ours(*inputs, **kw)
    cuda = MultiheadAttention(E, H, **CONFIGS[cfg]).cuda()
    cuda.load_state_dict(ours.state_dict())
    out_c, w_c = cuda(
        *(t.detach().cuda() for t in inputs),
        **{n: m.cuda() if isinstance(m, torch.Tensor) else m for n, m in kw.items()},
    )
    close(out_c.cpu(), out, atol=1e-4, rtol=1e-4)
    if need_weights:
        close(w_c.cpu(), w, atol=1e-4, rtol=1e-4)
    # is_causal alone: the causal mask is built on the inputs' device.
    out_c, _ = cuda(*(t.detach().cuda() for t in inputs), is_causal=True, need_weights=need_weights)
    close(out_c.cpu(), ours(*inputs, is_causal=True, need_weights=need_weights)[0], atol=1e-4, rtol=1e-4)


# A dropout rate above 0 takes the CPU training path (heads projected transposed, explicit kernels)
# but drops nothing: 1 - 1e-9 and 1 / (1 - 1e-9) are 1.0 in float32, so torch at dropout 0 is the
# reference for outputs and every gradient.
NO_DROP = 1e-9


@pytest.mark.parametrize("kernel", ["explicit", "autograd"])
@pytest.mark.parametrize(
    "kw",
    [
        {"batch_first": True},
        {"batch_first": False},
        {"batch_first": True, "kdim": KDIM, "vdim": VDIM},
        {"batch_first": False, "bias": False, "add_bias_kv": True, "add_zero_attn": True},
        {"batch_first": True, "add_bias_kv": True},
    ],
    ids=str,
)
@pytest.mark.parametrize("inputs", ["self", "shared-kv", "distinct"])
def test_the_training_path_with_dropout_matches_torch_in_outputs_and_gradients(kernel, kw, inputs):
    from attnfuse.nn import kernels

    if inputs != "distinct" and "kdim" in kw:
        pytest.skip("kdim/vdim differ from embed_dim: inputs of other sizes")
    ref, ours = make_pair(**kw)
    ours.dropout = NO_DROP
    ref.train(), ours.train()
    g = torch.Generator().manual_seed(0)
    shape = (lambda n, length, e: (n, length, e)) if kw["batch_first"] else (lambda n, length, e: (length, n, e))
    q = torch.randn(shape(N, L, E), generator=g)
    k = torch.randn(shape(N, S, ours.kdim), generator=g)
    v = torch.randn(shape(N, S, ours.vdim), generator=g)
    src_len = L if inputs == "self" else S
    kpm = torch.zeros(N, src_len, dtype=torch.bool)
    kpm[1, 2:] = True
    mask = torch.zeros(L, src_len, dtype=torch.bool)
    mask[0, 1] = True
    results = []
    for module in (ref, ours):
        x = q.clone().requires_grad_()
        if inputs == "self":
            args = (x, x, x)
        elif inputs == "shared-kv":
            kv = k[..., :E].clone().requires_grad_()
            args = (x, kv, kv)
        else:
            args = (x, k.clone().requires_grad_(), v.clone().requires_grad_())
        with kernels.forced(kernel):
            out, _ = module(*args, key_padding_mask=kpm, attn_mask=mask, need_weights=False)
        distinct = list({id(t): t for t in args}.values())
        grads = torch.autograd.grad(out, [*distinct, *module.parameters()], out.detach() + 1)
        results.append((out.detach(), grads))
    close(results[1][0], results[0][0], msg="output")
    for a, b in zip(results[1][1], results[0][1]):
        close(a, b, msg="gradient")


def test_the_training_path_with_dropout_splits_and_merges_heads_without_copies():
    """Batch-first self-attention with dropout through the explicit kernel: no clone, copy_ or cat
    in the forward (the heads are views of transposed projections; the kernel's output, itself
    transposed, merges as a view). Plain ops under autograd split heads alike, and their output
    (N, H, L, hd) merges with one copy."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from attnfuse.nn import kernels

    copies: list[str] = []

    class Copies(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in ("clone", "copy_", "cat", "contiguous"):
                copies.append(str(func))
            return func(*args, **(kwargs or {}))

    mha = MultiheadAttention(30, 5, dropout=0.1, batch_first=True).train()
    x = torch.randn(4, 10, 30, requires_grad=True)
    for kernel, expected in (("explicit", []), ("autograd", ["aten.clone.default"])):
        copies.clear()
        with kernels.forced(kernel), Copies():
            out, _ = mha(x, x, x, need_weights=False)
        assert copies == expected, kernel
        out.sum().backward()
