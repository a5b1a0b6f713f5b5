"""The stage entry points as DVC runs them: clear errors for user mistakes, nothing half-written."""
from __future__ import annotations

import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import set_params, stage, user_error


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


@pytest.mark.parametrize("key, value", [("lr", "fast"), ("layers", [63, 8]), ("topK", 500), ("typo_key", 1)])
def test_bad_params_stop_the_stage_naming_the_key(prepared: Path, key: str, value) -> None:
    set_params(prepared, **{key: value})
    err = user_error(stage("sample_negatives", "data/prepared", "data/candidates", cwd=prepared))
    assert f"'{key}'" in err and "params.yaml" in err
    assert not (prepared / "data/candidates").exists()


def test_evaluate_rejects_a_file_that_is_not_a_checkpoint(prepared: Path) -> None:
    assert stage("sample_negatives", "data/prepared", "data/candidates", cwd=prepared).returncode == 0
    assert stage("train_itempop", "data/prepared", "data/itempop.npy", cwd=prepared).returncode == 0
    (prepared / "bogus.pt").write_bytes(b"not a checkpoint")
    err = user_error(stage("evaluate", "data/candidates", "data/itempop.npy", "bogus.pt",
                           "metrics/test.json", "metrics/hr_at_k.csv", cwd=prepared))
    assert "bogus.pt" in err and "checkpoint" in err
    assert not (prepared / "metrics/test.json").exists()
    torch.save({"weight": torch.zeros(2)}, prepared / "other.pt")
    err = user_error(stage("evaluate", "data/candidates", "data/itempop.npy", "other.pt",
                           "metrics/test.json", "metrics/hr_at_k.csv", cwd=prepared))
    assert "other.pt" in err and "not an MLP checkpoint" in err


def test_itempop_counts_train_interactions(prepared: Path) -> None:
    from pipeline.data import load_split
    assert stage("train_itempop", "data/prepared", "data/itempop.npy", cwd=prepared).returncode == 0
    counts = np.load(prepared / "data/itempop.npy")
    split = load_split(prepared / "data/prepared")
    assert counts.tolist() == np.asarray(split.train.sum(axis=0)).ravel().astype(int).tolist()
