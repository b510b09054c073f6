"""The attention arithmetic done by hand: softmax(Q Kᵀ / √d_k) V (Vaswani et al., 2017, eq. 1) for
a few small vectors, with every intermediate kept so that a learner can check each step."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..nn.functional import scaled_dot_product_attention

__all__ = ["Walkthrough", "walkthrough", "parse_vectors", "SOFTMAX_NEVER_ONE_HOT"]

# Why a softmax row is never one-hot, as a learner meets it in the --self example [[1, 0], [0, 1]].
SOFTMAX_NEVER_ONE_HOT = (
    "softmax(z)_i = exp(z_i) / Σ_j exp(z_j), and exp is positive for every finite score, so each "
    "weight lies strictly between 0 and 1: attention is never exactly one-hot. For the scores [1, 0]: "
    "e/(e + 1) = 0.7311 and 1/(e + 1) = 0.2689; a weight approaches 1 only as the score gap grows "
    "(a gap of 8 gives 0.99966)."
)


@dataclass
class Walkthrough:
    """Every intermediate of softmax(Q Kᵀ / √d_k) V for small hand-made vectors (float64).

    query ``(L, d)``, keys ``(S, d)``, values ``(S, dv)``; products ``(L, S, d)``: the
    element-wise terms q_i[c]·k_j[c]; scores ``(L, S)``: their sums; scale: the factor the scores
    are multiplied by (1/√d_k, or 1 without scaling); weights ``(L, S)``; output ``(L, dv)``.
    """

    query: np.ndarray
    keys: np.ndarray
    values: np.ndarray
    products: np.ndarray
    scores: np.ndarray
    scale: float
    weights: np.ndarray
    output: np.ndarray


def parse_vectors(text: str, name: str) -> np.ndarray:
    """``"1,2;3,4"`` -> ``[[1, 2], [3, 4]]`` ``(n, d)`` float64: vectors separated by ';', entries
    by ','. ``name`` is the argument named in the error for bad text."""
    rows = [r for r in text.split(";") if r.strip()]
    if not rows:
        raise ValueError(f"{name}: expected vectors like '1,2;3,4', got {text!r}")
    try:
        vectors = [[float(v) for v in r.split(",")] for r in rows]
    except ValueError:
        raise ValueError(f"{name}: expected numbers separated by ',' and vectors by ';', got {text!r}") from None
    lengths = sorted({len(v) for v in vectors})
    if len(lengths) != 1:
        raise ValueError(f"{name}: expected vectors of one length, got lengths {lengths} in {text!r}")
    _check_finite(np.array(vectors, dtype=np.float64), name, text)
    return np.array(vectors, dtype=np.float64)


def _check_finite(a: np.ndarray, name: str, given: object) -> None:
    """``float()`` reads "nan" and "inf": a softmax of them is NaN, which no step can explain."""
    if not np.isfinite(a).all():
        bad = a[~np.isfinite(a)][0]
        raise ValueError(f"{name}: expected finite numbers, got {bad} in {given!r}")


def walkthrough(
    query: np.ndarray, keys: np.ndarray, values: np.ndarray | None = None, scale: bool = True
) -> Walkthrough:
    """Attention of each query row over the key rows, with every step kept.

    Shapes: query ``(L, d)``, keys ``(S, d)``, values ``(S, dv)`` (default: the keys, V = K).
    The weights and output come from the same :func:`scaled_dot_product_attention` the models run.
    """
    values = keys if values is None else values
    for name, a in (("query", query), ("keys", keys), ("values", values)):
        if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 1:
            raise ValueError(f"{name}: expected a non-empty (n, d) array, got shape {a.shape}")
        _check_finite(a, name, a.tolist())
    if query.shape[1] != keys.shape[1]:
        raise ValueError(
            f"keys: expected vectors of length {query.shape[1]} (as the query), got length {keys.shape[1]}"
        )
    if values.shape[0] != keys.shape[0]:
        raise ValueError(f"values: expected {keys.shape[0]} vectors (one per key), got {values.shape[0]}")
    factor = 1.0 / math.sqrt(query.shape[1]) if scale else 1.0
    with np.errstate(over="ignore", invalid="ignore"):
        products = query[:, None, :] * keys[None, :, :]  # (L, S, d)
        scores = products.sum(-1)
    # (The output, a weighted mean of the values, cannot overflow: its weights sum to 1.)
    if not np.isfinite(scores).all():
        raise ValueError(
            f"keys: the dot products q·k overflow float64 (largest |value| "
            f"{max(np.abs(query).max(), np.abs(keys).max()):g}); use smaller numbers"
        )
    q, k, v = (torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64)) for a in (query, keys, values))
    out, weights = scaled_dot_product_attention(q, k, v, scale=factor, need_weights=True)
    return Walkthrough(query, keys, values, products, scores, factor, weights.numpy(), out.numpy())
