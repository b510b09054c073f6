"""Run every command and snippet of README.md verbatim and check what the README says they print.

    python tools/readme_check.py [--only PATTERN] [--keep DIR] [--list]

The README's code blocks are read as they stand: the lines starting with ``$ `` (with ``\\``
continuations) in a block, the lines after a command up to the next one (its output as shown), the
``make``/``attnfuse`` lines of blocks without ``$`` (the set-up block, the table and big-data
synopses), every ```` ```python ```` block and the indented Python snippet. Every shell command must
have an entry in :data:`PLAN` (keyed by its full README text, comment included), which says how it
is run and what is checked; a README command without an entry, or an entry whose command is no
longer in the README, is a failure, so nothing can be added to the README unchecked
(``tests/test_readme.py`` checks the same in ``make test``).

Everything runs in one scratch directory, in README order, after the user's files the README names
(``my_table.csv``, ``diabetes.npz``, ``my_features.npz``, ``big.npz``, ``table.csv``, ...) have been
built there; ``<repo>/.venv/bin`` is first on ``PATH`` (``attnfuse``, ``torchrun``, ``python``)
and ``<repo>/src`` first on ``PYTHONPATH``. ``--only PATTERN`` runs the items whose text contains
PATTERN, and the items they need (``runs/planted`` for ``evaluate``). Deterministic output is
compared exactly (the walkthrough, whitespace aside: the wrapping follows the terminal width); the
diabetes table is compared line by line with the numbers of the fusion, the times and the standard
error masked (float32 training differs in the last bits between CPUs), the baselines' numbers
(scikit-learn, float64, one thread) exactly. The last line is ``N passed, M failed, K skipped``;
the exit status is 1 when anything failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAKEFILE = ROOT / "Makefile"


# --------------------------------------------------------------------------- extraction


@dataclass
class Item:
    """One runnable thing of the README: a shell command (``shell``), a command of a block without
    ``$`` prompts (``bare``), or a Python snippet (``python``)."""

    kind: str
    text: str  # the command as written (continuations joined with a space) or the snippet's code
    line: int  # 1-based line of the README where it starts
    output: list[str] = field(default_factory=list)  # the lines shown after a `$` command

    @property
    def key(self) -> str:
        return self.text


def _blocks(text: str):
    """(language, first line number, lines) of every fenced block, and of every indented code block
    (4 spaces after a blank line, outside fences) as language ``indented``."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            lang = line[3:].strip()
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            yield lang, i + 2, lines[i + 1 : j]
            i = j + 1
            continue
        if line.startswith("    ") and line.strip() and i > 0 and not lines[i - 1].strip():
            j = i
            while j < len(lines) and (lines[j].startswith("    ") or not lines[j].strip()):
                j += 1
            body = lines[i:j]
            while body and not body[-1].strip():
                body.pop()
            yield "indented", i + 1, [b[4:] for b in body]
            i = j
            continue
        i += 1


def extract(text: str) -> list[Item]:
    items: list[Item] = []
    for lang, first, lines in _blocks(text):
        if lang in ("python", "indented"):
            items.append(Item("python", "\n".join(lines) + "\n", first))
            continue
        if lang:
            continue
        if any(line.startswith("$ ") for line in lines):
            current: Item | None = None
            continuing = False
            for n, line in enumerate(lines, first):
                if continuing and current is not None:
                    current.text += " " + line.strip()
                    continuing = current.text.endswith("\\")
                    if continuing:
                        current.text = current.text[:-1].rstrip()
                elif line.startswith("$ "):
                    current = Item("shell", line[2:].rstrip(), n)
                    items.append(current)
                    continuing = current.text.endswith("\\")
                    if continuing:
                        current.text = current.text[:-1].rstrip()
                elif current is not None and line.strip():
                    current.output.append(line)
            continue
        for n, line in enumerate(lines, first):
            if line.startswith(("make ", "attnfuse ", "torchrun ", "python ")):
                items.append(Item("bare", line.rstrip(), n))
    return items


def readme_items() -> list[Item]:
    return extract(README.read_text(encoding="utf-8"))


