"""Time and peak memory of every stage at 100K, 1M and 20M interactions, plus MLP throughput.

Usage, from the repository root with the venv on PATH (MOVIELENS_MIRROR for ml-100k offline):

    python benchmarks/scale.py                       # ml-100k, synthetic-1m, synthetic-20m
    python benchmarks/scale.py --datasets ml-100k    # a subset
    python benchmarks/scale.py --json benchmarks/results.json

Each dataset runs in a scratch copy of params.yaml (the repository's outputs are not touched),
stage by stage with the commands of dvc.yaml (foreach expanded), not through DVC. ml-100k runs the
committed params (every model). At 1M the models are ItemPop, EASE and the MLP for `--mlp-epochs`
epochs (default 1); at 20M ItemPop only (an MLP epoch there is 180M pairs; add it with
--mlp-at-20m). Then the MLP's training throughput is measured at batch sizes 256, 1024 and 4096
with the default layers, split into batching, forward, backward and optimiser time.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.models import MLP  # noqa: E402
from pipeline.training import THREADS, make_optimizer  # noqa: E402

MEASURE = (
    "import resource, subprocess, sys\n"
    "proc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)\n"
    "sys.stderr.write(proc.stderr[-2000:] if proc.returncode else '')\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, proc.returncode)"
)


def expand(stages: dict, models: list[str]) -> list[tuple[str, str]]:
    """Return (stage name, command) in dvc.yaml order, a `foreach: ${models}` stage once per model."""
    out = []
    for name, spec in stages.items():
        if "foreach" in spec:
            out += [(f"{name}@{m}", spec["do"]["cmd"].replace("${item}", m)) for m in models]
        else:
            out.append((name, spec["cmd"]))
    return out


def run_stage(cmd: str, cwd: Path) -> tuple[float, float]:
    """Run one stage command in cwd; return (wall seconds, peak RSS in MiB) of that process alone."""
    argv = shlex.split(cmd)
    argv[0] = sys.executable if argv[0] == "python" else argv[0]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", MEASURE, *argv], cwd=cwd, env=env, stdout=subprocess.PIPE,
                         text=True, check=True).stdout.split()
    seconds = time.perf_counter() - start
    if out[-1] != "0":
        raise SystemExit(f"stage failed: {cmd}")
    return seconds, int(out[-2]) / 1024


def interactions(workdir: Path) -> int:
    from pipeline.data import load_split
    split = load_split(workdir / "data/prepared")
    return int(split.train.nnz + len(split.val_users) + len(split.test_users))


def bench_dataset(name: str, mlp_epochs: int, mlp_at_20m: bool, keep: Path | None) -> dict:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["dataset"] = name
    params["custom_path"] = str(REPO / params["custom_path"])
    if name == "synthetic-1m":
        params["models"] = ["itempop", "ease", "mlp"]
        params["recommend_model"] = "ease"
        params["mlp"]["epochs"] = mlp_epochs
    elif name != "ml-100k":
        params["models"] = ["itempop", "mlp"] if mlp_at_20m else ["itempop"]
        params["recommend_model"] = "itempop"
        params["mlp"]["epochs"] = mlp_epochs
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-{name}-", dir=keep))
    rows = []
    try:
        (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        for stage, cmd in expand(stages, params["models"]):
            seconds, peak = run_stage(cmd, workdir)
            note = ""
            if stage == "train@mlp" and name != "ml-100k":
                note = f"{params['mlp']['epochs']} epoch(s)"
            if stage == "evaluate":
                note = "sampled and full ranking: " + ", ".join(params["models"])
            rows.append({"stage": stage, "seconds": round(seconds, 2), "peak_mib": round(peak), "note": note})
            print(f"  {name} {stage}: {seconds:.1f} s, {peak:.0f} MiB {note}", file=sys.stderr)
        n = interactions(workdir)
    finally:
        if keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return {"dataset": name, "interactions": n, "stages": rows}


def throughput(batch_sizes: list[int], steps: int = 200) -> list[dict]:
    """Samples per second of the MLP training step (default layers, ml-100k-sized tables, 1 thread)."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    torch.set_num_threads(THREADS)
    n_users, n_items = 943, 1682
    out = []
    for batch in batch_sizes:
        torch.manual_seed(0)
        model = MLP(n_users, n_items, params["mlp"]["layers"])
        optimizer = make_optimizer(model, 0.001, 1e-5)
        loss_fn = torch.nn.BCEWithLogitsLoss(reduction="sum")
        n = batch * steps
        users, items = torch.randint(0, n_users, (n,)), torch.randint(0, n_items, (n,))
        labels = torch.randint(0, 2, (n,)).float()
        parts = np.zeros(4)
        start = time.perf_counter()
        for lo in range(0, n, batch):
            t0 = time.perf_counter()
            u, i, y = users[lo:lo + batch], items[lo:lo + batch], labels[lo:lo + batch]
            t1 = time.perf_counter()
            loss = loss_fn(model(u, i), y)
            t2 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            (loss / batch).backward()
            t3 = time.perf_counter()
            optimizer.step()
            t4 = time.perf_counter()
            parts += (t1 - t0, t2 - t1, t3 - t2, t4 - t3)
        total = time.perf_counter() - start
        ms = 1000 * parts / steps
        out.append({"batch_size": batch, "samples_per_s": round(n / total), "ms_per_step": round(1000 * total / steps, 3),
                    "batching_ms": round(ms[0], 3), "forward_ms": round(ms[1], 3), "backward_ms": round(ms[2], 3),
                    "optimizer_ms": round(ms[3], 3)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["ml-100k", "synthetic-1m", "synthetic-20m"])
    parser.add_argument("--mlp-epochs", type=int, default=1, help="MLP epochs at 1M (and 20M)")
    parser.add_argument("--mlp-at-20m", action="store_true", help="also train the MLP on synthetic-20m")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks/results.json")
    parser.add_argument("--scratch", type=Path, default=None, help="keep the scratch folders under this folder")
    args = parser.parse_args()
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
                          f"torch {torch.__version__}", "datasets": [], "mlp_throughput": []}
    for name in args.datasets:
        results["datasets"].append(bench_dataset(name, args.mlp_epochs, args.mlp_at_20m, args.scratch))
    results["mlp_throughput"] = throughput([256, 1024, 4096])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"machine: {results['machine']}\n")
    print("| dataset | interactions | stage | time (s) | peak memory (MiB) | note |\n|---|---:|---|---:|---:|---|")
    for d in results["datasets"]:
        for r in d["stages"]:
            print(f"| {d['dataset']} | {d['interactions']:,} | {r['stage']} | {r['seconds']:.1f} | {r['peak_mib']} | {r['note']} |")
    print("\n| batch | samples/s | ms/step | batching | forward | backward | optimiser |\n|---:|---:|---:|---:|---:|---:|---:|")
    for r in results["mlp_throughput"]:
        print(f"| {r['batch_size']} | {r['samples_per_s']:,} | {r['ms_per_step']:.2f} | {r['batching_ms']:.2f} | "
              f"{r['forward_ms']:.2f} | {r['backward_ms']:.2f} | {r['optimizer_ms']:.2f} |")


if __name__ == "__main__":
    main()
