"""--fusion auto: the portfolio that fits the data, user settings applied where they exist, the
pick by the validation metric, and the record of the choice in config.json and metrics.json."""

from __future__ import annotations

import json

import numpy as np
import pytest
import typer.main
from typer.testing import CliRunner

from attnfuse.cli import app
from attnfuse.data import MultimodalDataset, make_planted, save_npz
from attnfuse.metrics import paired_standard_error, standard_error
from attnfuse.pipeline import PORTFOLIO, TrainSpec, candidates_for, train
from attnfuse.portfolio import MODALITY_DROPOUT, choose, public

# Small enough to run in seconds, large enough that attention clearly solves the planted lookup.
PLANTED = {"n": 400, "seq_len": 4, "num_keys": 8, "key_dim": 8, "value_dim": 4, "noise": 0.05}
FAST = {"d_model": 16, "nhead": 2, "num_layers": 1, "epochs": 20, "patience": 20, "batch_size": 32, "lr": 3e-3}


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def vectors(n=40) -> MultimodalDataset:
    rng = np.random.default_rng(0)
    return MultimodalDataset({"a": rng.normal(size=(n, 3)), "b": rng.normal(size=(n, 2))}, np.arange(n) % 2)


def sequences(n=40) -> MultimodalDataset:
    rng = np.random.default_rng(0)
    return MultimodalDataset({"a": rng.normal(size=(n, 3)), "b": rng.normal(size=(n, 5, 2))}, np.arange(n) % 2)


# ---------------------------------------------------------------------------------------------
# The portfolio


def test_auto_is_the_default_fusion():
    command = typer.main.get_command(app).commands["train"]
    assert {p.name: p.default for p in command.params}["fusion"] == "auto"
    assert TrainSpec.from_options({}).run.fusion == "auto"


def test_candidates_depend_on_the_data():
    names = [c.name for c in candidates_for(vectors(), "auto", {})[0]]
    assert names == ["concat", "self", "self-modality"]
    cands, left_out = candidates_for(sequences(), "auto", {})
    assert [c.name for c in cands] == [c.name for c in PORTFOLIO]
    assert left_out == {}
    assert "cross" in candidates_for(vectors(), "auto", {})[1]
    # A named fusion is itself, with the settings given.
    (only,), _ = candidates_for(vectors(), "cross", {"d_model": 8})
    assert (only.fusion, only.settings) == ("cross", {"d_model": 8})


def test_user_settings_reach_the_candidates_that_have_them():
    cands, left_out = candidates_for(sequences(), "auto", {"d_model": 8, "nhead": 2, "pooling": "attention"})
    by_name = {c.name: c for c in cands}
    md = {"modality_dropout": MODALITY_DROPOUT}  # every candidate's own
    assert by_name["concat"].settings == {**md, "d_model": 8}  # concat has no heads or pooling
    assert by_name["self"].settings == {"pooling": "attention", **md, "d_model": 8, "nhead": 2}
    assert by_name["cross"].settings["pooling"] == "attention"
    assert "self-modality" in left_out and "same model" in left_out["self-modality"]  # both self now identical
    # A value only some candidates take leaves the others out (cross has no [CLS] pooling).
    cands, left_out = candidates_for(sequences(), "auto", {"pooling": "cls"})
    assert "cross" not in [c.name for c in cands] and "pooling" in left_out["cross"]


def test_every_candidate_trains_with_modality_dropout_unless_the_user_sets_it():
    # The portfolio's regulariser (portfolio.MODALITY_DROPOUT, measured in RESULTS.md); a named
    # fusion keeps the model's own default (no dropout), and the user's value wins in auto.
    cands, _ = candidates_for(sequences(), "auto", {})
    assert {c.name: c.settings["modality_dropout"] for c in cands} == {c.name: 0.1 for c in PORTFOLIO}
    (only,), _ = candidates_for(sequences(), "self", {})
    assert "modality_dropout" not in only.settings
    cands, _ = candidates_for(sequences(), "auto", {"modality_dropout": 0.0})
    assert all(c.settings["modality_dropout"] == 0.0 for c in cands)


