"""Greedy ensemble selection with replacement (attnfuse.stacking): by hand, on planted mixtures,
and the guarantee that the ensemble is never worse than its best member on the rows it was
fitted on."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attnfuse.metrics import compute_metrics
from attnfuse.stacking import METRICS, blend, log_loss, select_ensemble


def test_two_opposite_biases_average_to_the_truth_by_hand():
    """y = (1, -1, 1, -1); a = y + 1, b = y - 1, c = 0: each alone has RMSE 1, so the first (a)
    starts; adding b gives (a + b) / 2 = y, RMSE 0, which no later step beats strictly: the best
    prefix is {a, b}, weights 1/2 and 1/2."""
    y = np.array([1.0, -1.0, 1.0, -1.0])
    sel = select_ensemble({"a": y + 1, "b": y - 1, "c": np.zeros(4)}, y, "regression")
    assert sel.best_member == "a" and sel.member_scores == {"a": 1.0, "b": 1.0, "c": 1.0}
    assert sel.counts.tolist() == [1, 1, 0]
    np.testing.assert_array_equal(sel.weights, [0.5, 0.5, 0.0])
    assert sel.score == 0.0 and sel.trajectory[:2] == [1.0, 0.0]
    assert len(sel.trajectory) == 25  # the hill-climb went on; the best prefix was kept


def test_a_planted_mixture_gets_its_weights():
    """y = 0.75 f + 0.25 g exactly: the hill-climb reaches counts (3, 1) at step 4 (RMSE 0 up to
    rounding) and a useless model gets no weight."""
    rng = np.random.default_rng(0)
    f, g, noise = rng.standard_normal((3, 500))
    y = 0.75 * f + 0.25 * g
    sel = select_ensemble({"f": f, "g": g, "noise": noise}, y, "regression")
    np.testing.assert_allclose(sel.weights, [0.75, 0.25, 0.0], rtol=1e-12)
    assert sel.score < 1e-12 and sel.used() == ["f", "g"]


def test_ties_go_to_the_first_model_and_the_smaller_ensemble():
    """A copy of the best model listed later never gets weight: adding either scores the same, the
    first wins; and as no step improves, the ensemble stays the best member alone."""
    rng = np.random.default_rng(1)
    y = rng.standard_normal(200)
    good = y + 0.1 * rng.standard_normal(200)
    sel = select_ensemble([y + 1.0, good, good.copy()], y, "regression", names=["bad", "fusion", "copy"])
    assert sel.counts.tolist() == [0, 1, 0]
    assert sel.best_member == "fusion"


def _random_case(seed: int, task: str, models: int, n: int, classes: int):
    rng = np.random.default_rng(seed)
    if task == "regression":
        y = rng.standard_normal(n)
        preds = [y * rng.uniform(0, 1.5) + rng.standard_normal(n) * rng.uniform(0.1, 2) for _ in range(models)]
        return preds, y
    y = rng.integers(0, classes, n)
    preds = []
    for _ in range(models):
        logits = rng.standard_normal((n, classes)) * rng.uniform(0.1, 3) + np.eye(classes)[y] * rng.uniform(0, 3)
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        preds.append((p / p.sum(axis=1, keepdims=True)).astype(np.float32))  # float32 like a softmax's
    return preds, y


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 10**6),
    metric=st.sampled_from(sorted(METRICS)),
    models=st.integers(1, 6),
    n=st.integers(2, 80),
    classes=st.integers(2, 4),
    steps=st.integers(1, 30),
)
def test_the_ensemble_is_never_worse_than_its_best_member(seed, metric, models, n, classes, steps):
    """On the rows it was fitted on, in the metric it was fitted with, as :meth:`Selection.predict`
    computes the blend: at least as good as the best single model, whatever the predictions."""
    task = METRICS[metric][0]
    preds, y = _random_case(seed, task, models, n, classes)
    sel = select_ensemble(preds, y, task, metric=metric, steps=steps)
    pred = sel.predict(preds)
    got = log_loss(y, pred) if metric == "log_loss" else compute_metrics(task, y, pred)[metric]
    assert got == sel.score
    best = sel.member_scores[sel.best_member]
    assert (got >= best) if sel.higher_is_better else (got <= best)
    assert sel.counts.sum() <= steps and sel.counts.min() >= 0
    assert sel.weights.sum() == pytest.approx(1.0, rel=1e-12)
    assert set(sel.member_scores) == set(sel.names)


def test_classification_blends_probabilities():
    """Three classifiers, equally confident, each wrong on a different third of the rows: the
    average of all three is right everywhere (two of three vote for the truth); a pair ties
    between the truth and the wrong class on a third of the rows (the first class wins a tie), so
    the hill-climb needs all three, and their average beats every member's accuracy."""
    y = np.random.default_rng(0).integers(0, 3, 30)
    eye = np.eye(3)
    wrong = (y + 1) % 3
    members = []
    for k in range(3):
        labels = np.where(np.arange(30) % 3 == k, wrong, y)
        members.append(0.9 * eye[labels] + 0.1 / 3)
    sel = select_ensemble(members, y, "classification")
    assert max(sel.member_scores.values()) == pytest.approx(2 / 3)
    assert sel.score == 1.0 and sel.counts.tolist() == [1, 1, 1]
    np.testing.assert_allclose(sel.predict(members).sum(axis=1), 1.0, rtol=1e-12)


