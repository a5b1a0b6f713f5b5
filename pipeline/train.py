"""Stages `train_itempop`, `train_mlp`, `train@<model>` and `fuse@<model>`: train one model.

    python -m pipeline.train MODEL PREPARED_DIR CANDIDATES_DIR MODELS_DIR TRAINING_DIR

MODEL is any model of pipeline/models/ (pipeline.models.list_models()). The model is chosen on validation: a neural model
trains for its `epochs` on the train interactions and keeps its best-validation epoch; a closed-form
model (ItemPop, EASE) is fitted on them. With `refit` on, the model that scores the test set is then
fitted again on train plus validation (a neural model from scratch, with the same seed, for the
chosen number of epochs), so it sees each user's history up to, never including, the test item.

Writes MODELS_DIR/MODEL.pt (the model for the test set and recommendations), MODELS_DIR/
MODEL.trainonly.pt (the validation-chosen model, trained on train only) and TRAINING_DIR/MODEL/, a
DVCLive directory: each validated epoch is logged as it ends (plots/metrics/loss.tsv, hr.tsv, ndcg.tsv,
full/hr.tsv, full/ndcg.tsv; one step for a closed-form model), so that `dvc exp show` and DVC's VS
Code extension follow a running stage, and metrics.json, DVCLive's summary, ends as the chosen epoch
and its validation metrics by both protocols (a DVC metric). A fused model (NeuMF) starts from the checkpoints of the models
its class names in `fused_from`, read from MODELS_DIR: the train-only ones for its validated run,
the refitted ones for its refit. Every checkpoint is a dict of tensors: torch.load(weights_only=True).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import math
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from pipeline.common import atomic_output, configure_torch, pick_device, run_stage, write_json
from pipeline.data import Split, load_candidates, load_split
from pipeline.models import Model, checkpoint_paths, get as get_model, list_models, load_state
from pipeline.params import load_params, model_section
from pipeline.training import EpochStats, FitConfig, Validation, fit, fit_and_refit

log = logging.getLogger("train")


class EpochLog:
    """The live log of one model's validated run, through DVCLive: every epoch's loss and validation
    HR@K and NDCG@K by both protocols, written as the epoch ends (the refit logs nothing)."""

    def __init__(self, directory: Path):
        from dvclive import Live  # imports DVC: only the training stages pay for it
        logging.getLogger("dvclive").setLevel(logging.WARNING)  # not its name for the run
        # dvcyaml=None: the stage's outputs in dvc.yaml declare these files; DVCLive never rewrites it
        self.live = Live(dir=str(directory), dvcyaml=None, save_dvc_exp=False, report=None)

    def __call__(self, row: EpochStats) -> None:
        self.live.step = row.epoch
        values = {"loss": row.loss, "hr": row.val_hr, "ndcg": row.val_ndcg, "full/hr": row.val_full_hr,
                  "full/ndcg": row.val_full_ndcg}
        for name, value in values.items():
            if not math.isnan(value):
                self.live.log_metric(name, round(value, 6))
        self.live.next_step()

    def close(self, row: EpochStats, epoch: int | None) -> None:
        """End the log; its summary becomes the chosen epoch's validation metrics (no `step`: it is `epochs`)."""
        self.live.end()
        summary = {"epoch": epoch} if epoch is not None else {}
        summary |= {"hr": round(row.val_hr, 6), "ndcg": round(row.val_ndcg, 6),
                    "full": {"hr": round(row.val_full_hr, 6), "ndcg": round(row.val_full_ndcg, 6)}}
        write_json(self.live.metrics_file, summary)

def build(name: str, split: Split, params: dict, models_dir: Path, refitted: bool) -> Model:
    """A freshly seeded model `name`: initialised at random, or from its sources' checkpoints if fused."""
    cls, section = get_model(name), model_section(params, name)
    torch.manual_seed(params["seed"])
    if not cls.fused_from:
        return cls.from_params(split.n_users, split.n_items, section)
    history = split.history(val=refitted)
    sources = []
    for source in cls.fused_from:
        path = checkpoint_paths(models_dir, source)[0 if refitted else 1]
        sources.append(get_model(source).from_state(load_state(source, path), history))
    return cls.from_sources(sources, section)


