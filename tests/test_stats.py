"""pipeline.stats: the 95% intervals and the paired test behave as their names promise.

Simulations at the scale of a real test set (943 users: ml-100k) check coverage, the false-positive
rate under the null and the power against a planted difference; the closed forms are checked
against scipy.stats. Every simulation draws from a seeded generator, so the results are fixed.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats

from pipeline.metrics import hit_ratio, mrr, ndcg, per_user
from pipeline.stats import Estimate, interval, paired, verdict

N_USERS = 943  # ml-100k's test users
RUNS = 2_000  # simulated test sets per check: the 5% rate's standard error is then 0.5 points


# --- (a) coverage of the interval of a mean --------------------------------------------------------

@pytest.mark.parametrize("rate", [0.6, 0.1])
def test_interval_covers_the_true_hit_rate_95_percent_of_the_time(rate):
    rng = np.random.default_rng(2024)
    hits = (rng.random((RUNS, N_USERS)) < rate).astype(np.float64)
    estimates = [interval(row) for row in hits]
    covered = np.mean([e.lo <= rate <= e.hi for e in estimates])
    assert 0.93 <= covered <= 0.97, covered
    # and the interval is as narrow as it should be: half-width about 1.96 * sqrt(p (1 - p) / n)
    expected_half = 1.96 * math.sqrt(rate * (1 - rate) / N_USERS)
    assert np.median([(e.hi - e.lo) / 2 for e in estimates]) == pytest.approx(expected_half, rel=0.05)


def test_interval_coverage_for_ndcg_like_values():
    """Per-user NDCG@10 values: zero for most users, a gain in (0.29, 1] for the rest."""
    rng = np.random.default_rng(7)
    ranks = rng.geometric(0.08, size=(RUNS, N_USERS)) - 1
    values = per_user(ranks, 10)["ndcg"]
    truth = float(per_user(rng.geometric(0.08, size=2_000_000) - 1, 10)["ndcg"].mean())  # the population mean
    covered = np.mean([interval(row).lo <= truth <= interval(row).hi for row in values])
    assert 0.93 <= covered <= 0.97, covered


# --- (b) the paired test under the null ------------------------------------------------------------

def null_exchangeable(rng, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Both sides Bernoulli(0.6) per user, independently."""
    return (rng.random(n) < 0.6).astype(float), (rng.random(n) < 0.6).astype(float)


def null_correlated(rng, n: int) -> tuple[np.ndarray, np.ndarray]:
    """As two similar models: each user has a propensity, both sides hit with that probability."""
    propensity = rng.beta(1.5, 1.0, size=n)
    return (rng.random(n) < propensity).astype(float), (rng.random(n) < propensity).astype(float)


