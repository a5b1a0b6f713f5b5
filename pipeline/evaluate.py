"""Stage `evaluate`: every model in `models`, on the same test users, by two protocols.

Sampled: each user's held-out test item ranked against its `test_negatives` sampled candidates
(HR@topK, NDCG@topK, MRR). Full: the held-out item ranked against every item the user has not
interacted with in train or validation (HR@topK, NDCG@topK, MRR), scored in batches of users with
tensor operations. In both, an equal score ranks the held-out item below the other item
(pessimistic ties, as in the seed notebook).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from pipeline.common import THREADS, PipelineError, atomic_output, run_stage, write_json
from pipeline.data import load_candidates, load_split
from pipeline.metrics import full_ranks, heldout_rank, hit_ratio, hit_ratio_curve, mrr, ndcg
from pipeline.models import full_scores, load_model
from pipeline.params import load_params

log = logging.getLogger("evaluate")

CURVE_MAX_K = 20


def seen_items(split) -> sp.csr_matrix:
    """Train plus validation interactions: what full ranking leaves out for each test user."""
    val = sp.csr_matrix((np.ones(len(split.val_users), np.float32), (split.val_users, split.val_items)),
                        shape=split.train.shape)
    return (split.train + val).tocsr()


def evaluate_model(name: str, model, test, seen: sp.csr_matrix, k: int) -> tuple[dict, np.ndarray]:
    """Return ({hr, ndcg, mrr, full: {hr, ndcg, mrr}}, sampled ranks) for one model."""
    scores = model.score(test.users, test.items)
    if np.isnan(scores).any():
        raise PipelineError(f"model {name} produced NaN scores; retrain it")
    if np.ptp(scores) == 0:
        log.warning("%s gives every candidate the same score: the model has collapsed (too much weight_decay?)", name)
    ranks = heldout_rank(scores)
    full = full_ranks(full_scores(model, seen.shape[1]), test.users, test.items[:, 0], seen)
    result = {"hr": round(hit_ratio(ranks, k), 6), "ndcg": round(ndcg(ranks, k), 6), "mrr": round(mrr(ranks), 6),
              "full": {"hr": round(hit_ratio(full, k), 6), "ndcg": round(ndcg(full, k), 6),
                       "mrr": round(mrr(full), 6)}}
    return result, ranks


def main() -> None:
    parser = argparse.ArgumentParser(description="Score every model on the test users.")
    parser.add_argument("prepared_dir", type=Path)
    parser.add_argument("candidates_dir", type=Path)
    parser.add_argument("models_dir", type=Path, help="holds <model>.pt for each model in `models`")
    parser.add_argument("metrics_out", type=Path, help="test metrics (.json)")
    parser.add_argument("curve_dir", type=Path, help="sampled HR@K for K = 1..20: <model>.csv (k, hr) per model")
    args = parser.parse_args()
    params = load_params()
    k = params["topK"]
    torch.set_num_threads(THREADS)
    split = load_split(args.prepared_dir)
    test = load_candidates(args.candidates_dir / "test.npz")
    metrics: dict = {"k": k}
    curves = {}
    seen = seen_items(split)
    for name in params["models"]:
        model = load_model(name, args.models_dir / f"{name}.pt", split.train)
        metrics[name], ranks = evaluate_model(name, model, test, seen, k)
        curves[name] = hit_ratio_curve(ranks, CURVE_MAX_K)
        m = metrics[name]
        log.info("%s: sampled HR@%d %.4f, NDCG %.4f; full HR@%d %.4f, NDCG %.4f, MRR %.4f",
                 name, k, m["hr"], m["ndcg"], k, m["full"]["hr"], m["full"]["ndcg"], m["full"]["mrr"])
    write_json(args.metrics_out, metrics)
    # One file per model, so that DVC's plot of them never names a model that was not evaluated.
    with atomic_output(args.curve_dir, is_dir=True) as tmp:
        for name, curve in curves.items():
            rows = "".join(f"{i + 1},{v:.6f}\n" for i, v in enumerate(curve))
            (tmp / f"{name}.csv").write_text("k,hr\n" + rows, encoding="utf-8")

if __name__ == "__main__":
    run_stage(main)
