"""The classical baselines (:mod:`attnfuse.baselines`) as torch modules that read a model's Batch.

A fitted scikit-learn baseline takes the pooled features of :func:`attnfuse.baselines.pooled_features`
(raw units, float64, NaN where a modality is absent, presence columns). Everything downstream of
training (predict, evaluate, explain, serve, export) calls ``model(batch)`` on a *standardised*
:class:`~attnfuse.data.Batch`, and a model directory holds safetensors weights and a JSON config,
never a pickle. So each baseline becomes an ``nn.Module`` whose ``forward(batch)`` returns
``(B, out_dim)`` float32 as a fusion model does, and reproduces the fitted estimator:

* :class:`LinearHead` (``ridge``, ``logistic``): imputer + scaler + linear model folded into one
  affine map; regression: values in target units ``(B, K)``; classification: logits equal to
  ``decision_function`` (binary: ``[0, d]``, whose softmax is ``predict_proba``).
* :class:`TreeHead` (``hist_gb``): the trees' node arrays, traversed for a fixed number of steps
  (the deepest leaf's depth) for every row and tree at once; the summed leaves plus the baseline
  prediction are scikit-learn's raw prediction (classification: logits, as above).

Classes the estimator never saw in its training rows (its ``classes_`` lacks them) get the logit
:data:`ABSENT_LOGIT`: probability ~0, yet finite (no NaN in a softmax or a loss).

Both are made of buffers only (nothing trainable) and have ``record()``, the JSON-able shapes, so
that ``build_head(record)`` rebuilds an empty head that ``load_state_dict`` fills without pickle.
``forward`` has no branch on the data (masks select with ``torch.where``), so it can be traced and
exported (``torch.export``, TorchScript tracing, ONNX).

Pooling and sums run in float64, and a tree sends a value within the rebuilt features' rounding
bound (:data:`ROUNDING`) of a threshold to the left. Gradient boosting's thresholds are often
training rows' own pooled values (its bins' edges are percentiles), which scikit-learn sends left
(``x <= threshold``); the head sees those rows only standardised and rounded to float32, so half of
them would otherwise take the other branch. The one case left where head and estimator part: a
value above a threshold by less than that bound (about 1e-7 relative), which the head sends left.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .data.dataset import Batch, ModalitySpec, MultimodalDataset
from .data.preprocessing import Standardizer

__all__ = [
    "ABSENT_LOGIT",
    "LinearHead",
    "Pooling",
    "TreeHead",
    "build_head",
    "head_from_baseline",
    "presence_columns",
    "record_shapes",
]

ABSENT_LOGIT = -1e4  # a class absent from the baseline's training rows: softmax gives it ~0
TASKS = ("classification", "regression")
# Bound on the relative error of a pooled feature rebuilt from standardised float32 values (2 roundings
# of 2**-24 each, doubled): a tree sends a value within it of a threshold left, as scikit-learn sends
# a value equal to the threshold (which is often a training row's own value).
ROUNDING = 2.0**-22
# Gradient boosting regression losses whose predict is the raw prediction (not exp of it, as poisson's).
IDENTITY_LOSSES = ("squared_error", "absolute_error", "quantile")


class Pooling(nn.Module):
    """Batch -> the pooled features of :func:`attnfuse.baselines.pooled_features`, ``(B, F)`` float64
    (with their rounding bound, see :meth:`forward`).

    Per modality (in ``modalities``' order): the standardisation undone (``raw = x * std + mean``)
    and averaged over the valid steps, ``(B, D_m)``, NaN where no step is valid; then a presence
    column (1.0 present, 0.0 absent) for each modality in ``presence`` (those absent somewhere
    in the rows the baseline was fitted on). Values at invalid steps never matter (even NaN)."""

    def __init__(self, modalities: Sequence[tuple[str, int]], presence: Sequence[str] = ()) -> None:
        super().__init__()
        self.modalities = [(str(name), int(dim)) for name, dim in modalities]
        names = [name for name, _ in self.modalities]
        unknown = [p for p in presence if p not in names]
        if unknown:
            raise ValueError(f"presence: expected modalities among {names}, got {unknown}")
        self.presence = [name for name in names if name in presence]  # modality order, as pooled_features
        self.num_features = sum(dim for _, dim in self.modalities) + len(self.presence)
        for i, (_, dim) in enumerate(self.modalities):  # by position: a modality's name may hold a "."
            self.register_buffer(f"mean_{i}", torch.zeros(dim, dtype=torch.float64))  # (D,)
            self.register_buffer(f"std_{i}", torch.ones(dim, dtype=torch.float64))  # (D,)

    def set_standardizer(self, standardizer: Standardizer) -> Pooling:
        """Copy the training statistics of ``standardizer`` (its modalities must be these)."""
        for i, (name, dim) in enumerate(self.modalities):
            mean, std = np.asarray(standardizer.mean[name]), np.asarray(standardizer.std[name])
            if mean.shape != (dim,) or std.shape != (dim,):
                raise ValueError(
                    f"standardizer: expected mean and std of shape ({dim},) for {name!r}, got {mean.shape}"
                )
            # float32 statistics, as Standardizer.transform used them, widened exactly.
            getattr(self, f"mean_{i}").copy_(torch.from_numpy(mean.astype(np.float32).astype(np.float64)))
            getattr(self, f"std_{i}").copy_(torch.from_numpy(std.astype(np.float32).astype(np.float64)))
        return self

    def forward(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """``(features, slack)``, both ``(B, F)`` float64: the pooled features and how far each may
        be from scikit-learn's (which pooled the raw float32 values; the batch holds them
        standardised and rounded to float32): at most ``2**-23 * std * mean |z|`` (one rounding
        of ``raw - mean``, one of the division), counted twice to be safe. 0 for presence."""
        pooled, slack, present = [], [], {}
        for i, (name, _) in enumerate(self.modalities):
            x, valid = batch.x[name], batch.mask[name]  # (B, T, D), (B, T)
            z = torch.where(valid.unsqueeze(-1), x, torch.zeros_like(x)).to(torch.float64)
            count = valid.sum(dim=1, keepdim=True).to(torch.float64)  # (B, 1)
            std = getattr(self, f"std_{i}")  # (D,)
            pooled.append(z.sum(dim=1) / count * std + getattr(self, f"mean_{i}"))  # (B, D) raw; 0/0 = NaN if absent
            slack.append(z.abs().sum(dim=1) / count * std * ROUNDING)  # (B, D)
            present[name] = (count > 0).to(torch.float64)  # (B, 1)
        flags = [present[name] for name in self.presence]
        return torch.cat(pooled + flags, dim=1), torch.cat(slack + [torch.zeros_like(f) for f in flags], dim=1)

    def record(self) -> dict:
        return {"modalities": [[name, dim] for name, dim in self.modalities], "presence": list(self.presence)}


class _Head(nn.Module):
    """What both heads share: the pooling, the task and the placement of the estimator's outputs.

    ``raw_dim``: the estimator's outputs per row R (regression: K targets; binary: 1, the
    decision ``d``; multiclass: one per class it saw). ``source`` ``(out_dim,)``: for each output
    column, the column of ``[logits of the classes seen, ABSENT_LOGIT]`` it takes."""

    kind = ""

    def __init__(self, pooling: Pooling, task: str, out_dim: int, raw_dim: int) -> None:
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task: expected one of {TASKS}, got {task!r}")
        if task == "regression" and raw_dim != out_dim:
            raise ValueError(f"out_dim: expected {raw_dim} (the baseline's targets), got {out_dim}")
        self.pooling, self.task, self.out_dim, self.raw_dim = pooling, task, int(out_dim), int(raw_dim)
        seen = 2 if task == "classification" and raw_dim == 1 else raw_dim
        self.register_buffer("source", torch.full((self.out_dim,), seen, dtype=torch.int64))  # (out_dim,)

    def set_classes(self, classes: np.ndarray) -> None:
        """The estimator's ``classes_`` (labels 0..out_dim-1, each an output column)."""
        classes = np.asarray(classes)
        ok = classes.dtype.kind in "iu" and classes.size and classes.min() >= 0 and classes.max() < self.out_dim
        if not ok:
            raise ValueError(f"classes: expected labels in 0..{self.out_dim - 1}, got {classes.tolist()}")
        self.source[torch.from_numpy(classes.astype(np.int64))] = torch.arange(classes.size)

    def outputs(self, raw: Tensor) -> Tensor:
        """The estimator's raw outputs ``(B, R)`` float64 -> the head's ``(B, out_dim)`` float32."""
        if self.task == "regression":
            return raw.to(torch.float32)
        if self.raw_dim == 1:  # binary: logits [0, d], softmax = [1 - sigmoid(d), sigmoid(d)]
            raw = torch.cat([torch.zeros_like(raw), raw], dim=1)
        absent = torch.full_like(raw[:, :1], ABSENT_LOGIT)  # (B, 1)
        return torch.cat([raw, absent], dim=1)[:, self.source].to(torch.float32)  # (B, out_dim)

    def record(self) -> dict:
        shapes = {"kind": self.kind, "task": self.task, "out_dim": self.out_dim, "raw_dim": self.raw_dim}
        return shapes | self.pooling.record()


