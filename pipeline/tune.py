"""Search a model's hyperparameters on validation: an Optuna study, each trial a DVC experiment.

    python -m pipeline.tune MODEL --trials N [--timeout S] [--storage URL] [--study NAME]
                            [--workers K | --worker I] [--pruner median|hyperband|none]
                            [--space KEY=LOW:HIGH[:log] | --space 'KEY=[A,B]'] [--apply] [--no-save]

Run from the repository root after `dvc repro` (it reads data/prepared, data/candidates/val.npz
and, for a fused model, its sources' train-only checkpoints). The searched knobs and ranges are the
model's `search` (its module, pipeline/models/MODEL.py); `--space` replaces one. A trial trains the
model exactly as its training stage's validated run does (train interactions only, its epoch chosen
by `select_by`; no refit), reporting each epoch's validation HR@topK to the pruner, and maximises
the chosen epoch's validation HR@topK by `select_by`. It never opens the test pairs or candidates.

Each finished trial (completed or pruned) is saved as a DVC experiment, NAME-<number>, of the
current commit: params.yaml with the trial's values and the model's validation metrics and curves
(metrics/training/MODEL/; its test metrics are left out: a trial is never tested), so `dvc exp show`
lists the trials. The workspace is not touched; `--apply` writes the best trial's values into
params.yaml (atomically, comments kept). The best trial is printed as the `dvc exp run -S ...`
command that reproduces it through the pipeline (its validation metrics are the trial's, bit for bit).

The study lives in `--storage`, an Optuna storage URL: by default the journal file
data/tune/journal.log (nothing to start); `postgresql+psycopg://USER@HOST/DB` for several machines.
`--trials N` counts the study's finished trials, so running the same command again resumes it, and
several workers (`--workers K` here, or `--worker I` on each of several machines) share the budget
of N. Ctrl-C ends the current trial (it is not counted) and keeps the finished ones.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import fcntl
import io
import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

from pipeline.common import PipelineError, configure_torch, pick_device, run_stage, write_text
from pipeline.models import get as get_model, list_models
from pipeline.params import (PARAMS_FILE, Search, Spec, _convert, is_trained, load_params, model_section,
                             validate)

log = logging.getLogger("tune")

DEFAULT_STORAGE = "data/tune/journal.log"  # Optuna's journal file: several processes may share it
PRUNERS = ("median", "hyperband", "none")
HEARTBEAT_S, GRACE_S = 60, 600  # a database storage's heartbeat: every minute; dead after ten
SIGNIFICANT = 3  # a sampled number is rounded to this many significant digits, and trained as rounded


# ----------------------------------------------------------------------------- the search space

def parse_space(text: str) -> tuple[str, Search]:
    """'lr=1e-4:0.1:log' -> ('lr', Search(1e-4, 0.1, log=True)); 'factors=[16,32]' -> choices."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise PipelineError(f"--space {text!r}: expected KEY=LOW:HIGH[:log] or KEY=[A,B,...]")
    if value.startswith("["):
        try:
            choices = yaml.safe_load(value)
        except yaml.YAMLError:
            choices = None
        if not isinstance(choices, list) or not choices:
            raise PipelineError(f"--space {text!r}: the choices must be a non-empty list, as [A,B,...]")
        return key, Search(choices=tuple(tuple(c) if isinstance(c, list) else c for c in choices))
    parts = value.split(":")
    try:
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "log"):
            raise ValueError
        return key, Search(float(parts[0]), float(parts[1]), log=len(parts) == 3)
    except ValueError:
        raise PipelineError(f"--space {text!r}: expected KEY=LOW:HIGH or KEY=LOW:HIGH:log (numbers)") from None


