"""End to end: the user's contract, through the real `dvc` commands, on a copy of the repo and a tiny dataset.

The contract: stages download, build_matrix, sample_negatives, train_itempop, train_mlp and evaluate,
in that order; the MLP's knobs (layers, lr, negatives, ...) and topK are top-level keys of
params.yaml, so that `dvc exp run -S lr=0.01` re-runs the MLP's training and what reads it, and
nothing else; a bad value or unknown key is a one-line error naming it; `dvc metrics diff`,
`dvc exp show` and `dvc plots` work; a forced re-run reproduces every byte.
"""
from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from conftest import REPO, set_params
from dvc_project import (ALL_MODELS, DVC, MLP_RERUN, NEURAL, curve_files, dvc_env, make_project, outputs_digest,
                         ran_stages, restore, run, sh, stages)

STAGES = stages()
CONTRACT_STAGES = ["download", "build_matrix", "sample_negatives", "train_itempop", "train_mlp", "evaluate"]
MLP_KNOBS = ("layers", "lr", "negatives", "epochs", "batch_size", "dropout", "weight_decay")
# Keys no DVC metric may have: they repeat params (K, the fully ranked users, DVCLive's step = epochs,
# the selection protocol, refit); nor may one be named as a top-level key of params.yaml.
NOT_METRICS = {"k", "full_rank_users", "step", "select_by", "refit"}


@pytest.fixture(scope="module")
def env(tiny_mirror) -> dict:
    return dvc_env(tiny_mirror)


@pytest.fixture(scope="module")
def project(tmp_path_factory, env) -> SimpleNamespace:
    """A git repo with the pipeline and tiny params: `dvc repro` twice, then everything committed on main."""
    root = make_project(tmp_path_factory.mktemp("project") / "repo", env)
    first = run(f"{DVC} repro", root, env)
    second = run(f"{DVC} repro", root, env)
    run("git add -A && git commit -q -m results", root, env)
    params = yaml.safe_load((root / "params.yaml").read_text())
    return SimpleNamespace(root=root, first=first, second=second, params=params, digest=outputs_digest(root))


def check_metrics(root: Path, models: list[str]) -> dict:
    """metrics/test/ and metrics/hr_at_k/ hold exactly `models`, each with every metric, sane. Return
    {model: its metrics/test/<model>.json}, in evaluate's order."""
    assert sorted(p.name for p in (root / "metrics/test").iterdir()) == sorted(f"{m}.json" for m in models)
    metrics = {model: json.loads((root / f"metrics/test/{model}.json").read_text()) for model in models}
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
    intervals = json.loads((root / "metrics/intervals.json").read_text())
    assert list(intervals["models"]) == models, intervals["models"].keys()
    # K and the fully ranked users (every test user of the tiny data: fewer than full_rank_users) are
    # in intervals.json, not in the metrics (they repeat params).
    assert intervals["k"] == 10 and intervals["full_rank_users"] == intervals["users"] == 60, \
        {key: intervals[key] for key in ("k", "users", "full_rank_users")}
    return metrics


def read_curve(root: Path, model: str) -> dict[str, list[tuple[int, float]]]:
    """A model's DVCLive curves: {"hr": [(step, value), ...], "full/hr": ..., "loss": ...}."""
    curves = {}
    for path in curve_files(model):
        name = path.split("/plots/metrics/")[1].removesuffix(".tsv")
        header, *rows = (root / path).read_text().splitlines()
        assert header == f"step\t{name.split('/')[-1]}", (path, header)  # DVCLive's header: the metric's name
        curves[name] = [(int(step), float(value)) for step, value in (row.split("\t") for row in rows)]
    return curves


