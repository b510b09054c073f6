"""Train/valid/test splits as functions (in the manner of scikit-learn's ``model_selection``).

* :func:`make_split` — the split of a training run: the data's ``split`` column when it has one
  (with a validation part carved out of ``train`` when the column has only ``train`` and
  ``test`` rows, as benchmark archives ship them), else a split drawn by seed.
* :func:`kfold` — K folds for cross-validation on small data.
* :func:`carve_valid` — a stratified validation part out of some training rows.

Every function returns sorted, disjoint int64 row indices and never moves a ``test`` row of the
data's split column. Stratification (classification) spreads each class over the parts in
proportion to their sizes; regression splits are random. All are deterministic in ``seed``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..checks import check_int
from .validation import SPLITS

if TYPE_CHECKING:
    from .dataset import MultimodalDataset

__all__ = ["VALID_FRACTION", "Split", "bags", "carve_valid", "draw_split", "kfold", "make_split"]

VALID_FRACTION = 0.15  # of the training rows, when a validation part is carved out of them


@dataclass(frozen=True)
class Split(Mapping):
    """Row indices per part, ``{"train", "valid", "test"}`` (a read-only dict), and how they were made.

    how: "column" (the data's split column), "carved" (its column had no valid rows: a validation
    part was carved out of train), "drawn" (no column: drawn by seed), or "fold" (from
    :func:`kfold`). note: one line saying so, for the user.
    """

    rows: dict[str, np.ndarray]
    how: str
    note: str

    def __getitem__(self, part: str) -> np.ndarray:
        return self.rows[part]

    def __iter__(self) -> Iterator[str]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def carved(self) -> bool:
        """True when the data's split column had no validation rows and they were carved out of train."""
        return self.how == "carved"


def _stratify(data: MultimodalDataset) -> np.ndarray | None:
    return data.y if data.task == "classification" else None


def _shuffled(rows: np.ndarray, labels: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
    """``rows`` in a random order in which, with ``labels``, every prefix holds each class in proportion.

    Each row gets its quantile within its own class (its rank in the random order), and the rows
    are sorted by it: cutting the result anywhere then stratifies all classes at the same time,
    with exact part sizes, however small a class is. The stable sort keeps the random order among
    ties."""
    order = rows[rng.permutation(rows.size)]
    if labels is None:
        return order
    classes = labels[order]
    quantile = np.empty(order.size)
    for c in np.unique(classes):
        at = np.flatnonzero(classes == c)
        quantile[at] = (np.arange(at.size) + 0.5) / at.size
    return order[np.argsort(quantile, kind="stable")]


def _part_sizes(n: int, fractions: np.ndarray) -> np.ndarray:
    """Sizes of the parts for ``fractions`` of n, every part with a positive fraction non-empty."""
    needed = int((fractions > 0).sum())
    if n < needed:
        raise ValueError(
            f"data: N={n} samples are too few for a train/valid/test split (each part needs at least one sample)"
        )
    cuts = np.round(np.cumsum(fractions)[:2] * n).astype(int)
    sizes = np.diff(np.concatenate([[0], cuts, [n]]))
    for part in np.flatnonzero((sizes == 0) & (fractions > 0)):  # tiny N: borrow from the largest part
        sizes[np.argmax(sizes)] -= 1
        sizes[part] += 1
    return sizes


def draw_split(data: MultimodalDataset, seed: int, fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)) -> dict:
    """A train/valid/test split of all rows in ``fractions``, stratified for classification."""
    f = np.asarray(fractions, dtype=np.float64)
    if f.shape != (3,) or not np.isfinite(f).all() or (f < 0).any() or abs(f.sum() - 1.0) > 1e-6:
        raise ValueError(
            f"fractions: expected 3 non-negative numbers (train, valid, test) summing to 1, got {fractions}"
        )
    order = _shuffled(np.arange(data.n), _stratify(data), np.random.default_rng(seed))
    parts = np.split(order, np.cumsum(_part_sizes(data.n, f))[:2])
    return {s: np.sort(idx) for s, idx in zip(SPLITS, parts)}


def carve_valid(
    data: MultimodalDataset, train: np.ndarray, seed: int, valid_fraction: float = VALID_FRACTION
) -> tuple[np.ndarray, np.ndarray]:
    """Split the rows ``train`` into (train, valid), ``valid_fraction`` of them (at least one) valid,
    stratified for classification. No other row is looked at."""
    if not (isinstance(valid_fraction, float | int) and 0 < valid_fraction < 1):
        raise ValueError(f"valid_fraction: expected a number in (0, 1), got {valid_fraction!r}")
    train = np.asarray(train, dtype=np.int64)
    if train.size < 2:
        raise ValueError(
            f"split: {train.size} training rows are too few to carve a validation part out of them (need 2 or more)"
        )
    n_valid = min(train.size - 1, max(1, round(valid_fraction * train.size)))
    rng = np.random.default_rng(seed)
    order = _shuffled(train, _stratify(data), rng)
    return np.sort(order[n_valid:]), np.sort(order[:n_valid])


