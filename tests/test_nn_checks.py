"""Argument checks: every constructor of attnfuse.nn refuses wrong types and ranges with an error
that names the argument, the expectation and the value given; inputs whose dtype differs from the
module's parameters are a TypeError naming both dtypes (autocast excepted)."""

from __future__ import annotations

import pytest
import torch

from attnfuse.nn import (
    BidirectionalCrossAttention,
    CrossAttention,
    FeedForward,
    MultiheadAttention,
    PositionalEncoding,
    TransformerEncoder,
    TransformerEncoderLayer,
)

MHA, LAYER, ENC = MultiheadAttention, TransformerEncoderLayer, TransformerEncoder
CROSS, BI, PE, FF = CrossAttention, BidirectionalCrossAttention, PositionalEncoding, FeedForward

# (constructor, args, kwargs, exception, substrings of the message)
BAD_ARGUMENTS = [
    (MHA, (8.0, 2), {}, TypeError, ["embed_dim", "expected an integer", "float 8.0"]),
    (MHA, (True, 2), {}, TypeError, ["embed_dim", "expected an integer", "bool True"]),
    (MHA, (8, "2"), {}, TypeError, ["num_heads", "str '2'"]),
    (MHA, (0, 2), {}, ValueError, ["embed_dim", ">= 1", "got 0"]),
    (MHA, (8, -2), {}, ValueError, ["num_heads", ">= 1", "got -2"]),
    (MHA, (10, 3), {}, ValueError, ["embed_dim", "multiple of num_heads=3", "got 10"]),
    (MHA, (8, 2), {"kdim": 0}, ValueError, ["kdim", ">= 1", "got 0"]),
    (MHA, (8, 2), {"vdim": 4.5}, TypeError, ["vdim", "float 4.5"]),
    (MHA, (8, 2), {"dropout": 1.0}, ValueError, ["dropout", "[0, 1)", "1.0"]),
    (MHA, (8, 2), {"dropout": -0.1}, ValueError, ["dropout", "[0, 1)"]),
    (MHA, (8, 2), {"dropout": float("nan")}, ValueError, ["dropout", "[0, 1)"]),
    (MHA, (8, 2), {"dropout": "0.1"}, TypeError, ["dropout", "expected a float", "str"]),
    (MHA, (8, 2), {"dropout": True}, TypeError, ["dropout", "bool"]),
    (MHA, (8, 2), {"batch_first": 1}, TypeError, ["batch_first", "expected a bool", "int 1"]),
    (MHA, (8, 2), {"bias": "yes"}, TypeError, ["bias", "expected a bool"]),
    (MHA, (8, 2), {"add_bias_kv": None}, TypeError, ["add_bias_kv", "expected a bool"]),
    (LAYER, (8.0, 2), {}, TypeError, ["d_model", "float 8.0"]),
    (LAYER, (8, 3), {}, ValueError, ["d_model", "multiple of nhead=3", "got 8"]),
    (LAYER, (8, 0), {}, ValueError, ["nhead", ">= 1", "got 0"]),
    (LAYER, (8, 2, 0), {}, ValueError, ["dim_feedforward", "got 0"]),
    (LAYER, (8, 2), {"dropout": 1.5}, ValueError, ["dropout", "[0, 1)"]),
    (LAYER, (8, 2), {"layer_norm_eps": 0}, ValueError, ["layer_norm_eps", "> 0", "got 0"]),
    (LAYER, (8, 2), {"layer_norm_eps": float("inf")}, ValueError, ["layer_norm_eps", "finite"]),
    (LAYER, (8, 2), {"norm_first": 0}, TypeError, ["norm_first", "expected a bool"]),
    (LAYER, (8, 2), {"activation": "swish"}, ValueError, ["activation", "'relu', 'gelu' or a callable", "swish"]),
    (ENC, (), {"num_layers": 0}, ValueError, ["num_layers", ">= 1", "got 0"]),
    (ENC, (), {"num_layers": 2.0}, TypeError, ["num_layers", "float 2.0"]),
    (ENC, (), {"d_model": 10, "nhead": 4}, ValueError, ["d_model", "multiple of nhead=4"]),
    (ENC, (), {"final_norm": "yes"}, TypeError, ["final_norm", "expected a bool"]),
    (ENC, (), {"d_model": 8, "foo": 1}, TypeError, ["TransformerEncoder", "keyword form", "foo"]),
    (ENC, (), {"encoder_layer": 8}, TypeError, ["encoder_layer", "nn.Module", "int"]),
    (CROSS, (8, 0, 2), {}, ValueError, ["context_dim", ">= 1"]),
    (CROSS, (8.0, 6, 2), {}, TypeError, ["query_dim", "float 8.0"]),
    (CROSS, (8, 6, 3), {}, ValueError, ["query_dim", "multiple of nhead=3"]),
    (CROSS, (8, 6, 2), {"dim_feedforward": -1}, ValueError, ["dim_feedforward", "got -1"]),
    (CROSS, (8, 6, 2), {"dropout": 2}, ValueError, ["dropout", "[0, 1)"]),
    (CROSS, (8, 6, 2), {"batch_first": "true"}, TypeError, ["batch_first", "expected a bool"]),
    (BI, (8, 6, 4), {}, ValueError, ["dim_b", "multiple of nhead=4", "got 6"]),
    (BI, (8, 6, 0), {}, ValueError, ["nhead", ">= 1"]),
    (BI, (8, 6.0, 2), {}, TypeError, ["dim_b", "float 6.0"]),
    (PE, (0,), {}, ValueError, ["d_model", ">= 1"]),
    (PE, (8,), {"max_len": 10.0}, TypeError, ["max_len", "float 10.0"]),
    (PE, (8,), {"dropout": 1.0}, ValueError, ["dropout", "[0, 1)"]),
    (PE, (8,), {"learned": 1}, TypeError, ["learned", "expected a bool"]),
    (FF, (8,), {"dim_feedforward": 0}, ValueError, ["dim_feedforward", ">= 1"]),
    (FF, ("8",), {}, TypeError, ["d_model", "str"]),
    (FF, (8,), {"dropout": -1.0}, ValueError, ["dropout", "[0, 1)"]),
    (FF, (8,), {"activation": 3}, ValueError, ["activation"]),
]


