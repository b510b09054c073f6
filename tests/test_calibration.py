"""Temperature scaling, expected calibration error and split-conformal intervals
(attnfuse.calibration): against hand computations, references (torch's LBFGS, scikit-learn's
calibration_curve) and the coverage guarantee on exchangeable data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnfuse.calibration import (
    ECE_BINS,
    TEMPERATURE_BOUNDS,
    calibration_bins,
    calibration_summary,
    conformal_interval,
    conformal_quantile,
    expected_calibration_error,
    fit_temperature,
    interval_coverage,
    scale_logits,
    softmax,
    temperature_nll,
)


def _overconfident(n: int = 4000, classes: int = 5, t_true: float = 2.5, seed: int = 0):
    """Logits whose labels were drawn from softmax(logits / t_true): the model is over-confident by
    a factor t_true, and temperature scaling should find it."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 4.0, size=(n, classes))
    p = softmax(logits, t_true)
    y = (p.cumsum(axis=1) < rng.random((n, 1))).sum(axis=1)  # a draw from each row's distribution
    return logits, np.minimum(y, classes - 1)


def test_temperature_scaling_recovers_a_planted_temperature_and_lowers_the_ece():
    logits, y = _overconfident()
    t = fit_temperature(logits, y)
    assert t == pytest.approx(2.5, rel=0.1)
    before = expected_calibration_error(softmax(logits), y)
    after = expected_calibration_error(softmax(logits, t), y)
    assert before > 0.1 and after < 0.03, (before, after)


def test_the_summary_reports_before_and_after():
    logits, y = _overconfident(n=3000, seed=7)
    t = fit_temperature(logits, y)
    summary = calibration_summary(logits, y, t)
    assert summary["temperature"] == t
    assert summary["nll_after"] <= summary["nll_before"] and summary["ece_after"] < summary["ece_before"]
    assert summary["ece_after"] == expected_calibration_error(softmax(logits, t), y)
    assert summary["nll_before"] == pytest.approx(temperature_nll(logits, y), rel=1e-12)


def test_the_fitted_temperature_minimises_the_nll():
    logits, y = _overconfident(n=1500, seed=3)
    t = fit_temperature(logits, y)
    best = temperature_nll(logits, y, t)
    for factor in (0.9, 0.99, 0.999, 1.001, 1.01, 1.1):
        assert best <= temperature_nll(logits, y, t * factor)
    grid = np.exp(np.linspace(math.log(0.5), math.log(10.0), 2001))
    assert best <= min(temperature_nll(logits, y, g) for g in grid) + 1e-12


def test_the_fitted_temperature_agrees_with_lbfgs():
    """Guo et al.'s reference code fits T with torch's LBFGS; on log T (positive by construction)
    with a strong-Wolfe line search, run until its gradient vanishes (its default stopping rule left
    T 2e-5 short on this flat minimum), it reaches the same minimum."""
    logits, y = _overconfident(n=2000, classes=4, t_true=1.7, seed=1)
    z, target = torch.tensor(logits, dtype=torch.float64), torch.tensor(y)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [log_t], lr=1.0, max_iter=200, tolerance_grad=1e-14, tolerance_change=0.0, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.exp(), target)
        loss.backward()
        return loss

    opt.step(closure)
    assert fit_temperature(logits, y) == pytest.approx(log_t.exp().item(), rel=1e-5)


def test_temperature_scaling_never_changes_the_predicted_class():
    logits, y = _overconfident(n=500, seed=2)
    t = fit_temperature(logits, y)
    assert t != 1.0
    np.testing.assert_array_equal(scale_logits(logits, t).argmax(axis=1), logits.argmax(axis=1))
    np.testing.assert_array_equal(softmax(logits, t).argmax(axis=1), logits.argmax(axis=1))
    np.testing.assert_allclose(softmax(logits, t).sum(axis=1), 1.0, rtol=1e-12)


def test_rows_separated_perfectly_take_the_lower_bound():
    """Every label has the largest logit: the NLL keeps falling as T -> 0, so the bracket's lower
    end is the answer, not a value where the search happened to stop."""
    logits = np.array([[3.0, 0.0], [0.0, 2.0], [5.0, 1.0]])
    assert fit_temperature(logits, np.array([0, 1, 0])) == pytest.approx(TEMPERATURE_BOUNDS[0])
    # and a model that is always wrong is flattened as far as allowed
    assert fit_temperature(logits, np.array([1, 0, 1])) == pytest.approx(TEMPERATURE_BOUNDS[1])


def test_the_nll_is_the_cross_entropy():
    logits, y = _overconfident(n=300, seed=4)
    expected = torch.nn.functional.cross_entropy(torch.tensor(logits) / 1.3, torch.tensor(y)).item()
    assert temperature_nll(logits, y, 1.3) == pytest.approx(expected, rel=1e-12)


