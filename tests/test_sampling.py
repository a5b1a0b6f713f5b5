"""Negative sampling from each user's complement, checked against brute-force numpy."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from pipeline.sampling import ComplementSampler, TooFewItemsError, distinct_ranks

N_USERS, N_ITEMS, K = 50, 80, 5
EMPTY_ROW, TIGHT_ROW, SMALL_ROW, FULL_ROW = 0, 1, 2, 3  # edge rows of the fixture matrix


def make_matrix(seed: int = 0) -> sp.csr_matrix:
    """Random binary CSR plus edge rows: empty, all but K items, 2K-1 allowed, all items."""
    dense = (sp.random(N_USERS, N_ITEMS, density=0.3, random_state=seed, format="csr") != 0).toarray()
    rng = np.random.default_rng(seed)
    dense[EMPTY_ROW] = False
    dense[TIGHT_ROW] = True
    dense[TIGHT_ROW, rng.choice(N_ITEMS, K, replace=False)] = False  # exactly K allowed
    dense[SMALL_ROW] = True
    dense[SMALL_ROW, rng.choice(N_ITEMS, 2 * K - 1, replace=False)] = False  # K <= allowed < 2K
    dense[FULL_ROW] = True  # nothing allowed
    return sp.csr_matrix(dense.astype(np.float32))


@pytest.fixture(scope="module")
def matrix() -> sp.csr_matrix:
    return make_matrix()


@pytest.fixture(scope="module")
def sampler(matrix) -> ComplementSampler:
    return ComplementSampler(matrix)


@pytest.fixture(scope="module")
def complements(matrix) -> list[np.ndarray]:
    dense = matrix.toarray() != 0
    return [np.setdiff1d(np.arange(N_ITEMS), np.flatnonzero(row)) for row in dense]


SAMPLEABLE = np.array([u for u in range(N_USERS) if u != FULL_ROW])  # users with >= 1 allowed item
ENOUGH_FOR_K = np.array([u for u in range(N_USERS) if u != FULL_ROW])  # every other row has >= K


def test_fixture_edge_rows(sampler, complements):
    assert sampler.allowed[EMPTY_ROW] == N_ITEMS
    assert sampler.allowed[TIGHT_ROW] == K
    assert sampler.allowed[SMALL_ROW] == 2 * K - 1
    assert sampler.allowed[FULL_ROW] == 0
    np.testing.assert_array_equal(sampler.allowed, [len(c) for c in complements])
    assert sampler.allowed[ENOUGH_FOR_K].min() >= K


# --- rank_to_item --------------------------------------------------------------------------------

def test_rank_to_item_enumerates_each_complement(sampler, complements):
    for user, complement in enumerate(complements):
        ranks = np.arange(len(complement))
        items = sampler.rank_to_item(np.full(len(ranks), user), ranks)
        np.testing.assert_array_equal(items, complement)


def test_rank_to_item_all_rows_at_once(sampler, complements):
    users = np.concatenate([np.full(len(c), u) for u, c in enumerate(complements)])
    ranks = np.concatenate([np.arange(len(c)) for c in complements])
    np.testing.assert_array_equal(sampler.rank_to_item(users, ranks), np.concatenate(complements))


def test_rank_to_item_broadcasts_users_over_2d_ranks(sampler, complements):
    users = np.array([EMPTY_ROW, TIGHT_ROW, 10, 20])
    ranks = np.array([[0, 1, 4], [4, 0, 2], [0, 1, 2], [3, 2, 1]])
    items = sampler.rank_to_item(users, ranks)
    assert items.shape == (4, 3)
    expected = np.array([complements[u][r] for u, row in zip(users, ranks) for r in row]).reshape(4, 3)
    np.testing.assert_array_equal(items, expected)


def test_unsorted_and_duplicate_csr_input():
    """The sampler sorts indices and sums duplicates of the matrix it is given."""
    # row 0 = {5, 1, 3} given out of order, with 3 twice; row 1 empty
    m = sp.csr_matrix((np.ones(4, np.float32), np.array([5, 3, 1, 3]), np.array([0, 4, 4])), shape=(2, 7))
    s = ComplementSampler(m)
    assert s.allowed.tolist() == [4, 7]
    assert s.rank_to_item(np.zeros(4, int), np.arange(4)).tolist() == [0, 2, 4, 6]
    assert s.rank_to_item(np.ones(7, int), np.arange(7)).tolist() == list(range(7))


# --- sample (with replacement) -------------------------------------------------------------------

def test_sample_shape_and_never_a_positive(sampler, matrix, complements):
    rng = np.random.default_rng(0)
    users = np.repeat(SAMPLEABLE, 3)
    out = sampler.sample(rng, users, 7)
    assert out.shape == (len(users), 7)
    assert out.dtype == np.int64
    dense = matrix.toarray() != 0
    assert not dense[users[:, None], out].any()
    for u, row in zip(users, out):
        assert np.isin(row, complements[u]).all()
    # the tight row can only give its K allowed items
    tight = sampler.sample(rng, np.full(200, TIGHT_ROW), 4)
    np.testing.assert_array_equal(np.unique(tight), complements[TIGHT_ROW])


def test_sample_is_seeded(sampler):
    a = sampler.sample(np.random.default_rng(7), SAMPLEABLE, 10)
    b = sampler.sample(np.random.default_rng(7), SAMPLEABLE, 10)
    c = sampler.sample(np.random.default_rng(8), SAMPLEABLE, 10)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_sample_covers_the_complement_roughly_uniformly(sampler, complements):
    out = sampler.sample(np.random.default_rng(3), np.full(20000, EMPTY_ROW), 1).ravel()
    counts = np.bincount(out, minlength=N_ITEMS)
    assert counts.min() > 0
    expected = 20000 / N_ITEMS  # 250
    assert np.abs(counts - expected).max() < 5 * np.sqrt(expected)


def test_sample_raises_for_user_with_nothing_allowed(sampler):
    with pytest.raises(TooFewItemsError) as info:
        sampler.sample(np.random.default_rng(0), np.array([EMPTY_ROW, FULL_ROW, 7]), 2)
    assert info.value.users.tolist() == [FULL_ROW]
    assert info.value.available.tolist() == [0]
    assert info.value.needed == 1


# --- sample_distinct -----------------------------------------------------------------------------

def test_sample_distinct_rows_are_sorted_distinct_negatives(sampler, matrix):
    rng = np.random.default_rng(1)
    users = np.repeat(ENOUGH_FOR_K, 4)
    out = sampler.sample_distinct(rng, users, K)
    assert out.shape == (len(users), K)
    assert np.all(np.diff(out, axis=1) > 0)  # sorted and distinct
    dense = matrix.toarray() != 0
    assert not dense[users[:, None], out].any()
    assert out.min() >= 0 and out.max() < N_ITEMS


def test_sample_distinct_is_seeded(sampler):
    a = sampler.sample_distinct(np.random.default_rng(5), ENOUGH_FOR_K, K)
    b = sampler.sample_distinct(np.random.default_rng(5), ENOUGH_FOR_K, K)
    c = sampler.sample_distinct(np.random.default_rng(6), ENOUGH_FOR_K, K)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_sample_distinct_tight_row_gives_the_whole_complement(sampler, complements):
    out = sampler.sample_distinct(np.random.default_rng(2), np.full(10, TIGHT_ROW), K)
    for row in out:
        np.testing.assert_array_equal(row, complements[TIGHT_ROW])


def test_sample_distinct_small_row_covers_its_complement(sampler, complements):
    # allowed = 2K - 1 < 2K: the exact "k smallest random keys" path
    out = sampler.sample_distinct(np.random.default_rng(4), np.full(3000, SMALL_ROW), K)
    assert np.all(np.diff(out, axis=1) > 0)
    assert np.isin(out, complements[SMALL_ROW]).all()
    counts = np.array([(out == item).sum() for item in complements[SMALL_ROW]])
    expected = 3000 * K / (2 * K - 1)  # each item is in a uniform K-subset with prob K / allowed
    assert np.abs(counts / expected - 1).max() < 0.06


def test_sample_distinct_mixed_tight_and_roomy_rows(sampler, complements):
    users = np.array([TIGHT_ROW, EMPTY_ROW, SMALL_ROW, 10, TIGHT_ROW, 11])
    out = sampler.sample_distinct(np.random.default_rng(9), users, K)
    for u, row in zip(users, out):
        assert len(set(row.tolist())) == K
        assert np.isin(row, complements[u]).all()
    np.testing.assert_array_equal(out[0], complements[TIGHT_ROW])
    np.testing.assert_array_equal(out[4], complements[TIGHT_ROW])


def test_sample_distinct_raises_listing_short_users(sampler):
    users = np.array([EMPTY_ROW, TIGHT_ROW, SMALL_ROW, FULL_ROW, 10])
    with pytest.raises(TooFewItemsError) as info:
        sampler.sample_distinct(np.random.default_rng(0), users, K + 1)
    assert info.value.users.tolist() == [TIGHT_ROW, FULL_ROW]
    assert info.value.available.tolist() == [K, 0]
    assert info.value.needed == K + 1
    assert "2 user(s)" in str(info.value)
    assert isinstance(info.value, ValueError)


# --- distinct_ranks ------------------------------------------------------------------------------

def test_distinct_ranks_bounds_and_distinctness():
    rng = np.random.default_rng(0)
    sizes = np.array([3, 4, 5, 6, 7, 50, 1000, 3, 10**9])
    out = distinct_ranks(rng, sizes, 3)
    assert out.shape == (len(sizes), 3)
    assert np.all(np.diff(out, axis=1) > 0)
    assert np.all(out >= 0) and np.all(out < sizes[:, None])
    np.testing.assert_array_equal(out[0], [0, 1, 2])  # size == k: the whole range
    np.testing.assert_array_equal(out[7], [0, 1, 2])


def test_distinct_ranks_edge_shapes():
    rng = np.random.default_rng(0)
    assert distinct_ranks(rng, np.array([5, 6]), 0).shape == (2, 0)
    assert distinct_ranks(rng, np.array([], dtype=np.int64), 3).shape == (0, 3)
    np.testing.assert_array_equal(distinct_ranks(rng, np.array([1, 1]), 1), [[0], [0]])


@pytest.mark.parametrize("size", [10, 4])  # 10 >= 2k: redraw path; 4 < 2k: random-keys path
def test_distinct_ranks_is_uniform(size):
    k, n = 3, 20000
    out = distinct_ranks(np.random.default_rng(12345), np.full(n, size), k)
    freq = np.bincount(out.ravel(), minlength=size) / n
    np.testing.assert_allclose(freq, k / size, atol=0.02)  # 0.3 (or 0.75) each, within 2 points
    # pairs too: every 2-subset appears in a uniform 3-subset with the same probability
    pairs = np.zeros((size, size))
    for a, b in ((0, 1), (0, 2), (1, 2)):
        np.add.at(pairs, (out[:, a], out[:, b]), 1)
    upper = pairs[np.triu_indices(size, 1)] / n
    expected = k * (k - 1) / (size * (size - 1))
    np.testing.assert_allclose(upper, expected, atol=0.015)


def test_distinct_ranks_is_seeded():
    sizes = np.array([4, 10, 100, 7])
    a = distinct_ranks(np.random.default_rng(1), sizes, 3)
    b = distinct_ranks(np.random.default_rng(1), sizes, 3)
    np.testing.assert_array_equal(a, b)
