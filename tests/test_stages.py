"""The stage entry points as DVC runs them: clear errors for user mistakes, nothing half-written."""
from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

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


def test_sample_negatives_output_is_seeded_by_candidate_seed(prepared: Path) -> None:
    assert stage("sample_negatives", "data/prepared", "data/a", cwd=prepared).returncode == 0
    assert stage("sample_negatives", "data/prepared", "data/b", cwd=prepared).returncode == 0
    set_params(prepared, seed=1)  # the training seed: the same candidates (dvc.yaml does not rerun the stage)
    assert stage("sample_negatives", "data/prepared", "data/c", cwd=prepared).returncode == 0
    set_params(prepared, seed=42, candidate_seed=1)
    assert stage("sample_negatives", "data/prepared", "data/d", cwd=prepared).returncode == 0
    for name in ("val.npz", "test.npz"):
        a, b, c, d = ((prepared / f"data/{x}/{name}").read_bytes() for x in "abcd")
        assert a == b == c and a != d


TRAIN_ARGS = ("data/prepared", "data/candidates", "data/models", "metrics/training")


def train(model: str, cwd: Path) -> None:
    """Run stage train_<model>, train@<model> or fuse@<model> as dvc.yaml does."""
    proc = stage("train", model, *TRAIN_ARGS, cwd=cwd)
    assert proc.returncode == 0, proc.stderr


EVALUATE_ARGS = ("data/prepared", "data/candidates", "data/models", "metrics/test", "metrics/intervals.json",
                 "metrics/hr_at_k", "data/ranks.npz")


def read_tsv(path: Path) -> list[tuple[int, float]]:
    """A DVCLive plot file (header `step\t<name>`, then one `step\tvalue` row per logged epoch) as (step, value)."""
    header, *rows = path.read_text().splitlines()
    assert header == f"step\t{path.stem}", header
    return [(int(step), float(value)) for step, value in (row.split("\t") for row in rows)]


def live_files(live_dir: Path) -> list[str]:
    """Every file under a model's DVCLive directory, relative to it."""
    return sorted(str(p.relative_to(live_dir)) for p in live_dir.rglob("*") if p.is_file())


LIVE_FILES = ["metrics.json", "plots/metrics/full/hr.tsv", "plots/metrics/full/ndcg.tsv", "plots/metrics/hr.tsv",
              "plots/metrics/ndcg.tsv"]  # a closed-form model's; a neural model also logs plots/metrics/loss.tsv


# A stage checks the keys it reads: the data stages no model's knobs, a train stage its own model's,
# evaluate every key (so it alone reports an unknown one). Each: (command, the output it must not write).
CHECKED_BY = {
    "sample_negatives": (("sample_negatives", "data/prepared", "data/candidates"), "data/candidates"),
    "train_mlp": (("train", "mlp", *TRAIN_ARGS), "data/models"),
    "fuse@neumf": (("train", "neumf", *TRAIN_ARGS), "data/models"),
    "evaluate": (("evaluate", *EVALUATE_ARGS), "metrics"),
}


@pytest.mark.parametrize("key, value, checker", [
    ("lr", "fast", "train_mlp"), ("layers", [63, 8], "train_mlp"), ("neumf.layers", [16, 8], "fuse@neumf"),
    ("topK", 500, "sample_negatives"), ("typo_key", 1, "evaluate"), ("candidate_seed", -1, "sample_negatives"),
    ("models", ["mlp"], "train_mlp"), ("refit", "sometimes", "sample_negatives")])
def test_bad_params_stop_the_stage_naming_the_key(prepared: Path, key: str, value, checker: str) -> None:
    set_params(prepared, **{key: value})
    command, output = CHECKED_BY[checker]
    err = user_error(stage(*command, cwd=prepared))
    assert f"'{key}'" in err and "params.yaml" in err
    assert len(err.strip().splitlines()) == 1, err
    assert not (prepared / output).exists() and not (prepared / "data/candidates").exists()


