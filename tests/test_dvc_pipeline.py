"""End to end: the real `dvc` commands a user runs, on a copy of the repo and a tiny dataset."""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import copy_pipeline, set_models, set_params

ALL_MODELS = ["itempop", "mlp", "gmf", "neumf", "mf", "ease"]
NEURAL = ("mlp", "gmf", "neumf", "mf")
DATA_STAGES = {"download", "build_matrix", "sample_negatives"}
COPIED = ["pipeline", "examples", "dvc.yaml", "params.yaml", ".dvc/config", ".dvc/.gitignore", ".dvcignore",
          ".gitignore"]
LOOP = {"epochs": 2, "batch_size": 64, "negatives": 2}  # every neural model's loop, sized for tiny data
TINY_PARAMS = {  # dotted keys change one field of a model's section (conftest.set_params)
    "test_negatives": 20,
    "models": ALL_MODELS,
    **{f"{model}.{key}": value for model in NEURAL for key, value in LOOP.items()},
    "mlp.layers": [16, 8],
    "gmf.factors": 8,
    "neumf.factors": 8, "neumf.layers": [16, 8], "neumf.pretrain_epochs": 1,
    "mf.factors": 8,
}


def stages(models, data: bool = True, evaluate: bool = True, recommend: bool = True, report: bool = True) -> set[str]:
    """The DVC stage names of a run: the data stages, train@<model> for each model, and those after."""
    names = {f"train@{m}" for m in models}
    names |= DATA_STAGES if data else set()
    return names | {name for name, on in (("evaluate", evaluate), ("recommend", recommend), ("report", report))
                    if on}


STAGES = stages(ALL_MODELS)
# `-S mlp.lr=...`: only that model's stage re-trains; evaluate and the report that reads its metrics follow.
ONE_MODEL = {"train@mlp", "evaluate", "report"}


