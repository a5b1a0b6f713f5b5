"""`python -m pipeline.tune`: Optuna's own loop on validation; the best trials promoted to real runs.

The unit tests check the search space (parse_space, space_of), the sampled values (suggest), the
params.yaml keys a trial sets (assignments), the printed command (dvc_command), the comment-keeping
rewrite of params.yaml (write_params) and the pruner's warm-up. The rest run the command for real,
as a subprocess, in ONE temporary git repository holding the pipeline and the tiny dataset
(`models: [mf]`, `fused: []`, `dvc repro`, committed): bad input is a one-line error that writes
nothing; a search refuses params.yaml or code that differ from HEAD (an uncommitted seed); the test
pairs and candidates are never opened; a trial is no DVC experiment, and compare refuses a revision
whose ranks are another run's; the pruner is told the value the objective returns; every trial
records its seconds, and --max-seconds makes slower ones infeasible; each study draws its pictures;
`--trials` is the study's budget (a rerun resumes, two workers share it, and a diverging trial fails
alone); `--promote` runs the best trials through the pipeline, never over a used name; Ctrl-C keeps
the finished trials; a real PostgreSQL server as the storage; `--apply`.
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

from conftest import REPO, set_params
from dvc_project import DVC, dvc_env, make_project, restore, run

from pipeline.common import PipelineError
from pipeline.models import get as get_model
from pipeline.params import Search
from pipeline.tune import WARMUP, assignments, dvc_command, make_pruner, parse_space, space_of, suggest, write_params

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


def snapshot(root: Path, env: dict) -> dict:
    """What a failed or interrupted command must leave as it was."""
    journal = root / JOURNAL
    return {"params.yaml": (root / "params.yaml").read_bytes(),
            "git status": run("git status --porcelain", root, env, stdout_only=True),
            "refs/exps": run("git for-each-ref refs/exps", root, env, stdout_only=True),
            "worktrees": run("git worktree list --porcelain", root, env, stdout_only=True),
            "journal": journal.read_bytes() if journal.exists() else None,
            "tune scratch": sorted(p.name for p in (root / ".dvc" / "tmp").glob("tune-*"))}


def best_line(out: str) -> tuple[int, float, float]:
    """(trial number, printed HR, printed training seconds) of the printed best trial."""
    match = re.search(r"^best: trial (\d+): validation HR@\d+ (\d\.\d{4}), .*; trained in ([\d.]+) s$", out, re.M)
    assert match, out
    return int(match.group(1)), float(match.group(2)), float(match.group(3))


def reproduce_line(out: str) -> str:
    lines = out.splitlines()
    i = lines.index("run it through the pipeline:")
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
        out = ok(tune(root, env, "mf", "--trials", "2", "--study", "notest"))
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
sys.argv = ["pipeline.tune", "mf", "--trials", "1", "--study", "audit"]
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


# ----------------------------------------------------------------------------- what a trial is

def test_the_pruner_waits_a_stated_fraction_of_the_epochs() -> None:
    import optuna

    from pipeline.training import EpochStats  # noqa: F401  (the rows the objective reports)

    study = optuna.create_study(direction="maximize", pruner=make_pruner("median", 20))
    for _ in range(5):  # five complete trials whose curves reach 0.9 at every step
        t = study.ask()
        for step in range(1, 21):
            t.report(0.9, step)
        study.tell(t, 0.9)
    t = study.ask()
    warmup = int(WARMUP * 20)
    for step in range(1, warmup):
        t.report(0.1, step)  # far below the median, but still warming up
        assert not t.should_prune(), step
    t.report(0.1, warmup)
    assert t.should_prune()
    assert make_pruner("none", 20).__class__.__name__ == "NopPruner"
    assert make_pruner("median", None).__class__.__name__ == "NopPruner"  # a closed-form model


@pytest.fixture(scope="module")
def s1(root, env) -> SimpleNamespace:
    before = snapshot(root, env)
    proc = tune(root, env, "mf", "--trials", "3", "--study", "s1")
    after = snapshot(root, env)
    return SimpleNamespace(proc=proc, out=ok(proc), before=before, after=after,
                           trials={t.number: t for t in finished(load(root, "s1"))})


def test_a_trial_is_not_a_dvc_experiment_and_touches_nothing(root, env, s1) -> None:
    assert "study 's1': 3 finished trials" in s1.out, s1.out
    assert sorted(s1.trials) == [0, 1, 2]
    assert s1.after["refs/exps"] == s1.before["refs/exps"]  # no experiment that is not a real run
    assert s1.after["git status"] == s1.before["git status"] == ""
    assert s1.after["params.yaml"] == s1.before["params.yaml"]
    head = run("git rev-parse HEAD", root, env, stdout_only=True).strip()
    for trial in s1.trials.values():
        assert set(trial.user_attrs["assigned"]) == {"mf.factors", "mf.lr", "mf.weight_decay", "mf.negatives"}
        assert trial.user_attrs["commit"] == head


def test_the_pruner_is_told_the_objectives_value(s1) -> None:
    """Each epoch reports the best validation HR so far (what the trial returns), never a raw epoch's."""
    for trial in s1.trials.values():
        steps = sorted(trial.intermediate_values)
        values = [trial.intermediate_values[s] for s in steps]
        assert steps == list(range(1, len(steps) + 1)), steps
        assert values == sorted(values), (trial.number, values)  # a running best never falls
        if trial.value is not None:
            assert values[-1] == trial.value, (trial.number, values, trial.value)


