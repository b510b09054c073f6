"""What the safety of model directories costs (a script, not a test): writing a run directory as one
transaction (temporary directory, fsync of every file and directory, renameat2 swap, lock) against
writing the same files in place without fsync, as attnfuse did before; and reading one back with
every check (schema, size bound, header, finite weights, the weights' hash) against a bare load.

    python benchmarks/save.py            # prints a markdown table

Models: the ``self`` fusion on mfeat's six modalities at three widths. Times: median (min) of
``--repeat`` runs, in milliseconds, on the file system of ``--dir`` (default: the temp directory).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from attnfuse.checkpoint import load_model, read_config, run_directory, write_run
from attnfuse.data import Standardizer, load_mfeat
from attnfuse.fusion import build_model
from attnfuse.training import TrainConfig, model_config


def timed(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times), min(times)


def measure(d_model: int, data, standardizer: Standardizer, root: Path, repeat: int) -> str:
    """One table row: the model at ``d_model``, written and read back ``repeat`` times each way."""
    torch.manual_seed(0)
    model = build_model("self", model_config("self", data, d_model=d_model, nhead=4, num_layers=2))
    params = sum(p.numel() for p in model.parameters())
    metrics = {"test": {"accuracy": 0.5}}
    options = {"data": "mfeat", "fusion": "self", "d_model": d_model}
    out, plain = root / "run", root / "plain"
    plain.mkdir()

    def transactional():
        with run_directory(out) as tmp:
            write_run(tmp, model, "self", data, standardizer, asdict(TrainConfig()), 0, metrics, options)

    def in_place():  # the pre-transaction way: each file written on its own, nothing fsynced
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, plain / "model.safetensors", metadata={"fusion": "self"})
        config = json.loads((out / "config.json").read_text())
        (plain / "config.json").write_text(json.dumps(config, indent=2))
        (plain / "metrics.json").write_text(json.dumps(metrics, indent=2))
        (plain / "run.yaml").write_text(yaml.safe_dump(options, sort_keys=False))

    def checked_load():
        load_model(out, config=read_config(out))

    def bare_load():
        fresh = build_model("self", json.loads((plain / "config.json").read_text())["model"])
        fresh.load_state_dict(load_file(plain / "model.safetensors"))

    transactional()
    in_place()
    size = (out / "model.safetensors").stat().st_size / 1e6
    cells = [timed(f, repeat) for f in (transactional, in_place, checked_load, bare_load)]
    shown = " | ".join(f"{med:.1f} ({low:.1f})" for med, low in cells)
    return f"| {d_model} | {params:,} | {size:.1f} | {shown} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()

    data = load_mfeat()
    standardizer = Standardizer.fit(data)
    print(f"file system of {args.dir}; median (min) of {args.repeat} runs, ms\n")
    print(
        "| d_model | parameters | weights (MB) | transaction + fsync | in place, no fsync | checked load | bare load |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for d_model in (64, 256, 1024):
        with tempfile.TemporaryDirectory(dir=args.dir) as root:
            print(measure(d_model, data, standardizer, Path(root), args.repeat))


if __name__ == "__main__":
    main()
