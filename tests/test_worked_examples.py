"""Worked examples of attention, computed by hand and checked against attnfuse.

Scaled dot-product attention is softmax(Q Kᵀ / √d_k) V (Vaswani et al., 2017, eq. 1), with
d_k = d_model / h per head (512 / 8 = 64 in the paper). The examples: self-attention over the
modalities of a sample, text <-> video cross-attention, one query against two keys (unscaled and
scaled), and the 2x2 case X = I, whose scores are the identity but whose weights are not: a
softmax row is never one-hot for finite scores, softmax([1, 0]) = [e/(e+1), 1/(e+1)] ≈
[0.731, 0.269].
"""

from __future__ import annotations

import math

import pytest
import torch

import attnfuse
from attnfuse import MultiheadAttention, scaled_dot_product_attention


def test_self_attention_fusion_over_four_modalities():
    n_modalities, bs, dim = 4, 256, 32
    torch.manual_seed(0)
    modalities = [torch.randn(bs, dim) for _ in range(n_modalities)]
    x = torch.stack(modalities, dim=0)  # (n, bs, dim): the modalities are the "sequence"
    assert x.shape == (4, 256, 32)

    attention = MultiheadAttention(embed_dim=dim, num_heads=4, dropout=0.1)
    outputs, weights = attention(x, x, x)
    assert outputs.shape == (4, 256, 32)
    assert weights.shape == (256, 4, 4)
    fused = outputs.mean(dim=0)
    assert fused.shape == (256, 32)
    torch.testing.assert_close(weights.sum(-1), torch.ones(256, 4))  # pre-dropout probabilities

    attention.eval()
    out_eval, _ = attention(x, x, x)
    ref = torch.nn.MultiheadAttention(embed_dim=dim, num_heads=4, dropout=0.1).eval()
    ref.load_state_dict(attention.state_dict())
    torch.testing.assert_close(out_eval, ref(x, x, x)[0], atol=1e-5, rtol=1e-5)


def test_bidirectional_text_video_cross_attention():
    text_dim = video_dim = 128
    seq_len, bs = 1, 32
    torch.manual_seed(0)
    text = torch.randn(seq_len, bs, text_dim)
    video = torch.randn(seq_len, bs, video_dim)
    text_to_video = MultiheadAttention(text_dim, num_heads=4)
    video_to_text = MultiheadAttention(video_dim, num_heads=4)

    text_attended, w_tv = text_to_video(text, video, video)
    video_attended, w_vt = video_to_text(video, text, text)
    assert text_attended.shape == video_attended.shape == (1, 32, 128)
    assert w_tv.shape == w_vt.shape == (32, 1, 1)
    # One key: all the weight on it.
    torch.testing.assert_close(w_tv, torch.ones(32, 1, 1))

    fused = torch.cat([text_attended, video_attended], dim=0)
    assert fused.shape == (2, 32, 128)
    assert fused.mean(dim=0).shape == (32, 128)


def worked_example():
    q = torch.tensor([[1.0, 2.0]])
    k = torch.tensor([[2.0, 3.0], [1.0, 0.0]])
    return q, k, k.clone()  # V = K


@pytest.mark.parametrize("need_weights", [False, True])
def test_worked_example_unscaled(need_weights):
    q, k, v = worked_example()
    scores = q @ k.T
    assert scores.tolist() == [[8.0, 1.0]]  # 1*2 + 2*3, 1*1 + 2*0
    out, w = scaled_dot_product_attention(q, k, v, scale=1.0, need_weights=True)
    e7 = math.exp(7)
    expected_w = [e7 / (e7 + 1), 1 / (e7 + 1)]
    assert w[0].tolist() == pytest.approx(expected_w, abs=1e-6)
    assert w[0].tolist() == pytest.approx([0.99909, 0.00091], abs=5e-6)
    expected_out = [2 * expected_w[0] + 1 * expected_w[1], 3 * expected_w[0]]
    assert out[0].tolist() == pytest.approx(expected_out, abs=1e-6)
    assert out[0].tolist() == pytest.approx([1.99909, 2.99727], abs=5e-6)
    fused, _ = scaled_dot_product_attention(q, k, v, scale=1.0, need_weights=need_weights)
    torch.testing.assert_close(fused, out)


def test_worked_example_default_scale_is_one_over_sqrt_dk():
    q, k, v = worked_example()
    out, w = scaled_dot_product_attention(q, k, v, need_weights=True)
    expected = torch.softmax(torch.tensor([8.0, 1.0]) / math.sqrt(2), dim=0)
    torch.testing.assert_close(w[0], expected)
    torch.testing.assert_close(out[0], expected @ v)
    assert w[0, 0].item() == pytest.approx(1 / (1 + math.exp(-7 / math.sqrt(2))), abs=1e-6)


def test_self_attention_example_is_not_the_identity():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert torch.equal(x @ x.T, torch.eye(2))  # the scores are the identity ...
    out, w = scaled_dot_product_attention(x, x, x, scale=1.0, need_weights=True)
    a, b = math.e / (math.e + 1), 1 / (math.e + 1)  # ... the weights are softmax of its rows
    torch.testing.assert_close(w, torch.tensor([[a, b], [b, a]]))
    assert w[0].tolist() == pytest.approx([0.7311, 0.2689], abs=5e-5)
    assert w[1].tolist() == pytest.approx([0.2689, 0.7311], abs=5e-5)
    assert not torch.allclose(w, torch.eye(2), atol=0.1)
    torch.testing.assert_close(out, w)  # V = X = I
    assert torch.softmax(torch.tensor([1.0, 0.0]), 0).tolist() == pytest.approx([0.731, 0.269], abs=5e-4)


def test_d_k_of_the_paper():
    # Vaswani et al. (2017), section 3.2.2: h = 8 heads, d_k = d_model / h = 64.
    mha = attnfuse.MultiheadAttention(512, 8)
    assert mha.head_dim == 512 // 8 == 64
    x = torch.randn(3, 1, 512)
    _, w = mha(x, x, x, average_attn_weights=False)
    assert w.shape == (1, 8, 3, 3)
