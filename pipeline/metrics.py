"""Ranking metrics over a [users x candidates] score matrix whose column 0 is the held-out item."""
from __future__ import annotations

import numpy as np


def heldout_rank(scores: np.ndarray) -> np.ndarray:
    """Return each row's 0-based rank of column 0 among all columns.

    Ties are pessimistic: every other candidate with a score equal to the held-out item's ranks
    above it (as in the seed notebook). A NaN held-out score ranks last; a NaN candidate ranks above.
    """
    scores = np.asarray(scores)
    heldout = scores[:, :1]
    beaten = (scores[:, 1:] < heldout).sum(axis=1)  # candidates strictly below the held-out item
    return (scores.shape[1] - 1) - beaten


def hit_ratio(ranks: np.ndarray, k: int) -> float:
    """Return HR@k: the fraction of users whose held-out item ranks in the top k."""
    return float(np.mean(np.asarray(ranks) < k))


def ndcg(ranks: np.ndarray, k: int) -> float:
    """Return NDCG@k for one relevant item per user: mean of 1/log2(rank + 2) over top-k hits."""
    ranks = np.asarray(ranks)
    gains = np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)
    return float(np.mean(gains))


def hit_ratio_curve(ranks: np.ndarray, max_k: int) -> np.ndarray:
    """Return HR@k for k = 1..max_k as an array of length max_k."""
    counts = np.bincount(np.minimum(np.asarray(ranks), max_k), minlength=max_k + 1)[:max_k]
    return np.cumsum(counts) / len(ranks)
