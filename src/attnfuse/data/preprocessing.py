"""Feature standardisation fitted on training rows: statistics in one streaming pass, applied to a
whole dataset (a copy, or in place) or per batch on the batch's device (:class:`RowBatches`, the
lazy batch source that gathers, moves and standardises rows only when a step selects them).

The statistics are exact in float64 but never need a float64 copy of the tokens: the rows are
read in chunks and per-chunk means and sums of squared deviations are merged with the pairwise
update of Chan, Golub & LeVeque, "Algorithms for computing the sample variance: analysis and
recommendations", The American Statistician 37(3), 1983 (numerically stable, unlike sum/sumsq).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ._memory import row_chunks
from .dataset import Batch, MultimodalDataset

__all__ = ["STD_FLOOR", "RowBatches", "Standardizer"]

STD_FLOOR = 1e-6  # below this a feature is treated as constant (see Standardizer)
FIT_CHUNK_BYTES = 8 * 2**20  # float32 rows per chunk of the fit; its float64 temporaries are ~4x


class _Moments:
    """Running count, mean and sum of squared deviations (M2) per feature, in float64."""

    def __init__(self, dim: int) -> None:
        self.count = 0
        self.mean = np.zeros(dim)
        self.m2 = np.zeros(dim)

    def update(self, tokens: np.ndarray) -> None:
        """Merge a chunk of tokens (k, D) (Chan et al.'s pairwise update)."""
        k = tokens.shape[0]
        if k == 0:
            return
        chunk = tokens.astype(np.float64)  # (k, D): only this chunk is ever float64
        mean = chunk.mean(axis=0)
        chunk -= mean
        m2 = np.einsum("kd,kd->d", chunk, chunk)
        total = self.count + k
        delta = mean - self.mean
        self.mean += delta * (k / total)
        self.m2 += m2 + delta**2 * (self.count * k / total)
        self.count = total

    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / max(self.count, 1))