def layout_paths(text: str) -> list[str]:
    """The files and folders of the "How the code is laid out" tree: a name at indent 0 is relative
    to the repository, a deeper one to the folder above it; description lines are indented further."""
    block = next(lines for lang, _, lines in _blocks(text) if not lang and lines and lines[0] == "src/attnfuse/")
    paths: list[str] = []
    folders: dict[int, str] = {}  # indent -> folder path
    for line in block:
        indent = len(line) - len(line.lstrip())
        if indent > 6:
            continue
        parent = folders[max(i for i in folders if i < indent)] if any(i < indent for i in folders) else ""
        for name in re.split(r"\s{2,}", line.strip())[0].split(", "):
            paths.append(parent + name)
            if name.endswith("/"):
                folders = {i: p for i, p in folders.items() if i < indent}
                folders[indent] = parent + name
    return paths


def command_argv(command: str) -> list[str] | None:
    """The ``attnfuse`` arguments of a README command (``attnfuse ...``, ``torchrun ... -m attnfuse
    ...``, ``.venv/bin/attnfuse ...``), its comment dropped; None when it is not an attnfuse command.
    Synopsis brackets (``[--split-col fold]``) are dropped with their content."""
    words = shlex.split(re.sub(r"\s\[[^\]]*\]", "", command), comments=True)
    if not words:
        return None
    if words[0] == "torchrun" and "-m" in words:
        i = words.index("-m")
        return words[i + 2 :] if words[i + 1] == "attnfuse" else None
    if words[0].endswith("attnfuse"):
        return words[1:]
    return None


def make_recipe(target: str) -> str:
    """The command a Makefile target runs (its last recipe line), with ``$(VENV)`` resolved."""
    text = MAKEFILE.read_text(encoding="utf-8")
    m = re.search(rf"^{re.escape(target)}:[^\n]*\n((?:\t[^\n]*\n)+)", text, re.M)
    if m is None:
        raise ValueError(f"Makefile: no target {target!r}")
    recipe = m.group(1).strip().splitlines()[-1].strip()
    return recipe.replace("$(VENV)", str(ROOT / ".venv"))


# --------------------------------------------------------------------------- the user's files


def build_user_files(d: Path) -> None:
    """The files the README's commands read, built as the README describes them."""
    import numpy as np

    rng = np.random.default_rng(0)

    # diabetes.npz: scikit-learn's diabetes table as two views, `clinical` (age, sex, BMI, blood
    # pressure) and `serum` (six blood measures), 442 rows, the unscaled features and the disease
    # progression as the target; no split column.
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True, scaled=False)
    np.savez(d / "diabetes.npz", x_clinical=x[:, :4], x_serum=x[:, 4:], y=y)

    # my_table.csv: a regression table with txt_* and aud_* feature columns and a `score` target.
    n = 240
    txt, aud = rng.normal(size=(n, 6)), rng.normal(size=(n, 4))
    score = txt[:, 0] - 0.5 * aud[:, 1] + 0.3 * txt[:, 2] * aud[:, 0] + 0.2 * rng.normal(size=n)
    _write_csv(d / "my_table.csv", {**_cols("txt", txt), **_cols("aud", aud), "score": score})

    # table.csv: txt_* and aud_* columns, a class `label`, a `fold` column of train/valid/test.
    label = (txt[:, 1] + aud[:, 2] > 0).astype(int) + (txt[:, 3] > 1).astype(int)
    fold = np.array(["train"] * 160 + ["valid"] * 40 + ["test"] * 40)
    _write_csv(d / "table.csv", {**_cols("txt", txt), **_cols("aud", aud), "label": label, "fold": fold})

    # table.parquet and columns.yaml: the mapping file of the README's example.
    import pyarrow as pa
    import pyarrow.parquet as pq

    age, height = rng.integers(18, 90, size=n).astype(float), rng.normal(170, 10, size=n)
    pq.write_table(
        pa.table({**_cols("txt", txt), "age": age, "height": height, "label": label, "fold": fold}),
        d / "table.parquet",
    )
    (d / "columns.yaml").write_text('modalities: {text: "txt_*", meta: [age, height]}\ntarget: label\nsplit: fold\n')

    # my_features.npz: sequence modalities (text, audio, vision) and sentiment scores in [-3, 3].
    n, t = 160, 6
    feats = {
        "x_text": rng.normal(size=(n, t, 12)),
        "x_audio": rng.normal(size=(n, t, 5)),
        "x_vision": rng.normal(size=(n, t, 7)),
    }
    s = feats["x_text"][:, :, 0].mean(1) + feats["x_audio"][:, :, 1].mean(1)
    sentiment = np.clip(np.round(3 * s / np.abs(s).max(), 1), -3, 3)
    split = np.array(["train"] * 110 + ["valid"] * 25 + ["test"] * 25)
    np.savez(
        d / "my_features.npz",
        **{k: v.astype(np.float32) for k, v in feats.items()},
        y=sentiment.astype(np.float32),
        split=split,
    )

    # big.npz: the data of the several-process and directory-dataset examples (small here).
    n = 256
    a, b = rng.normal(size=(n, 5, 6)).astype(np.float32), rng.normal(size=(n, 4, 3)).astype(np.float32)
    np.savez(d / "big.npz", x_a=a, x_b=b, y=(a[:, 0, 0] + b[:, 1, 1]).astype(np.float32))