def test_every_trial_records_its_training_seconds(s1) -> None:
    number, hr, seconds = best_line(s1.out)
    complete = {n: t for n, t in s1.trials.items() if t.value is not None}
    assert number == max(complete, key=lambda n: (complete[n].value, complete[n].user_attrs["ndcg"], -n))
    assert hr == pytest.approx(complete[number].value, abs=5e-5)
    assert seconds == pytest.approx(complete[number].user_attrs["train_s"], abs=0.05)
    assert all(0 < t.user_attrs["train_s"] < TUNE_TIMEOUT for t in s1.trials.values())
    assert reproduce_line(s1.out) == dvc_command(complete[number].user_attrs["assigned"])


def test_each_study_draws_its_pictures(root, s1) -> None:
    from PIL import Image

    for kind in ("history", "importances", "seconds"):
        path = root / "data" / "tune" / f"s1-{kind}.png"
        assert f"wrote data/tune/s1-{kind}.png" in s1.out, s1.out
        with Image.open(path) as image:
            assert image.width > 200 and image.height > 150, (kind, image.size)


def test_max_seconds_makes_slower_trials_infeasible(root, env) -> None:
    out = ok(tune(root, env, "mf", "--trials", "2", "--study", "fast", "--max-seconds", "0.001"))
    study = load(root, "fast")
    assert all(t.constraints["train_time"] > 0 for t in finished(study))
    assert "no complete trial within --max-seconds" in out, out
    assert "best:" not in out
    roomy = ok(tune(root, env, "mf", "--trials", "2", "--study", "roomy", "--max-seconds", "1000"))
    assert all(t.constraints["train_time"] <= 0 for t in finished(load(root, "roomy")))
    best_line(roomy)
    refused = tune(root, env, "mf", "--trials", "3", "--study", "fast", "--max-seconds", "5", timeout=60)
    assert "another max_seconds" in one_line_error(refused)


def test_an_uncommitted_params_yaml_or_code_is_refused(root, env) -> None:
    """With `seed: 7` in params.yaml and not committed, a trial would train with 7 while HEAD says 42."""
    path = root / "params.yaml"
    committed = path.read_bytes()
    code = root / "pipeline" / "models" / "mf.py"
    source = code.read_bytes()
    try:
        path.write_text(re.sub(r"(?m)^seed: \d+", "seed: 7", committed.decode()))
        before = snapshot(root, env)
        line = one_line_error(tune(root, env, "mf", "--trials", "1", "--study", "dirty", timeout=60))
        assert snapshot(root, env) == before
        assert "params.yaml: differ from HEAD" in line, line
        path.write_text(committed.decode().replace("\nseed: ", "\nseed:    ", 1))  # a layout change only
        ok(tune(root, env, "mf", "--trials", "1", "--study", "relaid"))
        path.write_bytes(committed)
        code.write_bytes(source + b"\n# an edit\n")
        line = one_line_error(tune(root, env, "mf", "--trials", "1", "--study", "dirty", timeout=60))
        assert "pipeline/models/mf.py: differ from HEAD" in line, line
    finally:
        path.write_bytes(committed)
        code.write_bytes(source)
    assert run("git status --porcelain", root, env, stdout_only=True) == ""


