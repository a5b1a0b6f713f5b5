"""End to end: the real `dvc` commands a user runs, on a copy of the repo and a tiny dataset."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, set_params

STAGES = {"download", "build_matrix", "sample_negatives", "train_itempop", "train_mlp", "evaluate"}
COPIED = ["pipeline", "examples", "dvc.yaml", "params.yaml", ".dvc/config", ".dvc/.gitignore", ".dvcignore",
          ".gitignore"]
TINY_PARAMS = {"test_negatives": 20, "epochs": 2, "batch_size": 64, "layers": [16, 8], "negatives": 2}


def run(cmd: str, cwd: Path, env: dict, stdout_only: bool = False) -> str:
    """Run a shell command; fail the test with its output if it fails; return its output."""
    proc = subprocess.run(cmd, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"`{cmd}` exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
    return proc.stdout if stdout_only else proc.stdout + proc.stderr


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([\w-]+)'", output))


def outputs_digest(root: Path) -> dict[str, str]:
    files = sorted(p for d in ("data", "metrics") for p in (root / d).rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files
            if p.name != ".gitignore"}


@pytest.fixture(scope="module")
def env(tiny_mirror) -> dict:
    bindir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
        "MOVIELENS_MIRROR": str(tiny_mirror),
        "MOVIELENS_SKIP_VERIFY": "1",
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com",
    }


def make_project(root: Path, env: dict) -> Path:
    """Make root a fresh git repository holding the pipeline (no data, no lock), params sized for tiny data."""
    for name in COPIED:
        src, dst = REPO / name, root / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    set_params(root, **TINY_PARAMS)
    run("git init -q -b main && git add -A && git commit -q -m pipeline", root, env)
    return root


@pytest.fixture(scope="module")
def project(tmp_path_factory, env) -> Path:
    return make_project(tmp_path_factory.mktemp("project"), env)


def test_dvc_workflow(project: Path, env: dict, tmp_path: Path) -> None:
    root = project
    dvc = f"{sys.executable} -m dvc"

    # 1. dvc repro runs all six stages and writes the metrics and the curves.
    out = run(f"{dvc} repro", root, env)
    assert ran_stages(out) == STAGES, out
    metrics = json.loads((root / "metrics/test.json").read_text())
    assert set(metrics) == {"k", "itempop", "mlp"} and metrics["k"] == 10
    for model in ("itempop", "mlp"):
        assert set(metrics[model]) == {"hr", "ndcg"}
        assert 0.0 <= metrics[model]["ndcg"] <= metrics[model]["hr"] <= 1.0
    curve = (root / "metrics/mlp_training.csv").read_text().splitlines()
    assert curve[0] == "epoch,loss,val_hr,val_ndcg" and len(curve) == 1 + TINY_PARAMS["epochs"]

    # 2. Nothing changed: nothing runs.
    out = run(f"{dvc} repro", root, env)
    assert ran_stages(out) == set() and "Data and pipelines are up to date" in out, out
    run("git add -A && git commit -q -m results", root, env)

    # 3. Experiments re-run exactly the stages that read the changed key; DVC's own spellings work.
    for setting in ["lr=0.01", "lr=0.00001", "'layers=[64,32,16,8]'", "negatives=8", "topK=5", "epochs=3"]:
        out = run(f"{dvc} exp run -S {setting}", root, env)
        assert ran_stages(out) == {"train_mlp", "evaluate"}, (setting, out)
    assert "lr: 1e-05" in (root / "params.yaml").read_text() or "lr: 0.01" in (root / "params.yaml").read_text()
    shown = json.loads(run(f"{dvc} exp show --json", root, env, stdout_only=True))
    experiments = [e for rev in shown for e in (rev.get("experiments") or [])]
    assert len(experiments) >= 6
    exp_metrics = [e["revs"][0]["data"]["metrics"]["metrics/test.json"]["data"] for e in experiments]
    assert all({"itempop", "mlp"} <= set(m) and "hr" in m["mlp"] for m in exp_metrics)
    assert {m["k"] for m in exp_metrics} == {5, 10}
    names = [e["revs"][0]["name"] for e in experiments[:2]]
    run(f"{dvc} plots diff {names[0]} {names[1]}", root, env)
    html = (root / "dvc_plots/index.html").read_text()
    assert all(f'"{name}"' in html for name in names)

    # 4. A branch with other params, then `dvc metrics diff` in a fresh clone with no DVC cache.
    run("git reset -q --hard && git clean -qfd", root, env)
    run(f"{dvc} checkout -q", root, env)
    run("git checkout -q -b other", root, env)
    set_params(root, seed=7, epochs=3)
    run(f"{dvc} repro", root, env)
    run("git add -A && git commit -q -m other", root, env)
    clone = tmp_path / "clone"
    run(f"git clone -q --no-single-branch {root} {clone}", tmp_path, env)
    diff = run(f"{dvc} metrics diff main other", clone, env)
    for key in ("itempop.hr", "itempop.ndcg", "mlp.hr", "mlp.ndcg"):
        assert key in diff, diff

    # 5. Plots render and compare across branches.
    run(f"{dvc} plots show", root, env)
    html = (root / "dvc_plots/index.html").read_text()
    assert "val_hr" in html and "loss" in html and "itempop" in html
    run(f"{dvc} plots diff main other", root, env)
    html = (root / "dvc_plots/index.html").read_text()
    assert '"main"' in html and '"other"' in html

    # 6. A forced re-run reproduces every output byte for byte.
    run(f"{dvc} repro -f", root, env)
    first = outputs_digest(root)
    run(f"{dvc} repro -f", root, env)
    assert outputs_digest(root) == first
    assert any(k.startswith("data/models/") for k in first) and "metrics/test.json" in first


def test_dataset_switch_remote_and_fresh_clone(tmp_path: Path, env: dict) -> None:
    """Changing `dataset` re-runs every stage and never mixes caches; a remote shares the results."""
    root = make_project(tmp_path / "project", env)
    dvc = f"{sys.executable} -m dvc"
    run(f"{dvc} repro", root, env)
    tiny = (root / "metrics/test.json").read_text()
    run("git add -A && git commit -q -m tiny", root, env)

    # Another dataset: every stage runs, on different data.
    out = run(f"{dvc} exp run -S dataset=custom", root, env)
    assert ran_stages(out) == STAGES, out
    assert json.loads((root / "data/raw/source.json").read_text())["dataset"] == "custom"
    users = (root / "data/prepared/users.csv").read_text().splitlines()
    assert users[1] == "0,user-01" and len(users) == 61
    assert (root / "metrics/test.json").read_text() != tiny

    # Back to the first dataset: DVC restores the data stages from its run cache. The stages that
    # write git-tracked metrics (cache: false) are outside DVC's run cache: they re-run, to the same bytes.
    set_params(root, dataset="ml-100k")
    out = run(f"{dvc} repro", root, env)
    assert ran_stages(out) == {"train_mlp", "evaluate"}, out
    assert (root / "metrics/test.json").read_text() == tiny
    assert json.loads((root / "data/raw/source.json").read_text())["dataset"] == "ml-100k"

    # A local-directory remote: push here, pull into a fresh clone, which is then up to date.
    remote = tmp_path / "remote"
    run(f"{dvc} remote add -d shared {remote} && git add .dvc/config && git commit -q -m remote", root, env)
    run(f"{dvc} push", root, env)
    clone = tmp_path / "clone"
    run(f"git clone -q {root} {clone}", tmp_path, env)
    run(f"{dvc} pull", clone, env)
    status = run(f"{dvc} status", clone, env)
    assert "Data and pipelines are up to date" in status, status
    assert outputs_digest(clone) == outputs_digest(root)
