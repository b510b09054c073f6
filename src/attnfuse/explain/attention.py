"""Where a trained model's attention looked: its named maps for chosen samples, the attention
between modalities and between steps averaged over a split, and a bertviz export.

Attention weights say where each query token drew its values from in one block; they are not by
themselves an explanation of the prediction (Jain & Wallace, 2019; Wiegreffe & Pinter, 2019), which
is why :mod:`.masking`, :mod:`.gradients` and :mod:`.rollout` sit next to them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..data import Batch, iter_batches
from ..fusion import FusionModel
from ..modules import AttentionMap
from ._common import fusion_name, model_device, to_numpy, token_modality, token_valid

__all__ = [
    "collect_maps",
    "ModalityAttention",
    "modality_attention",
    "bertviz_export",
    "require_attention",
    "key_valid",
]


def require_attention(model: FusionModel) -> None:
    """ValueError for a model without attention (``concat``): it has no maps to show."""
    if not model.has_attention:
        raise ValueError(
            f"model: the '{fusion_name(model)}' fusion has no attention to show (it pools and concatenates); "
            f"masking and gradient attribution apply to it, attention views need an attention fusion "
            f"(self, cross, bicross, mult)"
        )


def _cpu(m: AttentionMap) -> AttentionMap:
    return AttentionMap(m.name, m.weights.detach().cpu(), m.query_tokens, m.key_tokens, m.query_valid.cpu())


@torch.no_grad()
def collect_maps(model: FusionModel, batch: Batch) -> tuple[torch.Tensor, list[AttentionMap]]:
    """Outputs ``(B, out_dim)`` and the attention maps (weights ``(B, H, L, S)``) for the (few)
    samples of ``batch``, computed on the model's device and returned on the CPU."""
    require_attention(model)
    model.eval()
    outputs, maps = model(batch.to(model_device(model)), return_attention=True)
    return outputs.cpu(), [_cpu(m) for m in maps]


def key_valid(m: AttentionMap, batch: Batch) -> torch.Tensor:
    """``(B, S)`` bool: which of the map's keys are real tokens of each sample (padded steps and
    absent modalities are False; they got weight exactly 0, which is not the same as "ignored")."""
    return token_valid(m.key_tokens, batch.mask)


@dataclass
class ModalityAttention:
    """Attention over a set of samples, by modality and by step.

    matrices: block name -> (query modalities, key modalities, ``(Mq, Mk)`` array): row qm is how
    the attention of qm's valid tokens is spread over the key modalities (each row sums to 1).
    received: modality -> share of all attention (every block, head and valid query) landing on
    its tokens (the shares sum to 1, less the share of queries that could see no key at all).
    steps: block name -> (query tokens, key tokens, ``(L, S)`` array): the head-averaged weight of
    query step i on key step j, averaged over the samples where query i is valid.
    key_valid: block name -> ``(S,)`` fraction of the samples in which key j is a real token
    (padding and absent modalities lower it).
    """

    matrices: dict[str, tuple[list[str], list[str], np.ndarray]]
    received: dict[str, float]
    steps: dict[str, tuple[list[str], list[str], np.ndarray]]
    key_valid: dict[str, np.ndarray]


@torch.no_grad()
def modality_attention(model: FusionModel, batch: Batch, batch_size: int = 256) -> ModalityAttention:
    """Aggregate a model's attention over all samples of ``batch``, chunk by chunk (the per-token
    maps of a whole split are never held at once), on the model's device."""
    require_attention(model)
    model.eval()
    device = model_device(model)
    step_sums: dict[str, torch.Tensor] = {}  # block -> (L, S) summed head-mean weights of valid queries
    query_counts: dict[str, torch.Tensor] = {}  # block -> (L,) samples in which query i is valid
    key_counts: dict[str, torch.Tensor] = {}  # block -> (S,) samples in which key j is valid
    tokens: dict[str, tuple[list[str], list[str]]] = {}
    for chunk in iter_batches(batch, batch_size):
        chunk = chunk.to(device)
        _, maps = model(chunk, return_attention=True)
        for m in maps:
            w = m.weights.mean(dim=1).double() * m.query_valid.unsqueeze(-1)  # (B, L, S): padded queries dropped
            if m.name not in tokens:
                tokens[m.name] = (m.query_tokens, m.key_tokens)
                step_sums[m.name] = torch.zeros(w.shape[1:], dtype=torch.float64, device=device)
                query_counts[m.name] = torch.zeros(w.shape[1], dtype=torch.float64, device=device)
                key_counts[m.name] = torch.zeros(w.shape[2], dtype=torch.float64, device=device)
            step_sums[m.name] += w.sum(0)
            query_counts[m.name] += m.query_valid.double().sum(0)
            key_counts[m.name] += key_valid(m, chunk).double().sum(0)

    matrices, steps, valid_fraction = {}, {}, {}
    received_sum: dict[str, float] = {}
    total = 0.0
    for name, (q_tokens, k_tokens) in tokens.items():
        sums, counts = to_numpy(step_sums[name]), to_numpy(query_counts[name])  # (L, S), (L,)
        steps[name] = (q_tokens, k_tokens, sums / np.maximum(counts, 1.0)[:, None])
        valid_fraction[name] = to_numpy(key_counts[name]) / len(batch)
        q_mods, q_index = _group(q_tokens)
        k_mods, k_index = _group(k_tokens)
        by_key = np.zeros((len(q_tokens), len(k_mods)))
        np.add.at(by_key.T, k_index, sums.T)  # (L, Mk): weights summed over each key modality's tokens
        by_both = np.zeros((len(q_mods), len(k_mods)))
        np.add.at(by_both, q_index, by_key)  # (Mq, Mk)
        n_valid = np.bincount(q_index, weights=counts, minlength=len(q_mods))  # (Mq,)
        matrices[name] = (q_mods, k_mods, by_both / np.maximum(n_valid, 1.0)[:, None])
        for j, km in enumerate(k_mods):
            received_sum[km] = received_sum.get(km, 0.0) + float(by_both[:, j].sum())
        total += float(counts.sum())
    received = {k: v / max(total, 1.0) for k, v in received_sum.items()}
    return ModalityAttention(matrices, received, steps, valid_fraction)


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
