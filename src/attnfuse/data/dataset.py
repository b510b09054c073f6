"""The multimodal dataset: storage, the spec models are built from, subsets and batches.

A dataset is a dict of modalities plus targets. Each modality is either a vector per sample,
shape (N, D), or a sequence per sample, shape (N, T, D). Models always see sequences: a vector
modality becomes a sequence of length T=1. Which tokens are real is carried by a boolean mask,
(N, T), True = valid token; a modality missing for a sample has an all-False row.

Every check happens once, on construction (the functions of :mod:`.validation`), so the rest of
the code (and the models) can trust the arrays. Splitting lives in :mod:`.splits`, standardisation
in :mod:`.preprocessing`.

One copy of the data: a float32 modality is stored as given (``numpy.asarray``), other dtypes
are converted once, and a modality is copied only when invalid tokens must be zeroed in it. A
memory-mapped modality (``numpy.load(mmap_mode="r")``, see :mod:`.io.directory`) stays on disk:
rows are read when they are gathered (:meth:`MultimodalDataset.gather`, ``to_batch``,
:class:`~attnfuse.data.preprocessing.RowBatches`) and their invalid tokens zeroed then.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from ..checks import check_int
from ._memory import is_mapped, read_rows, row_chunks
from .validation import (
    SPLITS,
    TASKS,
    Targets,
    check_columns,
    check_features,
    check_info,
    check_mask,
    check_modality_name,
    check_rows,
    check_some_token,
    check_split,
    check_targets,
    check_values,
    valid_tokens,
)

__all__ = ["SPLITS", "TASKS", "Batch", "BatchSource", "ModalitySpec", "MultimodalDataset", "iter_batches"]


@dataclass(frozen=True)
class ModalitySpec:
    """Static description of one modality, enough to build a model for it."""

    name: str
    dim: int  # feature size D
    length: int  # T (1 for a vector modality)
    is_sequence: bool  # False when the modality was given as (N, D)


@dataclass
class Batch:
    """Model-ready tensors for B samples.

    x[name]: (B, T, D) float32; mask[name]: (B, T) bool, True = valid token (present modality &
    valid step); y: (B,) int64 or (B,)/(B,K) float32 or None.
    """

    x: dict[str, torch.Tensor]
    mask: dict[str, torch.Tensor]
    y: torch.Tensor | None = None

    def __len__(self) -> int:
        return next(iter(self.x.values())).shape[0]

    @property
    def device(self) -> torch.device:
        return next(iter(self.x.values())).device

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(
            x={k: v.to(device, non_blocking=non_blocking) for k, v in self.x.items()},
            mask={k: v.to(device, non_blocking=non_blocking) for k, v in self.mask.items()},
            y=None if self.y is None else self.y.to(device, non_blocking=non_blocking),
        )

    def select(self, index: torch.Tensor) -> Batch:
        """Rows picked by an index tensor (B',) of ints (or a (B,) bool mask)."""
        return Batch(
            x={k: v[index] for k, v in self.x.items()},
            mask={k: v[index] for k, v in self.mask.items()},
            y=None if self.y is None else self.y[index],
        )


class BatchSource(Protocol):
    """What :func:`iter_batches` iterates over: a :class:`Batch` or a lazy :class:`~attnfuse.data.preprocessing.RowBatches`."""

    def __len__(self) -> int: ...

    def select(self, index: torch.Tensor) -> Batch: ...


def iter_batches(
    batch: BatchSource, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None
) -> Iterator[Batch]:
    """Yield consecutive mini-batches of ``batch`` (the last one may be smaller).

    ``batch``: a :class:`Batch` or any source with ``len()`` and ``select(index) -> Batch`` (e.g.
    :class:`~attnfuse.data.preprocessing.RowBatches`, which gathers only the rows selected). With ``shuffle`` the rows are
    permuted first, reproducibly when a seeded ``generator`` is given.
    """
    check_int("batch_size", batch_size)
    n = len(batch)
    # The permutation is drawn on the CPU so a CPU generator works for data on any device.
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    if isinstance(batch, Batch):
        order = order.to(batch.device)
    for start in range(0, n, batch_size):
        yield batch.select(order[start : start + batch_size])


class MultimodalDataset:
    """N samples of several modalities plus targets, validated on construction.

    features: name -> (N, D) or (N, T, D) real array (stored as float32 without a copy when it
        is float32 already; a memory-mapped array stays on disk; original rank kept).
    y: integer or string labels (N,) -> classification; float (N,) or (N, K) -> regression.
        Labels that are not 0..C-1 are encoded to 0..C-1; ``classes`` keeps the originals (see
        :mod:`.labels`).
    masks: name -> bool (N,) presence or (N, T) valid steps; a missing key means all valid.
        Feature values at invalid positions are ignored (they may even be NaN) and read as 0.
    split: (N,) strings in {"train", "valid", "test"}: a predefined split (e.g. MOSI's).
    task: "auto" (from y's dtype), "classification" or "regression".
    info: extra per-sample arrays (N, ...) carried through ``subset`` (not fed to models).
    num_classes / classes: a trained model's label space (classes: its original labels, so
        that new data is encoded as in training; num_classes: labels 0..num_classes-1 used as
        they are), so that data lacking some classes keeps the model's label space.
    columns: for data read from a table, the column behind each feature,
        ``{"modalities": {name: [D column names]}, "target": column, "split": column}``: a model
        records them, so that another table is read by column name, in the model's order.
    """

    def __init__(
        self,
        features: dict[str, np.ndarray],
        y: np.ndarray,
        masks: dict[str, np.ndarray] | None = None,
        split: np.ndarray | None = None,
        task: str = "auto",
        name: str = "data",
        info: dict[str, np.ndarray] | None = None,
        *,
        num_classes: int | None = None,
        classes: list | None = None,
        columns: Mapping | None = None,
    ) -> None:
        if not isinstance(name, str):
            raise TypeError(f"name: expected a string, got {type(name).__name__}")
        self.name = name
        targets = check_targets(y, task, num_classes, classes)
        if targets.y is not None:
            self.n = n = targets.y.shape[0]
        elif isinstance(features, Mapping) and features:
            self.n = n = int(np.shape(next(iter(features.values())))[0])  # no targets: the rows of the features
        else:
            raise ValueError("features: expected at least one modality, got none")
        self._set_targets(targets)

        if not isinstance(features, Mapping):
            raise TypeError(f"features: expected a dict of modality name -> array, got {type(features).__name__}")
        if len(features) == 0:
            raise ValueError("features: expected at least one modality, got none")
        masks = {} if masks is None else masks
        if not isinstance(masks, Mapping):
            raise TypeError(f"masks: expected a dict of modality name -> bool array, got {type(masks).__name__}")
        for key in masks:
            if key not in features:
                raise ValueError(f"masks: {key!r} is not a modality (modalities: {', '.join(map(repr, features))})")

        self.features: dict[str, np.ndarray] = {}  # name -> float32 (N, D) or (N, T, D), or a memory map
        self.masks: dict[str, np.ndarray] = {}  # name -> the bool mask as given, (N,) or (N, T)
        self.modalities: list[ModalitySpec] = []
        self._valid: dict[str, np.ndarray] = {}  # name -> (N, T) combined mask, computed once
        self._zeroed: dict[str, bool] = {}  # name -> invalid tokens are 0 in the stored array
        for mod, x in features.items():
            check_modality_name(mod)
            arr = check_features(mod, x, n)
            spec = ModalitySpec(mod, int(arr.shape[-1]), int(arr.shape[1]) if arr.ndim == 3 else 1, arr.ndim == 3)
            if mod in masks:
                self.masks[mod] = check_mask(mod, masks[mod], n, spec.length)
            valid = valid_tokens(self.masks.get(mod), n, spec.length)
            check_values(mod, arr.reshape(n, spec.length, spec.dim), valid)
            self.features[mod], self._zeroed[mod] = _store(arr, valid, spec)
            self._valid[mod] = valid
            self.modalities.append(spec)
        check_some_token(self._valid, n)
        self.split = None if split is None else check_split(split, n)
        self.info = check_info({} if info is None else info, n)
        self.columns = check_columns(columns, {m.name: m.dim for m in self.modalities})

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        mods = ", ".join(f"{m.name}{f'(T={m.length})' if m.is_sequence else ''}:{m.dim}" for m in self.modalities)
        target = f"{self.num_classes} classes" if self.task == "classification" else f"target_dim={self.target_dim}"
        return f"MultimodalDataset({self.name!r}, n={self.n}, {self.task}, {target}, modalities=[{mods}])"

    def modality(self, name: str) -> ModalitySpec:
        """The spec of modality ``name`` (a ValueError lists the modalities when there is none)."""
        for spec in self.modalities:
            if spec.name == name:
                return spec
        raise ValueError(f"modality: expected one of {', '.join(m.name for m in self.modalities)}, got {name!r}")

    def valid_mask(self, name: str) -> np.ndarray:
        """(N, T) bool: True where the modality is present for the sample and the step is valid."""
        self.modality(name)
        return self._valid[name]

    @property
    def is_mapped(self) -> bool:
        """True when some modality is memory-mapped (read from disk as rows are gathered)."""
        return any(is_mapped(x) for x in self.features.values())

    def rows(self, indices: Any = None) -> np.ndarray:
        """Row indices as an int64 array: None (all rows), int indices, or a (N,) bool mask."""
        return check_rows(indices, self.n)

    def gather(self, name: str, indices: Any = None) -> np.ndarray:
        """A new float32 array (B, T, D) of modality ``name`` at the given rows; invalid tokens are 0.

        Reads only these rows of a memory-mapped modality (with ``pread``: see ``_memory.read_rows``)."""
        spec, idx = self.modality(name), self.rows(indices)
        x = self.features[name]
        rows = read_rows(x, idx % self.n)  # from the file behind a memory map; None for in-memory data
        with np.errstate(over="ignore", invalid="ignore"):  # invalid tokens of wide data: zeroed below
            out = np.asarray(x[idx] if rows is None else rows, dtype=np.float32).reshape(
                idx.size, spec.length, spec.dim
            )
        if not self._zeroed[name]:
            out[~self._valid[name][idx]] = 0.0
        return out

    def subset(self, indices: Any) -> MultimodalDataset:
        """A new dataset of the given rows (int indices or bool mask), keeping task and label space.

        The rows are gathered into memory (also from a memory-mapped dataset)."""
        idx = self.rows(indices)
        if idx.size == 0:
            raise ValueError("indices: expected at least one row, got none")
        gathered = {m.name: self.gather(m.name, idx) for m in self.modalities}  # (B, T, D) each
        out = self._copy_with(
            {m.name: gathered[m.name][:, 0] if not m.is_sequence else gathered[m.name] for m in self.modalities}
        )
        out.n, out.y = idx.size, None if self.y is None else self.y[idx]
        out.masks = {k: v[idx] for k, v in self.masks.items()}
        out._valid = {k: v[idx] for k, v in self._valid.items()}
        out.split = None if self.split is None else self.split[idx]
        out.info = {k: np.asarray(v[idx]) for k, v in self.info.items()}
        return out

    def as_task(self, task: str) -> MultimodalDataset:
        """This data with its targets read as ``task`` ("classification" or "regression"; checked
        again as for a new dataset), everything else carried over; itself when it is that task.

        Only the targets are checked again: the features, masks and split were checked when this
        dataset was made, and are shared (a memory-mapped modality is not read again)."""
        if task == self.task:
            return self
        targets = check_targets(self.y, task)
        out = copy.copy(self)
        out._set_targets(targets)
        return out

    def _set_targets(self, targets: Targets) -> None:
        self.y, self.task = targets.y, targets.task
        self.num_classes, self.classes, self.target_dim = targets.num_classes, targets.classes, targets.target_dim

    def replace_features(self, features: Mapping[str, np.ndarray]) -> MultimodalDataset:
        """A dataset sharing everything with this one but the features, e.g. standardised ones.

        ``features`` must hold every modality as float32 with this dataset's shapes and 0 at
        invalid tokens (as ``Standardizer.transform`` makes them); they are used without a copy."""
        if set(features) != set(self.features):
            raise ValueError(f"features: expected modalities {list(self.features)}, got {list(features)}")
        for name, x in features.items():
            expected = self.features[name].shape
            if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.shape != expected:
                got = f"{type(x).__name__} {getattr(x, 'dtype', '')} {getattr(x, 'shape', '')}"
                raise ValueError(f"features[{name!r}]: expected float32 of shape {expected}, got {got}")
        return self._copy_with(features={m.name: features[m.name] for m in self.modalities})

    def _copy_with(self, features: dict[str, np.ndarray]) -> MultimodalDataset:
        """A shallow copy with these (checked, float32, zeroed) features; skips the validation."""
        out = object.__new__(MultimodalDataset)
        out.__dict__.update(self.__dict__)
        out.features = features
        out._zeroed = {k: not is_mapped(x) for k, x in features.items()}
        return out

    def to_batch(self, indices: Any = None) -> Batch:
        """CPU tensors for the given rows (all by default); vector modalities become T=1."""
        idx = self.rows(indices)
        x = {m.name: torch.from_numpy(self.gather(m.name, idx)) for m in self.modalities}
        mask = {m.name: torch.from_numpy(self._valid[m.name][idx]) for m in self.modalities}
        return Batch(x, mask, None if self.y is None else torch.from_numpy(self.y[idx]))

    def spec_dict(self) -> dict:
        """JSON-able description of what a model for this data must accept and output.

        ``classes`` (classification only): the original labels, ``classes[i]`` for output ``i``."""
        spec = {
            "task": self.task,
            "num_classes": self.num_classes,
            "target_dim": self.target_dim,
            "modalities": [
                {"name": m.name, "dim": m.dim, "length": m.length, "is_sequence": m.is_sequence}
                for m in self.modalities
            ],
        }
        if self.classes is not None:
            spec["classes"] = self.classes
        if self.columns is not None:
            spec["columns"] = self.columns
        return spec


def _store(x: np.ndarray, valid: np.ndarray, spec: ModalitySpec) -> tuple[np.ndarray, bool]:
    """The array to keep for a modality (its rank as given) and whether its invalid tokens are 0.

    A memory map is kept as it is (invalid tokens are zeroed when rows are gathered). Otherwise
    float32 input is used without a copy; other dtypes are converted once. Only when an invalid
    token holds something other than 0 is a float32 input copied (once) to zero it: the caller's
    array is never modified.
    """
    if is_mapped(x):
        return x, bool(valid.all())
    with np.errstate(over="ignore", invalid="ignore"):  # out-of-range values at invalid tokens: zeroed below
        out = np.asarray(x, dtype=np.float32)
    if valid.all():
        return out, True
    n = valid.shape[0]
    row_bytes = spec.length * spec.dim * 4
    out3 = out.reshape(n, spec.length, spec.dim)
    if not any(np.any(out3[r][~valid[r]]) for r in row_chunks(n, row_bytes)):
        return out, True  # already 0 wherever it must be
    if np.may_share_memory(out, x):
        out = out.copy()
        out3 = out.reshape(n, spec.length, spec.dim)
    for r in row_chunks(n, row_bytes):
        out3[r][~valid[r]] = 0.0
    return out, True
