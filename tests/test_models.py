"""ItemPop and the NCF MLP: shapes, scoring, checkpoint round trips, and training on a toy problem."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from pipeline.data import Candidates
from pipeline.metrics import heldout_rank
from pipeline.models import MLP, ItemPop
from pipeline.train_mlp import evaluate_ranking, train

N_USERS, N_ITEMS = 7, 11


@pytest.fixture(autouse=True)
def one_thread():
    """Training and scoring bit-for-bit reproducible, as in the train_mlp stage."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_mlp(layers=(16, 8), dropout=0.0, seed=0) -> MLP:
    torch.manual_seed(seed)
    model = MLP(N_USERS, N_ITEMS, list(layers), dropout)
    # spread the embeddings so scores differ visibly between pairs
    with torch.no_grad():
        model.user_embedding.weight.normal_(std=1.0)
        model.item_embedding.weight.normal_(std=1.0)
    return model


def candidate_grid(m: int = 5, c: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, N_USERS, size=m), rng.integers(0, N_ITEMS, size=(m, c))


# --- ItemPop -------------------------------------------------------------------------------------

def test_itempop_scores_are_counts_of_the_items():
    counts = np.array([5, 0, 2, 9])
    model = ItemPop(counts)
    items = np.array([[3, 0, 1], [2, 2, 0]])
    scores = model.score(np.array([0, 1]), items)
    np.testing.assert_array_equal(scores, [[9.0, 5.0, 0.0], [2.0, 2.0, 5.0]])
    assert scores.dtype == np.float64
    # users are ignored
    np.testing.assert_array_equal(model.score(np.array([7, 8]), items), scores)


def test_itempop_ranks_by_popularity():
    model = ItemPop(np.array([1, 10, 3, 3]))
    ranks = heldout_rank(model.score(np.array([0, 1, 2]), np.array([[1, 0, 2], [0, 1, 2], [2, 3, 0]])))
    assert ranks.tolist() == [0, 2, 1]  # the last row: a tie with item 3 ranks above


# --- MLP forward and score -----------------------------------------------------------------------