class LinearHead(_Head):
    """A fitted ``SimpleImputer(mean) + StandardScaler + RidgeCV / LogisticRegression`` pipeline.

    Folded into ``where(isnan(f), fill, f) @ weight.T + bias``: ``fill`` the imputer's means
    ``(F,)``, ``weight = coef / scale`` ``(R, F)``, ``bias = intercept - (mean / scale) @ coef.T``
    ``(R,)``, all float64."""

    kind = "linear"

    def __init__(self, pooling: Pooling, task: str, out_dim: int, raw_dim: int) -> None:
        super().__init__(pooling, task, out_dim, raw_dim)
        f = pooling.num_features
        self.register_buffer("fill", torch.zeros(f, dtype=torch.float64))  # (F,)
        self.register_buffer("weight", torch.zeros(self.raw_dim, f, dtype=torch.float64))  # (R, F)
        self.register_buffer("bias", torch.zeros(self.raw_dim, dtype=torch.float64))  # (R,)

    @classmethod
    def from_fitted(cls, pipeline, pooling: Pooling, task: str, out_dim: int) -> LinearHead:
        """The head of a fitted pipeline (as :func:`attnfuse.baselines.make_baseline` builds it)."""
        imputer, scaler, linear = pipeline[0], pipeline[1], pipeline[-1]
        coef = np.atleast_2d(np.asarray(linear.coef_, dtype=np.float64))  # (R, F)
        if coef.shape[1] != pooling.num_features:
            raise ValueError(f"baseline: expected {pooling.num_features} features, got {coef.shape[1]}")
        mean = np.zeros(coef.shape[1]) if scaler.mean_ is None else np.asarray(scaler.mean_, dtype=np.float64)
        scale = np.ones(coef.shape[1]) if scaler.scale_ is None else np.asarray(scaler.scale_, dtype=np.float64)
        head = cls(pooling, task, out_dim, coef.shape[0])
        weight = coef / scale
        intercept = np.broadcast_to(np.asarray(linear.intercept_, dtype=np.float64), (coef.shape[0],))
        head.fill.copy_(torch.from_numpy(np.asarray(imputer.statistics_, dtype=np.float64)))
        head.weight.copy_(torch.from_numpy(weight))
        head.bias.copy_(torch.from_numpy(intercept - weight @ mean))
        if task == "classification":
            head.set_classes(linear.classes_)
        return head

    def forward(self, batch: Batch) -> Tensor:
        f, _ = self.pooling(batch)  # (B, F) float64, NaN where absent
        f = torch.where(torch.isnan(f), self.fill, f)  # the imputer
        return self.outputs(f @ self.weight.T + self.bias)  # (B, out_dim)


