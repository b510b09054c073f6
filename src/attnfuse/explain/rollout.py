"""Attention rollout (Abnar & Zuidema, 2020): how much of what the model pools traces back to
each input token, through every attention layer and its residual connection.

One layer's attention A (heads averaged, ``(N, N)`` over the tokens it reads and writes) moves
information between tokens, and the residual connection keeps each token's own part. Rollout
models a layer as Ã = ½ A + ½ I (rows renormalised) and multiplies the layers:

    R = Ã_L · … · Ã_2 · Ã_1,     R[i, j] = share of token i's output that came from input token j

A raw map shows one layer; R accounts for the mixing of all of them. Tokens a layer does not
update (the context of a cross-attention stack, which is the same embedding at every layer) keep
an identity row. Consequences, per fusion:

* ``self``: one encoder over all tokens; R is the classic rollout. The pooled vector's relevance
  is the mean of R's rows over the valid tokens (the ``[CLS]`` row for ``cls`` pooling; for
  ``attention`` pooling the learned pooling weights are not returned, so the mean stands in).
* ``cross``: the query tokens attend only to the context, and the context never changes, so
  rollout of a cross stack is ½^L on the query token itself (its residual) plus a weighted mean
  of the layers' maps, later layers weighing more (½, ¼, … from the last layer down). With one
  layer, the context part is that layer's map.
* ``bicross``: both directions update at once, Ã = ½ I + ½ [[0, A_ab], [A_ba, 0]] over [a; b].
* ``mult``: per target modality t, each cross stack t->s is rolled out over [t; s], the
  concatenation of the sources' outputs is taken as their equal mix (an approximation: the
  sources are concatenated along features, not averaged), then the self stack over t's tokens is
  rolled out on top; the targets' pooled vectors are averaged.

Rollout, like attention, ignores the values and the feed-forward layers: it is a picture of the
routing, not of what the routed values contribute (compare it with :mod:`.gradients`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..data import Batch, iter_batches
from ..fusion import BiCrossFusion, CrossModalFusion, FusionModel, MulTFusion, SelfAttentionFusion
from ..modules import AttentionMap
from ._common import fusion_name, model_device, to_numpy, token_modality, token_valid
from .attention import require_attention

__all__ = ["Rollout", "attention_rollout", "rollout_stack", "RESIDUAL"]

RESIDUAL = 0.5  # Abnar & Zuidema (2020): Ã = 0.5 A + 0.5 I


@dataclass
class Rollout:
    """Rollout of a model's attention for B samples.

    tokens: the model's input tokens (every modality's, ``[CLS]`` first when the model has one).
    valid ``(B, N)``: which are real for each sample. relevance ``(B, N)``: the share of the pooled
    representation that traces back to each input token (each row sums to 1; all 0 for a sample
    whose pooled vector does not come from attention, e.g. a ``cross`` sample without its query
    modality). stacks (only with ``keep_stacks``): stack name -> (row tokens, column tokens,
    ``(B, L, N_s)``) the rolled-out map of each attention stack on its own, over the tokens it
    reads (for ``cross``/``bicross``: the rows of the pooled query tokens).
    """

    tokens: list[str]
    valid: np.ndarray
    relevance: np.ndarray
    stacks: dict[str, tuple[list[str], list[str], np.ndarray]]

    def modality_share(self) -> dict[str, float]:
        """Modality -> share of the relevance mass over all samples (sums to 1)."""
        mass = self.relevance.sum(axis=0)  # (N,)
        out: dict[str, float] = {}
        for j, token in enumerate(self.tokens):
            mod = token_modality(token)
            out[mod] = out.get(mod, 0.0) + float(mass[j])
        total = float(mass.sum())
        return {m: v / total if total > 0 else float("nan") for m, v in out.items()}

    def step_relevance(self, modality: str) -> np.ndarray:
        """``(B, T)`` relevance of the modality's steps, normalised to sum to 1 within the modality
        for each sample (rows of 0 where the modality got none)."""
        cols = [j for j, t in enumerate(self.tokens) if token_modality(t) == modality]
        if not cols:
            raise ValueError(
                f"modality: expected one of {sorted(set(map(token_modality, self.tokens)))}, got {modality!r}"
            )
        r = self.relevance[:, cols]
        total = r.sum(axis=1, keepdims=True)
        return np.divide(r, total, out=np.zeros_like(r), where=total > 0)


def rollout_stack(layers: list[list[AttentionMap]], tokens: list[str], residual: float = RESIDUAL) -> Tensor:
    """Rollout of one stack over ``tokens`` (N labels): ``(B, N, N)``, R[b, i, j] = share of token
    i's final state that came from token j's input.

    ``layers[l]`` holds the maps of layer l (one for a self or cross block, two for a
    bidirectional one); each map's query rows are updated as ``residual · own + (1 - residual) ·
    attention`` over its keys; tokens no map of the layer queries pass through unchanged.
    """
    index = {t: i for i, t in enumerate(tokens)}
    first = layers[0][0].weights
    b, n = first.shape[0], len(tokens)
    eye = torch.eye(n, dtype=torch.float64, device=first.device)
    rolled = eye.expand(b, n, n)
    for layer in layers:
        step = eye.repeat(b, 1, 1)  # (B, N, N)
        for m in layer:
            rows = torch.tensor([index[t] for t in m.query_tokens], device=first.device)
            cols = torch.tensor([index[t] for t in m.key_tokens], device=first.device)
            w = m.weights.double().mean(dim=1)  # (B, L, S), heads averaged
            block = torch.zeros(b, len(rows), n, dtype=torch.float64, device=first.device)
            block[:, torch.arange(len(rows)), rows] = residual
            block[:, :, cols] += (1.0 - residual) * w
            step[:, rows] = block
        # A query that saw no key (all masked) keeps only its residual: renormalise its row to 1.
        step = step / step.sum(dim=-1, keepdim=True)
        rolled = step @ rolled
    return rolled


def _stacks(maps: list[AttentionMap]) -> dict[str, list[list[AttentionMap]]]:
    """stack name -> its layers in order, from names like "cross:text->video/layer1"."""
    stacks: dict[str, dict[int, list[AttentionMap]]] = defaultdict(dict)
    for m in maps:
        stack, layer = m.name.rsplit("/layer", 1)
        stacks[stack].setdefault(int(layer), []).append(m)
    return {s: [layers[i] for i in sorted(layers)] for s, layers in stacks.items()}


def _mean_rows(r: Tensor, valid: Tensor) -> Tensor:
    """``(B, L, N)`` rows averaged over the valid ones ``(B, L)`` -> ``(B, N)`` (0 if none)."""
    w = valid.double().unsqueeze(-1)
    return (r * w).sum(1) / w.sum(1).clamp_min(1.0)


def _scatter(r: Tensor, cols: list[str], tokens: list[str]) -> Tensor:
    """``(B, L, len(cols))`` -> ``(B, L, len(tokens))``: columns placed at their tokens' positions."""
    out = r.new_zeros(*r.shape[:2], len(tokens))
    out[:, :, [tokens.index(c) for c in cols]] = r
    return out