def check_training_outputs(root: Path, models: list[str], params: dict) -> None:
    """Each model's two checkpoints load as tensors only; its DVCLive directory has a step per epoch (one if
    closed form) in every curve, and its summary is the chosen epoch's validation metrics."""
    import torch
    for model in models:
        for path in (f"data/models/{model}.pt", f"data/models/{model}.trainonly.pt"):
            state = torch.load(root / path, weights_only=True)
            assert state and all(isinstance(v, torch.Tensor) for v in state.values()), path
        live = root / f"metrics/training/{model}"
        files = sorted(str(p.relative_to(root)) for p in live.rglob("*") if p.is_file())
        assert files == sorted([f"metrics/training/{model}/metrics.json", *curve_files(model)]), files
        epochs = params["epochs"] if model == "mlp" else params[model]["epochs"] if model in NEURAL else 1
        curves = read_curve(root, model)
        for name, rows in curves.items():
            assert [step for step, _ in rows] == list(range(1, epochs + 1)), (model, name, rows)
            assert name == "loss" or all(0.0 <= value <= 1.0 for _, value in rows), (model, name, rows)
        summary = json.loads((live / "metrics.json").read_text())
        assert set(summary) == ({"epoch"} if model in NEURAL else set()) | {"hr", "ndcg", "full"}, summary
        assert set(summary["full"]) == {"hr", "ndcg"}, summary
        epoch = summary.get("epoch", 1)
        assert 1 <= epoch <= epochs, summary
        at = {name: dict(rows)[epoch] for name, rows in curves.items()}
        assert (summary["hr"], summary["ndcg"], summary["full"]["hr"], summary["full"]["ndcg"]) == \
            (at["hr"], at["ndcg"], at["full/hr"], at["full/ndcg"]), (model, summary, at)
        # select_by: sampled picks the epoch of the best validation HR (sampled candidates).
        assert params["select_by"] == "sampled" and summary["hr"] == max(v for _, v in curves["hr"]), curves


def metric_keys(data: dict) -> set[str]:
    """Every key of a metrics file, nested ones too."""
    keys = set(data)
    for value in data.values():
        keys |= metric_keys(value) if isinstance(value, dict) else set()
    return keys


def dvc_error(proc, *names: str) -> str:
    """Assert `dvc exp run` failed with the stage's one-line error naming `names`; no traceback. Return it."""
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "Traceback" not in out, out
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, out  # the stage's own message: one line (then dvc's "ERROR: failed to reproduce")
    assert all(name in errors[0] for name in names), (names, errors[0])
    return errors[0]


# ------------------------------------------------------------------------------- the contract

def test_contract_stages_exist_in_order(project, env) -> None:
    root = project.root
    listed = run(f"{DVC} stage list --name-only", root, env, stdout_only=True).split()
    assert set(listed) == STAGES, listed
    assert listed[:5] == CONTRACT_STAGES[:5] and listed.index("evaluate") > 4, listed  # dvc.yaml's order
    # `dvc dag`: each contract stage reads the previous one's outputs.
    dot = run(f"{DVC} dag --dot", root, env, stdout_only=True)
    edges = set(re.findall(r'"([\w@-]+)" -> "([\w@-]+)"', dot))
    for edge in [("download", "build_matrix"), ("build_matrix", "sample_negatives"),
                 ("sample_negatives", "train_itempop"), ("sample_negatives", "train_mlp"),
                 ("train_itempop", "evaluate"), ("train_mlp", "evaluate"), ("sample_negatives", "evaluate"),
                 ("train_mlp", "fuse@neumf"), ("train@gmf", "fuse@neumf"), ("fuse@neumf", "evaluate")]:
        assert edge in edges, (edge, dot)
    # The two core trainings are independent of each other and of the added models.
    assert not {(a, b) for a, b in edges if a.startswith("train") and b.startswith("train")}, edges
    # The same chain in dvc.lock: each stage reads what the previous one wrote.
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]

    def deps(name):
        return {d["path"] for d in lock[name]["deps"]}

    def outs(name):
        return {o["path"] for o in lock[name]["outs"]}

    assert outs("download") == {"data/raw"} and "data/raw" in deps("build_matrix")
    assert outs("build_matrix") == {"data/prepared"} and "data/prepared" in deps("sample_negatives")
    assert outs("sample_negatives") == {"data/candidates"}
    for model in ("itempop", "mlp"):
        assert {"data/prepared", "data/candidates"} <= deps(f"train_{model}")
        assert {f"data/models/{model}.pt", f"data/models/{model}.trainonly.pt"} <= outs(f"train_{model}")
        assert {f"metrics/training/{model}/metrics.json", f"metrics/training/{model}/plots/metrics"} <= \
            outs(f"train_{model}")
    assert {"data/prepared", "data/candidates", "data/models"} <= deps("evaluate")
    assert {"metrics/test", "metrics/intervals.json", "data/ranks.npz"} <= outs("evaluate")
    # train_mlp reads the MLP's knobs, train_itempop none of them.
    assert set(MLP_KNOBS) | {"topK"} <= set(lock["train_mlp"]["params"]["params.yaml"])
    assert not set(MLP_KNOBS) & set(lock["train_itempop"]["params"]["params.yaml"])