def space_of(name: str, overrides: dict[str, Search]) -> dict[str, Search]:
    """The model's search space with `overrides`, each range checked against its knob's Spec."""
    cls = get_model(name)
    space = {**cls.search, **overrides}
    if not space:
        raise PipelineError(f"{name}: nothing to tune (its module declares no `search` and no --space was given)")
    for key, search in space.items():
        where = f"{name} search space, {key!r}"
        spec: Spec | None = cls.params.get(key)
        if spec is None:
            raise PipelineError(f"{where}: not a knob of {name} (its knobs: {', '.join(cls.params) or 'none'})")
        if search.choices:
            for choice in search.choices:  # each a value the knob allows
                _convert(key, list(choice) if isinstance(choice, tuple) else choice, where, spec)
            continue
        if spec.kind not in ("int", "float"):
            raise PipelineError(f"{where}: {key!r} is {spec.describe()}: give choices, as {key}=[A,B]")
        if not search.low < search.high:
            raise PipelineError(f"{where}: the range [{search.low:g}, {search.high:g}] is empty or inverted")
        if search.log and search.low <= 0:
            raise PipelineError(f"{where}: a log-scale range needs low > 0, got {search.low:g}")
        if search.low < spec.low or search.high > spec.high or (spec.low_open and search.low <= spec.low) or (
                spec.high_open and search.high >= spec.high):
            raise PipelineError(f"{where}: the range {search.describe()} leaves the knob's allowed {spec.describe()}")
        if spec.kind == "int" and (search.low != int(search.low) or search.high != int(search.high)):
            raise PipelineError(f"{where}: {key!r} is an integer: the range needs integer ends")
    return space


def _round(x: float) -> float:
    return float(f"{x:.{SIGNIFICANT}g}")


def suggest(trial, name: str, space: dict[str, Search]) -> dict[str, Any]:
    """The trial's value of every searched knob (numbers rounded to SIGNIFICANT digits)."""
    cls, values = get_model(name), {}
    for key, search in space.items():
        if search.choices:
            labels = [json.dumps(list(c) if isinstance(c, tuple) else c) for c in search.choices]
            chosen = json.loads(trial.suggest_categorical(key, labels))
            values[key] = chosen
        elif cls.params[key].kind == "int":
            values[key] = trial.suggest_int(key, int(search.low), int(search.high), log=search.log)
        else:
            x = trial.suggest_float(key, search.low, search.high, log=search.log)
            rounded = _round(x)
            values[key] = rounded if search.low <= rounded <= search.high else x  # never out of the range
    return values


def assignments(params: dict, name: str, values: dict[str, Any]) -> dict[str, Any]:
    """The params.yaml keys (dotted for a section) a trial sets, including adding the model to
    `models`/`fused` when the pipeline does not train it yet."""
    cls = get_model(name)
    out = {(key if cls.top_level else f"{name}.{key}"): value for key, value in values.items()}
    if not is_trained(params, name):
        listed = "fused" if cls.fused_from else "models"
        out[listed] = [*params[listed], name]
    return out


def _set(mapping, key: str, value: Any) -> None:
    """Set a dotted key ('mf.lr': the field lr of section mf) in a params mapping."""
    *sections, last = key.split(".")
    for part in sections:
        mapping = mapping[part]
    mapping[last] = value


def apply_to(raw: dict, assigned: dict[str, Any]) -> dict:
    """A copy of the raw params mapping with `assigned` (dotted keys) set."""
    out = copy.deepcopy(raw)
    for key, value in assigned.items():
        _set(out, key, value)
    return out


def dvc_command(assigned: dict[str, Any]) -> str:
    """`dvc exp run -S ...` for these values (lists quoted for the shell)."""
    parts = []
    for key, value in assigned.items():
        text = "[" + ",".join(str(v) for v in value) + "]" if isinstance(value, list) else str(value)
        parts.append(f"-S '{key}={text}'" if isinstance(value, list) else f"-S {key}={text}")
    return "dvc exp run " + " ".join(parts)


def write_params(path: Path, assigned: dict[str, Any]) -> None:
    """Set `assigned` in params.yaml atomically, keeping its comments and layout (ruamel round-trip)."""
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedSeq

    yaml = YAML()
    yaml.width = 4096  # never re-wrap a line
    yaml.preserve_quotes = True  # `custom_sep: ","` stays as written
    doc = yaml.load(path.read_text(encoding="utf-8"))
    for key, value in assigned.items():
        if isinstance(value, list):
            value = CommentedSeq(value)
            value.fa.set_flow_style()
        _set(doc, key, value)
    buf = io.StringIO()
    yaml.dump(doc, buf)
    write_text(path, buf.getvalue())


# ----------------------------------------------------------------------------- saving trials

