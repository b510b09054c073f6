"""Consent to unpickling comes from the person running the command (``--allow-pickle`` or the
Python argument), never from a file: a ``run.yaml`` given to ``--config``, or planted in a run
directory and continued with ``--resume``, must not unpickle the file it names. Each case uses a
pickle whose payload writes a marker file: the marker must never appear."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import yaml

from attnfuse.pipeline import read_options
from clikit import TINY, assert_one_line, cli, ok, write_npz


class _Payload:
    """Unpickling this calls open(marker, "w"): the file appears if the pickle is ever loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def evil_pickle(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"train": _Payload(marker)}))
    return path, marker


def test_read_options_drops_allow_pickle(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"data": "x.pkl", "allow_pickle": True, "epochs": 3}))
    assert read_options(config) == {"data": "x.pkl", "epochs": 3}
    config.write_text(yaml.safe_dump({"allow-pickle": True}))  # the flag's spelling too
    assert read_options(config) == {}


def test_config_file_cannot_switch_on_unpickling(tmp_path):
    evil, marker = evil_pickle(tmp_path)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"data": str(evil), "allow_pickle": True, "fusion": "concat"}))
    result = cli("train", "--config", config, "--out", tmp_path / "out")
    assert_one_line(result, 2, "--allow-pickle")
    assert not marker.exists(), "the pickle named by a config file was unpickled"
    assert not (tmp_path / "out").exists()


def test_planted_run_yaml_cannot_switch_on_unpickling_on_resume(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "d.npz"

    write_npz(data)
    out = tmp_path / "run"
    ok(cli("train", "--data", data, *TINY, "--out", out))
    evil, marker = evil_pickle(tmp_path)
    last = out / "last"
    last.mkdir(exist_ok=True)
    saved = yaml.safe_load((out / "run.yaml").read_text())
    (last / "run.yaml").write_text(yaml.safe_dump({**saved, "data": str(evil), "allow_pickle": True}))
    result = cli("train", "--resume", out)
    assert result.exit_code == 2, result.stderr
    assert not marker.exists(), "a planted last/run.yaml unpickled its data file on --resume"


@pytest.mark.parametrize("how", ["flag", "config"])
def test_allow_pickle_on_the_command_line_still_reads_a_pickle(tmp_path, how):
    """The person's own flag still works, also beside a config file that names the pickle."""
    from test_cli import write_mult_pickle

    data = write_mult_pickle(tmp_path / "mosi.pkl")
    out = tmp_path / "out"
    if how == "flag":
        ok(cli("train", "--data", data, *TINY, "--allow-pickle", "--out", out))
    else:
        config = tmp_path / "run.yaml"
        config.write_text(yaml.safe_dump({"data": str(data), "fusion": "concat", "epochs": 1, "d_model": 8}))
        ok(cli("train", "--config", config, "--allow-pickle", "--out", out))
    # The run records that it read a pickle; reading the record back does not consent again.
    assert yaml.safe_load((out / "run.yaml").read_text())["allow_pickle"] is True
    assert_one_line(cli("train", "--config", out / "run.yaml", "--out", tmp_path / "again"), 2, "--allow-pickle")
