"""On-disk formats shared by the stages: the split, the candidate lists, the id maps."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

from pipeline.common import PipelineError, atomic_output

if TYPE_CHECKING:  # pandas is imported where it is used: the training stages never need it (0.2 s)
    import pandas as pd

TRAIN_FILE = "train.npz"  # scipy CSR [n_users x n_items], 1.0 where the user interacted in train
TRAIN_ORDER_FILE = "train_order.npy"  # the train CSR's items per user (same indptr), oldest first
VAL_FILE = "heldout_val.npz"  # the validation (user, item) pairs, one per evaluated user
TEST_FILE = "heldout_test.npz"  # the test pairs: a file of their own, which a search never opens
USERS_FILE = "users.csv"  # user_index -> original MovieLens user_id
ITEMS_FILE = "items.csv"  # item_index -> original MovieLens movie_id and title
RECENT_FILE = "recent.npz"  # each user's latest interactions (any split), for showing a person's history
RECENT_PER_USER = 5


@dataclass
class History:
    """What each user is known to have interacted with: a binary users x items CSR, and the same
    interactions in time order (user u's items are items[indptr[u]:indptr[u + 1]], oldest first)."""

    matrix: sp.csr_matrix
    indptr: np.ndarray
    items: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return self.matrix.shape


def matrix_of(history: "History | sp.csr_matrix") -> sp.csr_matrix:
    """The binary CSR of a History (or the matrix itself): for models that do not need the order."""
    return history.matrix if isinstance(history, History) else history


@dataclass
class Split:
    """Leave-one-out split with 0-based contiguous ids: train matrix plus held-out pairs."""

    train: sp.csr_matrix
    val_users: np.ndarray
    val_items: np.ndarray
    test_users: np.ndarray | None  # None when loaded without the test pairs (load_split(test=False))
    test_items: np.ndarray | None
    recent: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # (users, items, timestamps), by user then time
    train_order: np.ndarray | None = None  # train.indices in time order within each user (see TRAIN_ORDER_FILE)

    @property
    def n_users(self) -> int:
        return self.train.shape[0]

    @property
    def n_items(self) -> int:
        return self.train.shape[1]

    def all_interactions(self) -> sp.csr_matrix:
        """Return a binary CSR of every train, validation and test interaction (sorted indices)."""
        return self._with(np.concatenate([self.val_users, self.test_users]),
                          np.concatenate([self.val_items, self.test_items]))

    def train_and_val(self) -> sp.csr_matrix:
        """Return a binary CSR of the train and validation interactions: everything before the test item."""
        return self._with(self.val_users, self.val_items)

    def history(self, val: bool, test: bool = False) -> History:
        """The train interactions, plus each user's validation (and test) item, as a History.

        In time order the validation item comes after the user's train items, the test item last."""
        if self.train_order is None:
            raise PipelineError("data/prepared has no train_order.npy (written by an older build_matrix); "
                                "run `dvc repro` to rebuild it")
        users = [u for u, on in ((self.val_users, val), (self.test_users, test)) if on]
        items = [i for i, on in ((self.val_items, val), (self.test_items, test)) if on]
        matrix = self._with(np.concatenate([np.zeros(0, np.int64), *users]),
                            np.concatenate([np.zeros(0, np.int64), *items]))
        counts = np.diff(self.train.indptr).astype(np.int64)
        extra = [np.bincount(u, minlength=self.n_users) for u in users]
        indptr = np.concatenate([[0], np.cumsum(counts + sum(extra, np.zeros(self.n_users, np.int64)))])
        ordered = np.empty(indptr[-1], dtype=np.int64)
        owner = np.repeat(np.arange(self.n_users), counts)
        ordered[indptr[owner] + np.arange(len(owner)) - self.train.indptr[owner]] = self.train_order
        after = counts.copy()  # the next free position within each user's row, past the train items
        for held_users, held_items in zip(users, items):
            ordered[indptr[held_users] + after[held_users]] = held_items
            after[held_users] += 1
        return History(matrix, indptr, ordered)

    def _with(self, rows: np.ndarray, cols: np.ndarray) -> sp.csr_matrix:
        """The train matrix plus the (rows, cols) interactions, binary, with sorted indices."""
        extra = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=self.train.shape)
        both = (self.train + extra).tocsr()
        both.data[:] = 1.0
        both.sort_indices()
        return both


