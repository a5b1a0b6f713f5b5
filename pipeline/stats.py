"""How sure a metric is: 95% intervals over users, and paired comparisons of two models or runs.

Every metric here is a mean over test users of a per-user value (a hit: 0 or 1; a gain
1/log2(rank + 2) or 0; a reciprocal rank). Its interval is the t interval of that mean: mean ±
t(0.975, n - 1) × sd / √n. A difference between two models (or two runs) on the same users is
the mean of the per-user differences, with the same t interval and the paired t-test's two-sided
p-value, which Ihemelandu and Ekstrand (SIGIR 2023) found well-behaved at recommender-evaluation
scale. The interval covers zero exactly when p ≥ 0.05. Everything is closed form: it costs one
pass over the per-user values, at any number of users, and has no random draws.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import stdtr, stdtrit  # Student's t CDF and its inverse (scipy.stats: 0.5 s to import)

UNRANKED = -1  # a per-user rank that was not computed (full ranking of a sample of the test users)
LEVEL = 0.95


@dataclass(frozen=True)
class Estimate:
    """A mean over users with its 95% interval (lo, hi); for a difference, also the p-value."""

    mean: float
    lo: float
    hi: float
    n: int
    p: float = float("nan")

    def as_dict(self, digits: int = 6) -> dict:
        out = {"mean": round(self.mean, digits), "lo": round(self.lo, digits), "hi": round(self.hi, digits)}
        if not np.isnan(self.p):
            out["p"] = float(f"{self.p:.3g}")
        return out


def interval(values: np.ndarray) -> Estimate:
    """The mean of `values` (one per user) with its 95% t interval."""
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    mean = float(values.mean()) if n else float("nan")
    if n < 2:
        return Estimate(mean, float("nan"), float("nan"), n)
    half = float(stdtrit(n - 1, 0.5 + LEVEL / 2) * values.std(ddof=1) / np.sqrt(n))
    return Estimate(mean, mean - half, mean + half, n)


def paired(a: np.ndarray, b: np.ndarray) -> Estimate:
    """Mean of a - b over the same users, its 95% interval and the paired t-test's p-value."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    est = interval(diff)
    if est.n < 2:
        return est
    sd = diff.std(ddof=1)
    if sd == 0:  # identical outcomes for every user (or a constant shift, which no test can doubt)
        return Estimate(est.mean, est.mean, est.mean, est.n, 1.0 if est.mean == 0 else 0.0)
    t = est.mean / (sd / np.sqrt(est.n))
    return Estimate(est.mean, est.lo, est.hi, est.n, float(2 * stdtr(est.n - 1, -abs(t))))


def verdict(diff: Estimate, better: str = "higher") -> str:
    """A plain reading of a difference: which side is ahead at 95%, or that they are indistinguishable."""
    if np.isnan(diff.lo) or diff.lo <= 0 <= diff.hi:
        return "indistinguishable at 95%"
    return f"{better} at 95%" if diff.mean > 0 else f"{'lower' if better == 'higher' else 'higher'} at 95%"