def _cols(prefix, a):
    return {f"{prefix}_{j}": a[:, j] for j in range(a.shape[1])}


def _write_csv(path: Path, columns: dict) -> None:
    names = list(columns)
    rows = zip(*(columns[k] for k in names))
    with open(path, "w", encoding="utf-8") as f:
        f.write(",".join(names) + "\n")
        for row in rows:
            f.write(",".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in row) + "\n")


# --------------------------------------------------------------------------- checks


class Failed(Exception):
    pass


@dataclass
class Result:
    rc: int
    out: str  # stdout and stderr together
    seconds: float  # wall time
    cpu: float = 0.0  # CPU seconds of the command's processes (a shared machine's wall time overstates)


@dataclass
class Ctx:
    dir: Path
    env: dict
    log: Callable[[str], None]


def _child_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_shell(ctx: Ctx, command: str, timeout: float = 3600) -> Result:
    t0, c0 = time.monotonic(), _child_cpu()
    p = subprocess.run(
        ["bash", "-c", command], cwd=ctx.dir, env=ctx.env, capture_output=True, text=True, timeout=timeout
    )
    return Result(p.returncode, p.stdout + p.stderr, time.monotonic() - t0, _child_cpu() - c0)


def run_interrupted(ctx: Ctx, command: str, started: str, sig=signal.SIGINT, timeout: float = 3600) -> Result:
    """Run `command`, and once the file `started` exists (training has begun) and 2 s have passed,
    send `sig` to its process group, as a terminal's Ctrl-C does."""
    t0, c0 = time.monotonic(), _child_cpu()
    p = subprocess.Popen(
        ["bash", "-c", command], cwd=ctx.dir, env=ctx.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )  # fmt: skip
    while not (ctx.dir / started).exists():
        if p.poll() is not None or time.monotonic() - t0 > timeout:
            out = p.communicate()[0]
            raise Failed(f"ended (rc {p.returncode}) before {started} appeared:\n{tail(out)}")
        time.sleep(0.2)
    time.sleep(2)
    if p.poll() is not None:
        raise Failed(f"finished (rc {p.returncode}) before the signal could be sent")
    os.killpg(p.pid, sig)
    out = p.communicate(timeout=timeout)[0]
    return Result(p.returncode, out, time.monotonic() - t0, _child_cpu() - c0)


def tail(out: str, n: int = 25) -> str:
    return "\n".join("    " + line for line in out.splitlines()[-n:])


NUMBER = r"-?\d+(?:\.\d+)?"


def shown_pattern(lines: list[str], literal: Callable[[str], bool] = lambda line: True) -> re.Pattern:
    """A pattern for the output lines the README shows: whitespace-insensitive (the wrapping and the
    table column widths follow the terminal), the numbers of a line kept only where `literal(line)`.
    A leading ``...`` line stands for any output before."""
    if lines and lines[0].strip() == "...":
        lines = lines[1:]
    parts = []
    for line in lines:
        words = line.split()
        if literal(line):
            parts.append(r"\s+".join(map(re.escape, words)))
        else:
            parts.append(
                r"\s+".join(
                    "".join(
                        NUMBER if re.fullmatch(NUMBER, piece) else re.escape(piece)
                        for piece in re.split(f"({NUMBER})", w)
                    )
                    for w in words
                )
            )
    return re.compile(r"\s+".join(parts))


