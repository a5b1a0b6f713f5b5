"""`python -m pipeline.tune`: an Optuna search on validation, each trial a DVC experiment.

The unit tests check the search space (parse_space, space_of), the sampled values (suggest), the
params.yaml keys a trial sets (assignments), the printed command (dvc_command) and the comment-keeping
rewrite of params.yaml (write_params). The rest run the command for real, as a subprocess, in ONE
temporary git repository holding the pipeline and the tiny dataset (`models: [mf]`, `fused: []`,
`dvc repro`, committed): bad input is a one-line error that writes nothing; the test pairs and
candidates are never opened; each finished trial is a DVC experiment of the commit (its params, its
validation metrics, no test metrics) and the printed `dvc exp run -S ...` reproduces the best one bit
for bit; `--trials` is the study's budget (a rerun resumes, two workers share it); Ctrl-C keeps the
finished trials and leaves no trace; a real PostgreSQL server as the storage; `--apply`.
"""
from __future__ import annotations

import difflib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from conftest import REPO
from dvc_project import DVC, dvc_env, make_project, restore, run

from pipeline.common import PipelineError
from pipeline.models import get as get_model
from pipeline.params import Search
from pipeline.tune import assignments, dvc_command, parse_space, space_of, suggest, write_params

JOURNAL = "data/tune/journal.log"
TUNE_TIMEOUT = 300  # seconds for one tune command on the tiny data (a few trials of 2 epochs)


# ----------------------------------------------------------------------------- unit: the search space

@pytest.mark.parametrize("text, expected", [
    ("lr=1e-4:0.1:log", ("lr", Search(1e-4, 0.1, log=True))),
    ("negatives=1:10", ("negatives", Search(1.0, 10.0))),
    ("factors=[16,32]", ("factors", Search(choices=(16, 32)))),
    ("optimizer=[sgd,adam]", ("optimizer", Search(choices=("sgd", "adam")))),
    ("layers=[[64,32,16,8],[128,64,32,16]]", ("layers", Search(choices=((64, 32, 16, 8), (128, 64, 32, 16))))),
])
def test_parse_space(text, expected) -> None:
    key, search = parse_space(text)
    assert (key, search) == expected
    assert search.log == expected[1].log and search.choices == expected[1].choices


@pytest.mark.parametrize("text", [
    "lr", "=1:2", "lr=", "lr=0.1", "lr=1:2:lin", "lr=a:b", "lr=1:2:3:4", "lr=1:2:log:x", "factors=[]",
    "factors=[16,32",
])
def test_parse_space_refuses_bad_forms(text) -> None:
    with pytest.raises(PipelineError, match="--space") as info:
        parse_space(text)
    assert repr(text) in str(info.value)  # names the argument


def test_space_of_the_models_search_and_an_override() -> None:
    mf = get_model("mf")
    assert space_of("mf", {}) == dict(mf.search)
    assert set(mf.search) == {"factors", "lr", "weight_decay", "negatives"}
    space = space_of("mf", {"lr": Search(1e-3, 1e-2, log=True)})
    assert space["lr"] == Search(1e-3, 1e-2, log=True)
    assert {k: v for k, v in space.items() if k != "lr"} == {k: v for k, v in mf.search.items() if k != "lr"}
    # every model with a search space: its own ranges pass its own checks
    for name in ("mf", "gmf", "mlp", "neumf", "ease", "sasrec"):
        assert space_of(name, {}) == dict(get_model(name).search), name


@pytest.mark.parametrize("name, key, search, message", [
    ("mf", "layers", Search(1, 2), "not a knob of mf"),
    ("mf", "nope", Search(1, 2), "not a knob of mf"),
    ("mf", "lr", Search(0.01, 0.01), "empty or inverted"),
    ("mf", "lr", Search(0.1, 0.01), "empty or inverted"),
    ("mf", "lr", Search(0.0, 0.1, log=True), "log-scale range needs low > 0"),
    ("mf", "weight_decay", Search(-1.0, 0.5, log=True), "log-scale range needs low > 0"),
    ("mf", "lr", Search(0.0, 2.0), "leaves the knob's allowed"),
    ("mf", "lr", Search(0.0, 0.5), "leaves the knob's allowed"),  # lr's Spec is (0, 1]: 0 is out
    ("mf", "lr", Search(0.1, 2.0), "leaves the knob's allowed"),
    ("mlp", "dropout", Search(0.0, 1.0), "leaves the knob's allowed"),  # dropout's Spec is [0, 1)
    ("mf", "negatives", Search(1.5, 3), "integer ends"),
    ("mf", "negatives", Search(1, 3.5), "integer ends"),
    ("neumf", "optimizer", Search(1, 2), "give choices"),
])
def test_space_of_refuses(name, key, search, message) -> None:
    with pytest.raises(PipelineError, match=re.escape(message)) as info:
        space_of(name, {key: search})
    assert repr(key) in str(info.value)


