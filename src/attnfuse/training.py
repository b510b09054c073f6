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
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data.dataset import Batch, MultimodalDataset, Standardizer, iter_batches
from .ensemble import Ensemble
from .fusion import FusionModel, build_model, config_from_dict
from .metrics import PRIMARY_METRIC, compute_metrics, standard_error
from .options import option

__all__ = [
    "TrainConfig",
    "RunResult",
    "run",
    "fit",
    "predict",
    "evaluate",
    "to_predictions",
    "model_config",
    "param_groups",
    "member_seed",
    "target_stats",
]

LOSSES = ("auto", "cross_entropy", "l1", "mse")
METRIC_SETS = ("default", "sentiment")


@dataclass
class TrainConfig:
    """Optimisation settings of one run (saved into config.json). Each field is an option of
    ``attnfuse train`` (see :mod:`attnfuse.options`)."""

    epochs: int = option(100, "Maximum epochs (early stopping on the validation metric).")
    batch_size: int = option(64, "Mini-batch size.")
    lr: float = option(1e-3, "AdamW learning rate.")
    weight_decay: float = option(
        1e-2, "AdamW weight decay, on weight matrices only (not biases, LayerNorm or learned embeddings)."
    )
    clip_grad: float = option(1.0, "Clip the gradient norm to this value (0: no clipping).")
    patience: int = option(20, "Stop after this many epochs without validation improvement.")
    seed: int = option(0, "Random seed (model init, shuffling, and the split when the data has none).")
    device: str = option("auto", "auto (CUDA when available, else CPU), cpu, cuda or cuda:N.")
    loss: str = option(
        "auto",
        "Loss: auto (classification: cross_entropy; regression: mse), l1 (as MulT/MMSA train on sentiment scores) "
        "or mse. Regression selects (early stopping, --fusion auto) on the loss's validation metric: rmse or mae.",
        choices=LOSSES,
    )
    label_smoothing: float = option(0.0, "Classification: label smoothing of the cross-entropy.")
    metrics: str = option("default", "'sentiment' adds the MOSI/MOSEI metrics (acc2, acc7, ...).", choices=METRIC_SETS)
    ensemble: int = option(
        1, "Train this many models from different seeds on the same rows and average their outputs (small data)."
    )

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "patience", "ensemble"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
        for name in ("lr", "weight_decay", "clip_grad"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name}: expected a finite number, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr: expected > 0, got {self.lr}")
        if self.weight_decay < 0 or self.clip_grad < 0:
            name = "weight_decay" if self.weight_decay < 0 else "clip_grad"
            raise ValueError(f"{name}: expected >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing: expected a value in [0, 1), got {self.label_smoothing}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss: expected one of {LOSSES}, got {self.loss!r}")
        if self.metrics not in METRIC_SETS:
            raise ValueError(f"metrics: expected one of {METRIC_SETS}, got {self.metrics!r}")
        self.torch_device()  # checks the device now, not after the data is loaded

    @property
    def sentiment_metrics(self) -> bool:
        return self.metrics == "sentiment"

    def torch_device(self) -> torch.device:
        """The device to train on: ``auto`` is CUDA when available, else the CPU."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device != "cpu" and re.fullmatch(r"cuda(:\d+)?", self.device) is None:
            raise ValueError(f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise ValueError(f"device: {self.device!r} was asked for but CUDA is not available on this machine")
            index = int(self.device.partition(":")[2] or 0)
            if index >= torch.cuda.device_count():
                raise ValueError(f"device: {self.device!r}: this machine has {torch.cuda.device_count()} CUDA devices")
        return torch.device(self.device)

    def check_task(self, task: str, target_dim: int | None = None) -> None:
        """Settings that only fit one task are errors for the other (before any training)."""
        self.loss_name(task)
        if self.label_smoothing and task != "classification":
            raise ValueError("label_smoothing: applies to classification only, the data is regression")
        if self.sentiment_metrics and (task != "regression" or target_dim != 1):
            got = f"{target_dim} targets" if task == "regression" else "class labels"
            raise ValueError(
                f"metrics: 'sentiment' needs one regression target per sample (a score), the data has {got}"
            )

    def loss_name(self, task: str) -> str:
        if task == "classification":
            if self.loss not in ("auto", "cross_entropy"):
                raise ValueError(f"loss: classification trains with cross_entropy, got {self.loss!r}")
            return "cross_entropy"
        if self.loss == "cross_entropy":
            raise ValueError("loss: regression trains with 'l1' or 'mse', got 'cross_entropy'")
        # MSE by default: R² (and a ridge regression's objective) is squared error; measured on
        # small tables it beats L1 (benchmarks/RESULTS.md, "Small data").
        return "mse" if self.loss == "auto" else self.loss

    def selection_metric(self, task: str) -> tuple[str, str]:
        """The validation metric that early stopping, ``--fusion auto``, ``tune`` and the baseline
        verdict select on, and whether higher (``"max"``) or lower is better: accuracy; for
        regression the metric of the loss (mae for l1, rmse for mse)."""
        if task == "classification":
            return PRIMARY_METRIC[task]
        return ("mae" if self.loss_name(task) == "l1" else "rmse"), "min"


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups as nanoGPT makes them: decay the weight matrices of linear maps and attention
    projections; not biases, LayerNorm gains, nor the learned vectors (modality-type embeddings,
    "missing" stand-ins, [CLS]), which have no scale for decay to regularise."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if name.endswith("weight") and p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass
class RunResult:
    """One trained run: the model (best validation weights; an :class:`~attnfuse.ensemble.Ensemble`
    with ``ensemble`` > 1), its metrics per split, the training history (of the first member), the
    rows of each split, and the model's loss on the validation rows and the standard error of its
    validation selection metric (see :func:`attnfuse.metrics.standard_error`), with which
    ``--fusion auto`` compares models."""

    model: FusionModel | Ensemble
    fusion: str
    standardizer: Standardizer
    metrics: dict[str, dict[str, float]]
    best_epoch: int
    history: list[dict] = field(default_factory=list)
    splits: dict[str, np.ndarray] = field(default_factory=dict)
    valid_loss: float = float("nan")
    valid_se: float = float("nan")  # standard error of the validation selection metric


def model_config(fusion: str, data: MultimodalDataset, **overrides) -> dict:
    """The model config (as a dict) that fits ``data``: its modalities and output size."""
    out_dim = data.num_classes if data.task == "classification" else data.target_dim
    values = {"modalities": [asdict(m) for m in data.modalities], "out_dim": out_dim}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return asdict(config_from_dict(fusion, values))  # validated and with defaults filled in


def target_stats(data: MultimodalDataset, rows: np.ndarray) -> dict[str, list[float]]:
    """Regression: the mean and std of each target over ``rows`` (the training rows), as the
    ``target_mean``/``target_std`` of a fusion config; nothing for classification."""
    if data.task != "regression":
        return {}
    y = data.y[rows].reshape(len(rows), -1).astype(np.float64)  # (N_train, K)
    std = y.std(axis=0)
    return {"target_mean": y.mean(axis=0).tolist(), "target_std": np.where(std < 1e-6, 1.0, std).tolist()}


def member_seed(seed: int, k: int) -> int:
    """The seed of member ``k`` of an ensemble trained with ``seed``: member 0 is the single model
    of that seed; the others draw from ``SeedSequence([seed, k])``, so no two runs (``--repeat``
    seeds seed, seed+1, ...) share a member."""
    return seed if k == 0 else int(np.random.SeedSequence([seed, k]).generate_state(1)[0] % 2**31)


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
    train/valid/test ``fractions``. With ``train.ensemble`` K > 1, K models (seeds
    :func:`member_seed`) are fitted on the same rows and their outputs averaged; ``on_epoch``
    records then carry the ``member`` index (always: 0 for a single model)."""
    train = train or TrainConfig()
    splits = data.split_indices(seed=train.seed if split_seed is None else split_seed, fractions=fractions)
    standardizer = Standardizer.fit(data, splits["train"])
    scaled = standardizer.transform(data)
    device = train.torch_device()
    batches = {name: scaled.to_batch(idx).to(device) for name, idx in splits.items()}
    config = model_config(fusion, data, **{**(model_overrides or {}), **target_stats(data, splits["train"])})

    members, fitted = [], []  # fitted: (best_epoch, history) of each member
    for k in range(train.ensemble):
        member_cfg = replace(train, seed=member_seed(train.seed, k))
        torch.manual_seed(member_cfg.seed)
        members.append(build_model(fusion, config).to(device))
        report = None if on_epoch is None else (lambda record, k=k: on_epoch({**record, "member": k}))
        fitted.append(fit(members[k], batches["train"], batches["valid"], data.task, member_cfg, report))
    model = members[0] if train.ensemble == 1 else Ensemble(members)
    metrics = {name: evaluate(model, batch, data.task, train.sentiment_metrics) for name, batch in batches.items()}
    valid_out, valid_y = predict(model, batches["valid"]), batches["valid"].y
    valid_loss = _loss_fn(train.loss_name(data.task), train.label_smoothing, members[0])(valid_out, valid_y).item()
    metric, _ = train.selection_metric(data.task)
    valid_se = standard_error(metric, _np(valid_y), to_predictions(data.task, valid_out))
    best_epoch, history = fitted[0]
    return RunResult(model, fusion, standardizer, metrics, best_epoch, history, splits, valid_loss, valid_se)


