"""Ranking metrics: hand-computed cases (column 0 of each score row is the held-out item), full
ranking against a brute force, and the sampled and full protocols agreeing when the candidates are
every item the user has not seen."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from pipeline.metrics import full_ranks, heldout_rank, hit_ratio, hit_ratio_curve, mrr, ndcg
from pipeline.models.itempop import ItemPop
from pipeline.models.mf import MF
from pipeline.models.mlp import MLP


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


# --- mrr -----------------------------------------------------------------------------------------

def test_mrr_of_a_perfect_ranking_is_one():
    assert mrr(np.array([0, 0, 0])) == 1.0
    assert mrr(heldout_rank(np.array([[3.0, 1.0, 2.0], [0.0, -1.0, -2.0]]))) == 1.0


@pytest.mark.parametrize(
    "ranks, expected",
    [
        ([0, 1, 3], (1 + 1 / 2 + 1 / 4) / 3),
        ([1], 0.5),
        ([9, 0], (1 / 10 + 1) / 2),
        ([0, 1, 3, 12], (1 + 1 / 2 + 1 / 4 + 1 / 13) / 4),
    ],
)
def test_mrr_hand_computed(ranks, expected):
    value = mrr(np.array(ranks))
    assert type(value) is float
    assert value == pytest.approx(expected)


def test_mrr_has_no_cutoff():
    assert mrr(np.array([999])) == pytest.approx(1 / 1000)


# --- full_ranks ----------------------------------------------------------------------------------

def brute_force_full_ranks(scores: np.ndarray, heldout: np.ndarray, seen: sp.csr_matrix) -> list[int]:
    """Rank of each user's held-out item among the items it has not seen (itself excluded): the
    number of those items scored at least as high (ties pessimistic) or NaN."""
    dense = seen.toarray() != 0
    ranks = []
    for u, h in enumerate(heldout):
        ranks.append(sum(1 for j in range(scores.shape[1])
                         if j != h and not dense[u, j] and (scores[u, j] >= scores[u, h] or math.isnan(scores[u, j]))))
    return ranks


def random_seen(rng, n_users: int, n_items: int, density: float) -> sp.csr_matrix:
    return sp.csr_matrix((rng.random((n_users, n_items)) < density).astype(np.float32))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("batch_users", [1, 3, 1024])
def test_full_ranks_matches_brute_force(seed, batch_users):
    """In batches of 1, 3 and all the users (batch_elements counts scores: users x items)."""
    rng = np.random.default_rng(seed)
    n_users, n_items = 23, 17
    scores = rng.integers(0, 5, size=(n_users, n_items)).astype(np.float32)  # many ties
    scores[rng.random(scores.shape) < 0.05] = np.nan  # NaN candidates rank above the held-out item
    heldout = rng.integers(0, n_items, size=n_users)
    scores[np.arange(n_users), heldout] = rng.integers(0, 5, size=n_users)  # a finite held-out score
    seen = random_seen(rng, n_users, n_items, 0.3).tolil()
    seen[np.arange(3), heldout[:3]] = 1.0  # a held-out item that is also in `seen` is still left out once
    seen = seen.tocsr()
    table = torch.from_numpy(scores)
    calls = []

    def score_all(users):
        calls.append(len(users))
        return table[torch.from_numpy(users)]

    ranks = full_ranks(score_all, np.arange(n_users), heldout, seen, batch_elements=batch_users * n_items)
    expected = brute_force_full_ranks(scores, heldout, seen)
    assert ranks.tolist() == expected
    assert len(set(expected)) > 3
    assert calls == [min(batch_users, n_users - lo) for lo in range(0, n_users, batch_users)]


def test_full_ranks_on_a_subset_of_users_in_any_order():
    rng = np.random.default_rng(7)
    scores = rng.normal(size=(10, 12)).astype(np.float32)
    seen = random_seen(rng, 10, 12, 0.25)
    users = np.array([7, 2, 2, 9, 0])
    heldout = np.array([3, 0, 11, 5, 5])
    table = torch.from_numpy(scores)
    ranks = full_ranks(lambda u: table[torch.from_numpy(u)], users, heldout, seen, batch_elements=2 * 12)
    assert ranks.tolist() == brute_force_full_ranks(scores[users], heldout, seen[users])


def test_full_ranks_hand_computed():
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.1, 0.7, 0.5]])
    seen = sp.csr_matrix(np.array([[0, 1, 0, 0, 0, 1]], np.float32))  # item 1 (0.9) and item 5 (a tie)
    # the unseen others: item 2 (a tie: ranks above), item 3 (below), item 4 (above)
    assert full_ranks(lambda u: scores, np.array([0]), np.array([0]), seen).tolist() == [2]


def test_full_ranks_leaves_the_score_matrix_alone():
    table = torch.arange(12, dtype=torch.float32).reshape(2, 6)
    before = table.clone()
    seen = sp.csr_matrix(np.eye(2, 6, dtype=np.float32))
    assert full_ranks(lambda u: table, np.arange(2), np.array([3, 4]), seen).tolist() == [2, 1]
    assert torch.equal(table, before)


@pytest.mark.parametrize("held", [math.nan, -math.inf])
def test_full_ranks_nan_or_minus_inf_heldout_ranks_last_among_unseen(held):
    scores = torch.tensor([[held, 0.5, 0.1, 0.9, 0.2]])
    seen = sp.csr_matrix(np.array([[0, 1, 0, 0, 0]], np.float32))
    # the unseen others are items 2, 3 and 4: the last place is rank 3, as heldout_rank says
    assert heldout_rank(scores[:, [0, 2, 3, 4]].numpy()).tolist() == [3]
    assert full_ranks(lambda u: scores, np.array([0]), np.array([0]), seen).tolist() == [3]


# --- sampled and full protocols agree when the candidates are every unseen item ------------------

def every_unseen_candidates(seen: sp.csr_matrix, heldout: np.ndarray) -> np.ndarray:
    """[users, 1 + unseen]: column 0 the held-out item, then every item the user has not seen."""
    dense = seen.toarray() != 0
    rows = []
    for u, h in enumerate(heldout):
        rows.append([h, *(j for j in range(seen.shape[1]) if j != h and not dense[u, j])])
    assert len({len(r) for r in rows}) == 1, "every user has as many seen items"
    return np.array(rows)


def equal_size_seen(rng, n_users: int, n_items: int, per_user: int) -> tuple[sp.csr_matrix, np.ndarray]:
    """A `seen` CSR with per_user items for every user, and each user's held-out item outside it."""
    rows, cols, heldout = [], [], []
    for u in range(n_users):
        chosen = rng.choice(n_items, per_user + 1, replace=False)
        rows += [u] * per_user
        cols += chosen[1:].tolist()
        heldout.append(chosen[0])
    seen = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(n_users, n_items))
    return seen, np.array(heldout)