def test_evaluate_rejects_a_file_that_is_not_a_checkpoint(prepared: Path) -> None:
    set_models(prepared, ["itempop", "mlp"])
    assert stage("sample_negatives", "data/prepared", "data/candidates", cwd=prepared).returncode == 0
    train("itempop", prepared)
    (prepared / "data/models/mlp.pt").write_bytes(b"not a checkpoint")
    err = user_error(stage("evaluate", *EVALUATE_ARGS, cwd=prepared))
    assert "data/models/mlp.pt" in err and "not a readable model checkpoint" in err
    assert not (prepared / "metrics/test").exists()
    torch.save({"weight": torch.zeros(2)}, prepared / "data/models/mlp.pt")
    err = user_error(stage("evaluate", *EVALUATE_ARGS, cwd=prepared))
    assert "data/models/mlp.pt" in err and "not a valid mlp checkpoint" in err and "not an MLP state_dict" in err
    assert not (prepared / "metrics/test").exists()
    torch.save({"weight": torch.zeros(2)}, prepared / "data/models/itempop.pt")  # no "counts"
    err = user_error(stage("evaluate", *EVALUATE_ARGS, cwd=prepared))
    assert "data/models/itempop.pt" in err and "itempop" in err and "counts" in err
    (prepared / "data/models/itempop.pt").unlink()
    err = user_error(stage("evaluate", *EVALUATE_ARGS, cwd=prepared))
    assert "data/models/itempop.pt: not found" in err and "dvc repro" in err
    assert not (prepared / "metrics/test").exists() and not (prepared / "metrics/hr_at_k").exists()
    assert not (prepared / "metrics/intervals.json").exists() and not (prepared / "data/ranks.npz").exists()


@pytest.mark.parametrize("refit", [True, False])
def test_itempop_counts_train_interactions(prepared: Path, refit: bool) -> None:
    from pipeline.data import load_split
    set_params(prepared, refit=refit)
    assert stage("sample_negatives", "data/prepared", "data/candidates", cwd=prepared).returncode == 0
    train("itempop", prepared)
    state = torch.load(prepared / "data/models/itempop.pt", weights_only=True)
    train_only = torch.load(prepared / "data/models/itempop.trainonly.pt", weights_only=True)
    assert set(state) == set(train_only) == {"counts"}
    split = load_split(prepared / "data/prepared")
    assert train_only["counts"].tolist() == np.asarray(split.train.sum(axis=0)).ravel().astype(int).tolist()
    seen = split.train_and_val() if refit else split.train  # the test-time model: train + validation
    assert state["counts"].tolist() == np.asarray(seen.sum(axis=0)).ravel().astype(int).tolist()
    assert int(state["counts"].sum()) == split.train.nnz + (len(split.val_users) if refit else 0)
    live = prepared / "metrics/training/itempop"
    assert live_files(live) == LIVE_FILES  # one step, no loss (closed form)
    plots = live / "plots/metrics"
    (step, val_hr), = read_tsv(plots / "hr.tsv")
    ((_, val_ndcg),), ((_, full_hr),), ((_, full_ndcg),) = (read_tsv(plots / f) for f in
                                                            ("ndcg.tsv", "full/hr.tsv", "full/ndcg.tsv"))
    assert step == 1
    summary = json.loads((live / "metrics.json").read_text())
    assert summary == {"hr": val_hr, "ndcg": val_ndcg, "full": {"hr": full_hr, "ndcg": full_ndcg}}  # no "epoch"
    assert 0 < full_hr < val_hr  # full ranking: more competitors, fewer hits
    assert 0 < summary["hr"] < 1 and 0 < full_ndcg <= full_hr and 0 < val_ndcg <= val_hr