def test_space_of_a_model_with_nothing_to_tune() -> None:
    assert not get_model("itempop").search
    with pytest.raises(PipelineError, match="nothing to tune"):
        space_of("itempop", {})


# ----------------------------------------------------------------------------- unit: suggest

def test_suggest_rounds_to_three_digits_and_maps_choices_back() -> None:
    import optuna

    space = space_of("mlp", {})
    layers = [128, 64, 32, 16]
    trial = optuna.trial.FixedTrial({"layers": json.dumps(layers), "lr": 0.00123456, "weight_decay": 0.0345678,
                                     "dropout": 0.123456, "negatives": 4})
    values = suggest(trial, "mlp", space)
    assert values == {"layers": layers, "lr": 0.00123, "weight_decay": 0.0346, "dropout": 0.123, "negatives": 4}
    assert isinstance(values["layers"], list) and isinstance(values["negatives"], int)


def test_suggest_on_a_real_study() -> None:
    """Sampled values: in range, floats of at most 3 significant digits, ints, choices as declared."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for name in ("mlp", "mf", "neumf"):
        space = space_of(name, {})
        study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
        for _ in range(25):
            values = suggest(study.ask(), name, space)
            assert set(values) == set(space), (name, values)
            for key, value in values.items():
                search = space[key]
                if search.choices:
                    declared = [list(c) if isinstance(c, tuple) else c for c in search.choices]
                    assert value in declared and type(value) is type(declared[declared.index(value)]), (key, value)
                elif get_model(name).params[key].kind == "int":
                    assert type(value) is int and search.low <= value <= search.high, (key, value)
                else:
                    assert type(value) is float and float(f"{value:.3g}") == value, (key, value)
                    assert search.low <= value <= search.high, (key, value)


def test_suggest_stays_in_the_range_after_rounding() -> None:
    import optuna

    space = space_of("mlp", {"dropout": Search(0.0, 0.9999)})  # accepted: inside dropout's [0, 1)
    trial = optuna.trial.FixedTrial({"layers": json.dumps([64, 32, 16, 8]), "lr": 0.001, "weight_decay": 0.01,
                                     "dropout": 0.99989, "negatives": 2})
    value = suggest(trial, "mlp", space)["dropout"]
    assert 0.0 <= value <= 0.9999, value  # 0.99989 rounds to 1.0: outside the range and dropout's [0, 1)


# ----------------------------------------------------------------------------- unit: assignments, dvc_command

def test_assignments() -> None:
    params = {"models": ["mf"], "fused": []}
    assert assignments(params, "mf", {"lr": 0.01, "factors": 32}) == {"mf.lr": 0.01, "mf.factors": 32}
    assert assignments(params, "gmf", {"factors": 8}) == {"gmf.factors": 8, "models": ["mf", "gmf"]}
    assert assignments(params, "sasrec", {"hidden": 64}) == {"sasrec.hidden": 64, "models": ["mf", "sasrec"]}
    assert assignments(params, "ease", {"lambda": 50.0}) == {"ease.lambda": 50.0, "models": ["mf", "ease"]}
    assert assignments(params, "neumf", {"lr": 0.01, "optimizer": "adam"}) == \
        {"neumf.lr": 0.01, "neumf.optimizer": "adam", "fused": ["neumf"]}
    # the MLP: always trained, its knobs are top-level keys
    assert assignments(params, "mlp", {"lr": 0.01, "layers": [64, 32, 16, 8]}) == \
        {"lr": 0.01, "layers": [64, 32, 16, 8]}
    # already trained: not added again
    assert assignments({"models": ["gmf", "mf"], "fused": ["neumf"]}, "neumf", {"lr": 0.1}) == {"neumf.lr": 0.1}
    assert params == {"models": ["mf"], "fused": []}  # not mutated


def test_dvc_command_quotes_lists() -> None:
    assert dvc_command({"layers": [64, 32, 16, 8], "lr": 0.001}) == \
        "dvc exp run -S 'layers=[64,32,16,8]' -S lr=0.001"
    assert dvc_command({"mf.factors": 128, "mf.lr": 0.00117, "models": ["mf", "gmf"]}) == \
        "dvc exp run -S mf.factors=128 -S mf.lr=0.00117 -S 'models=[mf,gmf]'"
    assert dvc_command({"neumf.optimizer": "adam"}) == "dvc exp run -S neumf.optimizer=adam"


# ----------------------------------------------------------------------------- unit: write_params

ASSIGNED = {"mf.factors": 128, "mf.lr": 0.00117, "layers": [64, 32, 16, 8], "lr": 0.001,
            "models": ["gmf", "mf", "ease", "sasrec"], "neumf.optimizer": "adam", "ease.lambda": 12.5}


def key_lines(lines: list[str], keys) -> set[int]:
    """The line numbers of these keys (dotted: a field of a section) in a block-style params.yaml."""
    out = set()
    for key in keys:
        *section, last = key.split(".")
        if not section:
            out |= {i for i, line in enumerate(lines) if line.startswith(f"{last}:")}
            continue
        start = next(i for i, line in enumerate(lines) if line.startswith(f"{section[0]}:"))
        out.add(next(i for i in range(start + 1, len(lines)) if lines[i].startswith(f"  {last}:")))
    assert len(out) == len(list(keys)), (keys, out)
    return out


@pytest.fixture
def real_params(tmp_path: Path) -> Path:
    path = tmp_path / "params.yaml"
    shutil.copy2(REPO / "params.yaml", path)
    return path


def test_write_params_keeps_comments_and_sets_values(real_params: Path) -> None:
    before = real_params.read_text(encoding="utf-8")
    write_params(real_params, ASSIGNED)
    after = real_params.read_text(encoding="utf-8")
    old, new = before.splitlines(), after.splitlines()
    assert len(old) == len(new), "\n".join(difflib.unified_diff(old, new, lineterm=""))
    # every comment is kept, on its line
    for a, b in zip(old, new):
        if "#" in a:
            assert "#" in b and b[b.index("#"):] == a[a.index("#"):], (a, b)
    loaded, original = yaml.safe_load(after), yaml.safe_load(before)
    for key, value in ASSIGNED.items():
        *section, last = key.split(".")
        assert (loaded[section[0]] if section else loaded)[last] == value, key
    # everything else reads back the same
    for key, value in original.items():
        if isinstance(value, dict):
            changed = {k.split(".")[1] for k in ASSIGNED if k.startswith(f"{key}.")}
            assert {k: v for k, v in loaded[key].items() if k not in changed} == \
                {k: v for k, v in value.items() if k not in changed}, key
        elif key not in ASSIGNED:
            assert loaded[key] == value, key
    # lists in flow style
    assert re.match(r"^layers: \[64, 32, 16, 8\] +#", new[key_lines(new, ["layers"]).pop()])
    assert re.match(r"^models: \[gmf, mf, ease, sasrec\] +#", new[key_lines(new, ["models"]).pop()])
    assert not any(line.lstrip().startswith("- ") for line in new)


def test_write_params_changes_only_the_assigned_lines(real_params: Path) -> None:
    old = real_params.read_text(encoding="utf-8").splitlines(keepends=True)
    write_params(real_params, ASSIGNED)
    new = real_params.read_text(encoding="utf-8").splitlines(keepends=True)
    if len(old) != len(new):
        pytest.fail("write_params changed the number of lines")
    changed = {i for i, (a, b) in enumerate(zip(old, new)) if a != b}
    raw = yaml.safe_load("".join(old))
    current = {key: raw[key] if "." not in key else raw[key.split(".")[0]][key.split(".")[1]] for key in ASSIGNED}
    differing = [key for key, value in ASSIGNED.items() if current[key] != value]  # a default may already be it
    assert len(differing) >= 3
    expected = key_lines(old, differing)
    assert changed == expected, "".join(difflib.unified_diff(old, new))


# ----------------------------------------------------------------------------- the project

@pytest.fixture(scope="module")
def env(tiny_mirror) -> dict:
    return dvc_env(tiny_mirror)


@pytest.fixture(scope="module")
def root(tmp_path_factory, env) -> Path:
    """A git repo with the pipeline, tiny params, models [mf] and no fused model: reproduced and committed."""
    root = make_project(tmp_path_factory.mktemp("tune") / "repo", env, models=["mf"], fused=[])
    run(f"{DVC} repro", root, env)
    run("git add -A && git commit -q -m results", root, env)
    assert run("git status --porcelain", root, env, stdout_only=True) == ""
    return root


def tune(root: Path, env: dict, *args: str, timeout: float = TUNE_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.tune", *args], cwd=root, env=env, capture_output=True,
                          text=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def load(root: Path, name: str, storage=None):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if storage is None:
        storage = JournalStorage(JournalFileBackend(str(root / JOURNAL)))
    return optuna.load_study(study_name=name, storage=storage)


def finished(study) -> list:
    from optuna.trial import TrialState
    return [t for t in study.get_trials() if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]


def exp_refs(root: Path, env: dict) -> dict[str, str]:
    """{experiment name: its ref} of every DVC experiment ref in the repo."""
    out = run("git for-each-ref --format='%(refname)' refs/exps", root, env, stdout_only=True)
    return {ref.rsplit("/", 1)[1]: ref for ref in out.split()}


def snapshot(root: Path, env: dict) -> dict:
    """What a failed or interrupted command must leave as it was."""
    journal = root / JOURNAL
    return {"params.yaml": (root / "params.yaml").read_bytes(),
            "git status": run("git status --porcelain", root, env, stdout_only=True),
            "refs/exps": run("git for-each-ref refs/exps", root, env, stdout_only=True),
            "worktrees": run("git worktree list --porcelain", root, env, stdout_only=True),
            "journal": journal.read_bytes() if journal.exists() else None,
            "tune scratch": sorted(p.name for p in (root / ".dvc" / "tmp").glob("tune-*"))}


def assert_clean(root: Path, env: dict) -> None:
    """One worktree (the main one), no temporary tune-* folder left in .dvc/tmp or data/tune."""
    trees = [line for line in run("git worktree list --porcelain", root, env, stdout_only=True).splitlines()
             if line.startswith("worktree ")]
    assert trees == [f"worktree {root}"], trees
    assert not list((root / ".dvc" / "tmp").glob("tune-*"))
    assert not list((root / "data" / "tune").glob("tune-*"))


def best_line(out: str) -> tuple[int, float, str | None]:
    """(trial number, printed HR, experiment name or None) of the printed best trial."""
    match = re.search(r"^best: trial (\d+)(?: \(experiment (\S+)\))?: validation HR@\d+ (\d\.\d{4}), ", out, re.M)
    assert match, out
    return int(match.group(1)), float(match.group(3)), match.group(2)


def reproduce_line(out: str) -> str:
    lines = out.splitlines()
    i = lines.index("reproduce it through the pipeline:")
    command = lines[i + 1].strip()
    assert command.startswith("dvc exp run -S "), out
    return command


# ----------------------------------------------------------------------------- bad input

BAD = {
    "unknown model": (["nosuch", "--trials", "2"], ["no model 'nosuch'"]),
    "nothing to tune": (["itempop", "--trials", "2"], ["itempop", "nothing to tune"]),
    "empty range": (["mf", "--trials", "2", "--space", "lr=0.01:0.01"], ["'lr'", "empty or inverted"]),
    "inverted range": (["mf", "--trials", "2", "--space", "lr=0.1:0.01"], ["'lr'", "empty or inverted"]),
    "unclosed choices": (["mf", "--trials", "2", "--space", "factors=[16,32"], ["--space", "factors"]),
}


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr}"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_a_one_line_error_that_writes_nothing(root, env, case) -> None:
    args, names = BAD[case]
    before = snapshot(root, env)
    proc = tune(root, env, *args, "--study", "bad", timeout=60)
    if snapshot(root, env) != before:
        pytest.fail(f"{case}: the failed command wrote something")
    line = one_line_error(proc)
    for name in names:
        assert name in line, (name, line)


@pytest.fixture(scope="module")
def unreachable(root, env) -> SimpleNamespace:
    before = snapshot(root, env)
    start = time.monotonic()
    proc = tune(root, env, "mf", "--trials", "2", "--study", "bad", "--storage",
                "postgresql+psycopg://nobody@127.0.0.1:1/none", timeout=60)
    return SimpleNamespace(proc=proc, seconds=time.monotonic() - start, before=before, after=snapshot(root, env))


def test_an_unreachable_storage_fails_fast_and_writes_nothing(unreachable) -> None:
    proc = unreachable.proc
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and proc.stderr.strip().splitlines()[-1] == errors[0], proc.stderr
    assert "--storage postgresql+psycopg://nobody@127.0.0.1:1/none" in errors[0], errors
    assert "cannot open the study storage" in errors[0], errors
    assert unreachable.seconds < 12, unreachable.seconds
    assert unreachable.after == unreachable.before


def test_an_unreachable_storage_is_one_line(unreachable) -> None:
    one_line_error(unreachable.proc)


# ----------------------------------------------------------------------------- never the test data

def test_the_search_never_needs_the_test_data(root, env, tmp_path) -> None:
    hidden = [root / "data/prepared/heldout_test.npz", root / "data/candidates/test.npz"]
    assert all(p.is_file() for p in hidden)
    moved = []
    try:
        for i, path in enumerate(hidden):
            shutil.move(path, tmp_path / f"{i}-{path.name}")
            moved.append(path)
        out = ok(tune(root, env, "mf", "--trials", "2", "--no-save", "--study", "notest"))
    finally:
        for i, path in enumerate(moved):
            shutil.move(tmp_path / f"{i}-{path.name}", path)
    assert "study 'notest': 2 finished trials" in out, out
    assert len(finished(load(root, "notest"))) == 2


AUDIT = r"""
import json, os, sys
opened = []
def hook(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        opened.append(os.fsdecode(args[0]))
sys.addaudithook(hook)
sys.argv = ["pipeline.tune", "mf", "--trials", "1", "--no-save", "--study", "audit"]
from pipeline.common import run_stage
from pipeline.tune import main
try:
    run_stage(main)
finally:
    with open("opened.json", "w") as fh:
        json.dump(opened, fh)
"""


def test_no_test_file_is_opened(root, env) -> None:
    """An audit hook sees every open() of the process: a trial opens validation, never the test files."""
    out_file = root / "opened.json"
    try:
        proc = subprocess.run([sys.executable, "-c", AUDIT], cwd=root, env=env, capture_output=True, text=True,
                              timeout=TUNE_TIMEOUT)
        ok(proc)
        opened = json.loads(out_file.read_text())
    finally:
        out_file.unlink(missing_ok=True)
    data = [p for p in opened if "data/" in p]
    assert any(p.endswith("data/prepared/heldout_val.npz") for p in data), data  # the hook works
    assert any(p.endswith("data/candidates/val.npz") for p in data), data
    assert any(p.endswith("data/prepared/train.npz") for p in data), data
    bad = [p for p in opened if "heldout_test" in p or "candidates/test" in p or p.endswith("/test.npz")]
    assert not bad, bad


# ----------------------------------------------------------------------------- trials are DVC experiments

@pytest.fixture(scope="module")
def s1(root, env) -> SimpleNamespace:
    before = snapshot(root, env)
    proc = tune(root, env, "mf", "--trials", "3", "--study", "s1")
    after = snapshot(root, env)
    return SimpleNamespace(proc=proc, out=ok(proc), before=before, after=after,
                           trials={t.number: t for t in finished(load(root, "s1"))})


def shown_experiments(root: Path, env: dict) -> dict[str, dict]:
    shown = json.loads(run(f"{DVC} exp show --json", root, env, stdout_only=True))
    return {e["name"]: e["revs"][0]["data"] for rev in shown for e in (rev.get("experiments") or [])}


def test_each_trial_is_a_dvc_experiment(root, env, s1) -> None:
    assert "study 's1': 3 finished trials" in s1.out, s1.out
    assert sorted(s1.trials) == [0, 1, 2]
    shown = shown_experiments(root, env)
    assert {name for name in shown if name.startswith("s1-")} == {"s1-0", "s1-1", "s1-2"}, list(shown)
    head = yaml.safe_load((root / "params.yaml").read_text())
    for number, trial in s1.trials.items():
        data = shown[f"s1-{number}"]
        assert trial.user_attrs["experiment"] == f"s1-{number}"
        assigned = trial.user_attrs["assigned"]
        assert set(assigned) == {"mf.factors", "mf.lr", "mf.weight_decay", "mf.negatives"}, assigned
        params = data["params"]["params.yaml"]["data"]
        expected = {**head, "mf": {**head["mf"], **{k.split(".")[1]: v for k, v in assigned.items()}}}
        assert params == expected, (number, params, assigned)
        metrics = data["metrics"]
        assert "metrics/training/mf/metrics.json" in metrics, list(metrics)
        assert "metrics/test/mf.json" not in metrics, list(metrics)
        summary = metrics["metrics/training/mf/metrics.json"]["data"]
        if trial.value is not None:  # complete (a pruned trial has no value)
            assert summary["hr"] == pytest.approx(trial.value, abs=1e-6), (summary, trial.value)
        assert summary["ndcg"] == pytest.approx(trial.user_attrs["ndcg"], abs=1e-6), summary
        assert summary["epoch"] == trial.user_attrs["epoch"], summary
    # the search did not touch the workspace, and left no worktree
    assert s1.after["git status"] == s1.before["git status"] == ""
    assert s1.after["params.yaml"] == s1.before["params.yaml"]
    assert_clean(root, env)


def test_the_printed_command_reproduces_the_best_trial(root, env, s1) -> None:
    number, hr, experiment = best_line(s1.out)
    complete = {n: t for n, t in s1.trials.items() if t.value is not None}
    assert number == max(complete, key=lambda n: (complete[n].value, complete[n].user_attrs["ndcg"], -n))
    assert experiment == f"s1-{number}" and hr == pytest.approx(complete[number].value, abs=5e-5)
    command = reproduce_line(s1.out)
    assert command == dvc_command(complete[number].user_attrs["assigned"]), command
    ref = exp_refs(root, env)[experiment]
    trial_metrics = run(f"git show {ref}:metrics/training/mf/metrics.json", root, env, stdout_only=True)
    try:
        run(f"{DVC} " + command[len("dvc "):], root, env)
        reproduced = (root / "metrics/training/mf/metrics.json").read_text()
        params = yaml.safe_load((root / "params.yaml").read_text())
    finally:
        restore(root, env)
    assert reproduced == trial_metrics  # the same computation: the same bytes
    assigned = complete[number].user_attrs["assigned"]
    assert {f"mf.{k}": v for k, v in params["mf"].items() if f"mf.{k}" in assigned} == assigned


@pytest.fixture(scope="module")
def s1_resumed(root, env, s1) -> SimpleNamespace:
    out = ok(tune(root, env, "mf", "--trials", "5", "--study", "s1"))
    return SimpleNamespace(out=out, trials={t.number: t for t in finished(load(root, "s1"))})


def test_a_rerun_resumes_the_study_up_to_its_budget(root, env, s1, s1_resumed) -> None:
    assert "study 's1': 5 finished trials" in s1_resumed.out, s1_resumed.out
    assert len(s1_resumed.trials) == 5
    assert set(s1.trials) < set(s1_resumed.trials)
    added = set(s1_resumed.trials) - set(s1.trials)
    assert len(added) == 2, added
    refs = exp_refs(root, env)
    assert {f"s1-{n}" for n in s1_resumed.trials} <= set(refs)
    assert_clean(root, env)


def test_a_resumed_study_samples_new_configurations(s1, s1_resumed) -> None:
    old = [t.user_attrs["assigned"] for t in s1.trials.values()]
    new = [t.user_attrs["assigned"] for n, t in s1_resumed.trials.items() if n not in s1.trials]
    if len(new) != 2:
        pytest.fail(f"the resumed run added {len(new)} trials")
    assert not [a for a in new if a in old], (old, new)


# ----------------------------------------------------------------------------- two workers

def test_two_workers_share_the_budget(root, env) -> None:
    from optuna.trial import TrialState

    out = ok(tune(root, env, "mf", "--trials", "6", "--workers", "2", "--study", "par"))
    study = load(root, "par")
    trials = study.get_trials()
    done = finished(study)
    assert len(done) == 6, [(t.number, t.state) for t in trials]
    assert len({t.number for t in done}) == 6
    assert sum(t.state == TrialState.FAIL for t in trials) <= 1, [(t.number, t.state) for t in trials]
    assert not [t for t in trials if t.state not in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)]
    assert len({t.user_attrs["worker"] for t in done}) == 2, [t.user_attrs.get("worker") for t in done]
    refs = exp_refs(root, env)
    assert {f"par-{t.number}" for t in done} <= set(refs), sorted(refs)
    assert not {f"par-{t.number}" for t in trials if t not in done} & set(refs)
    assert "study 'par': 6 finished trials" in out, out
    number, hr, _ = best_line(out)
    complete = [t for t in done if t.state == TrialState.COMPLETE]
    assert hr == pytest.approx(round(max(t.value for t in complete), 4), abs=1e-9), out
    assert study.trials[number].value == max(t.value for t in complete)
    assert run("git status --porcelain", root, env, stdout_only=True) == ""
    assert_clean(root, env)


# ----------------------------------------------------------------------------- Ctrl-C

def training(study) -> bool:
    """Whether a trial is running past its start (its values chosen: Trials.run has begun)."""
    from optuna.trial import TrialState
    return any(t.state == TrialState.RUNNING and "assigned" in t.user_attrs for t in study.get_trials())


def test_ctrl_c_keeps_the_finished_trials(root, env) -> None:
    """Ctrl-C once a trial has finished and the next one is training. (A Ctrl-C while a trial is being
    created is test_ctrl_c_while_a_trial_is_created_leaves_no_running_trial: a poll that sees the first
    trial finish sends it just then, as the next trial is asked for.)"""
    from optuna.trial import TrialState

    before = snapshot(root, env)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.tune", "mf", "--trials", "50", "--study", "intr"],
                            cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.communicate()
            try:
                study = load(root, "intr")
                if finished(study) and training(study):
                    break
            except KeyError:  # not created yet
                pass
            assert time.monotonic() < deadline, "no trial finished in 180 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, (proc.returncode, out, err)
    study = load(root, "intr")
    done = finished(study)
    match = re.search(r"interrupted: (\d+) finished trials are kept in 'intr'", err)
    assert match and int(match.group(1)) == len(done) >= 1, err
    assert not [t for t in study.get_trials() if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    after = snapshot(root, env)
    assert after["params.yaml"] == before["params.yaml"] and after["git status"] == before["git status"] == ""
    assert after["tune scratch"] == [] and after["worktrees"] == before["worktrees"]
    assert_clean(root, env)
    k = len(done) + 1
    out = ok(tune(root, env, "mf", "--trials", str(k), "--study", "intr"))
    assert len(finished(load(root, "intr"))) == k, out
    assert f"study 'intr': {k} finished trials" in out, out


CUT_IN_SAVE = r"""
import os, signal, sys
import pipeline.tune as tune
from pipeline.common import run_stage
original = tune.write_params
def write_params(path, assigned):  # Ctrl-C while the trial is being saved (inside sigint_deferred)
    os.kill(os.getpid(), signal.SIGINT)
    return original(path, assigned)
tune.write_params = write_params
sys.argv = ["pipeline.tune", "mf", "--trials", "3", "--study", "cut"]
run_stage(tune.main)
"""


def test_ctrl_c_during_a_save_leaves_no_experiment_of_an_uncounted_trial(root, env) -> None:
    proc = subprocess.run([sys.executable, "-c", CUT_IN_SAVE], cwd=root, env=env, capture_output=True, text=True,
                          timeout=TUNE_TIMEOUT)
    if proc.returncode != 130:
        pytest.fail(f"exit {proc.returncode}: {proc.stderr}")
    assert_clean(root, env)
    names = {f"cut-{t.number}" for t in finished(load(root, "cut"))}
    assert {name for name in exp_refs(root, env) if name.startswith("cut-")} == names


CUT_IN_ASK = r"""
import os, signal, sys
import optuna
import pipeline.tune as tune
from pipeline.common import run_stage
original, calls = optuna.study.Study.ask, []
def ask(self, *args, **kwargs):  # Ctrl-C while the second trial is being created (inside sigint_deferred)
    calls.append(1)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGINT)
    return original(self, *args, **kwargs)
