"""Gradient attribution with Captum: Integrated Gradients and gradient × input, per modality, per
step and per feature.

Integrated Gradients (Sundararajan, Taly & Yan, 2017) attributes f(x) - f(x') to the input
features by integrating the gradient along the straight path from a baseline x' to x:

    IG_i = (x_i - x'_i) · ∫₀¹ ∂f(x' + α (x - x')) / ∂x_i dα

The baseline here is x' = 0 in every feature: the training mean, since features are standardised
with the training split's statistics. IG is *complete*: the attributions sum to f(x) - f(0).
Captum approximates the integral (Gauss-Legendre, ``n_steps`` points) and reports the error of
that sum as the convergence delta, which is kept per sample. Padded steps and absent modalities
are 0 in the input, equal to the baseline, so their attribution is exactly 0.

Gradient × input (x · ∂f/∂x at x, Shrikumar et al., 2016) costs one backward pass instead of
``n_steps``; it is local (no path) and not complete.

The masks are passed to the model unchanged (Captum repeats them along with the path's samples):
only the features move, never which tokens exist.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..checks import check_int
from ..data import Batch, iter_batches
from ..fusion import FusionModel
from ._common import explained_target, forward, model_device, to_numpy

__all__ = [
    "GradientAttribution",
    "gradient_attribution",
    "integrated_gradients",
    "gradient_x_input",
    "GRADIENT_METHODS",
]

GRADIENT_METHODS = {"ig": "Integrated Gradients", "gxi": "gradient × input"}
# Captum's own IG tests require |delta| < 0.005 (200 steps) and < 0.05 for their noise-tunnel
# variants; the looser bound, relative to the output change for outputs larger than 1, is used here.
COMPLETENESS_TOLERANCE = 0.05


@dataclass
class GradientAttribution:
    """Attributions of one output per sample to every input feature.

    method: "ig" or "gxi". modalities: names, in the batch's order. attributions: modality ->
    ``(B, T, D)`` (0 at padded steps and absent modalities). valid: modality -> ``(B, T)`` bool.
    target ``(B,)``: the output explained. output ``(B,)``: f(x) at that output. baseline_output
    ``(B,)``: f(0) (IG only). delta ``(B,)``: Captum's convergence delta, sum of attributions -
    (f(x) - f(0)) (IG only). n_steps: IG's integration points. inputs: modality -> ``(B, T, D)``
    the (standardised) features attributed, x; the baseline is 0, so sign(x) says on which side of
    the baseline each value lies (None when not kept).
    """

    method: str
    modalities: list[str]
    attributions: dict[str, np.ndarray]
    valid: dict[str, np.ndarray]
    target: np.ndarray
    output: np.ndarray
    baseline_output: np.ndarray | None
    delta: np.ndarray | None
    n_steps: int | None
    inputs: dict[str, np.ndarray] | None = None

    def per_modality(self) -> np.ndarray:
        """``(B, M)`` signed attribution summed over each modality's steps and features (for IG:
        each modality's part of f(x) - f(0))."""
        return np.stack([self.attributions[m].sum(axis=(1, 2)) for m in self.modalities], axis=1)

    def per_step(self, modality: str) -> np.ndarray:
        """``(B, T)`` signed attribution of each step (summed over its features)."""
        return self.attributions[modality].sum(axis=2)

    def per_feature(self, modality: str) -> np.ndarray:
        """``(B, D)`` signed attribution of each feature (summed over steps)."""
        return self.attributions[modality].sum(axis=1)

    def share(self) -> np.ndarray:
        """``(M,)`` each modality's share of the attribution mass: Σ_b |per_modality| over samples,
        normalised to sum to 1 (NaN if every attribution is 0)."""
        mass = np.abs(self.per_modality()).sum(axis=0)
        return mass / mass.sum() if mass.sum() > 0 else np.full(len(self.modalities), np.nan)

    def step_share(self, modality: str) -> np.ndarray:
        """``(T,)`` each step's share of the modality's attribution mass over samples (|per-step|)."""
        mass = np.abs(self.per_step(modality)).sum(axis=0)
        return mass / mass.sum() if mass.sum() > 0 else np.full(mass.shape, np.nan)

    def relative_delta(self) -> np.ndarray | None:
        """``(B,)`` |delta| / max(|f(x) - f(0)|, 1): the completeness error on the output's scale."""
        if self.delta is None or self.baseline_output is None:
            return None
        return np.abs(self.delta) / np.maximum(np.abs(self.output - self.baseline_output), 1.0)

    def complete(self, tolerance: float = COMPLETENESS_TOLERANCE) -> bool | None:
        """Whether every sample's relative delta is below ``tolerance`` (None for gradient × input)."""
        rel = self.relative_delta()
        return None if rel is None else bool((rel < tolerance).all())