def test_params_yaml_has_the_mlp_knobs_at_the_top_level() -> None:
    text = (REPO / "params.yaml").read_text()
    params = yaml.safe_load(text)
    for key in (*MLP_KNOBS, "topK"):
        assert key in params and not isinstance(params[key], dict), key
    assert "mlp" not in params and "itempop" not in params
    assert isinstance(params["layers"], list) and params["layers"][0] % 2 == 0
    # The comment above them says they are the MLP's knobs, tuned with `dvc exp run -S lr=...`.
    before = text[:text.index("\nlayers:")]
    comment = before[before.rstrip().rfind("\n\n") + 1:]
    assert all(line.startswith("#") for line in comment.strip().splitlines()), comment
    assert "MLP" in comment and "knobs" in comment and "top-level" in comment, comment
    assert "dvc exp run -S lr=" in comment, comment


def test_repro_runs_every_stage_then_nothing(project, env) -> None:
    assert ran_stages(project.first) == STAGES, project.first
    assert ran_stages(project.second) == set() and "Data and pipelines are up to date" in project.second, \
        project.second
    restore(project.root, env)
    check_metrics(project.root, ALL_MODELS)
    check_training_outputs(project.root, ALL_MODELS, project.params)
    assert (project.root / "data/ranks.npz").is_file() and (project.root / "data/recommendations.csv").is_file()
    # The DVC metrics: each model's test metrics and its DVCLive summary (the chosen epoch's validation
    # metrics); the intervals are a plain (DVC-cached) output. No metric repeats a param.
    shown = json.loads(run(f"{DVC} metrics show --json", project.root, env, stdout_only=True))[""]["data"]
    assert set(shown) == {f"metrics/test/{m}.json" for m in ALL_MODELS} | \
        {f"metrics/training/{m}/metrics.json" for m in ALL_MODELS}, list(shown)
    for path, entry in shown.items():
        assert set(entry) == {"data"}, (path, entry)  # no error
        keys = metric_keys(entry["data"])
        assert not keys & (NOT_METRICS | set(project.params)), (path, keys & (NOT_METRICS | set(project.params)))
    # The plain table fits a terminal: no line over 120 characters.
    table = run(f"{DVC} metrics show", project.root, env, stdout_only=True)
    assert all(path in table for path in shown), table
    assert max(len(line) for line in table.splitlines()) <= 120, table


