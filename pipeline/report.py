"""Stage `report`: metrics/report.md and PNG charts that a person can read without running anything.

    python -m pipeline.report PREPARED_DIR RECOMMENDATIONS_CSV METRICS_DIR REPORT_MD

The report holds the dataset and split sizes, every evaluated model's sampled and full-ranking
metrics with their 95% intervals, each model's paired difference from the reference (the best on
validation) and from ItemPop (with raw and Holm-adjusted p-values and a plain verdict), the charts (training curves per model; test HR@K for K = 1..20), and three example users
(a light, a typical and a heavy rater) with their recent ratings and recommendations. The charts
are drawn with matplotlib (no browser or internet needed, unlike `dvc plots show`).
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from pipeline.common import PipelineError, atomic_output, run_stage, write_text  # noqa: E402
from pipeline.data import load_id_maps, load_recent, load_split  # noqa: E402
from pipeline.models import label  # noqa: E402
from pipeline.params import load_params, trained_models  # noqa: E402
from pipeline.summary import full_ranking_note, metrics_table, significance_tables  # noqa: E402

log = logging.getLogger("report")

PNG_META = {"Software": None}  # no version string in the file: the bytes depend on the data only


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"{path}: not found; run `dvc repro`") from None


def read_curve(live_dir: Path) -> pd.DataFrame:
    """A model's training curve from its DVCLive files: epoch, loss (NaN for a closed-form model) and
    validation HR (sampled)."""
    tsv = live_dir / "plots" / "metrics"
    try:
        curve = pd.read_csv(tsv / "hr.tsv", sep="\t").rename(columns={"step": "epoch", "hr": "val_hr"})
    except FileNotFoundError:
        raise PipelineError(f"{tsv / 'hr.tsv'}: not found; run `dvc repro`") from None
    if not (tsv / "loss.tsv").exists():
        return curve.assign(loss=np.nan)
    return curve.merge(pd.read_csv(tsv / "loss.tsv", sep="\t").rename(columns={"step": "epoch"}), on="epoch")


def save_png(fig, path: Path) -> None:
    """Save a figure atomically as PNG and close it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp, open(tmp, "wb") as fh:
        fig.savefig(fh, format="png", dpi=100, metadata=PNG_META)
    plt.close(fig)


def training_chart(curves: dict[str, pd.DataFrame], k: int, path: Path) -> None:
    """Loss and validation HR@k per epoch for each model (closed-form models as flat lines)."""
    fig, (loss_ax, hr_ax) = plt.subplots(1, 2, figsize=(11, 4))
    longest = max(len(c) for c in curves.values())
    for i, (name, curve) in enumerate(curves.items()):  # colour i: a model's colour in both charts
        shown = label(name)
        if curve["loss"].notna().any():
            loss_ax.plot(curve["epoch"], curve["loss"], marker=".", label=shown, color=f"C{i}")
            hr_ax.plot(curve["epoch"], curve["val_hr"], marker=".", label=shown, color=f"C{i}")
        else:
            hr_ax.plot([1, longest], [curve["val_hr"].iloc[0]] * 2, linestyle="--", label=f"{shown} (closed form)",
                       color=f"C{i}")
    loss_ax.set(title="Training loss (cross-entropy per example)", xlabel="epoch", ylabel="loss")
    hr_ax.set(title=f"Validation HR@{k}", xlabel="epoch", ylabel=f"HR@{k}")
    for ax in (loss_ax, hr_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)