@pytest.mark.parametrize("layers", [[8], [16, 8], [64, 32, 16, 8]])
def test_forward_shapes(layers):
    model = make_mlp(layers)
    assert model.user_embedding.weight.shape == (N_USERS, layers[0] // 2)
    assert model.item_embedding.weight.shape == (N_ITEMS, layers[0] // 2)
    assert len(model.tower) == len(layers) - 1
    out = model(torch.tensor([0, 1, 2, 6]), torch.tensor([10, 3, 3, 0]))
    assert out.shape == (4,)
    users, items = candidate_grid(3, 5)
    out2 = model(torch.as_tensor(users)[:, None].expand(3, 5), torch.as_tensor(items))
    assert out2.shape == (3, 5)
    # a 2-D call gives the same logits as the flattened 1-D call
    flat = model(torch.as_tensor(users).repeat_interleave(5), torch.as_tensor(items).reshape(-1))
    torch.testing.assert_close(out2.reshape(-1), flat)


def test_odd_first_layer_is_rejected():
    with pytest.raises(ValueError, match="even"):
        MLP(N_USERS, N_ITEMS, [15, 8])


def test_score_returns_numpy_matching_forward():
    model = make_mlp()
    users, items = candidate_grid(5, 4)
    scores = model.score(users, items)
    assert isinstance(scores, np.ndarray)
    assert scores.shape == (5, 4) and scores.dtype == np.float64
    with torch.no_grad():
        expected = model(torch.as_tensor(users)[:, None].expand(5, 4), torch.as_tensor(items))
    np.testing.assert_allclose(scores, expected.numpy(), rtol=1e-6)
    assert len(np.unique(scores)) > 1  # not a constant model


def test_score_batches_rows_without_changing_results():
    model = make_mlp()
    users, items = candidate_grid(9, 3)
    # equal up to float32 rounding (matmul blocking may differ with the batch size)
    np.testing.assert_allclose(model.score(users, items, batch_rows=2), model.score(users, items),
                               rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("training", [True, False])
def test_score_keeps_training_mode(training):
    model = make_mlp(dropout=0.5)
    model.train(training)
    users, items = candidate_grid()
    first = model.score(users, items)
    assert model.training is training
    # scoring runs in eval mode: dropout is off, so repeated calls agree
    np.testing.assert_array_equal(model.score(users, items), first)


def test_dropout_active_only_in_training():
    model = make_mlp(layers=(16, 16, 8), dropout=0.5)
    users, items = torch.arange(N_USERS), torch.arange(N_USERS)
    model.eval()
    torch.testing.assert_close(model(users, items), model(users, items))
    model.train()
    torch.manual_seed(1)
    a = model(users, items)
    b = model(users, items)
    assert not torch.equal(a, b)


# --- checkpoints ---------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "layers, dropout",
    [
        ([8], 0.0),
        ([16, 8], 0.0),
        ([16, 8], 0.3),
        ([64, 32, 16, 8], 0.0),
        ([24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2], 0.2),  # tower.10 must sort after tower.9
    ],
)
def test_from_state_dict_reproduces_scores(layers, dropout):
    model = make_mlp(layers, dropout)
    users, items = candidate_grid(6, 5)
    rebuilt = MLP.from_state_dict(model.state_dict())
    assert rebuilt.training is False
    assert [layer.out_features for layer in rebuilt.tower] == layers[1:]
    np.testing.assert_array_equal(rebuilt.score(users, items), model.score(users, items))


def test_state_dict_round_trips_through_torch_save(tmp_path):
    model = make_mlp([16, 8], 0.1)
    path = tmp_path / "mlp.pt"
    torch.save(model.state_dict(), path)
    state = torch.load(path, weights_only=True)
    assert state.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(state[key], value), key
    users, items = candidate_grid()
    np.testing.assert_array_equal(MLP.from_state_dict(state).score(users, items), model.score(users, items))


@pytest.mark.parametrize(
    "missing",
    [
        "user_embedding.weight",
        "item_embedding.weight",
        "output.weight",
        "tower.0.bias",
    ],
)
def test_from_state_dict_missing_key_raises_value_error(missing):
    state = dict(make_mlp().state_dict())
    del state[missing]
    with pytest.raises(ValueError):
        MLP.from_state_dict(state)


def test_from_state_dict_rejects_non_tensors():
    with pytest.raises(ValueError, match="not an MLP state_dict"):
        MLP.from_state_dict({"user_embedding.weight": [1, 2], "item_embedding.weight": [3]})


# --- training ------------------------------------------------------------------------------------

def planted_problem(n_users: int = 40, n_items: int = 30, negatives: int = 5, seed: int = 0):
    """Two user groups, each liking one half of the items; one liked item per user held out.

    Returns the train CSR and validation candidates: column 0 the held-out liked item, the other
    columns items from the other half (which nobody in the user's group interacted with).
    """
    rng = np.random.default_rng(seed)
    half = n_items // 2
    dense = np.zeros((n_users, n_items), np.float32)
    held = np.empty(n_users, np.int64)
    others = np.empty((n_users, negatives), np.int64)
    for u in range(n_users):
        liked = np.arange(half) + (0 if u < n_users // 2 else half)
        held[u] = liked[u % half]
        dense[u, liked] = 1.0
        dense[u, held[u]] = 0.0
        others[u] = rng.choice(np.setdiff1d(np.arange(n_items), liked), negatives, replace=False)
    return sp.csr_matrix(dense), Candidates(np.arange(n_users), np.column_stack([held, others]))


TOY_PARAMS = {"seed": 2, "layers": [16, 8], "lr": 0.01, "weight_decay": 0.0, "dropout": 0.0,
              "batch_size": 64, "epochs": 20, "negatives": 2, "test_negatives": 5, "topK": 1}


@pytest.fixture(scope="module")
def toy_run():
    torch.set_num_threads(1)
    train_csr, val = planted_problem()
    state, curve, best_epoch = train(train_csr, val, dict(TOY_PARAMS))
    return train_csr, val, state, curve, best_epoch


def test_training_learns_the_planted_structure(toy_run):
    _, val, state, curve, best_epoch = toy_run
    assert [row.epoch for row in curve] == list(range(1, TOY_PARAMS["epochs"] + 1))
    first, last = curve[0].loss, curve[-1].loss
    assert first == pytest.approx(np.log(2), abs=0.1)  # near-zero logits at the start
    assert last < 0.5 * first
    best = curve[best_epoch - 1]
    assert best.val_hr >= 0.8  # HR@1 against 5 items of the other half
    assert best.val_hr == max(row.val_hr for row in curve)
    # the kept state is the best epoch's, not the last one's
    model = MLP.from_state_dict(state)
    hr, nd = evaluate_ranking(model, val, TOY_PARAMS["topK"])
    assert (hr, nd) == pytest.approx((best.val_hr, best.val_ndcg))


def test_trained_model_prefers_its_groups_half(toy_run):
    _, _, state, _, _ = toy_run
    model = MLP.from_state_dict(state)
    users = np.arange(40)
    scores = model.score(users, np.tile(np.arange(30), (40, 1)))
    own = np.where(users[:, None] < 20, np.arange(30) < 15, np.arange(30) >= 15)
    # on average, a user's own half scores above the other half for every user
    assert np.all(scores[own].reshape(40, 15).mean(1) > scores[~own].reshape(40, 15).mean(1))


def test_best_epoch_is_the_earliest_best():
    train_csr, val = planted_problem()
    _, curve, best_epoch = train(train_csr, val, dict(TOY_PARAMS, epochs=4))
    keys = [(row.val_hr, row.val_ndcg) for row in curve]
    assert best_epoch == 1 + keys.index(max(keys))


def test_training_is_deterministic():
    train_csr, val = planted_problem(n_users=20, n_items=16)
    params = dict(TOY_PARAMS, epochs=3, dropout=0.2, weight_decay=0.01, seed=7)
    state_a, curve_a, best_a = train(train_csr, val, params)
    state_b, curve_b, best_b = train(train_csr, val, params)
    assert best_a == best_b
    assert [(r.loss, r.val_hr, r.val_ndcg) for r in curve_a] == [(r.loss, r.val_hr, r.val_ndcg) for r in curve_b]
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key
    # and the seed matters
    state_c, _, _ = train(train_csr, val, dict(params, seed=8))
    assert not torch.equal(state_a["user_embedding.weight"], state_c["user_embedding.weight"])