def test_mlp_knobs_rerun_only_train_mlp_and_its_readers(project, env) -> None:
    """`dvc exp run -S <MLP knob>`: train_mlp, fuse@neumf (starts from the MLP), evaluate, report."""
    root = project.root
    baseline_model = project.digest["data/models/mlp.pt"]
    assert project.params["recommend_model"] not in ("mlp", "neumf")  # so recommend is not re-run
    names = {}
    for setting in ["lr=0.01", "lr=0.00001", "'layers=[64,32,16,8]'", "negatives=4"]:
        restore(root, env)
        out = run(f"{DVC} exp run -S {setting}", root, env)
        assert ran_stages(out) == MLP_RERUN, (setting, out)
        names[setting] = re.search(r"Ran experiment\(s\): (\S+)", out).group(1)
        assert outputs_digest(root)["data/models/mlp.pt"] != baseline_model, setting  # really trained anew
        check_metrics(root, ALL_MODELS)
        if setting == "lr=0.00001":
            # DVC writes `lr: 1e-05`, which YAML 1.1 reads as a string: the pipeline accepts it.
            assert re.search(r"^lr: 1e-05$", (root / "params.yaml").read_text(), re.M), \
                (root / "params.yaml").read_text()
        params = yaml.safe_load((root / "params.yaml").read_text())
        assert {k: v for k, v in params.items() if k in ("gmf", "mf", "ease", "neumf")} == \
            {k: project.params[k] for k in ("gmf", "mf", "ease", "neumf")}  # the sections are untouched
    assert yaml.safe_load((root / "params.yaml").read_text())["negatives"] == 4

    # `dvc exp show` lists them with their params and metrics; `dvc plots diff` draws two of them.
    shown = json.loads(run(f"{DVC} exp show --json", root, env, stdout_only=True))
    experiments = {e["name"]: e["revs"][0]["data"] for rev in shown for e in (rev.get("experiments") or [])}
    assert set(names.values()) <= set(experiments), (names, list(experiments))
    lr = experiments[names["lr=0.01"]]
    assert lr["params"]["params.yaml"]["data"]["lr"] == 0.01
    lr_hr = lr["metrics"]["metrics/test/mlp.json"]["data"]["hr"]
    assert str(experiments[names["lr=0.00001"]]["params"]["params.yaml"]["data"]["lr"]) in ("1e-05", "1e-5")
    assert experiments[names["'layers=[64,32,16,8]'"]]["params"]["params.yaml"]["data"]["layers"] == [64, 32, 16, 8]
    for data in experiments.values():
        assert set(data["metrics"]) == {f"metrics/{kind}" for m in ALL_MODELS
                                        for kind in (f"test/{m}.json", f"training/{m}/metrics.json")}, data["metrics"]
        test = data["metrics"]["metrics/test/mlp.json"]["data"]
        assert set(test) == {"hr", "ndcg", "mrr", "full"}, test
    header, *table = csv.reader(io.StringIO(run(f"{DVC} exp show --csv", root, env, stdout_only=True)))
    # Metric columns are FILE:KEY (the models' files share key names); params are bare (one params file).
    assert {"lr", "layers", "negatives", "topK", "metrics/test/mlp.json:hr", "metrics/test/itempop.json:hr",
            "gmf.lr"} <= set(header), header
    row = next(row for row in table if names["lr=0.01"] in row)
    assert float(row[header.index("lr")]) == 0.01 and float(row[header.index("metrics/test/mlp.json:hr")]) == lr_hr, \
        row
    first, second = names["lr=0.01"], names["negatives=4"]
    run(f"{DVC} plots diff {first} {second}", root, env)
    html = (root / "dvc_plots/index.html").read_text()
    assert f'"{first}"' in html and f'"{second}"' in html


def test_gmf_section_reruns_gmf_and_neumf(project, env) -> None:
    restore(project.root, env)
    out = run(f"{DVC} exp run -S gmf.lr=0.001", project.root, env)
    assert ran_stages(out) == {"train@gmf", "fuse@neumf", "evaluate", "report"}, out
    params = yaml.safe_load((project.root / "params.yaml").read_text())
    assert params["gmf"]["lr"] == 0.001 and params["lr"] == project.params["lr"]


def test_dropping_models(project, env) -> None:
    root = project.root
    restore(root, env)
    assert project.params["recommend_model"] in ("mf", "ease")  # still trained below
    out = run(f"{DVC} exp run -S 'models=[mf,ease]' -S 'fused=[]'", root, env)
    # Nothing trains: the kept models' stages did not change. Evaluate drops the removed models.
    assert ran_stages(out) == {"evaluate", "report"}, out
    listed = run(f"{DVC} stage list --name-only", root, env, stdout_only=True).split()
    assert "train@gmf" not in listed and "fuse@neumf" not in listed, listed
    assert set(listed) == stages(["mf", "ease"], []), listed  # (dvc.lock keeps the old entries: DVC's way)
    metrics = check_metrics(root, ["itempop", "mlp", "mf", "ease"])  # (the dropped models' files are gone)
    assert list(metrics) == ["itempop", "mlp", "mf", "ease"]
    assert "GMF" not in (root / "metrics/report.md").read_text()
    # A dropped model is no longer drawn, though its old curves are still in the workspace.
    assert all((root / path).exists() for path in curve_files("gmf"))
    assert drawn_files(root, env) == plotted(["itempop", "mlp", "mf", "ease"])


def drawn_files(root: Path, env: dict) -> set[str]:
    """`dvc plots show`: with no warning or error, the data files it draws, relative to metrics/
    ('training/mlp/plots/metrics/hr.tsv', 'hr_at_k/mlp.csv', ...)."""
    proc = sh(f"{DVC} plots show --json", root, env)
    assert proc.returncode == 0 and not re.search(r"warning|error|failed", proc.stdout + proc.stderr, re.I), \
        proc.stdout + proc.stderr
    shown = json.loads(proc.stdout)
    assert not shown.get("errors"), shown["errors"]
    images = {plot_id for plot_id in shown["data"] if plot_id.endswith(".png")}
    assert images == {"metrics/plots/training.png", "metrics/plots/hr_at_k.png"}, images  # the report's charts
    files = {re.fullmatch(r"metrics/(training/\w+/plots/metrics/(?:full/)?\w+\.tsv|hr_at_k/\w+\.csv)", plot_id)
             for plot_id in set(shown["data"]) - images}
    assert None not in files, list(shown["data"])
    return {match.group(1) for match in files}


