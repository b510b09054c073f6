"""Training and evaluation: AdamW, gradient clipping, early stopping on the validation metric.

The whole pipeline of ``attnfuse train`` for one seed is :func:`run`:

    split -> standardise (statistics of the training rows only) -> build the model
    -> fit (early stopping on the validation metric, best weights restored)
    -> metrics on train / valid / test

Data sets here are small enough to live on the device as one :class:`Batch`; mini-batches are
index slices of it (no DataLoader, no per-sample Python).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .data.dataset import Batch, MultimodalDataset, Standardizer, iter_batches
from .fusion import FusionModel, build_model, config_from_dict
from .metrics import PRIMARY_METRIC, compute_metrics

__all__ = ["TrainConfig", "RunResult", "run", "fit", "predict", "evaluate", "to_predictions", "model_config"]

LOSSES = ("auto", "cross_entropy", "l1", "mse")


@dataclass
class TrainConfig:
    """Optimisation settings of one run (saved into config.json)."""

    epochs: int = 100
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-2
    clip_grad: float = 1.0
    patience: int = 20  # epochs without validation improvement before stopping
    seed: int = 0
    device: str = "cpu"
    loss: str = "auto"  # classification: cross_entropy; regression: l1 (as MulT/MMSA) or mse
    label_smoothing: float = 0.0  # classification only
    sentiment_metrics: bool = False  # add the MOSI/MOSEI metrics (acc2, acc7, ...) for regression

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')}: expected >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr: expected > 0, got {self.lr}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label-smoothing: expected a value in [0, 1), got {self.label_smoothing}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss: expected one of {LOSSES}, got {self.loss!r}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device: expected 'cpu' or 'cuda', got {self.device!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device: {self.device!r} was asked for but CUDA is not available on this machine")

    def loss_name(self, task: str) -> str:
        if task == "classification":
            if self.loss not in ("auto", "cross_entropy"):
                raise ValueError(f"loss: classification trains with cross_entropy, got {self.loss!r}")
            return "cross_entropy"
        if self.loss == "cross_entropy":
            raise ValueError("loss: regression trains with 'l1' or 'mse', got 'cross_entropy'")
        return "l1" if self.loss == "auto" else self.loss


@dataclass
class RunResult:
    """One trained run: the model (best validation weights), its metrics per split, the history."""

    model: FusionModel
    fusion: str
    standardizer: Standardizer
    metrics: dict[str, dict[str, float]]
    best_epoch: int
    history: list[dict] = field(default_factory=list)


def model_config(fusion: str, data: MultimodalDataset, **overrides) -> dict:
    """The model config (as a dict) that fits ``data``: its modalities and output size."""
    out_dim = data.num_classes if data.task == "classification" else data.target_dim
    values = {"modalities": [asdict(m) for m in data.modalities], "out_dim": out_dim}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return asdict(config_from_dict(fusion, values))  # validated and with defaults filled in


def run(
    data: MultimodalDataset,
    fusion: str,
    model_overrides: dict | None = None,
    train: TrainConfig | None = None,
    split_seed: int | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
) -> RunResult:
    """Split, standardise, build, fit and evaluate one model (deterministic for a seed on CPU).

    Data without a split column is split by ``split_seed`` (default: the training seed) into
    train/valid/test ``fractions``."""
    train = train or TrainConfig()
    splits = data.split_indices(seed=train.seed if split_seed is None else split_seed, fractions=fractions)
    standardizer = Standardizer.fit(data, splits["train"])
    scaled = standardizer.transform(data)
    batches = {name: scaled.to_batch(idx).to(train.device) for name, idx in splits.items()}

    torch.manual_seed(train.seed)
    model = build_model(fusion, model_config(fusion, data, **(model_overrides or {}))).to(train.device)
    best_epoch, history = fit(model, batches["train"], batches["valid"], data.task, train, on_epoch)
    metrics = {name: evaluate(model, batch, data.task, train.sentiment_metrics) for name, batch in batches.items()}
    return RunResult(model, fusion, standardizer, metrics, best_epoch, history)


def fit(
    model: FusionModel,
    train_batch: Batch,
    valid_batch: Batch,
    task: str,
    cfg: TrainConfig,
    on_epoch: Callable[[dict], None] | None = None,
) -> tuple[int, list[dict]]:
    """Train in place; keep the weights of the best validation epoch. Returns (best_epoch, history)."""
    loss_fn = _loss_fn(cfg.loss_name(task), cfg.label_smoothing)
    metric, mode = PRIMARY_METRIC[task]
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)

    best_key, best_state, best_epoch, history = None, None, 0, []
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        total, count = torch.zeros((), device=train_batch.y.device), 0
        for batch in iter_batches(train_batch, cfg.batch_size, shuffle=True, generator=generator):
            loss = loss_fn(model(batch), batch.y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            optimizer.step()
            total += loss.detach() * len(batch)
            count += len(batch)

        valid_out = predict(model, valid_batch)
        valid_loss = loss_fn(valid_out, valid_batch.y).item()
        valid_metrics = compute_metrics(task, _np(valid_batch.y), to_predictions(task, valid_out))
        record = {
            "epoch": epoch,
            "train_loss": total.item() / count,
            "valid_loss": valid_loss,
            f"valid_{metric}": valid_metrics[metric],
        }
        history.append(record)
        # Higher is better for the key; validation loss breaks ties of a coarse metric (accuracy).
        key = (valid_metrics[metric] if mode == "max" else -valid_metrics[metric], -valid_loss)
        if best_key is None or key > best_key:
            best_key, best_epoch = key, epoch
            best_state = copy.deepcopy(model.state_dict())
        if on_epoch is not None:
            on_epoch({**record, "best_epoch": best_epoch})
        if epoch - best_epoch >= cfg.patience or not math.isfinite(record["train_loss"]):
            break

    model.load_state_dict(best_state)
    return best_epoch, history


@torch.no_grad()
def predict(model: FusionModel, batch: Batch, batch_size: int = 1024) -> Tensor:
    """Raw model outputs ``(N, out_dim)`` in eval mode, in chunks."""
    model.eval()
    return torch.cat([model(b) for b in iter_batches(batch, batch_size)], dim=0)


def to_predictions(task: str, outputs: Tensor) -> np.ndarray:
    """Class indices ``(N,)`` for classification; values ``(N,)`` or ``(N, K)`` for regression."""
    if task == "classification":
        return _np(outputs.argmax(dim=-1))
    out = _np(outputs)
    return out[:, 0] if out.shape[1] == 1 else out


def evaluate(model: FusionModel, batch: Batch, task: str, sentiment: bool = False) -> dict[str, float]:
    return compute_metrics(task, _np(batch.y), to_predictions(task, predict(model, batch)), sentiment=sentiment)


def _loss_fn(name: str, label_smoothing: float = 0.0) -> Callable[[Tensor, Tensor], Tensor]:
    if name == "cross_entropy":
        return lambda out, y: F.cross_entropy(out, y, label_smoothing=label_smoothing)

    reduce = F.l1_loss if name == "l1" else F.mse_loss

    def regression_loss(out: Tensor, y: Tensor) -> Tensor:
        # (B, 1) outputs against (B,) targets, or (B, K) against (B, K).
        return reduce(out.squeeze(-1) if y.dim() == 1 else out, y)

    return regression_loss


def _np(t: Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()
