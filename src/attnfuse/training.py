"""Training and evaluation of one model: AdamW, gradient clipping, early stopping on the validation
metric.

What every model of a run shares is its :class:`Parts`: the run's split (made by its
:class:`~attnfuse.splitplan.SplitPlan`), the standardisation fitted on the training rows, and one
batch source per part. One model is :func:`fit_model`::

    parts = Parts.of(data, split, device)     # standardise: statistics of the training rows only
    model = fit_model(parts, fusion, settings, train_config)
        build the model (regression targets standardised by the training rows' statistics)
        -> Trainer.fit (early stopping on the validation metric, best weights restored)
        -> assess: metrics on train / valid / test

Mini-batches are gathered (and standardised) per step from the dataset's rows, so a
memory-mapped dataset is never loaded whole; no DataLoader, no per-sample Python. An ensemble's
members, ``--fusion auto``'s candidates and ``--repeat``'s runs are each one :func:`fit_model`,
driven by the loops of :mod:`attnfuse.fit`.
"""

from __future__ import annotations

import itertools
import math
import random
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checks import check_float, is_number
from .data import Batch, MultimodalDataset, RowBatches, Standardizer
from .distributed import Dist
from .ensemble import Ensemble, EnsembleSpec, WeightedEnsemble, build_recorded, first_member, weighted_record
from .fusion import FusionModel, build_model, config_from_dict
from .metrics import PRIMARY_METRIC, compute_metrics, standard_error
from .nn import kernels
from .nn.compiling import compile_model
from .options import check_bounds, option, shorten

__all__ = [
    "TrainConfig",
    "TrainedModel",
    "Parts",
    "Trainer",
    "Control",
    "DivergedError",
    "Interrupted",
    "fit_model",
    "predict",
    "evaluate",
    "to_predictions",
    "model_config",
    "param_groups",
    "target_stats",
    "assess",
]

LOSSES = ("auto", "cross_entropy", "l1", "mse")
METRIC_SETS = ("default", "sentiment")
PRECISIONS = ("32", "bf16", "fp16")


