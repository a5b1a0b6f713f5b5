"""Search a model's hyperparameters on validation with Optuna; promote the best trials to real runs.

    python -m pipeline.tune MODEL --trials N [--timeout S] [--max-seconds S] [--storage URL]
                            [--study NAME] [--workers K | --worker I] [--pruner median|hyperband|none]
                            [--space KEY=LOW:HIGH[:log] | --space 'KEY=[A,B]'] [--promote K] [--apply]

Run from the repository root after `dvc repro`, with params.yaml and pipeline/ as committed. A trial
calls the training stage's own function (pipeline.train.train_model, `refit` off) on train and
validation only, reports its best epoch so far to the pruner, records its training seconds, and
returns its chosen epoch's validation HR@topK. The loop is Optuna's (`study.optimize`), its budget N
finished trials shared by every worker on the storage (the journal file data/tune/journal.log, or
PostgreSQL). A trial is never saved as a DVC experiment: `--promote K` runs the best K through the
pipeline as experiments STUDY-<trial>. docs/experiments.md has the whole story.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import math
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from pipeline.common import PipelineError, configure_torch, run_stage, write_text
from pipeline.models import get as get_model, list_models
from pipeline.params import PARAMS_FILE, Search, Spec, _convert, is_trained, load_params, model_section, validate

log = logging.getLogger("tune")

DEFAULT_STORAGE = "data/tune/journal.log"  # Optuna's journal file: several processes may share it
PICTURES = Path("data/tune")  # each study's PNG files
PRUNERS = ("median", "hyperband", "none")
HEARTBEAT_S, GRACE_S = 60, 600  # a database storage's heartbeat: every minute; dead after ten
RETRIES = 1  # a dead worker's trial is run again once, by another worker
WARMUP = 0.5  # the pruner never stops a trial before this fraction of its epochs
SIGNIFICANT = 3  # a sampled number is rounded to this many significant digits, and trained as rounded
TRAINED = ("params.yaml", "pipeline")  # what a trial runs: it must be HEAD's


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
    import copy

    out = copy.deepcopy(raw)
    for key, value in assigned.items():
        _set(out, key, value)
    return out


def set_options(assigned: dict[str, Any]) -> list[str]:
    """The `dvc exp run` options that set these values: ["-S", "mf.lr=0.01", "-S", "layers=[64,32]", ...]."""
    return [arg for key, value in assigned.items() for arg in
            ("-S", f"{key}=" + ("[" + ",".join(map(str, value)) + "]" if isinstance(value, list) else str(value)))]


def dvc_command(assigned: dict[str, Any]) -> str:
    """`dvc exp run -S ...` for these values, as a shell line (lists quoted)."""
    import shlex

    return "dvc exp run " + " ".join(shlex.quote(arg) for arg in set_options(assigned))


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


# ----------------------------------------------------------------------------- one trial

class Objective:
    """One model's trials: the data (train and validation only), and the training stage's own function."""

    def __init__(self, name: str, params: dict, raw: dict, space: dict[str, Search], max_seconds: float | None,
                 commit: str, worker: int):
        from pipeline.data import load_candidates, load_split
        from pipeline.training import Validation

        self.name, self.params, self.raw, self.space = name, params, raw, space
        self.max_seconds, self.commit, self.worker = max_seconds, commit, worker
        self.split = load_split("data/prepared", test=False)  # never the test pairs
        self.val = Validation.of(load_candidates("data/candidates/val.npz"), self.split.train,
                                 params["full_rank_users"], params["candidate_seed"])

    def __call__(self, trial) -> float:
        """Train one trial; return its chosen epoch's validation HR (raises TrialPruned when pruned)."""
        import optuna

        from pipeline.train import train_model

        assigned = assignments(self.params, self.name, suggest(trial, self.name, self.space))
        params = validate(apply_to(self.raw, assigned), f"trial {trial.number}", models=(self.name,))
        trial.set_user_attr("assigned", assigned)
        trial.set_user_attr("commit", self.commit)
        trial.set_user_attr("worker", self.worker)
        select_by, best = params["select_by"], [-math.inf]

        def on_row(row) -> None:  # the pruner sees what the objective returns: the best epoch so far
            best[0] = max(best[0], row.key(select_by)[0])
            trial.report(best[0], row.epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {row.epoch}")

        start = time.perf_counter()
        try:
            _, _, curve, chosen = train_model(self.name, self.split, self.val, {**params, "refit": False},
                                              Path("data/models"), on_row)
        except PipelineError as err:
            trial.set_user_attr("error", str(err))
            raise
        finally:
            seconds = time.perf_counter() - start
            trial.set_user_attr("train_s", round(seconds, 2))
            if self.max_seconds is not None:
                trial.set_constraint("train_time", seconds - self.max_seconds)  # feasible when <= 0
        hr, ndcg = curve[chosen - 1].key(select_by)
        trial.set_user_attr("ndcg", ndcg)
        trial.set_user_attr("epoch", chosen if get_model(self.name).neural else None)
        return hr


def log_trial(study, trial) -> None:
    """Optuna's callback: one line per finished trial (a failed one with its reason, no traceback)."""
    from optuna.trial import TrialState

    seconds = trial.user_attrs.get("train_s", math.nan)
    if trial.state == TrialState.COMPLETE:
        feasible = "" if feasible_trial(trial) else ", over --max-seconds"
        log.info("trial %d: validation HR %.4f in %.1f s%s", trial.number, trial.value, seconds, feasible)
    elif trial.state == TrialState.PRUNED:
        log.info("trial %d pruned (%.1f s)", trial.number, seconds)
    else:
        log.warning("trial %d failed: %s", trial.number, trial.user_attrs.get("error", "interrupted or crashed"))


def feasible_trial(trial) -> bool:
    """Whether a trial met its constraints (trained within --max-seconds)."""
    return all(value <= 0 for value in trial.constraints.values())


# ----------------------------------------------------------------------------- the study

def open_storage(url: str | None):
    """The Optuna storage of a URL (default: the journal file), or a one-line error if unreachable."""
    import optuna

    if url is None:
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

        path = Path(DEFAULT_STORAGE)
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))
    if url.startswith("postgresql") and "connect_timeout" not in url:
        url += ("&" if "?" in url else "?") + "connect_timeout=5"  # an unreachable server fails, not hangs
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=RETRIES))
    except Exception as err:  # sqlalchemy's errors name the server; keep their first line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PipelineError(f"--storage {url.split('?')[0]}: cannot open the study storage: {first}") from None


