"""EASE (Steck, WWW 2019): item-item weights in closed form from the Gram matrix; x_u B scores user u."""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import scipy.sparse as sp
import torch

from pipeline.common import PipelineError
from pipeline.data import History, matrix_of
from pipeline.models import Model
from pipeline.params import Search, Spec

EXACT_EASE_ITEMS = 16_384  # EASE inverts in float64 up to this many items (2 GB), in float32 above
MAX_EASE_ITEMS = 40_000  # float32: 6.4 GB for the one items x items matrix


class EASE(Model):
    """EASE (Steck 2019): item-item weights B from the Gram matrix; a user's scores are x_u B."""

    label = "EASE"
    neural = False
    params = {"lambda": Spec("float", 0.0, 1e12, low_open=True, doc="L2 weight on the item-item weights, > 0")}
    search = {"lambda": Search(10.0, 5000.0, log=True)}

    def __init__(self, weights: torch.Tensor, history: History | sp.csr_matrix):
        self.weights = weights  # [n_items, n_items], zero diagonal
        self.history = matrix_of(history).tocsr()

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor], history: History) -> "EASE":
        """EASE with the saved weights, scoring each user from their row of `history`."""
        return cls(state["weights"].float(), history)

    @staticmethod
    def fit(train: sp.csr_matrix, section: dict) -> dict[str, torch.Tensor]:
        """Return the checkpoint: the weights for the `lambda` of the section."""
        if train.shape[1] > MAX_EASE_ITEMS:
            raise PipelineError(f"ease: {train.shape[1]:,} items; EASE inverts an items x items matrix "
                                f"({4 * train.shape[1] ** 2 / 2**30:.1f} GiB in float32), and this pipeline stops at "
                                f"{MAX_EASE_ITEMS:,} items. Remove ease from 'models' in params.yaml, or keep fewer "
                                "items (min_rating, or a custom table of the popular ones).")
        return {"weights": weights_for(train, section["lambda"])}

    @property
    def n_items(self) -> int:
        return self.weights.shape[0]

    def score_all(self, users: np.ndarray) -> torch.Tensor:
        rows = self.history[np.asarray(users)].astype(np.float32)
        return torch.from_numpy(np.asarray(rows @ self.weights.numpy()))

    def score(self, users: np.ndarray, items: np.ndarray, max_gathers: int = 1 << 24) -> np.ndarray:
        """Scores of each user's candidate items: the sum of B[h, c] over the user's history items h.

        Gathers only the candidates' columns (history x candidates per user), not every item's
        score: at ml-20m that is 2 billion gathers instead of 534 billion multiply-adds."""
        users, items = np.asarray(users), np.asarray(items)
        out = torch.zeros(items.shape, dtype=torch.float32)
        rows = self.history[users]
        counts = np.diff(rows.indptr)
        for lo, hi in chunk_bounds(counts * max(items.shape[1], 1), max_gathers):
            owner = torch.from_numpy(np.repeat(np.arange(hi - lo), counts[lo:hi]))
            history = torch.from_numpy(rows.indices[rows.indptr[lo]:rows.indptr[hi]].astype(np.int64))
            candidates = torch.from_numpy(items[lo:hi].astype(np.int64))
            out[lo:hi].index_add_(0, owner, self.weights[history[:, None], candidates[owner]])
        return out.numpy().astype(np.float64)


def weights_for(train: sp.csr_matrix, lam: float) -> torch.Tensor:
    """Return B = I - P / diag(P), P = (X^T X + lam I)^-1, as float32.

    One items x items matrix in memory: the Gram matrix is built in place, Cholesky-factored and
    inverted in place (LAPACK potrf/potri through torch), then scaled in place. In float64 up to
    EXACT_EASE_ITEMS items; above, in float32 (half the memory and time; on ml-100k both give the
    same ranks).
    """
    n = train.shape[1]
    dtype = torch.float64 if n <= EXACT_EASE_ITEMS else torch.float32
    gram = torch.from_numpy(gram_matrix(train, np.float64 if dtype == torch.float64 else np.float32))
    gram.diagonal().add_(lam)
    torch.linalg.cholesky(gram, out=gram)
    torch.cholesky_inverse(gram, out=gram)  # gram now holds P
    scale = gram.diagonal().clone().neg_()
    weights = gram.div_(scale[None, :])
    weights.diagonal().zero_()
    return weights.float()


def chunk_bounds(costs: np.ndarray, budget: int) -> list[tuple[int, int]]:
    """Split 0..len(costs) into consecutive (lo, hi) ranges costing about `budget` each (at least one item)."""
    cumulative = np.cumsum(np.asarray(costs, dtype=np.int64))
    if len(cumulative) == 0:
        return []
    ends = np.searchsorted(cumulative, np.arange(budget, int(cumulative[-1]) + budget, budget), side="right")
    ends = np.unique(np.append(np.clip(ends, 1, len(costs)), len(costs)))
    return list(zip(np.concatenate([[0], ends[:-1]]).tolist(), ends.tolist()))


def gram_matrix(x: sp.csr_matrix, dtype=np.float64, max_entries: int = 1 << 25) -> np.ndarray:
    """X^T X of a binary users x items matrix, dense, a block of rows at a time.

    Rows i0..i1 of the result are X[:, i0:i1]^T X, a sparse product written straight into the dense
    result; a block holds at most about max_entries values, so memory beyond the result stays bounded."""
    x = x.tocsr().astype(dtype)
    x.data[:] = 1
    n = x.shape[1]
    gram = np.zeros((n, n), dtype=dtype)
    by_item = x.T.tocsr()  # items x users
    rows = max(1, max_entries // max(n, 1))
    for lo in range(0, n, rows):
        (by_item[lo:lo + rows] @ x).toarray(out=gram[lo:lo + rows])
    return gram


MODEL = EASE