def random_mf(n_users: int, n_items: int) -> MF:
    torch.manual_seed(0)
    model = MF(n_users, n_items, 4)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_()
    return model


@pytest.mark.parametrize("scorer", ["ties", "itempop", "mf", "mlp"])
def test_sampled_and_full_metrics_agree_on_every_unseen_item(scorer):
    rng = np.random.default_rng(11)
    n_users, n_items, n_seen, k = 30, 20, 6, 5
    seen, heldout = equal_size_seen(rng, n_users, n_items, n_seen)
    if scorer == "ties":
        table = torch.from_numpy(rng.integers(0, 4, size=(n_users, n_items)).astype(np.float32))

        def score_all(users):
            return table[torch.from_numpy(np.asarray(users))]
    elif scorer == "itempop":
        score_all = ItemPop(rng.integers(0, 5, size=n_items)).score_all
    elif scorer == "mlp":
        torch.manual_seed(0)
        mlp = MLP(n_users, n_items, [8, 6])
        with torch.no_grad():
            for param in mlp.parameters():
                param.normal_()
        score_all = mlp.score_all
    else:
        score_all = random_mf(n_users, n_items).score_all
    users = np.arange(n_users)
    cands = every_unseen_candidates(seen, heldout)
    assert cands.shape == (n_users, n_items - n_seen)
    sampled = heldout_rank(np.take_along_axis(score_all(users).numpy(), cands, axis=1))
    full = full_ranks(score_all, users, heldout, seen, batch_elements=7 * n_items)
    np.testing.assert_array_equal(sampled, full)
    assert len(set(full.tolist())) > 3  # spread ranks, not all first or all last
    assert hit_ratio(sampled, k) == hit_ratio(full, k)
    assert ndcg(sampled, k) == ndcg(full, k)
    assert mrr(sampled) == mrr(full)
    np.testing.assert_array_equal(hit_ratio_curve(sampled, 10), hit_ratio_curve(full, 10))