def test_compare_refuses_a_revision_whose_ranks_are_another_runs(root, env) -> None:
    """A commit of params.yaml without `dvc repro` (what a trial experiment used to be): its dvc.lock
    names the base run's ranks; compare refuses it by name instead of reading them."""
    try:
        run("git checkout -q -b trialrev", root, env)
        params = yaml.safe_load((root / "params.yaml").read_text())
        set_params(root, **{"mf.lr": params["mf"]["lr"] * 2})
        run("git commit -q -am 'mf.lr doubled, not reproduced'", root, env)
        proc = subprocess.run([sys.executable, "-m", "pipeline.compare", "main", "trialrev"], cwd=root, env=env,
                              capture_output=True, text=True, timeout=120)
    finally:
        restore(root, env)
        run("git branch -q -D trialrev", root, env)
    line = one_line_error(proc)
    assert line.startswith("error: trialrev: its data/ranks.npz is not its own run: params.yaml mf differ"), line


def test_promote_runs_the_best_trials_through_the_pipeline(root, env, s1) -> None:
    import dvc.api

    before = snapshot(root, env)
    out = ok(tune(root, env, "mf", "--trials", "3", "--study", "s1", "--promote", "1"))  # the study is complete
    number, _, _ = best_line(out)
    name = f"s1-{number}"
    assert f"promoted trial {number} as DVC experiment {name!r}" in out, out
    assert snapshot(root, env)["git status"] == before["git status"] == ""
    shown = json.loads(run(f"{DVC} exp show --json", root, env, stdout_only=True))
    exps = {e["name"]: e["revs"][0]["data"] for rev in shown for e in (rev.get("experiments") or [])}
    data = exps[name]
    trial = load(root, "s1").trials[number]
    mf = data["params"]["params.yaml"]["data"]["mf"]
    assert {f"mf.{k}": v for k, v in mf.items() if f"mf.{k}" in trial.user_attrs["assigned"]} == \
        trial.user_attrs["assigned"]
    # its own run: its validation metrics are the trial's, bit for bit, and it has test metrics and ranks
    summary = data["metrics"]["metrics/training/mf/metrics.json"]["data"]
    assert summary["hr"] == pytest.approx(trial.value, abs=1e-6) and summary["epoch"] == trial.user_attrs["epoch"]
    assert "metrics/test/mf.json" in data["metrics"]
    ours = dvc.api.read("data/ranks.npz", repo=str(root), rev=name, mode="rb")
    assert ours != dvc.api.read("data/ranks.npz", repo=str(root), rev="main", mode="rb")
    proc = subprocess.run([sys.executable, "-m", "pipeline.compare", "main", name], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    row = next(line for line in proc.stdout.splitlines() if line.startswith("MF ") and "HR@" in line)
    assert "the same for every user" not in row, proc.stdout


def test_a_used_experiment_name_is_never_overwritten(root, env, s1) -> None:
    """The study started again under its name (its journal removed): its trial 0 would be promoted as
    s1-0 again; an experiment of that name exists (or is made now), and is kept as it was."""
    journal = root / JOURNAL
    saved = journal.read_bytes()
    try:
        if "s1-0" not in run(f"{DVC} exp list --name-only", root, env, stdout_only=True).split():
            run(f"{DVC} exp run --temp -n s1-0 -S mf.lr=0.003", root, env)
        ref_before = run(f"{DVC} exp list --name-only", root, env, stdout_only=True)
        journal.unlink()
        proc = tune(root, env, "mf", "--trials", "1", "--study", "s1", "--promote", "1")
        assert proc.returncode == 2, proc.stderr
        assert "promoting trial 0 as experiment 's1-0' failed" in proc.stderr.strip().splitlines()[-1], proc.stderr
        assert run(f"{DVC} exp list --name-only", root, env, stdout_only=True) == ref_before
    finally:
        journal.write_bytes(saved)


@pytest.fixture(scope="module")
def s1_resumed(root, env, s1) -> SimpleNamespace:
    out = ok(tune(root, env, "mf", "--trials", "5", "--study", "s1"))
    return SimpleNamespace(out=out, trials={t.number: t for t in finished(load(root, "s1"))})


def test_a_rerun_resumes_the_study_up_to_its_budget(root, env, s1, s1_resumed) -> None:
    assert "study 's1': 5 finished trials" in s1_resumed.out, s1_resumed.out
    assert len(s1_resumed.trials) == 5
    assert set(s1.trials) < set(s1_resumed.trials)


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
    # MaxTrialsCallback stops each worker after the trial it is running: up to N + K - 1
    assert 6 <= len(done) <= 7, [(t.number, t.state) for t in trials]
    assert not [t for t in trials if t.state not in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert {t.user_attrs["worker"] for t in done} == {0, 1}
    assert f"study 'par': {len(done)} finished trials" in out, out
    number, hr, _ = best_line(out)
    complete = [t for t in done if t.state == TrialState.COMPLETE]
    assert hr == pytest.approx(round(max(t.value for t in complete), 4), abs=1e-9), out
    assert run("git status --porcelain", root, env, stdout_only=True) == ""


DIVERGING_WORKER = r"""
import sys
import pipeline.train
import pipeline.tune as tune
from pipeline.common import PipelineError, run_stage
real, calls = pipeline.train.train_model, []
def train_model(name, *args, **kwargs):  # this worker's second trial diverges
    calls.append(1)
    if len(calls) == 2:
        raise PipelineError(f"{name}: the training loss is nan at epoch 1: lower the learning rate")
    return real(name, *args, **kwargs)
pipeline.train.train_model = train_model
sys.argv = ["pipeline.tune", "mf", "--trials", "6", "--study", "div", "--worker", sys.argv[1]]
run_stage(tune.main)
"""


def test_a_diverging_trial_fails_alone(root, env) -> None:
    """Two workers on one journal file; one trial of each raises PipelineError: both are marked failed
    with their reason, and the search goes on to its budget of finished trials."""
    from optuna.trial import TrialState

    procs = [subprocess.Popen([sys.executable, "-c", DIVERGING_WORKER, str(i)], cwd=root, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    outs = [proc.communicate(timeout=TUNE_TIMEOUT) for proc in procs]
    for proc, (out, err) in zip(procs, outs):
        assert proc.returncode == 0, err
        assert re.search(r"trial \d+ failed: mf: the training loss is nan at epoch 1", err), err
        assert "Traceback" not in err, err
    trials = load(root, "div").get_trials()
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(failed) == 2 and all("loss is nan" in t.user_attrs["error"] for t in failed), failed
    assert 6 <= len([t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]) <= 7


# ----------------------------------------------------------------------------- Ctrl-C

def training(study) -> bool:
    """Whether a trial is running past its start (its values chosen: the objective has begun)."""
    from optuna.trial import TrialState
    return any(t.state == TrialState.RUNNING and "assigned" in t.user_attrs for t in study.get_trials())


def test_ctrl_c_keeps_the_finished_trials(root, env) -> None:
    """Ctrl-C once a trial has finished and the next one is training: the running one is failed (not
    counted), the finished ones kept, and the same command resumes."""
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
    k = len(done) + 1
    out = ok(tune(root, env, "mf", "--trials", str(k), "--study", "intr"))
    assert len(finished(load(root, "intr"))) == k, out
    assert f"study 'intr': {k} finished trials" in out, out


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

    out = ok(tune(root, env, "mf", "--trials", "4", "--workers", "2", "--storage", postgres, "--study", "pg"))
    study = optuna.load_study(study_name="pg", storage=postgres)
    trials = study.get_trials()
    assert 4 <= len(finished(study)) <= 5, [(t.number, t.state) for t in trials]
    assert f"study 'pg': {len(finished(study))} finished trials" in out, out
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert study.user_attrs["model"] == "mf"
    journal = root / JOURNAL
    assert not journal.exists() or b'"pg"' not in journal.read_bytes()  # not in the journal file
    # Optuna's heartbeat: a trial whose worker stopped beating is failed and run again by the next worker
    from pipeline.tune import HEARTBEAT_S, open_storage
    storage = open_storage(postgres)
    assert storage.get_heartbeat_interval() == HEARTBEAT_S
    assert isinstance(storage.get_heartbeat_stale_trial_callback(), optuna.storages.RetryHeartbeatStaleTrialCallback)


# ----------------------------------------------------------------------------- --apply

def test_apply_writes_the_best_values_into_params_yaml(root, env) -> None:
    path = root / "params.yaml"
    committed = path.read_bytes()
    # a params.yaml with comments (the project's was written by yaml.safe_dump), committed: a search
    # refuses a params.yaml that differs from HEAD
    text = "# the knobs\n" + committed.decode().replace("\nmf:\n", "\nmf:  # the MF section\n", 1)
    assert "mf:  # the MF section\n" in text
    try:
        path.write_text(text)
        run("git commit -q -am 'params with comments'", root, env)
        out = ok(tune(root, env, "mf", "--trials", "2", "--study", "ap", "--apply"))
        applied = path.read_text()
    finally:
        run("git reset -q --hard HEAD~1", root, env)
    assert "wrote the best trial's values into params.yaml" in out, out
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
    assert path.read_bytes() == committed