def test_ease_saves_its_item_weights(prepared: Path) -> None:
    from pipeline.data import load_split
    assert stage("sample_negatives", "data/prepared", "data/candidates", cwd=prepared).returncode == 0
    train("ease", prepared)
    from pipeline.models.ease import weights_for
    state = torch.load(prepared / "data/models/ease.pt", weights_only=True)
    train_only = torch.load(prepared / "data/models/ease.trainonly.pt", weights_only=True)
    split = load_split(prepared / "data/prepared")
    n_items = split.n_items
    assert set(state) == {"weights"} and state["weights"].shape == (n_items, n_items)
    assert torch.all(state["weights"].diagonal() == 0)
    lam = float(yaml.safe_load((prepared / "params.yaml").read_text())["ease"]["lambda"])  # the repository's
    assert torch.equal(train_only["weights"], weights_for(split.train, lam))
    assert torch.equal(state["weights"], weights_for(split.train_and_val(), lam))  # refit: on


def test_mlp_stage_then_evaluate(prepared: Path) -> None:
    """train_mlp and train_itempop as dvc.yaml runs them, then evaluate: every output, consistent."""
    from pipeline.data import load_candidates, load_split
    from pipeline.models import get as get_model
    from pipeline.training import evaluate_ranking
    MLP = get_model("mlp")
    set_models(prepared, ["itempop", "mlp"])
    set_params(prepared, epochs=3, layers=[16, 8], batch_size=256)
    assert stage("sample_negatives", "data/prepared", "data/candidates", cwd=prepared).returncode == 0
    train("itempop", prepared)
    train("mlp", prepared)
    models = prepared / "data/models"
    assert sorted(p.name for p in models.iterdir()) == ["itempop.pt", "itempop.trainonly.pt", "mlp.pt",
                                                        "mlp.trainonly.pt"]
    assert sorted(p.name for p in (prepared / "metrics/training").iterdir()) == ["itempop", "mlp"]
    live = prepared / "metrics/training/mlp"
    assert live_files(live) == sorted([*LIVE_FILES, "plots/metrics/loss.tsv"])
    summary = json.loads((live / "metrics.json").read_text())
    assert set(summary) == {"epoch", "hr", "ndcg", "full"} and set(summary["full"]) == {"hr", "ndcg"}
    curves = {name: read_tsv(live / "plots/metrics" / f"{name}.tsv") for name in
              ("loss", "hr", "ndcg", "full/hr", "full/ndcg")}
    assert all([step for step, _ in rows] == [1, 2, 3] for rows in curves.values())  # one row per epoch
    assert all(v > 0 for _, v in curves["loss"])
    hr, ndcg, full_hr, full_ndcg = (dict(curves[n]) for n in ("hr", "ndcg", "full/hr", "full/ndcg"))
    best = summary["epoch"]
    keys = [(hr[e], ndcg[e]) for e in (1, 2, 3)]
    assert best == 1 + keys.index(max(keys))  # select_by: sampled, the earliest best
    assert (summary["hr"], summary["ndcg"]) == (hr[best], ndcg[best])
    assert summary["full"] == {"hr": full_hr[best], "ndcg": full_ndcg[best]}
    val = load_candidates(prepared / "data/candidates/val.npz")
    chosen = MLP.from_state_dict(torch.load(models / "mlp.trainonly.pt", weights_only=True))
    assert evaluate_ranking(chosen, val, 10) == pytest.approx((hr[best], ndcg[best]), abs=1e-6)
    refitted = torch.load(models / "mlp.pt", weights_only=True)
    assert any(not torch.equal(v, chosen.state_dict()[k]) for k, v in refitted.items())

    proc = stage("evaluate", *EVALUATE_ARGS, cwd=prepared)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (prepared / "metrics/test").iterdir()) == ["itempop.json", "mlp.json"]
    metrics = {name: json.loads((prepared / f"metrics/test/{name}.json").read_text()) for name in ("itempop", "mlp")}
    for name in ("itempop", "mlp"):
        assert set(metrics[name]) == {"hr", "ndcg", "mrr", "full"}
        assert set(metrics[name]["full"]) == {"hr", "ndcg", "mrr"}
        assert 0 <= metrics[name]["ndcg"] <= metrics[name]["hr"] <= 1
        assert metrics[name]["full"]["hr"] <= metrics[name]["hr"]  # more competitors, fewer hits
    bars = json.loads((prepared / "metrics/intervals.json").read_text())
    split = load_split(prepared / "data/prepared")
    assert bars["users"] == len(split.test_users) and set(bars["models"]) == {"itempop", "mlp"}
    assert bars["k"] == 10 and bars["full_rank_users"] == bars["users"]  # at most 10000: every user
    assert bars["models"]["itempop"]["sampled"]["hr"]["mean"] == metrics["itempop"]["hr"]
    assert bars["models"]["mlp"]["full"]["ndcg"]["mean"] == metrics["mlp"]["full"]["ndcg"]
    assert "vs_itempop" in bars["models"]["mlp"]["sampled"]
    # the reference of each protocol: the better by validation HR of the train-only checkpoints
    val = {name: json.loads((prepared / f"metrics/training/{name}/metrics.json").read_text())
           for name in ("itempop", "mlp")}
    for protocol in ("sampled", "full"):
        of = {n: s["full"] if protocol == "full" else s for n, s in val.items()}  # that protocol's {hr, ndcg}
        assert {n: bars["validation"][n][protocol]["hr"] for n in of} == {n: s["hr"] for n, s in of.items()}
        best = max(of, key=lambda n: (of[n]["hr"], of[n]["ndcg"]))
        assert bars["reference"][protocol] == best
        other = "mlp" if best == "itempop" else "itempop"
        entry = bars["models"][other][protocol]["vs_reference"]
        assert entry["model"] == best and entry["comparisons"] == 1 and entry["hr"]["p_adjusted"] == entry["hr"]["p"]
    assert sorted(p.name for p in (prepared / "metrics/hr_at_k").iterdir()) == ["itempop.csv", "mlp.csv"]
    hr_at_k = (prepared / "metrics/hr_at_k/mlp.csv").read_text().splitlines()
    assert hr_at_k[0] == "k,hr" and len(hr_at_k) == 21
    assert float(hr_at_k[10].split(",")[1]) == pytest.approx(metrics["mlp"]["hr"], abs=1e-6)
    with np.load(prepared / "data/ranks.npz") as ranks:
        assert list(ranks["models"]) == ["itempop", "mlp"]
        assert np.mean(ranks["mlp/sampled"] < 10) == pytest.approx(metrics["mlp"]["hr"], abs=1e-6)
        assert np.mean(ranks["itempop/full"] < 10) == pytest.approx(metrics["itempop"]["full"]["hr"], abs=1e-6)