class TreeHead(_Head):
    """A fitted ``HistGradientBoosting{Regressor,Classifier}`` (or a ``MultiOutputRegressor`` of
    regressors, one per target).

    Trees ``(n_iter, R)``: ``R`` per boosting iteration (one per class of a multiclass model, one
    per target of a multi-output regression), tree ``(i, r)`` adds to raw output ``r``; an estimator
    that stopped early is padded with single-leaf trees of value 0. Node arrays ``(n_iter * R,
    nodes)``, padded with leaves; a leaf's children are itself, so a fixed ``depth`` steps of
    ``node = where(x <= threshold, left, right)`` (NaN: ``missing_go_to_left``) end on every leaf."""

    kind = "tree"

    def __init__(self, pooling: Pooling, task: str, out_dim: int, raw_dim: int, n_iter: int, nodes: int, depth: int):
        super().__init__(pooling, task, out_dim, raw_dim)
        self.n_iter, self.nodes, self.depth = int(n_iter), int(nodes), int(depth)
        shape = (self.n_iter * self.raw_dim, self.nodes)  # (trees, nodes)
        self.register_buffer("feature_idx", torch.zeros(shape, dtype=torch.int64))
        self.register_buffer("num_threshold", torch.zeros(shape, dtype=torch.float64))
        self.register_buffer("missing_go_to_left", torch.zeros(shape, dtype=torch.bool))
        self.register_buffer("left", torch.zeros(shape, dtype=torch.int64))
        self.register_buffer("right", torch.zeros(shape, dtype=torch.int64))
        self.register_buffer("is_leaf", torch.ones(shape, dtype=torch.bool))
        self.register_buffer("value", torch.zeros(shape, dtype=torch.float64))
        self.register_buffer("baseline", torch.zeros(self.raw_dim, dtype=torch.float64))  # (R,)

    @classmethod
    def from_fitted(cls, model, pooling: Pooling, task: str, out_dim: int) -> TreeHead:
        """The head of a fitted gradient boosting baseline (see :func:`_boosters`)."""
        boosters = _boosters(model)
        widths = [np.ravel(b._baseline_prediction).size for b in boosters]  # raw outputs of each
        raw_dim = sum(widths)
        columns = [_tree_columns(b, pooling.num_features) for b in boosters]  # [booster][iteration][r]
        n_iter = max(1, max(len(c) for c in columns))
        grid = [[None] * raw_dim for _ in range(n_iter)]  # [iteration][raw output]: nodes, None = no tree
        for k, per_booster in enumerate(columns):
            for i, iteration in enumerate(per_booster):
                grid[i][sum(widths[:k]) : sum(widths[: k + 1])] = iteration
        flat = [nodes for iteration in grid for nodes in iteration]  # tree i * R + r
        size = max((len(n) for n in flat if n is not None), default=1)
        depth = max((int(n["depth"].max()) for n in flat if n is not None), default=0)
        baseline = np.concatenate([np.ravel(b._baseline_prediction) for b in boosters])
        head = cls(pooling, task, out_dim, raw_dim, n_iter, size, depth)
        for t, nodes in enumerate(flat):
            if nodes is not None:
                head._set_tree(t, nodes)
        head.baseline.copy_(torch.from_numpy(baseline.astype(np.float64)))
        if task == "classification":
            head.set_classes(model.classes_)
        return head

    def _set_tree(self, t: int, nodes: np.ndarray) -> None:
        """Tree ``t`` from scikit-learn's node records (``TreePredictor.nodes``)."""
        n = len(nodes)
        leaf = nodes["is_leaf"].astype(bool)
        own = np.arange(n)
        columns = {
            "feature_idx": np.where(leaf, 0, nodes["feature_idx"]).astype(np.int64),
            "num_threshold": np.where(leaf, 0.0, nodes["num_threshold"]).astype(np.float64),
            "missing_go_to_left": nodes["missing_go_to_left"].astype(bool),
            "left": np.where(leaf, own, nodes["left"]).astype(np.int64),  # a leaf stays where it is
            "right": np.where(leaf, own, nodes["right"]).astype(np.int64),
            "is_leaf": leaf,
            "value": np.where(leaf, nodes["value"], 0.0).astype(np.float64),
        }
        for name, column in columns.items():
            getattr(self, name)[t, :n] = torch.from_numpy(column)

    def forward(self, batch: Batch) -> Tensor:
        f, slack = self.pooling(batch)  # (B, F) float64, NaN where absent; (B, F) their rounding bound
        b, trees = f.shape[0], self.feature_idx.shape[0]
        offset = (torch.arange(trees, device=f.device) * self.nodes).unsqueeze(0)  # (1, trees)
        node = torch.zeros(b, trees, dtype=torch.int64, device=f.device)  # (B, trees): every tree at its root
        for _ in range(self.depth):
            at = (node + offset).reshape(-1)  # (B * trees,) into the flattened node arrays
            feature = self._read("feature_idx", at, b)  # (B, trees): the feature each node splits on
            x, within = torch.gather(f, 1, feature), torch.gather(slack, 1, feature)  # (B, trees)
            threshold = self._read("num_threshold", at, b) + within  # a value at the threshold goes left
            # NaN compares False: it goes left only where the node sends missing values left. (Logical
            # operators, not a where over bools, which onnxruntime does not implement.)
            go_left = (x <= threshold) | (torch.isnan(x) & self._read("missing_go_to_left", at, b))
            child = torch.where(go_left, self._read("left", at, b), self._read("right", at, b))
            node = torch.where(self._read("is_leaf", at, b), node, child)
        leaves = self.value.reshape(-1)[(node + offset).reshape(-1)].reshape(b, self.n_iter, self.raw_dim)
        return self.outputs(leaves.sum(dim=1) + self.baseline)  # (B, out_dim)

    def _read(self, name: str, at: Tensor, b: int) -> Tensor:
        """Node array ``name`` at the flat node indices ``at`` (B * trees,) -> (B, trees)."""
        return getattr(self, name).reshape(-1)[at].reshape(b, -1)

    def record(self) -> dict:
        return super().record() | {"n_iter": self.n_iter, "nodes": self.nodes, "depth": self.depth}