@pytest.mark.parametrize(
    "cls,args,kwargs,exc,parts", BAD_ARGUMENTS, ids=[f"{c.__name__}-{i}" for i, (c, *_) in enumerate(BAD_ARGUMENTS)]
)
def test_bad_constructor_arguments(cls, args, kwargs, exc, parts):
    with pytest.raises(exc) as info:
        cls(*args, **kwargs)
    for part in parts:
        assert part in str(info.value), f"{part!r} not in {info.value}"


def test_numpy_integers_and_plain_numbers_are_accepted():
    np = pytest.importorskip("numpy")
    m = MultiheadAttention(np.int64(8), np.int32(2), dropout=0, kdim=np.int64(6))
    assert (m.embed_dim, m.num_heads, m.kdim) == (8, 2, 6) and type(m.embed_dim) is int
    TransformerEncoderLayer(8, 2, 16, dropout=np.float64(0.1), layer_norm_eps=1)


def test_input_dtype_must_match_the_parameters():
    x64 = torch.randn(3, 5, 8, dtype=torch.float64)
    cases = [
        (lambda: MultiheadAttention(8, 2)(x64, x64, x64), "query"),
        (lambda: MultiheadAttention(8, 2)(x64.float(), x64, x64), "key"),
        (lambda: TransformerEncoderLayer(8, 2, 16)(x64), "src"),
        (lambda: TransformerEncoder(8, 2, 2, 16)(x64), "src"),
        (lambda: CrossAttention(8, 8, 2, 16)(x64, x64.float()), "x"),
        (lambda: CrossAttention(8, 8, 2, 16)(x64.float(), x64), "context"),
        (lambda: BidirectionalCrossAttention(8, 8, 2, 16)(x64, x64), "x"),
        (lambda: FeedForward(8, 16)(x64), "x"),
    ]
    for call, name in cases:
        with pytest.raises(TypeError) as info:
            call()
        msg = str(info.value)
        assert msg.startswith(f"{name}: expected dtype torch.float32") and "got torch.float64" in msg, msg
    # Matching dtypes are fine, in both directions.
    assert MultiheadAttention(8, 2, dtype=torch.float64)(x64, x64, x64)[0].dtype == torch.float64
    assert TransformerEncoder(8, 2, 2, 16).double()(x64).dtype == torch.float64


def test_autocast_is_not_a_dtype_mismatch():
    layer = TransformerEncoderLayer(8, 2, 16, dropout=0.0)
    x = torch.randn(5, 3, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
