"""Shared fixtures: the repository root, a generated MovieLens-shaped archive, the real data."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pipeline  # noqa: F401  (first: it pins the CPU kernels before numpy loads)
import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def write_movielens_zip(directory: Path, n_users: int = 60, n_items: int = 120, seed: int = 0) -> Path:
    """Write directory/ml-100k.zip with a generated u.data and a latin-1 u.item; return the zip path.

    Users rate 8..30 items each, drawn with a long-tailed popularity, on random timestamps with
    deliberate ties, so the split's tie rule and the samplers' exclusions are exercised.
    """
    rng = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, n_items + 1) ** 0.8
    popularity /= popularity.sum()
    lines = []
    for user in range(1, n_users + 1):
        count = int(rng.integers(8, 31))
        items = rng.choice(np.arange(1, n_items + 1), size=count, replace=False, p=popularity)
        stamps = 880_000_000 + rng.integers(0, 40, size=count) * 1000  # few distinct values: ties
        for item, stamp in zip(items, stamps):
            lines.append(f"{user}\t{item}\t{int(rng.integers(1, 6))}\t{stamp}\n")
    titles = "".join(f"{i}|Mis\xe9rables {i} (1995)|01-Jan-1995||http://x|0|1\n" for i in range(1, n_items + 1))
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "ml-100k.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("ml-100k/u.data", "".join(lines))
        zf.writestr("ml-100k/u.item", titles.encode("latin-1"))
    return path


REMOVE = object()  # set_params(root, **{"gmf.lr": REMOVE}) deletes the key

ADDED_MODELS = ("gmf", "mf", "ease")  # params.ADDED_MODELS: `models` lists these
FUSED_MODELS = ("neumf",)  # params.FUSED_MODELS: `fused` lists these
CORE_MODELS = ("itempop", "mlp")  # always trained


def set_params(root: Path, **changes) -> None:
    """Change keys of root/params.yaml, keeping the others.

    A plain key replaces a top-level value (`lr=0.01`, `models=[...]`, or a whole section
    `gmf={...}`); a dotted key changes one field of a model's section and keeps its other fields,
    as DVC's `-S gmf.lr=0.01` does: `set_params(root, **{"gmf.lr": 0.01})`. The value REMOVE
    deletes the key. The MLP has no section (its knobs are top-level keys), so "mlp.<key>", as
    older tests wrote it, changes the top-level key: {"mlp.epochs": 3} is {"epochs": 3}.
    """
    path = root / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for key, value in changes.items():
        *sections, last = key.split(".")
        if sections == ["mlp"]:
            sections = []
        target = params
        for name in sections:
            if not isinstance(target.get(name), dict):
                target[name] = {}
            target = target[name]
        if value is REMOVE:
            target.pop(last, None)
        else:
            target[last] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def set_models(root: Path, models: list[str], fused: list[str] | None = None) -> None:
    """Choose the trained models; keep recommend_model valid (one of the trained models).

    `models` may list any model names (the old form, every model to train): itempop and mlp always
    train and are dropped, gmf/mf/ease go to `models`, neumf to `fused`, unless `fused` is given.
    """
    params = yaml.safe_load((root / "params.yaml").read_text())
    unknown = [m for m in [*models, *(fused or [])] if m not in (*CORE_MODELS, *ADDED_MODELS, *FUSED_MODELS)]
    assert not unknown, f"set_models: unknown model(s) {unknown}"
    added = [m for m in models if m in ADDED_MODELS]
    if fused is None:
        fused = [m for m in models if m in FUSED_MODELS]
    changes: dict = {"models": added, "fused": list(fused)}
    trained = [*CORE_MODELS, *added, *fused]
    if "recommend_model" in params and params["recommend_model"] not in trained:
        changes["recommend_model"] = trained[-1]
    set_params(root, **changes)


def set_param(root: Path, key: str, value) -> None:
    """Change one key, dotted for a section's field: set_param(root, "gmf.lr", 0.01)."""
    set_params(root, **{key: value})


def stage(module: str, *args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", f"pipeline.{module}", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=120)


def user_error(proc: subprocess.CompletedProcess) -> str:
    """Assert the stage stopped with a one-line error (exit 2, no traceback); return the message."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr


@pytest.fixture(scope="session")
def tiny_mirror(tmp_path_factory) -> Path:
    """A directory holding a generated ml-100k.zip, for MOVIELENS_MIRROR."""
    directory = tmp_path_factory.mktemp("mirror")
    write_movielens_zip(directory)
    return directory


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    set_params(tmp_path, test_negatives=20)  # the generated data has 120 items
    return tmp_path


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory, tiny_mirror: Path) -> Path:
    """data/raw and data/prepared built once by the real stages from the generated archive."""
    root = tmp_path_factory.mktemp("prepared")
    (root / "params.yaml").write_text((REPO / "params.yaml").read_text())
    set_params(root, test_negatives=20)
    env = {"MOVIELENS_MIRROR": str(tiny_mirror), "MOVIELENS_SKIP_VERIFY": "1"}
    for args in (("download", "data/raw"), ("build_matrix", "data/raw", "data/prepared")):
        proc = stage(*args, cwd=root, env=env)
        assert proc.returncode == 0, proc.stderr
    return root / "data"


@pytest.fixture
def prepared(workdir: Path, prepared_data: Path) -> Path:
    """workdir with a fresh copy of data/raw and data/prepared (built once per session)."""
    shutil.copytree(prepared_data, workdir / "data")
    return workdir


def copy_pipeline(root: Path, names) -> None:
    """Copy the repository's files and folders `names` into root (no __pycache__)."""
    import shutil
    for name in names:
        src, dst = REPO / name, root / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)


@pytest.fixture
def one_thread():
    """One intra-op torch thread, as in the train and evaluate stages: bit-for-bit reproducible."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