def make_pruner(kind: str, epochs: int | None):
    import optuna

    if kind == "none" or epochs is None:
        return optuna.pruners.NopPruner()
    warmup = max(1, math.ceil(WARMUP * epochs))
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=warmup, max_resource=max(epochs, warmup))
    return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=warmup)


def finished(study) -> list:
    from optuna.trial import TrialState
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))


def check_study(study, name: str, space: dict[str, Search], params: dict, max_seconds: float | None) -> None:
    """A study is for one model, space, dataset and time budget: refuse to mix (a one-line error)."""
    made = {"model": name, "space": {k: v.describe() for k, v in space.items()}, "dataset": params["dataset"],
            "select_by": params["select_by"], "topK": params["topK"], "max_seconds": max_seconds}
    have = {key: study.user_attrs.get(key) for key in made}
    if not study.user_attrs:
        for key, value in made.items():
            study.set_user_attr(key, value)
        return
    differ = [key for key in made if have[key] != made[key]]
    if differ:
        raise PipelineError(f"study {study.study_name!r} was made with another {', '.join(differ)} "
                            f"({'; '.join(f'{k}: {have[k]}' for k in differ)}); name another --study")


def ranked(study) -> list:
    """The complete, feasible trials, best first (HR, then NDCG, then the earlier)."""
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if feasible_trial(t)]
    return sorted(done, key=lambda t: (-t.value, -t.user_attrs.get("ndcg", 0.0), t.number))


def summary(study, params: dict) -> None:
    """Print the study's counts and its best trial, with its seconds and the command that reproduces it."""
    from optuna.trial import TrialState

    states = [t.state for t in study.get_trials(deepcopy=False)]
    print(f"study {study.study_name!r}: {len(finished(study))} finished trials ({states.count(TrialState.COMPLETE)} "
          f"complete, {states.count(TrialState.PRUNED)} pruned; {states.count(TrialState.FAIL)} failed)")
    best = ranked(study)
    if not best:
        print("no complete trial" + (" within --max-seconds" if study.user_attrs.get("max_seconds") else ""))
        return
    t = best[0]
    epoch = t.user_attrs.get("epoch")
    print(f"best: trial {t.number}: validation HR@{params['topK']} {t.value:.4f}, NDCG "
          f"{t.user_attrs.get('ndcg', math.nan):.4f} by {params['select_by']}" + (f", epoch {epoch}" if epoch else "")
          + f"; trained in {t.user_attrs['train_s']:.1f} s")
    print("run it through the pipeline:\n  " + dvc_command(t.user_attrs["assigned"]))