def expect(result: Result, rc: int = 0, contains=(), files=(), ctx: Ctx | None = None) -> None:
    if result.rc != rc:
        raise Failed(f"exit code {result.rc}, expected {rc}:\n{tail(result.out)}")
    for s in contains:
        if s not in result.out:
            raise Failed(f"the output lacks {s!r}:\n{tail(result.out)}")
    for f in files:
        if not (ctx.dir / f).exists():
            raise Failed(f"{f} was not written")


def expect_shown(result: Result, item: Item, literal=lambda line: True) -> None:
    pattern = shown_pattern(item.output, literal)
    if not pattern.search(result.out):
        got = re.sub(r"[ \t]+\n", "\n", result.out)
        raise Failed(f"the output differs from the README's (line {item.line}):\n{tail(got, 40)}")


MODEL_FILES = ("model.safetensors", "config.json", "metrics.json", "log.csv", "run.yaml")


def model_dir(d: str) -> tuple[str, ...]:
    return tuple(f"{d}/{f}" for f in MODEL_FILES)


@dataclass
class Check:
    """How one README command is run and checked. `how` is ``run``, ``interrupt``, ``make`` or
    ``skip``; `needs` names the README commands (PLAN keys) whose outputs it reads."""

    how: str = "run"
    check: Callable[[Result, Item, Ctx], None] | None = None
    needs: tuple[str, ...] = ()
    reason: str = ""  # why it is skipped
    variants: tuple[str, ...] = ()  # a synopsis: the commands run in its place
    shows_output: bool = False  # the README shows output for it, and `check` compares it


# README commands (full text, comment included) -> how each is run and what is checked.
PLANTED = "attnfuse train --data synthetic-regression --fusion cross --out runs/planted"
RESUME_RUN = "attnfuse train --data synthetic-regression --fusion cross --epochs 200 --out runs/planted"
TABLE_SYNOPSIS = (
    "attnfuse train --data table.csv --modality 'text=txt_*' --modality audio=aud_ --target label [--split-col fold]"
)
CONVERT = "attnfuse convert big.npz big/          # or a table (with --modality ...), a pickle, a built-in"


def _diabetes(r: Result, item: Item, ctx: Ctx) -> None:
    expect(r)
    # The baselines' rows are exact on any CPU; the fusion's figures, its best epoch, the times and
    # the standard error are masked (float32 training differs in the last bits between CPUs).
    expect_shown(r, item, literal=lambda line: "(baseline)" in line)
    exact = shown_pattern(item.output).search(r.out) is not None
    ctx.log(f"      the fusion's figures {'match the README exactly' if exact else 'differ from the README (not checked)'}"
            " on this CPU; times and standard error not compared")  # fmt: skip


INTERVALS = "attnfuse train --data diabetes.npz --seed 1 --interval 0.9 --no-baselines --out runs/diabetes-interval"


def _intervals(r: Result, item: Item, ctx: Ctx) -> None:
    expect(r, files=model_dir("runs/diabetes-interval"), ctx=ctx)
    expect_shown(r, item, literal=lambda line: False)  # the fusion's figures: float32 training, CPU-dependent
    block = json.loads((ctx.dir / "runs/diabetes-interval/config.json").read_text()).get("calibration") or {}
    if block.get("method") != "conformal" or block.get("level") != 0.9 or len(block.get("half_width", [])) != 1:
        raise Failed(f"runs/diabetes-interval/config.json: expected the 0.9 interval's block, got {block}")


def _walkthrough(r: Result, item: Item, ctx: Ctx) -> None:
    expect(r)
    expect_shown(r, item)  # every number and word, exactly


def _demo_equivalent(r: Result, item: Item, ctx: Ctx) -> None:
    shown = ("mfeat", "auto: the model is a weighted ensemble of", "(baseline)")
    expect(r, contains=shown, files=model_dir("runs/mfeat-auto"), ctx=ctx)
    config = json.loads((ctx.dir / "runs/mfeat-auto/config.json").read_text())
    if "auto" not in json.dumps(config):
        raise Failed("runs/mfeat-auto/config.json does not record --fusion auto's choice")
    metrics = json.loads((ctx.dir / "runs/mfeat-auto/metrics.json").read_text())
    for k in ("train", "valid", "test", "baselines", "candidates", "weighted"):
        if k not in metrics:
            raise Failed(f"runs/mfeat-auto/metrics.json has no {k!r}")


