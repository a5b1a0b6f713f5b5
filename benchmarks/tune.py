"""Trials per minute of `python -m pipeline.tune` on ml-100k: MF and the MLP, with and without pruning.

    MOVIELENS_MIRROR=../shared/data python benchmarks/tune.py              # from the repository root
    python benchmarks/tune.py --json benchmarks/tune.json --workers 2 --mf-trials 30 --mlp-trials 10

In a fresh copy of the working tree (a new git repository) after `dvc repro`, it times each search
as a user runs it, every one in a study of its own: MF with
the median pruner and with none, then the MLP likewise. Goal: 30 MF trials in at most 5 minutes on
a 2-core machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workspace import REPO, fresh_copy, run  # noqa: E402

GOAL = {"model": "mf", "trials": 30, "seconds": 300.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks/tune.json")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--mf-trials", type=int, default=30)
    parser.add_argument("--mlp-trials", type=int, default=10, help="0: MF only")
    parser.add_argument("--here", action="store_true",
                        help="search in this repository (after its `dvc repro`), not in a fresh copy")
    args = parser.parse_args()
    result: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
                    "workers": args.workers, "runs": []}
    with tempfile.TemporaryDirectory(prefix="tune-bench-") as scratch:
        root = REPO
        if not args.here:
            root = fresh_copy(Path(scratch) / "repo")
            run("dvc repro", root)
            run("git add -A && git commit -q -m results", root)
        stamp = int(time.time())  # a study of its own each run
        for model, trials in (("mf", args.mf_trials), ("mlp", args.mlp_trials)):
            if not trials:
                continue
            for pruner in ("median", "none"):
                study = f"bench-{model}-{pruner}-{stamp}"
                seconds, out = run(f"python -m pipeline.tune {model} --trials {trials} --workers {args.workers} "
                                   f"--pruner {pruner} --study {study}", root)
                finished = re.search(r"(\d+) finished trials \((\d+) complete, (\d+) pruned", out)
                best = re.search(r"validation HR@\d+ ([\d.]+)", out)
                row = {"model": model, "pruner": pruner, "trials": int(finished.group(1)),
                       "pruned": int(finished.group(3)), "seconds": round(seconds, 1),
                       "trials_per_minute": round(60 * int(finished.group(1)) / seconds, 1),
                       "best_val_hr": float(best.group(1))}
                result["runs"].append(row)
                print(f"{model} ({pruner} pruner): {row['trials']} trials ({row['pruned']} pruned) in "
                      f"{seconds:.0f} s: {row['trials_per_minute']} trials/min; best validation HR {row['best_val_hr']}",
                      file=sys.stderr)
    mf = [r for r in result["runs"] if r["model"] == GOAL["model"] and r["trials"] >= GOAL["trials"]]
    result["goal"] = {**GOAL, "measured_s": min((r["seconds"] for r in mf), default=None),
                      "met": any(r["seconds"] <= GOAL["seconds"] for r in mf)}
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["goal"]))


if __name__ == "__main__":
    main()
