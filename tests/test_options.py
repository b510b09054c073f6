"""Options declared once on dataclass fields: the generated command line, --config files,
run.yaml, and the library's train() that the command calls."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
import typer.main
import yaml
from rich.markup import escape

from attnfuse import __version__
from attnfuse.cli import app
from attnfuse.fusion import FUSIONS, config_from_dict
from attnfuse.options import options_of
from attnfuse.pipeline import RunOptions, TrainSpec, read_options, train, train_options
from attnfuse.training import TrainConfig, param_groups
from clikit import cli
from clikit import write_npz as write_data

TINY = {"epochs": 2, "d_model": 8, "batch_size": 32}


def train_command():
    return typer.main.get_command(app).commands["train"]


# ---------------------------------------------------------------------------------------------
# One source of truth


def test_every_dataclass_option_is_a_flag_and_nothing_else_is():
    params = {p.name for p in train_command().params} - {"config", "out", "resume", "help"}
    declared = {f.name for cls in (RunOptions, TrainConfig) for f in dataclasses.fields(cls) if "help" in f.metadata}
    assert {"allow_pickle", "modality", "target", "split_col", "mapping"} <= declared  # ReadOptions, inherited
    for model_class in FUSIONS.values():
        declared |= {o.name for o in options_of(model_class.config_class)}
    assert params == declared
    # The flags of attnfuse 0.1.0 are all still there (now generated).
    flags = {opt for p in train_command().params for opt in p.opts}
    old = "data fusion task epochs batch-size lr weight-decay patience d-model layers heads dropout pooling query"
    old += " modality-dropout label-smoothing loss metrics seed repeat device allow-pickle out"
    assert {f"--{name}" for name in old.split()} <= flags


def test_help_texts_and_defaults_come_from_the_dataclasses():
    by_name = {p.name: p for p in train_command().params}
    for opt in train_options():
        param = by_name[opt.name]
        assert escape(opt.help) in param.help  # escaped: help is rich markup
        assert param.default == opt.default, opt.name
    assert by_name["nhead"].opts == ["--nhead", "--heads"]
    assert by_name["allow_pickle"].is_flag and by_name["norm_first"].secondary_opts == ["--no-norm-first"]


def test_options_the_chosen_fusion_lacks_are_named_from_its_config():
    with pytest.raises(ValueError, match="^nhead: the 'concat' fusion has no such setting"):
        TrainSpec.from_options({"fusion": "concat", "heads": 2})
    with pytest.raises(ValueError, match="^self_layers: the 'cross' fusion has no such setting"):
        TrainSpec.from_options({"fusion": "cross", "self_layers": 2})
    spec = TrainSpec.from_options({"fusion": "mult", "self-layers": 2, "lr": 1, "d_model": 10, "nhead": 5})
    assert spec.model == {"self_layers": 2, "d_model": 10, "nhead": 5} and spec.train.lr == 1.0


@pytest.mark.parametrize(
    "values, message",
    [
        ({"fusion": "crosss"}, "^fusion: expected one of auto, concat, self"),
        ({"heads": 3}, "^d_model: expected a multiple of nhead=3"),
        ({"epochs": 0}, "^epochs: expected an integer >= 1"),
        ({"lr": "fast"}, "^options: lr: expected a float, got 'fast'"),
        ({"layer": 2}, "^options: unknown option 'layer'"),
        ({"device": "tpu"}, "^device: expected 'auto', 'cpu', 'cuda' or 'cuda:N'"),
        ({"pooling": "max"}, "^pooling: expected one of"),
        ({"repeat": True}, "^options: repeat: expected a int, got True"),
        ({"folds": 1}, "^folds: expected 0 .no cross-validation. or an integer >= 2, got 1"),
        ({"folds": 5, "repeat": 2}, "^folds: with --folds 5 the folds are the runs; --repeat must be 1"),
        ({"checkpoint_every": -1}, "^checkpoint_every: expected an integer >= 0"),
    ],
)
def test_every_value_is_checked_before_any_data_is_read(values, message):
    with pytest.raises(ValueError, match=message):
        TrainSpec.from_options({"data": "no/such/file.npz", **values})


def test_the_command_line_checks_options_before_reading_data(tmp_path):
    result = cli("train", "--data", tmp_path / "missing.npz", "--fusion", "concat", "--heads", "2")
    assert result.exit_code == 2 and "nhead: the 'concat' fusion has no such setting" in result.stderr
    result = cli("train", "--epochs", "many")  # a parsing error is one line too
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "--epochs" in result.stderr


def test_version_and_flags_without_values():
    result = cli("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"attnfuse {__version__}"
    result = cli("train", "--allow-pickle", "true")  # a flag takes no value
    assert result.exit_code == 2 and "true" in result.stderr


# ---------------------------------------------------------------------------------------------
# --config files and run.yaml


def test_run_yaml_reproduces_the_run(tmp_path):
    data = write_data(tmp_path / "d.npz")
    first = tmp_path / "first"
    args = ["--data", data, "--fusion", "cross", "--heads", "2", "--layers", "1", "--seed", "3", "--query", "b"]
    assert cli("train", *args, "--epochs", "2", "--d-model", "8", "--out", first).exit_code == 0
    options = yaml.safe_load((first / "run.yaml").read_text())
    assert options["fusion"] == "cross" and options["query"] == "b" and options["nhead"] == 2 and options["seed"] == 3
    assert options["data"] == str(data.resolve()) and "out" not in options

    again = tmp_path / "again"
    assert cli("train", "--config", first / "run.yaml", "--out", again).exit_code == 0
    assert (again / "metrics.json").read_text() == (first / "metrics.json").read_text()
    assert (again / "model.safetensors").read_bytes() == (first / "model.safetensors").read_bytes()
    assert yaml.safe_load((again / "run.yaml").read_text()) == options


def test_flags_given_win_over_the_config_file(tmp_path):
    data = write_data(tmp_path / "d.npz")
    config = tmp_path / "opts.json"  # JSON is YAML
    config.write_text(json.dumps({"data": str(data), "fusion": "concat", "d-model": 8, "epochs": 3, "seed": 1}))
    out = tmp_path / "m"
    assert cli("train", "--config", config, "--epochs", "1", "--out", out).exit_code == 0
    saved = yaml.safe_load((out / "run.yaml").read_text())
    assert (saved["epochs"], saved["seed"], saved["d_model"], saved["fusion"]) == (1, 1, 8, "concat")


@pytest.mark.parametrize(
    "text, message",
    [
        ("fusion: [self", "not valid YAML or JSON"),
        ("- 1\n- 2\n", "expected a mapping of option names"),
        ("model: {d_model: 8}\n", "option 'model' has a nested mapping"),
        ("layerz: 2\n", "unknown option 'layerz'"),
        ("epochs: ten\n", "epochs: expected a int, got 'ten'"),
    ],
)
def test_bad_config_files_are_one_line_errors(tmp_path, text, message):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    result = cli("train", "--config", config, "--out", tmp_path / "never")
    assert result.exit_code == 2 and message in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "never").exists()


def test_read_options_of_an_empty_file_is_empty(tmp_path):
    (tmp_path / "empty.yaml").write_text("")
    assert read_options(tmp_path / "empty.yaml") == {}


# ---------------------------------------------------------------------------------------------
# The library function behind the command


def test_train_in_python_shows_nothing_and_reports_progress(tmp_path, capsys):
    data = write_data(tmp_path / "d.npz")
    events = []
    spec = TrainSpec.from_options({"data": str(data), "fusion": "concat", "repeat": 2, **TINY})
    result = train(spec, progress=lambda event, info: events.append((event, info)))
    assert capsys.readouterr() == ("", "")
    kinds = [e for e, _ in events]
    assert kinds == ["data"] + ["model_start", "epoch", "epoch", "model_end"] * 2
    assert [info["seed"] for e, info in events if e == "model_start"] == [0, 1]
    assert (
        set(result.report) == {"runs", "summary", "baselines", "calibration"}
        and result.out is None
        and not list(tmp_path.glob("*/"))
    )


def test_device_auto_picks_cuda_only_when_there_is_one():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert TrainConfig().torch_device().type == expected


def test_weight_decay_only_on_weight_matrices():
    model = FUSIONS["self"](config_from_dict("self", {"modalities": [{"name": "a", "dim": 3, "length": 1,
                                                                      "is_sequence": False}], "d_model": 8,
                                                      "nhead": 2, "pooling": "cls"}))  # fmt: skip
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert "encoder.layers.0.self_attn.in_proj_weight" in decayed and "head.net.1.weight" in decayed
    assert {"embed.type_embedding", "cls", "encoder.layers.0.norm1.weight", "head.net.1.bias"} <= kept
    assert decayed.isdisjoint(kept) and decayed | kept == set(names.values())
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_python_m_attnfuse_runs_the_command_line():
    out = subprocess.run([sys.executable, "-m", "attnfuse", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"attnfuse {__version__}"


@pytest.mark.parametrize("command", [[], ["train"], ["tune"], ["evaluate"], ["predict"], ["explain"], ["convert"]])
def test_flags_show_no_value_placeholder_in_help(command):
    result = cli(*command, "--help")
    assert result.exit_code == 0, result.output
    assert "<bool>" not in result.output and "--help" in result.output


# ---------------------------------------------------------------------------------------------
# A config file's values


def _opt(kind: type, optional: bool = False):
    from attnfuse.options import Option

    return Option("x", kind, None, "help", (), (), optional, object)


@pytest.mark.parametrize(
    "kind, value, expected",
    [
        (bool, True, True),
        (float, 2, 2.0),
        (float, 0.5, 0.5),
        (int, 3, 3),
        (str, "a", "a"),
        (str, 7, "7"),
        (str, 1.5, "1.5"),
        (list, "a", ["a"]),
        (list, ["a", "b"], ["a", "b"]),
        (list, [], []),
        (dict, {"any": [1]}, {"any": [1]}),  # a type without a rule passes as it is
    ],
)
def test_a_config_value_of_the_options_type_is_converted_to_it(kind, value, expected):
    from attnfuse.options import coerce

    got = coerce(_opt(kind), value, "f.yaml")
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize(
    "kind, value, message",
    [
        (bool, 1, "f.yaml: x: expected a bool, got 1"),
        (bool, "yes", "f.yaml: x: expected a bool, got 'yes'"),
        (float, True, "f.yaml: x: expected a float, got True"),
        (float, "1.5", "f.yaml: x: expected a float, got '1.5'"),
        (int, False, "f.yaml: x: expected a int, got False"),
        (int, 1.0, "f.yaml: x: expected a int, got 1.0"),
        (str, True, "f.yaml: x: expected a str, got True"),
        (str, ["a"], "f.yaml: x: expected a str, got ['a']"),
        (list, {"a": 1}, "f.yaml: x: expected a list, got {'a': 1}"),
        (list, 3, "f.yaml: x: expected a list, got 3"),
        (list, ["a", 2], "f.yaml: x: expected a list of strings, got an item 2"),
        (int, None, "f.yaml: x: expected a int, got null"),
    ],
)
def test_a_config_value_of_another_type_is_a_one_line_error(kind, value, message):
    from attnfuse.options import coerce

    with pytest.raises(ValueError) as e:
        coerce(_opt(kind), value, "f.yaml")
    assert str(e.value) == message


def test_null_is_a_value_only_of_an_optional_option():
    from attnfuse.options import coerce

    assert coerce(_opt(int, optional=True), None, "f.yaml") is None