@pytest.mark.parametrize(
    "given, message",
    [
        ({"self_layers": 2}, "^self_layers: --fusion auto cannot use it: no candidate has this setting"),
        (
            {"query": "b"},
            "^query: --fusion auto cannot use it: the candidates that have it \\(cross: the data has no seq",
        ),
        ({"nhead": 3}, "^d_model: expected a multiple of nhead=3"),  # the candidates' own error
    ],
)
def test_a_setting_no_candidate_can_use_is_an_error(given, message):
    with pytest.raises(ValueError, match=message):
        candidates_for(vectors(), "auto", given)  # no sequences: no cross candidate for `query`


def test_the_command_line_rejects_such_a_setting_before_reading_data(tmp_path):
    result = cli("train", "--data", tmp_path / "missing.npz", "--self-layers", "2", "--out", tmp_path / "x")
    assert result.exit_code == 2 and "self_layers: --fusion auto cannot use it" in result.stderr
    assert result.stderr.count("\n") == 1 and not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------
# The choice: the simplest candidate within one standard error of the best


def score(valid, se=0.01, loss=1.0, fusion="self"):
    return {"fusion": fusion, "settings": {}, "valid": valid, "valid_se": se, "valid_loss": loss}


def test_the_simplest_candidate_within_one_standard_error_of_the_best_is_picked():
    acc = ("accuracy", "max")
    close = {"concat": score(0.980, fusion="concat"), "self": score(0.990), "cross": score(0.995, fusion="cross")}
    chosen = choose(close, acc, {})  # the bar: 0.995 - 0.01; concat is below it, self above
    assert (chosen["best"], chosen["picked"], chosen["fusion"]) == ("cross", "self", "self")
    assert chosen["threshold"] == pytest.approx(0.985)
    assert "within one standard error (0.0100)" in chosen["reason"] and "cross 0.9950" in chosen["reason"]
    far = {"concat": score(0.90, fusion="concat"), "self": score(0.99)}
    assert choose(far, acc, {})["picked"] == "self" and "the best validation accuracy" in choose(far, acc, {})["reason"]
    # Lower is better for errors; equal scores go to the lower validation loss, then the earlier.
    rmse = ("rmse", "min")
    tie = {"concat": score(1.0, se=0.0, loss=2.0, fusion="concat"), "self": score(1.0, se=0.0, loss=1.0)}
    assert choose(tie, rmse, {})["best"] == "self" and choose(tie, rmse, {})["picked"] == "concat"
    assert choose({"a": score(2.0, se=0.1), "b": score(1.5, se=0.1)}, rmse, {})["picked"] == "b"


def test_the_bar_is_the_standard_error_of_the_difference_on_the_same_rows():
    """Two candidates one sample apart: where the simpler one errs on other rows than the best, the
    difference is noise (its SE is large) and it is picked; where it errs on the same rows plus one,
    the SE of the difference is small and the best is kept."""
    n = 200
    y = np.zeros(n, dtype=np.int64)
    best = y.copy()
    best[:2] = 1  # 2 errors: 99.0%
    disjoint = y.copy()
    disjoint[10:13] = 1  # 3 other errors: 98.5%
    nested = best.copy()
    nested[2] = 1  # the best's 2 errors and one more: 98.5%
    acc = ("accuracy", "max")

    def scores(simple):
        return {
            "concat": {**score(0.985, se=standard_error("accuracy", y, simple), fusion="concat"), "valid_pred": simple},
            "self": {**score(0.990, se=standard_error("accuracy", y, best)), "valid_pred": best},
        }

    apart = choose(scores(disjoint), acc, {}, y)
    assert apart["picked"] == "concat"
    assert apart["candidates"]["concat"]["se_vs_best"] == pytest.approx(
        paired_standard_error("accuracy", y, best, disjoint)
    )
    assert apart["candidates"]["concat"]["se_vs_best"] > standard_error("accuracy", y, best)  # 0.0112 > 0.0070
    assert choose(scores(nested), acc, {}, y)["picked"] == "self"  # SE of the difference: 0.0050
    d = (best == y).astype(float) - (disjoint == y).astype(float)
    assert paired_standard_error("accuracy", y, best, disjoint) == pytest.approx(d.std() / np.sqrt(n))
    assert "valid_pred" not in public(apart)["candidates"]["concat"]


