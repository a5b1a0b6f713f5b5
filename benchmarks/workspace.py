"""Helpers the benchmarks share: a fresh copy of the working tree as a new git repository, and commands."""
from __future__ import annotations

import os
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


def fresh_copy(dest: Path) -> Path:
    """Copy the working tree's tracked and untracked (not ignored) files into a new git repository."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, files):
        src = REPO / name
        if src.is_file() and not name.startswith(("data/", "benchmarks/")) or name in (
                "data/.gitignore", "data/models/.gitignore"):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    run("git init -q -b main && git add -A && git commit -q -m copy", dest)
    return dest
