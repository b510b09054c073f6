"""The data layer: a validated multimodal dataset, splits, standardisation and batching
(reading and writing files: :mod:`attnfuse.files`).

A dataset is a dict of modalities plus targets. Each modality is either a vector per sample,
shape (N, D), or a sequence per sample, shape (N, T, D). Models always see sequences: a vector
modality becomes a sequence of length T=1. Which tokens are real is carried by a boolean mask,
(N, T), True = valid token; a modality missing for a sample has an all-False row.

Every check happens once, in ``MultimodalDataset.__init__``, so the rest of the code (and the
models) can trust the arrays. Error messages name the argument or modality, what was expected
and what was found: the CLI prints them as one-line errors.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

SPLITS = ("train", "valid", "test")
# Modality names become token labels ("video[3]") and keys of the models' nn.ModuleDicts, which
# reject '.' and names of their own attributes.
MODALITY_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
RESERVED_NAMES = frozenset(n for n in dir(torch.nn.ModuleDict) if not n.startswith("_"))
TASKS = ("auto", "classification", "regression")
STD_FLOOR = 1e-6  # below this a feature is treated as constant (see Standardizer.fit)


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

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            x={k: v.to(device) for k, v in self.x.items()},
            mask={k: v.to(device) for k, v in self.mask.items()},
            y=None if self.y is None else self.y.to(device),
        )

    def select(self, index: torch.Tensor) -> Batch:
        """Rows picked by an index tensor (B',) of ints (or a (B,) bool mask)."""
        return Batch(
            x={k: v[index] for k, v in self.x.items()},
            mask={k: v[index] for k, v in self.mask.items()},
            y=None if self.y is None else self.y[index],
        )


def iter_batches(
    batch: Batch, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None
) -> Iterator[Batch]:
    """Yield consecutive mini-batches of ``batch`` (the last one may be smaller).

    With ``shuffle`` the rows are permuted first, reproducibly when a seeded ``generator`` is given.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    n = len(batch)
    device = next(iter(batch.x.values())).device
    # The permutation is drawn on the CPU so a CPU generator works for data on any device.
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    order = order.to(device)
    for start in range(0, n, batch_size):
        yield batch.select(order[start : start + batch_size])


def _count_first(bad: np.ndarray) -> tuple[int, int]:
    """(number of True entries, first sample index with one) for an array whose axis 0 is the sample."""
    rows = np.flatnonzero(bad.reshape(bad.shape[0], -1).any(axis=1))
    return int(bad.sum()), int(rows[0])


class MultimodalDataset:
    """N samples of several modalities plus targets, validated on construction.

    features: name -> (N, D) or (N, T, D) real array (stored as float32, original rank kept).
    y: integer (N,) -> classification; float (N,) or (N, K) -> regression.
    masks: name -> bool (N,) presence or (N, T) valid steps; a missing key means all valid.
        Feature values at invalid positions are ignored (they may even be NaN) and stored as 0.
    split: (N,) strings in {"train", "valid", "test"}: a predefined split (e.g. MOSI's).
    task: "auto" (from y's dtype), "classification" or "regression".
    info: extra per-sample arrays (N, ...) carried through ``subset`` (not fed to models).
    num_classes: fix the number of classes instead of max(y)+1, so that a subset keeps its
        parent's label space even when it lacks the highest class.
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
    ) -> None:
        if not isinstance(name, str):
            raise TypeError(f"name: expected a string, got {type(name).__name__}")
        self.name = name
        y = np.asarray(y)
        if y.ndim not in (1, 2):
            raise ValueError(f"y: expected shape (N,) or (N, K), got shape {y.shape}")
        self.n = n = y.shape[0]
        if n == 0:
            raise ValueError("y: the dataset has no samples (N=0)")

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

        self.features: dict[str, np.ndarray] = {}  # name -> float32 (N, D) or (N, T, D)
        self.masks: dict[str, np.ndarray] = {}  # name -> the bool mask as given, (N,) or (N, T)
        self.modalities: list[ModalitySpec] = []
        self._valid: dict[str, np.ndarray] = {}  # name -> (N, T) combined mask, computed once
        for mod, x in features.items():
            self._add_modality(mod, x, masks.get(mod))

        any_token = np.zeros(n, dtype=bool)
        for valid in self._valid.values():
            any_token |= valid.any(axis=1)
        if not any_token.all():
            empty = np.flatnonzero(~any_token)
            raise ValueError(
                f"masks: {empty.size} samples have no valid token in any modality, first is sample {empty[0]}"
            )

        self._set_targets(y, task, num_classes)
        self.split = None if split is None else self._check_split(split)
        self.info = self._check_info({} if info is None else info)

    def _add_modality(self, mod: str, raw: np.ndarray, mask: np.ndarray | None) -> None:
        """Validate one modality and its mask, then store it as float32 with invalid tokens zeroed."""
        n = self.n
        if not isinstance(mod, str) or not mod:
            raise TypeError(f"features: modality names must be non-empty strings, got {mod!r}")
        if not MODALITY_NAME.fullmatch(mod) or mod in RESERVED_NAMES:
            raise ValueError(
                f"features: modality name {mod!r} is not usable: expected letters, digits, '_' or '-' "
                f"(no '.' or brackets), starting with a letter, and not a name of torch's nn.ModuleDict "
                f"(e.g. 'train', 'to', 'eval', 'keys')"
            )
        x = np.asarray(raw)
        if x.dtype.kind not in "iuf":
            raise TypeError(f"features[{mod!r}]: expected a real-valued (float) array, got dtype {x.dtype}")
        if x.ndim not in (2, 3):
            raise ValueError(f"features[{mod!r}]: expected shape (N, D) or (N, T, D), got shape {x.shape}")
        if x.shape[0] != n:
            raise ValueError(f"features[{mod!r}]: expected N={n} samples (as in y), got {x.shape[0]}")
        if 0 in x.shape[1:]:
            raise ValueError(f"features[{mod!r}]: T and D must be >= 1, got shape {x.shape}")
        is_seq = x.ndim == 3
        length = x.shape[1] if is_seq else 1

        valid = np.ones((n, length), dtype=bool)
        if mask is not None:
            m = np.asarray(mask)
            if m.dtype != np.bool_:
                raise TypeError(f"masks[{mod!r}]: expected a bool array, got dtype {m.dtype}")
            if m.shape not in ((n,), (n, length)):
                raise ValueError(f"masks[{mod!r}]: expected shape ({n},) or ({n}, {length}), got {m.shape}")
            self.masks[mod] = m.copy()
            valid = np.broadcast_to(m.reshape(n, -1), (n, length)).copy()  # presence (N,) -> every step

        x3 = x.reshape(n, length, x.shape[-1]).astype(np.float32)  # astype copies: safe to edit
        bad = ~np.isfinite(x3) & valid[:, :, None]
        if bad.any():
            count, first = _count_first(bad)
            raise ValueError(
                f"features[{mod!r}]: {count} non-finite values (NaN/inf) at valid positions, first at "
                f"sample {first}; fix them or mark those steps invalid with a mask"
            )
        # Invalid tokens (padding, absent modality; possibly NaN) are zeroed so that no model or
        # pooling ever sees them.
        x3[~valid] = 0.0
        self.features[mod] = x3 if is_seq else x3[:, 0, :]
        self._valid[mod] = valid
        self.modalities.append(ModalitySpec(mod, int(x.shape[-1]), int(length), is_seq))

    def _set_targets(self, y: np.ndarray, task: str, num_classes: int | None) -> None:
        """Resolve the task from y (when "auto") and set y, task, num_classes and target_dim."""
        if task not in TASKS:
            raise ValueError(f"task: expected one of {', '.join(map(repr, TASKS))}, got {task!r}")
        if y.dtype.kind not in "biuf":
            raise TypeError(f"y: expected integer class labels or float targets, got dtype {y.dtype}")
        if task == "auto":
            if y.dtype.kind in "biu" and y.ndim == 2:
                raise ValueError(
                    f"y: integer labels must have shape (N,), got {y.shape}; pass task='regression' for "
                    "multi-output targets"
                )
            task = "classification" if y.dtype.kind in "biu" else "regression"
        self.task = task
        self.num_classes: int | None = None
        self.target_dim: int | None = None
        if task == "classification":
            self.y = self._check_labels(y, num_classes)
            self.num_classes = int(self.y.max()) + 1 if num_classes is None else int(num_classes)
            return
        if num_classes is not None:
            raise ValueError(f"num_classes: only meaningful for classification, got {num_classes} for regression")
        if y.ndim == 2 and y.shape[1] == 0:
            raise ValueError(f"y: expected shape (N,) or (N, K) with K >= 1, got {y.shape}")
        y = y.astype(np.float32)
        bad = ~np.isfinite(y)
        if bad.any():
            count, first = _count_first(bad)
            raise ValueError(f"y: {count} non-finite regression targets (NaN/inf), first at sample {first}")
        self.y = y
        self.target_dim = 1 if y.ndim == 1 else y.shape[1]

    def _check_split(self, split: np.ndarray) -> np.ndarray:
        s = np.asarray(split)
        if s.shape != (self.n,):
            raise ValueError(f"split: expected shape ({self.n},), got {s.shape}")
        if s.dtype.kind not in "USO":
            raise TypeError(f"split: expected strings {SPLITS}, got dtype {s.dtype}")
        s = s.astype(str)
        unknown = ~np.isin(s, SPLITS)
        if unknown.any():
            first = int(np.flatnonzero(unknown)[0])
            expected = ", ".join(map(repr, SPLITS))
            raise ValueError(f"split: expected values in {expected}, got {s[first]!r} at sample {first}")
        return s

    def _check_info(self, info: Mapping) -> dict[str, np.ndarray]:
        if not isinstance(info, Mapping):
            raise TypeError(f"info: expected a dict of name -> array, got {type(info).__name__}")
        out = {}
        for key, value in info.items():
            arr = np.asarray(value)
            if arr.ndim == 0 or arr.shape[0] != self.n:
                raise ValueError(f"info[{key!r}]: expected N={self.n} rows, got shape {arr.shape}")
            if arr.dtype.kind not in "biufUS":  # what an .npz holds without pickling
                raise TypeError(f"info[{key!r}]: expected a numeric, bool or string array, got dtype {arr.dtype}")
            out[key] = arr.copy()
        return out

    @staticmethod
    def _check_labels(y: np.ndarray, num_classes: int | None) -> np.ndarray:
        """Return class labels as int64 (N,), or raise naming the first offending sample."""
        if y.ndim != 1:
            raise ValueError(f"y: classification labels must have shape (N,), got {y.shape}")
        if y.dtype.kind == "f":
            # Float labels are accepted only when they are whole numbers (e.g. read from a CSV).
            bad = ~np.isfinite(y) | (y != np.round(y))
            if bad.any():
                first = int(np.flatnonzero(bad)[0])
                raise ValueError(f"y: task='classification' needs integer labels, got {y[first]!r} at sample {first}")
        labels = y.astype(np.int64)
        if (labels < 0).any():
            first = int(np.flatnonzero(labels < 0)[0])
            raise ValueError(f"y: class labels must be >= 0, got {labels[first]} at sample {first}")
        if num_classes is None:
            if labels.max() + 1 < 2:
                raise ValueError(f"y: classification needs at least 2 classes, got only label(s) <= {labels.max()}")
        else:
            if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
                raise ValueError(f"num_classes: expected an integer >= 2, got {num_classes!r}")
            if labels.max() >= num_classes:
                first = int(np.flatnonzero(labels >= num_classes)[0])
                raise ValueError(
                    f"y: class labels must be < num_classes={num_classes}, got {labels[first]} at sample {first}"
                )
        return labels

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        mods = ", ".join(f"{m.name}{f'(T={m.length})' if m.is_sequence else ''}:{m.dim}" for m in self.modalities)
        target = f"{self.num_classes} classes" if self.task == "classification" else f"target_dim={self.target_dim}"
        return f"MultimodalDataset({self.name!r}, n={self.n}, {self.task}, {target}, modalities=[{mods}])"

    def _modality(self, name: str) -> ModalitySpec:
        for spec in self.modalities:
            if spec.name == name:
                return spec
        raise ValueError(f"modality: expected one of {', '.join(m.name for m in self.modalities)}, got {name!r}")

    def valid_mask(self, name: str) -> np.ndarray:
        """(N, T) bool: True where the modality is present for the sample and the step is valid."""
        self._modality(name)
        return self._valid[name]

    def _rows(self, indices: Any) -> np.ndarray:
        """Normalise int indices or a bool mask over samples to an int64 index array."""
        if indices is None:
            return np.arange(self.n)
        idx = np.asarray(indices)
        if idx.dtype == np.bool_:
            if idx.shape != (self.n,):
                raise ValueError(f"indices: a bool mask must have shape ({self.n},), got {idx.shape}")
            return np.flatnonzero(idx)
        if idx.dtype.kind not in "iu" or idx.ndim != 1:
            raise TypeError(f"indices: expected a 1-D integer array, got dtype {idx.dtype} and shape {idx.shape}")
        if idx.size and (idx.min() < -self.n or idx.max() >= self.n):
            raise ValueError(f"indices: expected values in [0, {self.n}), got range [{idx.min()}, {idx.max()}]")
        return idx.astype(np.int64)

    def subset(self, indices: Any) -> MultimodalDataset:
        """A new dataset of the given rows (int indices or bool mask), keeping task and label space."""
        idx = self._rows(indices)
        return MultimodalDataset(
            {k: v[idx] for k, v in self.features.items()},
            self.y[idx],
            masks={k: v[idx] for k, v in self.masks.items()},
            split=None if self.split is None else self.split[idx],
            task=self.task,
            name=self.name,
            info={k: v[idx] for k, v in self.info.items()},
            num_classes=self.num_classes,
        )

    def split_indices(
        self, seed: int, fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    ) -> dict[str, np.ndarray]:
        """Disjoint, sorted row indices {"train", "valid", "test"} covering every row.

        Uses the dataset's own ``split`` when it has one (``seed`` and ``fractions`` are then
        unused). Otherwise draws a split deterministic in ``seed``: stratified by class for
        classification (each class is spread over the parts in proportion), random for regression.
        """
        if self.split is not None:
            parts = {s: np.flatnonzero(self.split == s) for s in SPLITS}
            for s, idx in parts.items():
                if idx.size == 0:
                    raise ValueError(f"split: the dataset's split column has no {s!r} rows")
            return parts

        f = np.asarray(fractions, dtype=np.float64)
        if f.shape != (3,) or not np.isfinite(f).all() or (f < 0).any() or abs(f.sum() - 1.0) > 1e-6:
            raise ValueError(
                f"fractions: expected 3 non-negative numbers (train, valid, test) summing to 1, got {fractions}"
            )
        rng = np.random.default_rng(seed)
        order = rng.permutation(self.n)
        if self.task == "classification":
            # Give each sample its quantile within its own class (rank in the random order), then
            # sort by it: every prefix of `order` then holds each class in proportion, so cutting
            # `order` once stratifies all classes at the same time, with exact part sizes. The
            # stable sort keeps the random order among ties.
            quantile = np.empty(self.n)
            labels = self.y[order]
            for c in np.unique(labels):
                members = order[labels == c]
                quantile[members] = (np.arange(members.size) + 0.5) / members.size
            order = order[np.argsort(quantile[order], kind="stable")]
        cuts = np.round(np.cumsum(f)[:2] * self.n).astype(int)
        parts = dict(zip(SPLITS, np.split(order, cuts)))
        for s, frac in zip(SPLITS, f):
            if frac > 0 and parts[s].size == 0:
                raise ValueError(f"fractions: {fractions} leave the {s!r} part empty for N={self.n} samples")
        return {s: np.sort(idx) for s, idx in parts.items()}

    def to_batch(self, indices: Any = None) -> Batch:
        """CPU tensors for the given rows (all by default); vector modalities become T=1."""
        idx = self._rows(indices)
        x, mask = {}, {}
        for spec in self.modalities:
            feats = self.features[spec.name][idx]
            x[spec.name] = torch.from_numpy(feats.reshape(idx.size, spec.length, spec.dim))
            mask[spec.name] = torch.from_numpy(self._valid[spec.name][idx])
        return Batch(x, mask, torch.from_numpy(self.y[idx]))

    def spec_dict(self) -> dict:
        """JSON-able description of what a model for this data must accept and output."""
        return {
            "task": self.task,
            "num_classes": self.num_classes,
            "target_dim": self.target_dim,
            "modalities": [
                {"name": m.name, "dim": m.dim, "length": m.length, "is_sequence": m.is_sequence}
                for m in self.modalities
            ],
        }


class Standardizer:
    """Per-modality, per-feature mean/std fitted on training rows over valid tokens only.

    Features whose std is below ``STD_FLOOR`` are constant on the training rows: their std is
    set to 1, so they map to 0 there and a different value at test time stays moderate instead
    of being blown up by a tiny divisor.
    """

    def __init__(self, mean: dict[str, np.ndarray], std: dict[str, np.ndarray]) -> None:
        self.mean = {k: np.asarray(v, dtype=np.float32) for k, v in mean.items()}
        self.std = {k: np.asarray(v, dtype=np.float32) for k, v in std.items()}

    @classmethod
    def fit(cls, data: MultimodalDataset, indices: Any = None) -> Standardizer:
        """Fit on the rows ``indices`` (all rows by default), e.g. ``split_indices(...)["train"]``."""
        idx = data._rows(indices)
        mean, std = {}, {}
        for spec in data.modalities:
            x = data.features[spec.name][idx].reshape(idx.size, spec.length, spec.dim)
            tokens = x[data.valid_mask(spec.name)[idx]].astype(np.float64)  # (num_valid, D)
            if tokens.shape[0] == 0:  # modality absent from every fitted row: leave it unscaled
                mu, sd = np.zeros(spec.dim), np.ones(spec.dim)
            else:
                mu, sd = tokens.mean(axis=0), tokens.std(axis=0)
                sd = np.where(sd < STD_FLOOR, 1.0, sd)
            mean[spec.name], std[spec.name] = mu, sd
        return cls(mean, std)

    def transform(self, data: MultimodalDataset) -> MultimodalDataset:
        """A standardised copy of ``data``; invalid/absent tokens stay 0."""
        names = [m.name for m in data.modalities]
        for name in names:
            if name not in self.mean:
                raise ValueError(f"modality {name!r}: not fitted (fitted modalities: {', '.join(self.mean)})")
        for name in self.mean:
            if name not in names:
                raise ValueError(f"modality {name!r}: fitted but missing from the data (data has: {', '.join(names)})")
        features = {}
        for spec in data.modalities:
            expected = self.mean[spec.name].shape[0]
            if spec.dim != expected:
                raise ValueError(f"modality {spec.name!r}: expected dim {expected}, got {spec.dim}")
            x = (data.features[spec.name] - self.mean[spec.name]) / self.std[spec.name]
            valid = data.valid_mask(spec.name)
            features[spec.name] = x * (valid[:, :, None] if spec.is_sequence else valid)
        return MultimodalDataset(
            features,
            data.y,
            masks=data.masks,
            split=data.split,
            task=data.task,
            name=data.name,
            info=data.info,
            num_classes=data.num_classes,
        )

    def to_dict(self) -> dict:
        """JSON-able: {modality: {"mean": [...], "std": [...]}}."""
        return {k: {"mean": self.mean[k].tolist(), "std": self.std[k].tolist()} for k in self.mean}

    @classmethod
    def from_dict(cls, d: dict) -> Standardizer:
        if not isinstance(d, Mapping):
            raise TypeError(f"standardizer: expected a dict, got {type(d).__name__}")
        mean, std = {}, {}
        for name, stats in d.items():
            if not isinstance(stats, Mapping) or "mean" not in stats or "std" not in stats:
                raise ValueError(f"standardizer[{name!r}]: expected a dict with 'mean' and 'std' lists")
            mu, sd = np.asarray(stats["mean"], dtype=np.float64), np.asarray(stats["std"], dtype=np.float64)
            if mu.ndim != 1 or mu.shape != sd.shape:
                raise ValueError(f"standardizer[{name!r}]: 'mean' and 'std' must be lists of equal length")
            if not (np.isfinite(mu).all() and np.isfinite(sd).all() and (sd > 0).all()):
                raise ValueError(f"standardizer[{name!r}]: expected finite means and positive stds")
            mean[name], std[name] = mu, sd
        return cls(mean, std)