def test_standard_error_of_each_selection_metric():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 400)
    pred = np.where(rng.random(400) < 0.8, y, (y + 1) % 3)
    p = np.mean(pred == y)
    assert standard_error("accuracy", y, pred) == pytest.approx(np.sqrt(p * (1 - p) / 400))  # binomial SE
    t, e = rng.normal(size=(400, 2)), rng.normal(size=(400, 2))
    assert standard_error("mae", t, t + e) == pytest.approx(np.abs(e).mean(axis=1).std() / 20)
    sq = (e**2).mean(axis=1)
    assert standard_error("rmse", t, t + e) == pytest.approx(sq.std() / 20 / (2 * np.sqrt(sq.mean())))
    assert standard_error("rmse", t, t) == 0.0
    with pytest.raises(ValueError, match="metric: expected 'accuracy', 'mae' or 'rmse', got 'r2'"):
        standard_error("r2", t, t)


# ---------------------------------------------------------------------------------------------
# Picking the attention model on the planted lookup


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("auto")
    path = tmp / "planted.npz"
    save_npz(make_planted(**PLANTED, seed=0), path)
    out = tmp / "model"
    spec = TrainSpec.from_options({"data": str(path), **FAST, "bags": 3})  # 3 bags: the test's time
    events = []
    result = train(spec, out, progress=lambda event, info: events.append((event, info)))
    return result, out, events


def test_auto_picks_an_attention_model_on_the_planted_lookup(planted_run):
    result, _out, _ = planted_run
    selection = result.selection
    assert set(selection["candidates"]) == {c.name for c in PORTFOLIO}
    assert selection["picked"] != "concat" and result.first.fusion in ("self", "cross")
    scores = {n: c["valid"] for n, c in selection["candidates"].items()}
    assert selection["metric"] == "rmse" and scores[selection["best"]] == min(scores.values())
    assert scores[selection["picked"]] <= selection["threshold"] < scores["concat"]  # attention clearly better
    # The saved model, the weighted ensemble, is no worse on the rows it was weighed on than the best.
    weighted = result.report["weighted"]
    assert weighted["fitted_on"] == "out-of-fold" and weighted["bags"] == 3  # 400 rows: bagged
    assert result.report["valid"]["rmse"] <= min(scores.values()) * (1 + 1e-6)
    assert weighted["weights"]["concat"] < 0.5 and weighted["primary"] in ("self", "self-modality", "cross")
    assert result.report["test"]["r2"] > 0.5 and result.report["candidates"]["concat"]["valid"]["r2"] < 0.5


def test_the_choice_is_recorded_in_config_and_metrics(planted_run):
    result, out, _ = planted_run
    config = json.loads((out / "config.json").read_text())
    picked = config["auto"]["picked"]
    primary = config["weighted"]["primary"]  # the saved model's fusion: the candidate of largest weight
    assert config["fusion"] == config["auto"]["candidates"][primary]["fusion"] == result.first.fusion
    settings = config["auto"]["candidates"][primary]["settings"]
    assert {k: config["model"][k] for k in settings} == settings
    assert picked in config["auto"]["reason"] and "out-of-fold rmse" in config["auto"]["reason"]  # 400 rows: bagged
    for _name, cand in config["auto"]["candidates"].items():
        assert cand["settings"]["d_model"] == 16  # the user's setting reached every candidate
        assert {"fusion", "settings", "valid", "valid_se", "valid_loss"} <= set(cand) and cand["valid_se"] > 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["candidates"]) == set(config["auto"]["candidates"])
    assert metrics["candidates"][picked]["valid"]["rmse"] == pytest.approx(
        config["auto"]["candidates"][picked]["valid"]
    )
    # The run's model is the weighted ensemble: config.json describes it, its primary fusion first.
    assert metrics["weighted"]["primary"] == primary


def test_progress_names_each_candidate_and_the_selection(planted_run):
    _, _, events = planted_run
    started = [info["candidate"] for event, info in events if event == "model_start"]
    assert started == [c.name for c in PORTFOLIO for _bag in range(3)]  # 400 rows: 3 bags each
    (selected,) = [info for event, info in events if event == "selected"]
    assert selected["selection"]["picked"] in started
