"""Deterministic MovieLens-shaped data, to measure the pipeline at scale without a download.

Users have at least 20 interactions (as in MovieLens) and a long-tailed (log-normal) activity;
items are drawn from a Zipf-like popularity, distinct per user; each user's timestamps are a
random walk from a random start between 1996 and 2015. The generator's seed is fixed per shape,
so `synthetic-20m` is the same data on every machine, whatever the `seed` param says.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class Shape:
    """Size of a synthetic dataset: users, items and (about) how many interactions."""

    users: int
    items: int
    interactions: int


SHAPES = {
    "synthetic-1m": Shape(6_040, 3_706, 1_000_209),  # ml-1m
    "synthetic-20m": Shape(138_493, 26_744, 20_000_263),  # ml-20m
}
MIN_PER_USER = 20
START, END = 820_454_400, 1_420_070_400  # 1996-01-01 .. 2015-01-01, Unix seconds


def item_popularity(n_items: int) -> np.ndarray:
    """Return a probability per item: Zipf-like, (rank + 10) ** -1.1, in a fixed shuffled order."""
    weights = (np.arange(n_items) + 10.0) ** -1.1
    order = np.random.default_rng(n_items).permutation(n_items)
    return (weights / weights.sum())[order]


def _distinct_draws(rng: np.random.Generator, counts: np.ndarray, p: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Return (users, items), sorted by user: counts[u] distinct items for user u, drawn from p.

    Rounds of vectorised draws with replacement; repeats are dropped and users still short of
    their count draw again, so heavy users end up with many less popular items, as they do.
    """
    n_items = len(p)
    cdf = np.cumsum(p)
    done_users, done_items = [], []
    users = np.empty(0, np.int64)  # pairs of users still short of their count, grouped by user
    items = np.empty(0, np.int64)
    short = np.arange(len(counts))
    finished = counts <= 0
    for _ in range(100):
        have = np.bincount(users, minlength=len(counts))
        need = counts[short] - have[short]
        new_users = np.repeat(short, np.ceil(need * 1.3).astype(np.int64) + 2)
        new_items = np.minimum(np.searchsorted(cdf, rng.random(len(new_users)) * cdf[-1]), n_items - 1)
        users, items = np.concatenate([users, new_users]), np.concatenate([items, new_items])
        order = np.argsort(users, kind="stable")  # earlier draws first within each user
        users, items = users[order], items[order]
        keep = ~pd.Series(users * n_items + items).duplicated().to_numpy()
        users, items = users[keep], items[keep]
        starts = np.searchsorted(users, np.arange(len(counts)))
        keep = np.arange(len(users)) - starts[users] < counts[users]
        users, items = users[keep], items[keep]
        full = np.bincount(users, minlength=len(counts)) >= counts
        finished |= full
        done = full[users]
        done_users.append(users[done])
        done_items.append(items[done])
        users, items = users[~done], items[~done]
        short = np.flatnonzero(~finished)
        if len(short) == 0:
            break
    users = np.concatenate(done_users + [users])
    items = np.concatenate(done_items + [items])
    order = np.argsort(users, kind="stable")
    return users[order], items[order]


def generate(shape: Shape) -> pd.DataFrame:
    """Return userId, movieId (1-based), rating (0.5..5) and timestamp, sorted by user then time."""
    rng = np.random.default_rng([shape.users, shape.items, shape.interactions])
    activity = rng.lognormal(0.0, 1.3, shape.users)
    cap = shape.items // 3

    def counts_for(scale: float) -> np.ndarray:
        return np.minimum(MIN_PER_USER + np.floor(np.minimum(activity * scale, cap)).astype(np.int64), cap)

    low, high = 0.0, float(cap) / activity.min()
    for _ in range(60):  # bisect the scale that gives the wanted total under the cap
        mid = (low + high) / 2
        low, high = (mid, high) if counts_for(mid).sum() < shape.interactions else (low, mid)
    counts = counts_for(high)
    users, items = _distinct_draws(rng, counts, item_popularity(shape.items))
    n = len(users)
    gaps = np.floor(rng.exponential(3 * 86_400, n)).astype(np.int64)
    first = np.concatenate([[0], np.flatnonzero(np.diff(users)) + 1])
    walk = np.cumsum(gaps)
    walk -= np.repeat(walk[first], np.diff(np.append(first, n)))
    start = rng.integers(START, END - 86_400 * 365, shape.users)
    timestamps = np.minimum(start[users] + walk, END)
    ratings = rng.integers(1, 11, n) / 2.0
    return pd.DataFrame({"userId": users + 1, "movieId": items + 1, "rating": ratings, "timestamp": timestamps})


def titles(shape: Shape) -> pd.DataFrame:
    """Return movieId and a made-up title for every item."""
    ids = np.arange(1, shape.items + 1)
    years = 1930 + ids % 85
    return pd.DataFrame({"movieId": ids, "title": [f"Synthetic movie {i} ({y})" for i, y in zip(ids, years)]})