@contextlib.contextmanager
def sigint_deferred(raise_after: bool = True) -> Iterator[list[int]]:
    """Hold Ctrl-C until the block ends (a save or a storage write is never cut in half); then raise
    it, or (raise_after False) leave it in the yielded list for the caller to act on."""
    caught: list[int] = []
    if sys.platform == "win32" or not _main_thread():
        yield caught
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield caught
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught and raise_after:
            raise KeyboardInterrupt


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def _git(args: list[str], cwd: Path, env: dict | None = None) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise PipelineError(f"git {' '.join(args)}: {(proc.stderr or proc.stdout).strip().splitlines()[-1]}")
    return proc.stdout.strip()


def _git_env(root: Path) -> dict:
    """The user's git identity, or a stand-in where none is configured (a commit needs one)."""
    env = dict(os.environ)
    for key, fallback in (("user.name", "pipeline.tune"), ("user.email", "tune@localhost")):
        if not subprocess.run(["git", "config", key], cwd=root, capture_output=True, text=True).stdout.strip():
            role = "NAME" if key == "user.name" else "EMAIL"
            env.setdefault(f"GIT_AUTHOR_{role}", fallback)
            env.setdefault(f"GIT_COMMITTER_{role}", fallback)
    return env


class Saver:
    """Saves a trial as a DVC experiment of the commit `base`: a commit under DVC's experiment refs
    (refs/exps/...), made in a temporary git worktree, so the workspace is never touched. One save at
    a time (a file lock) and never cut by Ctrl-C."""

    def __init__(self, root: Path, name: str):
        from dvc.repo.experiments.refs import ExpRefInfo  # DVC's name for an experiment's ref

        self.root, self.name, self.ref_info = root, name, ExpRefInfo
        try:
            self.base = _git(["rev-parse", "--verify", "HEAD"], root)
        except PipelineError as err:
            raise PipelineError(f"each trial is saved as a DVC experiment of the current commit, and {root} has "
                                f"none ({err}); commit first, or pass --no-save") from None
        self.env = _git_env(root)
        self.lock_path = root / ".dvc" / "tmp" / "tune.lock"
        self.interrupted = False  # Ctrl-C came during a save: the search stops once the trial is counted

    def save(self, exp_name: str, assigned: dict[str, Any], live_dir: Path) -> None:
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        with sigint_deferred(raise_after=False) as caught, open(self.lock_path, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            tree = Path(tempfile.mkdtemp(prefix="tune-", dir=self.lock_path.parent))
            try:
                _git(["worktree", "add", "-q", "--detach", str(tree), self.base], self.root)
                write_params(tree / PARAMS_FILE, assigned)
                dest = tree / "metrics" / "training" / self.name
                shutil.rmtree(dest, ignore_errors=True)
                shutil.copytree(live_dir, dest)
                (tree / "metrics" / "test" / f"{self.name}.json").unlink(missing_ok=True)
                _git(["add", "-A", "--", PARAMS_FILE, "metrics"], tree)
                _git(["commit", "-q", "--no-verify", "-m", f"pipeline.tune: {exp_name}"], tree, self.env)
                rev = _git(["rev-parse", "HEAD"], tree)
                _git(["update-ref", str(self.ref_info(self.base, exp_name)), rev], self.root)
            finally:
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=self.root,
                               capture_output=True)
                shutil.rmtree(tree, ignore_errors=True)
                self.interrupted = self.interrupted or bool(caught)


# ----------------------------------------------------------------------------- one trial

