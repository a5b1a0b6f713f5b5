"""DVC habits (issue 19), through the real `dvc` on a copy of the repository and a tiny dataset.

- The run-cache restores every stage: revisiting a committed value of the MLP's `lr` re-runs nothing
  and gives back every output byte for byte (intervals.json and report.md are in DVC's cache for this).
- `dvc metrics diff` works in a fresh `git clone` without any DVC cache: the metrics are in git.
- evaluate's `data/models` dependency counts the checkpoints (*.pt) only (.dvcignore); what a dropped
  model leaves behind, and what that does to the hash.
- The `recommender` artifact (dvc.yaml `artifacts:`): its path follows recommend_model, and
  `dvc artifacts get URL recommender --rev vX.Y.Z` fetches it at a GTO version tag.

One small project (ItemPop, the MLP and MF) is built once and shared; each test starts from its
committed state (`restore`).
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from conftest import set_params
from dvc_project import DVC, dvc_env, make_project, outputs_digest, ran_stages, restore, run, sh

CACHED = "Stage '{}' is cached - skipping run, checking out outputs"  # DVC's words for a run-cache restore
UP_TO_DATE = "Data and pipelines are up to date."


@pytest.fixture(scope="module")
def env(tiny_mirror) -> dict:
    return dvc_env(tiny_mirror)


@pytest.fixture(scope="module")
def project(tmp_path_factory, env) -> SimpleNamespace:
    """ItemPop, the MLP and MF on tiny data; a local DVC remote; `dvc repro`, committed on main, pushed."""
    base = tmp_path_factory.mktemp("habits")
    root = make_project(base / "repo", env, models=["mf"], fused=[])
    run(f"{DVC} remote add -d store {base / 'store'} && git add .dvc/config && git commit -q -m remote", root, env)
    first = run(f"{DVC} repro", root, env)
    run("git add -A && git commit -q -m results", root, env)
    run(f"{DVC} push", root, env)
    params = yaml.safe_load((root / "params.yaml").read_text())
    # The MLP's readers: evaluate and report; NeuMF when fused; recommend only when the MLP (or NeuMF) recommends.
    readers = {"train_mlp", "evaluate", "report"} | {f"fuse@{m}" for m in params["fused"]}
    if params["recommend_model"] in ("mlp", *params["fused"]):
        readers.add("recommend")
    committed_lr = params["lr"]  # whatever params.yaml has: revisited by the run-cache test
    return SimpleNamespace(root=root, base=base, first=first, params=params, digest=outputs_digest(root),
                           lr=committed_lr, other_lr=0.02 if committed_lr != 0.02 else 0.01, readers=readers,
                           lock=(root / "dvc.lock").read_text())


def lock_stages(root: Path) -> dict:
    return yaml.safe_load((root / "dvc.lock").read_text())["stages"]


def models_dep(root: Path) -> dict:
    """evaluate's `data/models` entry in dvc.lock (md5 `<hash>.dir`, size, nfiles)."""
    return next(d for d in lock_stages(root)["evaluate"]["deps"] if d["path"] == "data/models")


def dir_md5(directory: Path, names) -> str:
    """DVC's hash of a directory holding just `names`: md5 of its sorted JSON listing, plus `.dir`."""
    listing = [{"md5": hashlib.md5((directory / name).read_bytes()).hexdigest(), "relpath": name}
               for name in sorted(names)]
    return hashlib.md5(json.dumps(listing, sort_keys=True).encode()).hexdigest() + ".dir"


