"""Seeing the attention: where a trained model looked, and the arithmetic behind it.

* :func:`walkthrough` — the notes' numeric examples done exactly: every dot product, the scaling
  by √d_k, the softmax and the weighted sum (the same function the models run, in float64).
* :func:`collect_maps` — a model's named attention maps for chosen samples.
* :func:`modality_attention` — per block, how much each modality's tokens attend to each other
  modality's (averaged over heads, over valid query tokens and over a data split), and the share
  of all attention each modality receives.
* :func:`bertviz_export` — the maps in the layout of bertviz's ``head_view`` / ``model_view``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .data.dataset import Batch, iter_batches
from .fusion import FUSIONS, FusionModel
from .modules import AttentionMap
from .nn.functional import scaled_dot_product_attention

__all__ = [
    "Walkthrough",
    "walkthrough",
    "parse_vectors",
    "collect_maps",
    "ModalityAttention",
    "modality_attention",
    "token_modality",
    "bertviz_export",
    "require_attention",
]


# ---------------------------------------------------------------------------------------------
# The notes' worked examples
# ---------------------------------------------------------------------------------------------


@dataclass
class Walkthrough:
    """Every intermediate of softmax(Q Kᵀ / √d_k) V for small hand-made vectors (float64).

    products: ``(L, S, d)`` the element-wise terms q_i[c]·k_j[c]; scores ``(L, S)`` their sums;
    scale: the factor the scores are multiplied by (1/√d_k, or 1 without scaling); weights
    ``(L, S)``; output ``(L, dv)``.
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
    """``"1,2;3,4"`` -> ``[[1, 2], [3, 4]]``: vectors separated by ';', entries by ','."""
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
    return np.array(vectors, dtype=np.float64)


def walkthrough(
    query: np.ndarray, keys: np.ndarray, values: np.ndarray | None = None, scale: bool = True
) -> Walkthrough:
    """Attention of each query row over the key rows, with every step kept.

    Shapes: query ``(L, d)``, keys ``(S, d)``, values ``(S, dv)`` (default: the keys, as in the
    notes' example where V = K).
    """
    values = keys if values is None else values
    if query.shape[1] != keys.shape[1]:
        raise ValueError(
            f"keys: expected vectors of length {query.shape[1]} (as the query), got length {keys.shape[1]}"
        )
    if values.shape[0] != keys.shape[0]:
        raise ValueError(f"values: expected {keys.shape[0]} vectors (one per key), got {values.shape[0]}")
    factor = 1.0 / math.sqrt(query.shape[1]) if scale else 1.0
    q, k, v = (torch.from_numpy(a) for a in (query, keys, values))
    out, weights = scaled_dot_product_attention(q, k, v, scale=factor, need_weights=True)
    products = query[:, None, :] * keys[None, :, :]  # (L, S, d)
    return Walkthrough(query, keys, values, products, products.sum(-1), factor, weights.numpy(), out.numpy())


# ---------------------------------------------------------------------------------------------
# Attention of a trained model
# ---------------------------------------------------------------------------------------------


def token_modality(label: str) -> str:
    """``"video[3]"`` -> ``"video"``; ``"text"`` -> ``"text"``; ``"[CLS]"`` stays."""
    return label if label.startswith("[") else label.split("[", 1)[0]


def require_attention(model: FusionModel) -> None:
    """ValueError for a model without attention (``concat``): there is nothing to explain."""
    if not model.has_attention:
        name = next((k for k, cls in FUSIONS.items() if type(model) is cls), type(model).__name__)
        raise ValueError(
            f"model: the '{name}' fusion has no attention to show (it pools and concatenates); "
            f"train an attention fusion (self, cross, bicross, mult) to explain it"
        )


@torch.no_grad()
def collect_maps(model: FusionModel, batch: Batch) -> tuple[torch.Tensor, list[AttentionMap]]:
    """Outputs ``(B, out_dim)`` and the attention maps for the (few) samples of ``batch``."""
    require_attention(model)
    model.eval()
    return model(batch, return_attention=True)


