"""How sure a metric is: 95% intervals over users, and paired comparisons read as a family.

Every metric here is a mean over test users of a per-user value: a hit (0 or 1), a gain
1/log2(rank + 2) or 0, a reciprocal rank. Intervals:
- HR (a proportion): the Wilson score interval, which never has zero width, even at 0 or 1.
- NDCG and MRR: the t interval of the mean, mean ± t(0.975, n - 1) × sd / √n.

A difference between two models (or runs) on the same users is the mean per-user difference,
shown with its 95% t interval (each comparison on its own), and tested:
- HR: the exact McNemar test (a two-sided binomial sign test on the users where exactly one of the
  two hits): exact at any number of disagreeing users, where the t-test is anti-conservative.
- NDCG and MRR: the paired t-test (Ihemelandu and Ekstrand, SIGIR 2023, found it well-behaved at
  recommender-evaluation scale).
- Several runs per side (seeds): `replicated`, a t-test whose variance has a seed part and a user
  part (a two-way random-effects layout of runs x users), so that it tests configurations, not
  trained models.

A table makes several comparisons at once: its verdicts are read after Holm's step-down
adjustment over the family (one metric column of one protocol), so that the chance of any false
"different" verdict in the family is at most 5%. tests/test_calibration.py shows both rates by
simulation. Everything is closed form: no random draws.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import bdtr, ndtri, stdtr, stdtrit  # binomial and Student's t CDFs (scipy.stats: 0.5 s to import)

UNRANKED = -1  # a per-user rank that was not computed (full ranking of a sample of the test users)
LEVEL = 0.95
ALPHA = 0.05  # 1 - LEVEL, written out: 1 - 0.95 is 0.050000000000000044
CORRECTION = "Holm"


@dataclass(frozen=True)
class Estimate:
    """A mean with its 95% interval (lo, hi); for a difference, also the p-value (raw and adjusted)."""

    mean: float
    lo: float
    hi: float
    n: int
    p: float = float("nan")
    p_adjusted: float = float("nan")

    def as_dict(self, digits: int = 6) -> dict:
        out = {"mean": round(self.mean, digits), "lo": round(self.lo, digits), "hi": round(self.hi, digits)}
        for key in ("p", "p_adjusted"):
            if not np.isnan(getattr(self, key)):
                out[key] = float(f"{getattr(self, key):.3g}")
        return out


def wilson(successes: np.ndarray | float, n: int, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """The Wilson score interval (lo, hi) of a proportion successes / n (vectorised over successes)."""
    z = float(ndtri(0.5 + level / 2))
    p = np.asarray(successes, dtype=np.float64) / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def interval(values: np.ndarray, proportion: bool = False) -> Estimate:
    """The mean of `values` (one per user) with its 95% interval: Wilson for a proportion (0/1 values),
    else the t interval."""
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    mean = float(values.mean()) if n else float("nan")
    if proportion and n:
        lo, hi = wilson(values.sum(), n)
        return Estimate(mean, float(lo), float(hi), n)
    if n < 2:
        return Estimate(mean, float("nan"), float("nan"), n)
    half = float(stdtrit(n - 1, 0.5 + LEVEL / 2) * values.std(ddof=1) / np.sqrt(n))
    return Estimate(mean, mean - half, mean + half, n)


def mcnemar_p(b_wins: np.ndarray | int, a_wins: np.ndarray | int) -> np.ndarray:
    """Two-sided exact McNemar p-value from the discordant counts (vectorised): 2 P(X <= min) for
    X ~ Binomial(b_wins + a_wins, 1/2), at most 1; 1 when no user disagrees."""
    b_wins, a_wins = np.asarray(b_wins), np.asarray(a_wins)
    total = b_wins + a_wins
    tail = bdtr(np.minimum(b_wins, a_wins), np.maximum(total, 1), 0.5)
    return np.where(total == 0, 1.0, np.minimum(1.0, 2 * tail))


def paired(a: np.ndarray, b: np.ndarray, binary: bool = False) -> Estimate:
    """Mean of a - b over the same users, its 95% t interval, and the p-value: exact McNemar when
    `binary` (per-user hits), else the paired t-test."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    diff = a - b
    est = interval(diff)
    if binary:
        p = float(mcnemar_p(int((a > b).sum()), int((b > a).sum())))
        return Estimate(est.mean, est.lo if est.n > 1 else est.mean, est.hi if est.n > 1 else est.mean, est.n, p)
    if est.n < 2:
        return est
    sd = diff.std(ddof=1)
    if sd == 0:  # identical outcomes for every user (or a constant shift, which no test can doubt)
        return Estimate(est.mean, est.mean, est.mean, est.n, 1.0 if est.mean == 0 else 0.0)
    t = est.mean / (sd / np.sqrt(est.n))
    return Estimate(est.mean, est.lo, est.hi, est.n, float(2 * stdtr(est.n - 1, -abs(t))))


