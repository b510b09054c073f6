"""Encoder layers against torch.nn.TransformerEncoderLayer / TransformerEncoder, attention maps,
positional encodings and the feed-forward block."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnfuse
from attnfuse import FeedForward, MultiheadAttention, PositionalEncoding, TransformerEncoder, TransformerEncoderLayer
from helpers import Spy, randomize_

pytestmark = pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")

D, NH, FF, N, S = 8, 2, 16, 3, 5
ATOL = RTOL = 1e-5


def close(a, b, atol=ATOL, rtol=RTOL, msg=""):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"{msg}: {m}")


def causal(n: int) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool).triu(1)


def make_src(batch_first: bool, seed: int = 0, batched: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = ((N, S, D) if batch_first else (S, N, D)) if batched else (S, D)
    return torch.randn(shape, generator=g).requires_grad_()


def make_masks(kind: str, seed: int = 0):
    """(src_mask, src_key_padding_mask, is_causal for torch, is_causal for ours).

    Padding is at the end of each sequence (lengths 5, 3, 1), as torch's nested-tensor path wants.
    """
    g = torch.Generator().manual_seed(50 + seed)
    kpm = torch.arange(S)[None, :] >= torch.tensor([S, 3, 1])[:, None]  # (N, S)
    blocked = torch.rand(S, S, generator=g) < 0.4
    blocked[:, 0] = False
    if kind == "none":
        return None, None, False, False
    if kind == "bool":
        return blocked, None, False, False
    if kind == "float":
        return torch.randn(S, S, generator=g).masked_fill(blocked, float("-inf")), None, False, False
    if kind == "bool3d":
        b3 = torch.rand(N * NH, S, S, generator=g) < 0.4
        b3[..., 0] = False
        return b3, None, False, False
    if kind == "kpm":
        return None, kpm, False, False
    if kind == "bool+kpm":
        return blocked, kpm, False, False
    if kind == "causal":
        # torch's is_causal is a hint that needs the mask itself; ours needs only the flag.
        return causal(S), None, True, True
    if kind == "causal+kpm":
        return causal(S), kpm, True, True
    raise AssertionError(kind)


MASKS = ["none", "bool", "float", "bool3d", "kpm", "bool+kpm", "causal", "causal+kpm"]


def param_grads(module):
    return {n: p.grad for n, p in module.named_parameters()}


def compare_train_and_eval(ref, ours, src, call_ref, call_ours, kpm, batch_first):
    """Outputs and all gradients in train mode (dropout 0); outputs in eval (torch's fast paths)."""
    g = torch.Generator().manual_seed(9)
    ref.train(), ours.train()
    out_r, out_o = call_ref(src), call_ours(src)
    close(out_o, out_r, msg="train output")
    proj = torch.randn(out_r.shape, generator=g)
    grads = []
    for module, out in ((ref, out_r), (ours, out_o)):
        module.zero_grad(set_to_none=True)
        src.grad = None
        (out * proj).sum().backward()
        grads.append({"src": src.grad, **param_grads(module)})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        close(grads[1][name], grads[0][name], atol=1e-4, rtol=1e-4, msg=f"grad of {name}")

    train_r = out_r.detach()
    ref.eval(), ours.eval()
    with torch.no_grad():
        out_r, out_o = call_ref(src), call_ours(src)
    assert torch.isfinite(out_o).all()
    close(out_o, train_r, msg="eval output vs torch's train-mode output")
    if torch.isnan(out_r).any():
        # torch 2.13's CPU fast path returns all-NaN for a float src_mask with -inf entries (even
        # without any fully-masked row); nothing to compare beyond its slow path above.
        return
    if kpm is not None:
        # torch's eval fast path (nested tensors) returns zeros at padded positions: compare the rest.
        keep = ~kpm if batch_first else ~kpm.T
        close(out_o[keep], out_r[keep], msg="eval output")
    else:
        close(out_o, out_r, msg="eval output")


# --------------------------------------------------------------------------- encoder layer


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post", "pre"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["sf", "bf"])
def test_encoder_layer_parity(mask, activation, norm_first, batch_first):
    encoder_layer_parity(mask, activation, norm_first, batch_first)


def encoder_layer_parity(mask: str, activation: str, norm_first: bool, batch_first: bool) -> None:
    kw = dict(dim_feedforward=FF, dropout=0.0, activation=activation, batch_first=batch_first, norm_first=norm_first)
    ref = randomize_(nn.TransformerEncoderLayer(D, NH, **kw))
    ours = TransformerEncoderLayer(D, NH, **kw)
    ours.load_state_dict(ref.state_dict())  # strict
    src = make_src(batch_first)
    src_mask, kpm, causal_r, causal_o = make_masks(mask)
    ours_mask = None if mask.startswith("causal") else src_mask
    compare_train_and_eval(
        ref,
        ours,
        src,
        lambda x: ref(x, src_mask=src_mask, src_key_padding_mask=kpm, is_causal=causal_r),
        lambda x: ours(x, src_mask=ours_mask, src_key_padding_mask=kpm, is_causal=causal_o),
        kpm,
        batch_first,
    )


@pytest.mark.parametrize("mask", ["none", "kpm"])
def test_layer_parity_covers_torchs_inference_fast_path(monkeypatch, mask):
    calls = []
    native = torch._transformer_encoder_layer_fwd

    def spy(*args, **kwargs):
        calls.append(1)
        return native(*args, **kwargs)

    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", spy)
    encoder_layer_parity(mask, "relu", False, True)
    assert calls


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_layer_unbatched(norm_first):
    kw = dict(dim_feedforward=FF, dropout=0.0, norm_first=norm_first)
    ref = randomize_(nn.TransformerEncoderLayer(D, NH, **kw))
    ours = TransformerEncoderLayer(D, NH, **kw)
    ours.load_state_dict(ref.state_dict())
    src = make_src(False, batched=False)
    kpm = torch.tensor([False, False, False, True, True])
    compare_train_and_eval(
        ref,
        ours,
        src,
        lambda x: ref(x, src_key_padding_mask=kpm),
        lambda x: ours(x, src_key_padding_mask=kpm),
        None,
        False,
    )


def test_encoder_layer_need_weights():
    layer = randomize_(TransformerEncoderLayer(D, NH, FF, dropout=0.0)).eval()
    src = make_src(False)
    out, w = layer(src, need_weights=True)
    assert w.shape == (N, NH, S, S)
    close(out, layer(src))
    _, w_mha = layer.self_attn(src, src, src, need_weights=True, average_attn_weights=False)
    close(w, w_mha)


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_layer_same_seed_same_weights_as_torch(norm_first):
    """Parameters are created in torch's order: same names, same order, same seeded initial values."""
    torch.manual_seed(0)
    ref = nn.TransformerEncoderLayer(D, NH, FF, norm_first=norm_first)
    torch.manual_seed(0)
    ours = TransformerEncoderLayer(D, NH, FF, norm_first=norm_first)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert list(ours.state_dict()) == list(ref.state_dict())
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), name
    # So an optimizer's state moves across too (it is keyed by parameter position).
    opt_ref = torch.optim.Adam(ref.parameters())
    ref(make_src(False)).sum().backward()
    opt_ref.step()
    opt = torch.optim.Adam(ours.parameters())
    opt.load_state_dict(opt_ref.state_dict())
    ours.load_state_dict(ref.state_dict())
    for p, q in zip(ours.parameters(), ref.parameters()):
        assert torch.equal(opt.state[p]["exp_avg"], opt_ref.state[q]["exp_avg"])


