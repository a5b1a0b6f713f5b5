"""GMF at synthetic-1m after one epoch: it learns (no collapse to one constant score).

With Adam's L2 weight decay (added to the gradient of every row at every step) GMF collapsed there:
Adam scaled the decay up to steps of size lr, and every score became the same (docs/scale.md). With
decoupled weight decay it must give distinct scores and an HR@10 close to ItemPop's, on data whose
only signal is popularity. About 30 s: the real stages on a million generated interactions.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import set_params, stage


@pytest.fixture(scope="module")
def synthetic_1m(tmp_path_factory) -> Path:
    from conftest import REPO

    root = tmp_path_factory.mktemp("synthetic-1m")
    (root / "params.yaml").write_text((REPO / "params.yaml").read_text())
    set_params(root, dataset="synthetic-1m", refit=False, **{"gmf.epochs": 1})
    for args in (("download", "data/raw"), ("build_matrix", "data/raw", "data/prepared"),
                 ("sample_negatives", "data/prepared", "data/candidates"),
                 ("train", "itempop", "data/prepared", "data/candidates", "data/models", "metrics/training"),
                 ("train", "gmf", "data/prepared", "data/candidates", "data/models", "metrics/training")):
        proc = stage(*args, cwd=root)
        assert proc.returncode == 0, proc.stderr
    return root


def test_gmf_does_not_collapse_at_synthetic_1m(synthetic_1m: Path, one_thread) -> None:
    from pipeline.data import load_candidates, load_split
    from pipeline.metrics import heldout_rank, hit_ratio
    from pipeline.models import load_model

    split = load_split(synthetic_1m / "data/prepared")
    test = load_candidates(synthetic_1m / "data/candidates/test.npz")
    history = split.history(val=True)
    scores = {name: load_model(name, synthetic_1m / f"data/models/{name}.pt", history).score(test.users, test.items)
              for name in ("itempop", "gmf")}
    gmf = np.sort(scores["gmf"], axis=1)
    distinct = 1 + (np.diff(gmf, axis=1) != 0).sum(axis=1)
    assert distinct.min() > 1, "GMF gives some user one score for every candidate: it has collapsed"
    assert np.median(distinct) == test.items.shape[1]  # a typical user: every candidate scored apart
    hr = {name: hit_ratio(heldout_rank(s), 10) for name, s in scores.items()}
    print(f"synthetic-1m, one epoch: GMF test HR@10 {hr['gmf']:.4f}, ItemPop {hr['itempop']:.4f}; "
          f"distinct scores per user: min {distinct.min()}, median {np.median(distinct):.0f}")
    assert abs(hr["gmf"] - hr["itempop"]) <= 0.02, hr
