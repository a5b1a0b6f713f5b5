"""The real pipeline stages on the real MovieLens-100K archive, with few epochs."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import REPO, SHARED_DATA

pytestmark = pytest.mark.skipif(
    not (SHARED_DATA / "ml-100k.zip").is_file(),
    reason=f"{SHARED_DATA / 'ml-100k.zip'} is absent (MovieLens may not be redistributed with the repo)",
)


MODELS = ["itempop", "mlp", "ease"]  # itempop and mlp always train; `models` adds ease
EASE_HR = (0.58, 0.67)  # closed form, no training noise: 0.622 with the default lambda


def commands(params: dict) -> list[tuple[str, list[str]]]:
    """(stage name, argv) of every stage dvc would run, in dvc.yaml's order (foreach expanded)."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    found = []
    for name, stage in stages.items():
        if "foreach" in stage:
            assert stage["foreach"] in ("${models}", "${fused}"), stage
            found += [(f"{name}@{item}", shlex.split(stage["do"]["cmd"].replace("${item}", item)))
                      for item in params[stage["foreach"][2:-1]]]
        else:
            found.append((name, shlex.split(stage["cmd"])))
    assert all("${" not in arg for _, argv in found for arg in argv), found
    return found


def test_pipeline_on_ml100k(tmp_path: Path) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["models"], params["fused"] = ["ease"], []
    params["epochs"] = 3  # the MLP's
    if params.get("recommend_model") not in (None, *MODELS):
        params["recommend_model"] = "ease"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(REPO), "MOVIELENS_MIRROR": str(SHARED_DATA)}
    env.pop("MOVIELENS_SKIP_VERIFY", None)
    ran = []
    for name, argv in commands(params):
        assert argv[0] == "python"
        proc = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"stage {name} failed:\n{proc.stderr}"
        ran.append(name)
    assert {"train_itempop", "train_mlp", "train@ease", "evaluate", "recommend", "report"} <= set(ran), ran
    assert not any(name.startswith("fuse@") for name in ran)

    from pipeline.data import load_split
    split = load_split(tmp_path / "data/prepared")
    assert split.train.shape == (943, 1682)
    assert split.train.nnz == 100_000 - 2 * 943
    assert len(split.test_users) == len(split.val_users) == 943

    assert sorted(p.name for p in (tmp_path / "metrics/test").iterdir()) == sorted(f"{m}.json" for m in MODELS)
    metrics = {model: json.loads((tmp_path / f"metrics/test/{model}.json").read_text()) for model in MODELS}
    assert all(set(m) == {"hr", "ndcg", "mrr", "full"} for m in metrics.values())
    assert 0.36 <= metrics["itempop"]["hr"] <= 0.45  # the seed notebook reports 0.406
    assert 0.50 <= metrics["mlp"]["hr"] <= 0.75  # 3 epochs: well above ItemPop, below a full run
    assert metrics["mlp"]["hr"] > metrics["itempop"]["hr"] + 0.08
    assert EASE_HR[0] <= metrics["ease"]["hr"] <= EASE_HR[1]
    assert metrics["ease"]["hr"] > metrics["itempop"]["hr"] + 0.15
    for model in MODELS:
        m = metrics[model]
        assert all(m["full"][key] <= m[key] for key in ("hr", "ndcg", "mrr")), (model, m)
    for model in MODELS:
        curve = np.loadtxt(tmp_path / f"metrics/hr_at_k/{model}.csv", delimiter=",", skiprows=1)
        assert curve.shape == (20, 2) and np.all(np.diff(curve[:, 1]) >= 0)
        assert curve[9, 1] == pytest.approx(metrics[model]["hr"], abs=1e-6)
    live = tmp_path / "metrics/training/mlp"
    plots = {name: (live / "plots/metrics" / f"{name}.tsv").read_text().splitlines()
             for name in ("loss", "hr", "ndcg", "full/hr", "full/ndcg")}
    for name, lines in plots.items():
        assert lines[0] == f"step\t{name.split('/')[-1]}"
        assert [line.split("\t")[0] for line in lines[1:]] == ["1", "2", "3"]  # a row per epoch
    summary = json.loads((live / "metrics.json").read_text())
    assert set(summary) == {"epoch", "hr", "ndcg", "full"} and 1 <= summary["epoch"] <= 3
    assert plots["hr"][summary["epoch"]] == f"{summary['epoch']}\t{summary['hr']}"  # the chosen epoch's row
    assert plots["full/hr"][summary["epoch"]] == f"{summary['epoch']}\t{summary['full']['hr']}"
    assert sorted(p.name for p in (tmp_path / "metrics/training").iterdir()) == sorted(MODELS)
    for model in MODELS:
        assert (tmp_path / f"data/models/{model}.pt").is_file()
        assert (tmp_path / f"data/models/{model}.trainonly.pt").is_file()
    bars = json.loads((tmp_path / "metrics/intervals.json").read_text())
    assert bars["users"] == bars["full_rank_users"] == 943 and bars["k"] == 10 and list(bars["models"]) == MODELS
    for model in MODELS:
        hr = bars["models"][model]["sampled"]["hr"]
        assert hr["mean"] == metrics[model]["hr"] and 0.02 < hr["hi"] - hr["lo"] < 0.08  # about ± 0.03 at 943 users
    vs_itempop = bars["models"]["ease"]["sampled"]["vs_itempop"]
    assert vs_itempop["comparisons"] == 2 and vs_itempop["hr"]["verdict"] == "higher"
    assert vs_itempop["hr"]["p_adjusted"] < 1e-10  # EASE is far above ItemPop, even after Holm
    assert set(bars["reference"]) == {"sampled", "full"} and bars["reference"]["sampled"] in MODELS
