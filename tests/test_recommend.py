"""Recommendations a person can read, and the report: through the real stage entry points."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import REPO, set_params, stage, user_error
from pipeline.data import load_id_maps, load_split
from pipeline.recommend import split_year, top_n

MODELS = ["itempop", "mlp", "ease"]  # trained: the two that always are, and `models`
TINY = {"models": ["ease"], "fused": [], "recommend_model": "ease", "recommend_n": 7,
        "layers": [16, 8], "dropout": 0.0, "lr": 0.01, "weight_decay": 0.0, "epochs": 2,  # the MLP's
        "batch_size": 64, "negatives": 2}


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_mirror) -> Path:
    """A workdir where every stage up to the report has run on the generated archive."""
    root = tmp_path_factory.mktemp("rec")
    (root / "params.yaml").write_text((REPO / "params.yaml").read_text())
    set_params(root, test_negatives=20, **TINY)
    env = {"MOVIELENS_MIRROR": str(tiny_mirror), "MOVIELENS_SKIP_VERIFY": "1"}
    steps = [("download", ["data/raw"]), ("build_matrix", ["data/raw", "data/prepared"]),
             ("sample_negatives", ["data/prepared", "data/candidates"])]
    steps += [("train", [m, "data/prepared", "data/candidates", "data/models", "metrics/training"]) for m in MODELS]
    steps += [("evaluate", ["data/prepared", "data/candidates", "data/models", "metrics/test",
                            "metrics/intervals.json", "metrics/hr_at_k", "data/ranks.npz"]),
              ("recommend", ["data/prepared", "data/models", "data/recommendations.csv"]),
              ("report", ["data/prepared", "data/recommendations.csv", "metrics", "metrics/report.md"])]
    for module, args in steps:
        proc = stage(module, *args, cwd=root, env=env)
        assert proc.returncode == 0, (module, proc.stderr)
    return root


def recommendations(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / "data/recommendations.csv", keep_default_na=False)


def test_never_recommends_a_seen_item(built: Path) -> None:
    recs = recommendations(built)
    split = load_split(built / "data/prepared")
    users, items = load_id_maps(built / "data/prepared")
    u = pd.Series(np.arange(len(users)), index=users["user_id"])[recs["user_id"]].to_numpy()
    i = pd.Series(np.arange(len(items)), index=items["movie_id"])[recs["movie_id"]].to_numpy()
    assert split.all_interactions()[u, i].sum() == 0  # no train, validation or test item
    assert len(recs) == 7 * split.n_users
    assert (recs.groupby("user_id")["rank"].apply(list) == [list(range(1, 8))] * split.n_users).all()
    assert not recs.duplicated(["user_id", "movie_id"]).any()
    assert (recs.groupby("user_id")["score"].apply(lambda s: s.is_monotonic_decreasing)).all()


def test_ids_round_trip_to_the_originals(built: Path, tiny_mirror: Path) -> None:
    import zipfile
    with zipfile.ZipFile(tiny_mirror / "ml-100k.zip") as zf:
        lines = zf.read("ml-100k/u.data").decode().split()
    original_users = {int(x) for x in lines[0::4]}
    original_movies = {int(x) for x in lines[1::4]}
    recs = recommendations(built)
    assert set(recs["user_id"]) == original_users
    assert set(recs["movie_id"]) <= original_movies


def test_titles_decode_latin1_and_split_the_year(built: Path) -> None:
    recs = recommendations(built)
    # The generated u.item is latin-1: 'Misérables <id> (1995)'.
    assert (recs["title"] == "Mis\u00e9rables " + recs["movie_id"].astype(str)).all()
    assert (recs["year"].astype(str) == "1995").all()
    titles, years = split_year(pd.Series(["Heat (1995)", "Misérables, Les (1995) ", "No year", "1984 (1984)"]))
    assert titles.tolist() == ["Heat", "Misérables, Les", "No year", "1984"]
    assert years.tolist() == ["1995", "1995", "", "1984"]


def test_one_user_command(built: Path) -> None:
    recs = recommendations(built)
    user = int(recs["user_id"].iloc[0])
    proc = stage("recommend", "--user", str(user), cwd=built)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"Top 7 for user {user} (model ease):"
    first = recs[recs["user_id"] == user].iloc[0]
    assert lines[1].startswith(f"  1. Mis\u00e9rables {first.movie_id} (1995)")
    recent = lines[lines.index("Most recently rated:") + 1:]
    assert len(recent) == 5 and all("Mis\u00e9rables" in r for r in recent)


@pytest.mark.parametrize("user", ["99999", "abc", ""])
def test_unknown_user_is_a_clear_error(built: Path, user: str) -> None:
    err = user_error(stage("recommend", "--user", user, cwd=built))
    assert f"no user {user!r}" in err


def test_recommend_model_must_be_trained(built: Path, tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text((built / "params.yaml").read_text())
    set_params(tmp_path, recommend_model="gmf")
    err = user_error(stage("recommend", str(built / "data/prepared"), str(built / "data/models"), "r.csv",
                           cwd=tmp_path))
    assert "'recommend_model' is 'gmf', which is not trained (itempop, mlp, ease)" in err


def test_report_has_every_model_and_the_charts(built: Path) -> None:
    report = (built / "metrics/report.md").read_text()
    assert sorted(p.name for p in (built / "metrics/test").iterdir()) == sorted(f"{m}.json" for m in MODELS)
    metrics = {name: json.loads((built / f"metrics/test/{name}.json").read_text()) for name in MODELS}
    bars = json.loads((built / "metrics/intervals.json").read_text())
    assert list(bars["models"]) == MODELS  # the report's order
    for name, label in [("itempop", "ItemPop"), ("mlp", "MLP"), ("ease", "EASE")]:
        row = next(line for line in report.splitlines() if line.startswith(f"| {label} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        entry = bars["models"][name]
        expected = [f"{m['mean']:.3f} ± {(m['hi'] - m['lo']) / 2:.3f}"
                    for m in (entry[p][metric] for p in ("sampled", "full") for metric in ("hr", "ndcg", "mrr"))]
        assert cells[1:7] == expected
        assert cells[1].startswith(f"{metrics[name]['hr']:.3f} ± ")
        assert cells[4].startswith(f"{metrics[name]['full']['hr']:.3f} ± ")
        summary = json.loads((built / f"metrics/training/{name}/metrics.json").read_text())
        # select_by sampled: the sampled validation HR, and the chosen epoch for the neural model only
        assert cells[7] == f"{summary['hr']:.4f}" + (f" ({summary['epoch']})" if name == "mlp" else "")
        assert ("epoch" in summary) is (name == "mlp") and 1 <= summary.get("epoch", 1) <= TINY["epochs"]
    assert "## Which differences are real" in report and "refitted on train + validation" in report
    for label in ("ItemPop", "MLP", "EASE"):  # a row per model in each protocol's significance table
        assert sum(line.startswith(f"| {label} | ") for line in report.splitlines()) == 3
    assert "![Training curves](plots/training.png)" in report and "![Test HR@K](plots/hr_at_k.png)" in report
    assert report.count("### User ") == 3
    for png in ("training.png", "hr_at_k.png"):
        data = (built / "metrics/plots" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_top_n_orders_ties_by_item_and_skips_seen() -> None:
    import scipy.sparse as sp
    import torch
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 5.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    seen = sp.csr_matrix(np.array([[0, 0, 0, 0, 1], [1, 0, 0, 0, 0]], dtype=np.float32))
    items, values = top_n(lambda users: scores[torch.as_tensor(users)], np.array([0, 1]), seen, 3)
    assert items.tolist() == [[1, 2, 3], [1, 2, 3]]
    assert values.tolist() == [[3.0, 3.0, 2.0], [0.0, 0.0, 0.0]]


def test_report_and_recommendations_are_byte_identical_on_rerun(built: Path) -> None:
    before = {p: (built / p).read_bytes() for p in ("data/recommendations.csv", "metrics/report.md",
                                                    "metrics/plots/training.png", "metrics/plots/hr_at_k.png")}
    assert stage("recommend", "data/prepared", "data/models", "data/recommendations.csv", cwd=built).returncode == 0
    assert stage("report", "data/prepared", "data/recommendations.csv", "metrics", "metrics/report.md",
                 cwd=built).returncode == 0
    assert {p: (built / p).read_bytes() for p in before} == before
