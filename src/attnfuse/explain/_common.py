"""What every explanation method shares: the model's device and name, chunked forward passes
that come back on the CPU, which output is explained, and token labels -> validity."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..checks import check_int
from ..data import Batch, iter_batches
from ..ensemble import Ensemble, WeightedEnsemble
from ..fusion import FUSIONS, FusionModel

__all__ = [
    "model_device",
    "fusion_name",
    "forward",
    "explained_target",
    "token_modality",
    "token_step",
    "token_valid",
    "to_numpy",
]


def model_device(model: FusionModel) -> torch.device:
    """The device of the model's parameters (explanations move each batch there)."""
    return next(model.parameters()).device


def fusion_name(model: FusionModel | Ensemble) -> str:
    """The registry name of the model's fusion ("self", "cross", ...), or its class name; for an
    ensemble, its members' with their count."""
    if isinstance(model, WeightedEnsemble):
        shares = ", ".join(f"{n} {w:.2f}" for n, w in sorted(model.weights.items(), key=lambda t: -t[1]) if w > 0)
        return f"weighted ensemble ({shares})"
    if isinstance(model, Ensemble):
        return f"{fusion_name(model.members[0])} (ensemble of {len(model.members)})"
    return next((k for k, cls in FUSIONS.items() if type(model) is cls), type(model).__name__)


def to_numpy(t: Tensor) -> np.ndarray:
    """A tensor on any device as a CPU numpy array (``.numpy()`` alone fails for CUDA tensors)."""
    return t.detach().cpu().numpy()


@torch.no_grad()
def forward(model: FusionModel, batch: Batch, batch_size: int) -> Tensor:
    """Eval-mode outputs ``(B, out_dim)`` on the CPU, computed chunk by chunk on the model's device."""
    model.eval()
    device = model_device(model)
    return torch.cat([model(chunk.to(device)).cpu() for chunk in iter_batches(batch, batch_size)], dim=0)


def explained_target(task: str, outputs: Tensor, target: int | None) -> np.ndarray:
    """Which output each sample's explanation is about, ``(B,)`` int64.

    Classification: the class the model predicts (the argmax of its logits), unless ``target``
    names a class. Regression: output ``target`` (default 0, the only one for one target).
    """
    n, out_dim = outputs.shape
    if target is not None:
        return np.full(n, check_int("target", target, 0, out_dim - 1), dtype=np.int64)
    if task == "classification":
        return to_numpy(outputs.argmax(dim=-1)).astype(np.int64)
    return np.zeros(n, dtype=np.int64)


def token_modality(label: str) -> str:
    """``"video[3]"`` -> ``"video"``; ``"text"`` -> ``"text"``; ``"[CLS]"`` stays."""
    return label if label.startswith("[") else label.split("[", 1)[0]


def token_step(label: str) -> int:
    """``"video[3]"`` -> 3; a one-token modality (``"text"``) -> 0."""
    return int(label[label.index("[") + 1 : -1]) if label.endswith("]") else 0


def token_valid(labels: list[str], mask: dict[str, Tensor]) -> Tensor:
    """``(B, n)`` bool: whether each labelled token is real for each sample (``mask`` as in
    :class:`Batch`: name -> ``(B, T)`` True = valid). A ``[CLS]`` token is always valid."""
    columns = []
    for label in labels:
        mod = token_modality(label)
        if mod.startswith("["):
            columns.append(torch.ones_like(next(iter(mask.values()))[:, 0]))
        else:
            columns.append(mask[mod][:, token_step(label)])
    return torch.stack(columns, dim=1)
