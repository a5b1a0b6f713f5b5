"""`python -m pipeline.compare A B` on real DVC experiments, in a temporary repo on the tiny dataset.

The printed HR@K and NDCG@K of each side must be the sides' metrics/test/<model>.json values, and
B - A their difference; a side of several runs (seeds, matched in order) shows the mean of its runs
and tests with the seeds as replicates: 3 seeds of one configuration against 3 other seeds of it,
run by DVC's own sweep as docs/experiments.md shows it (`dvc exp run --queue -n seeds -S
'seed=range(1,7)'`, then `dvc queue start -j 1`), read "indistinguishable". While that queue runs,
`dvc exp show` shows a running experiment's live DVCLive summary (its latest epoch, `step`). Sides
scored on other test users or candidates are refused in one line.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from dvc_project import DVC, NEURAL, dvc_env, make_project, restore, run, sh

MODELS = ["itempop", "mlp", "mf"]  # models: [mf], fused: []: cheap (2 epochs each)
LABELS = {"itempop": "ItemPop", "mlp": "MLP", "mf": "MF"}
SEEDS = [f"seeds-{i}" for i in range(1, 7)]  # `dvc exp run --queue -n seeds -S 'seed=range(1,7)'`
# The sweep's neural models train this many epochs (every seed alike: the sides stay one configuration),
# so that each training stage runs for a few seconds and `dvc exp show`, polled, sees it live.
SWEEP_EPOCHS = 20
SWEEP = f"-S 'seed=range(1,7)' -S epochs={SWEEP_EPOCHS} -S mf.epochs={SWEEP_EPOCHS}"
QUEUE_TIMEOUT = 1500  # seconds for the whole sweep
LIVE_KEYS = {"loss", "hr", "ndcg", "full", "step"}  # DVCLive's summary while a model trains
POLL_TIMEOUT = 60  # seconds for one `dvc exp show` while the queue runs (a few, normally)
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


def side_metrics(data: dict) -> dict:
    """{"k": topK, model: its metrics/test/<model>.json} of one `dvc exp show --json` entry."""
    metrics = data["metrics"]
    assert {f"metrics/test/{m}.json" for m in MODELS} <= set(metrics), list(metrics)
    return {"k": data["params"]["params.yaml"]["data"]["topK"],
            **{m: metrics[f"metrics/test/{m}.json"]["data"] for m in MODELS}}


def queue_statuses(root: Path, env: dict) -> dict[str, str]:
    """{experiment name: Queued | Running | Success | Failed} from `dvc queue status`."""
    statuses = {}
    for line in run(f"{DVC} queue status", root, env, stdout_only=True).splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[1] in SEEDS:
            statuses[parts[1]] = parts[-1]
    return statuses


class LiveWatch:
    """Polls `dvc exp show --json` every 0.5 s; keeps each running experiment's training metrics seen.

    DVC puts a running experiment at shown[i]["experiments"][j] with "executor": {"state": "running",
    "local": {"root": its temporary workspace, ...}}; its revs[0]["data"]["metrics"] are read from that
    workspace (DVC's celery queue, collect_active_data), so they are DVCLive's live files. (The queued,
    failed and workspace rows are left out: fewer to collect, more polls.)

    A poll that coincides with an experiment's end can hang for good (DVC 3.67 with pygit2: it reads
    a metrics file of the finished run's commit from the temporary workspace as the queue deletes it,
    and pygit2's blob reader waits on a thread that died): each poll is killed after POLL_TIMEOUT s."""

    def __init__(self, root: Path, env: dict):
        self.root, self.env = root, env
        self.seen: list[tuple[str, str, dict]] = []  # (experiment, metrics file, its data)
        self.polls = self.running_polls = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:  # (no shell between: on a timeout, subprocess kills dvc itself)
                proc = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json", "--hide-queued",
                                       "--hide-failed", "--hide-workspace"], cwd=self.root, env=self.env,
                                      capture_output=True, text=True, timeout=POLL_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.errors.append(f"`dvc exp show` still running after {POLL_TIMEOUT} s: killed")
                continue
            self.polls += 1
            try:
                shown = json.loads(proc.stdout)
            except ValueError:
                shown = []  # (a poll that caught DVC mid-update: the next one will do)
                self.errors.append(f"exit {proc.returncode}: {proc.stderr[-300:]}")
            running = False
            for rev in shown:
                for exp in rev.get("experiments") or []:
                    if (exp.get("executor") or {}).get("state") != "running":
                        continue
                    running = True
                    metrics = ((exp["revs"][0].get("data") or {}).get("metrics")) or {}
                    for model in NEURAL:
                        data = (metrics.get(f"metrics/training/{model}/metrics.json") or {}).get("data")
                        if data:
                            self.seen.append((exp["name"], f"metrics/training/{model}/metrics.json", data))
            self.running_polls += running
            self._stop.wait(0.5)

    def __enter__(self) -> "LiveWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(150)


