"""Helpers the benchmarks share: a fresh copy of the working tree as a new git repository, and commands."""
from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def env() -> dict:
    """The environment for commands: this interpreter's bin first on PATH, a git identity."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@example.com",
            "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@example.com"}


def run(cmd: str, cwd: Path) -> tuple[float, str]:
    """Run a shell command; return (wall seconds, output); stop the benchmark if it fails."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, shell=True, cwd=cwd, env=env(), capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"`{cmd}` failed:\n{proc.stdout}{proc.stderr}")
    return seconds, proc.stdout + proc.stderr


def cpu_description() -> str:
    """The CPU's model name and its AVX flags (what decides which kernels a library may pick)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or "unknown CPU"
    first = dict(line.split(":", 1) for line in lines[:lines.index("")] if ":" in line) if "" in lines else {}
    first = {key.strip(): value.strip() for key, value in first.items()}
    flags = sorted(flag for flag in first.get("flags", "").split() if flag.startswith("avx"))
    return f"{first.get('model name', 'unknown CPU')}; {' '.join(flags) or 'no AVX'}"


def fresh_copy(dest: Path, cpu_kernels: str = "portable") -> Path:
    """Copy the working tree's tracked and untracked (not ignored) files into a new git repository,
    with params.yaml's `cpu_kernels` set to `cpu_kernels`."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, files):
        src = REPO / name
        if src.is_file() and not name.startswith(("data/", "benchmarks/")) or name in (
                "data/.gitignore", "data/models/.gitignore"):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    params = dest / "params.yaml"
    text = params.read_text(encoding="utf-8")
    params.write_text(re.sub(r"(?m)^cpu_kernels: *\w+", f"cpu_kernels: {cpu_kernels}", text), encoding="utf-8")
    run("git init -q -b main && git add -A && git commit -q -m copy", dest)
    return dest
