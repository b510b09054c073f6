"""attnfuse.nn.kernels: the choice between the two CPU kernels of attention with dropout.

What is checked: both kernels compute the same function through attend() (outputs, gradients,
dropout statistics, with and without masks); the choice is timed once per problem and process,
falls back to the fixed kernel when timing cannot tell (timings injected) and for small problems,
and is plain ops while a graph is recorded; timing consumes none of the caller's random numbers;
the choices made are recorded in a Trainer's checkpoint and chosen again when it is restored.
Never timings."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from attnfuse.data import MultimodalDataset
from attnfuse.fusion import build_model
from attnfuse.nn import functional as AF
from attnfuse.nn import kernels
from attnfuse.nn.dropout import packed_rate
from attnfuse.training import TrainConfig, Trainer, model_config


@pytest.fixture(autouse=True)
def fresh_choices():
    kernels.clear()
    yield
    kernels.clear()


def qkv(batch=(24, 5), L=50, S=50, E=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*batch, n, E, generator=g, requires_grad=True) for n in (L, S, S)]


def padding(batch, S):
    kpm = torch.zeros(batch[0], S, dtype=torch.bool)
    kpm[1, S // 3 :] = True
    kpm[-1] = True  # a sample with every key padded: dead rows
    return kpm


def run(kernel, q, k, v, masks, p=0.1, seed=7):
    with kernels.forced(kernel):
        out, _ = AF.attend(q, k, v, masks, p, None, False, generator=torch.Generator().manual_seed(seed))
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out) + out.detach())
    return out.detach(), grads


@pytest.mark.parametrize("padded", [False, True], ids=["unmasked", "padded"])
def test_both_kernels_give_the_same_outputs_and_gradients(padded):
    q, k, v = qkv()
    kpm = padding((24, 5), 50) if padded else None
    masks = AF.resolve_masks(None, kpm, False, (24, 5), 50, 50, q)
    out_e, grads_e = run("explicit", q, k, v, masks)
    out_a, grads_a = run("autograd", q, k, v, masks)
    torch.testing.assert_close(out_e, out_a, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_e, grads_a):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if padded:
        assert (out_e[-1] == 0).all() and (out_a[-1] == 0).all()


@pytest.mark.parametrize("kernel", kernels.KERNELS)
def test_both_kernels_drop_at_the_packed_rate(kernel):
    # q = k = 0: every probability is 1/S; v = I: the output is the dropped-out probabilities.
    n, L, S, p = 64, 50, 50, 0.1
    q, k = torch.zeros(n, L, 4, requires_grad=True), torch.zeros(n, S, 4)
    v = torch.eye(S).expand(n, S, S)
    with kernels.forced(kernel):
        a, _ = AF.attend(q, k, v, AF.Masks(None, None), p, 1.0, False, generator=torch.Generator().manual_seed(1))
    rate, count = packed_rate(p), a.numel()
    dropped = (a == 0).double().mean().item()
    assert abs(dropped - rate) < 6 * math.sqrt(rate * (1 - rate) / count)
    kept = a[a != 0].detach()
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / S / (1 - rate)))


def test_the_same_seed_draws_the_same_mask_in_both_kernels():
    q, k, v = (t.detach() for t in qkv())
    masks = AF.Masks(None, None)
    out = {}
    for kernel in kernels.KERNELS:
        with kernels.forced(kernel):
            out[kernel] = AF.attend(q, k, v, masks, 0.5, None, False, generator=torch.Generator().manual_seed(3))[0]
    torch.testing.assert_close(out["explicit"], out["autograd"], rtol=1e-5, atol=1e-6)


def script_timings(monkeypatch, explicit: list[float], autograd: list[float]) -> list[str]:
    """Make _seconds return these per-round times (after an untimed first call of each), for every
    problem timed; returns the log of kernels timed."""
    rounds = {"explicit": [1.0, *explicit], "autograd": [1.0, *autograd]}
    timed: list[str] = []

    def fake(kernel, inputs, g, grad):
        name = "explicit" if kernel.__name__ == "explicit" else "autograd"
        kernel(*inputs, g)  # the candidate still runs: it must accept the inputs it is given
        timed.append(name)
        return rounds[name][(timed.count(name) - 1) % len(rounds[name])]

    monkeypatch.setattr(kernels, "_seconds", fake)
    return timed


def attend_once(q, k, v):
    return AF.attend(q, k, v, AF.Masks(None, None), 0.1, None, False)[0]


@pytest.mark.parametrize(
    ("explicit", "autograd", "expected"),
    [
        ([1.0] * 5, [2.0] * 5, "explicit"),
        ([2.0] * 5, [1.0] * 5, "autograd"),
        ([1.0, 1.0, 2.0, 1.0, 2.0], [1.5] * 5, kernels.FALLBACK),  # wins 3 rounds of 5: noise
        ([1.0] * 5, [1.02] * 5, kernels.FALLBACK),  # wins every round by 2%: below the margin
    ],
    ids=["explicit-faster", "autograd-faster", "noisy", "too-close"],
)
def test_the_first_call_times_both_kernels_and_later_calls_reuse_the_choice(monkeypatch, explicit, autograd, expected):
    timed = script_timings(monkeypatch, explicit, autograd)
    q, k, v = qkv()
    attend_once(q, k, v)
    assert sorted(timed) == ["autograd"] * 6 + ["explicit"] * 6
    assert list(kernels.choices().values()) == [expected]
    timed.clear()
    attend_once(*qkv(batch=(7, 5), seed=1))  # another batch size: the same problem, no new timing
    assert timed == []
    attend_once(*qkv(S=60, seed=2))  # another problem: timed
    assert len(timed) == 12 and len(kernels.choices()) == 2


def test_the_chosen_kernel_is_the_one_that_runs(monkeypatch):
    script_timings(monkeypatch, [2.0] * 5, [1.0] * 5)
    calls = []
    real = AF.explicit_attention
    monkeypatch.setattr(AF, "explicit_attention", lambda *a: calls.append(1) or real(*a))
    q, k, v = qkv()
    attend_once(q, k, v)  # timed: autograd wins
    calls.clear()
    attend_once(q, k, v)
    assert calls == []
    kernels.restore(dict.fromkeys(kernels.choices(), "explicit"))
    attend_once(q, k, v)
    assert calls == [1]


def test_timing_consumes_none_of_the_callers_random_numbers():
    q, k, v = qkv()
    torch.manual_seed(11)
    timed_now = attend_once(q, k, v)  # the first call of this problem: both kernels are timed
    assert kernels.choices()
    torch.manual_seed(11)
    with kernels.forced(kernels.choices()[next(iter(kernels.choices()))]):
        again = attend_once(q, k, v)
    assert torch.equal(timed_now, again)


def test_small_problems_take_the_fallback_and_recorded_graphs_plain_ops_untimed(monkeypatch):
    timed = script_timings(monkeypatch, [2.0] * 5, [1.0] * 5)
    attend_once(*qkv(batch=(2, 2), L=10, S=10))  # 400 score elements
    assert timed == [] and list(kernels.choices().values()) == [kernels.FALLBACK]
    kernels.clear()
    calls = []
    real = AF.explicit_attention
    monkeypatch.setattr(AF, "explicit_attention", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(kernels, "tracing", lambda: True)
    attend_once(*qkv())
    assert timed == [] and calls == [] and kernels.choices() == {}  # nothing recorded for the eager runs


@pytest.mark.parametrize(
    "recorded", [["explicit"], {"50x50x6x6 float32 mask:none grad": "fast"}, {3: "explicit"}], ids=str
)
def test_a_recorded_choice_that_is_not_one_is_refused_whole(recorded):
    kernels.restore({"a": "explicit"})
    with pytest.raises(ValueError, match="kernels: expected"):
        kernels.restore(recorded)
    assert kernels.choices() == {"a": "explicit"}


def test_forced_names_a_kernel():
    with pytest.raises(ValueError, match="kernel: expected one of"), kernels.forced("sdpa"):
        pass


def test_a_trainer_checkpoint_records_the_choices_and_restoring_it_chooses_them_again():
    rng = np.random.default_rng(0)
    data = MultimodalDataset({"a": rng.normal(size=(8, 4, 3)).astype(np.float32)}, rng.normal(size=(8, 1)))
    cfg = TrainConfig(epochs=1)
    trainer = Trainer(build_model("self", model_config("self", data, d_model=8, nhead=2)), "regression", cfg)
    kernels.restore({"50x50x6x6 float32 mask:none grad": "autograd"})
    tensors, meta = trainer.state_dict()
    assert meta["kernels"] == {"50x50x6x6 float32 mask:none grad": "autograd"}
    kernels.clear()
    trainer.load_state_dict(tensors, meta)
    assert kernels.choices() == meta["kernels"]
    del meta["kernels"]  # a checkpoint written before kernels were chosen: nothing to restore
    trainer.load_state_dict(tensors, meta)


def test_a_resumed_run_computes_with_the_kernels_its_checkpoint_chose(monkeypatch):
    """Stop a training after 7 steps, then resume it in a process state where timing would choose
    the other kernel: the resumed run must end bitwise where the run that never stopped ended."""
    from attnfuse.training import Control

    monkeypatch.setattr(kernels, "MIN_WORK", 0)  # time even this small problem
    rng = np.random.default_rng(0)
    data = MultimodalDataset({"a": rng.normal(size=(64, 8, 3)).astype(np.float32)}, np.arange(64) % 2).to_batch()
    cfg = TrainConfig(epochs=2, batch_size=16, seed=4)

    def fresh(winner: str) -> Trainer:
        kernels.clear()
        slow, fast = [2.0] * 5, [1.0] * 5
        script_timings(monkeypatch, *((fast, slow) if winner == "explicit" else (slow, fast)))
        torch.manual_seed(cfg.seed)
        config = {"modalities": [{"name": "a", "dim": 3, "length": 8, "is_sequence": True}], "out_dim": 2,
                  "d_model": 8, "nhead": 2, "num_layers": 1, "dropout": 0.2}  # fmt: skip
        return Trainer(build_model("self", config), "classification", cfg)

    whole = fresh("autograd")
    whole.fit(data, data)
    assert set(kernels.choices().values()) == {"autograd"}
    other = fresh("explicit")
    other.fit(data, data)
    differs = [k for k, v in whole.net.state_dict().items() if not torch.equal(v, other.net.state_dict()[k])]
    assert differs  # the kernels round differently: the choice matters to a bitwise resume

    steps: list = []
    stopped = fresh("autograd")
    with pytest.raises(Exception, match="interrupted"):
        stopped.fit(data, data, control=Control(stop=lambda: len(steps) >= 7 or steps.append(1) or 0,
                                                checkpoint=lambda t: steps.append(t.state_dict())))  # fmt: skip
    tensors, meta = steps[-1]
    resumed = fresh("explicit")  # this process would time the other kernel faster
    resumed.load_state_dict(tensors, meta)
    resumed.fit(data, data)
    assert set(kernels.choices().values()) == {"autograd"}
    assert resumed.history == whole.history
    for k, v in whole.net.state_dict().items():
        assert torch.equal(v, resumed.net.state_dict()[k]), k


@pytest.mark.parametrize("kernel", kernels.KERNELS)
def test_the_environment_variable_pins_the_kernel_untimed_over_a_restored_choice(monkeypatch, kernel):
    other = "autograd" if kernel == "explicit" else "explicit"
    timed = script_timings(monkeypatch, *(([2.0] * 5, [1.0] * 5) if kernel == "explicit" else ([1.0] * 5, [2.0] * 5)))
    q, k, v = qkv()
    monkeypatch.setenv(kernels.ENV, f" {kernel.upper()} ")
    pinned = attend_once(q, k, v)  # timing would choose the other kernel
    assert timed == [] and list(kernels.choices().values()) == [kernel]  # recorded like a timed choice
    kernels.restore(dict.fromkeys(kernels.choices(), other))  # e.g. a checkpoint of another run
    again = attend_once(q, k, v)
    assert list(kernels.choices().values()) == [kernel]
    torch.manual_seed(0)
    with kernels.forced(kernel):
        forced = attend_once(q, k, v)
    torch.manual_seed(0)
    assert torch.equal(attend_once(q, k, v), forced)
    assert pinned.shape == again.shape == forced.shape


def test_the_environment_variable_is_read_once_per_problem_not_at_every_call(monkeypatch):
    reads: list[int] = []
    real = kernels.pinned
    monkeypatch.setattr(kernels, "pinned", lambda: reads.append(1) or real())
    monkeypatch.setenv(kernels.ENV, "autograd")
    q, k, v = qkv()
    for _ in range(3):
        attend_once(q, k, v)
    assert len(reads) == 1 and list(kernels.choices().values()) == ["autograd"]
    kernels.restore({})  # a checkpoint restored: the variable is read again
    attend_once(q, k, v)
    assert len(reads) == 2


@pytest.mark.parametrize("value", ["measure", "", "Measure"])
def test_measure_or_an_empty_environment_variable_times_the_kernels(monkeypatch, value):
    timed = script_timings(monkeypatch, [2.0] * 5, [1.0] * 5)
    monkeypatch.setenv(kernels.ENV, value)
    assert kernels.pinned() is None
    attend_once(*qkv())
    assert len(timed) == 12 and list(kernels.choices().values()) == ["autograd"]


def test_an_unknown_environment_variable_value_is_refused_with_its_name(monkeypatch):
    monkeypatch.setenv(kernels.ENV, "sdpa")
    with pytest.raises(
        ValueError, match=r"ATTNFUSE_ATTENTION_KERNEL: expected one of explicit, autograd, measure, got 'sdpa'"
    ):
        attend_once(*qkv())
    assert kernels.choices() == {}


def test_two_fresh_processes_with_the_variable_set_choose_alike_and_compute_the_same_bits():
    import os
    import subprocess
    import sys

    code = (
        "import torch, hashlib\n"
        "from attnfuse.nn import functional as AF, kernels\n"
        "g = torch.Generator().manual_seed(0)\n"
        "q, k, v = (torch.randn(24, 5, 50, 6, generator=g, requires_grad=True) for _ in range(3))\n"
        "out = AF.attend(q, k, v, AF.Masks(None, None), 0.1, None, False, generator=torch.Generator().manual_seed(1))[0]\n"
        "out.sum().backward()\n"
        "h = hashlib.sha256(out.detach().numpy().tobytes() + q.grad.numpy().tobytes()).hexdigest()\n"
        "print(sorted(kernels.choices().values()), h)\n"
    )
    env = {**os.environ, kernels.ENV: "autograd", "OMP_NUM_THREADS": "1"}
    runs = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
            for _ in range(2)]  # fmt: skip
    assert runs[0] == runs[1] and runs[0].startswith("['autograd']")
