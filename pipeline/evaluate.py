"""Stage `evaluate`: every trained model, on the same test users, by two protocols, with error bars.

    python -m pipeline.evaluate PREPARED_DIR CANDIDATES_DIR MODELS_DIR METRICS_OUT INTERVALS_OUT CURVE_DIR RANKS_OUT

Sampled: each user's held-out test item ranked against its `test_negatives` sampled candidates
(HR@topK, NDCG@topK, MRR), for every test user. Full: the held-out item ranked against every item
the user has not interacted with in train or validation, scored in batches of users with tensor
operations, for every test user or, above `full_rank_users`, for a fixed sample of that many
(seeded by `candidate_seed`, the same for every model and run; intervals.json names its size). In
both, an equal score ranks the held-out item below the other item (pessimistic ties, as in the
seed notebook). Each model is its test-time checkpoint (refitted on train + validation when
`refit` is on); the models that read a user's history (EASE, SASRec) read everything before the
test item, train and validation, whether or not they were refitted.

Writes METRICS_OUT/<model>.json (each model's test metrics: DVC's metrics), INTERVALS_OUT (95% intervals of every metric,
each model's validation metrics by both protocols, and each model's paired difference from the
reference, the model best on that protocol's validation HR, and from ItemPop, with Holm-adjusted
verdicts per column; see pipeline.stats),
CURVE_DIR/<model>.csv (sampled HR@K for K = 1..20) and RANKS_OUT (every user's sampled and full
rank per model, with what identifies the test set: for `python -m pipeline.compare`).
"""
from __future__ import annotations

import argparse
import hashlib
import logging
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from pipeline.common import PipelineError, atomic_output, configure_torch, pick_device, run_stage, write_json
from pipeline.data import Candidates, load_candidates, load_split
from pipeline.metrics import full_rank_sample, full_ranks, heldout_rank, hit_ratio, hit_ratio_curve, mrr, ndcg, per_user
from pipeline.models import Model, checkpoint_paths, get as get_model, load_model
from pipeline.params import load_params, trained_models
from pipeline.stats import ALPHA, CORRECTION, UNRANKED, adjust, interval, paired, verdict
from pipeline.training import Validation

log = logging.getLogger("evaluate")

CURVE_MAX_K = 20
PROTOCOLS = ("sampled", "full")
def test_set_digest(test: Candidates) -> str:
    """A fingerprint of the test users and their candidate lists: equal digests, comparable runs."""
    digest = hashlib.sha256()
    for array in (test.users, test.items):
        digest.update(np.ascontiguousarray(array, dtype=np.int64).tobytes())
    return digest.hexdigest()