def draw(study, directory: Path = PICTURES) -> list[Path]:
    """The study's pictures, as PNG files in `directory`: optimisation history, parameter importances
    (with two or more complete trials), and validation HR against training seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as views

    directory.mkdir(parents=True, exist_ok=True)
    complete = [t for t in finished(study) if t.value is not None]
    written = []

    def save(kind: str, axes) -> None:
        path = directory / f"{study.study_name}-{kind}.png"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            axes.figure.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(axes.figure)
        written.append(path)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib views experimental
        if complete:
            save("history", views.plot_optimization_history(study))
        if len(complete) >= 2 and len({json.dumps(t.params, sort_keys=True) for t in complete}) >= 2:
            save("importances", views.plot_param_importances(study))
    timed = [t for t in complete if "train_s" in t.user_attrs]
    if timed:
        fig, axes = plt.subplots(figsize=(6, 4))
        for ok, marker, label in ((True, "o", "feasible"), (False, "x", "over --max-seconds")):
            pts = [(t.user_attrs["train_s"], t.value) for t in timed if feasible_trial(t) == ok]
            if pts:
                axes.scatter(*zip(*pts), marker=marker, label=label)
        if study.user_attrs.get("max_seconds"):
            axes.axvline(study.user_attrs["max_seconds"], linestyle="--", color="grey")
        axes.set_xlabel("training seconds")
        axes.set_ylabel("validation HR")
        axes.set_title(f"{study.study_name}: quality against cost")
        axes.legend()
        save("seconds", axes)
    return written


# ----------------------------------------------------------------------------- before and after

def _git(args: list[str]) -> str:
    proc = subprocess.run(["git", *args], capture_output=True, text=True)
    if proc.returncode:
        raise PipelineError(f"git {' '.join(args)}: {(proc.stderr or proc.stdout).strip().splitlines()[-1]}")
    return proc.stdout.rstrip()  # a porcelain line starts with a space


def head_commit() -> str:
    """HEAD's commit, once params.yaml and pipeline/ are checked to be HEAD's (else a one-line error)."""
    try:
        commit = _git(["rev-parse", "--verify", "HEAD"])
    except PipelineError as err:
        raise PipelineError(f"a trial trains what HEAD says, and there is no commit here ({err}); commit first") from None
    changed = [line[3:] for line in _git(["status", "--porcelain", "--untracked-files=all", "--", *TRAINED])
               .splitlines()]
    if PARAMS_FILE in changed:  # `dvc exp run -S` rewrites the layout: the values are what a trial trains
        import yaml
        if yaml.safe_load(Path(PARAMS_FILE).read_text(encoding="utf-8")) == yaml.safe_load(
                _git(["show", f"HEAD:{PARAMS_FILE}"])):
            changed.remove(PARAMS_FILE)
    if changed:
        raise PipelineError(f"{', '.join(changed)}: differ from HEAD; commit or stash them first (a trial must "
                            "train what HEAD says, and its promoted experiment is HEAD plus the trial's values)")
    return commit


def promote(study, count: int) -> list[str]:
    """Run the best `count` trials through the real pipeline as DVC experiments; return their names."""
    names = []
    for t in ranked(study)[:count]:
        name = f"{study.study_name}-{t.number}"
        args = [sys.executable, "-m", "dvc", "exp", "run", "--temp", "-n", name, *set_options(t.user_attrs["assigned"])]
        log.info("promoting trial %d: %s", t.number, " ".join(["dvc", *args[3:]]))
        proc = subprocess.run(args, capture_output=True, text=True)
        if proc.returncode:
            lines = (proc.stderr or proc.stdout).strip().splitlines() or ["no output"]
            why = next((ln for ln in lines if "ERROR" in ln), lines[-1])
            raise PipelineError(f"promoting trial {t.number} as experiment {name!r} failed: {why.strip()}")
        names.append(name)
        print(f"promoted trial {t.number} as DVC experiment {name!r}: python -m pipeline.compare HEAD {name}")
    return names


def run_workers(argv: list[str], workers: int) -> None:
    """Run `workers` processes of this command (--worker 0..K-1) on one storage; wait for every one.
    (Each is quiet: this process prints the summary, and promotes or applies.)"""
    procs = [subprocess.Popen([sys.executable, "-m", "pipeline.tune", *argv, "--workers", "1", "--worker", str(i),
                               "--quiet-summary"]) for i in range(workers)]
    try:
        codes = [proc.wait() for proc in procs]
    finally:  # Ctrl-C reaches the workers too: each fails its running trial and ends
        for proc in procs:
            proc.wait()
    if any(codes):
        raise PipelineError(f"tune workers exited with status {', '.join(map(str, codes))}; the study keeps the "
                            "finished trials")


def main() -> None:
    parser = argparse.ArgumentParser(description="Search a model's hyperparameters on validation (Optuna).")
    parser.add_argument("model", help="one of " + ", ".join(list_models()))
    parser.add_argument("--trials", type=int, required=True, help="finished trials the study should have, in all")
    parser.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
    parser.add_argument("--max-seconds", type=float, help="a trial that trains longer than this is infeasible")
    parser.add_argument("--storage", help=f"an Optuna storage URL (default: the journal file {DEFAULT_STORAGE})")
    parser.add_argument("--study", help="the study's name (default: tune-MODEL); the same name resumes it")
    parser.add_argument("--workers", type=int, default=1, help="worker processes on this machine, sharing the study")
    parser.add_argument("--worker", type=int, default=0, help="this worker's number (its sampler's seed)")
    parser.add_argument("--pruner", choices=PRUNERS, default="median", help="stops poor trials early (default median)")
    parser.add_argument("--space", action="append", default=[], metavar="KEY=RANGE",
                        help="replace a knob's range: KEY=LOW:HIGH, KEY=LOW:HIGH:log or KEY=[A,B,...]")
    parser.add_argument("--promote", type=int, default=0, metavar="K",
                        help="run the best K trials through the pipeline as DVC experiments")
    parser.add_argument("--apply", action="store_true", help="write the best trial's values into params.yaml")
    parser.add_argument("--quiet-summary", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    name = args.model
    if name not in list_models():
        raise PipelineError(f"no model {name!r}: pipeline/models/ has {', '.join(list_models())}")
    if args.trials < 1 or args.workers < 1 or args.worker < 0 or args.promote < 0 or any(
            x is not None and x <= 0 for x in (args.timeout, args.max_seconds)):
        raise PipelineError("--trials and --workers must be at least 1, --worker and --promote at least 0, "
                            "--timeout and --max-seconds positive")
    space = space_of(name, dict(parse_space(text) for text in args.space))
    params = load_params(models=(name,))
    commit = head_commit()
    import yaml
    raw = yaml.safe_load(Path(PARAMS_FILE).read_text(encoding="utf-8"))
    import optuna
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # log_trial says what happened, in one line each
    for quiet in ("training", "train"):
        logging.getLogger(quiet).setLevel(logging.WARNING)  # a line per trial, not per epoch
    storage = open_storage(args.storage)
    study_name = args.study or f"tune-{name}"
    epochs = model_section(params, name).get("epochs") if get_model(name).neural else None
    # Seeded per worker and per resumption (two workers, or a resumed study, must not repeat draws)
    seed = params["seed"] + 1000 * args.worker
    try:
        study = optuna.create_study(storage=storage, study_name=study_name, direction="maximize",
                                    pruner=make_pruner(args.pruner, epochs), load_if_exists=True)
        study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials), constant_liar=True)
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise PipelineError(f"--storage: cannot open study {study_name!r}: {first}") from None
    check_study(study, name, space, params, args.max_seconds)
    if args.workers > 1:
        run_workers(sys.argv[1:], args.workers)
    elif len(finished(study)) < args.trials:
        configure_torch()
        objective = Objective(name, params, raw, space, args.max_seconds, commit, args.worker)
        log.info("%s: %d finished trials of %d; searching %s", study_name, len(finished(study)), args.trials,
                 ", ".join(f"{k} {v.describe()}" for k, v in space.items()))
        try:
            study.optimize(objective, timeout=args.timeout, catch=(PipelineError,), callbacks=[
                MaxTrialsCallback(args.trials, states=(TrialState.COMPLETE, TrialState.PRUNED)), log_trial])
        except KeyboardInterrupt:
            log.warning("interrupted: %d finished trials are kept in %r; the same command resumes it",
                        len(finished(study)), study_name)
            raise
    if args.quiet_summary:
        return
    summary(study, params)
    for path in draw(study):
        print(f"wrote {path}")
    if args.promote:
        promote(study, args.promote)
    if args.apply and ranked(study):
        write_params(Path(PARAMS_FILE), ranked(study)[0].user_attrs["assigned"])
        print(f"wrote the best trial's values into {PARAMS_FILE}")


if __name__ == "__main__":
    run_stage(main)
