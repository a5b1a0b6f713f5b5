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
HELDOUT_FILE = "heldout.npz"  # validation and test (user, item) pairs, one per evaluated user
USERS_FILE = "users.csv"  # user_index -> original MovieLens user_id
ITEMS_FILE = "items.csv"  # item_index -> original MovieLens movie_id and title
RECENT_FILE = "recent.npz"  # each user's latest interactions (any split), for showing a person's history
RECENT_PER_USER = 5


@dataclass
class Split:
    """Leave-one-out split with 0-based contiguous ids: train matrix plus held-out pairs."""

    train: sp.csr_matrix
    val_users: np.ndarray
    val_items: np.ndarray
    test_users: np.ndarray
    test_items: np.ndarray
    recent: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # (users, items, timestamps), by user then time

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
        sp.save_npz(tmp / TRAIN_FILE, split.train.tocsr(), compressed=False)  # 5 s less at 20M
        np.savez_compressed(
            tmp / HELDOUT_FILE,
            val_users=split.val_users, val_items=split.val_items,
            test_users=split.test_users, test_items=split.test_items,
        )
        if split.recent is not None:
            r_users, r_items, r_times = split.recent
            np.savez(tmp / RECENT_FILE, users=r_users, items=r_items, timestamps=r_times)
        users.to_csv(tmp / USERS_FILE, index=False, lineterminator="\n")
        items.to_csv(tmp / ITEMS_FILE, index=False, lineterminator="\n")


def load_split(prepared_dir: str | Path) -> Split:
    """Read the split written by build_matrix."""
    prepared_dir = Path(prepared_dir)
    train = sp.load_npz(_need(prepared_dir / TRAIN_FILE)).tocsr()
    train.sort_indices()
    with np.load(_need(prepared_dir / HELDOUT_FILE)) as z:
        return Split(train, z["val_users"], z["val_items"], z["test_users"], z["test_items"])


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