def _column_parts(data: MultimodalDataset, untested: bool = False) -> dict[str, np.ndarray]:
    """Rows per part of the data's split column; "train" and "test" must have some. With
    ``untested``, a column of "train" and "valid" rows alone is accepted too (its test part empty):
    the user chose the validation rows and keeps no test rows aside."""
    parts = {s: np.flatnonzero(data.split == s) for s in SPLITS}
    needed = ("train",) if untested and parts["valid"].size else ("train", "test")
    for s in needed:
        if parts[s].size == 0:
            raise ValueError(f"split: the dataset's split column has no {s!r} rows")
    return parts


def make_split(
    data: MultimodalDataset,
    seed: int,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    valid_fraction: float = VALID_FRACTION,
) -> Split:
    """The train/valid/test rows of a run, and how they were made (``Split.how``, ``Split.note``).

    * the data's split column, when it has train, valid and test rows, or train and valid rows
      alone (the test part is then empty: no test metrics);
    * a column with only train and test rows: ``valid_fraction`` of the train rows (default 15%)
      become the validation part (stratified for classification, by ``seed``); test is untouched;
    * no column: a split of all rows drawn by ``seed`` in ``fractions`` (stratified for
      classification, random for regression).

    A column without train rows, or with neither valid nor test rows, is an error.
    """
    kind = "stratified by class" if data.task == "classification" else "at random"
    if data.split is None:
        shares = "/".join(f"{f * 100:g}" for f in fractions)
        rows = draw_split(data, seed, fractions)
        return Split(rows, "drawn", f"no split column: drew a {shares} train/valid/test split {kind}, seed {seed}")
    parts = _column_parts(data, untested=True)
    if parts["valid"].size:
        sizes = ", ".join(f"{parts[s].size} {s}" for s in ("train", "valid", "test"))
        return Split(parts, "column", f"the split is the data's split column ({sizes} rows)")
    parts["train"], parts["valid"] = carve_valid(data, parts["train"], seed, valid_fraction)
    total = parts["train"].size + parts["valid"].size
    note = (
        f"the split column has no 'valid' rows: carved {parts['valid'].size} of its {total} 'train' rows "
        f"({valid_fraction:.0%}, {kind}, seed {seed}) as the validation part; 'test' rows untouched"
    )
    return Split(parts, "carved", note)


def kfold(data: MultimodalDataset, k: int, seed: int, valid_fraction: float = VALID_FRACTION) -> list[Split]:
    """K cross-validation folds, each a :class:`Split` {"train", "valid", "test"}.

    Without a split column, the K test parts partition all rows (scikit-learn's StratifiedKFold
    for classification, KFold otherwise, shuffled by ``seed``), and each fold's validation part
    is carved (``valid_fraction``, stratified) out of the other K-1 folds' rows.

    With a split column, its test rows stay the test part of every fold, and the folds are over
    its train + valid rows: fold i validates on the i-th part of them and trains on the rest (the
    validation parts partition train + valid).

    A class with fewer samples than ``k`` cannot be in every fold's held-out part: those folds
    neither test (or validate) on it nor measure it. scikit-learn warns and goes on; so does this,
    in every fold's ``note`` (which ``attnfuse train`` prints), naming the classes and how many
    folds lack each.
    """
    # scikit-learn takes seconds to import: only for the commands that use folds.
    from sklearn.model_selection import KFold, StratifiedKFold

    k = check_int("folds", k, 2)
    if data.split is None:
        pool, fixed_test = np.arange(data.n), None
    else:
        parts = _column_parts(data)
        pool, fixed_test = np.sort(np.concatenate([parts["train"], parts["valid"]])), parts["test"]
    if pool.size < k:
        raise ValueError(f"folds: k={k} folds need at least {k} samples to divide, got {pool.size}")
    labels = _stratify(data)
    if labels is not None:
        largest = int(np.bincount(labels[pool]).max())
        if largest < k:
            raise ValueError(f"folds: k={k} is more than the samples of every class (the largest has {largest})")
        splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    else:
        splitter = KFold(n_splits=k, shuffle=True, random_state=seed)

    with warnings.catch_warnings():  # a class smaller than k: sklearn warns, its rows spread as they can
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        folds = list(splitter.split(pool, None if labels is None else labels[pool]))
    shortage = _shortage(data, labels, pool, folds, k, "test" if fixed_test is None else "validation")
    out = []
    for i, (rest, held) in enumerate(folds):
        rest, held = np.sort(pool[rest]), np.sort(pool[held])
        if fixed_test is not None:
            rows = {"train": rest, "valid": held, "test": fixed_test}
            note = f"fold {i + 1} of {k}: validation on part {i + 1} of the train+valid rows; the test rows fixed"
        else:
            train, valid = carve_valid(data, rest, _fold_seed(seed, i), valid_fraction)
            rows = {"train": train, "valid": valid, "test": held}
            note = f"fold {i + 1} of {k}: test on part {i + 1}; validation carved out of the other parts"
        out.append(Split(rows, "fold", f"{note}; {shortage}" if shortage else note))
    return out