optuna.study.Study.ask = ask
sys.argv = ["pipeline.tune", "mf", "--trials", "3", "--study", "cutask", "--no-save"]
run_stage(tune.main)
"""


def test_ctrl_c_while_a_trial_is_created_leaves_no_running_trial(root, env) -> None:
    from optuna.trial import TrialState

    proc = subprocess.run([sys.executable, "-c", CUT_IN_ASK], cwd=root, env=env, capture_output=True, text=True,
                          timeout=TUNE_TIMEOUT)
    if proc.returncode != 130 or "1 finished trials are kept" not in proc.stderr:
        pytest.fail(f"exit {proc.returncode}: {proc.stderr}")
    trials = load(root, "cutask").get_trials()
    assert not [(t.number, t.state, t.user_attrs) for t in trials if t.state == TrialState.RUNNING]


# ----------------------------------------------------------------------------- PostgreSQL

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server of its own (trust auth, 127.0.0.1, a free port); its URL. Skips if none can start."""
    import pwd

    pg_config = shutil.which("pg_config")
    if pg_config is None:
        pytest.skip("PostgreSQL is not installed (no pg_config)")
    bindir = Path(subprocess.run([pg_config, "--bindir"], capture_output=True, text=True).stdout.strip())
    initdb, pg_ctl = bindir / "initdb", bindir / "pg_ctl"
    if not (initdb.is_file() and pg_ctl.is_file()):
        pytest.skip(f"no initdb and pg_ctl in {bindir}")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg is not installed")
    me = pwd.getpwuid(os.geteuid()).pw_name
    owner = None
    if me == "postgres":
        prefix = []
    elif os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("no postgres user to run the server as")
        if shutil.which("runuser") is None:
            pytest.skip("no runuser to start the server as postgres")
        prefix = [shutil.which("runuser"), "-u", "postgres", "--"]
    else:
        pytest.skip(f"the server must run as postgres, and this is {me}, not root")
    directory = Path(tempfile.mkdtemp(prefix="tune-pg-"))  # not tmp_path: postgres cannot enter its parents
    data = directory / "data"
    started = False
    try:
        if owner is not None:
            os.chown(directory, owner.pw_uid, owner.pw_gid)
        proc = subprocess.run([*prefix, str(initdb), "-D", str(data), "--auth=trust"], capture_output=True,
                              text=True, timeout=120)
        if proc.returncode:
            pytest.skip(f"initdb failed: {(proc.stderr or proc.stdout).strip()[-300:]}")
        port = free_port()
        proc = subprocess.run([*prefix, str(pg_ctl), "-D", str(data), "-l", str(directory / "server.log"), "-o",
                               f"-p {port} -k {directory} -c listen_addresses=127.0.0.1", "-w", "start"],
                              capture_output=True, text=True, timeout=120)
        if proc.returncode:
            pytest.skip(f"pg_ctl start failed: {(proc.stderr or proc.stdout).strip()[-300:]}")
        started = True
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        if started:
            subprocess.run([*prefix, str(pg_ctl), "-D", str(data), "-m", "fast", "-w", "stop"], capture_output=True,
                           timeout=120)
        shutil.rmtree(directory, ignore_errors=True)