def _interrupted(r: Result, item: Item, ctx: Ctx) -> None:
    if r.rc != 130:
        raise Failed(f"exit code {r.rc} after SIGINT, expected 130:\n{tail(r.out)}")
    shown = [line.removeprefix("^C").strip() for line in item.output]
    expect_shown(r, Item("shell", "", item.line, shown), literal=lambda line: False)
    expect(Result(0, "", 0), files=("runs/planted/last",), ctx=ctx)


def _resumed(r: Result, item: Item, ctx: Ctx) -> None:
    expect(r, files=model_dir("runs/planted"), ctx=ctx)
    if (ctx.dir / "runs/planted/last").exists():
        raise Failed("runs/planted/last is still there after the run completed")


def _predictions(r: Result, item: Item, ctx: Ctx) -> None:
    expect(r, files=("preds.csv",), ctx=ctx)
    header = (ctx.dir / "preds.csv").read_text().splitlines()[0]
    for word in ("split",):
        if word not in header:
            raise Failed(f"preds.csv's header {header!r} lacks {word!r}")


PLAN: dict[str, Check] = {
    "make demo              # creates .venv, installs everything, trains on mfeat (--fusion auto, with baselines), prints the results": Check(
        "make", check=_demo_equivalent
    ),
    "make test              # the same install, then the whole test suite": Check(
        "skip", reason="CI runs `make test` itself just before this script (.ci/run)"
    ),
    "attnfuse --help": Check(check=lambda r, i, c: expect(r, contains=("train", "evaluate", "predict", "export"))),
    "attnfuse export --model runs/planted --format onnx --out planted.onnx": Check(
        needs=(PLANTED,),
        check=lambda r, i, c: expect(r, contains=("checked against the model",), files=("planted.onnx",), ctx=c),
    ),
    "attnfuse serve --model runs/planted        # http://127.0.0.1:8000 until Ctrl-C or SIGTERM": Check(
        "skip", reason="a server runs until it is stopped: the Python snippet below runs this command and stops it"
    ),
    "attnfuse datasets                       # built-ins: mfeat, synthetic-regression, synthetic-classification": Check(
        check=lambda r, i, c: expect(r, contains=("mfeat", "synthetic-regression", "synthetic-classification"))
    ),
    "attnfuse train                          # = --data mfeat --fusion auto (with the baselines)": Check(
        check=_demo_equivalent
    ),
    PLANTED: Check(check=lambda r, i, c: expect(r, files=model_dir("runs/planted"), ctx=c)),
    "attnfuse train --data my_table.csv --modality 'text=txt_*' --modality 'audio=aud_*' --target score --ensemble 5": Check(
        check=lambda r, i, c: expect(r, files=model_dir("runs/my_table-auto"), ctx=c)
    ),
    "attnfuse tune --data my_table.csv --target score --trials 30 --out runs/tuned   # Optuna search, then the best trained": Check(
        check=lambda r, i, c: expect(r, files=(*model_dir("runs/tuned"), "runs/tuned.study.db"), ctx=c)
    ),
    "attnfuse train --data my_features.npz --fusion mult --d-model 30 --layers 5 --heads 5 --metrics sentiment": Check(
        check=lambda r, i, c: expect(
            r,
            contains=("acc2", "acc2_has0", "f1_has0", "acc7", "acc5"),
            files=model_dir("runs/my_features-mult"),
            ctx=c,
        )
    ),
    "attnfuse train --fusion self --repeat 5  # 5 seeds (and 5 splits when the data has none): mean ± std": Check(
        check=lambda r, i, c: expect(r, contains=("±",), files=model_dir("runs/mfeat-self"), ctx=c)
    ),
    "attnfuse train --config runs/planted/run.yaml --seed 1   # the same run again, with another seed": Check(
        needs=(PLANTED,), check=lambda r, i, c: expect(r, ctx=c)
    ),
    "attnfuse evaluate --model runs/planted --data synthetic-regression": Check(
        needs=(PLANTED,),
        check=lambda r, i, c: expect(r, contains=("test",), files=("runs/planted/evaluation.json",), ctx=c),
    ),
    "attnfuse evaluate --model runs/planted --data synthetic-regression --missing": Check(
        needs=(PLANTED,),
        check=lambda r, i, c: expect(
            r,
            contains=("(fusion)", "absent", "robustness plot written to"),
            files=("runs/planted/evaluation.json", "runs/planted.missing.png"),
            ctx=c,
        ),
    ),
    "attnfuse predict  --model runs/planted --data synthetic-regression --out preds.csv": Check(
        needs=(PLANTED,), check=_predictions
    ),
    "attnfuse explain  --model runs/planted": Check(
        needs=(PLANTED,), check=lambda r, i, c: expect(r, files=("runs/planted/explain/report.html",), ctx=c)
    ),
    'attnfuse explain  --query "1,2" --keys "2,3;1,0" --no-scale': Check(
        check=lambda r, i, c: expect(r, contains=("0.99909", "0.00091", "[1.9991, 2.9973]"))
    ),
    'attnfuse explain --query "1,2" --keys "2,3;1,0" --no-scale': Check(check=_walkthrough, shows_output=True),
    "attnfuse train --data diabetes.npz --seed 1": Check(check=_diabetes, shows_output=True),
    INTERVALS: Check(check=_intervals, shows_output=True),
    RESUME_RUN: Check("interrupt", check=_interrupted, shows_output=True),
    "attnfuse train --resume runs/planted    # the run's own options; --device may differ, nothing else": Check(
        needs=(RESUME_RUN,), check=_resumed
    ),
    "torchrun --nproc-per-node 4 -m attnfuse train --data big.npz --fusion mult --out runs/big": Check(
        check=lambda r, i, c: expect(r, files=model_dir("runs/big"), ctx=c)
    ),
    "torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m attnfuse train --data big.npz --fusion mult --out runs/big     # on each machine": Check(
        "skip", reason="needs two machines reachable at HOST:29500 (the one-machine form runs above)"
    ),
    TABLE_SYNOPSIS: Check(
        variants=(
            "attnfuse train --data table.csv --modality 'text=txt_*' --modality audio=aud_ --target label",
            "attnfuse train --data table.csv --modality 'text=txt_*' --modality audio=aud_ --target label --split-col fold",
        ),
        # A default output directory never replaces a run: the second variant writes runs/table-auto-2.
        check=lambda r, i, c: expect(r, contains=("written to",)),
    ),
    "attnfuse train --data table.parquet --mapping columns.yaml": Check(
        check=lambda r, i, c: expect(r, contains=("written to",))
    ),
    CONVERT: Check(check=lambda r, i, c: expect(r, files=("big/x_a.npy", "big/x_b.npy", "big/y.npy"), ctx=c)),
    "attnfuse train --data big/": Check(needs=(CONVERT,), check=lambda r, i, c: expect(r, ctx=c)),
}


