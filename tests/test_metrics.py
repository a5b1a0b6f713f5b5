"""Ranking metrics on hand-computed cases: column 0 of each score row is the held-out item."""
from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.metrics import heldout_rank, hit_ratio, hit_ratio_curve, ndcg


# --- heldout_rank -------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "scores, expected",
    [
        ([[0.9, 0.5, 0.1]], [0]),  # held-out scores highest
        ([[0.1, 0.5, 0.9]], [2]),  # held-out scores lowest
        ([[0.5, 0.9, 0.1, 0.3]], [1]),  # one candidate above
        ([[0.0, 3.0, -1.0, 2.0, 1.0]], [3]),  # three candidates above
        ([[-5.0, -7.0]], [0]),  # negative logits
    ],
)
def test_heldout_rank_counts_candidates_scored_higher(scores, expected):
    np.testing.assert_array_equal(heldout_rank(np.array(scores)), expected)


@pytest.mark.parametrize(
    "scores, expected",
    [
        ([[1.0, 1.0, 0.0]], [1]),  # the tied candidate ranks above the held-out item
        ([[1.0, 0.0, 1.0, 1.0]], [2]),
        ([[2.0, 2.0, 3.0, 1.0]], [2]),  # one higher, one tied
    ],
)
def test_heldout_rank_ties_are_pessimistic(scores, expected):
    np.testing.assert_array_equal(heldout_rank(np.array(scores)), expected)


@pytest.mark.parametrize("width", [1, 2, 5, 101])
def test_all_equal_row_ranks_last(width):
    assert heldout_rank(np.full((1, width), 0.25)).tolist() == [width - 1]


def test_heldout_rank_is_per_row():
    scores = np.array([
        [0.9, 0.1, 0.2, 0.3],  # 0
        [0.1, 0.9, 0.2, 0.3],  # 3
        [0.25, 0.9, 0.2, 0.3],  # 2
        [0.3, 0.3, 0.3, 0.3],  # 3 (all tied)
    ])
    assert heldout_rank(scores).tolist() == [0, 3, 2, 3]


def test_nan_heldout_ranks_last():
    scores = np.array([[np.nan, 0.1, 0.2, -1.0], [np.nan, np.nan, 5.0, 0.0]])
    assert heldout_rank(scores).tolist() == [3, 3]


def test_nan_candidate_ranks_above_heldout():
    assert heldout_rank(np.array([[0.5, np.nan, 0.1]])).tolist() == [1]


def test_heldout_rank_matches_brute_force():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(200, 11)).astype(float)  # small range: many ties
    expected = [sum(row[j] >= row[0] for j in range(1, len(row))) for row in scores]
    assert heldout_rank(scores).tolist() == expected


# --- hit_ratio and ndcg --------------------------------------------------------------------------

def test_perfect_ranking_gives_hr_and_ndcg_one():
    scores = np.array([[10.0, 1.0, 2.0, 3.0], [0.5, 0.4, 0.3, 0.2], [1.0, -1.0, 0.0, 0.9]])
    ranks = heldout_rank(scores)
    assert ranks.tolist() == [0, 0, 0]
    for k in (1, 2, 4):
        assert hit_ratio(ranks, k) == 1.0
        assert ndcg(ranks, k) == pytest.approx(1.0)


def test_heldout_last_is_no_hit():
    scores = np.array([[0.0, 1.0, 2.0, 3.0], [-9.0, 0.0, 0.0, 0.0]])
    ranks = heldout_rank(scores)
    assert ranks.tolist() == [3, 3]
    for k in (1, 2, 3):
        assert hit_ratio(ranks, k) == 0.0
        assert ndcg(ranks, k) == 0.0
    # with k covering every candidate the held-out item is a hit at the last position
    assert hit_ratio(ranks, 4) == 1.0
    assert ndcg(ranks, 4) == pytest.approx(1 / math.log2(5))


def test_textbook_mixed_example():
    ranks = np.array([0, 1, 3, 12])
    assert hit_ratio(ranks, 10) == pytest.approx(0.75)
    expected = (1.0 + 1.0 / math.log2(3) + 1.0 / math.log2(5) + 0.0) / 4
    assert ndcg(ranks, 10) == pytest.approx(expected)
    assert ndcg(ranks, 10) == pytest.approx(0.51540, abs=1e-5)  # the number itself


@pytest.mark.parametrize(
    "k, hr, nd",
    [
        (1, 1 / 4, 1 / 4),
        (2, 2 / 4, (1 + 1 / math.log2(3)) / 4),
        (3, 2 / 4, (1 + 1 / math.log2(3)) / 4),
        (4, 3 / 4, (1 + 1 / math.log2(3) + 1 / math.log2(5)) / 4),
        (13, 1.0, (1 + 1 / math.log2(3) + 1 / math.log2(5) + 1 / math.log2(14)) / 4),
    ],
)
def test_cutoff_k(k, hr, nd):
    ranks = np.array([0, 1, 3, 12])
    assert hit_ratio(ranks, k) == pytest.approx(hr)
    assert ndcg(ranks, k) == pytest.approx(nd)


def test_rank_equal_to_k_is_not_a_hit():
    assert hit_ratio(np.array([5]), 5) == 0.0
    assert ndcg(np.array([5]), 5) == 0.0
    assert hit_ratio(np.array([4]), 5) == 1.0
    assert ndcg(np.array([4]), 5) == pytest.approx(1 / math.log2(6))


def test_metrics_return_python_floats():
    ranks = np.array([0, 2])
    assert type(hit_ratio(ranks, 1)) is float
    assert type(ndcg(ranks, 1)) is float


def test_end_to_end_from_scores():
    scores = np.array([
        [0.9, 0.1, 0.2],  # rank 0
        [0.5, 0.6, 0.1],  # rank 1
        [0.4, 0.4, 0.9],  # rank 2 (tie counts above)
    ])
    ranks = heldout_rank(scores)
    assert ranks.tolist() == [0, 1, 2]
    assert hit_ratio(ranks, 2) == pytest.approx(2 / 3)
    assert ndcg(ranks, 2) == pytest.approx((1 + 1 / math.log2(3)) / 3)


# --- hit_ratio_curve -----------------------------------------------------------------------------

@pytest.mark.parametrize(
    "ranks, max_k",
    [
        ([0, 1, 3, 12], 15),
        ([0, 1, 3, 12], 3),
        ([0, 0, 0], 1),
        ([7, 7, 9], 5),  # never a hit within max_k
        ([4], 5),
    ],
)
def test_hit_ratio_curve_matches_hit_ratio(ranks, max_k):
    ranks = np.array(ranks)
    curve = hit_ratio_curve(ranks, max_k)
    assert curve.shape == (max_k,)
    np.testing.assert_allclose(curve, [hit_ratio(ranks, k) for k in range(1, max_k + 1)])


def test_hit_ratio_curve_explicit_values():
    curve = hit_ratio_curve(np.array([0, 1, 3, 12]), 5)
    np.testing.assert_allclose(curve, [0.25, 0.5, 0.5, 0.75, 0.75])


def test_hit_ratio_curve_random_ranks():
    rng = np.random.default_rng(1)
    ranks = heldout_rank(rng.integers(0, 5, size=(300, 21)).astype(float))
    curve = hit_ratio_curve(ranks, 21)
    np.testing.assert_allclose(curve, [hit_ratio(ranks, k) for k in range(1, 22)])
    assert curve[-1] == 1.0  # every rank is < the number of candidates
    assert np.all(np.diff(curve) >= 0)