def run(cmd: str, cwd: Path, env: dict, stdout_only: bool = False) -> str:
    """Run a shell command; fail the test with its output if it fails; return its output."""
    proc = subprocess.run(cmd, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"`{cmd}` exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
    return proc.stdout if stdout_only else proc.stdout + proc.stderr


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([\w@-]+)'", output))


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


def make_project(root: Path, env: dict, models: list[str] | None = None) -> Path:
    """Make root a fresh git repository holding the pipeline (no data, no lock), params sized for tiny data."""
    copy_pipeline(root, COPIED)
    set_params(root, **TINY_PARAMS)
    if models is not None:
        set_models(root, models)
    run("git init -q -b main && git add -A && git commit -q -m pipeline", root, env)
    return root


@pytest.fixture(scope="module")
def project(tmp_path_factory, env) -> Path:
    return make_project(tmp_path_factory.mktemp("project"), env)


def check_metrics(root: Path, models: list[str]) -> dict:
    """metrics/test.json and metrics/hr_at_k/ hold exactly `models`, each with every metric, sane."""
    metrics = json.loads((root / "metrics/test.json").read_text())
    assert list(metrics) == ["k", *models] and metrics["k"] == 10, metrics
    for model in models:
        m = metrics[model]
        assert set(m) == {"hr", "ndcg", "mrr", "full"} and set(m["full"]) == {"hr", "ndcg", "mrr"}, (model, m)
        for d in (m, m["full"]):
            assert 0.0 <= d["ndcg"] <= d["hr"] <= 1.0 and 0.0 < d["mrr"] <= 1.0, (model, m)
        # The sampled candidates are a subset of the full ranking's: it can only rank the item lower.
        assert all(m["full"][key] <= m[key] for key in ("hr", "ndcg", "mrr")), (model, m)
    assert sorted(p.name for p in (root / "metrics/hr_at_k").iterdir()) == sorted(f"{m}.csv" for m in models)
    for model in models:
        hr_at_k = (root / f"metrics/hr_at_k/{model}.csv").read_text().splitlines()
        assert hr_at_k[0] == "k,hr" and len(hr_at_k) == 21, hr_at_k[:2]
        assert float(hr_at_k[10].split(",")[1]) == pytest.approx(metrics[model]["hr"], abs=1e-6)
    return metrics


def check_training_outputs(root: Path, models: list[str], params: dict) -> None:
    """Each model's checkpoint loads as tensors only; its curve has a row per epoch (one if closed form)."""
    import torch
    for model in models:
        state = torch.load(root / f"data/models/{model}.pt", weights_only=True)
        assert all(isinstance(v, torch.Tensor) for v in state.values()), model
        if model in ("itempop", "ease"):
            assert set(state) == {"counts" if model == "itempop" else "weights"}
        curve = (root / f"metrics/training/{model}.csv").read_text().splitlines()
        assert curve[0] == "epoch,loss,val_hr,val_ndcg", curve
        assert len(curve) == 1 + (params[model]["epochs"] if model in NEURAL else 1), (model, curve)
        summary = json.loads((root / f"metrics/training/{model}.json").read_text())
        assert 1 <= summary["best_epoch"] <= len(curve) - 1 and 0.0 <= summary["val_hr"] <= 1.0, summary
        if model == "neumf":
            assert set(summary["pretrained"]) == {"gmf", "mlp"}, summary


def test_dvc_workflow(project: Path, env: dict, tmp_path: Path) -> None:
    root = project
    dvc = f"{sys.executable} -m dvc"
    params = yaml.safe_load((root / "params.yaml").read_text())

    # 1. dvc repro runs every stage, one train@<model> per model, and writes the metrics and the curves.
    out = run(f"{dvc} repro", root, env)
    assert ran_stages(out) == STAGES, out
    check_metrics(root, ALL_MODELS)
    check_training_outputs(root, ALL_MODELS, params)
    # Each train@<model> depends on its own section of params.yaml only (and the shared keys).
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    for model in ALL_MODELS:
        assert set(lock[f"train@{model}"]["params"]["params.yaml"]) == {"seed", "topK", "device", model}

    # 2. Nothing changed: nothing runs.
    out = run(f"{dvc} repro", root, env)
    assert ran_stages(out) == set() and "Data and pipelines are up to date" in out, out
    run("git add -A && git commit -q -m results", root, env)

    # 3. Experiments re-run exactly the stages that read the changed key; DVC's own spellings work.
    # A field of one model's section re-trains that model alone.
    settings = ["mlp.lr=0.01", "mlp.lr=0.00001", "'mlp.layers=[64,32,16,8]'", "mlp.negatives=8", "mlp.epochs=3",
                "mlp.dropout=0.1"]
    for setting in settings:
        out = run(f"{dvc} exp run -S {setting}", root, env)
        assert ran_stages(out) == ONE_MODEL, (setting, out)
    shown_params = yaml.safe_load((root / "params.yaml").read_text())
    assert str(shown_params["mlp"]["lr"]) in ("1e-05", "0.01") and shown_params["mlp"]["epochs"] == 3
    assert shown_params["gmf"] == params["gmf"]  # the other sections are untouched
    assert len((root / "metrics/training/mlp.csv").read_text().splitlines()) == 1 + 3
    out = run(f"{dvc} exp run -S gmf.lr=0.01", root, env)
    assert ran_stages(out) == {"train@gmf", "evaluate", "report"}, out
    # topK is read by every model's stage (model selection) and by evaluate.
    out = run(f"{dvc} exp run -S topK=5", root, env)
    assert ran_stages(out) == stages(ALL_MODELS, data=False, recommend=False), out
    shown = json.loads(run(f"{dvc} exp show --json", root, env, stdout_only=True))
    experiments = [e for rev in shown for e in (rev.get("experiments") or [])]
    assert len(experiments) >= len(settings) + 2
    exp_metrics = [e["revs"][0]["data"]["metrics"]["metrics/test.json"]["data"] for e in experiments]
    assert all(set(ALL_MODELS) <= set(m) and {"hr", "full"} <= set(m["mlp"]) for m in exp_metrics)
    assert {m["k"] for m in exp_metrics} == {5, 10}
    names = [e["revs"][0]["name"] for e in experiments[:2]]
    run(f"{dvc} plots diff {names[0]} {names[1]}", root, env)
    html = (root / "dvc_plots/index.html").read_text()
    assert all(f'"{name}"' in html for name in names)

    # Fewer models: their train stages leave the pipeline, the others are not re-run, and evaluate
    # drops the removed models from the metrics.
    run("git reset -q --hard && git clean -qfd", root, env)
    run(f"{dvc} checkout -q", root, env)
    extra = " -S recommend_model=mlp" if "recommend_model" in params else ""
    out = run(f"{dvc} exp run -S 'models=[itempop,mlp]'{extra}", root, env)
    assert ran_stages(out) == {"evaluate", "recommend", "report"}, out
    metrics = check_metrics(root, ["itempop", "mlp"])
    assert set(metrics) == {"k", "itempop", "mlp"}
    listed = run(f"{dvc} stage list --name-only", root, env, stdout_only=True).split()
    assert set(listed) == stages(["itempop", "mlp"]), listed  # (dvc.lock keeps the old entries: DVC's way)

    # 4. A branch with other params, then `dvc metrics diff` in a fresh clone with no DVC cache.
    run("git reset -q --hard && git clean -qfd", root, env)
    run(f"{dvc} checkout -q", root, env)
    run("git checkout -q -b other", root, env)
    set_params(root, seed=7, **{"mlp.epochs": 3})
    run(f"{dvc} repro", root, env)
    run("git add -A && git commit -q -m other", root, env)
    clone = tmp_path / "clone"
    run(f"git clone -q --no-single-branch {root} {clone}", tmp_path, env)
    diff = run(f"{dvc} metrics diff main other", clone, env)
    for key in ("itempop.hr", "itempop.ndcg", "itempop.mrr", "mlp.hr", "mlp.ndcg", "mlp.mrr"):
        assert key in diff, diff
    diff = run(f"{dvc} metrics diff --all main other", clone, env)
    for model in ALL_MODELS:
        for key in ("hr", "ndcg", "mrr", "full.hr", "full.ndcg", "full.mrr"):
            assert f"{model}.{key}" in diff, (model, key, diff)

    # 5. Plots render (training curves of each neural model, test HR@K of every model) and compare
    # across branches.
    run(f"{dvc} plots show", root, env)
    html = (root / "dvc_plots/index.html").read_text()
    assert "val_hr" in html and "loss" in html
    assert all(f'"filename": "{m}.csv"' in html for m in NEURAL), html  # metrics/training/<model>.csv
    assert all(f'"filename": "{m}.csv"' in html for m in ALL_MODELS), html  # metrics/hr_at_k/<model>.csv
    run(f"{dvc} plots diff main other", root, env)
    html = (root / "dvc_plots/index.html").read_text()
    assert '"main"' in html and '"other"' in html

    # 6. A forced re-run reproduces every output byte for byte.
    run(f"{dvc} repro -f", root, env)
    first = outputs_digest(root)
    run(f"{dvc} repro -f", root, env)
    assert outputs_digest(root) == first
    assert {f"data/models/{m}.pt" for m in ALL_MODELS} <= set(first) and "metrics/test.json" in first


def test_dataset_switch_remote_and_fresh_clone(tmp_path: Path, env: dict) -> None:
    """Changing `dataset` re-runs every stage and never mixes caches; a remote shares the results."""
    models = ["itempop", "mlp", "gmf"]  # fewer models here: test_dvc_workflow trains them all
    root = make_project(tmp_path / "project", env, models)
    dvc = f"{sys.executable} -m dvc"
    out = run(f"{dvc} repro", root, env)
    assert ran_stages(out) == stages(models), out
    tiny = (root / "metrics/test.json").read_text()
    run("git add -A && git commit -q -m tiny", root, env)

    # Another dataset: every stage runs, on different data.
    out = run(f"{dvc} exp run -S dataset=custom", root, env)
    assert ran_stages(out) == stages(models), out
    assert json.loads((root / "data/raw/source.json").read_text())["dataset"] == "custom"
    users = (root / "data/prepared/users.csv").read_text().splitlines()
    assert users[1] == "0,user-01" and len(users) == 61
    assert (root / "metrics/test.json").read_text() != tiny

    # Back to the first dataset: DVC restores the stages with only cached outputs (the data stages,
    # recommend) from its run cache. The stages that also write git-tracked files (cache: false:
    # every train@<model>, evaluate, report) are outside DVC's run cache: they re-run, to the same bytes.
    set_params(root, dataset="ml-100k")
    out = run(f"{dvc} repro", root, env)
    assert ran_stages(out) == stages(models, data=False, recommend=False), out
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
    check_metrics(clone, models)
    # dvc.yaml's training plots name all four neural models' curves; those not trained have no file.
    run(f"{dvc} plots show", clone, env)
    html = (clone / "dvc_plots/index.html").read_text()
    assert all(f'"filename": "{m}.csv"' in html for m in ("mlp", "gmf")), html


def test_plots_show_every_evaluated_model_with_fewer_models(tmp_path: Path, env: dict) -> None:
    models = ["itempop", "mlp", "gmf"]
    root = make_project(tmp_path / "project", env, models)
    dvc = f"{sys.executable} -m dvc"
    run(f"{dvc} repro", root, env)
    out = run(f"{dvc} plots show", root, env)
    html = (root / "dvc_plots/index.html").read_text()
    # DVC warns about the files of the models that were not trained, and draws every other series.
    specs = html.split("var spec = ")[1:]
    assert len(specs) == 3 and not any(spec.startswith("{}") for spec in specs), out  # no plot left empty
    hr_spec = next(spec for spec in specs if '"hr"' in spec and '"k"' in spec)
    assert all(f'"filename": "{m}.csv"' in hr_spec for m in models), hr_spec  # metrics/hr_at_k/<model>.csv
    assert html.count("<img") == 2  # the report's PNG charts