def _py_train(r: Result, item: Item, ctx: Ctx) -> None:
    expect(r, files=model_dir("runs/planted"), ctx=ctx)
    first = r.out.splitlines()[0]
    for k in ("'mae'", "'rmse'", "'r2'", "'corr'"):
        if k not in first:
            raise Failed(f"result.report['test'] printed {first!r}, without {k}")


def _py_run(r: Result, item: Item, ctx: Ctx) -> None:
    expect(r)
    lines = r.out.splitlines()
    if not all(k in lines[0] for k in ("'mae'", "'rmse'", "'r2'", "'corr'")):
        raise Failed(f"result.metrics['test'] printed {lines[0]!r}")
    if len(lines) < 2:
        raise Failed("no attention map printed")


def _py_table(r: Result, item: Item, ctx: Ctx) -> None:
    # the leaderboard marks the model kept and lists the baselines; evaluate's test metrics print
    expect(
        r, contains=("(kept)", "baseline", "'accuracy'"), files=("runs/table/model.safetensors", "table.onnx"), ctx=ctx
    )


def _py_arrays(r: Result, item: Item, ctx: Ctx) -> None:
    # string targets come back as the strings they were ("labels of any kind")
    expect(r)
    if not re.search(r"'(up|down)'", r.out):
        raise Failed(f"predict printed no 'up' or 'down' label:\n{tail(r.out)}")


def _py_serve(r: Result, item: Item, ctx: Ctx) -> None:
    expect(r, contains=("'predictions'", "'video'", "0 stopped (SIGTERM): 1 request answered in 1 batch, 0 refused"))