def plotted(models: list[str]) -> set[str]:
    """What drawn_files should find for `models`: each one's DVCLive curves and its test HR@K."""
    return {path.removeprefix("metrics/") for m in models for path in curve_files(m)} | \
        {f"hr_at_k/{m}.csv" for m in models}


def test_editing_one_model_reruns_only_its_stages(project, env) -> None:
    """A comment appended to one model's module changes that model's stages (and those that read their
    outputs), and no other training stage: NeuMF's changes with the MLP's, since it starts from it."""
    root = project.root
    for module, expected in (("ease", {"train@ease"}), ("mlp", {"train_mlp", "fuse@neumf"}),
                             ("gmf", {"train@gmf", "fuse@neumf"})):
        restore(root, env)
        assert "Data and pipelines are up to date" in run(f"{DVC} status", root, env)
        with open(root / f"pipeline/models/{module}.py", "a", encoding="utf-8") as fh:
            fh.write("# an edit\n")
        status = run(f"{DVC} status", root, env, stdout_only=True)
        changed = set(re.findall(r"^([\w@-]+):$", status, re.M))
        assert {s for s in changed if s.startswith(("train", "fuse"))} == expected, (module, status)
        assert "evaluate" in changed, status  # it reads every model's checkpoint
    restore(root, env)


def test_bad_values_and_unknown_keys_are_one_line_errors(project, env) -> None:
    root = project.root
    cases = {  # setting -> what the error names
        "lr=abc": ("'lr'", "a number in (0, 1]", "'abc'"),
        "negatives=0": ("'negatives'", "an integer in [1, 1000]"),
        "'layers=[15,8]'": ("'layers'", "even"),
        "+gmf.lrr=0.01": ("'gmf.lrr'", "unknown key"),
    }
    for setting, names in cases.items():
        restore(root, env)
        dvc_error(sh(f"{DVC} exp run -S {setting}", root, env), *names)
    # `-S mlp.lr=0.01`, the MLP's old section: DVC itself refuses a key that params.yaml lacks (it
    # says to use +mlp.lr to add one), naming it, in a few lines and no traceback.
    restore(root, env)
    proc = sh(f"{DVC} exp run -S mlp.lr=0.01", root, env)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in out and "mlp.lr" in out, out
    if "error: " in out:  # a DVC that writes the new section: the pipeline's own error
        assert "'mlp'" in dvc_error(proc) and "top-level" in out, out
    restore(root, env)


def test_added_unknown_top_level_key_is_an_error(project, env) -> None:
    """`-S +mlp.lr=0.01` (DVC's way to add a key) writes an `mlp:` section: the run must fail and say
    that the MLP's knobs are top-level."""
    root = project.root
    restore(root, env)
    try:
        proc = sh(f"{DVC} exp run -S +mlp.lr=0.01", root, env)
        error = dvc_error(proc, "'mlp'")
        assert "top-level" in error, error
    finally:
        restore(root, env)