def checkpoints(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*.pt"))


def experiment_name(output: str) -> str:
    found = re.search(r"Ran experiment\(s\): (\S+)", output)
    assert found, output
    return found.group(1)


def shown_metric_files(root: Path, env: dict) -> set[str]:
    shown = json.loads(run(f"{DVC} metrics show --json", root, env, stdout_only=True))
    return set(shown[""]["data"])


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def clone(root: Path, target: Path, env: dict, branch: str | None = None) -> Path:
    run(f"git clone -q {'-b ' + branch if branch else ''} {root} {target}", target.parent, env)
    return target


# ------------------------------------------------------------------------------ the run-cache

def test_revisiting_the_committed_lr_restores_every_stage_from_the_run_cache(project, env) -> None:
    root = project.root
    restore(root, env)
    assert project.readers == {"train_mlp", "evaluate", "report"}, project.readers  # mf recommends, no NeuMF
    away = run(f"{DVC} exp run -S lr={project.other_lr}", root, env)
    # The first visit of the other lr really trains (unless an earlier test of this module visited it).
    if "Running stage 'train_mlp'" in away:
        assert ran_stages(away) == project.readers, away
    else:
        assert all(CACHED.format(s) in away for s in project.readers), away
    assert outputs_digest(root)["data/models/mlp.pt"] != project.digest["data/models/mlp.pt"]
    assert yaml.safe_load((root / "params.yaml").read_text())["lr"] == project.other_lr

    back = run(f"{DVC} exp run -S lr={project.lr}", root, env)
    assert ran_stages(back) == set(), back
    for stage in project.readers:
        assert CACHED.format(stage) in back, (stage, back)
    for stage in ("download", "build_matrix", "sample_negatives", "train_itempop", "train@mf", "recommend"):
        assert f"Stage '{stage}' didn't change, skipping" in back, (stage, back)
    # Every output comes back byte for byte: those the run-cache restored, metrics and plots included.
    digest = outputs_digest(root)
    restored = ["data/models/mlp.pt", "data/models/mlp.trainonly.pt", "metrics/intervals.json", "metrics/report.md",
                "metrics/training/mlp/metrics.json", "data/ranks.npz",
                *(f"metrics/test/{m}.json" for m in ("itempop", "mlp", "mf")),
                *(f"metrics/training/mlp/plots/metrics/{n}.tsv" for n in ("loss", "hr", "ndcg", "full/hr", "full/ndcg"))]
    for path in restored:
        assert path in digest and digest[path] == project.digest[path], path
    assert digest == project.digest
    assert (root / "dvc.lock").read_text() == project.lock
    assert run("git status --porcelain", root, env, stdout_only=True) == ""  # the experiment is the commit
    assert run(f"{DVC} status", root, env, stdout_only=True).strip() == UP_TO_DATE


# --------------------------------------------------------------------- metrics diff without a cache

def test_metrics_diff_in_a_fresh_clone_without_a_dvc_cache(project, env) -> None:
    root = project.root
    restore(root, env)
    name = experiment_name(run(f"{DVC} exp run -S lr={project.other_lr}", root, env))
    run(f"{DVC} exp branch {name} other-lr", root, env)
    restore(root, env)
    repo = clone(root, project.base / "metrics-clone", env)
    assert not (repo / ".dvc/cache").exists() and not list((repo / "data").rglob("*.pt"))  # git's files only

    # What changed, from the metrics files git holds at the two revisions.
    def metrics_at(rev: str) -> dict:
        files = run(f"git ls-tree -r --name-only {rev} metrics", repo, env, stdout_only=True).split()
        files = [f for f in files if re.fullmatch(r"metrics/test/\w+\.json|metrics/training/\w+/metrics\.json", f)]
        return {f: flat(json.loads(run(f"git show {rev}:{f}", repo, env, stdout_only=True))) for f in files}

    old, new = metrics_at("main"), metrics_at("origin/other-lr")
    assert set(old) == set(new) == {*(f"metrics/test/{m}.json" for m in ("itempop", "mlp", "mf")),
                                    *(f"metrics/training/{m}/metrics.json" for m in ("itempop", "mlp", "mf"))}
    changed = {(f, k): (old[f][k], new[f][k]) for f in old for k in old[f] if old[f][k] != new[f][k]}
    assert {f for f, _ in changed} == {"metrics/test/mlp.json", "metrics/training/mlp/metrics.json"}, changed

    proc = sh(f"{DVC} metrics diff main origin/other-lr --json", repo, env)
    assert proc.returncode == 0 and "ERROR" not in proc.stderr, proc.stdout + proc.stderr
    diff = json.loads(proc.stdout)
    assert {(f, k): (v["old"], v["new"]) for f, rows in diff.items() for k, v in rows.items()} == changed, diff

    text = run(f"{DVC} metrics diff main origin/other-lr", repo, env, stdout_only=True)
    lines = text.splitlines()
    assert lines[0].split() == ["Path", "Metric", "main", "origin/other-lr", "Change"], text
    rows = {tuple(line.split()[:2]) for line in lines[1:] if line.strip()}
    assert rows == set(changed), text
    assert not (repo / ".dvc/cache").exists()  # it read git only


# ------------------------------------------------------------- evaluate's data/models dependency

def test_evaluate_hashes_the_checkpoints_only(project, env) -> None:
    root = project.root
    restore(root, env)
    models = root / "data/models"
    dep = models_dep(root)
    names = checkpoints(models)
    assert names == sorted(f"{m}{kind}.pt" for m in ("itempop", "mlp", "mf") for kind in ("", ".trainonly"))
    assert (models / ".gitignore").is_file()  # DVC's, listing the checkpoints: not in the hash
    assert dep["md5"] == dir_md5(models, names) and dep["nfiles"] == len(names), dep
    strays = [models / "notes.txt", models / ".mlp.pt.123.abc.tmp", models / "mlp.pt.tmp"]
    try:
        strays[0].write_text("a note left beside the checkpoints\n")
        strays[1].write_bytes((models / "mlp.pt").read_bytes()[:100])  # an interrupted write's temporary
        strays[2].write_bytes(b"partial")
        assert run(f"{DVC} status", root, env, stdout_only=True).strip() == UP_TO_DATE
        out = run(f"{DVC} repro", root, env)
        assert ran_stages(out) == set() and "Stage 'evaluate' didn't change, skipping" in out, out
        assert models_dep(root) == dep
        # The check can fail: a new checkpoint is in the hash.
        strays.append(models / "extra.pt")
        strays[-1].write_bytes((models / "mf.pt").read_bytes())
        status = run(f"{DVC} status", root, env, stdout_only=True)
        assert re.search(r"^evaluate:\n\s+changed deps:\n\s+modified:\s+data/models$", status, re.M), status
    finally:
        for path in strays:
            path.unlink(missing_ok=True)
    assert run(f"{DVC} status", root, env, stdout_only=True).strip() == UP_TO_DATE


def check_dropped(root: Path, project: SimpleNamespace, env: dict) -> None:
    """After dropping MF: ItemPop's and the MLP's test metrics unchanged, MF's gone from what DVC tracks."""
    digest = outputs_digest(root)
    for model in ("itempop", "mlp"):
        path = f"metrics/test/{model}.json"
        assert digest[path] == project.digest[path], path
    assert sorted(p.name for p in (root / "metrics/test").iterdir()) == ["itempop.json", "mlp.json"]
    assert shown_metric_files(root, env) == {"metrics/test/itempop.json", "metrics/test/mlp.json",
                                             "metrics/training/itempop/metrics.json",
                                             "metrics/training/mlp/metrics.json"}
    listed = run(f"{DVC} stage list --name-only", root, env, stdout_only=True).split()
    assert "train@mf" not in listed, listed
    # dvc.lock keeps the removed stage's entry (DVC does not prune it: treeverse/dvc#5293); no command reads it.
    assert "train@mf" in lock_stages(root)
    assert list(json.loads((root / "metrics/intervals.json").read_text())["models"]) == ["itempop", "mlp"]


def test_dropping_a_model_with_exp_run(project, env) -> None:
    """`dvc exp run` checks out first: DVC deletes the dropped stage's checkpoints, which it had linked."""
    root = project.root
    restore(root, env)
    run(f"{DVC} exp run -S 'models=[]' -S recommend_model=mlp", root, env)
    check_dropped(root, project, env)
    models = root / "data/models"
    assert checkpoints(models) == ["itempop.pt", "itempop.trainonly.pt", "mlp.pt", "mlp.trainonly.pt"]
    assert not (root / "metrics/training/mf/metrics.json").exists()
    dep = models_dep(root)
    assert dep["md5"] == dir_md5(models, checkpoints(models)) and dep["nfiles"] == 4, dep
    assert run(f"{DVC} status", root, env, stdout_only=True).strip() == UP_TO_DATE


def test_dropping_a_model_with_repro_keeps_its_leftover_checkpoints_in_the_hash(project, env) -> None:
    """`dvc repro` leaves mf.pt in data/models: evaluate's lock hash counts it, a fresh clone's does not."""
    root = project.root
    restore(root, env)
    committed = models_dep(root)
    set_params(root, models=[], recommend_model="mlp")
    out = run(f"{DVC} repro", root, env)
    assert "train@mf" not in ran_stages(out) and ("Running stage 'evaluate'" in out or CACHED.format("evaluate") in out)
    check_dropped(root, project, env)
    models = root / "data/models"
    assert {"mf.pt", "mf.trainonly.pt"} <= set(checkpoints(models))  # left behind by DVC
    assert (root / "metrics/training/mf/metrics.json").is_file()  # left too (git-tracked; no longer a metric)
    dep = models_dep(root)
    # The leftover is in the hash: it is the hash of the six checkpoints, as before dropping MF.
    assert dep["md5"] == dir_md5(models, checkpoints(models)) == committed["md5"] and dep["nfiles"] == 6, dep
    remaining = ["itempop.pt", "itempop.trainonly.pt", "mlp.pt", "mlp.trainonly.pt"]
    assert dep["md5"] != dir_md5(models, remaining)
    run("git checkout -q -b dropped-by-repro && git add -A && git commit -q -m 'models: []' && "
        f"{DVC} push", root, env)

    # A fresh clone of that commit, with its outputs pulled: no mf.pt, another hash, evaluate out of date.
    repo = clone(root, project.base / "dropped-clone", env, branch="dropped-by-repro")
    run(f"{DVC} pull", repo, env)
    assert checkpoints(repo / "data/models") == remaining
    status = run(f"{DVC} status", repo, env, stdout_only=True)
    assert re.search(r"^evaluate:\n\s+changed deps:\n\s+modified:\s+data/models$", status, re.M), status
    assert dir_md5(repo / "data/models", remaining) != dep["md5"]

    # The same in the workspace once `dvc checkout` has removed the leftovers (DVC had linked them).
    run(f"{DVC} checkout", root, env)
    assert checkpoints(models) == remaining
    status = run(f"{DVC} status", root, env, stdout_only=True)
    assert re.search(r"^evaluate:\n\s+changed deps:\n\s+modified:\s+data/models$", status, re.M), status
    restore(root, env)


# --------------------------------------------------------------------------- the artifact

def read_artifact(root: Path):
    from dvc.repo import Repo
    with Repo(str(root)) as repo:
        artifacts = repo.artifacts.read()
    assert list(artifacts) == ["dvc.yaml"] and list(artifacts["dvc.yaml"]) == ["recommender"], artifacts
    return artifacts["dvc.yaml"]["recommender"]


def test_recommender_artifact_follows_recommend_model_and_dvc_artifacts_get_fetches_it(project, env) -> None:
    root = project.root
    restore(root, env)
    model = project.params["recommend_model"]
    assert model == "mf"
    artifact = read_artifact(root)
    assert artifact.path == f"data/models/{model}.pt" and artifact.type == "model", artifact
    committed_bytes = (root / artifact.path).read_bytes()
    run("git tag -a recommender@v0.1.0 -m 'recommender v0.1.0'", root, env)

    name = experiment_name(run(f"{DVC} exp run -S recommend_model=mlp", root, env))
    artifact = read_artifact(root)
    assert artifact.path == "data/models/mlp.pt", artifact
    mlp_bytes = (root / artifact.path).read_bytes()
    assert mlp_bytes != committed_bytes
    run(f"{DVC} push && {DVC} exp branch {name} recommend-mlp", root, env)
    run("git tag -a recommender@v0.2.0 -m 'recommender v0.2.0' recommend-mlp", root, env)
    restore(root, env)

    out = project.base / "artifacts"
    out.mkdir(exist_ok=True)
    # A version: --rev; no --rev: the latest version.
    run(f"{DVC} artifacts get {root} recommender --rev v0.1.0 -o {out / 'v0.1.0.pt'}", out, env)
    assert (out / "v0.1.0.pt").read_bytes() == committed_bytes
    run(f"{DVC} artifacts get {root} recommender -o {out / 'latest.pt'}", out, env)
    assert (out / "latest.pt").read_bytes() == mlp_bytes
    # From a clone without any DVC cache: the bytes come from the DVC remote in .dvc/config.
    repo = clone(root, project.base / "artifact-clone", env)
    assert not (repo / ".dvc/cache").exists()
    run(f"{DVC} artifacts get {repo} recommender --rev v0.2.0 -o {out / 'v0.2.0.pt'}", out, env)
    assert (out / "v0.2.0.pt").read_bytes() == mlp_bytes
    # The tag's name is not the artifact's name: `recommender@v0.1.0` is not found.
    proc = sh(f"{DVC} artifacts get {root} recommender@v0.1.0 -o {out / 'no.pt'}", out, env)
    assert proc.returncode != 0 and "Unable to find artifact" in proc.stderr, proc.stdout + proc.stderr
    assert not (out / "no.pt").exists()
