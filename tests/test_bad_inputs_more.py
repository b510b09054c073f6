"""More hostile inputs, table-driven: files that are not regular files (a named pipe blocks its
reader, a device never ends), metadata nested or sized to exhaust the reader, YAML "billion
laughs" whose expansion must not reach the error line, integer options far out of range, fp16 on
the CPU, modality names that are not file names, and the Python API called with the wrong types.
Each CLI case asserts exit code 2, one line on stderr under 1 KB without a traceback, and that
nothing was written or changed. Also: the k-fold note for a class smaller than k.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import attnfuse
from attnfuse.cli.common import MAX_LINE, one_line
from attnfuse.data import MultimodalDataset, kfold
from attnfuse.data.io import directory as directory_module
from attnfuse.options import check_bounds, option, options_of, shorten
from attnfuse.pipeline import TrainSpec, read_options, train
from attnfuse.training import TrainConfig
from clikit import TINY, assert_one_line, cli, write_npz
from trainkit import train_one

MAX_STDERR = 1024


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail instead of hanging: a reader blocked on a named pipe is interrupted by SIGALRM."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s (blocked on a named pipe?)")

    before = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, before)


def state(root: Path) -> dict[str, object]:
    """Every entry under ``root``: a regular file's bytes, else its kind (a FIFO is not read)."""
    out: dict[str, object] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = ("link", os.readlink(p))
        elif p.is_dir():
            out[rel] = "dir"
        elif p.is_file():
            out[rel] = p.read_bytes()
        else:
            out[rel] = "special"
    return out