def test_metrics_diff_and_plots_between_branches(project, env, tmp_path) -> None:
    """A branch with other params; `dvc metrics diff` in a fresh clone (no DVC cache); plots of both."""
    root = project.root
    restore(root, env)
    run("git checkout -q -b other", root, env)
    try:
        # topK and refit change ItemPop's HR, NDCG and MRR too: `metrics diff` shows only what changed.
        set_params(root, lr=0.01, topK=5, refit=False)
        out = run(f"{DVC} repro", root, env)
        assert ran_stages(out) == stages(data=False), out
        run("git add -A && git commit -q -m other", root, env)
        clone = tmp_path / "clone"
        run(f"git clone -q --no-single-branch {root} {clone}", tmp_path, env)
        assert not (clone / ".dvc/cache").exists()
        diff = run(f"{DVC} metrics diff main other", clone, env, stdout_only=True)
        for model in ("itempop", "mlp"):
            for key in ("hr", "ndcg", "mrr"):
                assert re.search(rf"^metrics/test/{model}\.json\s+{key}\s", diff, re.M), (model, key, diff)
        # K is a param, no longer a metric: `dvc params diff` shows it.
        params_diff = run(f"{DVC} params diff main other", clone, env, stdout_only=True)
        assert re.search(r"^params\.yaml\s+topK\s+10\s+5\s*$", params_diff, re.M), params_diff
        diff = run(f"{DVC} metrics diff --all main other", clone, env, stdout_only=True)
        for model in ALL_MODELS:
            for key in ("hr", "ndcg", "mrr", "full.hr", "full.ndcg", "full.mrr"):
                assert re.search(rf"^metrics/test/{model}\.json\s+{re.escape(key)}\s", diff, re.M), (model, key, diff)
        # A row per file and key: each model's test metrics and its validation summary (DVCLive's).
        assert {line.split()[0] for line in diff.splitlines()[1:] if line.strip()} == \
            {f"metrics/{kind}" for m in ALL_MODELS for kind in (f"test/{m}.json", f"training/{m}/metrics.json")}, diff

        # Plots: each model's validation curves (DVCLive's, by step) and test HR@K; across branches.
        assert drawn_files(root, env) == plotted(ALL_MODELS)
        run(f"{DVC} plots show", root, env)
        html = (root / "dvc_plots/index.html").read_text()
        assert all(f'"{field}"' in html for field in ("step", "loss", "hr", "ndcg", "k")), html[:2000]
        run(f"{DVC} plots diff main other", root, env)
        html = (root / "dvc_plots/index.html").read_text()
        assert '"main"' in html and '"other"' in html
    finally:
        restore(root, env)


def test_forced_repro_reproduces_every_byte(project, env) -> None:
    root = project.root
    restore(root, env)
    assert outputs_digest(root) == project.digest  # the first run's outputs, from git and the DVC cache
    run(f"{DVC} repro -f", root, env)
    first = outputs_digest(root)
    run(f"{DVC} repro -f", root, env)
    assert outputs_digest(root) == first
    assert first == project.digest
    assert {f"data/models/{m}{ext}" for m in ALL_MODELS for ext in (".pt", ".trainonly.pt")} <= set(first)
    assert {f"metrics/test/{m}.json" for m in ALL_MODELS} | {"metrics/intervals.json", "metrics/report.md",
                                                              "data/ranks.npz"} <= set(first)
    assert {path for m in ALL_MODELS for path in (f"metrics/training/{m}/metrics.json", *curve_files(m))} <= set(first)


# ------------------------------------------------------------------------- fewer models, datasets

SMALL = ["itempop", "mlp", "gmf"]  # models: [gmf], fused: []


@pytest.fixture(scope="module")
def small_project(tmp_path_factory, env) -> Path:
    root = make_project(tmp_path_factory.mktemp("small") / "repo", env, models=["gmf"], fused=[])
    out = run(f"{DVC} repro", root, env)
    assert ran_stages(out) == stages(["gmf"], []), out
    run("git add -A && git commit -q -m tiny", root, env)
    return root


def test_plots_show_every_evaluated_model_with_fewer_models(small_project, env) -> None:
    root = small_project
    restore(root, env)
    check_metrics(root, SMALL)
    # Each trained model's validation curve and test HR@K: no plot of a model that was not trained.
    drawn = drawn_files(root, env)
    assert drawn == plotted(SMALL)
    out = run(f"{DVC} plots show", root, env)
    html = (root / "dvc_plots/index.html").read_text()
    specs = html.split("var spec = ")[1:]
    assert len(specs) == len(drawn) and not any(spec.startswith("{}") for spec in specs), out  # one each, none empty
    assert html.count("<img") == 2  # the report's PNG charts