def test_log_loss_agrees_with_scikit_learn():
    from sklearn.metrics import log_loss as sk_log_loss

    preds, y = _random_case(3, "classification", 1, 300, 4)
    assert log_loss(y, preds[0]) == pytest.approx(sk_log_loss(y, preds[0], labels=range(4)), rel=1e-6)


def test_predict_takes_the_members_by_name_and_the_record_is_json():
    y = np.array([1.0, -1.0, 1.0, -1.0])
    sel = select_ensemble({"fusion": y + 1, "ridge": y - 1, "hist_gb": np.zeros(4)}, y, "regression")
    np.testing.assert_array_equal(sel.predict({"fusion": y + 1, "ridge": y - 1}), y)  # hist_gb has weight 0
    with pytest.raises(ValueError, match=r"predictions: expected the ensemble's members \['fusion', 'ridge'\]"):
        sel.predict({"fusion": y})
    record = json.loads(json.dumps(sel.to_dict()))
    assert record["weights"] == {"fusion": 0.5, "ridge": 0.5, "hist_gb": 0.0}
    assert record["counts"] == {"fusion": 1, "ridge": 1, "hist_gb": 0}
    assert sel.describe() == "ensemble (rmse 0.0000): fusion 0.50, ridge 0.50"


def test_blend_is_the_weighted_mean():
    p = np.array([[1.0, 2.0], [3.0, 6.0], [0.0, 0.0]])
    np.testing.assert_allclose(blend(p, [3, 1, 0]), [1.5, 3.0], rtol=1e-12)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"task": "ranking"}, "task: expected 'classification' or 'regression', got 'ranking'"),
        ({"metric": "accuracy"}, r"metric: expected one of \['rmse', 'mae', 'r2'\] for regression, got 'accuracy'"),
        ({"steps": 0}, "steps: expected an integer >= 1, got 0"),
        ({"predictions": []}, "predictions: expected at least one model's predictions, got none"),
        ({"predictions": [np.zeros(4), np.zeros(3)]}, "predictions: expected one shape for every model"),
        (
            {"predictions": [np.array([0.0, np.nan, 0, 0])]},
            r"predictions: non-finite values \(NaN/inf\) in \['model0'\]",
        ),
        ({"y": np.zeros(3)}, "y: expected 4 rows"),
        ({"predictions": [np.zeros(4)], "names": ["a", "b"]}, "names: expected 1 distinct names"),
    ],
)
def test_bad_arguments_are_one_line_errors(kwargs, match):
    args = {"predictions": [np.zeros(4)], "y": np.zeros(4), "task": "regression"} | kwargs
    with pytest.raises(ValueError, match=match):
        select_ensemble(**args)


def test_classification_inputs_must_be_probabilities():
    y = np.array([0, 1])
    with pytest.raises(ValueError, match=r"predictions: expected class probabilities .* in \['logits'\]"):
        select_ensemble({"logits": np.array([[2.0, -1.0], [0.0, 1.0]])}, y, "classification")
    with pytest.raises(ValueError, match=r"y: expected \(2,\) labels in 0..1"):
        select_ensemble([np.full((2, 2), 0.5)], np.array([0, 2]), "classification")
