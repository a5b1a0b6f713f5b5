"""`python -m pipeline.compare A B` on real DVC experiments, in a temporary repo on the tiny dataset.

The printed HR@K and NDCG@K of each side must be the sides' metrics/test.json values, and B - A
their difference; a side of several runs (seeds, matched in order) shows the mean of its runs and
tests with the seeds as replicates: 3 seeds of one configuration against 3 other seeds of it, run
by DVC's own sweep (`dvc exp run --queue -S 'seed=range(1,7)'`), read "indistinguishable". Sides
scored on other test users or candidates are refused in one line.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from dvc_project import DVC, dvc_env, make_project, restore, run

MODELS = ["itempop", "mlp", "mf"]  # models: [mf], fused: []: cheap (2 epochs each)
LABELS = {"itempop": "ItemPop", "mlp": "MLP", "mf": "MF"}
SEEDS = [f"seeds-{i}" for i in range(1, 7)]  # `dvc exp run --queue -n seeds -S 'seed=range(1,7)'`
EXPERIMENTS = {  # name -> `dvc exp run` settings
    "lr01": "-S lr=0.01",
    "s1": "-S seed=1",
    "s2": "-S seed=2",
    "custom": "-S dataset=custom",  # another dataset: not comparable
    "cseed": "-S candidate_seed=7",  # other test candidates: not comparable
}
TOL = 1e-4  # the printout has 4 decimals
ROW = re.compile(r"^(\w+)\s+(HR|NDCG)@(\d+)\s+(\d\.\d{4})\s+(\d\.\d{4})\s+([+-]\d\.\d{4}) \[([+-]\d\.\d{4}), "
                 r"([+-]\d\.\d{4})\]\s+(\S+)(?:\s+(\d\.\d{3})/(\d\.\d{3}))?\s+(.+)$")
VERDICTS = ("indistinguishable", "B higher", "B lower", "the same for every user")


@pytest.fixture(scope="module")
def env(tiny_mirror) -> dict:
    return dvc_env(tiny_mirror)


@pytest.fixture(scope="module")
def project(tmp_path_factory, env) -> SimpleNamespace:
    """main: the pipeline reproduced and committed; then one DVC experiment per EXPERIMENTS entry."""
    root = make_project(tmp_path_factory.mktemp("compare") / "repo", env, models=["mf"], fused=[])
    run(f"{DVC} repro", root, env)
    run("git add -A && git commit -q -m results", root, env)
    for name, settings in EXPERIMENTS.items():
        restore(root, env)
        run(f"{DVC} exp run -n {name} {settings}", root, env)
    restore(root, env)
    run(f"{DVC} exp run --queue -n seeds -S 'seed=range(1,7)'", root, env)  # as docs/experiments.md shows
    run(f"{DVC} exp run --run-all", root, env, timeout=1200)
    restore(root, env)
    shown = json.loads(run(f"{DVC} exp show --json", root, env, stdout_only=True))
    metrics = {e["name"]: e["revs"][0]["data"]["metrics"]["metrics/test.json"]["data"]
               for rev in shown for e in (rev.get("experiments") or [])}
    assert set(EXPERIMENTS) | set(SEEDS) <= set(metrics), list(metrics)
    metrics["main"] = json.loads(run("git show main:metrics/test.json", root, env, stdout_only=True))
    return SimpleNamespace(root=root, metrics=metrics)


def compare(root: Path, env: dict, *sides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.compare", *sides], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)


def parse(out: str) -> dict[tuple[str, str, str], dict]:
    """{(protocol, model, metric): {a, b, diff, lo, hi, p, sd, verdict}} from compare's printout (p: adjusted)."""
    rows, protocol = {}, None
    for line in out.splitlines():
        if line in ("sampled candidates", "full ranking"):
            protocol = "sampled" if line.startswith("sampled") else "full"
            continue
        match = ROW.match(line)
        if match:
            assert protocol, out
            label, metric, k, a, b, diff, lo, hi, p, sd_a, sd_b, verdict = match.groups()
            model = next(m for m, name in LABELS.items() if name == label)
            rows[protocol, model, metric.lower()] = {
                "k": int(k), "a": float(a), "b": float(b), "diff": float(diff), "lo": float(lo), "hi": float(hi),
                "p": float(p), "sd": None if sd_a is None else (float(sd_a), float(sd_b)), "verdict": verdict}
    return rows


def value(metrics: dict, protocol: str, model: str, metric: str) -> float:
    entry = metrics[model] if protocol == "sampled" else metrics[model]["full"]
    return entry[metric]