def bags(data: MultimodalDataset, split: Mapping[str, np.ndarray], k: int, seed: int) -> list[Split]:
    """K bags of one split for out-of-fold training (bagging): its train + valid rows cut into K
    parts (stratified for classification, shuffled by ``seed``); bag i validates on part i and
    trains on the other K-1; the test rows stay the test part of every bag. Every train + valid row
    is validated on by exactly one bag. A class with fewer rows than K: a ValueError naming it."""
    from sklearn.model_selection import KFold, StratifiedKFold

    k = check_int("bags", k, 2)
    pool = np.sort(np.concatenate([np.asarray(split["train"]), np.asarray(split["valid"])]))
    labels = _stratify(data)
    if labels is not None:
        counts = np.bincount(labels[pool])
        present = counts[counts > 0]
        if present.min() < k:
            raise ValueError(
                f"bags: k={k} bags need at least {k} rows of every class, the smallest has {present.min()}"
            )
        splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    else:
        if pool.size < 2 * k:
            raise ValueError(f"bags: k={k} bags need at least {2 * k} train + valid rows, got {pool.size}")
        splitter = KFold(n_splits=k, shuffle=True, random_state=seed)
    out = []
    for i, (rest, held) in enumerate(splitter.split(pool, None if labels is None else labels[pool])):
        rows = {"train": np.sort(pool[rest]), "valid": np.sort(pool[held]), "test": np.asarray(split["test"])}
        out.append(Split(rows, "fold", f"bag {i + 1} of {k}: validation on part {i + 1} of the train+valid rows"))
    return out


def _shortage(
    data: MultimodalDataset, labels: np.ndarray | None, pool: np.ndarray, folds: list, k: int, part: str
) -> str:
    """One line on the classes with fewer samples than k, and how many held-out parts lack each
    ("" when every class fills every fold)."""
    if labels is None:
        return ""
    counts = np.bincount(labels[pool])
    small = np.flatnonzero((counts > 0) & (counts < k))
    if small.size == 0:
        return ""
    held_classes = [set(np.unique(labels[pool[held]]).tolist()) for _, held in folds]
    names = data.classes if data.classes is not None else list(range(counts.size))
    names = [n.item() if isinstance(n, np.generic) else n for n in names]  # 'rare', not np.str_('rare')
    each = [
        f"class {names[c]!r} has {counts[c]} sample{'s' if counts[c] != 1 else ''} "
        f"({sum(int(c) not in h for h in held_classes)} of the {k} {part} parts lack it)"
        for c in small[:3]
    ]
    more = f" and {small.size - 3} more classes" if small.size > 3 else ""
    fewest = int(counts[small].min())
    advice = ""
    if fewest >= 2:
        advice = f"; --folds {fewest}{' or fewer' if fewest > 2 else ''} would hold every class in every part"
    return (
        f"warning: fewer samples than folds: {', '.join(each)}{more}; those folds' {part} metrics "
        f"do not measure {'it' if small.size == 1 else 'them'}{advice}"
    )


def _fold_seed(seed: int, fold: int) -> int:
    """A seed per fold, so each fold's carve is independent and reproducible."""
    return int(np.random.SeedSequence([seed, fold]).generate_state(1)[0])


def halve_valid(data: MultimodalDataset, split: Mapping[str, np.ndarray], seed: int) -> tuple[Split, np.ndarray]:
    """``split`` with its validation rows cut in two halves (stratified for classification,
    shuffled by ``seed``): the split whose ``"valid"`` is the first half, and the second half's rows.

    Early stopping picks each model's epoch on the first half; the second half is left to judge the
    trained models on rows that chose nothing (:func:`attnfuse.fit.weigh`)."""
    valid = np.asarray(split["valid"])
    if valid.size < 2:
        raise ValueError(f"halve_valid: 2 validation rows at least are needed to halve them, got {valid.size}")
    order = _shuffled(valid, _stratify(data), np.random.default_rng(seed))
    stopping, held = np.sort(order[: valid.size // 2]), np.sort(order[valid.size // 2 :])
    rows = {**{k: np.asarray(v) for k, v in split.items()}, "valid": stopping}
    how, note = (split.how, split.note) if isinstance(split, Split) else ("drawn", "")
    return Split(rows, how, note), held