class Standardizer:
    """Per-modality, per-feature mean/std fitted on training rows over valid tokens only.

    Features whose std is below ``STD_FLOOR`` are constant on the training rows: their std is
    set to 1, so they map to 0 there and a different value at test time stays moderate instead
    of being blown up by a tiny divisor. mean[name], std[name]: (D,) float32.
    """

    def __init__(self, mean: dict[str, np.ndarray], std: dict[str, np.ndarray]) -> None:
        self.mean = {k: np.asarray(v, dtype=np.float32) for k, v in mean.items()}
        self.std = {k: np.asarray(v, dtype=np.float32) for k, v in std.items()}
        self._tensors: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # (name, device, dtype) -> (mean, std)

    @classmethod
    def fit(cls, data: MultimodalDataset, indices: Any = None) -> Standardizer:
        """Fit on the rows ``indices`` (all rows by default), e.g. ``make_split(...)["train"]``.

        One streaming pass: rows are read in chunks (in row order, so a memory-mapped dataset is
        read sequentially) and only a chunk's valid tokens are ever in float64."""
        rows = np.sort(data.rows(indices))
        mean, std = {}, {}
        for spec in data.modalities:
            moments = _Moments(spec.dim)
            valid = data.valid_mask(spec.name)
            for part in row_chunks(rows.size, spec.length * spec.dim * 4, FIT_CHUNK_BYTES):
                chunk = rows[part]
                moments.update(data.gather(spec.name, chunk)[valid[chunk]])  # (k, D) valid tokens
            if moments.count == 0:  # modality absent from every fitted row: leave it unscaled
                mean[spec.name], std[spec.name] = np.zeros(spec.dim), np.ones(spec.dim)
            else:
                sd = moments.std()
                mean[spec.name], std[spec.name] = moments.mean, np.where(sd < STD_FLOOR, 1.0, sd)
        return cls(mean, std)

    def _check(self, dims: Mapping[str, int]) -> None:
        """The data's modalities (name -> feature size) must be the fitted ones."""
        for name in dims:
            if name not in self.mean:
                raise ValueError(f"modality {name!r}: not fitted (fitted modalities: {', '.join(self.mean)})")
        for name in self.mean:
            if name not in dims:
                raise ValueError(f"modality {name!r}: fitted but missing from the data (data has: {', '.join(dims)})")
        for name, dim in dims.items():
            expected = self.mean[name].shape[0]
            if dim != expected:
                raise ValueError(f"modality {name!r}: expected dim {expected}, got {dim}")

    def transform(self, data: MultimodalDataset, inplace: bool = False) -> MultimodalDataset:
        """Standardised ``data``; invalid/absent tokens stay 0.

        By default a new dataset holding one new float32 copy of the features (everything else
        shared). ``inplace=True`` overwrites the features of ``data`` itself and returns it: for
        a dataset whose arrays the caller owns (not a memory map, which is read-only: use
        ``RowBatches(data, rows, standardizer)`` to standardise per batch instead)."""
        self._check({m.name: m.dim for m in data.modalities})
        if inplace:
            for name, x in data.features.items():
                if data.is_mapped or not isinstance(x, np.ndarray) or x.dtype != np.float32 or not x.flags.writeable:
                    raise ValueError(
                        f"features[{name!r}]: cannot be standardised in place (read-only or memory-mapped); "
                        "use transform(data) or RowBatches(data, rows, standardizer)"
                    )
        features = {}
        for spec in data.modalities:
            mean, std = self.mean[spec.name], self.std[spec.name]
            valid = data.valid_mask(spec.name)[:, :, None]  # (N, T, 1)
            x = data.features[spec.name]
            out = x if inplace else np.empty(x.shape, dtype=np.float32)
            out3 = out.reshape(data.n, spec.length, spec.dim)
            for rows in row_chunks(data.n, spec.length * spec.dim * 4):
                z = out3[rows]  # (rows, T, D), a view of out: written in place
                if not inplace:
                    z[...] = data.gather(spec.name, np.arange(rows.start, rows.stop))
                z -= mean
                z /= std
                z *= valid[rows]
            features[spec.name] = out
        return data if inplace else data.replace_features(features)

    def transform_batch(self, batch: Batch, inplace: bool = False) -> Batch:
        """Standardise a Batch on its own device: x[name] (B, T, D) -> (x - mean) / std, invalid tokens 0.

        ``inplace=True`` overwrites the batch's feature tensors (for a batch the caller owns, e.g.
        one just gathered); masks and targets are shared either way."""
        self._check({name: x.shape[-1] for name, x in batch.x.items()})
        out = {}
        for name, x in batch.x.items():
            mean, std = self._on(name, x)
            invalid = ~batch.mask[name].unsqueeze(-1)  # (B, T, 1)
            if inplace:
                out[name] = x.sub_(mean).div_(std).masked_fill_(invalid, 0.0)
            else:
                out[name] = ((x - mean) / std).masked_fill_(invalid, 0.0)
        return Batch(out, batch.mask, batch.y)

    def _on(self, name: str, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """mean and std of ``name`` as (D,) tensors on ``like``'s device and dtype, made once."""
        key = (name, like.device, like.dtype)
        if key not in self._tensors:
            self._tensors[key] = tuple(
                torch.from_numpy(a).to(device=like.device, dtype=like.dtype) for a in (self.mean[name], self.std[name])
            )
        return self._tensors[key]

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


class RowBatches:
    """A lazy batch source: rows of a dataset gathered, standardised and moved to a device only when
    selected, so that a memory-mapped dataset is never loaded and no standardised copy is made.

    ``len()`` and ``select(index) -> Batch`` as a :class:`Batch` has them, so
    ``iter_batches(source, batch_size, shuffle, generator)`` works on it unchanged: each step
    reads B rows (B, T, D) from the dataset (from disk for a memory map), zeroes their invalid
    tokens, moves them to ``device`` and standardises them there (invalid tokens stay 0).
    ``rows``: the dataset rows this source covers (e.g. ``split["train"]``); index i of
    ``select`` is ``rows[i]``.
    """

    def __init__(
        self,
        data: MultimodalDataset,
        rows: Any = None,
        standardizer: Standardizer | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.data = data
        self.rows = data.rows(rows)
        self.standardizer = standardizer
        self.device = torch.device(device)

    def __len__(self) -> int:
        return int(self.rows.size)

    @property
    def y(self) -> torch.Tensor:
        """The targets of all rows (len,) on ``device`` (small: for metrics over the whole part)."""
        return None if self.data.y is None else torch.from_numpy(self.data.y[self.rows]).to(self.device)

    def select(self, index: torch.Tensor | np.ndarray) -> Batch:
        """The Batch of rows ``self.rows[index]`` on ``device``, standardised when a standardizer is set."""
        picked = self.rows[index.cpu().numpy() if isinstance(index, torch.Tensor) else np.asarray(index)]
        batch = self.data.to_batch(picked).to(self.device)
        if self.standardizer is not None:
            batch = self.standardizer.transform_batch(batch, inplace=True)  # the gathered copy is ours
        return batch

    def to_batch(self) -> Batch:
        """All rows as one Batch on ``device`` (for small parts, e.g. to evaluate)."""
        return self.select(np.arange(len(self)))
