"""Vectorised negative sampling from the complement of each user's interactions.

Every sampler draws a rank r in [0, number of allowed items) per slot and maps it to the r-th
item the user has NOT interacted with, using one searchsorted over the CSR's column indices.
There is no rejection loop over positives, so the cost is linear in the number of draws and the
result depends only on the generator's state.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp


class TooFewItemsError(ValueError):
    """Some users have fewer non-interacted items than the number of draws asked for."""

    def __init__(self, users: np.ndarray, available: np.ndarray, needed: int):
        self.users, self.available, self.needed = users, available, needed
        super().__init__(f"{len(users)} user(s) have fewer than {needed} items to sample from")


class ComplementSampler:
    """Map ranks within each user's non-interacted items to item ids, for a binary CSR matrix."""

    def __init__(self, excluded: sp.csr_matrix):
        excluded = excluded.tocsr()
        excluded.sum_duplicates()
        excluded.sort_indices()
        self.n_items = excluded.shape[1]
        self.indptr = excluded.indptr.astype(np.int64)
        counts = np.diff(self.indptr)
        rows = np.repeat(np.arange(excluded.shape[0], dtype=np.int64), counts)
        local = np.arange(excluded.nnz, dtype=np.int64) - self.indptr[rows]
        # item - (its position in the row) is non-decreasing within a row; offsetting by
        # row * (n_items + 1) makes the whole array sorted, so one searchsorted serves all rows.
        self._keys = rows * (self.n_items + 1) + (excluded.indices.astype(np.int64) - local)
        self.allowed = self.n_items - counts  # number of non-interacted items per user

    def rank_to_item(self, users: np.ndarray, ranks: np.ndarray) -> np.ndarray:
        """Return the ranks[j]-th non-interacted item of users[j] (users broadcast against ranks)."""
        users = np.asarray(users, dtype=np.int64)
        ranks = np.asarray(ranks, dtype=np.int64)
        if ranks.ndim == 2 and users.ndim == 1:
            users = users[:, None]
        query = users * (self.n_items + 1) + ranks
        below = np.searchsorted(self._keys, query, side="right") - self.indptr[users]
        return ranks + below

    def _check(self, users: np.ndarray, needed: int) -> np.ndarray:
        allowed = self.allowed[users]
        short = allowed < needed
        if short.any():
            raise TooFewItemsError(users[short], allowed[short], needed)
        return allowed

    def sample(self, rng: np.random.Generator, users: np.ndarray, per_user: int) -> np.ndarray:
        """Return (len(users), per_user) items drawn uniformly with replacement from each complement."""
        users = np.asarray(users, dtype=np.int64)
        allowed = self._check(users, 1)
        ranks = rng.integers(0, allowed[:, None], size=(len(users), per_user), dtype=np.int64)
        return self.rank_to_item(users, ranks)

    def sample_distinct(self, rng: np.random.Generator, users: np.ndarray, k: int) -> np.ndarray:
        """Return (len(users), k) distinct items per row, uniform over k-subsets, sorted per row."""
        users = np.asarray(users, dtype=np.int64)
        allowed = self._check(users, k)
        return self.rank_to_item(users, distinct_ranks(rng, allowed, k))


def distinct_ranks(rng: np.random.Generator, sizes: np.ndarray, k: int) -> np.ndarray:
    """Return (len(sizes), k) sorted distinct integers per row, row i drawn from [0, sizes[i]).

    Rows with plenty of room draw with replacement and redraw duplicates (a few rounds, each
    vectorised); rows with little room (sizes < 2k) take the k smallest of random keys, which
    is exact and needs no retries. Both give a uniform k-subset. Requires sizes >= k.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    out = np.empty((len(sizes), k), dtype=np.int64)
    if k == 0 or len(sizes) == 0:
        return out
    tight = sizes < 2 * k
    rows = np.flatnonzero(tight)
    if len(rows):
        width = int(sizes[rows].max())
        keys = rng.random((len(rows), width))
        keys[np.arange(width)[None, :] >= sizes[rows, None]] = 2.0  # beyond the row's range
        out[rows] = np.sort(np.argsort(keys, axis=1, kind="stable")[:, :k], axis=1)
    rows = np.flatnonzero(~tight)
    if len(rows):
        high = sizes[rows]
        draws = rng.integers(0, high[:, None], size=(len(rows), k), dtype=np.int64)
        while True:
            draws.sort(axis=1)
            dup = np.zeros(draws.shape, dtype=bool)
            dup[:, 1:] = draws[:, 1:] == draws[:, :-1]
            r, c = np.nonzero(dup)
            if len(r) == 0:
                break
            draws[r, c] = rng.integers(0, high[r], dtype=np.int64)
        out[rows] = draws
    return out
