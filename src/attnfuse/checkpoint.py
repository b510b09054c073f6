"""Model directories: ``model.safetensors`` (weights), ``config.json`` (everything needed to rebuild
the model and the feature standardisation), ``metrics.json`` and ``run.yaml`` (the options the run
was trained with: ``attnfuse train --config DIR/run.yaml`` trains it again).

Checkpoints never use pickle: safetensors holds only tensors, JSON only plain values, so loading a
model directory cannot run code. Every file is written to a temporary name and renamed into place,
so an interrupted save never leaves a half-written file behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import yaml
from safetensors.torch import load_file, save_file

from ._version import __version__
from .data.dataset import MultimodalDataset, Standardizer
from .ensemble import Ensemble, build_ensemble
from .fusion import FusionModel

__all__ = ["save_model", "save_run", "load_model", "check_compatible", "atomic_write", "write_json"]

WEIGHTS, CONFIG, METRICS, RUN = "model.safetensors", "config.json", "metrics.json", "run.yaml"


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)``, then rename the temporary file onto ``path`` (same directory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, obj: object) -> None:
    def dump(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")

    atomic_write(path, dump)


def save_model(
    out_dir: str | os.PathLike,
    model: FusionModel | Ensemble,
    fusion: str,
    data: MultimodalDataset,
    standardizer: Standardizer,
    train_config: dict,
    split_seed: int,
    source: str | None = None,
    extra: dict | None = None,
) -> None:
    """Write ``model.safetensors`` and ``config.json`` into ``out_dir``.

    ``split_seed`` is the seed of the train/valid/test split drawn for data without a split
    column, so that ``evaluate`` can report the same parts later; ``source`` is where the data
    came from (a built-in name or a file path), the default data of ``explain``; ``extra``: more
    top-level entries of config.json (e.g. ``"auto"``: how ``--fusion auto`` chose the fusion).
    An :class:`~attnfuse.ensemble.Ensemble` is saved with its members' weights under
    ``members.<k>.``; ``train_config["ensemble"]`` says how many there are."""
    out_dir = Path(out_dir)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(out_dir / WEIGHTS, lambda tmp: save_file(state, tmp, metadata={"fusion": fusion}))
    config = {
        "attnfuse_version": __version__,
        "fusion": fusion,
        "model": asdict(model.config),
        "data": {
            "name": data.name,
            "source": source or data.name,
            "n": data.n,
            "fingerprint": fingerprint(data),
            **data.spec_dict(),
        },
        "split_seed": split_seed,
        "standardizer": standardizer.to_dict(),
        "train": train_config,
        **(extra or {}),
    }
    write_json(out_dir / CONFIG, config)


def save_run(
    out_dir: str | os.PathLike,
    model: FusionModel | Ensemble,
    fusion: str,
    data: MultimodalDataset,
    standardizer: Standardizer,
    train_config: dict,
    split_seed: int,
    metrics: dict,
    options: dict,
    extra: dict | None = None,
) -> None:
    """A whole run directory: the model (:func:`save_model`), ``metrics.json`` and ``run.yaml``
    (``options``: the option values of ``attnfuse train`` that reproduce the run)."""
    out_dir = Path(out_dir)
    save_model(
        out_dir, model, fusion, data, standardizer, train_config, split_seed, source=options.get("data"), extra=extra
    )
    write_json(out_dir / METRICS, metrics)

    def dump(tmp: str) -> None:
        Path(tmp).write_text(yaml.safe_dump(options, sort_keys=False))

    atomic_write(out_dir / RUN, dump)


def fingerprint(data: MultimodalDataset) -> str:
    """A short hash of the targets and the feature shapes: tells the training data from other data
    with the same name and size (``evaluate`` then reports the training split)."""
    h = hashlib.sha256(np.ascontiguousarray(data.y).tobytes())
    for m in data.modalities:
        h.update(f"{m.name}:{m.dim}:{m.length}".encode())
    return h.hexdigest()[:16]


def load_model(model_dir: str | os.PathLike, device: str = "cpu") -> tuple[FusionModel | Ensemble, dict, Standardizer]:
    """Rebuild a saved model (in eval mode) with its config and its standardiser."""
    model_dir = Path(model_dir)
    for name in (CONFIG, WEIGHTS):
        if not (model_dir / name).is_file():
            raise FileNotFoundError(f"model: {model_dir} is not a model directory (no {name}); train one first")
    try:
        config = json.loads((model_dir / CONFIG).read_text())
        missing = [k for k in ("fusion", "model", "data", "standardizer", "train", "split_seed") if k not in config]
        if missing:
            raise ValueError(f"missing keys {missing}")
        model = build_ensemble(config["fusion"], config["model"], config["train"].get("ensemble", 1))
        standardizer = Standardizer.from_dict(config["standardizer"])
    except (json.JSONDecodeError, ValueError, TypeError, KeyError) as e:
        raise ValueError(f"model: {model_dir / CONFIG} is not a valid attnfuse config ({e})") from None
    try:
        model.load_state_dict(load_file(model_dir / WEIGHTS, device="cpu"))
    except Exception as e:  # safetensors' own errors, or weights that do not fit the config
        raise ValueError(f"model: {model_dir / WEIGHTS} does not hold this model's weights ({e})") from None
    return model.to(device).eval(), config, standardizer


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
    if data.task == "regression" and data.target_dim != trained["target_dim"]:
        raise ValueError(f"data: the model predicts {trained['target_dim']} targets, the data has {data.target_dim}")
    specs = {m.name: m for m in data.modalities}
    for m in trained["modalities"]:
        got = specs.get(m["name"])
        if got is None:
            raise ValueError(f"data: modality '{m['name']}' is missing (the model was trained on {list(specs)})")
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