# --------------------------------------------------------------------------- encoder stack


def make_encoders(norm_first, batch_first, activation="relu", num_layers=3, reverse=False, form="keyword"):
    """torch.nn.TransformerEncoder and ours with the same weights; ours built with the keyword form
    or, like torch's, from one layer (``form="torch"``)."""
    kw = dict(dim_feedforward=FF, dropout=0.0, activation=activation, batch_first=batch_first, norm_first=norm_first)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: "enable_nested_tensor is True, but ... norm_first"
        ref = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(D, NH, **kw), num_layers, norm=nn.LayerNorm(D) if norm_first else None
        )
    if form == "torch":
        norm = nn.LayerNorm(D) if norm_first else None
        ours = TransformerEncoder(TransformerEncoderLayer(D, NH, **kw), num_layers, norm=norm)
    else:
        ours = TransformerEncoder(D, NH, num_layers, **kw)
    if reverse:
        randomize_(ours, 3)
        ref.load_state_dict(ours.state_dict())
    else:
        randomize_(ref, 3)  # every layer different (torch deep-copies one layer)
        ours.load_state_dict(ref.state_dict())  # strict
    return ref, ours


@pytest.mark.parametrize("form", ["keyword", "torch"])
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("norm_first", [False, True], ids=["post", "pre"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["sf", "bf"])
def test_encoder_parity(mask, norm_first, batch_first, form):
    ref, ours = make_encoders(norm_first, batch_first, activation="gelu" if norm_first else "relu", form=form)
    assert list(ours.state_dict()) == list(ref.state_dict())
    src = make_src(batch_first, seed=1)
    src_mask, kpm, causal_r, causal_o = make_masks(mask, seed=1)
    ours_mask = None if mask.startswith("causal") else src_mask
    compare_train_and_eval(
        ref,
        ours,
        src,
        lambda x: ref(x, mask=src_mask, src_key_padding_mask=kpm, is_causal=causal_r),
        lambda x: ours(x, mask=ours_mask, src_key_padding_mask=kpm, is_causal=causal_o),
        kpm,
        batch_first,
    )


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_reverse_load_and_final_norm(norm_first):
    ref, ours = make_encoders(norm_first, True, reverse=True)
    assert list(ref.state_dict()) == list(ours.state_dict())
    assert (ours.norm is not None) == norm_first  # pre-norm gets a final LayerNorm by default
    src = make_src(True)
    close(ours.eval()(src), ref.eval()(src))
    # final_norm=False with pre-norm matches torch without a norm.
    plain = TransformerEncoder(D, NH, 3, FF, dropout=0.0, batch_first=True, norm_first=True, final_norm=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_plain = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(D, NH, FF, 0.0, batch_first=True, norm_first=True), 3
        )
    randomize_(ref_plain)
    plain.load_state_dict(ref_plain.state_dict())
    close(plain.eval()(src), ref_plain.eval()(src))


def test_encoder_causal_with_mask_combines():
    _, ours = make_encoders(False, True)
    ours.eval()
    src = make_src(True)
    blocked = torch.rand(S, S, generator=torch.Generator().manual_seed(0)) < 0.4
    blocked[:, 0] = False
    out = ours(src, mask=blocked, is_causal=True)
    close(out, ours(src, mask=blocked | causal(S)))
    assert not torch.allclose(out, ours(src, mask=blocked), atol=1e-4)
    assert not torch.allclose(out, ours(src, is_causal=True), atol=1e-4)


def test_default_configuration_is_the_papers():
    ours = TransformerEncoder()
    ref = nn.TransformerEncoder(nn.TransformerEncoderLayer(512, 8), 6, enable_nested_tensor=False)
    assert ours.num_layers == len(ours.layers) == 6
    for layer in ours.layers:
        assert layer.self_attn.embed_dim == 512 and layer.self_attn.num_heads == 8
        assert layer.self_attn.head_dim == 64
        assert layer.linear1.in_features == 512 and layer.linear1.out_features == 2048
        assert layer.linear2.out_features == 512
        assert layer.self_attn.dropout == 0.1
        assert layer.dropout.p == layer.dropout1.p == layer.dropout2.p == 0.1
        assert layer.norm_first is False and layer.activation is F.relu
        assert layer.batch_first is False
    assert ours.norm is None
    n_ours = sum(p.numel() for p in ours.parameters())
    assert n_ours == sum(p.numel() for p in ref.parameters())
    assert n_ours == 6 * (4 * 512 * 512 + 4 * 512 + 2 * 512 * 2048 + 2048 + 512 + 4 * 512)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict())  # strict
    with pytest.raises(ValueError, match="num_layers"):
        TransformerEncoder(num_layers=0)