def _boosters(model) -> list:
    """The gradient boosting estimators of a fitted baseline: itself, or a ``MultiOutputRegressor``'s
    ``estimators_`` (one per target, in target order)."""
    boosters = list(getattr(model, "estimators_", [model]))
    for b in boosters:
        if not hasattr(b, "_predictors") or not hasattr(b, "_baseline_prediction"):
            raise TypeError(f"baseline: expected a fitted HistGradientBoosting model, got {type(b).__name__}")
        # The head returns the raw prediction: a regressor's predict must be it (identity link).
        if not hasattr(b, "classes_") and b.loss not in IDENTITY_LOSSES:
            raise ValueError(f"baseline loss: expected one of {IDENTITY_LOSSES}, got {b.loss!r}")
    return boosters


def _tree_columns(booster, num_features: int) -> list[list[np.ndarray]]:
    """A booster's trees, ``[iteration][tree of that iteration]``, as node record arrays."""
    if getattr(booster, "n_features_in_", num_features) != num_features:
        raise ValueError(f"baseline: expected {num_features} features, got {booster.n_features_in_}")
    out = []
    for iteration in booster._predictors:
        nodes = [np.asarray(p.nodes) for p in iteration]
        if any(n["is_categorical"].any() for n in nodes):
            raise ValueError("baseline: expected numerical splits only, got a categorical one")
        out.append(nodes)
    return out