def test_ece_by_hand():
    """Five rows, 15 bins of width 1/15. Confidences 0.9 and 0.88 (both right) share the bin
    (13/15, 14/15]: accuracy 1, mean confidence 0.89, gap 0.11, weight 2/5. 0.78 (wrong) is alone in
    (11/15, 12/15]: gap 0.78; 0.7 (right) in (10/15, 11/15]: gap 0.3; 0.55 (wrong) in (8/15, 9/15]:
    gap 0.55. ECE = (2 * 0.11 + 0.78 + 0.3 + 0.55) / 5 = 0.37."""
    probs = np.array([[0.9, 0.1], [0.12, 0.88], [0.78, 0.22], [0.3, 0.7], [0.45, 0.55]])
    y = np.array([0, 1, 1, 1, 0])
    assert expected_calibration_error(probs, y) == pytest.approx(0.37, rel=1e-12)
    bins = calibration_bins(probs, y)
    assert bins["count"].tolist() == [0] * 8 + [1, 0, 1, 1, 0, 2, 0]
    assert bins["confidence"][13] == pytest.approx(0.89) and bins["accuracy"][13] == 1.0
    assert np.isnan(bins["accuracy"][0])


def test_ece_bins_are_closed_on_the_right():
    """With two bins (edges 0, 0.5, 1, exact in binary) a confidence of 0.5 belongs to (0, 0.5]
    and one of 1.0 to (0.5, 1]. Row 1 is a tie: the first class is predicted, wrongly."""
    probs = np.array([[0.5, 0.5], [0.25, 0.75], [0.0, 1.0]])
    y = np.array([1, 1, 1])
    bins = calibration_bins(probs, y, bins=2)
    assert bins["count"].tolist() == [1, 2]
    # bin 0: accuracy 0, confidence 0.5; bin 1: accuracy 1, confidence 0.875
    assert expected_calibration_error(probs, y, bins=2) == pytest.approx(1 / 3 * 0.5 + 2 / 3 * 0.125, rel=1e-12)


def test_ece_agrees_with_scikit_learns_calibration_curve():
    """scikit-learn's calibration_curve on (correct, confidence) with 15 uniform bins gives each
    non-empty bin's accuracy and mean confidence; weighted by the bins' counts it is the ECE."""
    from sklearn.calibration import calibration_curve

    logits, y = _overconfident(n=3000, classes=3, seed=5)
    probs = softmax(logits, 0.8)
    conf, correct = probs.max(axis=1), (probs.argmax(axis=1) == y).astype(int)
    acc_bins, conf_bins = calibration_curve(correct, conf, n_bins=ECE_BINS, strategy="uniform")
    counts = np.histogram(conf, bins=np.linspace(0, 1, ECE_BINS + 1))[0]
    counts = counts[counts > 0]
    reference = float(np.sum(counts / counts.sum() * np.abs(acc_bins - conf_bins)))
    assert expected_calibration_error(probs, y) == pytest.approx(reference, rel=1e-9)


def test_calibrated_probabilities_have_a_small_ece():
    """Labels drawn from the probabilities themselves: calibrated by construction, the ECE is
    sampling noise only (15 bins over 20,000 rows)."""
    rng = np.random.default_rng(6)
    probs = softmax(rng.normal(0, 2, size=(20000, 3)))
    y = (probs.cumsum(axis=1) < rng.random((20000, 1))).sum(axis=1)
    assert expected_calibration_error(probs, np.minimum(y, 2)) < 0.015


def test_conformal_quantile_by_hand():
    """Residuals 1..10 (n = 10): alpha 0.2 -> k = ceil(11 * 0.8) = 9 -> q = 9; alpha 0.1 -> k =
    ceil(9.9) = 10 -> q = 10; alpha 0.05 -> k = ceil(10.45) = 11 > n -> no finite q."""
    r = np.arange(10, 0, -1) * np.where(np.arange(10) % 2, 1.0, -1.0)  # signs and order do not matter
    assert conformal_quantile(r, 0.2) == 9.0
    assert conformal_quantile(r, 0.1) == 10.0
    assert conformal_quantile(r, 0.05) == math.inf


def test_conformal_rank_is_not_raised_by_float_rounding():
    """(19 + 1)(1 - 0.7) is 6.000000000000001 in float64; k is 6, not 7."""
    assert (19 + 1) * (1 - 0.7) > 6
    assert conformal_quantile(np.arange(1.0, 20.0), 0.7) == 6.0


def test_conformal_interval_per_output():
    r = np.stack([np.arange(1.0, 11.0), 10 * np.arange(1.0, 11.0)], axis=1)  # (10, 2)
    q = conformal_quantile(r, 0.2)
    np.testing.assert_array_equal(q, [9.0, 90.0])
    lower, upper = conformal_interval(np.zeros((3, 2)), q)
    np.testing.assert_array_equal(upper, [[9.0, 90.0]] * 3)
    np.testing.assert_array_equal(lower, -upper)
    cov = interval_coverage(np.array([[0.0, 100.0]] * 3), lower, upper)
    assert cov == {"coverage": 0.5, "width": pytest.approx(99.0)}