def fit(
    model: FusionModel,
    train_batch: Batch,
    valid_batch: Batch,
    task: str,
    cfg: TrainConfig,
    on_epoch: Callable[[dict], None] | None = None,
) -> tuple[int, list[dict]]:
    """Train in place; keep the weights of the best validation epoch. Returns (best_epoch, history)."""
    loss_fn = _loss_fn(cfg.loss_name(task), cfg.label_smoothing, model)
    metric, mode = cfg.selection_metric(task)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
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
def predict(model: FusionModel | Ensemble, batch: Batch, batch_size: int = 1024) -> Tensor:
    """Raw model outputs ``(N, out_dim)`` in eval mode, in chunks."""
    model.eval()
    return torch.cat([model(b) for b in iter_batches(batch, batch_size)], dim=0)


def to_predictions(task: str, outputs: Tensor) -> np.ndarray:
    """Class indices ``(N,)`` for classification; values ``(N,)`` or ``(N, K)`` for regression."""
    if task == "classification":
        return _np(outputs.argmax(dim=-1))
    out = _np(outputs)
    return out[:, 0] if out.shape[1] == 1 else out


def evaluate(model: FusionModel | Ensemble, batch: Batch, task: str, sentiment: bool = False) -> dict[str, float]:
    return compute_metrics(task, _np(batch.y), to_predictions(task, predict(model, batch)), sentiment=sentiment)


def _loss_fn(
    name: str, label_smoothing: float = 0.0, model: FusionModel | None = None
) -> Callable[[Tensor, Tensor], Tensor]:
    if name == "cross_entropy":
        return lambda out, y: F.cross_entropy(out, y, label_smoothing=label_smoothing)

    reduce = F.l1_loss if name == "l1" else F.mse_loss
    # In the units of the standardised targets the model learns (see FusionModel), so that the
    # loss, its gradients and gradient clipping do not depend on the scale of y.
    mean = model.target_mean if model is not None else 0.0
    std = model.target_std if model is not None else 1.0

    def regression_loss(out: Tensor, y: Tensor) -> Tensor:
        # (B, 1) outputs against (B,) targets, or (B, K) against (B, K).
        return reduce(((out - mean) / std).squeeze(-1) if y.dim() == 1 else (out - mean) / std, (y - mean) / std)

    return regression_loss


def _np(t: Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()