def test_neumf_needs_the_gmf_and_mlp_checkpoints(prepared: Path) -> None:
    assert stage("sample_negatives", "data/prepared", "data/candidates", cwd=prepared).returncode == 0
    err = user_error(stage("train", "neumf", *TRAIN_ARGS, cwd=prepared))
    assert "data/models/gmf.trainonly.pt: not found; run `dvc repro` to train gmf" in err
    assert not (prepared / "data/models/neumf.pt").exists() and not (prepared / "metrics/training/neumf").exists()
    assert not [p for p in (prepared / "metrics").rglob("*") if p.is_file()]  # no log, not even a partial one


# --- full ranking of a seeded sample of test users (full_rank_users) ------------------------------

def test_full_rank_sample_is_seeded_sorted_and_all_when_small() -> None:
    from pipeline.metrics import full_rank_sample
    sample = full_rank_sample(1000, 100, seed=5)
    assert len(sample) == 100 == len(np.unique(sample)) and np.all(np.diff(sample) > 0)
    assert 0 <= sample.min() and sample.max() < 1000
    np.testing.assert_array_equal(sample, full_rank_sample(1000, 100, seed=5))  # stable
    assert not np.array_equal(sample, full_rank_sample(1000, 100, seed=6))  # seeded
    for limit in (0, 1000, 5000):  # 0 means all; so does a limit at or above the number of users
        np.testing.assert_array_equal(full_rank_sample(1000, limit, seed=5), np.arange(1000))


