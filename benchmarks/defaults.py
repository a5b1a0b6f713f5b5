"""Validation metrics of one model over a grid of its knobs: how the params.yaml defaults were chosen.

    python benchmarks/defaults.py MODEL KEY=V1,V2 [KEY=V1,V2 ...] [--jobs 2]

Run after `dvc repro` (it reads data/prepared and data/candidates). Every combination trains MODEL
with the other params from params.yaml (`refit` off: only validation is read, never the test
users) and prints one line per run: the knobs, the chosen epoch, and validation HR@K and NDCG@K by
the sampled candidates and by full ranking. A fused model (NeuMF) reads its sources' train-only
checkpoints from data/models.
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import yaml  # noqa: E402


def run(name: str, overrides: dict) -> str:
    import torch

    from pipeline.common import configure_torch
    from pipeline.data import load_candidates, load_split
    from pipeline.models import get
    from pipeline.params import validate
    from pipeline.train import train_closed_form, train_neural
    from pipeline.training import Validation

    configure_torch()
    torch.set_num_threads(1)
    raw = yaml.safe_load(Path("params.yaml").read_text())
    section = raw if get(name).top_level else raw[name]
    section.update(overrides)
    raw["refit"] = False
    params = validate(raw, "params.yaml (with the grid's values)", models=(name,))
    split = load_split(Path("data/prepared"))
    val = Validation.of(load_candidates(Path("data/candidates/val.npz")), split.train, params["full_rank_users"],
                        params["candidate_seed"])
    start = time.perf_counter()
    if get(name).neural:
        _, _, curve, best = train_neural(name, split, val, params, torch.device("cpu"), Path("data/models"))
    else:
        _, _, curve, best = train_closed_form(name, split, val, params)
    row = curve[best - 1]
    knobs = " ".join(f"{k}={v}" for k, v in overrides.items())
    return (f"{name} {knobs:<40} epoch {best:>3}/{len(curve):<3} val HR {row.val_hr:.4f} NDCG {row.val_ndcg:.4f} | "
            f"full HR {row.val_full_hr:.4f} NDCG {row.val_full_ndcg:.4f}  ({time.perf_counter() - start:.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("grid", nargs="+", help="KEY=V1,V2,...")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    keys, values = [], []
    for item in args.grid:
        key, _, text = item.partition("=")
        keys.append(key)
        values.append([yaml.safe_load(v) for v in text.split(",")])  # as YAML reads params.yaml
    combos = [dict(zip(keys, combo)) for combo in itertools.product(*values)]
    with ProcessPoolExecutor(args.jobs) as pool:
        for line in pool.map(run, [args.model] * len(combos), combos):
            print(line, flush=True)


if __name__ == "__main__":
    main()
