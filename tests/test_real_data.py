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


def test_pipeline_on_ml100k(tmp_path: Path) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["epochs"] = 3
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(REPO), "MOVIELENS_MIRROR": str(SHARED_DATA)}
    env.pop("MOVIELENS_SKIP_VERIFY", None)
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():  # the commands dvc would run, in dvc.yaml's order
        argv = shlex.split(stage["cmd"])
        assert argv[0] == "python"
        (tmp_path / "metrics").mkdir(exist_ok=True)
        proc = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"stage {name} failed:\n{proc.stderr}"

    from pipeline.data import load_split
    split = load_split(tmp_path / "data/prepared")
    assert split.train.shape == (943, 1682)
    assert split.train.nnz == 100_000 - 2 * 943
    assert len(split.test_users) == len(split.val_users) == 943

    metrics = json.loads((tmp_path / "metrics/test.json").read_text())
    assert 0.36 <= metrics["itempop"]["hr"] <= 0.45  # the seed notebook reports 0.406
    assert 0.50 <= metrics["mlp"]["hr"] <= 0.75  # 3 epochs: well above ItemPop, below a full run
    assert metrics["mlp"]["hr"] > metrics["itempop"]["hr"] + 0.08
    curve = np.loadtxt(tmp_path / "metrics/hr_at_k.csv", delimiter=",", skiprows=1)
    assert curve.shape == (20, 3) and np.all(np.diff(curve[:, 1:], axis=0) >= 0)
    assert np.allclose(curve[9, 1:], [metrics["itempop"]["hr"], metrics["mlp"]["hr"]], atol=1e-6)
