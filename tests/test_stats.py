"""pipeline.stats: the 95% intervals, the paired tests and Holm's adjustment behave as their names promise.

Simulations at the scale of a real test set (943 users: ml-100k) check coverage, the false-positive
rate under the null and the power against a planted difference; the closed forms are checked
against scipy.stats and against values worked by hand. Every simulation draws from a seeded
generator, so the results are fixed. (tests/test_calibration.py checks the verdicts of whole
tables: families of comparisons, as `evaluate` and `compare` read them.)
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats

from pipeline.metrics import hit_ratio, mrr, ndcg, per_user
from pipeline.stats import ALPHA, Estimate, adjust, holm, interval, mcnemar_p, paired, replicated, verdict

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
    # the t-test's interval covers zero exactly when p >= 0.05, and the verdict (no adjusted p: the
    # raw one) says so
    assert all((d.lo <= 0 <= d.hi) == (d.p >= 0.05) for d in diffs)
    assert all((verdict(d) == "indistinguishable") == (d.p >= 0.05) for d in diffs)


@pytest.mark.parametrize("draw", [null_exchangeable, null_correlated, null_swapped])
def test_exact_mcnemar_false_positive_rate_under_the_null(draw):
    """binary=True: the exact test is never above 5% (it is discrete, so somewhat below)."""
    rng = np.random.default_rng(98)
    diffs = [paired(*draw(rng, N_USERS), binary=True) for _ in range(RUNS)]
    p = np.array([d.p for d in diffs])
    assert np.all((p > 0) & (p <= 1))
    rejected = np.mean(p < 0.05)
    assert 0.025 <= rejected <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / RUNS), rejected
    assert 0.3 <= np.median(p) <= 0.8
    assert all((verdict(d) == "indistinguishable") == (d.p >= 0.05) for d in diffs)
    # the mean and interval are still the paired t interval of the differences
    a, b = draw(rng, N_USERS)
    t_version, exact = paired(a, b), paired(a, b, binary=True)
    assert (exact.mean, exact.lo, exact.hi, exact.n) == (t_version.mean, t_version.lo, t_version.hi, t_version.n)


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
    assert verdict(diff) == "higher"
    assert verdict(paired(base, better)) == "lower"
    # the exact McNemar test: 100 users where only `better` hits, none the other way
    exact = paired(better, base, binary=True)
    assert exact.mean == pytest.approx(0.05) and exact.p == pytest.approx(2 * 0.5 ** 100)
    assert verdict(exact) == "higher" and verdict(paired(base, better, binary=True)) == "lower"


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
    assert verdict(diff) == "indistinguishable"
    assert diff.as_dict() == {"mean": 0.0, "lo": 0.0, "hi": 0.0, "p": 1.0}
    exact = paired(values, values.copy(), binary=True)
    assert (exact.mean, exact.p) == (0.0, 1.0) and verdict(exact) == "indistinguishable"


def test_a_constant_shift_is_certain():
    values = np.random.default_rng(1).random(50)
    diff = paired(values + 0.25, values)
    assert diff.mean == pytest.approx(0.25) and diff.lo == diff.hi == diff.mean and diff.p == 0.0
    assert verdict(diff) == "higher"


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
    assert verdict(diff) == "indistinguishable"
    assert "p" not in interval(np.array([0.5])).as_dict()


def test_verdict_strings():
    assert ALPHA == pytest.approx(0.05)
    assert verdict(Estimate(0.02, 0.01, 0.03, 100, 0.001)) == "higher"
    assert verdict(Estimate(-0.02, -0.03, -0.01, 100, 0.001)) == "lower"
    assert verdict(Estimate(0.01, -0.01, 0.03, 100, 0.3)) == "indistinguishable"
    assert verdict(Estimate(0.01, 0.0, 0.02, 100, 0.051)) == "indistinguishable"
    assert verdict(Estimate(0.01, 0.0, 0.02, 100, 0.0499)) == "higher"
    assert verdict(Estimate(0.0, float("nan"), float("nan"), 1)) == "indistinguishable"
    assert verdict(Estimate(0.0, 0.0, 0.0, 100, 0.001)) == "indistinguishable"  # no difference to name
    assert verdict(Estimate(0.02, 0.01, 0.03, 100, 0.001), better="lower") == "lower"
    assert verdict(Estimate(-0.02, -0.03, -0.01, 100, 0.001), better="lower") == "higher"


def test_a_p_value_of_exactly_005_is_not_a_difference():
    assert verdict(Estimate(0.01, 0.0, 0.02, 100, 0.05)) == "indistinguishable"  # "p < 0.05" is the rule
    assert verdict(Estimate(0.02, 0.01, 0.03, 100, 0.01, float(holm(np.array([0.01] * 5))[0]))) == "indistinguishable"


def test_verdict_reads_the_adjusted_p_value_when_there_is_one():
    assert verdict(Estimate(0.02, 0.01, 0.03, 100, 0.001, 0.2)) == "indistinguishable"
    assert verdict(Estimate(-0.02, -0.03, -0.01, 100, 0.01, 0.04)) == "lower"
    assert verdict(Estimate(0.02, 0.01, 0.03, 100, 0.01, 0.051)) == "indistinguishable"
    assert verdict(Estimate(0.02, 0.01, 0.03, 100, 0.2, float("nan"))) == "indistinguishable"  # the raw one


def test_estimate_as_dict_rounds():
    est = Estimate(0.123456789, 0.1, 0.2, 10, 0.0123456)
    assert est.as_dict() == {"mean": 0.123457, "lo": 0.1, "hi": 0.2, "p": 0.0123}
    assert Estimate(0.5, 0.4, 0.6, 10).as_dict() == {"mean": 0.5, "lo": 0.4, "hi": 0.6}
    adjusted = Estimate(0.5, 0.4, 0.6, 10, 0.0123456, 0.0617283)
    assert adjusted.as_dict() == {"mean": 0.5, "lo": 0.4, "hi": 0.6, "p": 0.0123, "p_adjusted": 0.0617}


def test_per_user_values_average_to_the_metrics():
    ranks = np.random.default_rng(3).integers(0, 40, size=500)
    values = per_user(ranks, 10)
    assert set(values) == {"hr", "ndcg", "mrr"}
    assert values["hr"].mean() == pytest.approx(hit_ratio(ranks, 10), abs=1e-15)
    assert values["ndcg"].mean() == pytest.approx(ndcg(ranks, 10), abs=1e-15)
    assert values["mrr"].mean() == pytest.approx(mrr(ranks), abs=1e-15)
    np.testing.assert_array_equal(per_user(np.array([0, 1, 9, 10]), 10)["hr"], [1, 1, 1, 0])
    np.testing.assert_allclose(per_user(np.array([0, 1, 9, 10]), 10)["ndcg"], [1, 1 / np.log2(3), 1 / np.log2(11), 0])


# --- (e) the exact McNemar test ------------------------------------------------------------------------

def exact_mcnemar(b: int, a: int) -> float:
    """2 * sum_{i <= min(a, b)} C(n, i) / 2^n, n = a + b, at most 1 (1 when n = 0)."""
    n = a + b
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(a, b) + 1)) / 2 ** n) if n else 1.0


def test_mcnemar_p_known_values():
    assert mcnemar_p(5, 0) == pytest.approx(0.0625, rel=1e-12)
    assert mcnemar_p(0, 5) == pytest.approx(0.0625, rel=1e-12)
    assert mcnemar_p(10, 2) == pytest.approx(158 / 4096, rel=1e-12)  # 2 (1 + 12 + 66) / 2^12 = 0.0386
    assert mcnemar_p(10, 2) == pytest.approx(0.0386, abs=5e-5)
    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(3, 3) == 1.0 and mcnemar_p(1, 0) == 1.0  # capped at 1


def test_mcnemar_p_matches_the_binomial_sum_and_scipy_vectorised():
    b, a = np.meshgrid(np.arange(0, 41), np.arange(0, 41), indexing="ij")
    p = mcnemar_p(b, a)
    assert p.shape == b.shape
    expected = np.vectorize(exact_mcnemar)(b, a)
    np.testing.assert_allclose(p, expected, rtol=1e-10, atol=1e-300)
    np.testing.assert_array_equal(p, p.T)  # two-sided: symmetric in the two counts
    for wins, losses in ((7, 1), (30, 12), (150, 110), (80, 80)):
        assert mcnemar_p(wins, losses) == pytest.approx(
            scipy.stats.binomtest(wins, wins + losses, 0.5).pvalue, rel=1e-9)


def test_paired_binary_counts_the_discordant_users():
    a = np.array([1, 1, 1, 1, 1, 0, 0, 1, 0, 1, 0, 0], dtype=float)
    b = np.array([0, 0, 0, 0, 1, 1, 0, 1, 0, 1, 0, 0], dtype=float)  # a wins on 4 users, b on 1
    assert paired(a, b, binary=True).p == pytest.approx(exact_mcnemar(4, 1))
    assert paired(a, b, binary=True).mean == pytest.approx(3 / 12)


# --- (f) Holm's step-down adjustment -------------------------------------------------------------------

def holm_by_hand(p: list[float]) -> list[float]:
    present = [i for i, v in enumerate(p) if not math.isnan(v)]
    order = sorted(present, key=lambda i: p[i])
    m, out, running = len(order), [float("nan")] * len(p), 0.0
    for step, i in enumerate(order):
        running = max(running, min(1.0, (m - step) * p[i]))
        out[i] = running
    return out


def test_holm_known_example():
    np.testing.assert_allclose(holm(np.array([0.01, 0.04, 0.03, 0.5])), [0.04, 0.09, 0.09, 0.5], rtol=1e-12)
    np.testing.assert_allclose(holm(np.array([0.2, 0.9])), [0.4, 0.9], rtol=1e-12)
    np.testing.assert_allclose(holm(np.array([0.6, 0.7])), [1.0, 1.0])  # capped at 1
    assert holm(np.array([0.03])) == pytest.approx([0.03])  # a family of one: unchanged


def test_holm_leaves_nan_out_of_the_family():
    nan = float("nan")
    out = holm(np.array([0.01, nan, 0.04, 0.03, nan, 0.5]))
    assert math.isnan(out[1]) and math.isnan(out[4])
    np.testing.assert_allclose(out[[0, 2, 3, 5]], [0.04, 0.09, 0.09, 0.5], rtol=1e-12)  # m = 4, not 6
    assert np.isnan(holm(np.array([nan, nan]))).all()


def test_holm_on_rows_equals_row_by_row():
    rng = np.random.default_rng(12)
    p = rng.random((50, 7)) ** 3
    p[rng.random(p.shape) < 0.2] = np.nan
    p[3, :] = np.nan  # an empty family
    p[4, 2] = p[4, 5] = 0.01  # ties
    out = holm(p)
    assert out.shape == p.shape
    for row, adjusted in zip(p, out):
        np.testing.assert_allclose(adjusted, holm(row), rtol=1e-15)
        np.testing.assert_allclose(adjusted, holm_by_hand(list(row)), rtol=1e-12)
    assert np.all(np.isnan(out) == np.isnan(p))
    assert np.all((out >= p) | np.isnan(p))  # never below the raw p-value


def test_adjust_a_family_of_estimates():
    family = {"mlp": Estimate(0.02, 0.0, 0.04, 943, 0.01), "gmf": Estimate(0.01, -0.01, 0.03, 943, 0.04),
              "ease": Estimate(-0.03, -0.05, -0.01, 943, 0.03)}
    out = adjust(family)
    assert list(out) == ["mlp", "gmf", "ease"]
    assert [out[n].p_adjusted for n in out] == pytest.approx([0.03, 0.06, 0.06])
    assert all((out[n].mean, out[n].lo, out[n].hi, out[n].n, out[n].p) ==
               (family[n].mean, family[n].lo, family[n].hi, family[n].n, family[n].p) for n in out)
    assert [verdict(out[n]) for n in out] == ["higher", "indistinguishable", "indistinguishable"]
    assert adjust({}) == {}


# --- (g) several runs a side ------------------------------------------------------------------------------

def test_replicated_with_one_run_is_the_paired_t_test():
    rng = np.random.default_rng(21)
    a = (rng.random((1, N_USERS)) < 0.6).astype(float)
    b = (rng.random((1, N_USERS)) < 0.62).astype(float)
    est, expected = replicated(a, b), paired(b[0], a[0])
    assert (est.mean, est.lo, est.hi, est.p, est.n) == pytest.approx(
        (expected.mean, expected.lo, expected.hi, expected.p, expected.n), rel=1e-12)
    assert est.p == pytest.approx(scipy.stats.ttest_rel(b[0], a[0]).pvalue, rel=1e-9)
    assert est.mean == pytest.approx(b.mean() - a.mean())  # the sign: B - A


def test_replicated_with_identical_sides():
    a = (np.random.default_rng(22).random((3, N_USERS)) < 0.6).astype(float)
    est = replicated(a, a.copy())
    assert (est.mean, est.p, est.lo, est.hi) == (0.0, 1.0, 0.0, 0.0)
    assert verdict(est) == "indistinguishable"


def test_replicated_with_differences_constant_over_users_is_the_t_test_of_the_runs():
    """When every user of run r differs by the same c_r, only the runs vary: the one-sample t-test of
    the c_r, with runs - 1 degrees of freedom."""
    c = np.array([0.03, 0.01, 0.05, 0.02])
    a = np.random.default_rng(23).random((4, 200))
    est = replicated(a, a + c[:, None])
    expected = scipy.stats.ttest_1samp(c, 0.0)
    lo, hi = scipy.stats.t.interval(0.95, len(c) - 1, loc=c.mean(), scale=scipy.stats.sem(c))
    assert est.mean == pytest.approx(c.mean())
    assert est.p == pytest.approx(expected.pvalue, rel=1e-6)
    assert (est.lo, est.hi) == pytest.approx((lo, hi), rel=1e-6)


def test_replicated_counts_the_seeds_spread():
    """Runs that disagree with each other make the comparison less sure than the users alone say."""
    rng = np.random.default_rng(24)
    a = (rng.random((3, N_USERS)) < 0.6).astype(float)
    b = (rng.random((3, N_USERS)) < 0.6).astype(float)
    b[0, rng.choice(np.flatnonzero(b[0] == 0), 60, replace=False)] = 1  # one seed much better: +0.064
    pooled = paired(b.mean(axis=0), a.mean(axis=0))
    est = replicated(a, b)
    assert est.mean == pytest.approx(pooled.mean)
    assert est.hi - est.lo > pooled.hi - pooled.lo
    assert est.p > pooled.p


def test_replicated_runs_that_agree_exactly_are_not_a_certainty():
    """Seeds whose mean differences happen to be equal (each pair +2 hits of 60, on different users:
    test_compare's sweep found such a case) leave the users' own variation: an interval of real width
    and p > 0, never the zero-width "higher" of a variance taken as 0."""
    rng = np.random.default_rng(25)
    a = (rng.random((3, 60)) < 0.45).astype(float)
    b = a.copy()
    for r in range(3):  # +2 net hits per run: 3 users gain a hit and 1 loses one, different users each run
        gain = rng.choice(np.flatnonzero(b[r] == 0), 3, replace=False)
        lose = rng.choice(np.flatnonzero(b[r] == 1), 1, replace=False)
        b[r, gain], b[r, lose] = 1, 0
    diffs = (b - a).mean(axis=1)
    assert np.ptp(diffs) == 0  # the run means are equal
    est = replicated(a, b)
    assert est.mean == pytest.approx(2 / 60)
    assert est.hi - est.lo > 0.02 and est.lo < 0 < est.hi
    assert 0.05 < est.p < 1 and verdict(est) == "indistinguishable"