def test_two_workers_on_postgresql(root, env, postgres) -> None:
    import optuna
    from optuna.trial import TrialState

    refs = exp_refs(root, env)
    out = ok(tune(root, env, "mf", "--trials", "4", "--workers", "2", "--storage", postgres, "--study", "pg",
                  "--no-save"))
    assert "study 'pg': 4 finished trials" in out, out
    study = optuna.load_study(study_name="pg", storage=postgres)
    trials = study.get_trials()
    assert len(finished(study)) == 4, [(t.number, t.state) for t in trials]
    assert sum(t.state == TrialState.FAIL for t in trials) <= 1
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert exp_refs(root, env) == refs  # --no-save
    assert study.user_attrs["model"] == "mf"
    assert not (root / JOURNAL).read_bytes().count(b'"pg"')  # not in the journal file


# ----------------------------------------------------------------------------- --apply

def test_apply_writes_the_best_values_into_params_yaml(root, env) -> None:
    path = root / "params.yaml"
    committed = path.read_bytes()
    # a params.yaml with comments (the project's was written by yaml.safe_dump)
    text = "# the knobs\n" + committed.decode().replace("\nmf:\n", "\nmf:  # the MF section\n", 1)
    assert "mf:  # the MF section\n" in text
    try:
        path.write_text(text)
        out = ok(tune(root, env, "mf", "--trials", "2", "--study", "ap", "--apply", "--no-save"))
        applied = path.read_text()
    finally:
        path.write_bytes(committed)
    assert "wrote these values into params.yaml" in out, out
    command = reproduce_line(out)
    assigned = dict(part.split("=", 1) for part in re.findall(r"-S (\S+)", command))
    assert set(assigned) == {"mf.factors", "mf.lr", "mf.weight_decay", "mf.negatives"}, command
    loaded = yaml.safe_load(applied)
    for key, value in assigned.items():
        assert str(loaded["mf"][key.split(".")[1]]) == value, (key, value, loaded["mf"])
    number, _, _ = best_line(out)
    best = load(root, "ap").trials[number].user_attrs["assigned"]
    assert {f"mf.{k}": v for k, v in loaded["mf"].items() if f"mf.{k}" in best} == best
    old, new = text.splitlines(), applied.splitlines()
    assert len(old) == len(new) and new[0] == "# the knobs" and "mf:  # the MF section" in new
    changed = {i for i, (a, b) in enumerate(zip(old, new)) if a != b}
    assert changed <= key_lines(old, assigned), "\n".join(difflib.unified_diff(old, new, lineterm=""))
    assert run("git status --porcelain", root, env, stdout_only=True) == ""
