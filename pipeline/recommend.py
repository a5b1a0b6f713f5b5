"""Stage `recommend`: every user's top `recommend_n` unseen movies, from the model `recommend_model`.

    python -m pipeline.recommend data/prepared data/models data/recommendations.csv   # the stage
    python -m pipeline.recommend --user 196                                          # one person

The stage scores every item for every user in batches, leaves out everything the user has rated
(train, validation and test), and writes user_id, rank, movie_id, title, year, score with the
original MovieLens ids. With --user, it prints that user's list (from the stage's CSV) and, for
context, the five movies the user rated most recently.
"""
from __future__ import annotations

import argparse
import logging
import re
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from pipeline.common import PipelineError, atomic_output, configure_torch, pick_device, run_stage
from pipeline.data import load_id_maps, load_recent, load_split
from pipeline.metrics import seen_cells
from pipeline.models import load_model
from pipeline.params import load_params

log = logging.getLogger("recommend")

YEAR = re.compile(r"\s*\((\d{4})\)\s*$")
DEFAULT_CSV = Path("data/recommendations.csv")


def split_year(titles: pd.Series) -> tuple[pd.Series, pd.Series]:
    """Split 'Heat (1995)' into ('Heat', '1995'); a title without a year keeps year ''."""
    years = titles.str.extract(YEAR, expand=False).fillna("")
    return titles.str.replace(YEAR, "", regex=True), years


def top_n(score_all, users: np.ndarray, seen: sp.csr_matrix, n: int, batch_elements: int = 4_000_000
          ) -> tuple[np.ndarray, np.ndarray]:
    """Return (items, scores), each [len(users), n]: best unseen items first, ties by item index."""
    n_items = seen.shape[1]
    n = min(n, n_items)
    items_out = np.empty((len(users), n), dtype=np.int64)
    scores_out = np.empty((len(users), n), dtype=np.float64)
    step = max(1, batch_elements // max(n_items, 1))
    for lo in range(0, len(users), step):
        u = users[lo:lo + step]
        scores = score_all(u).clone().double()
        scores[seen_cells(seen, u)] = -torch.inf
        # Take a few more than n, then order them by (score desc, item asc): ties are deterministic.
        best = torch.topk(scores, min(n_items, n + 16), dim=1).indices
        picked = torch.gather(scores, 1, best)
        order = np.lexsort((best.numpy(), -picked.numpy()), axis=1)[:, :n]
        items_out[lo:lo + len(u)] = np.take_along_axis(best.numpy(), order, axis=1)
        scores_out[lo:lo + len(u)] = np.take_along_axis(picked.numpy(), order, axis=1)
    return items_out, scores_out


def recommend(prepared: Path, models_dir: Path, name: str, n: int, device: str = "cpu") -> pd.DataFrame:
    """Return the recommendations table for every user (original ids, titles, years, scores)."""
    split = load_split(prepared)
    users_map, items_map = load_id_maps(prepared)
    history = split.history(val=True, test=True)  # recommending: the whole history is known
    seen = history.matrix
    model = load_model(name, models_dir / f"{name}.pt", history, pick_device(device))
    users = np.arange(split.n_users)
    items, scores = top_n(model.score_all, users, seen, n)
    if not np.isfinite(scores).all():
        short = users[~np.isfinite(scores).all(axis=1)]
        raise PipelineError(f"{len(short)} user(s) have fewer than recommend_n = {n} unseen movies "
                            f"(e.g. user {users_map.user_id[short[0]]}); lower recommend_n in params.yaml")
    flat = items.ravel()
    titles, years = split_year(items_map["title"].astype(str))
    return pd.DataFrame({
        "user_id": np.repeat(users_map["user_id"].to_numpy(), items.shape[1]),
        "rank": np.tile(np.arange(1, items.shape[1] + 1), len(users)),
        "movie_id": items_map["movie_id"].to_numpy()[flat],
        "title": titles.to_numpy()[flat],
        "year": years.to_numpy()[flat],
        "score": np.round(scores.ravel(), 6),
    })


def find_user(users_map: pd.DataFrame, user: str) -> int:
    """Return the user's index for an original id given on the command line, or raise naming it."""
    hits = np.flatnonzero((users_map["user_id"].astype(str) == str(user).strip()).to_numpy())
    if len(hits) == 0:
        shown = ", ".join(map(str, users_map["user_id"].iloc[:3]))
        raise PipelineError(f"no user {user!r} in this dataset ({len(users_map)} users, with ids like {shown}, ...)")
    return int(hits[0])


def show_user(user: str, prepared: Path, csv_path: Path, out=sys.stdout) -> None:
    """Print one user's recommendations and five most recent ratings."""
    users_map, items_map = load_id_maps(prepared)
    index = find_user(users_map, user)
    if not csv_path.exists():
        raise PipelineError(f"{csv_path}: not found; run `dvc repro` to make the recommendations")
    recs = pd.read_csv(csv_path, dtype={"user_id": str, "year": str}, keep_default_na=False)
    mine = recs[recs["user_id"] == str(users_map.user_id[index])]
    recent = load_recent(prepared)
    recent = recent[recent["user_index"] == index].iloc[::-1]
    params = load_params(models=())
    print(f"Top {len(mine)} for user {user} (model {params['recommend_model']}):", file=out)
    for row in mine.itertuples():
        year = f" ({row.year})" if row.year else ""
        print(f"{row.rank:3d}. {row.title}{year}   score {row.score:.3f}", file=out)
    print("\nMost recently rated:", file=out)
    for row in recent.itertuples():
        day = datetime.fromtimestamp(int(row.timestamp), tz=timezone.utc).strftime("%Y-%m-%d")
        print(f"     {items_map.title[row.item_index]}   ({day})", file=out)


def main() -> None:
    parser = argparse.ArgumentParser(description="Recommend movies (the stage, or --user for one person).")
    parser.add_argument("paths", nargs="*", type=Path, help="stage: PREPARED_DIR MODELS_DIR OUT_CSV")
    parser.add_argument("--user", help="original user id: print this user's recommendations")
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    parser.add_argument("--recommendations", type=Path, default=DEFAULT_CSV)
    args = parser.parse_args()
    if args.user is not None:
        show_user(args.user, args.prepared, args.recommendations)
        return
    if len(args.paths) != 3:
        parser.error("the stage needs PREPARED_DIR MODELS_DIR OUT_CSV (or use --user ID)")
    prepared, models_dir, out = args.paths
    params = load_params(models=(load_params(models=())["recommend_model"],))  # its own model's knobs too
    configure_torch()
    table = recommend(prepared, models_dir, params["recommend_model"], params["recommend_n"], params["device"])
    with atomic_output(out) as tmp:
        table.to_csv(tmp, index=False, lineterminator="\n")
    log.info("%d recommendations for %d users from %s", len(table), table["user_id"].nunique(),
             params["recommend_model"])


if __name__ == "__main__":
    run_stage(main)