class Trials:
    """What every trial of one model needs: the data (train and validation only) and how to train."""

    def __init__(self, name: str, params: dict, raw: dict, space: dict[str, Search], study: str,
                 saver: Saver | None, scratch: Path, heartbeat=None):
        from pipeline.data import load_candidates, load_split
        from pipeline.training import Validation

        self.name, self.params, self.raw, self.space, self.study = name, params, raw, space, study
        self.saver, self.scratch = saver, scratch
        self.heartbeat = heartbeat  # a database storage: a running trial says it is alive (HEARTBEAT_S)
        self.split = load_split("data/prepared", test=False)  # never the test pairs
        self.val = Validation.of(load_candidates("data/candidates/val.npz"), self.split.train,
                                 params["full_rank_users"], params["candidate_seed"])
        self.device = pick_device(params["device"])

    def run(self, trial) -> float:
        """Train one trial; return its chosen epoch's validation HR (raises TrialPruned when pruned)."""
        import optuna

        from pipeline.train import EpochLog, build
        from pipeline.training import FitConfig, fit

        values = suggest(trial, self.name, self.space)
        assigned = assignments(self.params, self.name, values)
        params = validate(apply_to(self.raw, assigned), f"{self.study} trial {trial.number}", models=(self.name,))
        trial.set_user_attr("assigned", assigned)
        cls, k, select_by = get_model(self.name), params["topK"], params["select_by"]
        live_dir = self.scratch / f"{trial.number}"
        epochs = EpochLog(live_dir)
        rows, pruned = [], False
        try:
            if cls.neural:
                cfg = FitConfig.from_section(model_section(params, self.name), params["seed"], k, select_by)

                def on_row(row) -> None:
                    epochs(row)
                    rows.append(row)
                    trial.report(row.key(select_by)[0], row.epoch)
                    if trial.should_prune():
                        raise optuna.TrialPruned(f"pruned after epoch {row.epoch}")

                last_beat = [time.monotonic()]

                def on_batch() -> None:
                    if self.heartbeat is not None and time.monotonic() - last_beat[0] >= HEARTBEAT_S / 2:
                        self.heartbeat.record_heartbeat(trial._trial_id)
                        last_beat[0] = time.monotonic()

                model = build(self.name, self.split, params, Path("data/models"), refitted=False)
                try:
                    fit(model, self.split.history(val=False), self.val, cfg, self.device, self.name,
                        on_batch=on_batch, on_row=on_row)
                except optuna.TrialPruned:
                    pruned = True
                best = max(rows, key=lambda r: r.key(select_by))  # the earliest best, as fit keeps
                epochs.close(best, best.epoch)
            else:
                section = model_section(params, self.name)
                state = cls.fit(self.split.train, section)
                best = dataclasses.replace(self.val.measure(cls.from_state(state, self.split.history(val=False)), k),
                                           epoch=1)
                epochs(best)
                epochs.close(best, None)
            hr, ndcg = best.key(select_by)
            trial.set_user_attr("ndcg", ndcg)
            trial.set_user_attr("epoch", best.epoch if cls.neural else None)
            exp_name = f"{self.study}-{trial.number}"
            if self.saver is not None:
                self.saver.save(exp_name, assigned, live_dir)
                trial.set_user_attr("experiment", exp_name)
        finally:
            shutil.rmtree(live_dir, ignore_errors=True)
        if pruned:
            raise optuna.TrialPruned()
        return hr


# ----------------------------------------------------------------------------- the study

def open_storage(url: str | None):
    """The Optuna storage of a URL (default: the journal file), or a one-line error if unreachable."""
    import optuna

    if url is None:
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        path = Path(DEFAULT_STORAGE)
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if url.startswith("postgresql") and "connect_timeout" not in url:
        url += ("&" if "?" in url else "?") + "connect_timeout=5"  # an unreachable server fails, not hangs
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            # a trial whose worker stops beating for GRACE_S (killed, its machine gone) is failed by the others
            return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S)
    except Exception as err:  # sqlalchemy's errors name the server; keep their first line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PipelineError(f"--storage {url.split('?')[0]}: cannot open the study storage: {first}") from None


def make_pruner(kind: str, epochs: int | None):
    import optuna

    if kind == "none" or epochs is None:
        return optuna.pruners.NopPruner()
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(epochs, 1))
    return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=2)


def finished(study) -> list:
    from optuna.trial import TrialState
    return [t for t in study.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]


WORKER = f"{socket.gethostname()}:{os.getpid()}"  # which process runs a trial (its user attr "worker")


def fail_dead(study) -> None:
    """Mark as failed the running trials of this machine's workers that are gone (killed outright):
    the journal file has no heartbeat, and such a trial would hold a place in the budget forever."""
    from optuna.trial import TrialState

    from pipeline.common import _pid_alive
    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        where, _, pid = str(t.user_attrs.get("worker", "")).rpartition(":")
        if where == host and pid.isdigit() and not _pid_alive(int(pid)):
            study.tell(t.number, state=TrialState.FAIL)


def over_budget(study, trial, total: int) -> bool:
    """Whether `trial` would exceed `total`: the finished trials and the running ones numbered before
    it (another worker's) already fill it. The lower number wins a race, so no trial runs past N."""
    from optuna.trial import TrialState
    ahead = [t for t in study.get_trials(deepcopy=False)
             if t.state == TrialState.RUNNING and t.number < trial.number]
    return len(finished(study)) + len(ahead) >= total