def _coverage_moments(n: int, alpha: float, m: int) -> tuple[float, float, float]:
    """For continuous residuals: the exact expected coverage k/(n+1), its upper bound 1-alpha+1/(n+1)
    and the variance of one draw's coverage over m test rows. Given the calibration rows, coverage
    is Beta(k, n+1-k) distributed; the m test rows add a binomial term:
    Var = Var(c) + E[c(1-c)] / m."""
    k = math.ceil((n + 1) * (1 - alpha) - 1e-9)
    if k > n:
        return 1.0, 1.0, 0.0
    mu = k / (n + 1)
    var_c = k * (n + 1 - k) / ((n + 1) ** 2 * (n + 2))
    return mu, 1 - alpha + 1 / (n + 1), var_c + (mu * (1 - mu) - var_c) / m


@settings(max_examples=20, deadline=None, derandomize=True)
@given(
    n=st.integers(1, 300),
    alpha=st.floats(0.02, 0.5),
    noise=st.sampled_from(["normal", "laplace", "heteroscedastic"]),
)
def test_split_conformal_coverage_holds_on_exchangeable_data(n, alpha, noise):
    """Mean coverage over 2,000 draws of (n calibration rows, 20 test rows) from one distribution,
    with a misspecified model: at least 1 - alpha, at most 1 - alpha + 1/(n+1), within 4 standard
    errors of that mean (the Beta-binomial variance of :func:`_coverage_moments`)."""
    draws, m = 2000, 20
    rng = np.random.default_rng(n * 1000 + int(alpha * 1e6))
    x = rng.uniform(-2, 2, size=(draws, n + m))
    eps = {
        "normal": rng.standard_normal((draws, n + m)),
        "laplace": rng.laplace(size=(draws, n + m)),
        "heteroscedastic": rng.standard_normal((draws, n + m)) * (0.2 + np.abs(x)),
    }[noise]
    y = np.sin(2 * x) + x + eps
    pred = 0.8 * x  # a fixed, misspecified model: the guarantee does not need a good one
    residuals = y - pred
    q = np.array([conformal_quantile(residuals[d, :n], alpha) for d in range(draws)])  # (draws,)
    covered = np.abs(residuals[:, n:]) <= q[:, None]  # (draws, m)
    mean = covered.mean()
    mu, upper, var = _coverage_moments(n, alpha, m)
    tol = 4 * math.sqrt(var / draws)
    assert mean >= 1 - alpha - tol, (mean, mu)
    assert mean <= upper + tol, (mean, mu)
    assert mean == pytest.approx(mu, abs=tol + 1e-12)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: conformal_quantile(np.ones(5), 0.0), "alpha: expected a miscoverage level in"),
        (lambda: conformal_quantile(np.ones(5), 1), "alpha: expected"),
        (lambda: conformal_quantile(np.ones(5), True), "alpha: expected"),
        (lambda: conformal_quantile(np.array([1.0, np.nan]), 0.1), "residuals: 1 non-finite"),
        (lambda: conformal_quantile(np.ones((2, 2, 2)), 0.1), r"residuals: expected shape \(n,\) or \(n, K\)"),
        (lambda: conformal_interval(np.zeros((3, 2)), np.ones(3)), "q: expected one half-width per output"),
        (lambda: fit_temperature(np.ones(4), np.zeros(4, dtype=int)), r"logits: expected shape \(N, C\)"),
        (lambda: fit_temperature(np.ones((4, 3)), np.array([0, 1, 2, 3])), r"y: expected labels in 0..2, got 0..3"),
        (lambda: fit_temperature(np.ones((2, 3)), np.array([0.0, 1.0])), "y: expected .2,. integer class labels"),
        (lambda: fit_temperature(np.ones((2, 3)), np.array([0, 1]), bounds=(2.0, 1.0)), "bounds: expected 0 < low"),
        (lambda: softmax(np.ones((2, 3)), 0.0), "temperature: expected a finite number > 0, got 0.0"),
        (lambda: expected_calibration_error(np.full((2, 2), 2.0), np.array([0, 1])), r"probs: expected .* in \[0, 1\]"),
        (lambda: expected_calibration_error(np.full((2, 2), 0.5), np.array([0, 1]), bins=0), "bins: expected an"),
        (lambda: interval_coverage(np.ones(3), np.ones(2), np.ones(3)), "lower, upper: expected the shape of y"),
        (lambda: temperature_nll(np.array([[np.inf, 0.0]]), np.array([0])), "logits: 1 non-finite"),
    ],
)
def test_bad_arguments_are_one_line_errors(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()
