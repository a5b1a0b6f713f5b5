"""Stage `build_matrix`: ratings -> contiguous ids, a leave-one-out split by time, the train CSR.

Every rating counts as an interaction. For each user the latest interaction is the test item and
the second latest the validation item; the rest are train. Timestamp ties are broken by a fixed
hash of (user id, movie id) (`tie_break_key`): an arbitrary but reproducible order that does not
depend on the order of lines in the file, nor favour old or new movies the way ordering by movie
id would (ordering ties by the larger id drops ItemPop's test HR@10 on ml-100k from 0.40 to 0.31). A (user, movie) pair rated more
than once is kept once, at its latest timestamp. Users with fewer than 3 interactions stay in
train only and are left out of evaluation.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from pipeline.common import PipelineError, run_stage
from pipeline.data import Split, save_split

log = logging.getLogger("build_matrix")

RATING_COLUMNS = ["user_id", "movie_id", "rating", "timestamp"]


def read_ratings(path: Path) -> pd.DataFrame:
    """Read u.data: four tab-separated integers per line (user, movie, rating, timestamp), no header.

    Any malformed line (wrong field count, a blank line, a non-integer) stops with its line number.
    """
    try:
        df = pd.read_csv(path, sep="\t", header=None, dtype=str, keep_default_na=False,
                         skip_blank_lines=False, index_col=False, engine="c")
    except FileNotFoundError:
        raise PipelineError(f"{path}: not found; run the download stage first") from None
    except pd.errors.EmptyDataError:
        raise PipelineError(f"{path}: the file is empty") from None
    except pd.errors.ParserError as err:
        raise PipelineError(f"{path}: malformed ratings ({err})") from None
    if df.shape[1] != len(RATING_COLUMNS):
        raise PipelineError(f"{path}, line 1: expected {len(RATING_COLUMNS)} tab-separated fields "
                            f"({', '.join(RATING_COLUMNS)}), got {df.shape[1]}")
    df.columns = RATING_COLUMNS
    out = {}
    for col in RATING_COLUMNS:
        values = df[col]
        parsed = pd.to_numeric(values, errors="coerce")  # C speed; int64 only if every field is an integer
        if parsed.dtype == np.int64:
            out[col] = parsed
            continue
        bad = ~values.fillna("").str.fullmatch(r"\s*-?\d+\s*")
        if bad.any():
            line = int(np.flatnonzero(bad.to_numpy())[0]) + 1
            shown = values.iloc[line - 1]
            raise PipelineError(f"{path}, line {line}: {col} must be an integer, got "
                                f"{'nothing' if pd.isna(shown) else repr(shown)}")
        out[col] = values.astype(np.int64)
    return pd.DataFrame(out)


def read_titles(path: Path) -> pd.DataFrame:
    """Read u.item (latin-1, '|'-separated) into movie_id and title."""
    try:
        df = pd.read_csv(path, sep="|", header=None, encoding="latin-1", usecols=[0, 1],
                         names=["movie_id", "title"], dtype={"movie_id": np.int64, "title": str},
                         keep_default_na=False)
    except FileNotFoundError:
        raise PipelineError(f"{path}: not found; run the download stage first") from None
    except (ValueError, pd.errors.ParserError) as err:
        raise PipelineError(f"{path}: malformed movie list ({err})") from None
    return df


def tie_break_key(user_ids: np.ndarray, movie_ids: np.ndarray) -> np.ndarray:
    """Return a fixed pseudo-random uint64 per (user id, movie id): splitmix64 of the packed pair."""
    x = ((np.asarray(user_ids).astype(np.uint64) & np.uint64(0xFFFFFFFF)) << np.uint64(32)) | (
        np.asarray(movie_ids).astype(np.uint64) & np.uint64(0xFFFFFFFF))
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def leave_one_out(users: np.ndarray, timestamps: np.ndarray, tie_break: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Return (val_mask, test_mask): each eligible user's second latest and latest interaction.

    Order within a user is by timestamp, then by `tie_break` (larger counts as later). Users with
    fewer than 3 interactions get neither (all their interactions stay in train).
    """
    order = np.lexsort((tie_break, timestamps, users))
    sorted_users = users[order]
    counts = np.bincount(sorted_users)
    ends = np.cumsum(counts)
    from_end = ends[sorted_users] - np.arange(len(order)) - 1  # 0 = latest of its user
    eligible = counts[sorted_users] >= 3
    val_mask = np.zeros(len(order), dtype=bool)
    test_mask = np.zeros(len(order), dtype=bool)
    val_mask[order] = eligible & (from_end == 1)
    test_mask[order] = eligible & (from_end == 0)
    return val_mask, test_mask


def build(ratings: pd.DataFrame, titles: pd.DataFrame) -> tuple[Split, pd.DataFrame, pd.DataFrame]:
    """Map ids to 0..n-1 (sorted by original id), split leave-one-out, build the train CSR."""
    before = len(ratings)
    ratings = (ratings.sort_values(["user_id", "movie_id", "timestamp"], kind="stable")
               .drop_duplicates(["user_id", "movie_id"], keep="last"))
    if len(ratings) < before:
        log.info("dropped %d repeated (user, movie) ratings, keeping the latest of each", before - len(ratings))
    user_ids, users = np.unique(ratings["user_id"].to_numpy(), return_inverse=True)
    movie_ids, items = np.unique(ratings["movie_id"].to_numpy(), return_inverse=True)
    ties = tie_break_key(ratings["user_id"].to_numpy(), ratings["movie_id"].to_numpy())
    val_mask, test_mask = leave_one_out(users, ratings["timestamp"].to_numpy(), ties)
    train_mask = ~(val_mask | test_mask)
    train = sp.csr_matrix(
        (np.ones(int(train_mask.sum()), np.float32), (users[train_mask], items[train_mask])),
        shape=(len(user_ids), len(movie_ids)),
    )
    train.sort_indices()

    def pairs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        order = np.argsort(users[mask], kind="stable")
        return users[mask][order].astype(np.int64), items[mask][order].astype(np.int64)

    split = Split(train, *pairs(val_mask), *pairs(test_mask))
    skipped = len(user_ids) - len(split.test_users)
    if skipped:
        log.info("%d user(s) with fewer than 3 interactions kept in train only, not evaluated", skipped)
    title_of = dict(zip(titles["movie_id"], titles["title"]))
    missing = [int(m) for m in movie_ids if m not in title_of]
    if missing:
        log.warning("%d rated movie(s) have no title in u.item, e.g. %s", len(missing), missing[:5])
    users_df = pd.DataFrame({"user_index": np.arange(len(user_ids)), "user_id": user_ids})
    items_df = pd.DataFrame({"item_index": np.arange(len(movie_ids)), "movie_id": movie_ids,
                             "title": [title_of.get(m, "") for m in movie_ids]})
    return split, users_df, items_df


def main() -> None:
    parser = argparse.ArgumentParser(description="Build the train matrix and leave-one-out split.")
    parser.add_argument("raw_dir", type=Path, help="directory with u.data and u.item")
    parser.add_argument("out_dir", type=Path, help="directory to write the split into")
    args = parser.parse_args()
    ratings = read_ratings(args.raw_dir / "u.data")
    titles = read_titles(args.raw_dir / "u.item")
    split, users, items = build(ratings, titles)
    save_split(args.out_dir, split, users, items)
    log.info("%d users, %d items: %d train, %d validation, %d test interactions",
             split.n_users, split.n_items, split.train.nnz, len(split.val_users), len(split.test_users))


if __name__ == "__main__":
    run_stage(main)