def search(study, trials: Trials, total: int, timeout: float | None) -> None:
    """Run trials until the study has `total` finished ones (or `timeout` seconds have passed)."""
    import optuna
    from optuna.trial import TrialState

    heartbeat = trials.heartbeat

    deadline = None if timeout is None else time.monotonic() + timeout
    while len(finished(study)) < total and (deadline is None or time.monotonic() < deadline):
        if heartbeat is not None:
            optuna.storages.fail_stale_trials(study)  # a worker gone on another machine
        with sigint_deferred(raise_after=False) as caught:
            trial = study.ask()
            trial.set_user_attr("worker", WORKER)
            if caught:
                study.tell(trial, state=TrialState.FAIL)
            elif heartbeat is not None:
                heartbeat.record_heartbeat(trial._trial_id)
        if caught:
            raise KeyboardInterrupt
        if over_budget(study, trial, total):
            with sigint_deferred():
                study.tell(trial, state=TrialState.FAIL)  # never run: another worker took the last one
            break
        start = time.perf_counter()
        try:
            value = trials.run(trial)
        except optuna.TrialPruned:
            with sigint_deferred():
                study.tell(trial, state=TrialState.PRUNED)
            if trials.saver is not None and trials.saver.interrupted:
                raise KeyboardInterrupt from None
            log.info("trial %d pruned (%.1f s)", trial.number, time.perf_counter() - start)
            continue
        except BaseException:
            with sigint_deferred():
                study.tell(trial, state=TrialState.FAIL)
            raise
        with sigint_deferred():
            study.tell(trial, value)
        if trials.saver is not None and trials.saver.interrupted:
            raise KeyboardInterrupt  # after the trial it saved was counted
        log.info("trial %d: validation HR@%d %.4f (best %.4f, trial %d; %.1f s)", trial.number,
                 trials.params["topK"], value, study.best_value, study.best_trial.number, time.perf_counter() - start)


def check_study(study, name: str, space: dict[str, Search], params: dict) -> None:
    """A study is for one model, space and dataset: refuse to mix (a one-line error)."""
    made = {"model": name, "space": {k: v.describe() for k, v in space.items()}, "dataset": params["dataset"],
            "select_by": params["select_by"], "topK": params["topK"]}
    have = {key: study.user_attrs.get(key) for key in made}
    if all(value is None for value in have.values()):
        for key, value in made.items():
            study.set_user_attr(key, value)
        return
    differ = [key for key in made if have[key] != made[key]]
    if differ:
        raise PipelineError(f"study {study.study_name!r} was made with another {', '.join(differ)} "
                            f"({'; '.join(f'{k}: {have[k]}' for k in differ)}); name another --study")


def report(study, name: str, params: dict, apply: bool) -> None:
    """Print the study's counts and the best trial as the command that reproduces it."""
    from optuna.trial import TrialState

    done = finished(study)
    pruned = sum(t.state == TrialState.PRUNED for t in done)
    complete = [t for t in done if t.state == TrialState.COMPLETE]
    print(f"study {study.study_name!r}: {len(done)} finished trials ({len(complete)} complete, {pruned} pruned)")
    if not complete:
        return
    best = max(complete, key=lambda t: (t.value, t.user_attrs.get("ndcg", 0.0), -t.number))
    epoch = best.user_attrs.get("epoch")
    print(f"best: trial {best.number}" + (f" (experiment {best.user_attrs['experiment']})"
                                          if "experiment" in best.user_attrs else "") +
          f": validation HR@{params['topK']} {best.value:.4f}, NDCG {best.user_attrs.get('ndcg', math.nan):.4f} "
          f"by {params['select_by']}" + (f", epoch {epoch}" if epoch else ""))
    assigned = best.user_attrs["assigned"]
    print("reproduce it through the pipeline:\n  " + dvc_command(assigned))
    if apply:
        write_params(Path(PARAMS_FILE), assigned)
        print(f"wrote these values into {PARAMS_FILE}")