# --------------------------------------------------------------------------- attention maps


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("mask", ["none", "kpm", "causal"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_return_attention(norm_first, mask, mode):
    ref, ours = make_encoders(norm_first, True)
    getattr(ours, mode)(), getattr(ref, mode)()
    src = make_src(True)
    src_mask, kpm, _, causal_o = make_masks(mask)
    ours_mask = None if mask.startswith("causal") else src_mask
    with torch.no_grad():
        out, maps = ours(src, mask=ours_mask, src_key_padding_mask=kpm, is_causal=causal_o, return_attention=True)
        plain = ours(src, mask=ours_mask, src_key_padding_mask=kpm, is_causal=causal_o)
    close(out, plain)
    assert isinstance(maps, list) and len(maps) == ours.num_layers
    # Each map is what the layer's MultiheadAttention (ours and torch's) returns per head for its input.
    x = src.detach()
    with torch.no_grad():
        for i, (w, layer, ref_layer) in enumerate(zip(maps, ours.layers, ref.layers)):
            assert w.shape == (N, NH, S, S)
            inp = layer.norm1(x) if norm_first else x
            mha_kw = dict(
                key_padding_mask=kpm,
                need_weights=True,
                average_attn_weights=False,
                attn_mask=causal(S) if causal_o else None,
            )
            _, w_mha = layer.self_attn(inp, inp, inp, **mha_kw)
            _, w_ref = ref_layer.self_attn(inp, inp, inp, **mha_kw)
            close(w, w_mha, msg=f"layer {i}")
            close(w, w_ref, msg=f"layer {i} vs torch")
            close(w.sum(-1), torch.ones(N, NH, S))
            if kpm is not None:
                assert (w.transpose(-1, -2)[kpm[:, None, :].expand(N, NH, S)] == 0).all()
            x = layer(x, src_key_padding_mask=kpm, is_causal=causal_o)
        if ours.norm is not None:
            x = ours.norm(x)
        close(out, x)


@pytest.mark.parametrize("mask", ["none", "kpm", "causal"])
def test_without_return_attention_the_fused_kernel_is_used(monkeypatch, mask):
    """No weights asked for -> F.scaled_dot_product_attention once per layer and no softmax at all;
    with return_attention=True the explicit softmax runs (so the spies do see that path)."""
    _, ours = make_encoders(False, True)
    src = make_src(True)
    _, kpm, _, causal_o = make_masks(mask)
    sdpa = Spy(F.scaled_dot_product_attention)
    softmaxes = [Spy(torch.softmax), Spy(F.softmax), Spy(torch.Tensor.softmax)]
    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
    monkeypatch.setattr(torch, "softmax", softmaxes[0])
    monkeypatch.setattr(F, "softmax", softmaxes[1])
    monkeypatch.setattr(torch.Tensor, "softmax", softmaxes[2])

    ours(src, src_key_padding_mask=kpm, is_causal=causal_o)
    assert sdpa.calls == ours.num_layers
    assert sum(s.calls for s in softmaxes) == 0

    sdpa.calls = 0
    ours(src, src_key_padding_mask=kpm, is_causal=causal_o, return_attention=True)
    assert sum(s.calls for s in softmaxes) == ours.num_layers
    assert sdpa.calls == 0


# --------------------------------------------------------------------------- positional encoding


def test_sinusoidal_positional_encoding_matches_the_formula():
    d = 6
    pe = PositionalEncoding(d, max_len=50)
    assert list(pe.parameters()) == []
    table = pe(torch.zeros(50, 1, d))[:, 0]  # x + PE with x = 0
    # Hand-computed: PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos(same).
    expected = {
        (0, 0): 0.0,
        (0, 1): 1.0,
        (0, 4): 0.0,
        (0, 5): 1.0,
        (1, 0): math.sin(1.0),
        (1, 1): math.cos(1.0),
        (1, 2): math.sin(1 / 10000 ** (2 / 6)),
        (1, 3): math.cos(1 / 10000 ** (2 / 6)),
        (2, 4): math.sin(2 / 10000 ** (4 / 6)),
        (2, 5): math.cos(2 / 10000 ** (4 / 6)),
        (7, 0): math.sin(7.0),
        (7, 1): math.cos(7.0),
        (49, 2): math.sin(49 / 10000 ** (1 / 3)),
        (49, 3): math.cos(49 / 10000 ** (1 / 3)),
    }
    for (pos, i), value in expected.items():
        assert table[pos, i].item() == pytest.approx(value, abs=1e-6), (pos, i)
    # And the whole table.
    pos = torch.arange(50, dtype=torch.float64)[:, None]
    i = torch.arange(0, d, 2, dtype=torch.float64)
    angle = pos / 10000 ** (i / d)
    full = torch.stack([angle.sin(), angle.cos()], dim=-1).flatten(1)
    close(table, full.float(), atol=1e-6, rtol=0)


def test_positional_encoding_adds_to_input_in_both_layouts_and_odd_dims():
    x = torch.randn(4, 2, 5)
    pe = PositionalEncoding(5, max_len=10)
    out = pe(x)
    table = pe(torch.zeros(10, 1, 5))[:, 0]
    close(out, x + table[:4, None, :])
    assert table[3, 4].item() == pytest.approx(math.sin(3 / 10000 ** (4 / 5)), abs=1e-6)
    bf = PositionalEncoding(5, max_len=10, batch_first=True)
    close(bf(x.transpose(0, 1)), out.transpose(0, 1))


def test_learned_positional_encoding_and_errors():
    pe = PositionalEncoding(8, max_len=16, learned=True)
    params = list(pe.parameters())
    assert len(params) == 1 and params[0].shape == (16, 8) and params[0].requires_grad
    x = torch.randn(5, 2, 8)
    pe(x).sum().backward()
    assert params[0].grad[:5].abs().sum() > 0 and (params[0].grad[5:] == 0).all()
    for module in (pe, PositionalEncoding(8, max_len=16)):
        with pytest.raises(ValueError, match="max_len"):
            module(torch.randn(17, 2, 8))
        with pytest.raises(ValueError, match="x"):
            module(torch.randn(5, 2, 7))
    with pytest.raises(ValueError, match="max_len"):
        PositionalEncoding(8, max_len=4, batch_first=True)(torch.randn(2, 5, 8))


# --------------------------------------------------------------------------- feed-forward


@pytest.mark.parametrize("shape", [(8,), (5, 8), (3, 5, 8), (2, 3, 4, 8)])
def test_feed_forward_shapes(shape):
    ff = FeedForward(8, dim_feedforward=32, dropout=0.0)
    assert ff.linear1.out_features == 32 and ff.linear2.in_features == 32
    x = torch.randn(shape)
    out = ff(x)
    assert out.shape == shape
    close(out, ff.linear2(F.relu(ff.linear1(x))))
    # Position-wise: each position on its own.
    if len(shape) >= 2:
        close(out[..., 0, :], ff(x[..., 0, :]))


def test_feed_forward_activation_and_defaults():
    ff = FeedForward(8)
    assert ff.linear1.out_features == 2048 and ff.dropout.p == 0.1
    g = FeedForward(8, 16, dropout=0.0, activation="gelu")
    x = torch.randn(3, 8)
    close(g(x), g.linear2(F.gelu(g.linear1(x))))
    with pytest.raises(ValueError, match="activation"):
        FeedForward(8, activation="swish")


def test_public_api():
    for name in (
        "scaled_dot_product_attention",
        "MultiheadAttention",
        "PositionalEncoding",
        "FeedForward",
        "TransformerEncoderLayer",
        "TransformerEncoder",
        "CrossAttention",
        "BidirectionalCrossAttention",
    ):
        assert name in attnfuse.__all__ and hasattr(attnfuse, name)
    assert attnfuse.MultiheadAttention is MultiheadAttention


# --------------------------------------------------------------------------- torch's form of the encoder


def test_torch_form_deep_copies_like_torch():
    torch.manual_seed(0)
    ref = nn.TransformerEncoder(nn.TransformerEncoderLayer(D, NH, FF), 3, enable_nested_tensor=False)
    torch.manual_seed(0)
    layer = TransformerEncoderLayer(D, NH, FF)
    ours = TransformerEncoder(layer, 3)
    # The same seed gives the same weights; every layer a copy of the given one (as torch's _get_clones).
    for (name, p), q in zip(ours.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(p, q), name
    assert len({id(m) for m in ours.layers}) == 3 and all(m is not layer for m in ours.layers)
    assert all(p is not q for p, q in zip(ours.layers[0].parameters(), ours.layers[1].parameters()))
    with torch.no_grad():
        layer.linear1.weight.zero_()  # the given layer is not part of the stack
    assert (ours.layers[0].linear1.weight != 0).any()
    assert ours.num_layers == 3 and ours.norm is None
    assert ours.enable_nested_tensor is True and ours.mask_check is True
    kw = TransformerEncoder(encoder_layer=layer, num_layers=2, norm=nn.LayerNorm(D), enable_nested_tensor=False)
    assert kw.num_layers == 2 and isinstance(kw.norm, nn.LayerNorm) and kw.enable_nested_tensor is False


def test_torch_form_with_torchs_own_layers():
    """Any encoder layer module works, as in torch; attention maps need ours."""
    kw = dict(dim_feedforward=FF, dropout=0.0, batch_first=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = nn.TransformerEncoder(nn.TransformerEncoderLayer(D, NH, **kw), 2, enable_nested_tensor=False)
    ours = TransformerEncoder(nn.TransformerEncoderLayer(D, NH, **kw), 2)
    ours.load_state_dict(ref.state_dict())
    src = make_src(True)
    _, kpm, _, _ = make_masks("kpm")
    close(ours(src, src_key_padding_mask=kpm), ref(src, src_key_padding_mask=kpm))
    with pytest.raises(TypeError, match="return_attention"):
        ours(src, return_attention=True)


def test_torch_form_return_attention_and_errors():
    ours = TransformerEncoder(TransformerEncoderLayer(D, NH, FF, dropout=0.0), 2)
    _, maps = ours(make_src(False), return_attention=True)
    assert len(maps) == 2 and maps[0].shape == (N, NH, S, S)
    layer = TransformerEncoderLayer(D, NH, FF)
    for args, kwargs, exc, match in [
        ((layer, 0), {}, ValueError, "num_layers: expected an integer >= 1, got 0"),
        ((layer, 2.0), {}, TypeError, "num_layers: expected an integer"),
        ((layer, 2), {"norm": "layernorm"}, TypeError, "norm: expected an nn.Module or None, got str"),
        ((layer, 2), {"enable_nested_tensor": 1}, TypeError, "enable_nested_tensor: expected a bool"),
        ((layer, 2), {"d_model": 8}, TypeError, "torch's form.*d_model"),
        ((layer,), {}, TypeError, "torch's form.*num_layers"),
    ]:
        with pytest.raises(exc, match=match):
            TransformerEncoder(*args, **kwargs)
