"""Class labels: which labels are used as they are, and the encoding of the others to 0..C-1.

The rule (:func:`class_codes`):

* integer labels that are exactly ``0..C-1`` (every value present) are used as they are;
* any other labels (gaps such as ``{1, 2, 5}``, negative values, huge ones such as ``10**9``,
  strings from a table) are encoded to ``0..C-1`` in sorted order, and the original values are
  kept in ``classes`` (``classes[code]`` is the original label), so predictions can be decoded;
* more than :data:`MAX_CLASSES` distinct labels is an error (a regression target or an ID column
  read as classes would otherwise build a head with millions of outputs);
* when the task was inferred from the labels' dtype (``task="auto"``), more than
  :data:`MANY_CLASSES` distinct labels that are also more than half the samples is an error too:
  integer regression targets and ID columns look like that (``task="classification"`` insists).

A trained model's label space is given either as its ``classes`` list (labels are encoded with
it; a label the model has never seen is an error) or as ``num_classes`` (integer labels
``0..num_classes-1`` used as they are).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..checks import check_int

__all__ = ["MAX_CLASSES", "ClassLabels", "class_codes", "decode_labels", "encode_labels"]

MAX_CLASSES = 10_000
MANY_CLASSES = 100


def _as_label_array(y: np.ndarray) -> np.ndarray:
    """(N,) labels as int64 (bools, whole floats, ints) or str; anything else is a TypeError."""
    if y.dtype.kind == "b":
        return y.astype(np.int64)
    if y.dtype.kind in "iu":
        return y.astype(np.int64, copy=False)
    if y.dtype.kind == "f":
        # Float labels are accepted only when they are whole numbers (e.g. read from a CSV).
        bad = ~np.isfinite(y) | (y != np.round(y))
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            raise ValueError(f"y: task='classification' needs integer labels, got {y[first]!r} at sample {first}")
        return y.astype(np.int64)
    if y.dtype.kind in "US":
        return y.astype(str)
    if y.dtype.kind == "O":
        kinds = {type(v).__name__ for v in y.tolist()}
        if kinds <= {"str"}:
            return y.astype(str)
        raise TypeError(
            f"y: expected class labels that are all strings or all numbers, got Python types {sorted(kinds)}"
        )
    raise TypeError(f"y: expected integer, whole-number or string class labels, got dtype {y.dtype}")


def encode_labels(y: np.ndarray, classes: Sequence | None = None) -> tuple[np.ndarray, list]:
    """Labels (N,) -> (codes (N,) int64 in 0..C-1, classes) with ``classes[code]`` the original label.

    Without ``classes`` the classes are the sorted distinct labels. With ``classes`` (e.g. a
    trained model's) every label must be one of them: the error names the first that is not.
    """
    y = _as_label_array(np.asarray(y).reshape(-1))
    if classes is None:
        values, codes = np.unique(y, return_inverse=True)
        return codes.astype(np.int64), values.tolist()
    known = _as_label_array(np.asarray(list(classes)))
    if known.size == 0 or np.unique(known).size != known.size:
        raise ValueError(f"classes: expected distinct labels, got {list(classes)[:20]}")
    if (known.dtype.kind == "U") != (y.dtype.kind == "U"):
        kind = "strings" if y.dtype.kind == "U" else "numbers"
        raise ValueError(f"y: the labels are {kind}, the classes are not: {list(classes)[:20]}")
    order = np.argsort(known, kind="stable")
    pos = np.searchsorted(known[order], y).clip(0, known.size - 1)
    unknown = known[order][pos] != y
    if unknown.any():
        first = int(np.flatnonzero(unknown)[0])
        shown = ", ".join(map(repr, list(classes)[:20])) + (", ..." if known.size > 20 else "")
        raise ValueError(f"y: label {y[first].item()!r} at sample {first} is not one of the classes [{shown}]")
    codes = order[pos]
    return codes.astype(np.int64), list(classes)


def decode_labels(codes: np.ndarray, classes: Sequence | None) -> np.ndarray:
    """Codes (N,) in 0..C-1 -> the original labels ``classes[code]`` (N,); identity without classes."""
    codes = np.asarray(codes)
    if classes is None:
        return codes
    if codes.dtype.kind not in "iu":
        raise TypeError(f"codes: expected integer class codes, got dtype {codes.dtype}")
    table = np.asarray(list(classes))
    if codes.size and (codes.min() < 0 or codes.max() >= table.size):
        raise ValueError(f"codes: expected values in [0, {table.size}), got range [{codes.min()}, {codes.max()}]")
    return table[codes]


@dataclass(frozen=True)
class ClassLabels:
    """Labels checked for classification: ``codes`` (N,) int64 in 0..num_classes-1 and ``classes``
    (``classes[code]`` is the original label; ``[0, 1, ..., C-1]`` when the labels were used as
    they are)."""

    codes: np.ndarray
    classes: list
    num_classes: int

    @property
    def encoded(self) -> bool:
        """True when the original labels differ from the codes (they must be decoded for output)."""
        return self.classes != list(range(self.num_classes))


def _check_num_classes(num_classes: object) -> int:
    return check_int("num_classes", num_classes, 2, MAX_CLASSES)


def class_codes(
    y: np.ndarray, *, inferred: bool = False, num_classes: int | None = None, classes: Sequence | None = None
) -> ClassLabels:
    """Check classification labels (N,) and encode them when needed (see the module's rule).

    ``inferred``: the task was inferred from y's dtype (enables the "looks like regression"
    check). ``num_classes`` / ``classes``: a trained model's label space.
    """
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"y: classification labels must have shape (N,), got {y.shape}")
    labels = _as_label_array(y)
    if classes is not None:
        if isinstance(classes, (str, bytes)) or not isinstance(classes, Sequence):
            raise TypeError(f"classes: expected a list of the original labels, got {type(classes).__name__}")
        _check_num_classes(len(classes))
        if num_classes is not None and num_classes != len(classes):
            raise ValueError(f"num_classes: {num_classes} does not match the {len(classes)} classes given")
        codes, known = encode_labels(labels, classes)
        return ClassLabels(codes, known, len(known))
    if num_classes is not None:
        num_classes = _check_num_classes(num_classes)
        if labels.dtype.kind == "U":
            raise ValueError("y: string labels need the model's list of classes, got only num_classes")
        if (labels < 0).any():
            first = int(np.flatnonzero(labels < 0)[0])
            raise ValueError(f"y: class labels must be >= 0, got {labels[first]} at sample {first}")
        if labels.max() >= num_classes:
            first = int(np.flatnonzero(labels >= num_classes)[0])
            raise ValueError(
                f"y: class labels must be < num_classes={num_classes}, got {labels[first]} at sample {first}"
            )
        return ClassLabels(labels, list(range(num_classes)), num_classes)

    codes, found = encode_labels(labels)
    count = len(found)
    if count < 2:
        raise ValueError(f"y: classification needs at least 2 classes, got only the label {found[0]!r}")
    if count > MAX_CLASSES:
        raise ValueError(
            f"y: {count:,} distinct class labels, more than the {MAX_CLASSES:,} a classifier here may have; "
            "is y a regression target or an ID? (task='regression')"
        )
    if inferred and count > max(MANY_CLASSES, labels.size // 2):
        raise ValueError(
            f"y: {count:,} distinct labels in {labels.size:,} samples look like a regression target or an ID, "
            "not classes: pass task='regression' (or task='classification' to insist)"
        )
    if found == list(range(count)):  # already 0..C-1: used as they are
        return ClassLabels(labels, found, count)
    return ClassLabels(codes, found, count)
