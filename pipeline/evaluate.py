"""Stage `evaluate`: HR@topK and NDCG@topK of every model on the same test candidates.

Each user's held-out test item is ranked against its sampled negatives; an equal score ranks the
held-out item below the other candidate (pessimistic ties, as in the seed notebook).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch

from pipeline.common import PipelineError, run_stage, write_json, write_text
from pipeline.data import load_candidates
from pipeline.metrics import heldout_rank, hit_ratio, hit_ratio_curve, ndcg
from pipeline.models import MLP, ItemPop
from pipeline.params import load_params

log = logging.getLogger("evaluate")

CURVE_MAX_K = 20


def load_itempop(path: Path) -> ItemPop:
    """Load the item counts written by train_itempop (no pickles allowed)."""
    try:
        return ItemPop(np.load(path, allow_pickle=False))
    except FileNotFoundError:
        raise PipelineError(f"{path}: not found; run the train_itempop stage first") from None
    except (ValueError, OSError) as err:
        raise PipelineError(f"{path}: not an item-count array ({err})") from None


def load_mlp(path: Path) -> MLP:
    """Load a checkpoint written by train_mlp (weights only, no pickled code)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise PipelineError(f"{path}: not found; run the train_mlp stage first") from None
    except Exception as err:  # torch raises many kinds for a file that is not a checkpoint
        raise PipelineError(f"{path}: not a readable model checkpoint ({type(err).__name__}: {err})") from None
    try:
        return MLP.from_state_dict(state)
    except (ValueError, RuntimeError, TypeError) as err:
        raise PipelineError(f"{path}: not an MLP checkpoint ({err})") from None


def main() -> None:
    parser = argparse.ArgumentParser(description="Score every model on the test candidates.")
    parser.add_argument("candidates_dir", type=Path)
    parser.add_argument("itempop", type=Path, help="item popularity counts (.npy)")
    parser.add_argument("mlp", type=Path, help="MLP checkpoint (.pt)")
    parser.add_argument("metrics_out", type=Path, help="test metrics (.json)")
    parser.add_argument("curve_out", type=Path, help="HR@K for K = 1..20 per model (.csv)")
    parser.add_argument("--models", default="itempop,mlp",
                        help="comma-separated models to score (default: itempop,mlp); the others' files are not read")
    args = parser.parse_args()
    wanted = args.models.split(",")
    if not wanted or set(wanted) - {"itempop", "mlp"}:
        raise PipelineError(f"--models must list itempop and/or mlp, got {args.models!r}")
    k = load_params()["topK"]
    torch.set_num_threads(1)
    test = load_candidates(args.candidates_dir / "test.npz")
    loaders = {"itempop": lambda: load_itempop(args.itempop), "mlp": lambda: load_mlp(args.mlp)}
    models = {name: loaders[name]() for name in loaders if name in wanted}
    metrics: dict = {"k": k}
    curves = {}
    for name, model in models.items():
        scores = model.score(test.users, test.items)
        if np.isnan(scores).any():
            raise PipelineError(f"model {name} produced NaN scores; retrain it")
        ranks = heldout_rank(scores)
        metrics[name] = {"hr": round(hit_ratio(ranks, k), 6), "ndcg": round(ndcg(ranks, k), 6)}
        curves[name] = hit_ratio_curve(ranks, CURVE_MAX_K)
        log.info("%s: HR@%d %.4f, NDCG@%d %.4f", name, k, metrics[name]["hr"], k, metrics[name]["ndcg"])
    write_json(args.metrics_out, metrics)
    lines = ["k," + ",".join(curves)]
    for i in range(CURVE_MAX_K):
        lines.append(f"{i + 1}," + ",".join(f"{curves[m][i]:.6f}" for m in curves))
    write_text(args.curve_out, "\n".join(lines) + "\n")


if __name__ == "__main__":
    run_stage(main)