@dataclass
class TrainConfig:
    """Optimisation settings of one run (saved into config.json). Each field is an option of
    ``attnfuse train`` (see :mod:`attnfuse.options`)."""

    # Integer bounds: far beyond any useful run, short of what would overflow or never end
    # (an epoch count of 10^23 is a typo; a seed must fit numpy's and torch's generators).
    epochs: int = option(100, "Maximum epochs (early stopping on the validation metric).", bounds=(1, 100_000))
    batch_size: int = option(64, "Mini-batch size.", bounds=(1, 1_000_000))
    lr: float = option(1e-3, "AdamW learning rate.")
    weight_decay: float = option(
        1e-2, "AdamW weight decay, on weight matrices only (not biases, LayerNorm or learned embeddings)."
    )
    clip_grad: float = option(1.0, "Clip the gradient norm to this value (0: no clipping).")
    patience: int = option(20, "Stop after this many epochs without validation improvement.", bounds=(1, 100_000))
    seed: int = option(
        0, "Random seed (model init, shuffling, and the split when the data has none).", bounds=(0, 2**32 - 1)
    )
    device: str = option("auto", "auto (CUDA when available, else CPU), cpu, cuda or cuda:N.")
    threads: int | None = option(
        None,
        "CPU threads of torch (default: the cores other processes leave free, or OMP_NUM_THREADS when set; "
        "see attnfuse.threads). Bagged auto on the CPU: that many processes of one thread train the bags "
        "side by side (attnfuse.workers).",
        bounds=(1, 4096),
    )
    loss: str = option(
        "auto",
        "Loss: auto (classification: cross_entropy; regression: mse), l1 (as MulT/MMSA train on sentiment scores) "
        "or mse. Regression selects (early stopping, --fusion auto) on the loss's validation metric: rmse or mae.",
        choices=LOSSES,
    )
    label_smoothing: float = option(0.0, "Classification: label smoothing of the cross-entropy.")
    metrics: str = option("default", "'sentiment' adds the MOSI/MOSEI metrics (acc2, acc7, ...).", choices=METRIC_SETS)
    precision: str = option(
        "32",
        "Floating point: 32, or mixed precision bf16 (CPU and GPU) or fp16 (GPU only, with loss scaling).",
        choices=PRECISIONS,
    )
    compile: bool = option(
        False,
        "torch.compile the model (a slow first step; faster steps after it on a GPU, on the CPU on some machines).",
    )
    ensemble: int = option(
        1,
        "Train this many models from different seeds on the same rows and average their outputs (small data).",
        bounds=(1, 100),
    )

    def __post_init__(self) -> None:
        check_bounds(self)  # epochs, batch_size, patience, seed, threads, ensemble: the declared ranges
        check_float("lr", self.lr, 0.0, above=True)
        check_float("weight_decay", self.weight_decay, 0.0)
        check_float("clip_grad", self.clip_grad, 0.0)
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing: expected a value in [0, 1), got {self.label_smoothing}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss: expected one of {LOSSES}, got {shorten(self.loss)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {PRECISIONS}, got {shorten(self.precision)}")
        if self.metrics not in METRIC_SETS:
            raise ValueError(f"metrics: expected one of {METRIC_SETS}, got {shorten(self.metrics)}")
        self.torch_device()  # checks the device now, not after the data is loaded

    @property
    def sentiment_metrics(self) -> bool:
        return self.metrics == "sentiment"

    def torch_device(self) -> torch.device:
        """The device to train on: ``auto`` is CUDA when available, else the CPU."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device != "cpu" and re.fullmatch(r"cuda(:\d+)?", self.device) is None:
            raise ValueError(f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {shorten(self.device)}")
        if self.device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise ValueError(f"device: {self.device!r} was asked for but CUDA is not available on this machine")
            index = int(self.device.partition(":")[2] or 0)
            if index >= torch.cuda.device_count():
                raise ValueError(f"device: {self.device!r}: this machine has {torch.cuda.device_count()} CUDA devices")
        return torch.device(self.device)

    def training_device(self) -> torch.device:
        """:meth:`torch_device`, checked for training in ``precision``. fp16 is refused on the CPU:
        most CPUs have no float16 arithmetic, so torch converts to float32 and back (slower than
        float32 alone) while the values keep float16's narrow range, the reason fp16 needs loss
        scaling; bf16 is the CPU's mixed precision. Not checked in ``__post_init__``: a model
        trained in fp16 on a GPU is still loaded and evaluated on the CPU."""
        device = self.torch_device()
        if self.precision == "fp16" and device.type == "cpu":
            why = "no CUDA GPU here" if self.device == "auto" else "device cpu"
            raise ValueError(
                f"precision: fp16 trains on a CUDA GPU only, and this run is on the CPU ({why}); "
                "use bf16 (the CPU's mixed precision) or 32"
            )
        return device

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
class TrainedModel:
    """One trained model: the network (best validation weights; an
    :class:`~attnfuse.ensemble.Ensemble` of members trained on the same rows), the standardiser
    of its inputs, its metrics per part and the history (of the first member). ``note`` says why
    training ended unusually (a diverged loss, with the best weights kept). ``valid_loss``,
    ``valid_se`` and ``valid_pred``: the loss on the validation rows, the standard error of the
    validation selection metric (:func:`attnfuse.metrics.standard_error`) and the predictions,
    with which ``--fusion auto`` compares models.

    A checkpoint keeps a finished model as :meth:`to_dict` (tensors and a JSON record) and
    restores it with :meth:`from_dict`."""

    model: FusionModel | Ensemble
    fusion: str
    standardizer: Standardizer
    metrics: dict[str, dict[str, float]]
    best_epoch: int
    history: list[dict] = field(default_factory=list)
    note: str | None = None
    split: Mapping[str, np.ndarray] | None = None  # the rows of each part (a data.Split)
    valid_loss: float = float("nan")
    valid_se: float = float("nan")
    valid_pred: np.ndarray | None = None  # predictions on the validation rows, (N_valid,) or (N_valid, K)
    # A bagged model (its bags' models averaged): its out-of-fold outputs (N_rows, out_dim) on the
    # run's train + valid rows (valid_rows), each from the bag that did not train on it; its
    # "valid" metrics, valid_pred, valid_loss and valid_se are of these rows.
    valid_outputs: np.ndarray | None = None
    valid_rows: np.ndarray | None = None

    def to_dict(self, predictions: bool = True) -> tuple[dict[str, Tensor], dict]:
        """The tensors (``weights.*``; with ``predictions``, ``valid_pred``) and the record of the rest."""
        tensors = {f"weights.{k}": v for k, v in self.model.state_dict().items()}
        for name in ("valid_pred", "valid_outputs", "valid_rows") if predictions else ():
            value = getattr(self, name)
            if value is not None:
                tensors[name] = torch.from_numpy(np.array(value))  # a copy: valid_pred may view valid_outputs
        record = {
            "fusion": self.fusion,
            "model": asdict(self.model.config),
            **EnsembleSpec.of(self.model).to_dict(),
            **({"weighted": weighted_record(self.model)} if isinstance(self.model, WeightedEnsemble) else {}),
            "metrics": self.metrics,
            "best_epoch": self.best_epoch,
            "history": self.history,
            "note": self.note,
            "standardizer": self.standardizer.to_dict(),
            "valid_loss": self.valid_loss,
            "valid_se": self.valid_se,
        }
        return tensors, record

    @classmethod
    def from_dict(
        cls, tensors: dict[str, Tensor], record: dict, split: Mapping[str, np.ndarray], device: torch.device | str
    ) -> TrainedModel:
        """The model :meth:`to_dict` wrote (checked by :func:`attnfuse.runstate.check_state`),
        trained on ``split``, on ``device``."""
        model = build_recorded(record)
        model.load_state_dict({k.removeprefix("weights."): v for k, v in tensors.items() if k.startswith("weights.")})
        pred, outputs, rows = (tensors.get(k) for k in ("valid_pred", "valid_outputs", "valid_rows"))
        return cls(
            model=model.to(device),
            fusion=record["fusion"],
            standardizer=Standardizer.from_dict(record["standardizer"]),
            metrics=record["metrics"],
            best_epoch=record["best_epoch"],
            history=record["history"],
            note=record["note"],
            split=split,
            valid_loss=_nan_for_none(record["valid_loss"]),
            valid_se=_nan_for_none(record["valid_se"]),
            valid_pred=None if pred is None else pred.numpy(),
            valid_outputs=None if outputs is None else outputs.numpy(),
            valid_rows=None if rows is None else rows.numpy(),
        )


def _nan_for_none(value: float | None) -> float:
    """A number written to JSON (an undefined one as null) read back."""
    return float("nan") if value is None else value


class DivergedError(ValueError):
    """Training diverged (a NaN/inf loss) before any epoch ended with finite weights."""


class Interrupted(Exception):
    """Training stopped at a step boundary because ``Control.stop`` said so (SIGINT/SIGTERM);
    the state was checkpointed first. ``signal`` is the signal number, or 0."""

    def __init__(self, epoch: int, step: int, signal: int = 0) -> None:
        super().__init__(f"interrupted at epoch {epoch + 1}, step {step}")
        self.epoch, self.step, self.signal = epoch, step, signal


@dataclass
class Control:
    """How the training of one model is driven from outside its loop (all optional; the defaults
    train plainly).

    dist: this process's place in a torchrun job (:mod:`attnfuse.distributed`).
    resume: a :meth:`Trainer.state_dict` to continue from (``(tensors, meta)``).
    checkpoint: called with the trainer every ``every`` epochs and when stopping, to save it.
    stop: polled after every step; a signal number (true) stops training at that step boundary.
    """

    dist: Dist = field(default_factory=Dist)
    resume: tuple[dict[str, Tensor], dict] | None = None
    checkpoint: Callable[[Trainer], None] | None = None
    every: int = 1
    stop: Callable[[], int] | None = None


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
    y = np.asarray(data.y[rows]).reshape(len(rows), -1).astype(np.float64)  # (N_train, K)
    std = y.std(axis=0)
    return {"target_mean": y.mean(axis=0).tolist(), "target_std": np.where(std < 1e-6, 1.0, std).tolist()}


@dataclass
class Parts:
    """A run's data as every model of the run sees it: the rows of each part (``split``), the
    standardiser fitted on the training rows, and one batch source per part (``sources``, each
    with ``len()`` and ``select(index) -> Batch``).

    This is where the inputs are standardised, once per run. A source gathers and standardises its
    rows per step (:class:`~attnfuse.data.RowBatches`: a memory-mapped dataset is never loaded
    whole); on CUDA an in-memory dataset's parts are standardised and moved to the GPU here, up
    front (no host-to-device copy per step)."""

    data: MultimodalDataset
    split: Mapping[str, np.ndarray]
    standardizer: Standardizer
    sources: dict[str, RowBatches | Batch]
    fitted_on: np.ndarray | None = None  # the rows of the statistics (inputs, regression targets); None: train

    @classmethod
    def of(
        cls,
        data: MultimodalDataset,
        split: Mapping[str, np.ndarray],
        device: torch.device | str = "cpu",
        *,
        fitted_on: np.ndarray | None = None,
        standardizer: Standardizer | None = None,
    ) -> Parts:
        """``split``'s parts of ``data``, standardised by its training rows' statistics, on ``device``.
        An empty part (the test part of a split column with train and valid rows only) has no
        source: no model is assessed on it, so it has no metrics.

        ``fitted_on``: other rows to take the statistics of the inputs and of the regression
        targets from (the bags of one run share those of its train + valid rows, so that their
        models average into one); ``standardizer``: those statistics, when already fitted."""
        device = torch.device(device)
        if standardizer is None:
            standardizer = Standardizer.fit(data, split["train"] if fitted_on is None else fitted_on)
        up_front = device.type == "cuda" and not data.is_mapped
        sources = {}
        for name, rows in split.items():
            if len(rows) == 0:
                continue
            source = RowBatches(data, rows, standardizer, device)
            sources[name] = source.to_batch() if up_front else source
        return cls(data, split, standardizer, sources, fitted_on)

    @property
    def statistics_rows(self) -> np.ndarray:
        """The rows whose statistics standardise the inputs and the regression targets."""
        return self.split["train"] if self.fitted_on is None else self.fitted_on


def fit_model(
    parts: Parts,
    fusion: str,
    model_overrides: dict | None = None,
    train: TrainConfig | None = None,
    *,
    on_epoch: Callable[[dict], None] | None = None,
    control: Control | None = None,
) -> TrainedModel:
    """Build, fit and assess one model on ``parts`` (deterministic for a seed on the CPU), on the
    device of ``parts``. Regression targets are learned standardised (the training rows' mean and
    std, in the config). ``train.ensemble`` is not looked at here: the loops of
    :mod:`attnfuse.fit` train the members."""
    train = train or TrainConfig()
    train.training_device()  # the settings fit the hardware (fp16 is refused on the CPU)
    control = control or Control()
    data = parts.data
    overrides = {**(model_overrides or {}), **target_stats(data, parts.statistics_rows)}
    torch.manual_seed(train.seed)
    model = build_model(fusion, model_config(fusion, data, **overrides)).to(parts.sources["train"].device)
    trainer = Trainer(model, data.task, train, control.dist)
    if control.resume is not None:
        trainer.load_state_dict(*control.resume)
    trainer.fit(parts.sources["train"], parts.sources["valid"], on_epoch, control)
    metrics, valid_loss, valid_se, valid_pred = assess(model, parts, train, control.dist)
    return TrainedModel(
        model=model,
        fusion=fusion,
        standardizer=parts.standardizer,
        metrics=metrics,
        best_epoch=trainer.best_epoch,
        history=trainer.history,
        note=trainer.note,
        split=parts.split,
        valid_loss=valid_loss,
        valid_se=valid_se,
        valid_pred=valid_pred,
    )


def assess(
    model: FusionModel | Ensemble, parts: Parts, cfg: TrainConfig, dist: Dist | None = None
) -> tuple[dict[str, dict[str, float]], float, float, np.ndarray | None]:
    """A trained model's metrics on every part, its loss on the validation rows, the standard
    error of its validation selection metric and its validation predictions (e.g. for an ensemble
    of :func:`fit_model`'s models)."""
    task, dist = parts.data.task, dist or Dist()
    metrics, valid_loss, valid_se, valid_pred = {}, float("nan"), float("nan"), None
    for name, source in parts.sources.items():
        outputs, targets = _predict(model, source, dist, cfg.precision), source.y  # y: gathered once
        if name == "valid" and len(source):
            metrics[name], valid_loss, valid_se, valid_pred = score_outputs(model, task, outputs, targets, cfg)
        else:
            metrics[name] = compute_metrics(task, _np(targets), to_predictions(task, outputs), cfg.sentiment_metrics)
    return metrics, valid_loss, valid_se, valid_pred


def score_outputs(
    model: nn.Module, task: str, outputs: Tensor, targets: Tensor, cfg: TrainConfig
) -> tuple[dict[str, float], float, float, np.ndarray]:
    """What :func:`assess` measures of validation outputs ``(N, out_dim)`` against ``targets``:
    the metrics, the loss (in ``model``'s units), the standard error of the selection metric and
    the predictions."""
    y, predictions = _np(targets), to_predictions(task, outputs)
    loss = _loss_fn(cfg.loss_name(task), cfg.label_smoothing, first_member(model))
    metrics = compute_metrics(task, y, predictions, sentiment=cfg.sentiment_metrics)
    return (
        metrics,
        loss(outputs, targets).item(),
        standard_error(cfg.selection_metric(task)[0], y, predictions),
        predictions,
    )


class Trainer:
    """The training loop of one model: AdamW, gradient clipping, early stopping on the validation
    metric, mixed precision, torch.compile and DistributedDataParallel as the config asks.

    Its whole state (weights, optimizer, early-stopping state, best weights, every RNG, the
    position inside the epoch) is :meth:`state_dict`, written after any step; a training restored with
    :meth:`load_state_dict` continues bitwise as if it had never stopped (on the CPU).

    With ``dist`` (torchrun), every rank draws the same global batch of ``batch_size`` rows and
    computes the loss of its share; DistributedDataParallel averages the gradients, and the loss of
    each share is weighted so that the average is the global batch's mean: 1 process and N
    processes follow the same optimisation.
    """

    def __init__(self, model: FusionModel, task: str, cfg: TrainConfig, dist: Dist | None = None) -> None:
        self.net, self.task, self.cfg = model, task, cfg
        self.dist = dist or Dist()
        self.device = next(model.parameters()).device
        wrapped: nn.Module = model
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            wrapped = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self.model = compile_model(wrapped, self.device) if cfg.compile else wrapped
        self.optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        self.loss_fn = _loss_fn(cfg.loss_name(task), cfg.label_smoothing, model)
        self.generator = torch.Generator().manual_seed(cfg.seed)  # the shuffling, the same on every rank

        self.epoch = 0  # epochs completed
        self.step = 0  # steps completed in the epoch under way
        self.epoch_rng = self.generator.get_state()  # the shuffling generator as the epoch began
        self.loss_sum = torch.zeros((), device=self.device)  # training loss x rows, this epoch
        self.count = 0
        self.step_losses: list[Tensor] = []  # this epoch's step losses, checked at its end
        self.best_key: tuple[float, float] | None = None
        self.best_epoch = 0
        self.best_state: dict[str, Tensor] | None = None
        self.history: list[dict] = []
        self.note: str | None = None

    # -- the loop --------------------------------------------------------------------------------

    def fit(
        self,
        train: Batch,
        valid: Batch,
        on_epoch: Callable[[dict], None] | None = None,
        control: Control | None = None,
    ) -> None:
        """Train until ``epochs`` or early stopping, then keep the best validation weights.
        ``train``/``valid`` are anything with ``len()`` and ``select(index) -> Batch``."""
        control = control or Control()
        cfg = self.cfg
        while self.epoch < cfg.epochs and self.epoch - self.best_epoch < cfg.patience:
            self.generator.set_state(self.epoch_rng)
            # On the rows' device once per epoch: each step's indices copied there on their own
            # would be a blocking host-to-device copy, a host synchronisation per step.
            order = _on(train, torch.randperm(len(train), generator=self.generator))
            self.net.train()
            for i, index in enumerate(order.split(cfg.batch_size)):
                if i < self.step:
                    continue  # resumed inside this epoch: these steps are done
                self._train_step(train, index)
                self.step = i + 1
                signal = control.stop() if control.stop is not None else 0
                if self.dist.any_true(bool(signal)):
                    if control.checkpoint is not None:
                        control.checkpoint(self)
                    raise Interrupted(self.epoch, self.step, signal)
            if self._end_epoch(valid, on_epoch):
                break  # diverged: the best finite epoch's weights are restored below
            if control.checkpoint is not None and control.every and self.epoch % control.every == 0:
                control.checkpoint(self)
        self.net.load_state_dict(self.best_state)

    def _train_step(self, train: Batch, index: Tensor) -> None:
        """One optimiser step on the global batch ``index`` (row indices on the device ``train``
        selects on, see :func:`_on`). Its loss is kept, and checked for NaN/inf once per epoch (no
        device synchronisation per step)."""
        mine = self.dist.shard(index)
        weight = 1.0
        if self.dist.enabled:
            # Weight this rank's mean loss by its share so that DDP's average of the ranks' gradients
            # is the gradient of the global batch's mean loss. A rank with no row joins with a
            # zero-weighted one (every rank must take part in the gradient all-reduce).
            weight = self.dist.world * mine.numel() / index.numel()
            mine = mine if mine.numel() else index[:1]
        batch = train.select(mine)
        with self._autocast():
            loss = self.loss_fn(self.model(batch), batch.y)
        detached = loss.detach().float()
        self.step_losses.append(detached)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss * weight if self.dist.enabled else loss).backward()
        if self.cfg.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.cfg.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if weight:
            self.loss_sum += detached * len(batch)
            self.count += len(batch)

    def _end_epoch(self, valid: Batch, on_epoch: Callable[[dict], None] | None) -> bool:
        """Validate, keep the best weights, log; True when training diverged in this epoch."""
        metric, mode = self.cfg.selection_metric(self.task)
        outputs, y = self.predict(valid), valid.y  # a RowBatches gathers its y anew on each read
        valid_loss = self.loss_fn(outputs, y).item()
        valid_metrics = compute_metrics(self.task, _np(y), to_predictions(self.task, outputs))
        train_loss = self.loss_sum.item()
        if self.dist.enabled:
            train_loss = sum(self.dist.gather_objects(train_loss))
        self.epoch += 1
        record = {
            "epoch": self.epoch,
            "train_loss": train_loss / max(self._rows_seen(), 1),
            "valid_loss": valid_loss,
            f"valid_{metric}": valid_metrics[metric],
        }
        self.history.append(record)
        # A NaN/inf loss stops training: the weights are NaN/inf, or on their way there.
        diverged = _divergence(torch.stack(self.step_losses), valid_loss, self.epoch, self.cfg.lr)
        if diverged is None:
            # Higher is better for the key; validation loss breaks ties of a coarse metric (accuracy).
            key = (valid_metrics[metric] if mode == "max" else -valid_metrics[metric], -valid_loss)
            if self.best_key is None or key > self.best_key:
                self.best_key, self.best_epoch = key, self.epoch
                self.best_state = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
        elif self.best_state is None:
            raise DivergedError(f"{diverged}; no earlier epoch has finite weights to keep, nothing is saved")
        else:
            record["diverged"] = self.note = diverged
        self.step, self.count, self.step_losses = 0, 0, []
        self.loss_sum = torch.zeros((), device=self.device)
        self.epoch_rng = self.generator.get_state()
        if on_epoch is not None:
            on_epoch({**record, "best_epoch": self.best_epoch})
        return diverged is not None

    def _rows_seen(self) -> int:
        return sum(self.dist.gather_objects(self.count)) if self.dist.enabled else self.count

    def _autocast(self):
        return _autocast(self.device, self.cfg.precision)

    # -- outputs -------------------------------------------------------------------------------

    def predict(self, batch: Batch, batch_size: int = 1024) -> Tensor:
        """Raw outputs ``(N, out_dim)`` in eval mode, float32; under torchrun each rank computes a
        share of the rows and every rank gets all of them (each row is computed once)."""
        return _predict(self.net, batch, self.dist, self.cfg.precision, batch_size)

    # -- state ---------------------------------------------------------------------------------

    def state_dict(self) -> tuple[dict[str, Tensor], dict]:
        """Everything needed to continue bitwise: tensors (for safetensors) and plain values (JSON).
        Under torchrun every rank must call it (the ranks' RNG states are gathered)."""
        tensors = {f"model.{k}": v for k, v in self.net.state_dict().items()}
        if self.best_state is not None:
            tensors.update({f"best.{k}": v for k, v in self.best_state.items()})
        optim = self.optimizer.state_dict()
        for pid, state in optim["state"].items():
            for k, v in state.items():
                tensors[f"optim.{pid}.{k}"] = v if isinstance(v, Tensor) else torch.tensor(v)
        tensors["loop.loss_sum"] = self.loss_sum
        if self.step_losses:
            tensors["loop.step_losses"] = torch.stack(self.step_losses)
        tensors["rng.shuffle"] = self.generator.get_state()
        tensors["rng.epoch"] = self.epoch_rng
        python_rng = {}
        for rank, state in enumerate(self.dist.gather_objects(rng_state())):
            tensors.update({f"rng.rank{rank}.{k}": v for k, v in state["tensors"].items()})
            python_rng[f"rank{rank}"] = state["python"]
        meta = {
            "epoch": self.epoch,
            "step": self.step,
            "count": self.count,
            "best_key": self.best_key,
            "best_epoch": self.best_epoch,
            "history": self.history,
            "optimizer_groups": optim["param_groups"],
            "scaler": self.scaler.state_dict(),
            "world": self.dist.world,
            "python_rng": python_rng,
            "kernels": kernels.choices(),  # the attention kernels timed in this process: chosen again on resume
        }
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, Tensor], meta: dict) -> None:
        """Restore :meth:`state_dict` (this rank's RNG states included). A state that does not fit
        this trainer (its model's tensors, the optimizer's groups and moments) is refused with one
        ``ValueError`` before anything is changed; the rest of the checkpoint's schema is checked
        when it is read (:func:`attnfuse.runstate.check_state`)."""
        if meta["world"] != self.dist.world:
            raise ValueError(
                f"resume: the run was checkpointed with {meta['world']} processes, this job has {self.dist.world}"
            )

        def part(prefix: str) -> dict[str, Tensor]:
            return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

        self._check_state(part, meta)
        kernels.restore(meta.get("kernels", {}))  # checked before it changes anything
        self.net.load_state_dict(part("model."))
        best = part("best.")
        self.best_state = {k: v.to(self.device) for k, v in best.items()} or None
        state: dict[int, dict] = {}
        for key, value in part("optim.").items():
            pid, name = key.split(".", 1)
            state.setdefault(int(pid), {})[name] = value
        self.optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer_groups"]})
        if meta["scaler"]:
            self.scaler.load_state_dict(meta["scaler"])
        self.loss_sum = tensors["loop.loss_sum"].to(self.device)
        self.step_losses = list(tensors.get("loop.step_losses", torch.empty(0)).to(self.device).unbind())
        self.generator.set_state(tensors["rng.shuffle"])
        self.epoch_rng = tensors["rng.epoch"]
        self.epoch, self.step, self.count = meta["epoch"], meta["step"], meta["count"]
        self.best_key = tuple(meta["best_key"]) if meta["best_key"] is not None else None
        self.best_epoch, self.history = meta["best_epoch"], meta["history"]
        rank = f"rank{self.dist.rank}"
        set_rng_state({"tensors": part(f"rng.{rank}."), "python": meta["python_rng"][rank]})

    def _check_state(self, part: Callable[[str], dict[str, Tensor]], meta: dict) -> None:
        """The checkpoint's weights, best weights and optimizer state fit this trainer exactly."""
        expected = {k: (tuple(v.shape), v.dtype) for k, v in self.net.state_dict().items()}
        problems = tensor_mismatches(part("model."), expected, "model.")
        best = part("best.")
        if best or meta["best_key"] is not None:
            problems += tensor_mismatches(best, expected, "best.")
        groups, ours = meta["optimizer_groups"], self.optimizer.state_dict()["param_groups"]
        if len(groups) != len(ours) or any(
            not isinstance(g, dict) or set(g) != set(o) or g["params"] != o["params"] for g, o in zip(groups, ours)
        ):
            problems.append("optimizer_groups: not the groups of this model's optimizer")
        elif any(not _same_kind(g[k], o[k]) for g, o in zip(groups, ours) for k in o):
            problems.append("optimizer_groups: a setting of the wrong type")
        params = dict(enumerate(p for g in self.optimizer.param_groups for p in g["params"]))
        for key, value in part("optim.").items():
            pid, name = key.split(".", 1)
            param = params.get(int(pid))
            if param is None or name not in ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                problems.append(f"optim.{key}: not a state of this model's optimizer")
                continue
            shape = () if name == "step" else tuple(param.shape)
            if tuple(value.shape) != shape or not (value.is_floating_point() or name == "step"):
                problems.append(
                    f"optim.{key}: {value.dtype} of shape {list(value.shape)}, expected shape {list(shape)}"
                )
        scaler = meta["scaler"]
        if scaler and not all(is_number(v, finite=False) for v in scaler.values()):
            problems.append("scaler: expected numbers")
        if problems:
            raise ValueError(f"resume: the checkpoint does not fit this run ({'; '.join(problems[:3])})")


