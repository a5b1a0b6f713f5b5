"""Faults and concurrency through the real `dvc`, on a copy of the repo and a tiny generated dataset.

Cases from the issue tracker:
1. the training process is SIGKILLed mid-epoch, then `dvc repro`: a clean re-run whose outputs equal
   an uninterrupted run's, byte for byte; the same after SIGKILLing dvc's whole process group (no
   stale lock blocks the re-run); temporary files that a kill during a save would leave behind. With
   `refit` on, the training process forks a child that refits the model side by side: the child
   dies with its parent (PR_SET_PDEATHSIG), and no process is left;
2. two queued experiments run by `dvc queue start -j 2`: both succeed and each equals the same
   experiment run alone with `dvc exp run -S` (in a copy of the project whose DVC run-cache has not
   seen them, so that they really train);
3. the same params trained and evaluated with OMP_NUM_THREADS/MKL_NUM_THREADS 1 and 2: byte-identical
   outputs (every stage computes on one intra-op thread, pipeline.common.THREADS: two change the
   bits); and forced to compute on two threads, training with its refit still runs to the end;
4. the same params trained and evaluated with torch's kernel level (ATEN_CPU_CAPABILITY) at default,
   avx2 and, where the CPU has it, avx512, and MKL's, oneDNN's, numpy's and OpenBLAS's instruction
   variables at other levels: byte-identical outputs (pipeline/cpu.py pins them); and with
   `cpu_kernels: native` the same variables do change the bytes (so the pin is what holds them).

Every process these tests start carries MARKER_VAR in its environment (the queue's detached workers
too), so stray processes can be found and stopped by id at the end.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import copy_pipeline, REPO, set_params
from pipeline.cpu import cpu_flags
from dvc_project import COPIED, TINY_PARAMS, choose_models, curve_files, ran_stages

MODELS = ["itempop", "mlp", "gmf"]  # models: [gmf], fused: []; the scenarios change the MLP's (top-level)
# knobs, and gmf shows the other models stay put
KILL_EPOCHS = 120  # about 25 ms an epoch here: long enough to kill mid-training, short to re-run
KILL_AFTER_EPOCH = 5
QUEUE_EPOCHS = 30
QUEUE_LRS = ("0.01", "0.001")
CHECKPOINTS = ("data/models/mlp.pt", "data/models/mlp.trainonly.pt")
LIVE_SUMMARY = "metrics/training/mlp/metrics.json"  # DVCLive's summary: the latest epoch's, then the chosen one's
LIVE_HR = "metrics/training/mlp/plots/metrics/hr.tsv"  # one of DVCLive's curves: `step\thr`, a row per epoch
TRAIN_OUTS = (*CHECKPOINTS, LIVE_SUMMARY, *curve_files("mlp"))  # train_mlp's files
EVAL_OUTS = (*(f"metrics/test/{m}.json" for m in MODELS), "metrics/intervals.json", "metrics/hr_at_k/mlp.csv",
             "data/ranks.npz")
MARKER_VAR = "DVC_FAULTS_TEST_MARKER"
EPOCH_LINE = r"training: mlp epoch {}:"  # the shared loop's log line for one of the MLP's validated epochs
# A change to an MLP knob re-runs its stage, evaluate, and the report that reads their metrics (no
# fused model reads the MLP here, and gmf recommends).
RERUN = {"train_mlp", "evaluate", "report"}


# ---------------------------------------------------------------------------------------- helpers

def dvc(args: str, cwd: Path, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m dvc ARGS`; return the completed process (stdout and stderr as text)."""
    return subprocess.run([sys.executable, "-m", "dvc", *shlex.split(args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def dvc_ok(args: str, cwd: Path, env: dict, timeout: float = 300) -> str:
    """Run dvc; fail with its output unless it exits 0; return stdout + stderr."""
    proc = dvc(args, cwd, env, timeout)
    assert proc.returncode == 0, f"`dvc {args}` exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
    return proc.stdout + proc.stderr


def git(args: str, cwd: Path, env: dict) -> str:
    proc = subprocess.run(["git", *shlex.split(args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, f"`git {args}` exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
    return proc.stdout


def clone_project(template: Path, dest: Path) -> Path:
    """Copy a project (git history, DVC cache, workspace), leaving out DVC's tmp dir (locks, state)."""
    def ignore(directory: str, names: list[str]) -> list[str]:
        return ["tmp"] if Path(directory) == template / ".dvc" else []
    shutil.copytree(template, dest, symlinks=True, ignore=ignore)
    return dest


def digests(root: Path, paths=TRAIN_OUTS + EVAL_OUTS) -> dict[str, str]:
    return {rel: hashlib.sha256((root / rel).read_bytes()).hexdigest() for rel in paths}


def check_partial_log(root: Path) -> int:
    """After a SIGKILL mid-training: no checkpoint (they are written after the last epoch, by
    atomic_output), and the live log as DVCLive had written it (the process died before removing it):
    a row per finished epoch, and a summary with `step`, which a finished run's has not. Return its rows."""
    assert [rel for rel in CHECKPOINTS if (root / rel).exists()] == []
    header, *rows = (root / LIVE_HR).read_text().splitlines()
    steps = [int(row.split("\t")[0]) for row in rows]
    assert header == "step\thr" and steps == list(range(1, len(steps) + 1)), rows
    assert KILL_AFTER_EPOCH <= len(steps) < KILL_EPOCHS, steps
    summary = json.loads((root / LIVE_SUMMARY).read_text())
    # (a kill between an epoch's rows and its summary leaves the summary one epoch behind)
    assert "epoch" not in summary and summary["step"] in (len(steps) - 1, len(steps)), (summary, len(steps))
    return len(steps)


def temp_leftovers(root: Path) -> list[str]:
    """Temporary siblings written by pipeline.common.atomic_output (`.NAME.*.tmp`, `.NAME.old`)."""
    found = [p for d in ("data", "metrics") for pattern in (".*.tmp", ".*.old")
             for p in (root / d).rglob(pattern)]
    return sorted(str(p.relative_to(root)) for p in found)


def rwlock_entries(root: Path) -> list[tuple[str, str, int]]:
    """(mode, path, pid) for every entry of DVC's .dvc/tmp/rwlock."""
    path = root / ".dvc/tmp/rwlock"
    if not path.exists():
        return []
    lock = json.loads(path.read_text() or "{}")
    entries = [("write", p, info["pid"]) for p, info in lock.get("write", {}).items()]
    entries += [("read", p, info["pid"]) for p, infos in lock.get("read", {}).items() for info in infos]
    return entries


def tagged_processes(marker: str) -> list[psutil.Process]:
    """Live processes whose environment carries this module's marker (everything the tests started)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and proc.status() != psutil.STATUS_ZOMBIE \
                    and proc.environ().get(MARKER_VAR) == marker:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def wait_dead(proc: psutil.Process, timeout: float = 10) -> bool:
    """True once proc has exited (a zombie nobody reaped counts as exited)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def trains(cmdline: list[str], model: str = "mlp") -> bool:
    """True for `python -m pipeline.train MODEL ...` (stage train_MODEL), not a shell naming it in -c.
    The refit child that process forks has the same command line (see is_refit)."""
    return "pipeline.train" in cmdline and cmdline[cmdline.index("pipeline.train") + 1:][:1] == [model]


def is_refit(proc: psutil.Process) -> bool:
    """True for the child a training process forks to refit (its parent trains the same model)."""
    parent = proc.parent()
    return parent is not None and trains(parent.cmdline())


def find_training_process(parent_pid: int, timeout: float = 30) -> tuple[psutil.Process, list[psutil.Process]]:
    """The `python -m pipeline.train mlp` process under parent_pid (not a shell whose -c string names
    it), and the refit children it forked."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in psutil.Process(parent_pid).children(recursive=True):
            try:
                if trains(child.cmdline()) and not is_refit(child):
                    refits = [c for c in child.children() if trains(c.cmdline())]
                    if refits:
                        return child, refits
            except psutil.Error:
                continue
        time.sleep(0.02)
    raise AssertionError(f"no `pipeline.train mlp` process and its refit under pid {parent_pid} after {timeout} s")


class StreamedDvc:
    """`dvc ARGS` in its own session (so its group can be killed), output collected by a thread."""

    def __init__(self, args: str, cwd: Path, env: dict):
        self.proc = subprocess.Popen([sys.executable, "-m", "dvc", *shlex.split(args)], cwd=cwd, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self._lines: list[str] = []
        self._eof = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            with self._cond:
                self._lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    @property
    def output(self) -> str:
        with self._cond:
            return "".join(self._lines)

    def wait_for(self, pattern: str, timeout: float) -> None:
        """Block until a line matches `pattern`; fail if dvc ends or the time runs out first."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            seen = 0
            while True:
                if any(regex.search(line) for line in self._lines[seen:]):
                    return
                seen = len(self._lines)
                left = deadline - time.monotonic()
                if self._eof or left <= 0:
                    raise AssertionError(f"never saw {pattern!r}:\n{''.join(self._lines)}")
                self._cond.wait(min(left, 0.5))

    def finish(self, timeout: float = 120) -> int:
        rc = self.proc.wait(timeout)
        self._thread.join(timeout)
        return rc

    def __enter__(self) -> "StreamedDvc":
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(30)
        self._thread.join(30)


# --------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def marker() -> str:
    return f"{os.getpid()}-{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def fenv(tiny_mirror, marker) -> dict:
    bindir = str(Path(sys.executable).parent)  # the queue workers run `dvc` from PATH
    return {
        **os.environ,
        "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
        "MOVIELENS_MIRROR": str(tiny_mirror),
        "MOVIELENS_SKIP_VERIFY": "1",
        "DVC_NO_ANALYTICS": "1",
        MARKER_VAR: marker,
        "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com",
    }


@pytest.fixture(scope="module", autouse=True)
def no_strays(marker):
    """Safety net: at the end, stop (by pid) any process a test here started and left running."""
    yield
    strays = tagged_processes(marker)
    for proc in strays:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(strays, timeout=10)


@pytest.fixture(scope="module")
def template(tmp_path_factory, fenv) -> Path:
    """A git repo with the pipeline, tiny params, and the whole pipeline reproduced and committed:
    scenarios start from a finished run (the DVC cache holds every output) and change params."""
    root = tmp_path_factory.mktemp("faults") / "template"
    copy_pipeline(root, COPIED)
    set_params(root, **TINY_PARAMS, device="cpu")  # the byte-equality claims are about CPU runs
    choose_models(root, ["gmf"], [], recommend_model="gmf")
    git("init -q -b main", root, fenv)
    git("add -A", root, fenv)
    git("commit -q -m pipeline", root, fenv)
    out = dvc_ok("repro", root, fenv)
    assert {"download", "sample_negatives", "train_itempop", "train_mlp", "train@gmf", "evaluate"} <= ran_stages(out), \
        out
    assert yaml.safe_load((root / "params.yaml").read_text())["refit"] is True  # the training forks a refit
    git("add -A", root, fenv)
    git("commit -q -m results", root, fenv)
    return root


@pytest.fixture(scope="module")
def kill_reference(template, tmp_path_factory, fenv) -> dict[str, str]:
    """Digests of train_mlp's and evaluate's outputs from an uninterrupted `dvc repro` (own cache)."""
    root = clone_project(template, tmp_path_factory.mktemp("faults") / "reference")
    set_params(root, epochs=KILL_EPOCHS)
    out = dvc_ok("repro", root, fenv)
    assert ran_stages(out) == RERUN, out
    assert "best epoch" in out and f"of {KILL_EPOCHS}" in out, out
    return digests(root)


# ------------------------------------------------------------------------- 1. SIGKILL, then repro

def test_sigkill_training_mid_epoch_then_repro_equals_uninterrupted(template, kill_reference, fenv, marker, tmp_path):
    root = clone_project(template, tmp_path / "project")  # holds a finished run with epochs=2
    assert all((root / rel).exists() for rel in TRAIN_OUTS + EVAL_OUTS)
    set_params(root, epochs=KILL_EPOCHS)

    with StreamedDvc("repro", root, fenv) as run:
        run.wait_for(EPOCH_LINE.format(KILL_AFTER_EPOCH), timeout=120)
        trainer, refits = find_training_process(run.proc.pid)
        assert trainer.cmdline()[:4] == ["python", "-m", "pipeline.train", "mlp"], trainer.cmdline()
        trainer.send_signal(signal.SIGKILL)
        rc = run.finish()
    out = run.output
    # The refit child dies with its parent: nothing keeps training.
    assert all(wait_dead(refit) for refit in refits), "the refit child survived its parent's SIGKILL"

    # dvc reports the killed command and fails; training had not finished, evaluate never started.
    assert rc == 255, (rc, out)
    # -9 when the shell execs python (bash does), 137 if a shell in between reports the signal
    assert "failed to reproduce 'train_mlp'" in out and re.search(r"exited with (-9|137)\b", out), out
    assert "best epoch" not in out and "Running stage 'evaluate'" not in out, out
    last_epoch = max(int(e) for e in re.findall(EPOCH_LINE.format(r"(\d+)"), out))
    assert KILL_AFTER_EPOCH <= last_epoch < KILL_EPOCHS, out
    # Nothing that looks finished: dvc deleted the previous run's train_mlp outputs before running it;
    # the stage writes its checkpoints and final summary only after its last epoch (atomic_output), so
    # a mid-epoch kill leaves neither those nor temp files, only DVCLive's live log of the epochs done
    # (the logged epoch lines come after each epoch's row). evaluate's outputs are still the previous
    # params' ones.
    assert last_epoch <= check_partial_log(root)
    assert digests(root, EVAL_OUTS) == digests(template, EVAL_OUTS)
    assert temp_leftovers(root) == []
    print(f"\nSIGKILL of train_mlp after epoch {last_epoch} was logged: dvc exited {rc}")
    # dvc exited by itself, so it released its read/write locks.
    assert [e for e in rwlock_entries(root) if e[2] == run.proc.pid] == []

    rerun = dvc_ok("repro", root, fenv)
    assert ran_stages(rerun) == RERUN, rerun
    assert digests(root) == kill_reference
    assert temp_leftovers(root) == []
    assert "Data and pipelines are up to date" in dvc_ok("repro", root, fenv)
    assert tagged_processes(marker) == []  # nothing this test started is still running


def test_sigkill_whole_dvc_group_leaves_no_blocking_lock(template, kill_reference, fenv, marker, tmp_path):
    root = clone_project(template, tmp_path / "project")
    set_params(root, epochs=KILL_EPOCHS)

    with StreamedDvc("repro", root, fenv) as run:
        run.wait_for(EPOCH_LINE.format(KILL_AFTER_EPOCH), timeout=120)
        trainer, refits = find_training_process(run.proc.pid)
        dvc_pid = run.proc.pid
        held = rwlock_entries(root)
        os.killpg(dvc_pid, signal.SIGKILL)  # dvc and the stage command share dvc's process group
        rc = run.finish()
    assert rc == -signal.SIGKILL, run.output
    assert wait_dead(trainer), "the training process survived its process group's SIGKILL"
    assert all(wait_dead(refit) for refit in refits), "the refit child survived its process group's SIGKILL"
    assert not psutil.pid_exists(dvc_pid)

    # While training, dvc held write locks on the stage's outputs; killed, it leaves them in the file.
    assert any(mode == "write" and path.endswith("data/models/mlp.pt") and pid == dvc_pid
               for mode, path, pid in held), held
    stale = rwlock_entries(root)
    assert any(mode == "write" and pid == dvc_pid for mode, path, pid in stale), stale
    check_partial_log(root)
    assert temp_leftovers(root) == []

    # The next repro is not blocked: DVC sees the pid is dead, drops its entries and re-runs.
    start = time.monotonic()
    rerun = dvc_ok("repro", root, fenv, timeout=120)
    seconds = time.monotonic() - start
    assert "had been killed. Auto removed it from the lock file" in rerun, rerun
    assert ran_stages(rerun) == RERUN, rerun
    assert digests(root) == kill_reference
    assert seconds < 60
    # No write lock of the dead process remains (read entries on paths nobody writes may linger).
    assert [e for e in rwlock_entries(root) if e[0] == "write"] == []
    lingering = sorted(Path(path).name for mode, path, pid in rwlock_entries(root) if pid == dvc_pid)
    print(f"\nrepro after killing dvc's group: {seconds:.1f} s; dead pid's read entries left: {lingering}")
    assert "Data and pipelines are up to date" in dvc_ok("repro", root, fenv)
    assert tagged_processes(marker) == []  # nothing this test started is still running


@pytest.fixture(scope="module")
def leftover_scenario(template, tmp_path_factory, fenv) -> dict:
    """What a kill inside atomic_output's window would leave (dvc had already deleted the stage's
    outputs; `.NAME.PID.XXXXXXXX.tmp` siblings of a dead pid with partial bytes, mode 0600 as mkstemp
    makes them), then `dvc repro -f -s train_mlp` and `dvc repro`. The window is a few ms after
    training, too short to hit with a real signal, so the files are planted. (The params are the
    committed run's: a plain `dvc repro` would restore train_mlp from DVC's run-cache, not run it.)"""
    root = clone_project(template, tmp_path_factory.mktemp("faults") / "leftovers")
    before = digests(root)
    dead = subprocess.Popen(["true"])  # a pid that has exited, for names of the form .NAME.PID.XXXXXXXX.tmp
    dead.wait()
    partial_model = (root / "data/models/mlp.pt").read_bytes()[:700]
    planted = {f"data/models/.mlp.pt.{dead.pid}.k1ll3d__.tmp": partial_model,
               f"data/models/.mlp.trainonly.pt.{dead.pid}.k1ll3d__.tmp": partial_model[:300],
               f"metrics/training/mlp/.metrics.json.{dead.pid}.k1ll3d__.tmp": b'{"epoch": 2, "hr": 0.7'}
    for rel in TRAIN_OUTS:
        (root / rel).unlink()
    for rel, data in planted.items():
        (root / rel).write_bytes(data)
        os.chmod(root / rel, 0o600)
    assert temp_leftovers(root) == sorted(planted)
    out = dvc_ok("repro -f -s train_mlp", root, fenv)  # runs train_mlp (-f: not from the run-cache), only it
    then = dvc_ok("repro", root, fenv)
    untracked = git("status --porcelain --untracked-files=all", root, fenv).splitlines()
    return {"root": root, "before": before, "after": digests(root), "ran": ran_stages(out), "then": ran_stages(then),
            "planted": sorted(planted), "left": temp_leftovers(root),
            "git_untracked": sorted(line[3:] for line in untracked if line.startswith("?? "))}


def test_leftover_temp_files_do_not_disturb_the_rerun(leftover_scenario):
    s = leftover_scenario
    assert s["ran"] == {"train_mlp"}
    assert s["then"] == set()  # evaluate's inputs came back identical, so it was skipped
    assert s["after"] == s["before"]


def test_leftover_temp_files_are_removed_by_the_rerun(leftover_scenario):
    """SIGKILL skips atomic_output's `finally`; the next write of the same path must delete the dead
    process's temporaries, or they stay as untracked files that `git add -A` would commit."""
    s = leftover_scenario
    assert s["left"] == []
    assert [p for p in s["git_untracked"] if p.endswith(".tmp")] == []


# ----------------------------------------------------------------- 2. two queued experiments

class TrainerMonitor:
    """Samples, every 100 ms, the tagged `pipeline.train mlp` processes (and the refit children they
    fork) and `dvc exp queue-worker` processes."""

    def __init__(self, marker: str):
        self.marker = marker
        self.trainers: dict[int, dict] = {}
        self.refits: dict[int, dict] = {}
        self.workers: dict[int, dict] = {}
        self.max_concurrent_trainers = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            now, running = time.monotonic(), 0
            for proc in psutil.process_iter():
                try:
                    cmdline = proc.cmdline()
                    table = ((self.refits if is_refit(proc) else self.trainers) if trains(cmdline)
                             else self.workers if "queue-worker" in cmdline else None)
                    if table is None:
                        continue
                    env = proc.environ()
                    if env.get(MARKER_VAR) != self.marker:
                        continue
                    seen = table.setdefault(proc.pid, {"cwd": proc.cwd(), "cmdline": cmdline, "first": now,
                                                       "mirror": env.get("MOVIELENS_MIRROR"), "ppid": proc.ppid()})
                    seen["last"] = now
                    running += table is self.trainers
                except psutil.Error:
                    continue
            self.max_concurrent_trainers = max(self.max_concurrent_trainers, running)
            self._stop.wait(0.1)

    def __enter__(self) -> "TrainerMonitor":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)


def queue_statuses(root: Path, env: dict, names: list[str]) -> dict[str, str]:
    """{experiment name: Queued | Running | Success | Failed} from `dvc queue status`."""
    statuses = {}
    for line in dvc_ok("queue status", root, env).splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[1] in names:
            statuses[parts[1]] = parts[-1]
    return statuses


def follow_queue_logs(root: Path, env: dict, names: list[str], name: str, deadline: float) -> str:
    """`dvc queue logs -f NAME` once the task has started; return what it printed."""
    for attempt in range(1, 10_000):
        proc = dvc("queue logs -f " + name, root, env, timeout=max(deadline - time.monotonic(), 1))
        if proc.returncode == 0:
            return proc.stdout + proc.stderr
        assert time.monotonic() < deadline, proc.stdout + proc.stderr
        if attempt % 10 == 0:  # cheaper than `queue status` (a 1 s broadcast), so check it now and then
            assert "Failed" not in queue_statuses(root, env, names).values(), proc.stdout + proc.stderr
        time.sleep(0.3)
    raise AssertionError("unreachable")


def stop_queue(root: Path, env: dict, marker: str, timeout: float = 30) -> list[int]:
    """`dvc queue stop`, then wait for every tagged process to end; kill (by pid) any left; return those."""
    dvc("queue stop", root, env, timeout=60)
    deadline = time.monotonic() + timeout
    while (left := tagged_processes(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for proc in left:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(left, timeout=10)
    return [proc.pid for proc in left]


def experiments_by_name(root: Path, env: dict) -> dict[str, dict]:
    shown = json.loads(dvc("exp show --json", root, env).stdout)
    return {e["name"]: e["revs"][0]["data"] for rev in shown for e in (rev.get("experiments") or [])}


def result_of(data: dict) -> dict:
    """What must match between two runs of the same experiment: params, metrics, output hashes."""
    return {"params": data["params"]["params.yaml"]["data"],
            "metrics": {path: m["data"] for path, m in data["metrics"].items()},
            "outs": {path: data["outs"][path]["hash"] for path in TRAIN_OUTS + EVAL_OUTS
                     if path in data["outs"]}}


def test_two_queued_experiments_in_parallel_equal_sequential_runs(template, fenv, marker, tiny_mirror,
                                                                   tmp_path):
    root = clone_project(template, tmp_path / "project")  # baseline: the committed finished run

    queued = {}
    for lr in QUEUE_LRS:
        out = dvc_ok(f"exp run --queue -S lr={lr} -S epochs={QUEUE_EPOCHS}", root, fenv)
        queued[lr] = re.search(r"Queued experiment '([^']+)' for future execution", out).group(1)
    names = list(queued.values())

    start = time.monotonic()
    try:
        with TrainerMonitor(marker) as monitor:
            # Not into a pipe: the forked helper that waits on each worker inherits dvc's stdout,
            # so a captured `dvc queue start` would only return once the workers had exited.
            with open(tmp_path / "queue-start.log", "w+") as log:
                rc = subprocess.run([sys.executable, "-m", "dvc", "queue", "start", "-j", "2"], cwd=root,
                                    env=fenv, stdout=log, stderr=subprocess.STDOUT, timeout=60).returncode
                log.seek(0)
                out = log.read()
            started_seconds = time.monotonic() - start
            assert rc == 0 and "Started '2' new experiments task queue workers" in out, out
            # Wait: `dvc queue logs -f NAME` fails until the task has started and its process has
            # output, then follows that output until the experiment's process exits; `dvc queue
            # status` then says Success (or Failed) once the worker has collected the result.
            logs = {n: follow_queue_logs(root, fenv, names, n, deadline=start + 180) for n in names}
            while True:
                statuses = queue_statuses(root, fenv, names)
                if all(status in ("Success", "Failed") for status in statuses.values()):
                    break
                assert time.monotonic() - start < 240, statuses
                time.sleep(0.5)
            queue_seconds = time.monotonic() - start
    finally:
        killed = stop_queue(root, fenv, marker)
    assert statuses == {n: "Success" for n in names}, (statuses, logs)
    assert killed == [], f"queue processes {killed} still running 30 s after `dvc queue stop`"

    # Each queued experiment really trained and evaluated, in its own temp copy under .dvc/tmp/exps,
    # and the stage commands there saw the environment of `dvc queue start` (MOVIELENS_MIRROR).
    for name in names:
        assert ran_stages(logs[name]) == RERUN, logs[name]
    assert len(monitor.trainers) == 2, monitor.trainers
    assert monitor.max_concurrent_trainers == 2, "the two experiments never trained at the same time"
    # Each training process forked one refit child (sampled while it ran).
    assert sorted(r["ppid"] for r in monitor.refits.values()) == sorted(monitor.trainers), monitor.refits
    nodes = {seen["cmdline"][seen["cmdline"].index("queue-worker") + 1] for seen in monitor.workers.values()}
    assert len(nodes) == 2, nodes  # two `dvc exp queue-worker NODE` processes (and short-lived forks)
    for seen in [*monitor.trainers.values(), *monitor.workers.values()]:
        assert seen["mirror"] == str(tiny_mirror), seen
    assert all(Path(t["cwd"]).is_relative_to(root / ".dvc/tmp/exps") for t in monitor.trainers.values())

    # The same experiments, run alone, one after the other, in a workspace: another copy of the
    # template, whose DVC cache has not seen them (the queued runs left run-cache entries in this
    # one's, from which `dvc exp run` would restore every stage without running it): these really train.
    alone = clone_project(template, tmp_path / "alone")
    sequential = {}
    for lr in QUEUE_LRS:
        out = dvc_ok(f"exp run -S lr={lr} -S epochs={QUEUE_EPOCHS}", alone, fenv)
        assert ran_stages(out) == RERUN, out
        sequential[lr] = re.search(r"Ran experiment\(s\): (\S+)", out).group(1)

    exps, alone_exps = experiments_by_name(root, fenv), experiments_by_name(alone, fenv)
    for lr in QUEUE_LRS:
        par, seq = result_of(exps[queued[lr]]), result_of(alone_exps[sequential[lr]])
        assert (par["params"]["lr"], par["params"]["epochs"]) == (float(lr), QUEUE_EPOCHS)
        assert par["params"]["gmf"] == yaml.safe_load((template / "params.yaml").read_text())["gmf"]
        assert {"data/models/mlp.pt", "data/models/mlp.trainonly.pt", "metrics/intervals.json"} <= set(par["outs"])
        assert {"metrics/test/mlp.json", LIVE_SUMMARY} <= set(par["metrics"]), par["metrics"]
        assert "step" not in par["metrics"][LIVE_SUMMARY], par["metrics"]  # the finished run's summary
        assert par == seq, (lr, par, seq)
    first, second = (result_of(exps[queued[lr]]) for lr in QUEUE_LRS)
    assert first["outs"]["data/models/mlp.pt"] != second["outs"]["data/models/mlp.pt"]
    print(f"\nqueue: start returned in {started_seconds:.1f} s, both Success after {queue_seconds:.1f} s")


# --------------------------------------------------------------------------------- 3. threads

STAGES = """
import runpy, sys
import pipeline  # first, as `python -m pipeline.<stage>` does: it pins the CPU kernels before torch loads
import torch
threads, out, models = {threads!r}, sys.argv[1], sys.argv[2:]
if threads:  # the stages call torch.set_num_threads(1): give them `threads` instead
    real = torch.set_num_threads
    torch.set_num_threads = lambda n: real(threads)
runs = [("pipeline.train", [model, "data/prepared", "data/candidates", out, out]) for model in models]
runs.append(("pipeline.evaluate", ["data/prepared", "data/candidates", out, f"{{out}}/test",
                                   f"{{out}}/intervals.json", f"{{out}}/hr_at_k", f"{{out}}/ranks.npz"]))
for module, args in runs:
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)  # as `python -m module args`
    what = f"{{module}} {{args[0]}}" if module == "pipeline.train" else module
    print(f"{{what}} ran with {{torch.get_num_threads()}} intra-op threads", file=sys.stderr)
"""


def run_train_and_evaluate(root: Path, out: Path, env: dict, force_threads: int | None = None) -> str:
    """Run every training stage's main, then evaluate's (one process), writing into `out`; return stderr."""
    out.mkdir()
    proc = subprocess.run([sys.executable, "-c", STAGES.format(threads=force_threads), str(out), *MODELS],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


def test_thread_settings_do_not_change_the_bytes(template, fenv, tmp_path):
    root = clone_project(template, tmp_path / "project")
    # The default layer sizes, batch and negatives, so that a second thread has work to split.
    defaults = yaml.safe_load((REPO / "params.yaml").read_text())
    set_params(root, **{key: defaults[key] for key in ("batch_size", "negatives", "layers")},
               **{f"gmf.{key}": defaults["gmf"][key] for key in ("batch_size", "negatives", "factors")},
               epochs=2, **{"gmf.epochs": 2})
    files = [f"{m}{ext}" for m in MODELS for ext in (".pt", ".trainonly.pt")]
    files += [path.removeprefix("metrics/training/") for m in MODELS
              for path in (f"metrics/training/{m}/metrics.json", *curve_files(m))]  # the DVCLive directories
    files += ["intervals.json", "ranks.npz"] + [f"{d}/{m}.{ext}" for m in MODELS
                                                for d, ext in (("test", "json"), ("hr_at_k", "csv"))]

    def env_threads(n: int) -> dict:
        return {**fenv, "OMP_NUM_THREADS": str(n), "MKL_NUM_THREADS": str(n)}

    logs = {"omp1": run_train_and_evaluate(root, tmp_path / "omp1", env_threads(1)),
            "omp2": run_train_and_evaluate(root, tmp_path / "omp2", env_threads(2)),
            # OMP/MKL variables do not change the stages' thread count (they call
            # torch.set_num_threads(1)), so also run them really computing with 2 intra-op threads:
            # the refit, forked on one thread, must not be forked into a hang after torch's OpenMP
            # pool has run with two (pipeline.training.fit_and_refit then uses a thread).
            "forced2": run_train_and_evaluate(root, tmp_path / "forced2", env_threads(2), force_threads=2)}
    for name, threads in (("omp1", 1), ("omp2", 1), ("forced2", 2)):
        for what in [*(f"pipeline.train {m}" for m in MODELS), "pipeline.evaluate"]:
            assert f"{what} ran with {threads} intra-op threads" in logs[name], logs[name]

    one = digests(tmp_path / "omp1", files)
    assert digests(tmp_path / "omp2", files) == one
    # Two intra-op threads may round differently (hence THREADS = 1): the forced run only has to finish.
    forced = json.loads((tmp_path / "forced2/intervals.json").read_text())
    assert list(forced["models"]) == MODELS, forced["models"]
    assert sorted(p.name for p in (tmp_path / "forced2/test").iterdir()) == sorted(f"{m}.json" for m in MODELS)
    assert all("refitted on train + validation" in line for line in logs["forced2"].splitlines()
               if ": best epoch" in line), logs["forced2"]


# --------------------------------------------------------------------------------- 4. CPU kernels

def kernel_levels() -> list[str]:
    """torch's kernel levels this CPU can run (ATEN_CPU_CAPABILITY does not check: a level the CPU
    lacks would crash)."""
    flags = cpu_flags() or set()
    levels = ["default"] + (["avx2"] if {"avx2", "fma"} <= flags else [])
    return levels + (["avx512"] if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags else [])


# Each library's instruction variables at another level than the pin's (and than each other's).
OTHER_LEVELS = {
    "default": {"MKL_CBWR": "AUTO", "ONEDNN_MAX_CPU_ISA": "SSE41", "NPY_DISABLE_CPU_FEATURES": "",
                "OPENBLAS_CORETYPE": "Prescott"},
    "avx2": {"MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2", "NPY_DISABLE_CPU_FEATURES": "X86_V3",
             "OPENBLAS_CORETYPE": "Haswell"},
    "avx512": {"MKL_CBWR": "AVX512", "ONEDNN_MAX_CPU_ISA": "ALL", "NPY_DISABLE_CPU_FEATURES": "",
               "OPENBLAS_CORETYPE": "SkylakeX", "ONEDNN_DEFAULT_FPMATH_MODE": "BF16"},
}


def test_cpu_kernel_levels_do_not_change_the_bytes(template, fenv, tmp_path):
    levels = kernel_levels()
    assert len(levels) >= 2, f"this CPU runs only {levels}: nothing to compare"
    root = clone_project(template, tmp_path / "project")
    defaults = yaml.safe_load((REPO / "params.yaml").read_text())  # the default widths: real matrix products
    set_params(root, **{key: defaults[key] for key in ("batch_size", "negatives", "layers")},
               **{f"gmf.{key}": defaults["gmf"][key] for key in ("batch_size", "negatives", "factors")},
               epochs=2, **{"gmf.epochs": 2})
    files = [f"{m}{ext}" for m in MODELS for ext in (".pt", ".trainonly.pt")]
    files += [f"{m}/metrics.json" for m in MODELS] + ["intervals.json", "ranks.npz"]
    files += [f"test/{m}.json" for m in MODELS]

    def run(name: str, level: str | None) -> dict[str, str]:
        env = {key: value for key, value in fenv.items() if key not in pipeline_cpu_variables()}
        if level is not None:
            env |= {"ATEN_CPU_CAPABILITY": level, **OTHER_LEVELS[level]}
        log = run_train_and_evaluate(root, tmp_path / name, env)
        assert "results will differ" not in log and "not pinned" not in log, log
        return digests(tmp_path / name, files)

    pinned = run("unset", None)
    for level in levels:
        assert run(level, level) == pinned, level
    print(f"\nkernels: the same bytes under ATEN_CPU_CAPABILITY={', '.join(levels)} and other library levels")

    # The control: with the pin off, the same variables do move the bytes (the test above can fail).
    set_params(root, cpu_kernels="native")
    native = {level: run(f"native-{level}", level) for level in levels[:2]}
    assert native[levels[0]]["mlp.pt"] != native[levels[1]]["mlp.pt"], native


def pipeline_cpu_variables() -> set[str]:
    """Every variable pipeline/cpu.py sets (left out of the inherited environment, for a clean start)."""
    from pipeline import cpu
    return {*cpu.THREADS, *cpu.GPU, *cpu.CAPS, *cpu.AVX2_LEVEL}