def presence_columns(data: MultimodalDataset, rows: np.ndarray | None = None) -> list[str]:
    """The modalities that :func:`attnfuse.baselines.pooled_features` gives a presence column for
    ``rows`` (default all): those absent in at least one of them. The ``presence`` of
    :func:`head_from_baseline`, taken from the rows the baseline's features were pooled from."""
    rows = np.arange(data.n) if rows is None else np.asarray(rows, dtype=np.int64)
    return [m.name for m in data.modalities if not data.valid_mask(m.name)[rows].any(axis=1).all()]


def record_shapes(record: dict) -> dict[str, tuple[int, ...]]:
    """The buffers (name -> shape) of the head ``record`` describes (a head's :meth:`record`),
    computed without allocating any: what a weights file must hold for it, checked before
    :func:`build_head` allocates (a record of a billion nodes is refused, not allocated). A
    ValueError names a field that is not what a head's record holds."""

    def count(key: str) -> int:
        value = record.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"head.{key}: expected a non-negative integer, got {value!r}")
        return value

    kind = record.get("kind")
    if kind not in ("linear", "tree"):
        raise ValueError(f"head.kind: expected 'linear' or 'tree', got {kind!r}")
    modalities, presence = record.get("modalities"), record.get("presence")
    pairs = isinstance(modalities, list) and all(
        isinstance(m, list) and len(m) == 2 and isinstance(m[0], str) and type(m[1]) is int and m[1] > 0
        for m in modalities
    )
    if not pairs:
        raise ValueError(f"head.modalities: expected a list of [name, dim] pairs, got {modalities!r}")
    if not (isinstance(presence, list) and all(isinstance(p, str) for p in presence)):
        raise ValueError(f"head.presence: expected a list of modality names, got {presence!r}")
    out_dim, raw_dim = count("out_dim"), count("raw_dim")
    shapes: dict[str, tuple[int, ...]] = {"source": (out_dim,)}
    for i, (_, dim) in enumerate(modalities):
        shapes[f"pooling.mean_{i}"] = shapes[f"pooling.std_{i}"] = (dim,)
    features = sum(dim for _, dim in modalities) + len(presence)
    if kind == "linear":
        return shapes | {"fill": (features,), "weight": (raw_dim, features), "bias": (raw_dim,)}
    trees = (count("n_iter") * raw_dim, count("nodes"))
    count("depth")
    nodes = ("feature_idx", "num_threshold", "missing_go_to_left", "left", "right", "is_leaf", "value")
    return shapes | dict.fromkeys(nodes, trees) | {"baseline": (raw_dim,)}


