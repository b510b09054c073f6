"""attnfuse.nn.explicit.explicit_attention: the CPU attention-with-dropout path with its own
backward. Oracles: the same function written with plain autograd ops and the same dropout mask
(values and gradients, gradcheck in float64), torch's SDPA without dropout; dropout statistics;
determinism for a seed; masks with fully masked rows."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attnfuse.nn import functional as AF
from attnfuse.nn.dropout import dropout_mask, packed_rate
from attnfuse.nn.explicit import explicit_attention
from attnfuse.nn.masks import merge_masks


def reference(q, k, v, mask, dead, scale, p, seed):
    """softmax(QKᵀ·scale + mask) ⊙ M @ V with plain ops; M drawn as explicit_attention draws it."""
    scores = q @ k.transpose(-2, -1) * scale
    if mask is not None:
        scores = scores + mask
    probs = torch.softmax(scores, dim=-1)
    if dead is not None:
        probs = probs.masked_fill(dead.unsqueeze(-1), 0.0)
    if p > 0.0:
        n = math.prod(q.shape[:-2])
        m = dropout_mask((n,) + probs.shape[-2:], p, dtype=q.dtype, generator=torch.Generator().manual_seed(seed))
        probs = probs * m.view(probs.shape)
    return probs @ v


def ours(q, k, v, mask, dead, scale, p, seed):
    return explicit_attention(q, k, v, mask, dead, scale, p, torch.Generator().manual_seed(seed))


def inputs(batch, L, S, E, Ev, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(*batch, n, e, generator=g, dtype=dtype, requires_grad=True) for n, e in ((L, E), (S, E), (S, Ev))
    ]


def padding_masks(batch, L, S, dtype=torch.float64):
    """A key padding mask with one sample fully padded (dead rows) and an attn_mask that blocks a
    whole query row of another sample, merged as attend() gets them: float mask, dead rows."""
    kpm = torch.zeros(batch[0], S, dtype=torch.bool)
    kpm[0, S // 2 :] = True
    kpm[-1] = True  # every key of the last sample padded: all its rows are dead
    attn = torch.zeros(L, S, dtype=torch.bool)
    attn[1] = True  # query 1 sees nothing in any sample
    attn[2, :2] = True
    mask, dead = merge_masks(attn, kpm, False, batch, L, S, dtype)
    mask = torch.zeros(mask.shape, dtype=dtype).masked_fill_(~mask, float("-inf"))
    return mask, dead


CASES = [
    # (batch, L, S, E, Ev): heads of MulT's width, a cross shape, and one large enough (n·L·S >= 4096)
    # for the packed-bit dropout mask.
    ((2, 3), 5, 7, 4, 6),
    ((3,), 6, 6, 6, 6),
    ((2, 2), 32, 33, 5, 3),
]


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_values_and_gradients_match_plain_ops(case, masked, p):
    batch, L, S, E, Ev = case
    q, k, v = inputs(batch, L, S, E, Ev)
    mask, dead = padding_masks(batch, L, S) if masked else (None, None)
    scale = 0.37
    out = ours(q, k, v, mask, dead, scale, p, 5)
    ref = reference(q, k, v, mask, dead, scale, p, 5)
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)
    if masked:
        assert (out[-1] == 0).all() and (out[..., 1, :] == 0).all()  # dead rows: output 0


@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("case", CASES[:2])
def test_gradcheck(case, p):
    batch, L, S, E, Ev = case
    q, k, v = inputs(batch, L, S, E, Ev, seed=1)
    mask, dead = padding_masks(batch, L, S)
    assert torch.autograd.gradcheck(lambda a, b, c: ours(a, b, c, mask, dead, 0.5, p, 9), (q, k, v))
    assert torch.autograd.gradcheck(lambda a, b, c: ours(a, b, c, None, None, 0.5, p, 9), (q, k, v))


def test_gradcheck_packed_mask_fast_mode():
    q, k, v = inputs((2, 2), 32, 33, 5, 3, seed=2)
    mask, dead = padding_masks((2, 2), 32, 33)
    assert torch.autograd.gradcheck(lambda a, b, c: ours(a, b, c, mask, dead, 0.4, 0.1, 3), (q, k, v), fast_mode=True)


def test_only_the_inputs_that_need_a_gradient_get_one():
    q, k, v = inputs((2,), 4, 5, 3, 3)
    k.requires_grad_(False)
    out = ours(q, k, v, None, None, 1.0, 0.2, 0)
    out.sum().backward()
    assert k.grad is None and q.grad is not None and v.grad is not None


def test_without_dropout_it_is_sdpa():
    q, k, v = (t.detach().float() for t in inputs((4, 5), 50, 50, 6, 6))
    torch.testing.assert_close(
        explicit_attention(q, k, v, None, None, 1 / math.sqrt(6)), F.scaled_dot_product_attention(q, k, v)
    )


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_statistics(p):
    # q = k = 0: every probability is 1/S; v = I: the output is the dropped-out probabilities.
    n, L, S = 64, 50, 50
    q, k = torch.zeros(n, L, 4), torch.zeros(n, S, 4)
    v = torch.eye(S).expand(n, S, S)
    a = explicit_attention(q, k, v, None, None, 1.0, p, torch.Generator().manual_seed(1))
    rate = packed_rate(p)
    dropped = (a == 0).double().mean().item()
    count = a.numel()
    assert abs(dropped - rate) < 6 * math.sqrt(rate * (1 - rate) / count)
    kept = a[a != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / S / (1 - rate)))
    assert abs(a.double().mean().item() - 1 / S) < 6 * math.sqrt(rate / (1 - rate) / count) / S


def test_deterministic_for_a_seed_and_global_generator():
    q, k, v = (t.detach().float().requires_grad_() for t in inputs((24, 5), 50, 50, 6, 6))

    def run(seed):
        torch.manual_seed(seed)
        out = explicit_attention(q, k, v, None, None, 0.4, 0.1)
        return (out, *torch.autograd.grad(out.square().sum(), (q, k, v)))

    first, again, other = run(3), run(3), run(4)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], other[0])


def test_attend_routes_cpu_dropout_here_and_agrees_with_the_weights_path(monkeypatch):
    q, k, v = (t.detach().float() for t in inputs((4, 5), 20, 30, 6, 6))
    kpm = torch.zeros(4, 30, dtype=torch.bool)
    kpm[1, 10:] = True
    kpm[3] = True
    masks = AF.resolve_masks(None, kpm, False, (4, 5), 20, 30, q)
    calls = []
    real = AF.explicit_attention
    monkeypatch.setattr(AF, "explicit_attention", lambda *a: calls.append(1) or real(*a))
    fast, none = AF.attend(q, k, v, masks, 0.2, None, False, generator=torch.Generator().manual_seed(0))
    slow, weights = AF.attend(q, k, v, masks, 0.2, None, True, generator=torch.Generator().manual_seed(0))
    assert calls == [1] and none is None and weights is not None
    torch.testing.assert_close(fast, slow)
    assert (fast[3] == 0).all()


def test_mask_with_gradient_is_refused():
    q, k, v = inputs((2,), 3, 3, 2, 2)
    with pytest.raises(ValueError, match="mask"):
        explicit_attention(q, k, v, torch.zeros(3, 3, requires_grad=True), None, 1.0)
