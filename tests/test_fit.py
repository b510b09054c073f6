"""The loops of ``attnfuse train`` (attnfuse.fit) and the objects that own their parts: the loops'
state saved and restored as values, SplitPlan (the split), EnsembleSpec (the ensemble's size and
seeds), Parts (the standardisation, once per run)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from attnfuse.data import MultimodalDataset, Standardizer, kfold, make_split
from attnfuse.ensemble import Ensemble, EnsembleSpec
from attnfuse.fit import CandidateLoopState, MemberLoopState, RunLoopState
from attnfuse.pipeline import TrainSpec, split_parts, train
from attnfuse.splitplan import SplitPlan
from attnfuse.training import Parts, TrainConfig, TrainedModel
from trainkit import train_one


def toy(n: int = 60, seed: int = 0) -> MultimodalDataset:
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(n, 3)), rng.normal(size=(n, 4, 2))
    y = (a[:, 0] - b[:, :, 1].mean(axis=1) > 0).astype(np.int64)
    return MultimodalDataset({"a": a.astype(np.float32), "b": b.astype(np.float32)}, y)


def tiny_model(data: MultimodalDataset, seed: int = 0) -> TrainedModel:
    return train_one(data, "concat", {"d_model": 8}, TrainConfig(epochs=1, batch_size=16, seed=seed))


def assert_same_model(a: TrainedModel, b: TrainedModel) -> None:
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert (a.fusion, a.metrics, a.best_epoch, a.history, a.note) == (
        b.fusion,
        b.metrics,
        b.best_epoch,
        b.history,
        b.note,
    )
    assert a.standardizer.to_dict() == b.standardizer.to_dict()
    np.testing.assert_array_equal(a.valid_pred, b.valid_pred)


def through_json(meta: dict) -> dict:
    return json.loads(json.dumps(meta))


def test_a_trained_model_is_restored_from_its_dict():
    data = toy()
    model = tiny_model(data)
    tensors, record = model.to_dict()
    restored = TrainedModel.from_dict(tensors, through_json(record), model.split, "cpu")
    assert_same_model(model, restored)
    assert record["ensemble"] == 1


@pytest.mark.parametrize("level", [CandidateLoopState, MemberLoopState])
def test_an_inner_loop_state_is_restored_from_its_dict(level):
    data = toy()
    state = level(2, [tiny_model(data, 0), tiny_model(data, 1)])
    tensors, meta = state.to_dict()
    name = "candidate" if level is CandidateLoopState else "member"
    assert meta[name] == 2 and len(meta[f"{name}s"]) == 2
    assert f"{name}.1.valid_pred" in tensors and any(k.startswith(f"{name}.0.weights.") for k in tensors)
    restored = level.from_dict(tensors, through_json(meta), make_split(data, 0), torch.device("cpu"))
    assert restored.index == 2 and len(restored.finished) == 2
    for model, again in zip(state.to_dict()[1][f"{name}s"], restored.to_dict()[1][f"{name}s"]):
        assert model == again
    for key, value in tensors.items():
        assert torch.equal(value, restored.to_dict()[0][key])


def test_the_run_loop_state_keeps_the_first_model_without_its_predictions():
    data = toy()
    state = RunLoopState(index=1, finished=[{"seed": 0}], first=tiny_model(data), selection=None)
    tensors, meta = state.to_dict()
    assert meta["run_index"] == 1 and meta["finished"] == [{"seed": 0}] and "first" in meta
    assert all(k.startswith("first.weights.") for k in tensors)
    assert RunLoopState().to_dict() == ({}, {"run_index": 0, "finished": [], "selection": None})


@pytest.mark.parametrize("folds", [0, 3])
def test_a_split_plan_makes_the_rows_of_its_run_and_is_saved_and_loaded(folds):
    data = toy()
    plans = [SplitPlan.for_run(7, i, folds) for i in range(3)]
    for i, plan in enumerate(plans):
        expected = kfold(data, folds, 7)[i] if folds else make_split(data, 7 + i)
        split = plan.rows(data)
        assert split.how == expected.how
        for part in ("train", "valid", "test"):
            np.testing.assert_array_equal(split[part], expected[part])
        assert SplitPlan.from_dict(plan.to_dict(split.how)) == plan
    assert plans[0].to_dict("fold" if folds else "drawn") == (
        {"how": "fold", "seed": 7, "folds": 3, "fold": 0} if folds else {"how": "drawn", "seed": 7}
    )


def test_an_ensemble_spec_owns_the_size_and_the_members_seeds():
    spec = EnsembleSpec(3)
    assert spec.seed(5, 0) == 5 and len({spec.seed(5, k) for k in range(3)}) == 3
    assert EnsembleSpec.from_dict(spec.to_dict()) == spec and EnsembleSpec.from_dict({}) == EnsembleSpec(1)
    data = toy()
    members = [tiny_model(data, k).model for k in range(3)]
    combined = spec.combine(members)
    assert isinstance(combined, Ensemble) and EnsembleSpec.of(combined) == spec
    assert EnsembleSpec(1).combine(members[:1]) is members[0]
    with pytest.raises(ValueError, match="members: expected 3 models, got 2"):
        spec.combine(members[:2])
    with pytest.raises(ValueError, match="ensemble: expected an integer >= 1, got 0"):
        EnsembleSpec(0)


def test_parts_standardise_by_the_training_rows_once_per_run(monkeypatch):
    """Every model of a run (here 2 candidates x 2 members x 5 bags) is standardised by the run's
    one standardiser."""
    data = toy()
    split = make_split(data, 0)
    parts = Parts.of(data, split)
    expected = Standardizer.fit(data, split["train"])
    for name in ("a", "b"):
        np.testing.assert_array_equal(parts.standardizer.mean[name], expected.mean[name])
    batch = parts.sources["valid"].select(np.arange(3))
    torch.testing.assert_close(batch.x["a"], expected.transform(data).to_batch().x["a"][split["valid"][:3]])

    fitted = []
    real_fit = Standardizer.fit
    monkeypatch.setattr(Standardizer, "fit", classmethod(lambda cls, *a, **k: fitted.append(1) or real_fit(*a, **k)))
    options = {"fusion": "auto", "ensemble": 2, "d_model": 8, "epochs": 1, "repeat": 2, "baselines": False}
    result = train(TrainSpec.from_options(options), data=data)
    assert len(fitted) == 2  # one per run: its bags share it
    # auto on a few hundred rows bags its candidates: the statistics of the run's train + valid rows
    bagged = Standardizer.fit(data, np.concatenate([split["train"], split["valid"]]))
    assert result.first.standardizer.to_dict() == bagged.to_dict()


def test_split_parts_rebuild_the_training_split_from_the_saved_plan(tmp_path):
    data = toy()
    options = {"fusion": "concat", "d_model": 8, "epochs": 1, "folds": 3, "baselines": False}
    train(TrainSpec.from_options(options), out=tmp_path / "run", data=data)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["split"] == {"how": "fold", "seed": 0, "folds": 3, "fold": 0} and "split_seed" not in config
    parts = split_parts(data, config)
    for part in ("train", "valid", "test"):
        np.testing.assert_array_equal(parts[part], kfold(data, 3, 0)[0][part])


def test_resume_without_an_output_directory_is_one_error_naming_it():
    spec = TrainSpec.from_options({"fusion": "concat", "d_model": 8, "epochs": 1, "baselines": False})
    with pytest.raises(ValueError, match=r"^resume: expected the output directory of the run to continue \(out\)"):
        train(spec, resume=True)


@pytest.mark.parametrize(
    ("rows", "auto", "bags", "expected"),
    [(999, True, 5, 5), (1000, True, 5, 3), (9999, True, 5, 3), (9999, True, 2, 2), (10_000, True, 5, 0),
     (500, True, 0, 0), (500, False, 5, 0)],
)  # fmt: skip
def test_bags_for_follows_the_row_counts(rows, auto, bags, expected):
    """--bags (5) bags under 1,000 rows, at most 3 under 10,000, none from there on or without auto."""
    from types import SimpleNamespace

    from attnfuse.fit import BAG_ROWS, FEW_BAGS, FEW_BAGS_ROWS, bags_for

    assert (FEW_BAGS_ROWS, BAG_ROWS, FEW_BAGS) == (1000, 10_000, 3)
    assert bags_for(SimpleNamespace(n=rows), auto, bags) == expected
