"""Time every stage of dvc.yaml: run each stage's command in order, print wall time and peak memory.

Usage (from the repository root, with the venv's python on PATH): python benchmarks/stage_times.py
It runs the commands directly (not through DVC), so it rewrites the outputs in the workspace with
the same bytes that `dvc repro` would write. Output: a Markdown table on stdout.
"""
from __future__ import annotations

import shlex
import subprocess
import sys
import time

import yaml


MEASURE = (
    "import resource, subprocess, sys\n"
    "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def main() -> None:
    stages = yaml.safe_load(open("dvc.yaml"))["stages"]
    rows, total = [], 0.0
    for name, stage in stages.items():
        argv = shlex.split(stage["cmd"])
        argv[0] = sys.executable if argv[0] == "python" else argv[0]
        start = time.perf_counter()
        # A fresh wrapper per stage, so RUSAGE_CHILDREN's peak is this stage's alone.
        wrapper = [sys.executable, "-c", MEASURE, *argv]
        peak_kib = int(subprocess.run(wrapper, check=True, stdout=subprocess.PIPE, text=True).stdout.split()[-1])
        seconds = time.perf_counter() - start
        rows.append((name, seconds, peak_kib / 1024))
        total += seconds
    print("| stage | wall time (s) | peak memory (MiB) |\n|---|---:|---:|")
    for name, seconds, peak in rows:
        print(f"| {name} | {seconds:.1f} | {peak:.0f} |")
    print(f"| total | {total:.1f} | |")


if __name__ == "__main__":
    main()