Rolled = dict[str, tuple[list[str], list[str], Tensor]]  # stack -> (rows, columns, (B, L, N_s))


def _self_relevance(model: SelfAttentionFusion, stacks: dict, batch: Batch, residual: float) -> tuple:
    """One encoder over every token; the pooled vector reads its rows as the pooling does."""
    ((name, layers),) = stacks.items()
    own = layers[0][0].query_tokens  # ([CLS] +) every modality's tokens
    r = rollout_stack(layers, own, residual)
    valid = layers[0][0].query_valid
    if model.config.pooling == "cls":
        relevance = r[:, 0]
    elif model.config.pooling == "modality":  # per-modality means, concatenated: each present one counts alike
        mods = [token_modality(t) for t in own]
        per_mod = [
            _mean_rows(r, valid & torch.tensor([m == n for m in mods], device=valid.device)) for n in model.specs
        ]
        present = torch.stack([batch.mask[n].any(dim=1) for n in model.specs], dim=1)  # (B, M)
        relevance = torch.stack(per_mod, dim=1).sum(1) / present.sum(1, keepdim=True).clamp_min(1)
    else:  # mean (and attention pooling, whose learned weights the model does not return)
        relevance = _mean_rows(r, valid)
    return own, relevance, {name: (own, own, r)}


