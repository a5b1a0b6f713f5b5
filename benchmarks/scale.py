"""Every default model at scale: `dvc exp run -S dataset=synthetic-20m` with one epoch, timed per stage.

    python benchmarks/scale.py                               # synthetic-20m, each neural model 1 epoch
    python benchmarks/scale.py --datasets synthetic-1m ml-100k --json /tmp/scale.json
    python benchmarks/scale.py --throughput-only             # the MLP's samples/s at 100K and 20M sizes

For each dataset, in a fresh copy of the working tree (a new git repository, no DVC cache), it runs
`dvc exp run -S dataset=<name> -S epochs=1 -S gmf.epochs=1 -S mf.epochs=1 -S neumf.epochs=1` (ml-100k:
the committed params, unchanged) and records, from DVC's own output and a sampler of the processes:
each stage's wall time, each stage's peak resident memory (the RSS of its processes summed, every
0.25 s: a forked refit shares pages with its parent, so the sum overstates), and the whole run's
peak of the machine's used memory (MemTotal - MemAvailable, above what was used before the run).
Then the MLP's training throughput (samples/s) at batch 2048 with ml-100k-sized and ml-20m-sized
embedding tables, through the pipeline's own optimiser. Targets (issue: 20M in bounded memory):
synthetic-20m in at most 40 minutes and 12 GiB; 20M throughput within 10% of 100K's.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workspace import REPO, env, fresh_copy  # noqa: E402

ONE_EPOCH = ["epochs=1", "gmf.epochs=1", "mf.epochs=1", "neumf.epochs=1"]
TARGETS = {"synthetic-20m": {"minutes": 40, "peak_gib": 12}}


def used_memory() -> int:
    """Bytes of memory in use on the machine (MemTotal - MemAvailable)."""
    vm = psutil.virtual_memory()
    return vm.total - vm.available


class Sampler(threading.Thread):
    """Every 0.25 s: the summed RSS of processes running a pipeline stage, and the machine's used memory."""

    def __init__(self):
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.samples: list[tuple[float, int, int]] = []  # (time, stage RSS, machine used)

    def run(self) -> None:
        while not self.stop.is_set():
            rss = 0
            for proc in psutil.process_iter(["cmdline", "memory_info"]):
                cmd = " ".join(proc.info["cmdline"] or [])
                if "-m pipeline." in cmd and proc.info["memory_info"] is not None:
                    rss += proc.info["memory_info"].rss
            self.samples.append((time.perf_counter(), rss, used_memory()))
            self.stop.wait(0.25)