def model_ranks(name: str, model: Model, test: Candidates, seen: sp.csr_matrix, ranked: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Return {'sampled', 'full'}: each test user's 0-based rank of the held-out item, for one model.

    Full ranks are computed for the users at positions `ranked` (default: all); the others get UNRANKED.
    """
    scores = model.score(test.users, test.items)
    if np.isnan(scores).any():
        raise PipelineError(f"model {name} produced NaN scores; retrain it")
    if np.ptp(scores) == 0:
        log.warning("%s gives every candidate the same score: the model has collapsed (too much weight_decay?)", name)
    ranked = np.arange(len(test.users)) if ranked is None else ranked
    full = np.full(len(test.users), UNRANKED, dtype=np.int64)
    full[ranked] = full_ranks(model.score_all, test.users[ranked], test.items[ranked, 0], seen)
    return {"sampled": heldout_rank(scores), "full": full}


def ranked_only(ranks: dict[str, np.ndarray], protocol: str) -> np.ndarray:
    """The ranks of one protocol, without the users it did not rank."""
    r = ranks[protocol]
    return r[r != UNRANKED]


def point_metrics(ranks: dict[str, np.ndarray], k: int) -> dict:
    """One model's metrics/test/<model>.json: {hr, ndcg, mrr, full: {hr, ndcg, mrr}}."""
    def three(r):
        return {"hr": round(hit_ratio(r, k), 6), "ndcg": round(ndcg(r, k), 6), "mrr": round(mrr(r), 6)}
    return {**three(ranks["sampled"]), "full": three(ranked_only(ranks, "full"))}


METRIC_TESTS = {"hr": "exact McNemar test", "ndcg": "paired t-test"}


def choose_reference(validation: dict[str, dict[str, dict[str, float]]], protocol: str) -> str:
    """The model with the best validation HR@k by `protocol` (then NDCG@k; then the first listed)."""
    return max(validation, key=lambda name: (validation[name][protocol]["hr"], validation[name][protocol]["ndcg"]))


def family(values: dict[str, dict[str, np.ndarray]], others: list[str], against: str, metric: str) -> dict:
    """Every model of `others` minus `against` in `metric`, Holm-adjusted over these comparisons."""
    tests = {name: paired(values[name][metric], values[against][metric], binary=metric == "hr") for name in others}
    return adjust(tests)


def intervals(all_ranks: dict[str, dict[str, np.ndarray]], k: int,
              validation: dict[str, dict[str, dict[str, float]]]) -> dict:
    """95% intervals of every metric, and per protocol each model's paired HR@k and NDCG@k difference
    from the reference (the model best on that protocol's validation HR@k) and from the baseline
    (the model whose class says so: ItemPop). Each column of differences (one protocol, one metric,
    one model compared against) is a family whose p-values are Holm-adjusted."""
    values = {name: {p: per_user(ranked_only(r, p), k) for p in PROTOCOLS} for name, r in all_ranks.items()}
    first = next(iter(all_ranks.values()))
    reference = {p: choose_reference(validation, p) for p in PROTOCOLS}
    baseline = next((name for name in values if get_model(name).baseline), None)
    out: dict = {
        "k": k, "users": len(first["sampled"]), "full_rank_users": len(ranked_only(first, "full")),
        "method": {"interval": "95%: Wilson for HR, t interval for NDCG and MRR",
                   "difference": f"HR: {METRIC_TESTS['hr']}; NDCG: {METRIC_TESTS['ndcg']}; interval: the paired "
                                 "95% t interval of that comparison alone",
                   "family": "one column: every other model against one model, in one metric of one protocol",
                   "correction": f"{CORRECTION}: a verdict is 'higher' or 'lower' when its adjusted p < {ALPHA:.2f}",
                   "reference": f"chosen per protocol by validation HR@{k} (then NDCG@{k}) of the train-only "
                                "checkpoints: never by the test users"},
        "reference": reference, "validation": validation, "models": {name: {} for name in values}}
    for p in PROTOCOLS:
        for label, against in (("vs_reference", reference[p]), ("vs_itempop", baseline)):
            if against not in values:
                continue
            others = [name for name in values if name != against]
            for metric in ("hr", "ndcg"):
                for name, diff in family({n: v[p] for n, v in values.items()}, others, against, metric).items():
                    entry = out["models"][name].setdefault(p, {}).setdefault(label, {"model": against,
                                                                                     "comparisons": len(others)})
                    entry[metric] = {**diff.as_dict(), "verdict": verdict(diff)}
    for name, by_protocol in values.items():
        for p, metric_values in by_protocol.items():
            entry = out["models"][name].setdefault(p, {})
            estimates = {metric: interval(v, proportion=metric == "hr").as_dict() for metric, v in metric_values.items()}
            out["models"][name][p] = {**estimates, **entry}
    return out


def validation_metrics(models_dir: Path, names: list[str], split, val: Candidates, params: dict,
                       device) -> dict[str, dict[str, dict[str, float]]]:
    """Each model's train-only checkpoint on the validation users, by both protocols: {name: {protocol: {hr, ndcg}}}."""
    check = Validation.of(val, split.train, params["full_rank_users"], params["candidate_seed"])
    history = split.history(val=False)
    out = {}
    for name in names:
        row = check.measure(load_model(name, checkpoint_paths(models_dir, name)[1], history, device), params["topK"])
        out[name] = {"sampled": {"hr": round(row.val_hr, 6), "ndcg": round(row.val_ndcg, 6)},
                     "full": {"hr": round(row.val_full_hr, 6), "ndcg": round(row.val_full_ndcg, 6)}}
    return out


def save_ranks(path: Path, all_ranks: dict, test: Candidates, params: dict) -> None:
    """Every user's ranks per model and protocol (int32), with what identifies the test set."""
    arrays = {f"{name}/{p}": r[p].astype(np.int32) for name, r in all_ranks.items() for p in PROTOCOLS}
    with atomic_output(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, users=test.users.astype(np.int32), test_items=test.items[:, 0].astype(np.int32),
                 models=np.array(list(all_ranks)), dataset=np.array(params["dataset"]),
                 test_set=np.array(test_set_digest(test)), k=np.array(params["topK"]), **arrays)


def main() -> None:
    parser = argparse.ArgumentParser(description="Score every model on the test users.")
    parser.add_argument("prepared_dir", type=Path)
    parser.add_argument("candidates_dir", type=Path)
    parser.add_argument("models_dir", type=Path, help="holds <model>.pt for every trained model")
    parser.add_argument("metrics_out", type=Path, help="test metrics: <model>.json per model (DVC's metrics)")
    parser.add_argument("intervals_out", type=Path, help="95%% intervals and paired differences (.json)")
    parser.add_argument("curve_dir", type=Path, help="sampled HR@K for K = 1..20: <model>.csv (k, hr) per model")
    parser.add_argument("ranks_out", type=Path, help="per-user ranks of every model (.npz)")
    args = parser.parse_args()
    params = load_params()
    k = params["topK"]
    configure_torch()
    split = load_split(args.prepared_dir)
    test = load_candidates(args.candidates_dir / "test.npz")
    history = split.history(val=True)  # what every model may read of a user: all before the test item
    seen = history.matrix  # full ranking leaves these items out
    device = pick_device(params["device"])  # where the neural models score (the others: the CPU)
    ranked = full_rank_sample(len(test.users), params["full_rank_users"], params["candidate_seed"])
    if len(ranked) < len(test.users):
        log.info("full ranking: a seeded sample of %d of the %d test users (full_rank_users)", len(ranked),
                 len(test.users))
    metrics: dict = {}
    all_ranks = {}
    for name in trained_models(params):
        model = load_model(name, args.models_dir / f"{name}.pt", history, device)
        all_ranks[name] = model_ranks(name, model, test, seen, ranked)
        metrics[name] = m = point_metrics(all_ranks[name], k)
        log.info("%s: sampled HR@%d %.4f, NDCG %.4f; full HR@%d %.4f, NDCG %.4f, MRR %.4f",
                 name, k, m["hr"], m["ndcg"], k, m["full"]["hr"], m["full"]["ndcg"], m["full"]["mrr"])
    save_ranks(args.ranks_out, all_ranks, test, params)
    names = list(all_ranks)
    validation = validation_metrics(args.models_dir, names, split, load_candidates(args.candidates_dir / "val.npz"),
                                    params, device)
    log.info("references (best validation HR@%d): %s", k,
             ", ".join(f"{p} {choose_reference(validation, p)}" for p in PROTOCOLS))
    write_json(args.intervals_out, intervals(all_ranks, k, validation))
    # One file per model (here and below), so that `dvc metrics show` prints a short row per model and
    # DVC never shows a model that was not evaluated.
    with atomic_output(args.metrics_out, is_dir=True) as tmp:
        for name, entry in metrics.items():
            write_json(tmp / f"{name}.json", entry)
    with atomic_output(args.curve_dir, is_dir=True) as tmp:
        for name, ranks in all_ranks.items():
            curve = hit_ratio_curve(ranks["sampled"], CURVE_MAX_K)
            rows = "".join(f"{i + 1},{v:.6f}\n" for i, v in enumerate(curve))
            (tmp / f"{name}.csv").write_text("k,hr\n" + rows, encoding="utf-8")


if __name__ == "__main__":
    run_stage(main)