def _same_kind(value: object, ours: object) -> bool:
    """A setting read from JSON has the kind of ours (a tuple comes back as a list)."""
    if ours is None or isinstance(ours, bool):
        return value is None or isinstance(value, bool)
    if isinstance(ours, (int, float)):
        return is_number(value)
    if isinstance(ours, (tuple, list)):
        return isinstance(value, (tuple, list)) and len(value) == len(ours) and all(map(_same_kind, value, ours))
    return isinstance(value, type(ours))


def tensor_mismatches(got: dict[str, Tensor], expected: dict[str, tuple], prefix: str) -> list[str]:
    """What differs between tensors and the ``{name: (shape, dtype)}`` they must be, named."""
    problems = [f"missing {prefix}{k}" for k in expected if k not in got]
    problems += [f"unexpected {prefix}{k}" for k in got if k not in expected]
    problems += [
        f"{prefix}{k}: {v.dtype} of shape {list(v.shape)}, expected {expected[k][1]} of shape {list(expected[k][0])}"
        for k, v in got.items()
        if k in expected and (tuple(v.shape), v.dtype) != expected[k]
    ]
    return problems


def _autocast(device: torch.device, precision: str):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


@torch.no_grad()
def _predict(net: nn.Module, batch: Batch, dist: Dist, precision: str, batch_size: int = 1024) -> Tensor:
    """Raw outputs ``(N, out_dim)`` in eval mode, float32, each row computed once over the ranks."""
    net.eval()
    device = next(itertools.chain(net.parameters(), net.buffers())).device  # a baseline head has buffers only
    rows = _on(batch, dist.shard(torch.arange(len(batch))))
    with _autocast(device, precision):
        parts = [net(batch.select(chunk)).float() for chunk in rows.split(batch_size)]
    out = torch.cat(parts) if parts else torch.empty(0, net.config.out_dim, device=device)
    return dist.gather_rows(out, len(batch))


