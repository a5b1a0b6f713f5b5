"""Vectorised negative sampling from the complement of each user's interactions.

A sampler draws a rank r in [0, number of allowed items) per slot and maps it to the r-th item the
user has NOT interacted with, using one searchsorted over the CSR's column indices.
There is no rejection loop over positives, so the cost is linear in the number of draws and the
result depends only on the generator's state.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from pipeline.common import PipelineError


class TooFewItemsError(ValueError):
    """Some users have fewer non-interacted items than the number of draws asked for."""

    def __init__(self, users: np.ndarray, available: np.ndarray, needed: int):
        self.users, self.available, self.needed = users, available, needed
        super().__init__(f"{len(users)} user(s) have fewer than {needed} items to sample from")


class ComplementSampler:
    """Draw items a user has NOT interacted with (a row of a binary CSR matrix), uniformly.

    Without `device`, numpy arrays and numpy generators (the candidate lists of sample_negatives);
    with one, torch tensors on that device and torch generators (the training loop's negatives).
    Both sides draw ranks and map them to items with the same `rank_to_item`.
    """

    def __init__(self, excluded: sp.csr_matrix, device=None):
        excluded = excluded.tocsr()
        excluded.sum_duplicates()
        excluded.sort_indices()
        self.n_items = excluded.shape[1]
        indptr = excluded.indptr.astype(np.int64)
        counts = np.diff(indptr)
        rows = np.repeat(np.arange(excluded.shape[0], dtype=np.int64), counts)
        local = np.arange(excluded.nnz, dtype=np.int64) - indptr[rows]
        # item - (its position in the row) is non-decreasing within a row; offsetting by
        # row * (n_items + 1) makes the whole array sorted, so one searchsorted serves all rows.
        keys = rows * (self.n_items + 1) + (excluded.indices.astype(np.int64) - local)
        allowed = self.n_items - counts  # number of non-interacted items per user
        if device is None:
            self.indptr, self._keys, self.allowed, self._searchsorted = indptr, keys, allowed, np.searchsorted
            return
        import torch  # here: the candidate stage needs no torch

        short = np.flatnonzero(allowed < 1)
        if len(short):
            raise PipelineError(f"user index {short[0]} (and {len(short) - 1} more) interacted with every item: "
                                "there is no negative to sample")
        self.indptr, self._keys, self.allowed = (torch.from_numpy(a).to(device) for a in (indptr, keys, allowed))
        self._searchsorted = torch.searchsorted

    def rank_to_item(self, users, ranks):
        """Return the ranks[j]-th non-interacted item of users[j] (users broadcast against ranks).

        numpy arrays without a device, tensors on it with one."""
        if ranks.ndim == 2 and users.ndim == 1:
            users = users[:, None]
        query = users * (self.n_items + 1) + ranks
        below = self._searchsorted(self._keys, query, side="right") - self.indptr[users]
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

    def draw(self, users, per_user: int, gen):
        """Tensors, on the device: [len(users), per_user] items, each uniform over the user's complement."""
        import torch

        allowed = self.allowed[users][:, None]
        uniform = torch.rand((len(users), per_user), generator=gen, device=users.device, dtype=torch.float64)
        return self.rank_to_item(users, torch.minimum((uniform * allowed).long(), allowed - 1))


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
