"""The stage entry points as DVC runs them: clear errors for user mistakes, nothing half-written."""
from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import set_models, set_params, stage, user_error


def test_download_from_missing_mirror_names_the_variable(workdir: Path) -> None:
    err = user_error(stage("download", "data/raw", cwd=workdir, env={"MOVIELENS_MIRROR": str(workdir / "none")}))
    assert "MOVIELENS_MIRROR" in err and "ml-100k.zip" in err
    assert not (workdir / "data/raw").exists()


def test_download_without_network_fails_fast(workdir: Path) -> None:
    with socket.socket() as sock:  # a loopback port nobody listens on: connections are refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    start = time.monotonic()
    err = user_error(stage("download", "data/raw", cwd=workdir, env={"MOVIELENS_MIRROR": f"http://127.0.0.1:{port}/x"}))
    assert time.monotonic() - start < 60
    assert f"http://127.0.0.1:{port}/x/ml-100k.zip" in err and "MOVIELENS_MIRROR" in err
    assert not (workdir / "data/raw").exists()


def test_download_refuses_files_that_fail_their_checksum(workdir: Path, tiny_mirror: Path) -> None:
    err = user_error(stage("download", "data/raw", cwd=workdir, env={"MOVIELENS_MIRROR": str(tiny_mirror)}))
    assert "u.data failed its checksum" in err
    assert "expected sha256 06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490" in err
    assert not (workdir / "data/raw").exists() and not list((workdir / "data").glob(".*"))


def test_download_keeps_the_previous_output_when_it_fails(workdir: Path, tiny_mirror: Path) -> None:
    env = {"MOVIELENS_MIRROR": str(tiny_mirror), "MOVIELENS_SKIP_VERIFY": "1"}
    assert stage("download", "data/raw", cwd=workdir, env=env).returncode == 0
    before = (workdir / "data/raw/u.data").read_bytes()
    user_error(stage("download", "data/raw", cwd=workdir, env={"MOVIELENS_MIRROR": str(tiny_mirror)}))
    assert (workdir / "data/raw/u.data").read_bytes() == before


def test_sample_negatives_names_users_with_too_few_items(prepared: Path) -> None:
    set_params(prepared, test_negatives=115, topK=10)  # 120 items, users rated 8..30 of them
    err = user_error(stage("sample_negatives", "data/prepared", "data/candidates", cwd=prepared))
    assert "test_negatives = 115" in err and "user " in err and "Lower test_negatives" in err
    assert not (prepared / "data/candidates").exists()


def test_sample_negatives_output_is_seeded(prepared: Path) -> None:
    assert stage("sample_negatives", "data/prepared", "data/a", cwd=prepared).returncode == 0
    assert stage("sample_negatives", "data/prepared", "data/b", cwd=prepared).returncode == 0
    set_params(prepared, seed=1)
    assert stage("sample_negatives", "data/prepared", "data/c", cwd=prepared).returncode == 0
    a, b, c = ((prepared / f"data/{x}/test.npz").read_bytes() for x in "abc")
    assert a == b and a != c


def train(model: str, cwd: Path) -> None:
    """Run stage train@<model> as dvc.yaml does."""
    proc = stage("train", model, "data/prepared", "data/candidates", f"data/models/{model}.pt",
                 f"metrics/training/{model}.csv", f"metrics/training/{model}.json", cwd=cwd)
    assert proc.returncode == 0, proc.stderr


EVALUATE_ARGS = ("data/prepared", "data/candidates", "data/models", "metrics/test.json", "metrics/hr_at_k")


@pytest.mark.parametrize("key, value", [("mlp.lr", "fast"), ("mlp.layers", [63, 8]), ("neumf.layers", [63, 8]),
                                        ("topK", 500), ("typo_key", 1)])
def test_bad_params_stop_the_stage_naming_the_key(prepared: Path, key: str, value) -> None:
    set_params(prepared, **{key: value})
    err = user_error(stage("sample_negatives", "data/prepared", "data/candidates", cwd=prepared))
    assert f"'{key}'" in err and "params.yaml" in err
    assert not (prepared / "data/candidates").exists()


def test_evaluate_rejects_a_file_that_is_not_a_checkpoint(prepared: Path) -> None:
    set_models(prepared, ["itempop", "mlp"])
    assert stage("sample_negatives", "data/prepared", "data/candidates", cwd=prepared).returncode == 0
    train("itempop", prepared)
    (prepared / "data/models/mlp.pt").write_bytes(b"not a checkpoint")
    err = user_error(stage("evaluate", *EVALUATE_ARGS, cwd=prepared))
    assert "data/models/mlp.pt" in err and "not a readable model checkpoint" in err
    assert not (prepared / "metrics/test.json").exists()
    torch.save({"weight": torch.zeros(2)}, prepared / "data/models/mlp.pt")
    err = user_error(stage("evaluate", *EVALUATE_ARGS, cwd=prepared))
    assert "data/models/mlp.pt" in err and "not an MLP state_dict" in err
    assert not (prepared / "metrics/test.json").exists()
    torch.save({"weight": torch.zeros(2)}, prepared / "data/models/itempop.pt")  # no "counts"
    err = user_error(stage("evaluate", *EVALUATE_ARGS, cwd=prepared))
    assert "data/models/itempop.pt" in err and "itempop" in err and "counts" in err
    (prepared / "data/models/itempop.pt").unlink()
    err = user_error(stage("evaluate", *EVALUATE_ARGS, cwd=prepared))
    assert "data/models/itempop.pt: not found" in err and "dvc repro" in err
    assert not (prepared / "metrics/test.json").exists() and not (prepared / "metrics/hr_at_k").exists()


def test_itempop_counts_train_interactions(prepared: Path) -> None:
    from pipeline.data import load_split
    assert stage("sample_negatives", "data/prepared", "data/candidates", cwd=prepared).returncode == 0
    train("itempop", prepared)
    state = torch.load(prepared / "data/models/itempop.pt", weights_only=True)
    assert set(state) == {"counts"}
    split = load_split(prepared / "data/prepared")
    assert state["counts"].tolist() == np.asarray(split.train.sum(axis=0)).ravel().astype(int).tolist()
    curve = (prepared / "metrics/training/itempop.csv").read_text().splitlines()
    assert curve[0] == "epoch,loss,val_hr,val_ndcg" and len(curve) == 2 and curve[1].startswith("1,,")
    assert json.loads((prepared / "metrics/training/itempop.json").read_text())["best_epoch"] == 1


def test_ease_saves_its_item_weights(prepared: Path) -> None:
    from pipeline.data import load_split
    assert stage("sample_negatives", "data/prepared", "data/candidates", cwd=prepared).returncode == 0
    train("ease", prepared)
    state = torch.load(prepared / "data/models/ease.pt", weights_only=True)
    n_items = load_split(prepared / "data/prepared").n_items
    assert set(state) == {"weights"} and state["weights"].shape == (n_items, n_items)
    assert torch.all(state["weights"].diagonal() == 0)