def test_full_rank_users_samples_the_full_ranking_exactly(prepared: Path) -> None:
    """A sample of all users gives the full metrics exactly; a smaller one is the same per-user ranks,
    restricted to the sample, named in intervals.json, with wider intervals; compare refuses to mix them."""
    from pipeline.compare import Run, compare
    from pipeline.evaluate import UNRANKED
    from pipeline.metrics import per_user
    from pipeline.stats import interval
    set_models(prepared, ["itempop", "mlp"])
    set_params(prepared, epochs=2, layers=[16, 8], batch_size=256)
    assert stage("sample_negatives", "data/prepared", "data/candidates", cwd=prepared).returncode == 0
    train("itempop", prepared)
    train("mlp", prepared)

    def evaluate(limit: int) -> tuple[dict, dict, dict]:
        set_params(prepared, full_rank_users=limit)
        proc = stage("evaluate", *EVALUATE_ARGS, cwd=prepared)
        assert proc.returncode == 0, proc.stderr
        with np.load(prepared / "data/ranks.npz") as z:
            ranks = {key: z[key] for key in z.files}
        test = {p.stem: json.loads(p.read_text()) for p in sorted((prepared / "metrics/test").iterdir())}
        assert list(test) == ["itempop", "mlp"]
        return (test,
                json.loads((prepared / "metrics/intervals.json").read_text()), ranks)

    every, every_bars, every_ranks = evaluate(0)
    n = len(every_ranks["users"])
    assert every_bars["full_rank_users"] == n == 60
    for limit in (n, 10_000):  # a sample of at least every user is every user: the same outputs
        metrics, bars, ranks = evaluate(limit)
        assert metrics == every and bars == every_bars
        assert all(np.array_equal(ranks[key], every_ranks[key]) for key in every_ranks)

    some, some_bars, some_ranks = evaluate(20)
    assert some_bars["full_rank_users"] == 20
    for model in ("itempop", "mlp"):
        full = some_ranks[f"{model}/full"]
        ranked = full != UNRANKED
        assert ranked.sum() == 20
        np.testing.assert_array_equal(full[ranked], every_ranks[f"{model}/full"][ranked])  # same users, same ranks
        np.testing.assert_array_equal(some_ranks[f"{model}/sampled"], every_ranks[f"{model}/sampled"])
        expected = per_user(every_ranks[f"{model}/full"][ranked], 10)
        assert some[model]["full"]["hr"] == round(float(expected["hr"].mean()), 6)
        assert some[model]["full"]["ndcg"] == round(float(expected["ndcg"].mean()), 6)
        assert some[model]["hr"] == every[model]["hr"]  # the sampled protocol still scores everyone
        width = lambda bars, metric: bars["models"][model]["full"][metric]["hi"] - bars["models"][model]["full"][metric]["lo"]  # noqa: E731
        estimate = interval(expected["mrr"])
        assert round(width(some_bars, "mrr"), 5) == round(2 * ((estimate.hi - estimate.lo) / 2), 5)
        assert width(some_bars, "mrr") > width(every_bars, "mrr")

    def run(ranks: dict, name: str) -> Run:
        return Run(name, ranks["users"], str(ranks["test_set"]), str(ranks["dataset"]), int(ranks["k"]),
                   {m: {p: ranks[f"{m}/{p}"] for p in ("sampled", "full")} for m in ("itempop", "mlp")})

    with pytest.raises(Exception, match="cannot compare: the runs fully ranked different samples"):
        compare([run(every_ranks, "a")], [run(some_ranks, "b")])
    _, rows = compare([run(some_ranks, "a")], [run(some_ranks, "b")])
    assert all(row["diff"].mean == 0 for row in rows)