def gradient_attribution(
    model: FusionModel,
    batch: Batch,
    task: str,
    method: str = "ig",
    *,
    target: int | None = None,
    n_steps: int = 50,
    batch_size: int = 32,
    max_points: int = 512,
) -> GradientAttribution:
    """Attribute the explained output of every sample of ``batch`` (see
    :func:`._common.explained_target`) to its input features with ``method`` ("ig" or "gxi").

    Runs on the model's device, ``batch_size`` samples at a time; IG evaluates ``n_steps`` points
    on each sample's path, at most ``max_points`` (and at least one step of the chunk) per forward
    pass, which bounds its memory. Results come back on the CPU.
    """
    if method not in GRADIENT_METHODS:
        raise ValueError(f"method: expected one of {list(GRADIENT_METHODS)}, got {method!r}")
    check_int("n_steps", n_steps)
    names = list(batch.x)
    full = forward(model, batch, batch_size)  # (B, out_dim), CPU
    targets = explained_target(task, full, target)
    model.eval()

    def f(*tensors: torch.Tensor) -> torch.Tensor:
        # Captum passes the (scaled) features first, then the masks it was given, repeated alike.
        x, mask = tensors[: len(names)], tensors[len(names) :]
        return model(Batch(dict(zip(names, x)), dict(zip(names, mask))))

    attributions, delta, baseline_output = _attribute_in_chunks(
        f, batch, targets, method, model_device(model), n_steps=n_steps, batch_size=batch_size, max_points=max_points
    )
    return GradientAttribution(
        method=method,
        modalities=names,
        attributions=attributions,
        valid={n: to_numpy(batch.mask[n]) for n in names},
        target=targets,
        output=to_numpy(full)[np.arange(len(targets)), targets],
        baseline_output=baseline_output,
        delta=delta,
        n_steps=n_steps if method == "ig" else None,
        inputs={n: to_numpy(batch.x[n]) for n in names},
    )


def _attribute_in_chunks(
    f: Callable[..., torch.Tensor],
    batch: Batch,
    targets: np.ndarray,
    method: str,
    device: torch.device,
    *,
    n_steps: int,
    batch_size: int,
    max_points: int,
) -> tuple[dict[str, np.ndarray], np.ndarray | None, np.ndarray | None]:
    """:func:`gradient_attribution`'s work, ``batch_size`` samples at a time on ``device``:
    modality -> ``(B, T, D)`` attributions of ``f``'s output ``targets`` ``(B,)``, and for IG the
    convergence delta ``(B,)`` and f(0) ``(B,)`` (None for gradient × input), all on the CPU."""
    names = list(batch.x)
    parts: list[tuple[torch.Tensor, ...]] = []
    deltas, baseline_out = [], []
    start = 0
    for chunk in iter_batches(batch, batch_size):
        chunk = chunk.to(device)
        x = tuple(chunk.x[n] for n in names)
        masks = tuple(chunk.mask[n] for n in names)
        t = torch.from_numpy(targets[start : start + len(chunk)]).to(device)
        start += len(chunk)
        attr, delta, at_baseline = _attribute_chunk(f, method, x, masks, t, n_steps, max(max_points, len(chunk)))
        parts.append(tuple(a.detach().cpu() for a in attr))
        if delta is not None:
            deltas.append(delta)
            baseline_out.append(at_baseline)
    attributions = {n: to_numpy(torch.cat([p[i] for p in parts])) for i, n in enumerate(names)}
    if method != "ig":
        return attributions, None, None
    return attributions, to_numpy(torch.cat(deltas)), to_numpy(torch.cat(baseline_out))


def _attribute_chunk(
    f: Callable[..., torch.Tensor],
    method: str,
    x: tuple[torch.Tensor, ...],
    masks: tuple[torch.Tensor, ...],
    target: torch.Tensor,
    n_steps: int,
    points: int,
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None, torch.Tensor | None]:
    """``method``'s attributions of ``f``'s output ``target`` ``(B,)`` for one chunk of features
    ``x`` (one tensor per modality; the attributions likewise), and for IG, which evaluates at most
    ``points`` path points per forward pass, the convergence delta ``(B,)`` and f(0) ``(B,)`` at
    the target on the CPU (None for gradient × input)."""
    from captum.attr import InputXGradient, IntegratedGradients  # here: importing captum takes a while

    if method != "ig":
        attr = InputXGradient(f).attribute(
            tuple(v.clone().requires_grad_() for v in x), target=target, additional_forward_args=masks
        )
        return attr, None, None
    baselines = tuple(torch.zeros_like(v) for v in x)
    attr, delta = IntegratedGradients(f).attribute(
        x,
        baselines=baselines,
        target=target,
        additional_forward_args=masks,
        n_steps=n_steps,
        method="gausslegendre",
        internal_batch_size=points,
        return_convergence_delta=True,
    )
    with torch.no_grad():
        at_baseline = f(*baselines, *masks).gather(1, target[:, None])[:, 0].cpu()
    return attr, delta.detach().cpu(), at_baseline


def integrated_gradients(
    model: FusionModel, batch: Batch, task: str, *, target: int | None = None, n_steps: int = 50, batch_size: int = 32
) -> GradientAttribution:
    """:func:`gradient_attribution` with Integrated Gradients (baseline 0 = the training mean)."""
    return gradient_attribution(model, batch, task, "ig", target=target, n_steps=n_steps, batch_size=batch_size)


def gradient_x_input(
    model: FusionModel, batch: Batch, task: str, *, target: int | None = None, batch_size: int = 32
) -> GradientAttribution:
    """:func:`gradient_attribution` with gradient × input (one backward pass per chunk)."""
    return gradient_attribution(model, batch, task, "gxi", target=target, batch_size=batch_size)