def check_rows(rows: dict, a: dict, b: dict) -> None:
    """Every model and protocol is printed; A and B are the sides' test.json values; B - A their difference."""
    assert set(rows) == {(p, m, metric) for p in ("sampled", "full") for m in MODELS for metric in ("hr", "ndcg")}
    for (protocol, model, metric), row in rows.items():
        va, vb = value(a, protocol, model, metric), value(b, protocol, model, metric)
        assert row["k"] == a["k"] == b["k"]
        assert row["a"] == pytest.approx(va, abs=TOL), (protocol, model, metric, row, va)
        assert row["b"] == pytest.approx(vb, abs=TOL), (protocol, model, metric, row, vb)
        assert row["diff"] == pytest.approx(vb - va, abs=TOL), (protocol, model, metric, row, vb - va)
        assert row["lo"] <= row["diff"] <= row["hi"] and 0 <= row["p"] <= 1, row
        assert row["verdict"] in VERDICTS, row
        if row["verdict"] == "the same for every user":  # identical per-user outcomes on both sides
            assert (row["diff"], row["lo"], row["hi"], row["p"]) == (0, 0, 0, 1), row
        elif row["verdict"] == "indistinguishable":  # read by the Holm-adjusted p-value
            assert row["p"] >= 0.05, row
        else:
            assert row["p"] < 0.05 and (row["diff"] > 0) == (row["verdict"] == "B higher"), row


def test_deltas_are_the_differences_of_the_two_runs_metrics(project, env) -> None:
    proc = compare(project.root, env, "main", "lr01")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("A = main\nB = lr01\n"), out
    rows = parse(out)
    check_rows(rows, project.metrics["main"], project.metrics["lr01"])
    # lr trains the MLP alone: ItemPop and EASE are the same on both sides, user by user.
    for (protocol, model, metric), row in rows.items():
        if model != "mlp":
            assert (row["diff"], row["lo"], row["hi"], row["p"]) == (0, 0, 0, 1), row
            assert row["verdict"] == "the same for every user", row
    assert any(row["diff"] != 0 for key, row in rows.items() if key[1] == "mlp"), out


def test_workspace_side(project, env) -> None:
    root = project.root
    try:
        run(f"{DVC} exp apply lr01", root, env)
        proc = compare(root, env, "main")  # B: the workspace, which now holds lr01's results
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("A = main\nB = workspace\n"), proc.stdout
        check_rows(parse(proc.stdout), project.metrics["main"], project.metrics["lr01"])
    finally:
        restore(root, env)
    proc = compare(root, env, "main")  # the workspace is main again: no difference anywhere
    assert proc.returncode == 0, proc.stderr
    assert all(row["diff"] == 0 for row in parse(proc.stdout).values()), proc.stdout


def mean_of(runs: list[dict]) -> dict:
    """The test.json of the runs' mean (what a side of several runs shows)."""
    def mean(get):
        return sum(get(r) for r in runs) / len(runs)
    return {"k": runs[0]["k"], **{m: {key: mean(lambda r: r[m][key]) for key in ("hr", "ndcg")} | {"full": {
        key: mean(lambda r: r[m]["full"][key]) for key in ("hr", "ndcg")}} for m in MODELS}}


def test_seeds_against_other_seeds_of_one_configuration_read_indistinguishable(project, env) -> None:
    a, b = SEEDS[:3], SEEDS[3:]
    proc = compare(project.root, env, ",".join(a), ",".join(b))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"A = {','.join(a)} (3 runs)\nB = {','.join(b)} (3 runs)\n"), proc.stdout
    assert "seeds are replicates" in proc.stdout, proc.stdout
    rows = parse(proc.stdout)
    metrics = project.metrics
    check_rows(rows, mean_of([metrics[s] for s in a]), mean_of([metrics[s] for s in b]))
    assert {row["verdict"] for row in rows.values()} <= {"indistinguishable", "the same for every user"}, proc.stdout
    for (protocol, model, metric), row in rows.items():
        assert row["sd"] is not None, row
        if model == "itempop":  # no seed in ItemPop: no spread, and the same for every user
            assert row["sd"] == (0, 0) and row["verdict"] == "the same for every user", row
    assert any(row["sd"][0] > 0 for key, row in rows.items() if key[1] == "mlp"), proc.stdout  # seeds do vary
    assert metrics[SEEDS[0]]["mlp"] != metrics[SEEDS[1]]["mlp"]


def test_matched_runs_in_either_order(project, env) -> None:
    proc = compare(project.root, env, "s2,s1", "s1,s2")  # x = s1 - s2 and s2 - s1: their mean is 0
    assert proc.returncode == 0, proc.stderr
    assert all(row["diff"] == 0 for row in parse(proc.stdout).values()), proc.stdout


def test_sides_of_other_run_counts_are_refused(project, env) -> None:
    error = one_line_error(compare(project.root, env, "main", "s1,s2"))
    assert "cannot compare a side of 1 run(s) with one of 2" in error and "same number of runs" in error, error


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and proc.stdout == "", proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


@pytest.mark.parametrize("sides", [("main", "custom"), ("custom", "main"), ("main", "cseed"), ("cseed", "lr01"),
                                   ("main", "s1,cseed")])
def test_incomparable_sides_are_refused(project, env, sides) -> None:
    error = one_line_error(compare(project.root, env, *sides))
    assert error.startswith("error: cannot compare"), error
    if "custom" in sides:
        assert "'custom'" in error and "'ml-100k'" in error, error  # the datasets, named
    else:
        assert "candidate" in error, error


def test_unknown_revision_is_a_one_line_error(project, env) -> None:
    error = one_line_error(compare(project.root, env, "main", "no-such-exp"))
    assert "'no-such-exp'" in error and "no such git revision or DVC experiment" in error, error
    error = one_line_error(compare(project.root, env, "main", "s1,,s2"))
    assert "empty revision" in error, error