# The Python snippets, in README order: the start of each (so that a new or moved snippet is
# noticed) and its check.
PY_PLAN: list[tuple[str, Callable[[Result, Item, Ctx], None]]] = [
    ("from attnfuse import FusionPredictor\n\npredictor = FusionPredictor(", lambda r, i, c: expect(r)),
    ("import pyarrow.csv\nfrom sklearn.base import clone", _py_table),
    ("import numpy as np\n\nfrom attnfuse import FusionPredictor", _py_arrays),
    (
        "import pyarrow.csv\n\nfrom attnfuse import FusionPredictor",
        lambda r, i, c: expect(r, contains=("['baselines', 'calibration', 'train', 'valid']", "mask ")),
    ),
    ("import json, random, subprocess, urllib.request\n\nserver = subprocess.Popen(", _py_serve),
    ("import attnfuse\n\nspec = attnfuse.TrainSpec.from_options(", _py_train),
    ('import attnfuse\n\ndata = attnfuse.load_data("synthetic-regression")', _py_run),
    ("import torch, attnfuse\n\nref = torch.nn.MultiheadAttention(512, 8", lambda r, i, c: expect(r)),
    ("from attnfuse import nn as afnn", lambda r, i, c: expect(r)),
]

# Commands written inline in the README's prose, run with what the prose says of them.
INLINE: dict[str, Callable[[Result, Item, Ctx], None]] = {
    'attnfuse explain --self "1,0;0,1" --no-scale': lambda r, i, c: expect(
        r, contains=("0.7311", "0.2689", "[0.73106, 0.26894]", "[0.26894, 0.73106]")
    ),
    "attnfuse train --help": lambda r, i, c: expect(r, contains=("Data and run", "Model", "Training")),
}

# Things the README shows and the script runs without a prompt.
NOT_RUN = {
    "python benchmarks/attention.py": "a benchmark (minutes; figures depend on the machine)",
    "python benchmarks/fusion.py --part baselines": "a benchmark (hours on 2 cores)",
    "python benchmarks/speed.py": "a benchmark (figures depend on the machine)",
    "pip install 'attnfuse[tensorboard]'": "installs into the environment (network)",
    "pip install tensorboard": "installs into the environment (network)",
}


