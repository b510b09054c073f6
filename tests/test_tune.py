"""attnfuse tune: a study of tiny trials runs, is stored in SQLite, continues from its database,
feeds the pruner every epoch, and trains the best configuration as `attnfuse train` would."""

from __future__ import annotations

import json

import optuna
import pytest
import yaml

from attnfuse.tune import TuneOptions, default_study_db, search_space, tune
from clikit import cli
from clikit import write_npz as write_data

TINY = ["--epochs", "3", "--batch-size", "32"]


def load_study(db):
    return optuna.load_study(study_name="attnfuse", storage=f"sqlite:///{db}")


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tune")
    data = write_data(tmp / "d.npz")
    out = tmp / "best"
    result = cli("tune", "--data", data, "--trials", "3", *TINY, "--d-model", "8", "--out", out)
    assert result.exit_code == 0, result.stdout + result.stderr
    return tmp, data, out, result


def test_a_study_of_three_trials_is_stored_and_the_best_is_trained(study_dir):
    tmp, _, out, result = study_dir
    db = default_study_db(out)
    assert db == tmp / "best.study.db" and db.is_file()
    study = load_study(db)
    assert len(study.trials) == 3 and study.direction == optuna.study.StudyDirection.MAXIMIZE
    assert "best trials of 3" in result.stdout and "trial 2:" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "log.csv",
        "metrics.json",
        "model.safetensors",
        "run.yaml",
    ]
    options = yaml.safe_load((out / "run.yaml").read_text())
    best = study.best_trial.user_attrs["options"]
    assert {k: options[k] for k in best} == best  # the best trial's settings are the model's
    assert options["d_model"] == 8 and options["epochs"] == 3  # given options were fixed in every trial
    assert all(t.user_attrs["options"]["d_model"] == 8 for t in study.trials)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["valid"]["accuracy"] == pytest.approx(study.best_value)


def test_every_epoch_reaches_the_pruner(study_dir):
    _tmp, _, out, _ = study_dir
    for trial in load_study(default_study_db(out)).trials:
        steps = sorted(trial.intermediate_values)
        assert steps and steps == list(range(1, len(steps) + 1)) and len(steps) <= 3


def test_run_yaml_of_the_tuned_model_reproduces_it(study_dir):
    tmp, _, out, _ = study_dir
    again = tmp / "again"
    result = cli("train", "--config", out / "run.yaml", "--out", again)
    assert result.exit_code == 0, result.stdout + result.stderr
    assert (again / "metrics.json").read_text() == (out / "metrics.json").read_text()


def test_the_same_study_db_continues_the_study(study_dir):
    _tmp, data, out, _ = study_dir
    db = default_study_db(out)
    first = [t.params for t in load_study(db).trials]
    result = cli("tune", "--data", data, "--trials", "2", *TINY, "--d-model", "8", "--out", out, "--study-db", db)
    assert result.exit_code == 0, result.stdout + result.stderr
    trials = load_study(db).trials
    assert len(trials) == 5 and [t.params for t in trials[:3]] == first
    assert trials[3].params not in first  # the continued sampler does not replay the first draws
    assert "best trials of 5" in result.stdout


def test_another_search_in_the_same_study_db_is_refused(study_dir, tmp_path):
    _tmp, _data, out, _ = study_dir
    other = write_data(tmp_path / "other.npz", seed=1)
    result = cli("tune", "--data", other, "--trials", "1", *TINY, "--out", tmp_path / "x", "--study-db",
                 default_study_db(out))  # fmt: skip
    assert result.exit_code == 2 and result.stderr.startswith("error: study-db:") and "holds a study" in result.stderr
    assert result.stderr.count("\n") == 1 and not (tmp_path / "x").exists()


def test_pruning_from_the_progress_callback_stops_a_trial(tmp_path):
    data = write_data(tmp_path / "d.npz")

    class AlwaysPrune(optuna.pruners.BasePruner):
        def prune(self, study, trial):
            return trial.number > 0  # keep the first trial, prune every later one at its first report

    db = tmp_path / "s.db"
    options = {"data": str(data), "epochs": 3, "d_model": 8}
    tune(options, TuneOptions(trials=3, study_db=str(db)), tmp_path / "m", pruner=AlwaysPrune())
    states = [t.state for t in load_study(db).trials]
    assert states == [optuna.trial.TrialState.COMPLETE] + [optuna.trial.TrialState.PRUNED] * 2
    assert all(len(t.intermediate_values) == 1 for t in load_study(db).trials[1:])


def test_search_space_draws_what_is_not_given():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    values = search_space(trial, ["concat", "self"], {"lr": 0.01, "nhead": 2})
    assert values["lr"] == 0.01 and "lr" not in trial.params
    assert {"fusion", "d_model", "dropout", "weight_decay"} <= set(trial.params)
    if values["fusion"] == "self":
        assert values["nhead"] == 2 and "self.pooling" in trial.params
    else:  # concat has no heads: the fixed setting is left out of its trial
        assert "nhead" not in values and "num_layers" not in values


@pytest.mark.parametrize(
    "args, message",
    [
        (["--trials", "0"], "trials: expected an integer >= 1"),
        (["--timeout", "-1"], "timeout: expected a finite number > 0, got -1"),
        (["--heads", "3"], "d_model: expected a multiple of nhead=3"),
    ],
)
def test_bad_tune_options_are_one_line_errors(tmp_path, args, message):
    data = write_data(tmp_path / "d.npz")
    result = cli("tune", "--data", data, *args, "--out", tmp_path / "x")
    assert result.exit_code == 2 and message in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "x").exists() and not default_study_db(tmp_path / "x").exists()
