"""Stage `train@<model>`: train one model of the `models` list and keep its best-validation state.

    python -m pipeline.train MODEL PREPARED_DIR CANDIDATES_DIR MODEL_OUT CURVE_OUT SUMMARY_OUT

MODEL is itempop, mlp, gmf, neumf, mf or ease. The neural ones share one loop
(pipeline.training.fit); ItemPop and EASE are closed-form, so their "curve" is the one row of
their validation metrics. Every model is saved as a dict of tensors, loadable with
torch.load(weights_only=True).
"""
from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from pipeline.common import PipelineError, atomic_output, run_stage, write_json, write_text
from pipeline.data import Candidates, load_candidates, load_split
from pipeline.models import EASE, GMF, MF, MLP, ItemPop, NeuMF
from pipeline.params import load_params
from pipeline.training import THREADS, EpochStats, FitConfig, curve_csv, evaluate_ranking, fit, pick_device

log = logging.getLogger("train")


def config(section: dict, seed: int, k: int, pretrain: bool = False) -> FitConfig:
    """The loop's settings from one model's section of params.yaml."""
    lr, epochs = (section["pretrain_lr"], section["pretrain_epochs"]) if pretrain else (section["lr"], section["epochs"])
    return FitConfig(seed, lr, section["weight_decay"], epochs, section["batch_size"], section["negatives"], k)


def train_neural(name: str, train: sp.csr_matrix, val: Candidates, params: dict, device: torch.device
                 ) -> tuple[dict, list[EpochStats], int, dict]:
    """Build and train one neural model; return (state, curve, best epoch, extra summary)."""
    n_users, n_items = train.shape
    section, seed, k = params[name], params["seed"], params["topK"]
    extra: dict = {}

    def seeded(make):
        torch.manual_seed(seed)
        return make()

    if name == "mlp":
        model = seeded(lambda: MLP(n_users, n_items, section["layers"], section["dropout"]))
    elif name == "gmf":
        model = seeded(lambda: GMF(n_users, n_items, section["factors"]))
    elif name == "mf":
        model = seeded(lambda: MF(n_users, n_items, section["factors"]))
    elif section["pretrain"]:  # NCF section 3.4.1: train both branches alone, then fuse them
        pre = config(section, seed, k, pretrain=True)
        gmf = seeded(lambda: GMF(n_users, n_items, section["factors"]))
        gmf_state, gmf_curve, gmf_best = fit(gmf, train, val, pre, device, "neumf/gmf")
        mlp = seeded(lambda: MLP(n_users, n_items, section["layers"], section["dropout"]))
        mlp_state, mlp_curve, mlp_best = fit(mlp, train, val, pre, device, "neumf/mlp")
        gmf.load_state_dict(gmf_state)
        mlp.load_state_dict(mlp_state)
        model = NeuMF.from_pretrained(gmf.cpu(), mlp.cpu())
        extra = {"pretrained": {
            "gmf": {"best_epoch": gmf_best, "val_hr": round(gmf_curve[gmf_best - 1].val_hr, 6)},
            "mlp": {"best_epoch": mlp_best, "val_hr": round(mlp_curve[mlp_best - 1].val_hr, 6)}}}
        torch.manual_seed(seed)
    else:
        model = seeded(lambda: NeuMF(n_users, n_items, section["factors"], section["layers"], section["dropout"]))
    state, curve, best = fit(model, train, val, config(section, seed, k), device, name)
    return state, curve, best, extra


def train_closed_form(name: str, train: sp.csr_matrix, val: Candidates, params: dict
                      ) -> tuple[dict, list[EpochStats], int, dict]:
    """Fit ItemPop or EASE; its one-row curve holds the validation metrics."""
    if name == "itempop":
        counts = np.bincount(train.indices, minlength=train.shape[1]).astype(np.int64)
        state, model = {"counts": torch.from_numpy(counts)}, ItemPop(counts)
    else:
        if train.shape[1] > 30_000:
            raise PipelineError(f"ease: {train.shape[1]} items; EASE inverts an items x items matrix, "
                                "which is too large here. Remove ease from 'models' in params.yaml.")
        weights = EASE.fit(train, params["ease"]["lambda"])
        state, model = {"weights": weights}, EASE(weights, train)
    hr, nd = evaluate_ranking(model, val, params["topK"])
    return state, [EpochStats(1, math.nan, hr, nd)], 1, {}


def main() -> None:
    parser = argparse.ArgumentParser(description="Train one model.")
    parser.add_argument("model", choices=["itempop", "mlp", "gmf", "neumf", "mf", "ease"])
    parser.add_argument("prepared_dir", type=Path)
    parser.add_argument("candidates_dir", type=Path)
    parser.add_argument("model_out", type=Path, help="best-validation state (.pt, tensors only)")
    parser.add_argument("curve_out", type=Path, help="per-epoch training curve (.csv)")
    parser.add_argument("summary_out", type=Path, help="best epoch and its validation metrics (.json)")
    args = parser.parse_args()
    params = load_params()
    torch.set_num_threads(THREADS)
    split = load_split(args.prepared_dir)
    val = load_candidates(args.candidates_dir / "val.npz")
    start = time.perf_counter()
    if args.model in ("itempop", "ease"):
        state, curve, best, extra = train_closed_form(args.model, split.train, val, params)
    else:
        device = pick_device(params["device"])
        log.info("training %s on %s", args.model, device)
        state, curve, best, extra = train_neural(args.model, split.train, val, params, device)
    seconds = time.perf_counter() - start
    row = curve[best - 1]
    with atomic_output(args.model_out) as tmp, open(tmp, "wb") as fh:
        torch.save(state, fh)  # a file object: torch names the archive after a path, not the bytes
    write_text(args.curve_out, curve_csv(curve))
    write_json(args.summary_out, {"best_epoch": best, "val_hr": round(row.val_hr, 6),
                                  "val_ndcg": round(row.val_ndcg, 6), **extra})
    log.info("%s: best epoch %d of %d: val HR@%d %.4f, NDCG %.4f; trained in %.1f s",
             args.model, best, len(curve), params["topK"], row.val_hr, row.val_ndcg, seconds)


if __name__ == "__main__":
    run_stage(main)
