"""pipeline.summary: the results table a person reads after `dvc repro` (and `make repro`).

The inputs are built by the evaluate stage's own functions from simulated per-user ranks of all six
models, so the per-model test metrics (metrics/test/<model>.json) and intervals.json agree as they do
after a real run.
"""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from conftest import stage, user_error
from pipeline.evaluate import intervals, point_metrics
from pipeline.models import label, list_models
from pipeline.summary import metrics_table, terminal_table

# Every model, in the order the stages run them (the always trained, then `models`, then `fused`).
MODEL_NAMES = ("itempop", "mlp", "gmf", "mf", "ease", "sasrec", "neumf")
assert set(MODEL_NAMES) == set(list_models())

CELL = re.compile(r"(\d+\.\d{3}) ± (\d+\.\d{3})")


def simulated_results(n_users: int, k: int, seed: int = 0) -> tuple[dict, dict]:
    """({model: its metrics/test/<model>.json}, intervals.json) for every model, from random ranks (each
    model a different skill)."""
    rng = np.random.default_rng(seed)
    all_ranks = {}
    for skill, name in enumerate(MODEL_NAMES):
        p = 0.05 + 0.02 * skill
        all_ranks[name] = {"sampled": rng.geometric(p, n_users) - 1, "full": rng.geometric(p / 8, n_users) - 1}
    metrics = {name: point_metrics(r, k) for name, r in all_ranks.items()}
    # validation: another ordering than the test's, so that the reference is visibly not the test's best
    validation = {name: {p: {"hr": float(rng.random()), "ndcg": 0.1} for p in ("sampled", "full")}
                  for name in MODEL_NAMES}
    return (json.loads(json.dumps(metrics)),  # as read from disk
            json.loads(json.dumps(intervals(all_ranks, k, validation))))


@pytest.mark.parametrize("n_users, k", [(943, 10), (6_040, 10), (138_493, 20), (50, 1), (943, 100)])
def test_terminal_table_fits_100_columns_and_shows_the_test_metrics(n_users, k):
    metrics, bars = simulated_results(n_users, k)
    text = terminal_table(bars)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 100, [(len(line), line) for line in lines if len(line) > 100]
    assert "±" in text and len("±") == 1  # counted as one column: characters, not UTF-8 bytes
    assert lines[0].split() == ["model", f"HR@{k}", f"NDCG@{k}", "full", f"HR@{k}", "full", f"NDCG@{k}"]
    assert set(lines[1]) == {"-"}
    rows = {line.split()[0]: line for line in lines[2:2 + len(MODEL_NAMES)]}
    assert list(rows) == [label(name) for name in MODEL_NAMES]
    for name in MODEL_NAMES:
        cells = CELL.findall(rows[label(name)])
        assert len(cells) == 4, rows[label(name)]
        point = metrics[name]
        expected = [point["hr"], point["ndcg"], point["full"]["hr"], point["full"]["ndcg"]]
        assert [float(mean) for mean, _ in cells] == [float(f"{v:.3f}") for v in expected]
        entry = bars["models"][name]
        half = [(entry[p][m]["hi"] - entry[p][m]["lo"]) / 2 for p in ("sampled", "full") for m in ("hr", "ndcg")]
        assert [float(h) for _, h in cells] == [float(f"{v:.3f}") for v in half]
        assert all(0 <= v < 0.5 for v in half)
        if k in (10, 20):  # real-looking intervals, not zeros
            assert all(v > 0 for v in half), half
    assert f"{n_users:,} test users" in text
    ref = bars["reference"]
    assert (f"Reference, best by validation HR@{k}: {label(ref['sampled'])} (sampled candidates), "
            f"{label(ref['full'])} (full ranking).") in text


def test_intervals_agree_with_the_test_metrics():
    metrics, bars = simulated_results(943, 10, seed=1)
    for name in MODEL_NAMES:
        for protocol, point in (("sampled", metrics[name]), ("full", metrics[name]["full"])):
            for metric in ("hr", "ndcg", "mrr"):
                entry = bars["models"][name][protocol][metric]
                assert entry["mean"] == point[metric]
                assert entry["lo"] < entry["mean"] < entry["hi"]


def test_metrics_table_shows_validation_hr_by_select_by_and_the_epoch():
    metrics, bars = simulated_results(943, 10)
    # the training summaries (metrics/training/<model>/metrics.json): a closed-form model has no epoch
    summaries = {"itempop": {"hr": 0.44, "ndcg": 0.24, "full": {"hr": 0.0795, "ndcg": 0.039}},
                 "mlp": {"epoch": 18, "hr": 0.688229, "ndcg": 0.41903, "full": {"hr": 0.14316, "ndcg": 0.07287}}}

    def rows(table: str) -> dict[str, list[str]]:
        lines = table.splitlines()
        assert lines[0].startswith("| model | HR@10 | NDCG@10 | MRR | full HR@10 |") and lines[1].startswith("|---|")
        split = ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])
        return {cells[0]: cells[1:] for cells in split}

    by_sampled, by_full = (rows(metrics_table(bars, summaries, select_by)) for select_by in ("sampled", "full"))
    bare = rows(metrics_table(bars))  # no summaries: no validation column
    assert list(by_sampled) == list(by_full) == list(bare) == [label(name) for name in MODEL_NAMES]  # bars' order
    assert by_sampled["ItemPop"][6] == "0.4400" and by_full["ItemPop"][6] == "0.0795"  # no epoch: closed form
    assert by_sampled["MLP"][6] == "0.6882 (18)" and by_full["MLP"][6] == "0.1432 (18)"
    assert all(cells[6] == "" for name, cells in by_sampled.items() if name not in ("ItemPop", "MLP"))
    assert all(cells[6] == "" for cells in bare.values())
    for name in MODEL_NAMES:
        point = metrics[name]
        shown = [float(CELL.fullmatch(cell).group(1)) for cell in bare[label(name)][:6]]
        assert shown == [float(f"{v:.3f}") for v in (point["hr"], point["ndcg"], point["mrr"], point["full"]["hr"],
                                                     point["full"]["ndcg"], point["full"]["mrr"])]
        assert by_sampled[label(name)][:6] == by_full[label(name)][:6] == bare[label(name)][:6]


def test_summary_command(tmp_path):
    _, bars = simulated_results(943, 10)
    (tmp_path / "intervals.json").write_text(json.dumps(bars))  # all it reads: no metrics/test/ needed
    proc = stage("summary", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == terminal_table(bars) + "\n"
    assert len(CELL.findall(proc.stdout)) == 4 * len(MODEL_NAMES)  # every model, from intervals.json alone
    (tmp_path / "intervals.json").unlink()
    err = user_error(stage("summary", str(tmp_path), cwd=tmp_path))
    assert "intervals.json: not found; run `dvc repro` first" in err