def problems(items: list[Item], text: str) -> list[str]:
    """What the README holds that the plan does not check, and plan entries the README lost."""
    out = []
    shell = [i for i in items if i.kind != "python"]
    keys = [i.key for i in shell]
    for i in shell:
        if i.key not in PLAN:
            out.append(f"README line {i.line}: no check in tools/readme_check.py PLAN for {i.key!r}")
        elif i.output and not PLAN[i.key].shows_output:
            out.append(f"README line {i.line}: the output shown for {i.key!r} is not compared")
    for k, c in PLAN.items():
        if k not in keys:
            out.append(f"PLAN entry not in the README (anymore): {k!r}")
        out.extend(f"PLAN entry {k!r} needs {n!r}, which is not a PLAN entry" for n in c.needs if n not in PLAN)
    py = [i for i in items if i.kind == "python"]
    if len(py) != len(PY_PLAN):
        out.append(f"README has {len(py)} Python snippets, PY_PLAN {len(PY_PLAN)}")
    for i, (start, _) in zip(py, PY_PLAN):
        if not i.text.startswith(start):
            out.append(f"README line {i.line}: Python snippet does not start with {start!r} (PY_PLAN)")
    out.extend(f"INLINE command not in the README: {k!r}" for k in INLINE if f"`{k}`" not in text)
    out.extend(f"NOT_RUN command not in the README: {k!r}" for k in NOT_RUN if f"`{k}`" not in text)
    return out


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--only",
        action="append",
        help="run only the items whose text contains PATTERN (and what they need); repeatable",
    )
    ap.add_argument("--keep", type=Path, help="the scratch directory (kept); default a temporary one, removed")
    ap.add_argument("--list", action="store_true", help="list the items and how each is checked, run nothing")
    args = ap.parse_args(argv)

    text = README.read_text(encoding="utf-8")
    items = extract(text)
    passed, failed, skipped = [], [], []

    def say(s: str) -> None:
        print(s, flush=True)

    for p in problems(items, text):
        say(f"FAIL  {p}")
        failed.append(p)
    missing = [p for p in layout_paths(text) if not (ROOT / p).exists()]
    (failed if missing else passed).append("layout")
    say(f"{'FAIL' if missing else 'ok  '}  the code layout's paths exist" + (f": missing {missing}" if missing else ""))

    todo: list[tuple[str, Item, Callable | None, str]] = []  # (label, item, check, how)
    py_index = 0
    for item in items:
        if item.kind == "python":
            check = PY_PLAN[py_index][1] if py_index < len(PY_PLAN) else (lambda r, i, c: expect(r))
            py_index += 1
            todo.append((f"python snippet at README line {item.line}", item, check, "python"))
        elif item.key in PLAN:
            todo.append((item.key, item, PLAN[item.key].check, PLAN[item.key].how))
    # `make demo` last: its recipe may be a README command already run (then its result is reused)
    todo.sort(key=lambda t: t[3] == "make")
    for k, check in INLINE.items():
        todo.append((k, Item("shell", k, 0), check, "run"))
    if args.only:
        wanted = {label for label, item, _, _ in todo if any(p in label or p in item.text for p in args.only)}
        grow = True
        while grow:
            grow = False
            for label in list(wanted):
                for n in PLAN[label].needs if label in PLAN else ():
                    if n not in wanted:
                        wanted.add(n)
                        grow = True
        todo = [t for t in todo if t[0] in wanted]
    if args.list:
        for label, _, _, how in todo:
            say(f"{how:9} {label}")
        for k, why in NOT_RUN.items():
            say(f"not run   {k}: {why}")
        return 0

    scratch = args.keep or Path(tempfile.mkdtemp(prefix="readme_check."))
    scratch.mkdir(parents=True, exist_ok=True)
    venv_bin = ROOT / ".venv" / "bin"
    env = dict(os.environ)
    env["PATH"] = f"{venv_bin}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    ctx = Ctx(scratch, env, say)
    say(f"scratch directory {scratch}; {venv_bin} first on PATH")
    t_all, c_all = time.monotonic(), _child_cpu()
    build_user_files(scratch)

    results: dict[str, bool] = {}
    for label, item, check, how in todo:
        plan = PLAN.get(item.key)
        if how == "skip":
            say(f"skip  {label}\n      {plan.reason}")
            skipped.append(label)
            continue
        blocked = [n for n in (plan.needs if plan else ()) if results.get(n) is False]
        if blocked:
            say(f"FAIL  {label}\n      not run: it needs {blocked[0]!r}, which failed")
            failed.append(label)
            results[label] = False
            continue
        if how == "python":
            script = scratch / f"snippet_line{item.line}.py"
            script.write_text(item.text, encoding="utf-8")
            commands = [f"python {script.name}"]
        elif how == "make":
            recipe = make_recipe(item.text.split()[1])
            same = next((k for k, r in results.items() if command_argv(k) == command_argv(recipe)), None)
            if same is not None:
                say(f"ok    {label}\n      runs `{recipe}` (the Makefile's recipe), the same as {same!r} above:"
                    f" {'passed' if results[same] else 'failed'} there")  # fmt: skip
                (passed if results[same] else failed).append(label)
                results[label] = results[same]
                continue
            commands = [recipe]
        else:
            commands = list(plan.variants) if plan and plan.variants else [item.text]
        ok = True
        for command in commands:
            try:
                if how == "interrupt":
                    r = run_interrupted(ctx, command, started="runs/planted/last/log.csv")
                else:
                    r = run_shell(ctx, command)
                check(r, item, ctx)
                say(
                    f"ok    {command}  ({r.seconds:.1f} s, cpu {r.cpu:.1f} s)"
                    + (f"  [README line {item.line}]" if item.line else "")
                )
            except (Failed, subprocess.TimeoutExpired) as e:
                ok = False
                say(f"FAIL  {command}  [README line {item.line}]\n      {e}")
        results[label] = ok
        (passed if ok else failed).append(label)
    for k, why in NOT_RUN.items():
        say(f"skip  {k}\n      {why}")
        skipped.append(k)
    say(f"total {time.monotonic() - t_all:.0f} s (cpu {_child_cpu() - c_all:.0f} s)")
    say(f"{len(passed)} passed, {len(failed)} failed, {len(skipped)} skipped")
    if args.keep is None and not failed:
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
