"""The results as a person reads them: tables of every model's metrics with 95% intervals.

    python -m pipeline.summary [METRICS_DIR]     # after dvc repro: one row per model, 100 columns

Reads METRICS_DIR/intervals.json (every model's metrics with their 95% intervals and the paired
differences, written by `evaluate`; the point values are also DVC's metrics, METRICS_DIR/test/<model>.json).
The report stage uses the same tables in Markdown.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.common import PipelineError, run_stage
from pipeline.models import label

PROTOCOL_NAMES = {"sampled": "sampled candidates", "full": "full ranking"}


def pm(entry: dict | None, digits: int = 3) -> str:
    """'0.641 ± 0.031' for {'mean', 'lo', 'hi'}; '' when missing."""
    if not entry:
        return ""
    return f"{entry['mean']:.{digits}f} ± {(entry['hi'] - entry['lo']) / 2:.{digits}f}"


def diff_cell(entry: dict | None) -> str:
    """'+0.012 [-0.015, +0.039], p 0.38 (adj. 1)' for a paired difference; '' when missing."""
    if not entry:
        return ""
    return (f"{entry['mean']:+.3f} [{entry['lo']:+.3f}, {entry['hi']:+.3f}], p {entry['p']:.2g} "
            f"(adj. {entry['p_adjusted']:.2g})")


def family_note(bars: dict, protocol: str, key: str) -> str:
    """How many comparisons a column's family holds, and how they are read."""
    n = next((e[protocol][key]["comparisons"] for e in bars["models"].values() if key in e.get(protocol, {})), 0)
    return f"a family of {n} comparisons per column, Holm-adjusted"


def full_ranking_note(bars: dict) -> str:
    """'' when every test user was fully ranked; else how many were (a seeded sample)."""
    if bars.get("full_rank_users", bars["users"]) >= bars["users"]:
        return ""
    return (f"Full ranking: a seeded sample of {bars['full_rank_users']:,} of the {bars['users']:,} test users "
            "(full_rank_users), so its intervals are wider.")


def metrics_table(bars: dict, summaries: dict[str, dict] | None = None, select_by: str = "sampled") -> str:
    """A Markdown table: every model's sampled and full metrics (± 95% half-width), and its validation
    HR by `select_by` with the chosen epoch (from each model's training summary, if given)."""
    k = bars["k"]
    lines = [f"| model | HR@{k} | NDCG@{k} | MRR | full HR@{k} | full NDCG@{k} | full MRR | validation HR@{k} by {select_by} (epoch) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, entry in bars["models"].items():
        s = (summaries or {}).get(name)
        val = ""
        if s:
            val = f"{(s['full'] if select_by == 'full' else s)['hr']:.4f}" + (f" ({s['epoch']})" if "epoch" in s else "")
        cells = [pm(entry.get(p, {}).get(metric)) for p in ("sampled", "full") for metric in ("hr", "ndcg", "mrr")]
        lines.append(f"| {label(name)} | " + " | ".join(cells) + f" | {val} |")
    return "\n".join(lines)


def significance_tables(bars: dict) -> list[str]:
    """Markdown: per protocol, each model's paired HR@k difference from the reference (chosen on
    validation) and from ItemPop, with Holm-adjusted verdicts per column."""
    k, out = bars["k"], []
    for protocol, title in PROTOCOL_NAMES.items():
        ref = bars["reference"][protocol]
        out += [f"**{title.capitalize()}** (reference: {label(ref)}, the best validation HR@{k} by {title}; "
                f"{family_note(bars, protocol, 'vs_reference')})", "",
                f"| model | HR@{k} − {label(ref)} [95%], p (adjusted) | verdict | HR@{k} − ItemPop [95%], p "
                "(adjusted) | verdict |", "|---|---|---|---|---|"]
        for name, entry in bars["models"].items():
            cells = []
            for key in ("vs_reference", "vs_itempop"):
                diff = entry[protocol].get(key, {}).get("hr")
                cells += [diff_cell(diff), diff["verdict"] if diff else "(itself)"]
            out.append(f"| {label(name)} | " + " | ".join(cells) + " |")
        out.append("")
    return out


def terminal_table(bars: dict) -> str:
    """Plain text, at most 100 columns: a row per model, sampled and full HR@k and NDCG@k ± 95%."""
    k = bars["k"]
    head = [f"HR@{k}", f"NDCG@{k}", f"full HR@{k}", f"full NDCG@{k}"]
    rows = [["model", *head]]
    for name, entry in bars["models"].items():
        rows.append([label(name)] + [pm(entry.get(p, {}).get(metric)) for p in ("sampled", "full")
                                     for metric in ("hr", "ndcg")])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    refs = ", ".join(f"{label(bars['reference'][p])} ({PROTOCOL_NAMES[p]})" for p in PROTOCOL_NAMES)
    lines += ["", f"{bars['users']:,} test users; ± is the half-width of the 95% interval (Wilson for HR).",
              f"Reference, best by validation HR@{k}: {refs}.",
              "Which differences are real: metrics/report.md. Against another run: python -m pipeline.compare."]
    if full_ranking_note(bars):
        lines.insert(-2, full_ranking_note(bars))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="Print the results table.")
    parser.add_argument("metrics_dir", type=Path, nargs="?", default=Path("metrics"))
    args = parser.parse_args()
    path = args.metrics_dir / "intervals.json"
    try:
        bars = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"{path}: not found; run `dvc repro` first (or `dvc pull` it)") from None
    sys.stdout.write(terminal_table(bars) + "\n")


if __name__ == "__main__":
    run_stage(main)