def replicated(a: np.ndarray, b: np.ndarray) -> Estimate:
    """Mean of b - a over runs x users (a, b: [runs, users], run r of A matched with run r of B), with a
    95% interval and p-value that count how the runs (seeds) vary, and how the users do.

    The per-user differences x[r, u] are read as a two-way random-effects layout (runs x users). The
    variance of their grand mean is that of the matched pairs' mean differences (the ANOVA's runs
    mean square over runs x users: a t-test over the pairs, with runs - 1 degrees of freedom), plus,
    when the users mean square exceeds the residual one, the users' own consistent preference for one
    side ((MS_users - MS_residual) / (runs x users)), with Satterthwaite's degrees of freedom. A runs
    mean square below the residual one is floored at it. With one run a side it is the paired t-test
    over users.
    """
    x = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    runs, n = x.shape
    if runs == 1:
        return paired(x[0], np.zeros(n))
    mean = float(x.mean())
    run_means, user_means = x.mean(axis=1), x.mean(axis=0)
    ms_runs = n * ((run_means - mean) ** 2).sum() / (runs - 1)
    ms_users = runs * ((user_means - mean) ** 2).sum() / (n - 1)
    resid = x - run_means[:, None] - user_means[None, :] + mean
    ms_error = (resid ** 2).sum() / ((runs - 1) * (n - 1))
    # E[MS_runs] is at least the residual variance: runs that happen to agree (MS_runs below MS_residual,
    # even 0 when the run means are equal) are floored at it, never taken as a variance of 0; the
    # degrees of freedom stay the runs' (pooling them with the residual's would be liberal: simulated)
    runs_term, runs_df = max(ms_runs, ms_error), runs - 1.0
    combined, df = runs_term, runs_df
    if ms_users > ms_error:
        combined = runs_term + ms_users - ms_error
        df = combined ** 2 / (runs_term ** 2 / runs_df + ms_users ** 2 / (n - 1)
                              + ms_error ** 2 / ((runs - 1) * (n - 1)))
    if combined == 0:
        return Estimate(mean, mean, mean, n, 1.0 if mean == 0 else 0.0)
    se = np.sqrt(combined / (runs * n))
    half = float(stdtrit(df, 0.5 + LEVEL / 2) * se)
    return Estimate(mean, mean - half, mean + half, n, float(2 * stdtr(df, -abs(mean) / se)))


def holm(p: np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values over the last axis (each row a family; NaN: not in it)."""
    p = np.asarray(p, dtype=np.float64)
    present = ~np.isnan(p)
    m = present.sum(axis=-1, keepdims=True)
    order = np.argsort(np.where(present, p, np.inf), axis=-1, kind="stable")
    ranked = np.take_along_axis(p, order, axis=-1)
    steps = np.arange(p.shape[-1])
    adjusted = np.maximum.accumulate(np.minimum(1.0, (m - steps) * np.where(np.isnan(ranked), 0, ranked)), axis=-1)
    out = np.empty_like(p)
    np.put_along_axis(out, order, adjusted, axis=-1)
    return np.where(present, out, np.nan)


def adjust(family: dict[str, Estimate]) -> dict[str, Estimate]:
    """The same comparisons with Holm-adjusted p-values over the family."""
    names = list(family)
    adjusted = holm(np.array([family[name].p for name in names])) if names else []
    return {name: Estimate(e.mean, e.lo, e.hi, e.n, e.p, float(q)) for (name, e), q in zip(family.items(), adjusted)}


def verdict(diff: Estimate, better: str = "higher") -> str:
    """A plain reading of a difference by its adjusted p-value (else its raw one): which side is ahead
    with family-wise error at most 5%, or that they are indistinguishable."""
    p = diff.p if np.isnan(diff.p_adjusted) else diff.p_adjusted
    if np.isnan(p) or p >= ALPHA or diff.mean == 0:
        return "indistinguishable"
    return better if diff.mean > 0 else ("lower" if better == "higher" else "higher")