def train_neural(name: str, split: Split, val: Validation, params: dict, device: torch.device,
                 models_dir: Path, on_row=None) -> tuple[dict, dict, list[EpochStats], int]:
    """Train a neural model; return (test-time state, train-only state, curve, chosen epoch)."""
    cfg = FitConfig.from_section(model_section(params, name), params["seed"], params["topK"], params["select_by"])

    def make(refitted: bool) -> Model:
        return build(name, split, params, models_dir, refitted)

    train = split.history(val=False)
    if not params["refit"]:
        state, curve, best = fit(make(False), train, val, cfg, device, name, on_row=on_row)
        return state, state, curve, best
    return fit_and_refit(make, train, split.history(val=True), val, cfg, device, name, on_row=on_row)


def train_closed_form(name: str, split: Split, val: Validation, params: dict
                      ) -> tuple[dict, dict, list[EpochStats], int]:
    """Fit a closed-form model; return (test-time state, train-only state, one-row curve, 1).

    With `refit` the fit on train + validation runs in a second thread beside the train-only one (its
    heavy parts, EASE's factorisation, release the GIL). Each thread's torch uses one intra-op thread:
    the same bits.
    """
    cls, section = get_model(name), model_section(params, name)
    with ThreadPoolExecutor(max_workers=1) as pool:
        refit = pool.submit(cls.fit, split.train_and_val(), section) if params["refit"] else None
        state = cls.fit(split.train, section)
        row = val.measure(cls.from_state(state, split.history(val=False)), params["topK"])
        test_state = refit.result() if refit is not None else state
    return test_state, state, [dataclasses.replace(row, epoch=1)], 1


def train_model(name: str, split: Split, val: Validation, params: dict, models_dir: Path, on_row=None
                ) -> tuple[dict, dict, list[EpochStats], int]:
    """Train model `name` as its stage does; return (test-time state, train-only state, curve, chosen epoch).

    The one function that both the training stage and each `pipeline.tune` trial (which sets `refit`
    off, and prunes by raising from `on_row`) call. `on_row(row)` gets each validated epoch's row as it
    ends (a closed-form model's one row)."""
    if get_model(name).neural:
        device = pick_device(params["device"])
        log.info("training %s on %s", name, device)
        return train_neural(name, split, val, params, device, models_dir, on_row)
    result = train_closed_form(name, split, val, params)
    if on_row is not None:
        on_row(result[2][0])
    return result


def save_checkpoint(path: Path, state: dict) -> None:
    with atomic_output(path) as tmp, open(tmp, "wb") as fh:
        torch.save(state, fh)  # a file object: torch names the archive after a path, not the bytes


def main() -> None:
    parser = argparse.ArgumentParser(description="Train one model.")
    parser.add_argument("model", choices=list_models())
    parser.add_argument("prepared_dir", type=Path)
    parser.add_argument("candidates_dir", type=Path)
    parser.add_argument("models_dir", type=Path, help="writes MODEL.pt and MODEL.trainonly.pt here")
    parser.add_argument("training_dir", type=Path, help="writes MODEL/ (DVCLive: the curve and the summary) here")
    args = parser.parse_args()
    name = args.model
    cls = get_model(name)
    params = load_params(models=(name,))
    configure_torch()
    split = load_split(args.prepared_dir)
    val = Validation.of(load_candidates(args.candidates_dir / "val.npz"), split.train, params["full_rank_users"],
                        params["candidate_seed"])
    start = time.perf_counter()
    live_dir = args.training_dir / name
    try:
        epochs = EpochLog(live_dir)
        state, train_only, curve, best = train_model(name, split, val, params, args.models_dir, epochs)
        seconds = time.perf_counter() - start
        row = curve[best - 1]
        test_path, train_only_path = checkpoint_paths(args.models_dir, name)
        save_checkpoint(train_only_path, train_only)
        save_checkpoint(test_path, state)
        epochs.close(row, best if cls.neural else None)
    except BaseException:
        shutil.rmtree(live_dir, ignore_errors=True)  # a log that ends early is no result
        with contextlib.suppress(OSError):
            live_dir.parent.rmdir()  # and no empty TRAINING_DIR it made
        raise
    chosen = f"best epoch {best} of {len(curve)} by {params['select_by']} HR" if cls.neural else "closed form"
    log.info("%s: %s: val HR@%d %.4f, NDCG %.4f; full HR %.4f, NDCG %.4f%s; %.1f s", name, chosen, params["topK"],
             row.val_hr, row.val_ndcg, row.val_full_hr, row.val_full_ndcg,
             "; refitted on train + validation" if params["refit"] else "", seconds)


if __name__ == "__main__":
    run_stage(main)