def bench_dataset(name: str, extra: list[str], scratch: Path) -> dict:
    root = fresh_copy(scratch / name)
    sets = [] if name == "ml-100k" else [f"dataset={name}", *ONE_EPOCH]
    sets += extra
    cmd = [sys.executable, "-m", "dvc", "exp", "run", *[arg for s in sets for arg in ("-S", s)]]
    baseline = used_memory()
    sampler = Sampler()
    sampler.start()
    start = time.perf_counter()
    starts: list[tuple[str, float]] = []
    log = []
    proc = subprocess.Popen(cmd, cwd=root, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        log.append(line)
        match = re.match(r"Running stage '([\w@-]+)'", line)
        if match:
            starts.append((match.group(1), time.perf_counter()))
            print(f"  {time.perf_counter() - start:7.1f} s  {match.group(1)}", file=sys.stderr, flush=True)
    code = proc.wait()
    end = time.perf_counter()
    sampler.stop.set()
    sampler.join()
    if code:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{''.join(log[-40:])}")
    stages = []
    for i, (stage, t0) in enumerate(starts):
        t1 = starts[i + 1][1] if i + 1 < len(starts) else end
        rss = [r for t, r, _ in sampler.samples if t0 <= t <= t1]
        stages.append({"stage": stage, "seconds": round(t1 - t0, 1), "peak_rss_mib": round(max(rss, default=0) / 2**20)})
    peak = max(u for _, _, u in sampler.samples) - baseline
    # every model's test metrics (metrics/test/<model>.json), in the pipeline's model order, with k and the
    # number of fully ranked users from intervals.json: the shape scale.json's earlier records have
    bars = json.loads((root / "metrics/intervals.json").read_text())
    metrics = {"k": bars["k"], "full_rank_users": bars["full_rank_users"],
               **{model: json.loads((root / "metrics/test" / f"{model}.json").read_text()) for model in bars["models"]}}
    return {"dataset": name, "command": "dvc exp run " + " ".join(f"-S {s}" for s in sets),
            "wall_s": round(end - start, 1), "peak_used_gib": round(peak / 2**30, 2), "stages": stages,
            "metrics": metrics, "log_tail": [line.rstrip() for line in log if ": " in line and "training:" not in line][-40:]}


def throughput(steps: int = 150, batch: int = 2048) -> list[dict]:
    """MLP training samples/s at ml-100k's and ml-20m's table sizes, with the pipeline's optimiser."""
    code = f"""
import sys, time, json, torch
sys.path.insert(0, {str(REPO)!r})
from pipeline.common import configure_torch
from pipeline.models.mlp import MLP
from pipeline.params import load_params, model_section
from pipeline.training import make_optimizer
configure_torch()
section = model_section(load_params({str(REPO / 'params.yaml')!r}), "mlp")
out = []
for users, items in ((943, 1682), (138493, 26744)):
    torch.manual_seed(0)
    model = MLP.from_params(users, items, section)
    opt = make_optimizer(model, section["lr"], section["weight_decay"], {batch})
    loss_fn = torch.nn.BCEWithLogitsLoss(reduction="sum")
    g = torch.Generator().manual_seed(0)
    n = {batch} * {steps}
    u, i = torch.randint(0, users, (n,), generator=g), torch.randint(0, items, (n,), generator=g)
    y = torch.randint(0, 2, (n,), generator=g).float()
    for k in range({steps}):
        if k == 20:
            t = time.perf_counter()
        s = slice(k * {batch}, (k + 1) * {batch})
        loss = loss_fn(model(u[s], i[s]), y[s])
        opt.zero_grad(set_to_none=True)
        (loss / {batch}).backward()
        opt.step()
    seconds = (time.perf_counter() - t) / ({steps} - 20)
    lazy = [type(o).__name__ for o in opt.optimizers]
    out.append({{"users": users, "items": items, "batch_size": {batch}, "ms_per_step": round(1000 * seconds, 2),
                "samples_per_s": round({batch} / seconds), "optimizers": lazy}})
print(json.dumps(out))
"""
    return json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["synthetic-20m"])
    parser.add_argument("--set", action="append", default=[], help="another -S for dvc exp run (repeatable)")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks/scale.json")
    parser.add_argument("--throughput-only", action="store_true")
    args = parser.parse_args()
    if not os.environ.get("MOVIELENS_MIRROR") and "ml-100k" in args.datasets:
        print("note: MOVIELENS_MIRROR is not set: the download goes to GroupLens", file=sys.stderr)
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                          f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}",
               "datasets": [], "mlp_throughput": throughput()}
    if not args.throughput_only:
        with tempfile.TemporaryDirectory(prefix="scale-") as scratch:
            for name in args.datasets:
                results["datasets"].append(bench_dataset(name, args.set, Path(scratch)))
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    for d in results["datasets"]:
        target = TARGETS.get(d["dataset"])
        print(f"\n{d['dataset']}: {d['wall_s'] / 60:.1f} min, peak used memory {d['peak_used_gib']} GiB"
              + (f" (targets: {target['minutes']} min, {target['peak_gib']} GiB)" if target else ""))
        print(f"  {d['command']}\n| stage | time (s) | peak RSS (MiB) |\n|---|---:|---:|")
        for s in d["stages"]:
            print(f"| {s['stage']} | {s['seconds']:.1f} | {s['peak_rss_mib']:,} |")
    rows = results["mlp_throughput"]
    print("\n| tables (users x items) | ms/step | samples/s | optimisers |\n|---|---:|---:|---|")
    for r in rows:
        print(f"| {r['users']:,} x {r['items']:,} | {r['ms_per_step']} | {r['samples_per_s']:,} | {', '.join(r['optimizers'])} |")
    print(f"20M throughput / 100K throughput: {rows[1]['samples_per_s'] / rows[0]['samples_per_s']:.2f}")


if __name__ == "__main__":
    main()