def test_dataset_switch_remote_and_fresh_clone(small_project, env, tmp_path) -> None:
    """Changing `dataset` re-runs every stage and never mixes caches; a remote shares the results."""
    root = small_project
    restore(root, env)

    def test_files() -> dict[str, str]:
        return {p.name: p.read_text() for p in sorted((root / "metrics/test").iterdir())}

    tiny = test_files()

    # Another dataset: every stage runs, on different data.
    out = run(f"{DVC} exp run -S dataset=custom", root, env)
    assert ran_stages(out) == stages(["gmf"], []), out
    assert json.loads((root / "data/raw/source.json").read_text())["dataset"] == "custom"
    users = (root / "data/prepared/users.csv").read_text().splitlines()
    assert users[1] == "0,user-01" and len(users) == 61
    assert test_files().keys() == tiny.keys() and test_files() != tiny

    # Back to the first dataset: DVC restores every stage from its run cache, running none (the
    # uncached outputs, metrics and plots, are in the run cache too; intervals.json and report.md are
    # cached outputs): the same bytes.
    set_params(root, dataset="ml-100k")
    out = run(f"{DVC} repro", root, env)
    assert ran_stages(out) == set(), out
    restored = set(re.findall(r"Stage '([\w@-]+)' is cached - skipping run, checking out outputs", out))
    assert restored == stages(["gmf"], []), out
    assert test_files() == tiny
    assert json.loads((root / "data/raw/source.json").read_text())["dataset"] == "ml-100k"
    assert run("git status --porcelain", root, env, stdout_only=True).strip() == ""

    # A local-directory remote: push here, pull into a fresh clone, which is then up to date.
    remote = tmp_path / "remote"
    run(f"{DVC} remote add -d shared {remote} && git add .dvc/config && git commit -q -m remote", root, env)
    try:
        run(f"{DVC} push", root, env)
        clone = tmp_path / "clone"
        run(f"git clone -q {root} {clone}", tmp_path, env)
        run(f"{DVC} pull", clone, env)
        status = run(f"{DVC} status", clone, env)
        assert "Data and pipelines are up to date" in status, status
        assert outputs_digest(clone) == outputs_digest(root)
        check_metrics(clone, SMALL)
        assert drawn_files(clone, env) == plotted(SMALL)
    finally:
        run("git reset -q --hard HEAD~1", root, env)  # the project's remote goes with its commit
        restore(root, env)


# ------------------------------------------------------------------------- a model of one's own

TOY_MODULE = '''"""A toy model for the test: popularity raised to a power (closed form)."""
from __future__ import annotations

import numpy as np
import torch

from pipeline.models import Model
from pipeline.params import Spec


class Toy(Model):
    label = "ToyPop"
    neural = False
    params = {"power": Spec("float", 0.0, 10.0, doc="exponent of each item's count")}

    def __init__(self, weights):
        self.weights = np.asarray(weights, dtype=np.float64)

    @staticmethod
    def fit(train, section):
        counts = np.bincount(train.indices, minlength=train.shape[1]).astype(np.float64)
        return {"weights": torch.from_numpy(counts ** section["power"])}

    @classmethod
    def from_state(cls, state, history):
        return cls(state["weights"].numpy())

    @property
    def n_items(self):
        return len(self.weights)

    def score(self, users, items):
        return self.weights[items]

    def score_all(self, users):
        return torch.from_numpy(self.weights.astype(np.float32)).expand(len(users), len(self.weights))


MODEL = Toy
'''


def test_a_new_model_is_one_module_and_its_params_section(tmp_path, env) -> None:
    """A module in pipeline/models/, its section in params.yaml, its name in `models`: no other file
    is edited, and `dvc repro` trains it, evaluates it, reports it and draws it."""
    root = make_project(tmp_path / "repo", env, models=[], fused=[], recommend_model="itempop")
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and ".git" not in p.parts}
    (root / "pipeline/models/toy.py").write_text(TOY_MODULE, encoding="utf-8")
    set_params(root, models=["toy"], toy={"power": 0.5})
    out = run(f"{DVC} repro", root, env)
    assert {"train@toy", "evaluate", "report"} <= ran_stages(out), out
    assert "train: toy: closed form: val HR@10" in out, out
    changed = {str(p.relative_to(root)) for p, data in before.items() if p.read_bytes() != data}
    assert changed == {"params.yaml"}, changed  # (dvc.lock and the outputs are new files)
    metrics = check_metrics(root, ["itempop", "mlp", "toy"])
    assert 0 < metrics["toy"]["hr"] <= 1
    report = (root / "metrics/report.md").read_text()
    assert "| ToyPop |" in report, report
    assert drawn_files(root, env) == plotted(["itempop", "mlp", "toy"])
    # The toy model ranks by popularity, as ItemPop does: a power of a count keeps the order.
    assert metrics["toy"]["hr"] == metrics["itempop"]["hr"]