@dataclass
class Candidates:
    """Ranking candidates: items[:, 0] is each user's held-out item, the rest sampled negatives."""

    users: np.ndarray  # (m,)
    items: np.ndarray  # (m, 1 + negatives)


def _need(path: Path) -> Path:
    if not path.exists():
        raise PipelineError(f"{path}: not found; run the stage that produces it first (dvc repro)")
    return path


def save_split(out_dir: Path, split: Split, users: "pd.DataFrame", items: "pd.DataFrame") -> None:
    """Write the split and id maps into out_dir as one atomic directory."""
    with atomic_output(out_dir, is_dir=True) as tmp:
        sp.save_npz(tmp / TRAIN_FILE, split.train.tocsr(), compressed=False)  # faster to write and read
        if split.train_order is not None:
            np.save(tmp / TRAIN_ORDER_FILE, split.train_order.astype(np.int32))
        np.savez_compressed(tmp / VAL_FILE, users=split.val_users, items=split.val_items)
        np.savez_compressed(tmp / TEST_FILE, users=split.test_users, items=split.test_items)
        if split.recent is not None:
            r_users, r_items, r_times = split.recent
            np.savez(tmp / RECENT_FILE, users=r_users, items=r_items, timestamps=r_times)
        users.to_csv(tmp / USERS_FILE, index=False, lineterminator="\n")
        items.to_csv(tmp / ITEMS_FILE, index=False, lineterminator="\n")


def load_split(prepared_dir: str | Path, test: bool = True) -> Split:
    """Read the split written by build_matrix; with `test` False, without opening the test pairs
    (test_users and test_items are None: what a hyperparameter search may read)."""
    prepared_dir = Path(prepared_dir)
    train = sp.load_npz(_need(prepared_dir / TRAIN_FILE)).tocsr()
    train.sort_indices()
    order_path = prepared_dir / TRAIN_ORDER_FILE
    order = np.load(order_path).astype(np.int64) if order_path.exists() else None
    with np.load(_need(prepared_dir / VAL_FILE)) as z:
        val_users, val_items = z["users"], z["items"]
    test_users = test_items = None
    if test:
        with np.load(_need(prepared_dir / TEST_FILE)) as z:
            test_users, test_items = z["users"], z["items"]
    return Split(train, val_users, val_items, test_users, test_items, train_order=order)


def load_recent(prepared_dir: str | Path) -> "pd.DataFrame":
    """Return user_index, item_index, timestamp of each user's latest interactions, oldest first."""
    import pandas as pd
    with np.load(_need(Path(prepared_dir) / RECENT_FILE)) as z:
        return pd.DataFrame({"user_index": z["users"], "item_index": z["items"], "timestamp": z["timestamps"]})


def load_id_maps(prepared_dir: str | Path) -> tuple["pd.DataFrame", "pd.DataFrame"]:
    """Return the (users, items) id maps written by build_matrix."""
    import pandas as pd
    prepared_dir = Path(prepared_dir)
    users = pd.read_csv(_need(prepared_dir / USERS_FILE))
    items = pd.read_csv(_need(prepared_dir / ITEMS_FILE), keep_default_na=False)
    return users, items


def save_candidates(path: Path, cands: Candidates) -> None:
    """Write one candidate set (validation or test) atomically; int32, uncompressed (fast at 20M)."""
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, users=cands.users.astype(np.int32), items=cands.items.astype(np.int32))


def load_candidates(path: str | Path) -> Candidates:
    """Read a candidate set written by sample_negatives."""
    with np.load(_need(Path(path))) as z:
        return Candidates(z["users"].astype(np.int64), z["items"].astype(np.int64))