def hr_chart(curves: dict[str, pd.DataFrame], test_negatives: int, path: Path) -> None:
    """Test HR@K for K = 1..20 per model, on the sampled candidates."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, curve) in enumerate(curves.items()):
        ax.plot(curve["k"], curve["hr"], marker=".", label=label(name), color=f"C{i}")
    longest = max(int(c["k"].max()) for c in curves.values())
    ax.set(title=f"Test HR@K (held-out item among {test_negatives} sampled negatives)", xlabel="K",
           ylabel="HR@K", xticks=range(1, longest + 1, 2))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)


def example_users(activity: np.ndarray) -> list[int]:
    """Three users: the 10th percentile, the median and the 90th percentile of activity (by index)."""
    order = np.argsort(activity, kind="stable")
    return [int(order[int(q * (len(order) - 1))]) for q in (0.1, 0.5, 0.9)]


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|")


def user_section(index: int, users_map, items_map, recent: pd.DataFrame, recs: pd.DataFrame, activity: int) -> str:
    user_id = users_map.user_id[index]
    mine = recs[recs["user_id"] == str(user_id)]
    rated = recent[recent["user_index"] == index].iloc[::-1]
    out = [f"### User {user_id} ({activity} ratings)", "", "Most recently rated: " +
           "; ".join(items_map.title[i] for i in rated["item_index"]) + ".", "",
           "| rank | movie | year | score |", "|---:|---|---:|---:|"]
    out += [f"| {r.rank} | {_cell(r.title)} | {r.year} | {r.score:.3f} |" for r in mine.itertuples()]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description="Write metrics/report.md and the PNG charts.")
    parser.add_argument("prepared_dir", type=Path)
    parser.add_argument("recommendations", type=Path)
    parser.add_argument("metrics_dir", type=Path, help="holds intervals.json, hr_at_k/, training/<model>/")
    parser.add_argument("report", type=Path)
    args = parser.parse_args()
    params = load_params()
    bars = _read_json(args.metrics_dir / "intervals.json")
    models = trained_models(params)
    summaries = {m: _read_json(args.metrics_dir / "training" / m / "metrics.json") for m in models}
    curves = {m: read_curve(args.metrics_dir / "training" / m) for m in models}
    plots = args.metrics_dir / "plots"
    training_chart(curves, params["topK"], plots / "training.png")
    hr = {m: pd.read_csv(args.metrics_dir / "hr_at_k" / f"{m}.csv") for m in models}
    hr_chart(hr, params["test_negatives"], plots / "hr_at_k.png")
    split = load_split(args.prepared_dir)
    users_map, items_map = load_id_maps(args.prepared_dir)
    recent = load_recent(args.prepared_dir)
    recs = pd.read_csv(args.recommendations, dtype={"user_id": str, "year": str}, keep_default_na=False)
    activity = np.asarray(split.all_interactions().sum(axis=1)).ravel().astype(int)
    rel = lambda p: p.relative_to(args.report.parent).as_posix()  # noqa: E731
    parts = [
        "# Results", "",
        "Generated by `dvc repro` (stage `report`); do not edit by hand.", "",
        "## Data", "",
        f"Dataset `{params['dataset']}`: {split.n_users:,} users, {split.n_items:,} items, "
        f"{split.train.nnz + len(split.val_users) + len(split.test_users):,} interactions. Leave-one-out by time: "
        f"{split.train.nnz:,} train, {len(split.val_users):,} validation and {len(split.test_users):,} test "
        "interactions (each evaluated user's latest item is the test item, the one before it the validation item).",
        "",
        "## Models on the test users", "",
        f"Sampled: the held-out item ranked among {params['test_negatives']} sampled unseen items. Full: ranked "
        "among every item the user has not interacted with in train or validation. Each model's epoch was "
        f"chosen on validation {params['select_by']} HR@{params['topK']} (`select_by`)" + (", and the model was then "
        "refitted on train + validation, so that it scores the test item knowing everything before it." if
        params["refit"] else " (trained on train only: `refit` is off).") + f" Every number is a mean over "
        f"{bars['users']:,} test users, shown with the half-width of its 95% interval (Wilson for HR, a t interval "
        "for NDCG and MRR)." + (" " + full_ranking_note(bars)).rstrip(), "",
        metrics_table(bars, summaries, params["select_by"]), "",
        "## Which differences are real", "",
        "Each model against the reference and against ItemPop, on the same users: the mean per-user difference in "
        f"HR@{params['topK']} with its 95% interval (of that comparison alone) and the exact McNemar test's p-value. "
        "The reference of each protocol is the model with the best validation HR by that protocol (the train-only "
        "checkpoints on the validation users), never the test set's best. Each column is one family: its p-values "
        "are adjusted by Holm's method, so that the chance of any false verdict in the column is at most 5%; a "
        "verdict (higher or lower) needs an adjusted p below 0.05, and otherwise the two are indistinguishable on "
        "this test set.", "",
        *significance_tables(bars), "",
        f"![Training curves]({rel(plots / 'training.png')})", "",
        f"![Test HR@K]({rel(plots / 'hr_at_k.png')})", "",
        f"## Example recommendations ({params['recommend_model']}, top {params['recommend_n']})", "",
    ]
    for index in example_users(activity):
        parts += [user_section(index, users_map, items_map, recent, recs, int(activity[index])), ""]
    write_text(args.report, "\n".join(parts))
    log.info("wrote %s and 2 charts", args.report)


if __name__ == "__main__":
    run_stage(main)
