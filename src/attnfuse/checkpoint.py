"""Model directories: ``model.safetensors`` (weights), ``config.json`` (everything needed to rebuild
the model and the feature standardisation), ``metrics.json`` and ``run.yaml`` (the options the run
was trained with: ``attnfuse train --config DIR/run.yaml`` trains it again).

Writing: a model directory is written as one transaction (:func:`run_directory`, built on
:func:`attnfuse.files.transaction`): a reader finds the previous complete run or the new complete
one, never weights of one run beside the config of another. ``config.json`` and the weights'
``config.json`` records ``weights_id``, a hash of the tensors: a directory mixed by hand is
recognised when read, and so are tensors damaged after they were written.
A reader opens the directory once and both files relative to that handle (:class:`_Pinned`), so a
run swapped in between its two reads cannot pair one run's config with another's weights.

Reading: a model directory is untrusted input. Checkpoints never use pickle: safetensors holds only
tensors, JSON only plain values, so loading cannot run code. Before any model is built,
``config.json`` is checked against its schema (types, ranges, required keys; the fusion settings by
their own config dataclass), the size of the model it describes is bounded, and it must match the
weights file's header (names, shapes, dtypes: read without reading the tensors). Weights must be
floating point and finite.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from ._version import __version__
from .calibration import check_calibration
from .data import MultimodalDataset, Standardizer
from .data.validation import check_columns
from .ensemble import Ensemble, EnsembleSpec, WeightedEnsemble, build_recorded, weighted_record
from .files import transaction, write_bytes, write_json, write_text
from .fusion import FusionConfig, FusionModel, config_from_dict
from .heads import record_shapes
from .runstate import LAST, check_last
from .splitplan import HOWS
from .training import TrainConfig

__all__ = [
    "WEIGHTS",
    "CONFIG",
    "METRICS",
    "RUN",
    "EVALUATION",
    "run_directory",
    "write_model",
    "write_run",
    "save_model",
    "save_run",
    "metrics_for_json",
    "weights_id",
    "read_config",
    "load_model",
    "check_compatible",
    "check_memory",
]

WEIGHTS, CONFIG, METRICS, RUN, LOG = "model.safetensors", "config.json", "metrics.json", "run.yaml", "log.csv"
EVALUATION = "evaluation.json"
# What a run directory may hold: replacing it deletes these, and nothing else may be deleted; but
# KEPT, made by the user from the run (attnfuse explain's default place), moves into the new directory.
RUN_ENTRIES = frozenset({WEIGHTS, CONFIG, METRICS, RUN, LOG, EVALUATION, "explain", "last", "tensorboard"})
KEPT = ("explain",)
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # safetensors' names
EXACT_DTYPES = ("I64", "BOOL")  # a baseline head's tree: node indices and branch flags
MAX_CONFIG_BYTES = 64 << 20  # a config.json holds settings and per-feature statistics: far less


# ---------------------------------------------------------------------------------------------
# Writing


def _only_run_entries(out: Path) -> None:
    ours = re.compile(r"\.(.+)\.([a-z0-9_]{8}\.tmp|lock)")  # temporaries and locks of our own files
    foreign = sorted(
        p.name
        for p in out.iterdir()
        if p.name not in RUN_ENTRIES and not ((m := ours.fullmatch(p.name)) and m.group(1) in RUN_ENTRIES)
    )
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ValueError(
            f"out: {out} holds files that are not part of an attnfuse run ({shown}); replacing it would delete "
            "them: choose another --out, or move them away"
        )
    check_last(out / LAST)  # a run in progress writes there: not through a link


def run_directory(out: str | os.PathLike) -> contextlib.AbstractContextManager[Path]:
    """A transaction writing the model directory ``out`` (see :func:`attnfuse.files.transaction`):
    yields an empty temporary directory to write into; when the block ends cleanly it replaces
    ``out``, keeping ``out``'s ``explain/`` (a report the user made of the previous model: it
    moves into the new directory as it is, still describing the model it was made of; deleting it
    would lose work that training cannot redo). Refused before the
    block runs: a concurrent writer of ``out``, an ``out`` that cannot be written, an existing
    ``out`` holding files that are not part of a run, or whose ``last/`` is (or holds) a symbolic
    link."""
    return transaction(out, check=_only_run_entries, keep=KEPT)


def write_model(
    directory: str | os.PathLike,
    model: FusionModel | Ensemble,
    fusion: str,
    data: MultimodalDataset,
    standardizer: Standardizer,
    train_config: dict,
    split: dict,
    source: str | None = None,
    extra: dict | None = None,
) -> str:
    """Write ``model.safetensors`` and ``config.json`` into ``directory`` (one being built, e.g. by
    :func:`run_directory`); returns the ``weights_id`` recorded in the config (:func:`weights_id`).

    ``split`` says how the train/valid/test parts were made (:meth:`attnfuse.splitplan.SplitPlan.to_dict`),
    so that ``evaluate`` can report the same parts later; ``source`` is where the data came from
    (a built-in name or a file path), the default data of ``explain``; ``extra``: more top-level
    entries (``read``: how a table was read, ``auto``: how ``--fusion auto`` chose the fusion,
    ``calibration``: the temperature or interval fitted on the validation rows). An :class:`~attnfuse.ensemble.Ensemble` is
    written with its members' weights under ``members.<k>.``; ``train_config["ensemble"]`` says
    how many there are."""
    directory = Path(directory)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    digest = weights_id(state)
    # Serialised in memory and written by our own writer: safetensors' save_file reports a full
    # disk as a SafetensorError without the path; ours says "no space left on device: PATH".
    write_bytes(directory / WEIGHTS, safetensors_bytes(state, metadata={"fusion": fusion}))
    config = {
        "attnfuse_version": __version__,
        "weights_id": digest,
        "fusion": fusion,
        "model": asdict(model.config),
        "data": {
            "name": data.name,
            "source": source or data.name,
            "n": data.n,
            "fingerprint": fingerprint(data),
            **data.spec_dict(),
        },
        "split": split,
        "standardizer": standardizer.to_dict(),
        "train": train_config,
        **(extra or {}),
    }
    if isinstance(model, WeightedEnsemble):
        config["weighted"] = weighted_record(model)
    write_json(directory / CONFIG, config)
    return digest


def write_run(
    directory: str | os.PathLike,
    model: FusionModel | Ensemble,
    fusion: str,
    data: MultimodalDataset,
    standardizer: Standardizer,
    train_config: dict,
    split: dict,
    metrics: dict,
    options: dict,
    extra: dict | None = None,
) -> None:
    """A whole run into ``directory`` (one being built): the model (:func:`write_model`),
    ``metrics.json`` (undefined metrics as null, :func:`metrics_for_json`) and ``run.yaml``
    (``options``: the option values of ``attnfuse train`` that reproduce the run). ``split`` says
    how the training parts were made: ``{"how", "seed"}`` and, for a fold, ``"folds"``, ``"fold"``;
    ``extra``: more entries of config.json (``auto``; ``calibration``, see :mod:`attnfuse.calibration`)."""
    directory = Path(directory)
    read = {k: options.get(k) for k in ("modality", "target", "split_col", "mapping")}  # how a table was read
    extra = {"read": read, **(extra or {})}
    write_model(directory, model, fusion, data, standardizer, train_config, split, options.get("data"), extra)
    write_json(directory / METRICS, metrics_for_json(metrics))
    write_text(directory / RUN, yaml.safe_dump(options, sort_keys=False))


def save_model(out_dir: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
    """Replace ``out_dir`` with a model directory (:func:`write_model`'s arguments) in one
    transaction (:func:`run_directory`)."""
    with run_directory(out_dir) as tmp:
        write_model(tmp, *args, **kwargs)


def save_run(out_dir: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
    """Replace ``out_dir`` with a whole run directory (:func:`write_run`'s arguments) in one
    transaction (:func:`run_directory`)."""
    with run_directory(out_dir) as tmp:
        write_run(tmp, *args, **kwargs)


def metrics_for_json(report: Any) -> Any:
    """``report`` with every NaN/inf number replaced by ``None`` (JSON null): a metric that is
    undefined (acc2 when every target is 0; any metric of outputs that are not finite) is written
    as null, never as bare ``NaN``, which is not JSON."""
    if isinstance(report, dict):
        return {k: metrics_for_json(v) for k, v in report.items()}
    if isinstance(report, (list, tuple)):
        return [metrics_for_json(v) for v in report]
    if isinstance(report, float) and not math.isfinite(report):
        return None
    return report


def weights_id(state: dict[str, torch.Tensor]) -> str:
    """A short hash of the tensors (names, dtypes, shapes, bytes): ties ``config.json`` to the
    weights it was written with, and recognises tensors damaged since."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:16]


def fingerprint(data: MultimodalDataset) -> str:
    """A short hash of the targets, the feature shapes and the split column: tells the training data
    from other data with the same name and size (``evaluate`` then reports the training split). The
    split column counts: the same rows without it (or with another) are not the training data, whose
    parts could not be rebuilt from them; ``evaluate`` reports them by their own column, or as "all"."""
    h = hashlib.sha256(b"" if data.y is None else np.ascontiguousarray(data.y).tobytes())
    for m in data.modalities:
        h.update(f"{m.name}:{m.dim}:{m.length}".encode())
    if data.split is not None:
        h.update(("split:" + "\n".join(map(str, data.split))).encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Reading: config.json's schema, the model's size, the weights' header


class _Schema:
    """Typed access to a parsed JSON value: each failure names the key path and what was expected."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, path: str, message: str) -> ValueError:
        return ValueError(f"model: {self.where}: {path}: {message}")

    def get(self, obj: dict, path: str, key: str, kind: type | tuple[type, ...], optional: bool = False) -> Any:
        full = f"{path}.{key}" if path else key
        if key not in obj:
            if optional:
                return None
            raise self.fail(full, "missing (a config.json written by `attnfuse train` has it)")
        value = obj[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):  # True is no count
            names = " or ".join({dict: "an object", list: "a list", str: "a string"}.get(k, k.__name__) for k in kinds)
            raise self.fail(full, f"expected {names}, got {json.dumps(value)[:60]}")
        return value

    def integer(self, obj: dict, path: str, key: str, low: int = 1) -> int:
        value = self.get(obj, path, key, int)
        if value < low:
            raise self.fail(f"{path}.{key}", f"expected an integer >= {low}, got {value}")
        return value

    def modalities(self, obj: dict, path: str) -> list[dict]:
        entries = self.get(obj, path, "modalities", list)
        if not entries:
            raise self.fail(f"{path}.modalities", "expected at least one modality, got none")
        for i, m in enumerate(entries):
            where = f"{path}.modalities[{i}]"
            if not isinstance(m, dict):
                raise self.fail(where, f"expected an object, got {json.dumps(m)[:60]}")
            extra = sorted(set(m) - {"name", "dim", "length", "is_sequence"})
            if extra:
                raise self.fail(where, f"unknown key {extra[0]!r}")
            if not self.get(m, where, "name", str):
                raise self.fail(f"{where}.name", "expected a non-empty string")
            self.integer(m, where, "dim")
            length = self.integer(m, where, "length")
            if not self.get(m, where, "is_sequence", bool) and length != 1:
                raise self.fail(f"{where}.length", f"a vector modality has length 1, got {length}")
        return entries


def _parse(path: Path, shown: Path | None = None) -> Any:
    """config.json at ``path`` (named ``shown`` in errors: ``path`` may be an open file's handle)."""
    size = path.stat().st_size
    path, read = shown or path, path
    if size > MAX_CONFIG_BYTES:
        raise ValueError(f"model: {path} is {size:,} bytes; a config.json is at most {MAX_CONFIG_BYTES:,}")

    def no_constants(name: str) -> None:
        raise ValueError(f"{name} is not a JSON number")

    try:
        return json.loads(read.read_bytes(), parse_constant=no_constants)
    except RecursionError:
        raise ValueError(f"model: {path} is nested too deeply to be a config.json") from None
    except ValueError as e:  # JSONDecodeError, bad UTF-8, NaN/Infinity
        raise ValueError(f"model: {path} is not valid JSON ({e})") from None


def _check_config(config: Any, where: str) -> FusionConfig:
    """config.json against its schema; returns the fusion's config (validated by its dataclass)."""
    s = _Schema(where)
    if not isinstance(config, dict):
        raise s.fail("top level", f"expected an object, got {type(config).__name__}")
    s.get(config, "", "weights_id", str)
    fusion_config, modalities = _check_model(s, config)
    _check_split(s, s.get(config, "", "split", dict))
    read = s.get(config, "", "read", dict, optional=True) or {}
    for key in ("target", "split_col", "mapping"):
        s.get(read, "read", key, (str, type(None)), optional=True)
    s.get(read, "read", "modality", (list, type(None)), optional=True)
    auto = s.get(config, "", "auto", dict, optional=True)
    if auto is not None:
        s.get(auto, "auto", "picked", str)
        s.get(auto, "auto", "reason", str)
    calibration = config.get("calibration")  # absent (or null): none, as in directories written before it
    if calibration is not None:
        try:
            check_calibration(calibration, config["data"]["task"], fusion_config.out_dim)
        except ValueError as e:
            raise ValueError(f"model: {where}: {e}") from None  # e names the key: calibration.<key>
    _check_standardizer(s, s.get(config, "", "standardizer", dict), modalities)
    weighted = s.get(config, "", "weighted", dict, optional=True)
    if weighted is not None:
        _check_weighted(s, weighted, config["data"]["task"], modalities, fusion_config.out_dim)
    train = s.get(config, "", "train", dict)
    unknown = sorted(set(train) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise s.fail("train", f"unknown setting {unknown[0]!r}")
    try:  # the device it was trained on need not exist here: checked as "cpu"
        TrainConfig(**{**train, "device": "cpu"})
    except (ValueError, TypeError) as e:
        raise s.fail("train", str(e)) from None
    return fusion_config


def _check_model(s: _Schema, config: dict) -> tuple[FusionConfig, list[dict]]:
    """``fusion``, ``model`` and ``data``: the fusion's config, checked against the data it was
    trained on (modalities, output size, columns, classes); returns it and the modalities."""
    fusion = s.get(config, "", "fusion", str)
    model = s.get(config, "", "model", dict)
    data = s.get(config, "", "data", dict)
    task = s.get(data, "data", "task", str)
    s.get(data, "data", "name", str)
    for key in ("source", "fingerprint"):
        s.get(data, "data", key, str, optional=True)
    if task not in ("classification", "regression"):
        raise s.fail("data.task", f"expected 'classification' or 'regression', got {task!r}")
    out_dim = s.integer(data, "data", "num_classes" if task == "classification" else "target_dim")
    modalities = s.modalities(data, "data")
    if s.modalities(model, "model") != modalities:
        raise s.fail("model.modalities", "differ from data.modalities")
    try:
        fusion_config = config_from_dict(fusion, model)
    except (ValueError, TypeError) as e:
        raise s.fail("model", str(e)) from None
    if fusion_config.out_dim != out_dim:
        raise s.fail("model.out_dim", f"expected {out_dim} (from data), got {fusion_config.out_dim}")
    columns = s.get(data, "data", "columns", (dict, type(None)), optional=True)
    try:
        check_columns(columns, {m["name"]: m["dim"] for m in modalities})
    except ValueError as e:
        raise s.fail("data.columns", str(e)) from None
    classes = s.get(data, "data", "classes", (list, type(None)), optional=True)
    if classes is not None and (task != "classification" or len(classes) != out_dim):
        raise s.fail("data.classes", f"expected the {out_dim} original class labels of a classification model")
    return fusion_config, modalities


def _check_weighted(s: _Schema, weighted: dict, task: str, modalities: list[dict], out_dim: int) -> None:
    """A weighted ensemble's block (:func:`attnfuse.ensemble.weighted_record`): its parts, each a
    fusion of the data's modalities and output size or a baseline head, weights summing to 1."""
    if s.get(weighted, "weighted", "task", str) != task:
        raise s.fail("weighted.task", f"expected {task!r} (from data), got {weighted['task']!r}")
    parts = s.get(weighted, "weighted", "parts", list)
    if not parts or not all(isinstance(p, dict) for p in parts):
        raise s.fail("weighted.parts", "expected a list of at least one object")
    for i, entry in enumerate(parts):
        where = f"weighted.parts[{i}]"
        s.get(entry, where, "name", str)
        weight = s.get(entry, where, "weight", (int, float))
        if isinstance(weight, bool) or not 0 <= weight <= 1:
            raise s.fail(f"{where}.weight", f"expected a number in [0, 1], got {weight!r}")
        kind = s.get(entry, where, "kind", str)
        if kind == "fusion":
            s.get(entry, where, "fusion", str)
            model = s.get(entry, where, "model", dict)
            if s.modalities(model, f"{where}.model") != modalities:
                raise s.fail(f"{where}.model.modalities", "differ from data.modalities")
            if "ensemble" in entry:
                s.integer(entry, where, "ensemble")
            try:
                part = config_from_dict(entry["fusion"], model)
            except (ValueError, TypeError) as e:
                raise s.fail(f"{where}.model", str(e)) from None
            if part.out_dim != out_dim:
                raise s.fail(f"{where}.model.out_dim", f"expected {out_dim} (from data), got {part.out_dim}")
        elif kind != "baseline":
            raise s.fail(f"{where}.kind", f"expected 'fusion' or 'baseline', got {kind!r}")
        else:
            s.get(entry, where, "head", dict)
    names = [entry["name"] for entry in parts]
    primary = s.get(weighted, "weighted", "primary", str)
    if primary not in [e["name"] for e in parts if e["kind"] == "fusion"] or len(set(names)) != len(names):
        raise s.fail("weighted", f"expected distinct part names and a fusion part as primary, got {names}, {primary!r}")
    if abs(sum(entry["weight"] for entry in parts) - 1) > 1e-6:
        raise s.fail("weighted.parts", "expected weights summing to 1")


def _check_standardizer(s: _Schema, stats: dict, modalities: list[dict]) -> None:
    """The standardisation statistics: valid, and of every modality's feature size."""
    try:
        standardizer = Standardizer.from_dict(stats)
    except (ValueError, TypeError) as e:
        raise s.fail("standardizer", str(e)) from None
    dims = {m["name"]: m["dim"] for m in modalities}
    got = {name: mean.shape[0] for name, mean in standardizer.mean.items()}
    if got != dims:
        raise s.fail("standardizer", f"expected statistics of {dims} features per modality, got {got}")


def _check_split(s: _Schema, split: dict) -> None:
    """How the training parts were made (:class:`~attnfuse.splitplan.SplitPlan`)."""
    how = s.get(split, "split", "how", str)
    if how not in HOWS:
        raise s.fail("split.how", f"expected one of {', '.join(map(repr, HOWS))}, got {how!r}")
    s.integer(split, "split", "seed", low=0)
    if how == "fold":
        folds = s.integer(split, "split", "folds", low=2)
        fold = s.integer(split, "split", "fold", low=0)
        if fold >= folds:
            raise s.fail("split.fold", f"expected a fold in 0..{folds - 1}, got {fold}")


def _available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux's MemAvailable), None where unknown."""
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    with contextlib.suppress(ValueError, OSError, AttributeError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


def check_memory(config: FusionConfig, bytes_per_parameter: int, parameters: int | None = None) -> None:
    """Refuse, with the numbers, a model that cannot be built in the memory available now:
    ``parameters`` (default: the config's lower bound, :meth:`~attnfuse.fusion.FusionConfig.num_parameters`) at ``bytes_per_parameter`` (4 to hold float32
    weights; 16 to train them: weights, gradients and AdamW's two moments), plus the positional
    table (``max_len x d_model``, float64 while computed) and an axis label per token. Building
    such a model would not fail: it would allocate until the machine swaps."""
    parameters = config.num_parameters() if parameters is None else parameters
    max_len = max([m.length for m in config.modalities if m.is_sequence], default=1)
    need = bytes_per_parameter * parameters + 24 * max_len * config.d_model
    need += 100 * sum(m.length for m in config.modalities)
    available = _available_memory()
    if available is not None and need > available:
        raise ValueError(
            f"model: needs at least {need / 2**30:.1f} GiB ({parameters:,} parameters with {config.size_settings()}, "
            f"sequence length {max_len}), {available / 2**30:.1f} GiB of memory is available"
        )


def _check_size(
    config: FusionConfig, weights: dict[str, tuple[str, tuple[int, ...]]], where: str, members: int = 1
) -> None:
    """The model (``members`` of it, for an ensemble) must fit its weights file and the memory:
    refused with the numbers, never allocated."""
    held = sum(math.prod(shape) for _, shape in weights.values())
    lower = config.num_parameters() * members
    if lower > held:
        models = f"{members} models" if members > 1 else "a model"
        raise ValueError(
            f"model: {where}: config.json describes {models} of at least {lower:,} parameters "
            f"({config.size_settings()}), but {WEIGHTS} holds {held:,}"
        )
    try:
        check_memory(config, 4, held)
    except ValueError as e:
        raise ValueError(f"model: {where}: {str(e).removeprefix('model: ')}") from None


def _weights_header(
    path: Path, shown: Path | None = None, config: dict | None = None
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{name: (dtype, shape)} from the safetensors header (no tensor is read); the dtypes must be
    floating point, but for the baseline parts of a weighted ensemble (``config``'s), whose trees
    hold node indices and branch flags (:data:`EXACT_DTYPES`). ``shown``: the name in errors
    (``path`` may be an open file's handle)."""
    path, read = shown or path, path
    try:
        with safe_open(str(read), framework="pt") as f:
            header = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors' own error types: a damaged or hostile file
        reason = " ".join(str(e).split())[:200]
        raise ValueError(f"model: {path} is not a readable safetensors file ({reason})") from None
    exact = tuple(
        f"parts.{e['name']}."
        for e in ((config or {}).get("weighted") or {}).get("parts", [])
        if e["kind"] == "baseline"
    )
    bad = [
        f"{k} ({dtype})"
        for k, (dtype, _) in header.items()
        if dtype not in FLOAT_DTYPES and not (k.startswith(exact) and dtype in EXACT_DTYPES)
    ]
    if bad:
        raise ValueError(f"model: {path}: expected floating-point weights, got {', '.join(bad[:3])}")
    return header


def _finite(t: torch.Tensor) -> bool:
    """No NaN/inf in ``t``. A sum is NaN/inf when an element is (or, rarely, when finite values
    overflow it: then each element is looked at); torch.isfinite(t).all() alone is ~30x slower on
    a CPU, seconds for a large model."""
    if not t.is_floating_point():  # node indices and flags: always finite
        return True
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


class _Pinned:
    """``config.json`` and ``model.safetensors`` of one model directory, opened together.

    A run directory is replaced as a whole (:func:`attnfuse.files.transaction`), but by name: a
    reader that opened ``DIR/config.json``, then ``DIR/model.safetensors`` after a new run was
    swapped in, would pair one run's config with another's weights. So the directory is opened once
    and both files relative to that handle (``dir_fd``); the files are then read through their own
    open handles (``/proc/self/fd`` on Linux), which a later swap and the deletion of the old
    directory cannot change. If the directory was replaced between opening it and opening its files
    (the old one's files already deleted), it is opened again. Where the platform has no such
    handles, the files are read by name and :func:`load_model` retries on a mix."""

    def __init__(self, model_dir: Path) -> None:
        self.dir, self.fds = model_dir, []
        self.config, self.weights = model_dir / CONFIG, model_dir / WEIGHTS  # what is read
        pinned = os.open in os.supports_dir_fd and hasattr(os, "O_DIRECTORY") and os.path.isdir("/proc/self/fd")
        for attempt in range(_ATTEMPTS):
            missing = next((n for n in (CONFIG, WEIGHTS) if not (model_dir / n).is_file()), None)
            if missing is not None:
                raise FileNotFoundError(f"model: {model_dir} is not a model directory (no {missing}); train one first")
            if not pinned:
                return
            try:
                self._open()
                return
            except FileNotFoundError:  # replaced in between, the old one's files deleted: open the new one
                self.close()
                if attempt == _ATTEMPTS - 1:
                    raise
            except OSError as e:
                self.close()
                raise OSError(e.errno, e.strerror, str(model_dir)) from None

    def _open(self) -> None:
        d = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        self.fds.append(d)
        for name in (CONFIG, WEIGHTS):
            self.fds.append(os.open(name, os.O_RDONLY, dir_fd=d))
        self.config, self.weights = (Path(f"/proc/self/fd/{fd}") for fd in self.fds[1:])

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def __enter__(self) -> _Pinned:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_ATTEMPTS = 5  # a directory replaced this many times while it is opened: the error is reported


def _read_config(files: _Pinned) -> dict:
    model_dir = files.dir
    config = _parse(files.config, model_dir / CONFIG)
    fusion_config = _check_config(config, str(model_dir / CONFIG))
    header = _weights_header(files.weights, model_dir / WEIGHTS, config)
    weighted = config.get("weighted")
    if weighted is None:
        members = EnsembleSpec.from_dict(config["train"]).size
        _check_size(fusion_config, header, str(model_dir), members)
    else:  # each part of a weighted ensemble, its own share of the weights file
        for entry in weighted["parts"]:
            prefix = f"parts.{entry['name']}."
            held = {k: v for k, v in header.items() if k.startswith(prefix)}
            where = f"{model_dir} (part {entry['name']})"
            if entry["kind"] == "fusion":
                part_config = config_from_dict(entry["fusion"], entry["model"])
                _check_size(part_config, held, where, entry.get("ensemble", 1))
            else:
                _check_head(entry["head"], {k.removeprefix(prefix): shape for k, (_, shape) in held.items()}, where)
    return config


def _check_head(record: dict, held: dict[str, tuple[int, ...]], where: str) -> None:
    """A baseline part's head record must describe exactly the buffers the weights file holds for
    it (:func:`attnfuse.heads.record_shapes`): refused with the first difference, never allocated."""
    try:
        expected = record_shapes(record)
    except ValueError as e:
        raise ValueError(f"model: {where}: config.json's {e}") from None
    for name in sorted(set(expected) | set(held)):
        if expected.get(name) != held.get(name):
            want = "nothing" if name not in expected else f"shape {list(expected[name])}"
            got = "nothing" if name not in held else f"shape {list(held[name])}"
            raise ValueError(f"model: {where}: config.json's head describes {name} as {want}, {WEIGHTS} holds {got}")


def read_config(model_dir: str | os.PathLike) -> dict:
    """The checked ``config.json`` of a model directory: its schema, the size of the model it
    describes and its agreement with the weights file's header (of the same run: see
    :class:`_Pinned`). Nothing is built, no tensor read."""
    with _Pinned(Path(model_dir)) as files:
        return _read_config(files)


def load_model(
    model_dir: str | os.PathLike, device: str = "cpu", config: dict | None = None
) -> tuple[FusionModel | Ensemble, dict, Standardizer]:
    """Rebuild a saved model (in eval mode) with its config and its standardiser.

    Reading races no writer: config and weights come from one run even while ``attnfuse train``
    replaces the directory (:class:`_Pinned`). ``config``: the directory's config from
    :func:`read_config` when already read (it is then not read again; the weights must still come
    from the same run: if the directory was replaced by another run since, that is said)."""
    model_dir = Path(model_dir)
    for attempt in range(_ATTEMPTS):
        with _Pinned(model_dir) as files:
            read = config if config is not None else _read_config(files)
            try:
                model, standardizer = _load(files, read)
                return model.to(device).eval(), read, standardizer
            except _Mixed as e:
                if config is not None and _read_config(files).get("weights_id") == e.found:
                    raise ValueError(
                        f"model: {model_dir} was replaced by another run while it was being read; run the command again"
                    ) from None
                if files.fds or config is not None or attempt == _ATTEMPTS - 1:
                    raise ValueError(str(e)) from None  # pinned: the files of one directory, really mixed
                # read by name (no handles here): a new run may have come between the two reads
    raise AssertionError("unreachable")


class _Mixed(ValueError):
    """Weights that are not the ones config.json was written with (``found``: their weights_id)."""

    def __init__(self, message: str, found: str) -> None:
        super().__init__(message)
        self.found = found


def _load(files: _Pinned, config: dict) -> tuple[FusionModel | Ensemble, Standardizer]:
    """The model ``config`` describes with the weights of ``files`` (checked), and its standardiser."""
    path = files.dir / WEIGHTS
    header = _weights_header(files.weights, path, config)
    model = build_recorded({**config, **EnsembleSpec.from_dict(config["train"]).to_dict()})
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: shape for k, (_, shape) in header.items()}
    problems = [f"missing {k}" for k in expected if k not in got]
    problems += [f"unexpected {k}" for k in got if k not in expected]
    problems += [f"{k}: shape {list(got[k])}, expected {list(v)}" for k, v in expected.items() if got.get(k, v) != v]
    if problems:
        raise ValueError(f"model: {path} does not hold this model's weights ({'; '.join(problems[:3])})")
    try:
        state = load_file(files.weights, device="cpu")
    except Exception as e:  # safetensors' errors: a file truncated after its header was read
        raise ValueError(f"model: {path} could not be read ({' '.join(str(e).split())[:200]})") from None
    found = weights_id(state)
    if found != config["weights_id"]:
        raise _Mixed(
            f"model: {path} holds other weights than the ones {CONFIG} was written with (weights_id "
            f"{found}, expected {config['weights_id']}): the directory mixes two runs or the file is "
            "damaged; train again or restore it",
            found,
        )
    bad = [k for k, t in state.items() if not _finite(t)]
    if bad:
        raise ValueError(
            f"model: {path}: {len(bad)} weight tensors hold NaN/inf ({', '.join(bad[:3])}); the run diverged or "
            "the file is damaged: train again"
        )
    model.load_state_dict(state)
    return model, Standardizer.from_dict(config["standardizer"])


def check_compatible(config: dict, data: MultimodalDataset) -> None:
    """Data given to ``evaluate``/``predict`` must fit the trained model; say precisely what differs."""
    trained = config["data"]
    if data.task != trained["task"]:
        raise ValueError(f"data: the model was trained for {trained['task']}, the data's targets are {data.task}")
    if data.task == "classification" and data.num_classes > trained["num_classes"]:
        raise ValueError(
            f"data: the model was trained with {trained['num_classes']} classes, the data has labels up to "
            f"{data.num_classes - 1}"
        )
    if data.task == "regression" and data.y is not None and data.target_dim != trained["target_dim"]:
        raise ValueError(f"data: the model predicts {trained['target_dim']} targets, the data has {data.target_dim}")
    specs = {m.name: m for m in data.modalities}
    for m in trained["modalities"]:
        got = specs.get(m["name"])
        if got is None:
            raise ValueError(
                f"data: modality '{m['name']}' is missing (the model was trained on "
                f"{[t['name'] for t in trained['modalities']]}, the data has {list(specs)})"
            )
        if got.dim != m["dim"]:
            raise ValueError(
                f"modality '{m['name']}': expected feature size {m['dim']} (as in training), got {got.dim}"
            )
        if (got.is_sequence, got.length) != (m["is_sequence"], m["length"]):
            expected = f"sequences of {m['length']} steps" if m["is_sequence"] else "vectors (N, D)"
            actual = f"sequences of {got.length} steps" if got.is_sequence else "vectors (N, D)"
            raise ValueError(
                f"modality '{m['name']}': expected {expected} as in training (pad shorter ones and mark the "
                f"padding in mask_{m['name']}), got {actual}"
            )
    extra = sorted(set(specs) - {m["name"] for m in trained["modalities"]})
    if extra:
        raise ValueError(
            f"data: modalities {extra} were not seen in training (expected {[m['name'] for m in trained['modalities']]})"
        )
