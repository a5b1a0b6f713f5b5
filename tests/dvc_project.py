"""Helpers for the tests that run the real `dvc` on a copy of the repository and a tiny dataset
(test_dvc_pipeline.py, test_dvc_faults.py, test_compare.py). Not a test module: pytest skips it."""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import copy_pipeline, set_params

DVC = f"{sys.executable} -m dvc"
COPIED = ["pipeline", "examples", "dvc.yaml", "params.yaml", ".dvc/config", ".dvc/.gitignore", ".dvcignore",
          ".gitignore"]
ADDED = ["gmf", "mf", "ease"]  # params.yaml's `models`: stage train@<name>
FUSED = ["neumf"]  # params.yaml's `fused`: stage fuse@<name>
ALL_MODELS = ["itempop", "mlp", *ADDED, *FUSED]  # evaluate's order (intervals.json's "models"): itempop, mlp,
# models, fused; each has metrics/test/<model>.json and the DVCLive directory metrics/training/<model>/
NEURAL = ("mlp", "gmf", "mf", "neumf")
CURVES = ("hr", "ndcg", "full/hr", "full/ndcg")  # every model's DVCLive curves (plots/metrics/<name>.tsv); a
# neural model's also loss
DATA_STAGES = {"download", "build_matrix", "sample_negatives"}
LOOP = {"epochs": 2, "batch_size": 64, "negatives": 2}  # every neural model's loop, sized for tiny data
TINY_PARAMS = {  # the MLP's knobs are top-level keys; dotted keys change one field of a section
    "test_negatives": 20,
    "layers": [16, 8], **LOOP,
    **{f"{model}.{key}": value for model in ("gmf", "mf", "neumf") for key, value in LOOP.items()},
    "gmf.factors": 8,
    "mf.factors": 8,
}
# A change to one of the MLP's knobs re-runs its stage and the stages that read its outputs: NeuMF
# starts from its checkpoint, evaluate scores it, the report reads the metrics (and recommend, only
# when the MLP or NeuMF recommends).
MLP_RERUN = {"train_mlp", "fuse@neumf", "evaluate", "report"}


def curve_files(model: str) -> list[str]:
    """A model's DVCLive per-epoch files (`step\t<name>` rows), relative to the repository."""
    names = ("loss", *CURVES) if model in NEURAL else CURVES
    return [f"metrics/training/{model}/plots/metrics/{name}.tsv" for name in names]


def stages(models=ADDED, fused=FUSED, data: bool = True, evaluate: bool = True, recommend: bool = True,
           report: bool = True) -> set[str]:
    """The DVC stage names of a run: the data stages, every training stage, and those after."""
    names = {"train_itempop", "train_mlp", *(f"train@{m}" for m in models), *(f"fuse@{m}" for m in fused)}
    names |= DATA_STAGES if data else set()
    return names | {name for name, on in (("evaluate", evaluate), ("recommend", recommend), ("report", report))
                    if on}


def dvc_env(mirror: Path, **extra: str) -> dict:
    bindir = str(Path(sys.executable).parent)  # `dvc` (and the queue's workers) from the venv
    return {
        **os.environ,
        "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
        "MOVIELENS_MIRROR": str(mirror),
        "MOVIELENS_SKIP_VERIFY": "1",
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com",
        **extra,
    }


def sh(cmd: str, cwd: Path, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a shell command; return the completed process (text output), whatever its exit status."""
    return subprocess.run(cmd, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def run(cmd: str, cwd: Path, env: dict, stdout_only: bool = False, timeout: float = 600) -> str:
    """Run a shell command; fail the test with its output if it fails; return its output."""
    proc = sh(cmd, cwd, env, timeout)
    if proc.returncode != 0:
        raise AssertionError(f"`{cmd}` exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
    return proc.stdout if stdout_only else proc.stdout + proc.stderr


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([\w@-]+)'", output))


def choose_models(root: Path, models: list[str], fused: list[str], recommend_model: str | None = None) -> None:
    """Set `models` and `fused`; keep recommend_model one of the trained models."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    trained = ["itempop", "mlp", *models, *fused]
    if recommend_model is None:
        recommend_model = params["recommend_model"] if params["recommend_model"] in trained else trained[-1]
    set_params(root, models=list(models), fused=list(fused), recommend_model=recommend_model)


def make_project(root: Path, env: dict, models: list[str] | None = None, fused: list[str] | None = None,
                 **params) -> Path:
    """Make root a fresh git repository holding the pipeline (no data, no lock), params sized for tiny data."""
    copy_pipeline(root, COPIED)
    set_params(root, **TINY_PARAMS, **params)
    if models is not None or fused is not None:
        choose_models(root, ADDED if models is None else models, FUSED if fused is None else fused)
    run("git init -q -b main && git add -A && git commit -q -m pipeline", root, env)
    return root


def restore(root: Path, env: dict, branch: str = "main") -> None:
    """Back to the committed state of `branch`: git-tracked files, and DVC's outputs from its cache."""
    run(f"git checkout -q -f {branch} && git reset -q --hard && git clean -qfd && {DVC} checkout -q", root, env)


def outputs_digest(root: Path) -> dict[str, str]:
    files = sorted(p for d in ("data", "metrics") for p in (root / d).rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files
            if p.name != ".gitignore"}