def _on(source: Batch, index: Tensor) -> Tensor:
    """Row indices where ``source`` selects with them: an in-memory Batch on its own device."""
    return index.to(source.device) if isinstance(source, Batch) else index


def rng_state() -> dict:
    """This process's global random states: torch (CPU and CUDA), numpy, python."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
        "numpy_rest": torch.tensor([pos, has_gauss], dtype=torch.int64),
        "numpy_gauss": torch.tensor([cached], dtype=torch.float64),
    }
    if torch.cuda.is_available():
        tensors.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    version, internal, gauss = random.getstate()
    return {"tensors": tensors, "python": [version, list(internal), gauss]}


def set_rng_state(state: dict) -> None:
    t = state["tensors"]
    torch.set_rng_state(t["torch"])
    pos, has_gauss = t["numpy_rest"].tolist()
    keys = t["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, pos, has_gauss, float(t["numpy_gauss"][0])))
    cuda = [t[k] for k in sorted(k for k in t if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _divergence(step_losses: Tensor, valid_loss: float, epoch: int, lr: float) -> str | None:
    """None while training is finite; else where it diverged first (epoch, step 1-based), with a hint."""
    bad = torch.nonzero(~torch.isfinite(step_losses)).flatten()
    if bad.numel():
        step = int(bad[0])
        where = f"epoch {epoch}, step {step + 1} of {len(step_losses)} (training loss {step_losses[step].item()})"
    elif not math.isfinite(valid_loss):
        where = f"epoch {epoch} (validation loss {valid_loss})"
    else:
        return None
    return f"training diverged at {where}: lower the learning rate (--lr, now {lr:g})"


@torch.no_grad()
def predict(model: FusionModel | Ensemble, batch: Batch, batch_size: int = 1024) -> Tensor:
    """Raw model outputs ``(N, out_dim)`` in eval mode, in chunks of ``batch_size`` rows."""
    return _predict(model, batch, Dist(), "32", batch_size)


def to_predictions(task: str, outputs: Tensor) -> np.ndarray:
    """Class indices ``(N,)`` for classification; values ``(N,)`` or ``(N, K)`` for regression."""
    if task == "classification":
        return _np(outputs.argmax(dim=-1))
    out = _np(outputs)
    return out[:, 0] if out.shape[1] == 1 else out


def evaluate(model: FusionModel | Ensemble, batch: Batch, task: str, sentiment: bool = False) -> dict[str, float]:
    """The metrics (:func:`attnfuse.metrics.compute_metrics`) of ``model`` on ``batch``
    (``batch.y``: ``(N,)`` labels or ``(N,)``/``(N, K)`` targets)."""
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
        # (B, 1) outputs against (B,) targets, or (B, K) against (B, K); in float32 under autocast.
        out = (out.float() - mean) / std
        return reduce(out.squeeze(-1) if y.dim() == 1 else out, (y - mean) / std)

    return regression_loss


def _np(t: Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()
