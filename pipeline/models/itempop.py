"""ItemPop: an item's number of train interactions, whoever the user is (the seed notebook's baseline)."""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import scipy.sparse as sp
import torch

from pipeline.data import History
from pipeline.models import Model


class ItemPop(Model):
    """Scores an item by its number of train interactions, whoever the user is."""

    label = "ItemPop"
    neural = False
    always_trained = True
    baseline = True

    def __init__(self, counts: np.ndarray):
        self.counts = np.asarray(counts)

    @staticmethod
    def fit(train: sp.csr_matrix, section: dict) -> dict[str, torch.Tensor]:
        """Return the checkpoint: each item's interaction count in `train`."""
        return {"counts": torch.from_numpy(np.bincount(train.indices, minlength=train.shape[1]).astype(np.int64))}

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor], history: History) -> "ItemPop":
        return cls(state["counts"].numpy())

    @property
    def n_items(self) -> int:
        return len(self.counts)

    def score(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Return popularity counts shaped like `items` (users are ignored)."""
        return self.counts[items].astype(np.float64)

    def score_all(self, users: np.ndarray) -> torch.Tensor:
        """The counts of every item, one row per user (a broadcast view, no copy)."""
        return torch.from_numpy(self.counts.astype(np.float32)).expand(len(users), len(self.counts))


MODEL = ItemPop
