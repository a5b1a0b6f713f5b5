"""Shared stage plumbing: user-facing errors, logging, and atomic output writing."""
from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator


# One intra-op torch thread in every stage, whatever the machine: the same bits on any core count
# (pipeline/cpu.py pins the rest of what decides the rounding, before torch loads).
THREADS = 1


def inverted_dropout(x, p: float, generator):
    """Inverted dropout of tensor x with rate p, drawn from `generator` when one is set (else torch's global one).

    The training loop gives each model's dropout a seeded generator of its own, so that a run's draws
    do not depend on what else uses torch's global generator (a refit in a thread beside it)."""
    import torch  # here, not at the top: the data stages do not need torch

    if generator is None:
        return torch.nn.functional.dropout(x, p, True)
    keep = torch.rand(x.shape, generator=generator, device=x.device) >= p
    return x * keep / (1.0 - p)


def configure_torch() -> None:
    """Set up torch for a stage: THREADS threads, and subnormal floats flushed to zero.

    Tiny embedding products are subnormal, and on some CPUs every operation on one costs about a
    hundred cycles; flushing them gives the same bits on every run (what it saves: docs/results.md).
    """
    import torch  # here, not at the top: the data stages do not need torch

    torch.set_num_threads(THREADS)
    torch.set_flush_denormal(True)


def pick_device(choice: str):
    """Return the torch device for the `device` param: auto (cuda if present, else cpu), cpu or cuda.

    On a GPU it turns on the determinism torch offers there: deterministic algorithms (a warning,
    not an error, for an operation that has none), cuDNN without autotuning, no TF32, and cuBLAS's
    fixed workspace (CUBLAS_WORKSPACE_CONFIG, set by pipeline/cpu.py). The same GPU model and driver
    then repeat a run's bytes; other GPUs, and GPU against CPU, round differently (docs/scale.md).
    """
    import torch  # here, not at the top: the data stages do not need torch

    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise PipelineError("params.yaml: 'device' is 'cuda', but PyTorch sees no CUDA device here; "
                            "use 'auto' or 'cpu'")
    if choice == "cuda":
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return torch.device(choice)


class PipelineError(Exception):
    """A problem the user can fix (bad input file, bad param, missing data): printed, not traced."""


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's main(); turn PipelineError into one clear line on stderr and exit status 2."""
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    try:
        main()
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_tmp(path: Path) -> None:
    """Delete temporaries of `path` left by a killed process (their pid, in the name, is gone)."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = tmp.name[len(path.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            _remove(tmp)


def _tmp_sibling(path: Path, is_dir: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(path)
    prefix = f".{path.name}.{os.getpid()}."
    if is_dir:
        return Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=path.parent))
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(name)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; move it into place only if the block succeeds.

    An exception leaves any previous `path` untouched and no half-written file behind. A process
    killed outright (SIGKILL) leaves its temporary, `.<name>.<pid>.<random>.tmp`, which is never
    mistaken for the output and is deleted by the next write of the same path.
    """
    path = Path(path)
    tmp = _tmp_sibling(path, is_dir)
    try:
        yield tmp
        if is_dir:
            os.chmod(tmp, 0o755)
            old = None
            if path.exists():
                old = path.with_name(f".{path.name}.old")
                _remove(old)
                os.replace(path, old)
            os.replace(tmp, path)
            if old is not None:
                _remove(old)
        else:
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            _remove(tmp)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON with a trailing newline, atomically."""
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 text atomically."""
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
