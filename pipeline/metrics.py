"""Ranking metrics: over a [users x candidates] score matrix whose column 0 is the held-out item
(the sampled protocol), and over every item a user has not seen (full ranking)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np
import scipy.sparse as sp

if TYPE_CHECKING:  # torch is imported where it is used: comparing runs needs none
    import torch


FULL_RANK_STREAM = 7  # random stream of candidate_seed that picks the fully ranked users


def full_rank_sample(n_users: int, limit: int, seed: int) -> np.ndarray:
    """Positions (sorted) of the users (test or validation) that full ranking scores: all, or a seeded
    sample of `limit`."""
    if limit == 0 or n_users <= limit:
        return np.arange(n_users)
    return np.sort(np.random.default_rng([seed, FULL_RANK_STREAM]).choice(n_users, size=limit, replace=False))


def heldout_rank(scores: np.ndarray) -> np.ndarray:
    """Return each row's 0-based rank of column 0 among all columns.

    Ties are pessimistic: every other candidate with a score equal to the held-out item's ranks
    above it (as in the seed notebook). A NaN held-out score ranks last; a NaN candidate ranks above.
    """
    scores = np.asarray(scores)
    heldout = scores[:, :1]
    beaten = (scores[:, 1:] < heldout).sum(axis=1)  # candidates strictly below the held-out item
    return (scores.shape[1] - 1) - beaten


def hits(ranks: np.ndarray, k: int) -> np.ndarray:
    """Per user: 1.0 when the held-out item ranks in the top k (0-based ranks), else 0.0."""
    return (np.asarray(ranks, dtype=np.float64) < k).astype(np.float64)


def gains(ranks: np.ndarray, k: int) -> np.ndarray:
    """Per user: 1/log2(rank + 2) for a top-k hit, else 0 (one relevant item per user)."""
    ranks = np.asarray(ranks, dtype=np.float64)
    return np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)


def reciprocal_ranks(ranks: np.ndarray) -> np.ndarray:
    """Per user: 1/(rank + 1), with no cut-off."""
    return 1.0 / (np.asarray(ranks, dtype=np.float64) + 1.0)


def per_user(ranks: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Per-user values whose means are HR@k, NDCG@k and MRR, from 0-based ranks (any shape)."""
    return {"hr": hits(ranks, k), "ndcg": gains(ranks, k), "mrr": reciprocal_ranks(ranks)}


def hit_ratio(ranks: np.ndarray, k: int) -> float:
    """Return HR@k: the fraction of users whose held-out item ranks in the top k."""
    return float(np.mean(hits(ranks, k)))


def ndcg(ranks: np.ndarray, k: int) -> float:
    """Return NDCG@k for one relevant item per user: the mean gain over users."""
    return float(np.mean(gains(ranks, k)))


def hit_ratio_curve(ranks: np.ndarray, max_k: int) -> np.ndarray:
    """Return HR@k for k = 1..max_k as an array of length max_k."""
    counts = np.bincount(np.minimum(np.asarray(ranks), max_k), minlength=max_k + 1)[:max_k]
    return np.cumsum(counts) / len(ranks)


def mrr(ranks: np.ndarray) -> float:
    """Return the mean reciprocal rank, 1/(rank + 1), over all users (no cut-off)."""
    return float(np.mean(reciprocal_ranks(ranks)))


def seen_cells(seen: sp.csr_matrix, users: np.ndarray) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(rows, items) of the items each of `users` has seen, as index tensors into a [len(users), n_items]
    score block: what full ranking and recommending leave out."""
    import torch

    block = seen[users]
    rows = torch.from_numpy(np.repeat(np.arange(len(users)), np.diff(block.indptr)))
    return rows, torch.from_numpy(block.indices.astype(np.int64))


def full_ranks(score_all: Callable[[np.ndarray], torch.Tensor], users: np.ndarray, heldout: np.ndarray,
               seen: sp.csr_matrix, batch_elements: int = 4_000_000) -> np.ndarray:
    """Return each user's 0-based rank of its held-out item among ALL items it has not seen.

    `score_all(users)` gives [len(users), n_items] scores; items in the user's row of `seen`
    (train and validation) are left out, as is the held-out item itself. Ties are pessimistic,
    as in `heldout_rank`: an equal (or NaN) score ranks above the held-out item.
    """
    import torch

    users = np.asarray(users, dtype=np.int64)
    heldout = np.asarray(heldout, dtype=np.int64)
    seen = seen.tocsr()
    ranks = np.empty(len(users), dtype=np.int64)
    n_items = seen.shape[1]
    # About 16 MB of scores per batch: reused by the allocator instead of mapped afresh each time.
    batch_users = max(1, batch_elements // max(n_items, 1))
    for lo in range(0, len(users), batch_users):
        u, items = users[lo:lo + batch_users], heldout[lo:lo + batch_users]
        scores = score_all(u)
        rows = torch.arange(len(u))
        held = scores[rows, torch.from_numpy(items)].clone()
        masked = torch.zeros(scores.shape, dtype=torch.bool)
        masked[seen_cells(seen, u)] = True
        masked[rows, torch.from_numpy(items)] = True
        # Not strictly below the held-out score (so ties and NaN rank above it), and not masked.
        above = ~(scores < held[:, None]) & ~masked
        ranks[lo:lo + len(u)] = above.sum(dim=1).numpy()
    return ranks