def _cross_relevance(
    model: CrossModalFusion | BiCrossFusion, stacks: dict, tokens: list[str], residual: float
) -> tuple:
    """Query tokens over [query; context]; for bicross both directions update in the same layer."""
    (name, layers), *rest = stacks.items()
    layers = [[m for part in group for m in part] for group in zip(layers, *(s for _, s in rest))]
    first = layers[0]
    own = first[0].query_tokens + first[0].key_tokens
    r = rollout_stack(layers, own, residual)
    pooled = [t for m in first for t in m.query_tokens]  # the tokens the model pools
    rows = r[:, [own.index(t) for t in pooled]]
    valid = torch.cat([m.query_valid for m in first], dim=1)
    if rest:
        name = f"cross:{model.config.query}<->{'+'.join(model.config.context)}"
    relevance = _scatter(_mean_rows(rows, valid)[:, None], own, tokens)[:, 0]
    return tokens, relevance, {name: (pooled, own, rows)}


def _mult_relevance(model: MulTFusion, stacks: dict, tokens: list[str], residual: float) -> tuple:
    """Per target t: its cross stacks, mixed equally, then its self stack; targets averaged."""
    rolled: Rolled = {}
    per_target, present = [], []
    for t in model.specs:
        t_tokens = model.labels[t]
        sources = [s for s in model.specs if s != t]
        mixed = 0.0
        for s in sources:
            own = t_tokens + model.labels[s]
            r = rollout_stack(stacks[f"cross:{t}->{s}"], own, residual)[:, : len(t_tokens)]  # (B, T_t, T_t + T_s)
            rolled[f"cross:{t}->{s}"] = (t_tokens, own, r)
            mixed = mixed + _scatter(r, own, tokens) / len(sources)  # (B, T_t, N)
        r_self = rollout_stack(stacks[f"self:{t}"], t_tokens, residual)  # (B, T_t, T_t)
        rolled[f"self:{t}"] = (t_tokens, t_tokens, r_self)
        valid = stacks[f"self:{t}"][0][0].query_valid
        per_target.append(_mean_rows(r_self @ mixed, valid))
        present.append(valid.any(dim=1))
    weight = torch.stack(present, dim=1).double().unsqueeze(-1)  # (B, M, 1): an absent target is a learned vector
    relevance = (torch.stack(per_target, dim=1) * weight).sum(1) / weight.sum(1).clamp_min(1.0)
    return tokens, relevance, rolled


def _relevance(model: FusionModel, maps: list[AttentionMap], batch: Batch, residual: float) -> tuple:
    """(input tokens, ``(B, N)`` relevance, stack name -> (rows, columns, ``(B, L, N_s)``))."""
    stacks = _stacks(maps)
    tokens = [t for n in model.specs for t in model.labels[n]]
    if isinstance(model, SelfAttentionFusion):
        return _self_relevance(model, stacks, batch, residual)
    if isinstance(model, (CrossModalFusion, BiCrossFusion)):
        return _cross_relevance(model, stacks, tokens, residual)
    if isinstance(model, MulTFusion):
        return _mult_relevance(model, stacks, tokens, residual)
    raise ValueError(f"model: rollout is defined for self, cross, bicross and mult fusions, got '{fusion_name(model)}'")


@torch.no_grad()
def attention_rollout(
    model: FusionModel, batch: Batch, residual: float = RESIDUAL, batch_size: int = 256, keep_stacks: bool = False
) -> Rollout:
    """Roll out the attention of every sample of ``batch`` (chunked, on the model's device;
    results on the CPU). See the module's docstring for what rollout means for each fusion.
    ``keep_stacks``: also return each stack's rolled-out map per sample (``(B, L, N_s)`` each:
    for a few samples; over a large split they take much memory)."""
    require_attention(model)
    if not 0.0 <= residual < 1.0:
        raise ValueError(f"residual: expected a value in [0, 1), got {residual}")
    model.eval()
    device = model_device(model)
    tokens: list[str] = []
    relevance, valid = [], []
    stacks: dict[str, list] = {}
    labels: dict[str, tuple[list[str], list[str]]] = {}
    for chunk in iter_batches(batch, batch_size):
        chunk = chunk.to(device)
        _, maps = model(chunk, return_attention=True)
        tokens, rel, rolled = _relevance(model, maps, chunk, residual)
        relevance.append(to_numpy(rel))
        valid.append(to_numpy(token_valid(tokens, chunk.mask)))
        for name, (rows, cols, r) in rolled.items() if keep_stacks else ():
            labels[name] = (rows, cols)
            stacks.setdefault(name, []).append(to_numpy(r.float()))
    return Rollout(
        tokens=tokens,
        valid=np.concatenate(valid),
        relevance=np.concatenate(relevance),
        stacks={name: (*labels[name], np.concatenate(parts)) for name, parts in stacks.items()},
    )