def run_workers(argv: list[str], workers: int) -> None:
    """Start `workers` processes of this command (--worker 0..K-1) and wait; a failed one stops all."""
    base = [a for a in argv if a != "--apply"]
    procs = [subprocess.Popen([sys.executable, "-m", "pipeline.tune", *base, "--workers", "1", "--worker", str(i),
                               "--quiet-summary"]) for i in range(workers)]
    failed = None
    try:
        while procs and failed is None:
            for proc in list(procs):
                code = proc.poll()
                if code is not None:
                    procs.remove(proc)
                    failed = failed if not code else code
            time.sleep(0.2)
    finally:  # Ctrl-C reached the workers too; a failure stops the others the same way: each ends its trial
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in procs:
            proc.wait()
    if failed is not None:
        raise PipelineError(f"a tune worker exited with status {failed}; the others were stopped")


def main() -> None:
    parser = argparse.ArgumentParser(description="Search a model's hyperparameters on validation (Optuna).")
    parser.add_argument("model", help="one of " + ", ".join(list_models()))
    parser.add_argument("--trials", type=int, required=True, help="finished trials the study should have, in all")
    parser.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
    parser.add_argument("--storage", help=f"an Optuna storage URL (default: the journal file {DEFAULT_STORAGE})")
    parser.add_argument("--study", help="the study's name (default: tune-MODEL); the same name resumes it")
    parser.add_argument("--workers", type=int, default=1, help="worker processes on this machine, sharing the study")
    parser.add_argument("--worker", type=int, default=0, help="this worker's number (its sampler's seed)")
    parser.add_argument("--pruner", choices=PRUNERS, default="median", help="stops poor trials early (default median)")
    parser.add_argument("--space", action="append", default=[], metavar="KEY=RANGE",
                        help="replace a knob's range: KEY=LOW:HIGH, KEY=LOW:HIGH:log or KEY=[A,B,...]")
    parser.add_argument("--apply", action="store_true", help="write the best trial's values into params.yaml")
    parser.add_argument("--no-save", action="store_true", help="do not save trials as DVC experiments")
    parser.add_argument("--quiet-summary", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    name = args.model
    if name not in list_models():
        raise PipelineError(f"no model {name!r}: pipeline/models/ has {', '.join(list_models())}")
    if args.trials < 1 or args.workers < 1 or args.worker < 0 or (args.timeout is not None and args.timeout <= 0):
        raise PipelineError("--trials and --workers must be at least 1, --worker at least 0, --timeout positive")
    space = space_of(name, dict(parse_space(text) for text in args.space))
    params = load_params(models=(name,))
    import yaml
    raw = yaml.safe_load(Path(PARAMS_FILE).read_text(encoding="utf-8"))
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    logging.getLogger("training").setLevel(logging.WARNING)  # a line per trial, not per epoch
    storage = open_storage(args.storage)
    study_name = args.study or f"tune-{name}"
    cls = get_model(name)
    epochs = model_section(params, name).get("epochs") if cls.neural else None
    try:
        study = optuna.create_study(storage=storage, study_name=study_name, direction="maximize",
                                    pruner=make_pruner(args.pruner, epochs), load_if_exists=True)
    except Exception as err:
        if isinstance(err, PipelineError):
            raise
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise PipelineError(f"--storage: cannot open study {study_name!r}: {first}") from None
    check_study(study, name, space, params)
    fail_dead(study)
    # Seeded per worker and per resumption (a resumed study must not repeat its first trials' draws)
    study.sampler = optuna.samplers.TPESampler(seed=params["seed"] + 1000 * args.worker + len(study.trials))
    if args.workers > 1:
        run_workers(sys.argv[1:], args.workers)
    else:
        configure_torch()
        saver = None if args.no_save else Saver(Path.cwd(), name)
        Path(DEFAULT_STORAGE).parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="tune-", dir=Path(DEFAULT_STORAGE).parent) as scratch:
            heartbeat = storage if isinstance(storage, optuna.storages.RDBStorage) else None
            trials = Trials(name, params, raw, space, study_name, saver, Path(scratch), heartbeat)
            log.info("%s: %d finished trials of %d; searching %s", study_name, len(finished(study)), args.trials,
                     ", ".join(f"{k} {v.describe()}" for k, v in space.items()))
            try:
                search(study, trials, args.trials, args.timeout)
            except KeyboardInterrupt:
                log.warning("interrupted: %d finished trials are kept in %r; the same command resumes it",
                            len(finished(study)), study_name)
                raise
    if not args.quiet_summary:
        report(study, name, params, args.apply)


if __name__ == "__main__":
    run_stage(main)