def laughs(depth: int) -> str:
    """A YAML flow sequence whose last item expands to 9**depth strings (a "billion laughs")."""
    items = ['&a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    items += [f"&a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, depth)]
    return "[" + ", ".join(items) + "]"


def deep_json(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


def csv_table(path: Path, y: list | None = None, header: str = "txt_1,txt_2,y") -> Path:
    y = y if y is not None else [i % 3 for i in range(30)]
    rows = [f"{i * 0.5},{(i % 7) * 1.5 + y[i]},{y[i]}" for i in range(len(y))]
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def directory_dataset(root: Path, fifo: str | None = None, manifest: str | bytes | None = None) -> Path:
    d = root / "dir"
    d.mkdir()
    rng = np.random.default_rng(0)
    np.save(d / "x_b.npy", rng.normal(size=(30, 3)).astype(np.float32))
    np.save(d / "y.npy", np.arange(30) % 3)
    if fifo:
        os.mkfifo(d / fifo)
    else:
        np.save(d / "x_a.npy", rng.normal(size=(30, 2)).astype(np.float32))
    if isinstance(manifest, str):
        (d / directory_module.MANIFEST).write_text(manifest)
    elif manifest is not None:
        (d / directory_module.MANIFEST).write_bytes(manifest)
    return d


# ---------------------------------------------------------------------------------------------
# The cases: each builds its inputs in a directory and returns the command's arguments


@dataclass(frozen=True)
class Case:
    make: Callable[[Path], list]
    needles: list[str]


def fifo(root: Path, name: str) -> Path:
    os.mkfifo(root / name)
    return root / name


def train_args(data, *more) -> Callable[[Path], list]:
    return lambda root: ["train", "--data", data(root) if callable(data) else data, *TINY, *more]


def config_with(text: str) -> Callable[[Path], list]:
    def make(root: Path) -> list:
        (root / "options.yaml").write_text(text)
        return ["train", "--config", root / "options.yaml"]

    return make


def mapping_with(text: str | None) -> Callable[[Path], list]:
    def make(root: Path) -> list:
        table = csv_table(root / "t.csv")
        if text is None:
            mapping = fifo(root, "mapping.yaml")
        else:
            mapping = root / "mapping.yaml"
            mapping.write_text(text)
        return ["train", "--data", table, "--mapping", mapping, *TINY]

    return make


def convert_table(header: str, *more: str) -> Callable[[Path], list]:
    def make(root: Path) -> list:
        return ["convert", csv_table(root / "t.csv", header=header), root / "converted", *more]

    return make


def device_link(root: Path) -> Path:
    (root / "zero.npz").symlink_to("/dev/zero")
    return root / "zero.npz"


def make_dir(path: Path) -> Path:
    path.mkdir()
    return path


def write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def fifo_manifest(root: Path) -> Path:
    d = directory_dataset(root)
    os.mkfifo(d / directory_module.MANIFEST)
    return d


def binary_config(root: Path) -> list:
    (root / "options.yaml").write_bytes(b"epochs: \xff\xfe\n")
    return ["train", "--config", root / "options.yaml"]


CASES: dict[str, Case] = {
    # 1. not a regular file: refused before it is opened (a FIFO would block the reader forever)
    "fifo-array-in-a-directory-dataset": Case(
        train_args(lambda r: directory_dataset(r, fifo="x_a.npy")), ["named pipe", "x_a.npy", "regular file"]
    ),
    "fifo-as-data": Case(train_args(lambda r: fifo(r, "data.npz")), ["data file", "named pipe", "data.npz"]),
    "device-as-data": Case(train_args(device_link), ["data file", "character device", "zero.npz"]),
    "fifo-as-config": Case(
        lambda r: ["train", "--config", fifo(r, "options.yaml")], ["config", "named pipe", "options.yaml"]
    ),
    "directory-as-config": Case(
        lambda r: ["train", "--config", make_dir(r / "sub")], ["config", "expected a regular file, got a directory"]
    ),
    "fifo-as-mapping": Case(mapping_with(None), ["named pipe", "mapping.yaml"]),
    "fifo-as-manifest": Case(train_args(lambda r: fifo_manifest(r)), ["manifest", "named pipe", "attnfuse.json"]),
    # 2. metadata sized or nested to exhaust the reader
    "manifest-nested-100000-deep": Case(
        train_args(lambda r: directory_dataset(r, manifest=deep_json(100_000))), ["attnfuse.json", "nested too deeply"]
    ),
    "manifest-larger-than-1-MiB": Case(
        train_args(lambda r: directory_dataset(r, manifest=" " * (2 << 20) + "{}")),
        ["manifest", "larger than 1,048,576 bytes"],
    ),
    "manifest-not-utf8": Case(
        train_args(lambda r: directory_dataset(r, manifest=b"\xff\xfe{")), ["attnfuse.json", "expected JSON"]
    ),
    "config-larger-than-1-MiB": Case(config_with("#" * (2 << 20) + "\n"), ["config", "larger than 1,048,576"]),
    "config-not-utf8": Case(binary_config, ["not a text file", "byte 8"]),
    "config-nested-20000-deep": Case(config_with("[" * 20_000 + "]" * 20_000), ["nested too deeply"]),
    # 3. a "billion laughs": refused, with a short quote of the value
    "config-laughs-as-a-string-option": Case(config_with(f"data: {laughs(9)}\n"), ["data: expected a str, got"]),
    "config-laughs-as-an-int-option": Case(config_with(f"epochs: {laughs(9)}\n"), ["epochs: expected a int"]),
    "config-laughs-in-a-list-option": Case(
        config_with(f"modality: {laughs(9)}\n"), ["modality: expected a list of strings"]
    ),
    "config-laughs-as-an-option-name": Case(config_with(f"{laughs(9)}: 1\n"), ["is not valid YAML or JSON"]),
    "mapping-laughs": Case(mapping_with(f"target: {laughs(6)}\n"), ["mapping.yaml", "'target' must be a column"]),
    # 4. integer options far out of range, fp16 on the CPU
    "epochs-10^23": Case(
        train_args("mfeat", "--epochs", str(10**23)), ["^error: epochs: expected an integer <= 100,000"]
    ),
    "batch-size-10^9": Case(train_args("mfeat", "--batch-size", str(10**9)), ["batch_size: expected an integer <="]),
    "patience-10^30": Case(train_args("mfeat", "--patience", str(10**30)), ["patience: expected an integer <="]),
    "seed-negative": Case(train_args("mfeat", "--seed", "-1"), ["seed: expected an integer >= 0, got -1"]),
    "seed-2^64": Case(train_args("mfeat", "--seed", str(2**64)), ["seed: expected an integer <= 4,294,967,295"]),
    "ensemble-10^6": Case(train_args("mfeat", "--ensemble", str(10**6)), ["ensemble: expected an integer <= 100,"]),
    "threads-10^12": Case(train_args("mfeat", "--threads", str(10**12)), ["threads: expected an integer <= 4,096"]),
    "epochs-10^23-in-a-config": Case(config_with(f"epochs: {10**23}\n"), ["epochs: expected an integer <= 100,000"]),
    "fp16-on-the-cpu": Case(
        train_args("mfeat", "--precision", "fp16", "--device", "cpu"),
        ["precision: fp16 trains on a CUDA GPU only", "device cpu", "bf16"],
    ),
    # 6. modality names that are not file names: refused naming the option, not a temporary path
    "convert-modality-with-a-slash": Case(
        convert_table("txt_1,txt_2,y", "--modality", "a/b=txt_"),
        ["^error: modality: the modality name 'a/b' is not a valid file-name component", "'/'"],
    ),
    "convert-modality-dot-dot": Case(
        convert_table("txt_1,txt_2,y", "--modality", "..=txt_"), ["modality: the modality name '..'"]
    ),
    "convert-modality-with-a-newline": Case(
        convert_table("txt_1,txt_2,y", "--modality", "a\nb=txt_"), ["modality: the modality name 'a\\\\nb'"]
    ),
    "convert-modality-name-too-long": Case(
        convert_table("txt_1,txt_2,y", "--modality", "m" * 300 + "=txt_"), ["longer than 200 bytes"]
    ),
    "convert-mapping-modality-with-a-slash": Case(
        lambda r: [
            "convert",
            csv_table(r / "t.csv"),
            r / "converted",
            "--mapping",
            write_text(r / "m.yaml", "modalities: {a/b: txt_}\n"),
        ],
        ["^error: mapping: the modality name 'a/b'"],
    ),
    "convert-column-prefix-with-a-slash": Case(convert_table("a/b_1,a/b_2,y"), ["t.csv: the modality name 'a/b'"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_hostile_input_is_one_short_line_and_writes_nothing(tmp_path, monkeypatch, case):
    inputs = tmp_path / "in"
    inputs.mkdir()
    args = CASES[case].make(inputs)
    if args[0] == "train":
        args += ["--out", tmp_path / "run"]
    monkeypatch.chdir(tmp_path)  # a default output directory would appear here
    before = state(tmp_path)
    with deadline(120):
        result = cli(*args)
    err = assert_one_line(result, 2, *CASES[case].needles)
    assert len(result.stderr.encode()) < MAX_STDERR, f"{len(result.stderr.encode()):,} bytes on stderr"
    assert "Traceback" not in result.stdout
    assert state(tmp_path) == before, "something was written or changed"
    assert ".tmp/" not in err and not err.endswith(".tmp")  # no temporary path (write_directory's) in it


# ---------------------------------------------------------------------------------------------
# Right behaviour where refusing would be wrong


def test_a_class_smaller_than_k_gets_a_note_in_every_fold():
    """scikit-learn's StratifiedKFold warns and goes on; so does kfold, saying how many folds
    test without the class: the folds stay valid for the other classes."""
    y = np.array(["a"] * 20 + ["b"] * 20 + ["rare"] * 2)
    data = MultimodalDataset({"x": np.random.default_rng(0).normal(size=(42, 3))}, y)
    folds = kfold(data, 5, seed=0)
    lacking = sum(2 not in set(data.y[f["test"]].tolist()) for f in folds)  # "rare" is class 2
    assert lacking == 3  # two samples: in two test parts, absent from three
    for f in folds:
        assert "class 'rare' has 2 samples (3 of the 5 test parts lack it)" in f.note
        assert "--folds 2 would hold every class" in f.note and "\n" not in f.note
    even = kfold(MultimodalDataset({"x": np.zeros((40, 2))}, np.arange(40) % 2), 5, seed=0)
    assert all("fewer samples than folds" not in f.note for f in even)


def test_a_class_smaller_than_k_with_a_split_column_names_the_validation_parts():
    split = np.array(["train"] * 30 + ["test"] * 10)
    y = np.array([0] * 14 + [1] * 14 + [2] * 2 + [0, 1] * 5)
    folds = kfold(MultimodalDataset({"x": np.zeros((40, 2))}, y, split=split), 4, seed=0)
    assert all("class 2 has 2 samples (2 of the 4 validation parts lack it)" in f.note for f in folds)
    assert "--folds 2 would" in folds[0].note


def test_train_prints_the_fold_note(tmp_path):
    table = csv_table(tmp_path / "t.csv", y=[0] * 14 + [1] * 14 + [2] * 2)
    result = cli("train", "--data", table, *TINY, "--folds", "5", "--no-baselines", "--out", tmp_path / "run")
    assert result.exit_code == 0, result.stderr
    assert "class 2 has 2 samples (3 of the 5 test parts lack it)" in " ".join(result.stdout.split())


def test_fp16_is_refused_for_training_on_the_cpu_but_a_config_with_it_loads():
    cfg = TrainConfig(precision="fp16", device="cpu")  # e.g. the config.json of a GPU run, evaluated here
    with pytest.raises(ValueError, match="^precision: fp16 trains on a CUDA GPU only"):
        cfg.training_device()
    data = MultimodalDataset({"x": np.zeros((20, 2))}, np.arange(20) % 2)
    with pytest.raises(ValueError, match="fp16 trains on a CUDA GPU only"):
        train_one(data, "concat", train=cfg)
    assert TrainConfig(precision="bf16", device="cpu").training_device().type == "cpu"


# ---------------------------------------------------------------------------------------------
# Bounds declared once, on the field; values quoted short


def test_integer_bounds_are_declared_on_the_fields():
    bounds = {o.name: o.bounds for o in options_of(TrainConfig)}
    assert bounds["epochs"] == (1, 100_000) and bounds["seed"] == (0, 2**32 - 1) and bounds["lr"] is None
    for name, (lo, hi) in ((n, b) for n, b in bounds.items() if b is not None):
        TrainConfig(**{name: lo})
        TrainConfig(**{name: hi}) if name != "threads" else None
        with pytest.raises(ValueError, match=f"^{name}: expected an integer <= {hi:,}, got {hi + 1}$"):
            TrainConfig(**{name: hi + 1})
        with pytest.raises(ValueError, match=f"^{name}: expected an integer >= {lo}"):
            TrainConfig(**{name: lo - 1})


def test_check_bounds_on_any_dataclass():
    @dataclass
    class Toy:
        k: int | None = option(3, "k", bounds=(2, 9))

        def __post_init__(self):
            check_bounds(self)

    Toy(None), Toy(2), Toy(9)
    for bad, words in ((1, ">= 2, got 1"), (10, "<= 9, got 10")):
        with pytest.raises(ValueError, match=f"^k: expected an integer {words}"):
            Toy(bad)
    for bad, words in ((True, "bool True"), ("4", "str '4'")):
        with pytest.raises(TypeError, match=f"^k: expected an integer, got {words}"):
            Toy(bad)
    with pytest.raises(ValueError, match="bounds: expected"):
        option(1, "x", bounds=(5, 1))


def test_shorten_is_short_and_fast_on_huge_values():
    lol = ["lol"] * 9
    for _ in range(12):  # 9**13 strings if expanded: only a reference to the level below each time
        lol = [lol] * 9
    cyclic: list = []
    cyclic.append(cyclic)
    start = time.process_time()
    for value in (lol, cyclic, 10**4000, "x" * 10**7, {"k" * 10**6: lol}, b"\0" * 10**7):
        text = shorten(value)
        assert len(text) <= 60, text
    assert time.process_time() - start < 1.0  # not proportional to the value (a full repr takes minutes)
    assert shorten("fp16") == "'fp16'" and shorten([1, 2]) == "[1, 2]"


@pytest.mark.parametrize(
    "message, expected",
    [
        ("short", "short"),
        ("two\nlines\n\n and  spaces", "two lines and spaces"),
        ("[bold]x[/]", r"\[bold]x\[/]"),
    ],
)
def test_one_line_keeps_short_messages(message, expected):
    assert one_line(message) == expected


@pytest.mark.parametrize("size", [MAX_LINE + 1, 10**6, 10**7])
def test_one_line_caps_the_length(size):
    text = one_line("error " + "x" * size)
    assert len(text) == MAX_LINE and text.endswith("…") and text.startswith("error xxx")
    assert one_line(" " * 10**6 + "late") == "…"  # the start is kept, whatever follows is cut


# ---------------------------------------------------------------------------------------------
# The Python API: wrong types are TypeErrors naming the argument, the expected and the actual type


def spec() -> TrainSpec:
    return TrainSpec.from_options({"data": "mfeat", "fusion": "concat", "epochs": 1})


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda: attnfuse.train([]), ["spec: expected a TrainSpec, got list"]),
        (lambda: attnfuse.train({"data": "mfeat"}), ["spec: expected a TrainSpec", "from_options", "got dict"]),
        (lambda: train("mfeat"), ["spec: expected a TrainSpec, got str"]),
        (lambda: train(spec(), out=5), ["out: expected a str, an os.PathLike or None, got int"]),
        (lambda: train(spec(), progress="bar"), ["progress: expected a callable", "got str"]),
        (lambda: train(spec(), resume="yes"), ["resume: expected a bool, got str"]),
        (lambda: train(spec(), handle_signals=1), ["handle_signals: expected a bool, got int"]),
        (lambda: read_options(["a.yaml"]), ["path: expected a str or os.PathLike, got list"]),
    ],
)
def test_the_python_api_checks_argument_types(monkeypatch, call, words):
    monkeypatch.setattr("attnfuse.pipeline.load", lambda *a, **k: pytest.fail("loaded data"))
    with pytest.raises(TypeError) as err:
        call()
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_read_options_refuses_what_is_not_a_regular_file(tmp_path):
    os.mkfifo(tmp_path / "pipe.yaml")
    with deadline(60), pytest.raises(ValueError, match="config: expected a regular file, got a named pipe"):
        read_options(tmp_path / "pipe.yaml")
    with pytest.raises(FileNotFoundError, match="config not found"):
        read_options(tmp_path / "missing.yaml")
    write_npz(tmp_path / "d.npz")
    (tmp_path / "ok.yaml").write_text(f"data: {tmp_path / 'd.npz'}\nepochs: 3\n")
    assert read_options(tmp_path / "ok.yaml") == {"data": str(tmp_path / "d.npz"), "epochs": 3}