def run_queue(root: Path, env: dict, log: Path) -> LiveWatch:
    """`dvc queue start -j 1`; poll `dvc queue status` until no task is Queued or Running, meanwhile
    watching `dvc exp show`. Fail with the queue's logs if a task failed. Return the watch."""
    try:
        with LiveWatch(root, env) as watch:
            # Not into a pipe: the helper that waits on the worker inherits dvc's stdout, so a captured
            # `dvc queue start` would only return once the worker had exited.
            with open(log, "w+") as fh:
                rc = subprocess.run([sys.executable, "-m", "dvc", "queue", "start", "-j", "1"], cwd=root, env=env,
                                    stdout=fh, stderr=subprocess.STDOUT, timeout=120).returncode
                fh.seek(0)
                started = fh.read()
            assert rc == 0 and "Started '1' new experiments task queue worker" in started, started
            deadline = time.monotonic() + QUEUE_TIMEOUT
            while True:
                statuses = queue_statuses(root, env)
                if set(statuses) == set(SEEDS) and not {"Queued", "Running"} & set(statuses.values()):
                    break
                assert time.monotonic() < deadline, f"the sweep did not finish in {QUEUE_TIMEOUT} s: {statuses}"
                time.sleep(2)
    finally:
        sh(f"{DVC} queue stop", root, env, timeout=120)  # the idle worker would linger a minute
    failed = [name for name, status in statuses.items() if status != "Success"]
    assert not failed, "\n".join(f"{name}: {statuses[name]}\n" + sh(f"{DVC} queue logs {name}", root, env).stdout
                                 for name in failed)
    return watch


@pytest.fixture(scope="module")
def project(tmp_path_factory, env) -> SimpleNamespace:
    """main: the pipeline reproduced and committed; then one DVC experiment per EXPERIMENTS entry, and
    the seed sweep through DVC's queue, watched live."""
    tmp = tmp_path_factory.mktemp("compare")
    root = make_project(tmp / "repo", env, models=["mf"], fused=[])
    run(f"{DVC} repro", root, env)
    run("git add -A && git commit -q -m results", root, env)
    for name, settings in EXPERIMENTS.items():
        restore(root, env)
        run(f"{DVC} exp run -n {name} {settings}", root, env)
    restore(root, env)
    run(f"{DVC} exp run --queue -n seeds {SWEEP}", root, env)  # as docs/experiments.md shows
    watch = run_queue(root, env, tmp / "queue-start.log")
    restore(root, env)
    shown = json.loads(run(f"{DVC} exp show --json", root, env, stdout_only=True))
    data = {e["name"]: e["revs"][0]["data"] for rev in shown for e in (rev.get("experiments") or [])}
    assert set(EXPERIMENTS) | set(SEEDS) <= set(data), list(data)
    metrics = {name: side_metrics(d) for name, d in data.items()}
    metrics["main"] = {"k": yaml.safe_load(run("git show main:params.yaml", root, env, stdout_only=True))["topK"],
                       **{m: json.loads(run(f"git show main:metrics/test/{m}.json", root, env, stdout_only=True))
                          for m in MODELS}}
    return SimpleNamespace(root=root, metrics=metrics, data=data, watch=watch)


def test_a_running_experiment_shows_its_live_metrics(project) -> None:
    """While the queue ran, `dvc exp show` showed a running experiment's DVCLive summary (with `step`,
    which only the live summary has); once finished, each run's summary is its chosen epoch's."""
    watch = project.watch
    live = [(name, path, data) for name, path, data in watch.seen if "step" in data]
    assert live, (f"{watch.polls} polls of `dvc exp show` ({watch.running_polls} showing a running experiment) "
                  f"never showed a live summary: seen {watch.seen[:5]}, errors {watch.errors[:3]}")
    for name, path, data in live:
        assert name in SEEDS, (name, path, data)
        assert set(data) == LIVE_KEYS and set(data["full"]) == {"hr", "ndcg"}, (name, path, data)
        assert isinstance(data["step"], int) and 1 <= data["step"] <= SWEEP_EPOCHS, (name, path, data)
        assert 0 <= data["ndcg"] <= data["hr"] <= 1 and data["loss"] > 0, (name, path, data)
    print(f"\nexp show: {len(live)} live summaries in {watch.polls} polls ({watch.running_polls} with a running "
          f"experiment), e.g. {live[0]}; failed polls: {watch.errors}")
    for name in SEEDS:  # the finished runs: the chosen epoch, no step
        for model in ("mlp", "mf"):
            summary = project.data[name]["metrics"][f"metrics/training/{model}/metrics.json"]["data"]
            assert "step" not in summary and 1 <= summary["epoch"] <= SWEEP_EPOCHS, (name, model, summary)
        params = project.data[name]["params"]["params.yaml"]["data"]
        assert (params["seed"], params["epochs"], params["mf"]["epochs"]) == \
            (int(name.split("-")[1]), SWEEP_EPOCHS, SWEEP_EPOCHS), params


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
    """Every model and protocol is printed; A and B are the sides' test metrics (metrics/test/<model>.json)
    and K their topK; B - A their difference."""
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
    # lr trains the MLP alone: ItemPop and MF are the same on both sides, user by user.
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
    """The test metrics of the runs' mean (what a side of several runs shows)."""
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