@dataclass
class ModalityAttention:
    """Modality-level attention over a set of samples.

    matrices: block name -> (query modalities, key modalities, ``(Mq, Mk)`` array): row qm is how
    the attention of qm's valid tokens is spread over the key modalities (each row sums to 1).
    received: modality -> share of all attention (every block, head and valid query) landing on
    its tokens (the shares sum to 1, less the share of queries that could see no key at all).
    """

    matrices: dict[str, tuple[list[str], list[str], np.ndarray]]
    received: dict[str, float]


@torch.no_grad()
def modality_attention(model: FusionModel, batch: Batch, batch_size: int = 256) -> ModalityAttention:
    """Aggregate a model's attention to modalities over all samples of ``batch``, chunk by chunk
    (the per-token maps of a whole split are never held at once)."""
    require_attention(model)
    model.eval()
    sums: dict[str, np.ndarray] = {}  # block -> (Mq, Mk) summed weights
    counts: dict[str, np.ndarray] = {}  # block -> (Mq,) valid query tokens
    axes: dict[str, tuple[list[str], list[str], np.ndarray, np.ndarray]] = {}
    for chunk in iter_batches(batch, batch_size):
        _, maps = model(chunk, return_attention=True)
        for m in maps:
            if m.name not in axes:
                q_mods, q_index = _group(m.query_tokens)
                k_mods, k_index = _group(m.key_tokens)
                axes[m.name] = (q_mods, k_mods, q_index, k_index)
                sums[m.name] = np.zeros((len(q_mods), len(k_mods)))
                counts[m.name] = np.zeros(len(q_mods))
            q_mods, k_mods, q_index, k_index = axes[m.name]
            w = m.weights.mean(dim=1).double()  # (B, L, S), heads averaged
            w = w * m.query_valid.unsqueeze(-1)  # drop padded / absent query rows
            # Sum over keys of each key modality, then over queries of each query modality.
            by_key = torch.zeros(*w.shape[:2], len(k_mods), dtype=w.dtype).index_add_(2, torch.from_numpy(k_index), w)
            by_both = torch.zeros(len(q_mods), len(k_mods), dtype=w.dtype).index_add_(
                0, torch.from_numpy(q_index), by_key.sum(0)
            )
            n_valid = torch.zeros(len(q_mods), dtype=w.dtype).index_add_(
                0, torch.from_numpy(q_index), m.query_valid.double().sum(0)
            )
            sums[m.name] += by_both.numpy()
            counts[m.name] += n_valid.numpy()

    matrices, received_sum, total = {}, {}, 0.0
    for name, (q_mods, k_mods, _, _) in axes.items():
        matrices[name] = (q_mods, k_mods, sums[name] / np.maximum(counts[name], 1.0)[:, None])
        for j, km in enumerate(k_mods):
            received_sum[km] = received_sum.get(km, 0.0) + sums[name][:, j].sum()
        total += counts[name].sum()
    received = {k: v / max(total, 1.0) for k, v in received_sum.items()}
    return ModalityAttention(matrices, received)


def _group(labels: list[str]) -> tuple[list[str], np.ndarray]:
    """Modalities in order of first appearance, and each token's modality index."""
    mods: list[str] = []
    index = []
    for label in labels:
        mod = token_modality(label)
        if mod not in mods:
            mods.append(mod)
        index.append(mods.index(mod))
    return mods, np.array(index, dtype=np.int64)


def bertviz_export(maps: list[AttentionMap], sample: int) -> dict:
    """One sample's maps in bertviz's layout: per block a ``(1, H, L, S)`` nested list with its
    token labels. Self-attention blocks that share tokens are grouped so that
    ``model_view(attention=[torch.tensor(a) for a in group["attention"]], tokens=group["tokens"])``
    shows them as layers; cross blocks fit ``head_view(cross_attention=..., encoder_tokens=...,
    decoder_tokens=...)``."""
    groups: dict[str, dict] = {}
    cross = []
    for m in maps:
        w = m.weights[sample : sample + 1].tolist()  # (1, H, L, S)
        if m.query_tokens == m.key_tokens:
            stack = m.name.rsplit("/layer", 1)[0]
            group = groups.setdefault(stack, {"name": stack, "tokens": m.query_tokens, "layers": [], "attention": []})
            group["layers"].append(m.name)
            group["attention"].append(w)
        else:
            cross.append({"name": m.name, "attention": w, "query_tokens": m.query_tokens, "key_tokens": m.key_tokens})
    return {"format": "bertviz", "self": list(groups.values()), "cross": cross}
