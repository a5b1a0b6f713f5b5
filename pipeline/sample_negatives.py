"""Stage `sample_negatives`: fixed ranking candidates for validation and test.

For every evaluated user, `test_negatives` distinct items the user never interacted with (in train,
validation or test), drawn once for validation and once for test from generators seeded by
`candidate_seed` (not `seed`, which seeds training: runs of other training seeds share candidates).
Every model is scored on exactly these candidates, so metrics compare like with like.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from pipeline.common import PipelineError, run_stage
from pipeline.data import Candidates, load_id_maps, load_split, save_candidates
from pipeline.params import load_params
from pipeline.sampling import ComplementSampler, TooFewItemsError

log = logging.getLogger("sample_negatives")

VAL_STREAM, TEST_STREAM = 0, 1  # independent random streams derived from `candidate_seed`


def candidates(sampler: ComplementSampler, users: np.ndarray, heldout: np.ndarray,
               k: int, rng: np.random.Generator) -> Candidates:
    """Return each user's held-out item followed by k sampled distinct negatives."""
    negatives = sampler.sample_distinct(rng, users, k)
    return Candidates(users, np.concatenate([heldout[:, None], negatives], axis=1))


def main() -> None:
    parser = argparse.ArgumentParser(description="Sample validation and test candidates.")
    parser.add_argument("prepared_dir", type=Path)
    parser.add_argument("out_dir", type=Path, help="directory to write val.npz and test.npz into")
    args = parser.parse_args()
    params = load_params(models=())
    seed, k = params["candidate_seed"], params["test_negatives"]
    split = load_split(args.prepared_dir)
    sampler = ComplementSampler(split.all_interactions())
    try:
        val = candidates(sampler, split.val_users, split.val_items, k, np.random.default_rng([seed, VAL_STREAM]))
        test = candidates(sampler, split.test_users, split.test_items, k, np.random.default_rng([seed, TEST_STREAM]))
    except TooFewItemsError as err:
        users, _ = load_id_maps(args.prepared_dir)
        shown = ", ".join(f"user {users.user_id[u]} ({a} items)" for u, a in zip(err.users[:10], err.available[:10]))
        raise PipelineError(
            f"test_negatives = {k}, but {len(err.users)} user(s) have fewer non-interacted items than "
            f"that: {shown}{' ...' if len(err.users) > 10 else ''}. Lower test_negatives in params.yaml "
            f"to at most {int(sampler.allowed[err.users].min())}."
        ) from None
    args.out_dir.mkdir(parents=True, exist_ok=True)
    save_candidates(args.out_dir / "val.npz", val)
    save_candidates(args.out_dir / "test.npz", test)
    log.info("%d validation and %d test users, %d negatives each", len(val.users), len(test.users), k)


if __name__ == "__main__":
    run_stage(main)