def build_head(record: dict) -> _Head:
    """An empty head of the shapes in ``record`` (a head's :meth:`record`), for ``load_state_dict``."""
    kinds = {"linear": LinearHead, "tree": TreeHead}
    kind = record.get("kind")
    if kind not in kinds:
        raise ValueError(f"record kind: expected one of {tuple(kinds)}, got {kind!r}")
    pooling = Pooling([(name, dim) for name, dim in record["modalities"]], record["presence"])
    args = (pooling, record["task"], record["out_dim"], record["raw_dim"])
    if kind == "linear":
        return LinearHead(*args)
    return TreeHead(*args, record["n_iter"], record["nodes"], record["depth"])


def head_from_baseline(
    name: str,
    fitted,
    data_specs: Sequence[ModalitySpec],
    standardizer: Standardizer,
    presence: Sequence[str],
    task: str,
    out_dim: int,
) -> _Head:
    """The torch head of baseline ``name`` (``"ridge"``, ``"logistic"`` or ``"hist_gb"``) fitted on
    :func:`attnfuse.baselines.pooled_features` of data with modalities ``data_specs``; ``presence``:
    the modalities with a presence column (absent somewhere in the rows pooled); ``standardizer``:
    the statistics of the batches the head will read."""
    pooling = Pooling([(s.name, s.dim) for s in data_specs], presence).set_standardizer(standardizer)
    if name in ("ridge", "logistic"):
        head = LinearHead.from_fitted(fitted, pooling, task, out_dim)
    elif name == "hist_gb":
        head = TreeHead.from_fitted(fitted, pooling, task, out_dim)
    else:
        raise ValueError(f"name: expected 'ridge', 'logistic' or 'hist_gb', got {name!r}")
    return head.eval()
