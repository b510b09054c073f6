"""Tests for attnfuse.metrics against small hand-computed examples."""

from __future__ import annotations

import math

import numpy as np
import pytest

from attnfuse.metrics import (
    PRIMARY_METRIC,
    classification_metrics,
    compute_metrics,
    regression_metrics,
    sentiment_metrics,
    summarize,
)


def test_classification_by_hand():
    y_true = np.array([0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 1, 1, 1, 2, 0])
    m = classification_metrics(y_true, y_pred)
    assert m["accuracy"] == pytest.approx(4 / 6)
    # F1 per class = 2TP / (2TP + FP + FN): class 0: 2/4, class 1: 4/5, class 2: 2/3.
    assert m["f1_macro"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert all(type(v) is float for v in m.values())


def test_classification_accepts_scores_and_counts_unseen_predicted_class():
    scores = np.array([[2.0, 1.0], [0.1, 0.3], [5.0, -1.0], [0.0, 0.2]])
    m = classification_metrics(np.array([0, 1, 0, 0]), scores)  # argmax -> [0, 1, 0, 1]
    assert m["accuracy"] == 0.75
    # A class predicted but absent from y_true counts with F1 0 (scikit-learn's labels = union).
    m = classification_metrics(np.array([0, 0, 0, 0]), np.array([0, 0, 0, 1]))
    assert m["f1_macro"] == pytest.approx((6 / 7 + 0) / 2)
    assert classification_metrics(np.array([1, 2]), np.array([1, 2])) == {"accuracy": 1.0, "f1_macro": 1.0}
    with pytest.raises(ValueError, match=r"y_pred.*\(3,\).*got \(2, 4\)"):
        classification_metrics(np.array([0, 1, 1]), np.zeros((2, 4)))


def test_regression_by_hand():
    m = regression_metrics(np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 2.0, 3.0, 5.0]))
    assert m["mae"] == pytest.approx(0.25)
    assert m["rmse"] == pytest.approx(0.5)
    assert m["r2"] == pytest.approx(1 - 1 / 5)  # SS_res = 1, SS_tot = 5
    assert m["corr"] == pytest.approx(6.5 / math.sqrt(5 * 8.75))


def test_regression_multi_output_averages_outputs():
    y_true = np.array([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0]])
    y_pred = np.array([[1.0, 1.0], [2.0, 1.0], [3.0, 1.0], [5.0, 1.0]])
    m = regression_metrics(y_true, y_pred)
    assert m["mae"] == pytest.approx((0.25 + 1.0) / 2)
    assert m["rmse"] == pytest.approx((0.5 + 1.0) / 2)
    assert m["r2"] == pytest.approx((0.8 + 0.0) / 2)  # constant target, inexact prediction -> 0
    assert m["corr"] == pytest.approx((6.5 / math.sqrt(43.75) + 0.0) / 2)  # constant side -> 0


def test_regression_edge_cases_and_errors():
    m = regression_metrics(np.array([2.0, 2.0]), np.array([2.0, 2.0]))
    assert m["r2"] == 1.0 and m["corr"] == 0.0 and m["mae"] == 0.0
    assert regression_metrics(np.arange(3.0), np.arange(3.0).reshape(3, 1))["mae"] == 0.0
    with pytest.raises(ValueError, match="y_pred"):
        regression_metrics(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="y_true.*non-finite"):
        regression_metrics(np.array([0.0, np.inf]), np.zeros(2))
    # A diverged model's NaN predictions give NaN metrics (never "better"), not an exception.
    diverged = regression_metrics(np.zeros(2), np.array([0.0, np.nan]))
    assert set(diverged) == {"mae", "rmse", "r2", "corr"} and all(math.isnan(v) for v in diverged.values())
    assert all(math.isnan(v) for v in sentiment_metrics(np.ones(2), np.array([np.inf, 0.0])).values())
    with pytest.raises(ValueError, match="y_true"):
        regression_metrics(np.zeros(0), np.zeros(0))


def test_sentiment_by_hand():
    y_true = np.array([-2.4, -0.6, 0.0, 0.4, 1.6, 3.0])
    y_pred = np.array([-1.6, 0.3, -0.2, 0.8, 2.6, 2.2])
    m = sentiment_metrics(y_true, y_pred)
    # Non-zero targets (all but index 2): truth > 0 = F F T T T, pred > 0 = F T T T T.
    assert m["acc2"] == pytest.approx(4 / 5)
    # Weighted F1: negatives F1 2/3 (support 2), positives F1 6/7 (support 3).
    assert m["f1"] == pytest.approx((2 * 2 / 3 + 3 * 6 / 7) / 5)
    # Has-0: truth >= 0 = F F T T T T, pred >= 0 = F T F T T T.
    assert m["acc2_has0"] == pytest.approx(4 / 6)
    assert m["f1_has0"] == pytest.approx((2 * 0.5 + 4 * 0.75) / 6)
    # acc7: round(clip [-3, 3]): pred -2 0 0 1 3 2, truth -2 -1 0 0 2 3.
    assert m["acc7"] == pytest.approx(2 / 6)
    # acc5: round(clip [-2, 2]): pred -2 0 0 1 2 2, truth -2 -1 0 0 2 2.
    assert m["acc5"] == pytest.approx(4 / 6)


def test_sentiment_rounds_half_to_even_like_mmsa():
    # np.round(2.5) == 2 and np.round(1.5) == 2, as in MMSA's multiclass accuracy.
    m = sentiment_metrics(np.array([2.5, -0.5]), np.array([1.5, 0.4]))
    assert m["acc7"] == 1.0


def test_compute_metrics_dispatch():
    y = np.array([-1.0, 0.5, 2.0])
    m = compute_metrics("regression", y, y, sentiment=True)
    assert {"mae", "rmse", "r2", "corr", "acc2", "acc2_has0", "f1", "acc7", "acc5"} <= set(m)
    assert set(compute_metrics("regression", y, y)) == {"mae", "rmse", "r2", "corr"}
    assert set(compute_metrics("classification", np.array([0, 1]), np.array([0, 1]))) == {"accuracy", "f1_macro"}
    with pytest.raises(ValueError, match="task"):
        compute_metrics("ranking", y, y)
    with pytest.raises(ValueError, match="sentiment"):
        compute_metrics("classification", np.array([0, 1]), np.array([0, 1]), sentiment=True)
    for task, (metric, direction) in PRIMARY_METRIC.items():
        assert metric in compute_metrics(task, np.array([0, 1]), np.array([0, 1])) and direction in ("max", "min")


def test_summarize():
    runs = [
        {"accuracy": 0.5, "seed": 0, "name": "a"},
        {"accuracy": 0.7, "seed": 1, "name": "b"},
        {"accuracy": 0.9, "seed": 2, "name": "c"},
    ]
    s = summarize(runs)
    assert s["accuracy"]["mean"] == pytest.approx(0.7)
    assert s["accuracy"]["std"] == pytest.approx(0.2)  # sample std (ddof=1)
    assert "name" not in s
    assert summarize([{"mae": 1.5}]) == {"mae": {"mean": 1.5, "std": 0.0}}
    with pytest.raises(ValueError, match="'mae'.*run 1"):
        summarize([{"mae": 1.0}, {"rmse": 2.0}])
    with pytest.raises(ValueError, match="runs"):
        summarize([])
