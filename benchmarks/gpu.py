"""Training and evaluation throughput on a CUDA GPU, on synthetic-20m (ml-20m's shape), in-process.

    python benchmarks/gpu.py                       # on a machine with a CUDA GPU
    python benchmarks/gpu.py --batch-sizes 2048 65536 --json benchmarks/gpu.json

Generates synthetic-20m in memory (138,493 users, 26,744 items, 20,000,263 interactions; about a
minute on the CPU), builds the leave-one-out split as build_matrix does, then on the GPU times one
epoch of the shared training loop (pipeline.training.fit: negatives drawn and batches cut on the
device) for the MLP and NeuMF with the committed params at each batch size, and prints samples per
second and seconds per epoch; then the sampled and the full-ranking evaluation of the MLP. The
anchor: NVIDIA's NCF (NeuMF on ml-20m, batch 1M, mixed precision) reports about 34M samples/s on one
A100. Exits with status 2 and a one-line note where PyTorch sees no CUDA device.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.build_matrix import build  # noqa: E402
from pipeline.data import Candidates  # noqa: E402
from pipeline.metrics import full_rank_sample  # noqa: E402
from pipeline.metrics import full_ranks, heldout_rank  # noqa: E402
from pipeline.models.gmf import GMF  # noqa: E402
from pipeline.models.mlp import MLP  # noqa: E402
from pipeline.models.neumf import NeuMF  # noqa: E402
from pipeline.params import load_params, model_section  # noqa: E402
from pipeline.sampling import ComplementSampler  # noqa: E402
from pipeline.synthetic import SHAPES, generate  # noqa: E402
from pipeline.training import FitConfig, fit  # noqa: E402


def timed(device: torch.device, work) -> float:
    """Seconds that work() takes, with the GPU's queue drained before and after."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda _: None)
    sync(device)
    start = time.perf_counter()
    work()
    sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[2048, 65536, 1 << 20])
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks/gpu.json")
    parser.add_argument("--check-on-cpu", action="store_true",
                        help="run the same code on the CPU and on synthetic-1m, to check the script (no GPU numbers)")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.check_on_cpu:
        print("benchmarks/gpu.py: PyTorch sees no CUDA device here; nothing measured", file=sys.stderr)
        sys.exit(2)
    device = torch.device("cpu" if args.check_on_cpu else "cuda")
    shape = SHAPES["synthetic-1m" if args.check_on_cpu else "synthetic-20m"]
    params = load_params(REPO / "params.yaml")
    start = time.perf_counter()
    ratings = generate(shape).rename(columns={"userId": "user_id", "movieId": "movie_id"})
    split, _, _ = build(ratings, None)
    print(f"{shape.users:,} users x {shape.items:,} items: {split.train.nnz:,} train interactions, {time.perf_counter() - start:.0f} s",
          file=sys.stderr)
    result = {"gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "none (CPU check)",
              "torch": torch.__version__, "training": []}
    mlp_section, neumf_section = model_section(params, "mlp"), model_section(params, "neumf")
    for batch in args.batch_sizes:
        for name in ("mlp", "neumf"):
            torch.manual_seed(0)
            if name == "mlp":
                model, section = MLP.from_params(split.n_users, split.n_items, mlp_section), mlp_section
            else:
                gmf = GMF.from_params(split.n_users, split.n_items, model_section(params, "gmf"))
                mlp = MLP.from_params(split.n_users, split.n_items, mlp_section)
                model, section = NeuMF.from_pretrained(gmf, mlp, dropout=neumf_section["dropout"]), neumf_section
            cfg = FitConfig.from_section(section, params["seed"], params["topK"])
            cfg.epochs, cfg.batch_size = 1, batch
            seconds = timed(device, lambda: fit(model, split.train, None, cfg, device, name))
            pairs = split.train.nnz * (1 + cfg.negatives)
            row = {"model": name, "batch_size": batch, "negatives": cfg.negatives, "epoch_s": round(seconds, 1),
                   "samples_per_s": round(pairs / seconds)}
            result["training"].append(row)
            print(json.dumps(row), file=sys.stderr)
    # Evaluation of the last MLP: sampled candidates for every test user, full ranking for the sample.
    model = MLP.from_params(split.n_users, split.n_items, mlp_section).to(device).eval()
    sampler = ComplementSampler(split.all_interactions())
    rng = np.random.default_rng(0)
    negatives = sampler.sample_distinct(rng, split.test_users, params["test_negatives"])
    test = Candidates(split.test_users, np.concatenate([split.test_items[:, None], negatives], axis=1))
    result["sampled_eval_s"] = round(timed(device, lambda: heldout_rank(model.score(test.users, test.items))), 1)
    ranked = full_rank_sample(len(test.users), params["full_rank_users"], params["candidate_seed"])
    seen = split.train_and_val()
    result["full_rank_users"] = len(ranked)
    result["full_eval_s"] = round(timed(device, lambda: full_ranks(model.score_all, test.users[ranked],
                                                                   test.items[ranked, 0], seen)), 1)
    if not args.check_on_cpu:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['gpu']}, torch {result['torch']}")
    print("| model | batch | negatives | epoch (s) | samples/s |\n|---|---:|---:|---:|---:|")
    for r in result["training"]:
        print(f"| {r['model']} | {r['batch_size']:,} | {r['negatives']} | {r['epoch_s']} | {r['samples_per_s']:,} |")
    print(f"evaluation: sampled, {len(test.users):,} users: {result['sampled_eval_s']} s; full ranking, "
          f"{len(ranked):,} users x {split.n_items:,} items: {result['full_eval_s']} s")
    print("anchor: NVIDIA's NCF, NeuMF on ml-20m, one A100: about 34M samples/s")


if __name__ == "__main__":
    main()