def null_swapped(rng, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Two different per-user outcomes, swapped between the sides at random per user."""
    first = (rng.random(n) < 0.7).astype(float)
    second = (rng.random(n) < 0.4).astype(float)
    swap = rng.random(n) < 0.5
    return np.where(swap, second, first), np.where(swap, first, second)


@pytest.mark.parametrize("draw", [null_exchangeable, null_correlated, null_swapped])
def test_paired_test_false_positive_rate_under_the_null(draw):
    rng = np.random.default_rng(99)
    diffs = [paired(*draw(rng, N_USERS)) for _ in range(RUNS)]
    p = np.array([d.p for d in diffs])
    assert np.all((p >= 0) & (p <= 1))
    rejected = np.mean(p < 0.05)
    assert 0.03 <= rejected <= 0.07, rejected  # about 5%: neither always 1 nor too eager
    assert 0.3 <= np.median(p) <= 0.7  # p-values are about uniform under the null
    # the interval covers zero exactly when p >= 0.05, and the verdict says so
    assert all((d.lo <= 0 <= d.hi) == (d.p >= 0.05) for d in diffs)
    assert all((verdict(d) == "indistinguishable at 95%") == (d.p >= 0.05) for d in diffs)


# --- (c) power against a planted difference ---------------------------------------------------------

def test_a_planted_difference_of_005_is_found_with_correlated_models():
    rng = np.random.default_rng(5)
    n = 2_000
    base = (rng.random(n) < 0.6).astype(float)
    better = base.copy()
    misses = np.flatnonzero(base == 0)
    better[rng.choice(misses, size=100, replace=False)] = 1.0  # 100 more hits: +0.05 HR exactly
    assert better.mean() - base.mean() == pytest.approx(0.05)
    diff = paired(better, base)
    assert diff.mean == pytest.approx(0.05)
    assert diff.p < 0.01 and diff.lo > 0 and diff.lo <= 0.05 <= diff.hi
    assert verdict(diff) == "higher at 95%"
    assert verdict(paired(base, better)) == "lower at 95%"


def test_a_planted_difference_of_005_is_found_with_independent_outcomes():
    rng = np.random.default_rng(6)
    n = 2_000
    p = []
    for _ in range(400):
        a = (rng.random(n) < 0.65).astype(float)
        b = (rng.random(n) < 0.60).astype(float)
        p.append(paired(a, b).p)
    p = np.array(p)
    assert p[0] < 0.01  # the first seeded draw
    # the power: the difference is 0.05 / sqrt((0.65 * 0.35 + 0.6 * 0.4) / n) = 3.27 standard errors
    z = 0.05 / math.sqrt((0.65 * 0.35 + 0.6 * 0.4) / n)
    for alpha in (0.01, 0.05):
        power = 1 - scipy.stats.norm.cdf(scipy.stats.norm.ppf(1 - alpha / 2) - z)  # 0.76 and 0.90
        assert abs(np.mean(p < alpha) - power) < 0.07, (alpha, np.mean(p < alpha), power)


# --- (d) the closed forms against scipy --------------------------------------------------------------

@pytest.mark.parametrize("kind", ["normal", "bernoulli", "ndcg", "small"])
def test_paired_matches_scipy_ttest_rel(kind):
    rng = np.random.default_rng(["normal", "bernoulli", "ndcg", "small"].index(kind))
    for _ in range(20):
        n = {"small": int(rng.integers(2, 8))}.get(kind, int(rng.integers(50, 3000)))
        if kind == "normal":
            a, b = rng.normal(0.3, 1, n), rng.normal(0.25, 1, n)
        elif kind == "bernoulli":
            a, b = (rng.random(n) < 0.6).astype(float), (rng.random(n) < 0.55).astype(float)
        else:
            ranks = rng.integers(0, 30, size=(2, n))
            a, b = per_user(ranks[0], 10)["ndcg"], per_user(ranks[1], 10)["ndcg"]
        if np.all(a == b):
            continue
        diff = paired(a, b)
        expected = scipy.stats.ttest_rel(a, b)
        assert diff.n == n
        assert diff.mean == pytest.approx(np.mean(a - b), rel=1e-12, abs=1e-15)
        assert diff.p == pytest.approx(expected.pvalue, rel=1e-9, abs=1e-300)
        lo, hi = scipy.stats.t.interval(0.95, n - 1, loc=np.mean(a - b), scale=scipy.stats.sem(a - b))
        assert (diff.lo, diff.hi) == pytest.approx((lo, hi), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("n", [2, 3, 30, 943, 10_000])
def test_interval_matches_scipy_t_interval(n):
    rng = np.random.default_rng(n)
    for values in (rng.normal(2.0, 3.0, n), (rng.random(n) < 0.3).astype(float), 1 / (rng.integers(0, 100, n) + 1)):
        est = interval(values)
        lo, hi = scipy.stats.t.interval(0.95, n - 1, loc=values.mean(), scale=scipy.stats.sem(values))
        assert est.n == n and est.mean == pytest.approx(values.mean(), rel=1e-12)
        assert (est.lo, est.hi) == pytest.approx((lo, hi), rel=1e-9, abs=1e-12)
        assert est.lo < est.mean < est.hi
        assert math.isnan(est.p)


def test_identical_samples():
    values = (np.random.default_rng(0).random(500) < 0.5).astype(float)
    diff = paired(values, values.copy())
    assert (diff.mean, diff.lo, diff.hi, diff.p, diff.n) == (0.0, 0.0, 0.0, 1.0, 500)
    assert verdict(diff) == "indistinguishable at 95%"
    assert diff.as_dict() == {"mean": 0.0, "lo": 0.0, "hi": 0.0, "p": 1.0}


def test_a_constant_shift_is_certain():
    values = np.random.default_rng(1).random(50)
    diff = paired(values + 0.25, values)
    assert diff.mean == pytest.approx(0.25) and diff.lo == diff.hi == diff.mean and diff.p == 0.0
    assert verdict(diff) == "higher at 95%"


def test_constant_values_have_a_zero_width_interval():
    est = interval(np.full(20, 0.5))
    assert (est.mean, est.lo, est.hi) == (0.5, 0.5, 0.5)


@pytest.mark.parametrize("n", [0, 1])
def test_fewer_than_two_users(n):
    values = np.full(n, 0.7)
    est = interval(values)
    assert est.n == n and math.isnan(est.lo) and math.isnan(est.hi) and math.isnan(est.p)
    assert (est.mean == 0.7) if n else math.isnan(est.mean)
    diff = paired(values, np.zeros(n))
    assert diff.n == n and math.isnan(diff.lo) and math.isnan(diff.hi) and math.isnan(diff.p)
    assert verdict(diff) == "indistinguishable at 95%"
    assert "p" not in interval(np.array([0.5])).as_dict()


def test_verdict_strings():
    assert verdict(Estimate(0.02, 0.01, 0.03, 100, 0.001)) == "higher at 95%"
    assert verdict(Estimate(-0.02, -0.03, -0.01, 100, 0.001)) == "lower at 95%"
    assert verdict(Estimate(0.01, -0.01, 0.03, 100, 0.3)) == "indistinguishable at 95%"
    assert verdict(Estimate(0.01, 0.0, 0.02, 100, 0.05)) == "indistinguishable at 95%"  # zero on the edge
    assert verdict(Estimate(0.0, float("nan"), float("nan"), 1)) == "indistinguishable at 95%"
    assert verdict(Estimate(0.02, 0.01, 0.03, 100, 0.001), better="lower") == "lower at 95%"
    assert verdict(Estimate(-0.02, -0.03, -0.01, 100, 0.001), better="lower") == "higher at 95%"


def test_estimate_as_dict_rounds():
    est = Estimate(0.123456789, 0.1, 0.2, 10, 0.0123456)
    assert est.as_dict() == {"mean": 0.123457, "lo": 0.1, "hi": 0.2, "p": 0.0123}
    assert Estimate(0.5, 0.4, 0.6, 10).as_dict() == {"mean": 0.5, "lo": 0.4, "hi": 0.6}


def test_per_user_values_average_to_the_metrics():
    ranks = np.random.default_rng(3).integers(0, 40, size=500)
    values = per_user(ranks, 10)
    assert set(values) == {"hr", "ndcg", "mrr"}
    assert values["hr"].mean() == pytest.approx(hit_ratio(ranks, 10), abs=1e-15)
    assert values["ndcg"].mean() == pytest.approx(ndcg(ranks, 10), abs=1e-15)
    assert values["mrr"].mean() == pytest.approx(mrr(ranks), abs=1e-15)
    np.testing.assert_array_equal(per_user(np.array([0, 1, 9, 10]), 10)["hr"], [1, 1, 1, 0])
    np.testing.assert_allclose(per_user(np.array([0, 1, 9, 10]), 10)["ndcg"], [1, 1 / np.log2(3), 1 / np.log2(11), 0])
