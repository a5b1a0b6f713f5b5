"""The default run's speed targets, measured as a new user meets them.

    MOVIELENS_MIRROR=../shared/data python benchmarks/speed.py      # from the repository root, venv on PATH
    python benchmarks/speed.py --json benchmarks/speed.json
    python benchmarks/speed.py --cpu-kernels native --json benchmarks/speed_native.json   # the pin's cost

`--cpu-kernels` sets params.yaml's `cpu_kernels` in the copy: portable (the committed value: the
kernels pinned so that every x86-64 CPU with AVX2 gives the same bytes) or native (each library's
fastest kernels for this CPU). Run both in the same hour on an otherwise idle machine to compare.

In a fresh copy of the working tree (tracked and untracked files, committed into a new git
repository, no DVC cache), it times:
  1. `dvc repro` with the committed params, download from the mirror included (target: 50 s);
  2. `dvc exp run -S lr=0.01` right after it (target: 25 s);
  3. the revisit: `dvc exp run -S lr=<the committed lr>` right after that, which DVC's run-cache
     answers without training (target: 5 s), and which stages it restored or ran;
  4. in a second fresh copy, each stage alone (`dvc repro -s <stage>`, in pipeline order), and the
     import time of each stage's module (`python -X importtime`, the start-up that every stage pays).
The thread check: the MLP trained with 1 and with 2 torch threads, and whether the bits are equal.
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
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workspace import REPO, cpu_description, fresh_copy, run  # noqa: E402

TARGETS = {"repro_s": 50.0, "exp_run_s": 25.0, "revisit_s": 5.0}


def stage_names(root: Path) -> list[str]:
    """Every stage of the pipeline, in dvc.yaml's order (which is an order `dvc repro` may run them in)."""
    _, out = run("dvc stage list --name-only", root)
    return out.split()


def import_seconds(module: str) -> float:
    """Cumulative import time of pipeline.<module>, from `python -X importtime` (best of 3)."""
    best = float("inf")
    for _ in range(3):
        err = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import pipeline.{module}"], cwd=REPO,
                             capture_output=True, text=True).stderr
        line = [ln for ln in err.splitlines() if ln.rstrip().endswith(f"pipeline.{module}")][-1]
        best = min(best, int(line.split("|")[1]) / 1e6)
    return best


def thread_check() -> dict:
    """Train the committed MLP for 2 epochs with 1 and with 2 threads (in-process, generated data)."""
    code = (
        f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
        "import pipeline  # first: it pins the CPU kernels before torch loads\n"
        "import hashlib, torch, numpy as np, scipy.sparse as sp\n"
        "from pipeline.common import configure_torch\n"
        "from pipeline.models.mlp import MLP\n"
        "from pipeline.params import load_params, model_section\n"
        "from pipeline.training import FitConfig, fit\n"
        "configure_torch(); torch.set_num_threads(int(sys.argv[1]))\n"
        "rng = np.random.default_rng(0)\n"
        "train = sp.random(943, 1682, density=0.06, format='csr', random_state=0, dtype=np.float32)\n"
        "train.data[:] = 1\n"
        f"params = load_params({str(REPO / 'params.yaml')!r}); section = model_section(params, 'mlp')\n"
        "cfg = FitConfig.from_section(section, 42, 10); cfg.epochs = 2\n"
        "torch.manual_seed(42); model = MLP.from_params(943, 1682, section)\n"
        "import time; t = time.perf_counter(); state, _, _ = fit(model, train, None, cfg); t = time.perf_counter() - t\n"
        "print(hashlib.sha256(b''.join(v.numpy().tobytes() for v in state.values())).hexdigest(), t)\n"
    )
    out = {}
    for threads in (1, 2):
        digest, seconds = subprocess.run([sys.executable, "-c", code, str(threads)], capture_output=True, text=True,
                                         check=True).stdout.split()
        out[threads] = {"sha256": digest[:16], "seconds": round(float(seconds), 2)}
    return {"threads_1": out[1], "threads_2": out[2], "identical": out[1]["sha256"] == out[2]["sha256"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks/speed.json")
    parser.add_argument("--skip-stages", action="store_true", help="only the two targets")
    parser.add_argument("--cpu-kernels", choices=("portable", "native"), default="portable", help="params.yaml's cpu_kernels in the copy")
    args = parser.parse_args()
    if not os.environ.get("MOVIELENS_MIRROR"):
        print("note: MOVIELENS_MIRROR is not set: the download goes to GroupLens", file=sys.stderr)
    result: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
                    "cpu": cpu_description(), "cpu_kernels": args.cpu_kernels}
    with tempfile.TemporaryDirectory(prefix="speed-") as scratch:
        root = fresh_copy(Path(scratch) / "a", cpu_kernels=args.cpu_kernels)
        result["repro_s"], _ = run("dvc repro", root)
        print(f"dvc repro (clean, download included): {result['repro_s']:.1f} s", file=sys.stderr)
        result["exp_run_s"], out = run("dvc exp run -S lr=0.01", root)
        result["exp_run_stages"] = re.findall(r"Running stage '([\w@-]+)'", out)
        print(f"dvc exp run -S lr=0.01: {result['exp_run_s']:.1f} s ({', '.join(result['exp_run_stages'])})",
              file=sys.stderr)
        lr = yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8"))["lr"]
        result["revisit_s"], out = run(f"dvc exp run -S lr={lr}", root)
        result["revisit_restored"] = re.findall(r"Stage '([\w@-]+)' is cached - skipping run", out)
        result["revisit_ran"] = re.findall(r"Running stage '([\w@-]+)'", out)
        print(f"dvc exp run -S lr={lr} (the revisit): {result['revisit_s']:.1f} s (restored from the run-cache: "
              f"{', '.join(result['revisit_restored'])}; ran: {', '.join(result['revisit_ran']) or 'none'})",
              file=sys.stderr)
        if not args.skip_stages:
            root = fresh_copy(Path(scratch) / "b", cpu_kernels=args.cpu_kernels)
            result["stages"] = []
            for stage in stage_names(root):
                seconds, _ = run(f"dvc repro -f -s '{stage}'", root)
                module = "train" if stage.startswith(("train", "fuse")) else stage
                result["stages"].append({"stage": stage, "seconds": round(seconds, 2),
                                         "import_s": round(import_seconds(module), 2)})
                print(f"  {stage}: {seconds:.1f} s", file=sys.stderr)
    if not args.skip_stages:
        result["threads"] = thread_check()
    result["targets"] = {key: {"target_s": target, "measured_s": round(result[key], 1), "met": result[key] <= target}
                         for key, target in TARGETS.items()}
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["targets"], indent=2))
    for row in result.get("stages", []):
        print(f"| {row['stage']} | {row['seconds']:.1f} | {row['import_s']:.2f} |")


if __name__ == "__main__":
    main()
