"""The models: shapes, scoring (score and score_all), checkpoint round trips, NeuMF.from_pretrained, EASE.

Training on toy problems is in test_training.py."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from pipeline.common import PipelineError
from pipeline.metrics import heldout_rank
from pipeline.models import get, label, list_models, load_model, load_state
from pipeline.models._neural import PairScorer
from pipeline.models.ease import EASE, MAX_EASE_ITEMS, weights_for
from pipeline.models.gmf import GMF
from pipeline.models.itempop import ItemPop
from pipeline.models.mf import MF
from pipeline.models.mlp import MLP
from pipeline.models.neumf import NeuMF
from pipeline.models.sasrec import SASRec

N_USERS, N_ITEMS = 7, 11


pytestmark = pytest.mark.usefixtures("one_thread")  # bit-for-bit reproducible, as in the train stage


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


# --- GMF, MF, NeuMF: construction and a random model of each kind ---------------------------------

def make_model(name: str, seed: int = 0, dropout: float = 0.0) -> PairScorer:
    """A model of get(name) with every parameter drawn at random (biases included), so
    that every part of its formula moves the scores."""
    torch.manual_seed(seed)
    if name == "mlp":
        model = MLP(N_USERS, N_ITEMS, [16, 8], dropout)
    elif name == "gmf":
        model = GMF(N_USERS, N_ITEMS, 6)
    elif name == "mf":
        model = MF(N_USERS, N_ITEMS, 6)
    else:
        model = NeuMF(N_USERS, N_ITEMS, 6, [16, 8, 4], dropout)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(std=0.7)
    return model


NEURAL = sorted(name for name in list_models() if issubclass(get(name), PairScorer))  # gmf, mf, mlp, neumf
NAMED = {MLP: "an MLP", GMF: "a GMF", MF: "an MF", NeuMF: "a NeuMF"}  # as the error messages say them


def test_the_neural_models_are_the_five_trained_by_the_loop():
    assert {n: get(n) for n in list_models() if get(n).neural} == {"mlp": MLP, "gmf": GMF, "mf": MF, "neumf": NeuMF,
                                                                 "sasrec": SASRec}
    assert NEURAL == ["gmf", "mf", "mlp", "neumf"]  # the pair scorers; SASRec's own tests: test_sasrec.py


@pytest.mark.parametrize("name", NEURAL)
def test_forward_gives_one_logit_per_pair(name):
    model = make_model(name)
    assert model.n_items == N_ITEMS
    out = model(torch.tensor([0, 1, 2, 6]), torch.tensor([10, 3, 3, 0]))
    assert out.shape == (4,) and out.dtype == torch.float32
    users, items = candidate_grid(3, 5)
    grid = model(torch.as_tensor(users)[:, None].expand(3, 5), torch.as_tensor(items))
    assert grid.shape == (3, 5)
    flat = model(torch.as_tensor(users).repeat_interleave(5), torch.as_tensor(items).reshape(-1))
    torch.testing.assert_close(grid.reshape(-1), flat)


def test_gmf_is_a_weighted_product_of_the_embeddings():
    model = make_model("gmf")
    u, i = torch.tensor([0, 3, 6]), torch.tensor([1, 10, 4])
    p, q = model.user_embedding.weight[u], model.item_embedding.weight[i]
    expected = (p * q) @ model.output.weight[0] + model.output.bias
    torch.testing.assert_close(model(u, i), expected)


def test_mf_is_biased_dot_product():
    model = make_model("mf")
    u, i = torch.tensor([0, 3, 6, 6]), torch.tensor([1, 10, 4, 0])
    expected = ((model.user_embedding.weight[u] * model.item_embedding.weight[i]).sum(1)
                + model.user_bias.weight[u, 0] + model.item_bias.weight[i, 0] + model.bias)
    torch.testing.assert_close(model(u, i), expected)


def test_mf_starts_with_zero_biases():
    model = MF(N_USERS, N_ITEMS, 4)
    assert not model.user_bias.weight.any() and not model.item_bias.weight.any() and model.bias.item() == 0.0


def test_neumf_concatenates_both_branches():
    model = make_model("neumf")
    assert model.output.in_features == 6 + 4
    assert not hasattr(model.gmf, "output") and not hasattr(model.mlp, "output")
    u, i = torch.tensor([0, 3, 6]), torch.tensor([1, 10, 4])
    both = torch.cat([model.gmf.hidden(u, i), model.mlp.hidden(u, i)], dim=-1)
    torch.testing.assert_close(model(u, i), model.output(both).squeeze(-1))


# --- checkpoints of every neural model -----------------------------------------------------------

@pytest.mark.parametrize("name", NEURAL)
def test_from_state_dict_round_trip_through_torch_save(name, tmp_path):
    model = make_model(name)
    path = tmp_path / f"{name}.pt"
    torch.save(model.state_dict(), path)
    state = torch.load(path, weights_only=True)
    rebuilt = get(name).from_state_dict(state)
    assert type(rebuilt) is type(model) and rebuilt.training is False
    assert rebuilt.n_items == N_ITEMS
    assert rebuilt.state_dict().keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value), key
    users, items = candidate_grid(6, 5)
    np.testing.assert_array_equal(rebuilt.score(users, items), model.score(users, items))
    torch.testing.assert_close(rebuilt.score_all(np.arange(N_USERS)), model.score_all(np.arange(N_USERS)),
                               rtol=0, atol=0)


@pytest.mark.parametrize("name", NEURAL)
def test_load_model_reads_a_saved_checkpoint(name, tmp_path):
    model = make_model(name)
    path = tmp_path / f"{name}.pt"
    torch.save(model.state_dict(), path)
    train = sp.csr_matrix((N_USERS, N_ITEMS), dtype=np.float32)
    users, items = candidate_grid()
    np.testing.assert_array_equal(load_model(name, path, train).score(users, items), model.score(users, items))
    with pytest.raises(PipelineError, match=f"trained on {N_ITEMS} items, the data has {N_ITEMS + 1}"):
        load_model(name, path, sp.csr_matrix((N_USERS, N_ITEMS + 1), dtype=np.float32))


@pytest.mark.parametrize("name, other", [(a, b) for a in NEURAL for b in NEURAL if a != b])
def test_another_models_state_dict_is_rejected(name, other):
    cls = get(name)
    with pytest.raises(ValueError, match=f"not {NAMED[cls]} state_dict"):
        cls.from_state_dict(make_model(other).state_dict())


@pytest.mark.parametrize("name", ["gmf", "mf", "neumf"])
def test_from_state_dict_missing_or_misshapen_tensor_raises_value_error(name):
    cls = get(name)
    good = make_model(name).state_dict()
    for key in good:
        state = dict(good)
        del state[key]
        with pytest.raises(ValueError, match=f"not {NAMED[cls]} state_dict"):
            cls.from_state_dict(state)
    misshapen = {"gmf": "output.weight", "mf": "item_bias.weight", "neumf": "mlp.item_embedding.weight"}[name]
    state = dict(good)
    state[misshapen] = torch.zeros(good[misshapen].shape[0] + 1, good[misshapen].shape[1])
    with pytest.raises(ValueError, match=f"not {NAMED[cls]} state_dict"):
        cls.from_state_dict(state)
    with pytest.raises(ValueError, match=f"not {NAMED[cls]} state_dict"):
        cls.from_state_dict({k: v.tolist() for k, v in good.items()})
    with pytest.raises(ValueError, match=f"not {NAMED[cls]} state_dict"):
        cls.from_state_dict({})


# --- NeuMF.from_pretrained -----------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [0.5, 0.3, 0.0, 1.0])
@pytest.mark.parametrize("dropout", [0.0, 0.4])
def test_from_pretrained_mixes_the_two_logits(alpha, dropout):
    torch.manual_seed(3)
    gmf = GMF(N_USERS, N_ITEMS, 5)
    mlp = MLP(N_USERS, N_ITEMS, [12, 6, 4], dropout)
    with torch.no_grad():
        for param in [*gmf.parameters(), *mlp.parameters()]:
            param.normal_(std=0.7)
    neumf = NeuMF.from_pretrained(gmf, mlp, alpha)
    assert neumf.output.in_features == 5 + 4
    assert [layer.out_features for layer in neumf.mlp.tower] == [6, 4]
    assert neumf.mlp.dropout == dropout
    users, items = candidate_grid(7, 11, seed=1)
    expected = alpha * gmf.score(users, items) + (1 - alpha) * mlp.score(users, items)
    assert np.abs(expected).max() > 1.0  # not a degenerate check
    np.testing.assert_allclose(neumf.score(users, items), expected, rtol=1e-5, atol=1e-5)
    # the branches hold copies of the trained embeddings and towers
    for key, value in gmf.state_dict().items():
        if not key.startswith("output."):
            assert torch.equal(neumf.gmf.state_dict()[key], value), key
    for key, value in mlp.state_dict().items():
        if not key.startswith("output."):
            assert torch.equal(neumf.mlp.state_dict()[key], value), key


def test_from_pretrained_copies_rather_than_shares():
    gmf, mlp = GMF(N_USERS, N_ITEMS, 4), MLP(N_USERS, N_ITEMS, [8, 4])
    before = gmf.user_embedding.weight.clone(), mlp.tower[0].weight.clone()
    neumf = NeuMF.from_pretrained(gmf, mlp)
    with torch.no_grad():
        for param in neumf.parameters():
            param.add_(1.0)
    assert torch.equal(gmf.user_embedding.weight, before[0]) and torch.equal(mlp.tower[0].weight, before[1])


def test_pretrained_neumf_round_trips(tmp_path):
    gmf, mlp = make_model("gmf"), make_model("mlp", seed=1)
    neumf = NeuMF.from_pretrained(gmf, mlp, 0.5)
    torch.save(neumf.state_dict(), tmp_path / "neumf.pt")
    rebuilt = NeuMF.from_state_dict(torch.load(tmp_path / "neumf.pt", weights_only=True))
    users, items = candidate_grid()
    np.testing.assert_array_equal(rebuilt.score(users, items), neumf.score(users, items))


# --- score_all -----------------------------------------------------------------------------------

def dense_history(seed: int = 0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    x = (rng.random((N_USERS, N_ITEMS)) < 0.4).astype(np.float32)
    x[0] = 0.0  # a user with no history
    return sp.csr_matrix(x)


def every_model() -> dict:
    train = dense_history()
    models = {name: make_model(name, dropout=0.3 if name in ("mlp", "neumf") else 0.0) for name in NEURAL}
    models["ease"] = EASE(weights_for(train, 2.0), train)
    models["itempop"] = ItemPop(np.bincount(train.indices, minlength=N_ITEMS))
    return models


@pytest.mark.parametrize("name", NEURAL + ["ease", "itempop"])
def test_score_all_gathered_at_the_candidates_equals_score(name):
    model = every_model()[name]
    users = np.array([0, 6, 2, 2, 5])
    everything = model.score_all(users)
    assert isinstance(everything, torch.Tensor)
    assert everything.shape == (len(users), N_ITEMS) and everything.dtype == torch.float32
    _, items = candidate_grid(len(users), 7, seed=2)
    gathered = np.take_along_axis(everything.numpy(), items, axis=1)
    np.testing.assert_allclose(gathered, model.score(users, items), rtol=1e-5, atol=1e-5)
    # and against every item in one call
    np.testing.assert_allclose(everything.numpy(), model.score(users, np.tile(np.arange(N_ITEMS), (len(users), 1))),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NEURAL)
@pytest.mark.parametrize("training", [True, False])
def test_score_all_runs_in_eval_mode_and_keeps_the_mode(name, training):
    model = make_model(name, dropout=0.5)
    model.train(training)
    first = model.score_all(np.arange(N_USERS))
    assert model.training is training
    torch.testing.assert_close(model.score_all(np.arange(N_USERS)), first, rtol=0, atol=0)


def test_mf_score_all_matrix_product_equals_the_generic_one():
    model = make_model("mf")
    users = np.array([3, 0, 6, 3, 1])
    fast = model.score_all(users)
    generic = PairScorer.score_all(model, users)
    assert fast.shape == generic.shape == (len(users), N_ITEMS) and fast.dtype == generic.dtype == torch.float32
    torch.testing.assert_close(fast, generic, rtol=1e-5, atol=1e-5)
    assert generic.std() > 0.5  # the biases and factors all count


# --- EASE ----------------------------------------------------------------------------------------

def ease_by_hand(x: np.ndarray, lam: float) -> np.ndarray:
    """B = I - P diag(1/diag(P)), P = (X^T X + lam I)^-1, diagonal zeroed (Steck 2019, eq. 8)."""
    p = np.linalg.inv(x.T @ x + lam * np.eye(x.shape[1]))
    b = np.eye(x.shape[1]) - p @ np.diag(1.0 / np.diag(p))
    np.fill_diagonal(b, 0.0)
    return b


@pytest.mark.parametrize("lam", [0.5, 3.0, 300.0])
def test_ease_fit_matches_the_closed_form(lam):
    x = dense_history(seed=4).toarray().astype(np.float64)
    weights = weights_for(sp.csr_matrix(x), lam)
    assert weights.dtype == torch.float32 and weights.shape == (N_ITEMS, N_ITEMS)
    expected = ease_by_hand(x, lam)
    np.testing.assert_allclose(weights.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert np.all(np.diag(weights.numpy()) == 0.0)
    assert np.abs(expected).max() > 1e-3  # not an all-zero check


def test_ease_scores_are_history_times_weights():
    train = dense_history(seed=5)
    x = train.toarray().astype(np.float64)
    model = EASE(weights_for(train, 1.5), train)
    assert model.n_items == N_ITEMS
    expected = x @ ease_by_hand(x, 1.5)
    users = np.array([4, 0, 2, 4])
    np.testing.assert_allclose(model.score_all(users).numpy(), expected[users], rtol=1e-4, atol=1e-5)
    assert not model.score_all(np.array([0])).any()  # no history, no scores
    _, items = candidate_grid(4, 3, seed=6)
    scores = model.score(users, items)
    assert scores.dtype == np.float64
    np.testing.assert_allclose(scores, np.take_along_axis(expected[users], items, axis=1), rtol=1e-4, atol=1e-5)


def test_ease_fit_returns_the_checkpoint_for_its_section():
    train = dense_history(seed=4)
    state = EASE.fit(train, {"lambda": 3.0})
    assert set(state) == {"weights"}
    assert torch.equal(state["weights"], weights_for(train, 3.0))


def test_ease_refuses_too_many_items(monkeypatch):
    monkeypatch.setattr("pipeline.models.ease.MAX_EASE_ITEMS", N_ITEMS - 1)
    with pytest.raises(PipelineError, match=f"ease: {N_ITEMS} items.*GiB in float32.*Remove ease from 'models'"):
        EASE.fit(dense_history(), {"lambda": 1.0})
    assert MAX_EASE_ITEMS == 40_000  # ml-20m's 26,744 items fit (2.9 GB in float32)


def test_ease_float32_above_the_exact_limit_gives_the_same_ranks(monkeypatch):
    train = dense_history(seed=5)
    exact = weights_for(train, 2.0)
    monkeypatch.setattr("pipeline.models.ease.EXACT_EASE_ITEMS", N_ITEMS - 1)  # this matrix now goes float32
    single = weights_for(train, 2.0)
    torch.testing.assert_close(single, exact, rtol=1e-4, atol=1e-5)
    users = np.arange(train.shape[0])
    torch.testing.assert_close(EASE(single, train).score_all(users), EASE(exact, train).score_all(users),
                               rtol=1e-4, atol=1e-5)


def test_gram_matrix_in_chunks_equals_the_sparse_product():
    from pipeline.models.ease import gram_matrix
    train = dense_history(seed=6)
    expected = (train.T @ train).toarray()
    for max_entries in (1, 7, 1 << 26):
        np.testing.assert_array_equal(gram_matrix(train, max_entries=max_entries), expected)
        np.testing.assert_array_equal(gram_matrix(train, np.float32, max_entries=max_entries), expected)


def test_ease_score_gathers_the_same_scores_as_score_all():
    rng = np.random.default_rng(3)
    train = dense_history(seed=7)
    model = EASE(weights_for(train, 2.0), train)
    users = rng.permutation(train.shape[0])
    items = rng.integers(0, train.shape[1], size=(len(users), 5))
    expected = np.take_along_axis(model.score_all(users).numpy(), items, axis=1)
    for max_gathers in (1, 13, 1 << 24):  # one user per chunk, a few, all
        np.testing.assert_allclose(model.score(users, items, max_gathers=max_gathers), expected, rtol=1e-5,
                                   atol=1e-6)


def test_chunk_bounds_cover_everything_once_within_budget():
    from pipeline.models.ease import chunk_bounds
    rng = np.random.default_rng(0)
    for budget in (1, 5, 50):
        costs = rng.integers(0, 12, size=40)
        bounds = chunk_bounds(costs, budget)
        assert [lo for lo, _ in bounds][1:] == [hi for _, hi in bounds][:-1] and bounds[0][0] == 0
        assert bounds[-1][1] == len(costs) and all(hi > lo for lo, hi in bounds)
        # a chunk goes over the budget by at most one item's cost
        assert all(costs[lo:hi].sum() <= budget + costs[lo:hi].max() for lo, hi in bounds)
    assert chunk_bounds(np.array([], dtype=int), 5) == []


# --- the registry: every model built, saved and rebuilt the way the stages do it ------------------

LABELS = {"itempop": "ItemPop", "mlp": "MLP", "gmf": "GMF", "mf": "MF", "ease": "EASE", "neumf": "NeuMF",
          "sasrec": "SASRec"}


def test_registry_holds_exactly_the_seven_models():
    assert list_models() == ["ease", "gmf", "itempop", "mf", "mlp", "neumf", "sasrec"]
    assert {n: get(n) for n in list_models()} == {"itempop": ItemPop, "mlp": MLP, "gmf": GMF, "mf": MF, "ease": EASE,
                                                  "neumf": NeuMF, "sasrec": SASRec}
    with pytest.raises(PipelineError, match="no model 'bpr'"):
        get("bpr")
    assert label("bpr") == "bpr"  # an older run's model, whose module is gone
    for name in list_models():
        cls = get(name)
        assert cls.label == LABELS[name] == label(name)
        assert cls.neural is (name in ("mlp", "gmf", "mf", "neumf", "sasrec"))
        assert cls.always_trained is (name in ("itempop", "mlp"))
        assert cls.baseline is (name == "itempop")
        assert cls.top_level is (name == "mlp")
        assert cls.fused_from == (("gmf", "mlp") if name == "neumf" else ())
        assert callable(cls.from_state)
        assert callable(getattr(cls, "fit" if not cls.neural else "from_params"))


SECTIONS = {  # what params.model_section gives each model (the loop's knobs do not build a model)
    "mlp": {"layers": [16, 8, 4], "dropout": 0.2, "lr": 0.01, "weight_decay": 0.0, "epochs": 1, "batch_size": 8,
            "negatives": 1},
    "gmf": {"factors": 5, "lr": 0.01, "weight_decay": 0.0, "epochs": 1, "batch_size": 8, "negatives": 1},
    "mf": {"factors": 3, "lr": 0.01, "weight_decay": 0.0, "epochs": 1, "batch_size": 8, "negatives": 1},
    "ease": {"lambda": 2.0},
    "itempop": {},
}


def build_from_registry(name: str, train: sp.csr_matrix) -> tuple[object, dict]:
    """(a model, its checkpoint's state) for `name`, built as pipeline.train builds it."""
    cls = get(name)
    torch.manual_seed(5)
    if name == "neumf":
        gmf = GMF.from_params(N_USERS, N_ITEMS, SECTIONS["gmf"])
        mlp = MLP.from_params(N_USERS, N_ITEMS, SECTIONS["mlp"])
        model = NeuMF.from_pretrained(gmf, mlp, dropout=0.1)
        assert model.mlp.dropout == 0.1 and mlp.dropout == 0.2
    elif cls.neural:
        model = cls.from_params(N_USERS, N_ITEMS, SECTIONS[name])
    else:
        state = cls.fit(train, SECTIONS[name])
        return cls.from_state(state, train), state
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(std=0.7)
    return model, model.state_dict()


@pytest.mark.parametrize("name", sorted(set(list_models()) - {"sasrec"}))  # SASRec reads a History: test_sasrec.py
def test_every_model_round_trips_through_from_state(name, tmp_path):
    train = dense_history(seed=7)
    model, state = build_from_registry(name, train)
    assert type(model) is get(name)
    if name == "mlp":
        assert [layer.out_features for layer in model.tower] == [8, 4] and model.dropout == 0.2
    if name in ("gmf", "mf"):
        assert model.user_embedding.embedding_dim == SECTIONS[name]["factors"]
    if name == "itempop":
        np.testing.assert_array_equal(state["counts"].numpy(), np.asarray(train.sum(axis=0)).ravel())
    path = tmp_path / f"{name}.pt"
    torch.save(state, path)
    loaded = load_state(name, path)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    rebuilt = get(name).from_state(loaded, train)
    assert type(rebuilt) is type(model) and rebuilt.n_items == N_ITEMS
    if get(name).neural:
        assert rebuilt.training is False
    users, items = candidate_grid(6, 5, seed=3)
    scores = rebuilt.score(users, items)
    np.testing.assert_array_equal(scores, model.score(users, items))
    assert len(np.unique(scores)) > 1
    everyone = np.arange(N_USERS)
    torch.testing.assert_close(rebuilt.score_all(everyone), model.score_all(everyone), rtol=0, atol=0)
    via_load = load_model(name, path, train)
    np.testing.assert_array_equal(via_load.score(users, items), scores)


def test_load_state_and_load_model_errors(tmp_path):
    with pytest.raises(PipelineError, match="not found; run `dvc repro` to train gmf"):
        load_state("gmf", tmp_path / "gmf.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(PipelineError, match="junk.pt: not a readable model checkpoint"):
        load_state("mlp", tmp_path / "junk.pt")
    torch.save({"counts": torch.arange(N_ITEMS)}, tmp_path / "itempop.pt")
    with pytest.raises(PipelineError, match="not a valid mlp checkpoint"):
        load_model("mlp", tmp_path / "itempop.pt", dense_history())
    with pytest.raises(PipelineError, match="not a valid ease checkpoint"):
        load_model("ease", tmp_path / "itempop.pt", dense_history())


# --- full rankings: the decomposed first layer equals the generic forward path -----------------------

def randomised(model: PairScorer, seed: int = 0) -> PairScorer:
    """Every parameter (biases too) drawn at random, so each term of the scores moves them."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(std=0.5)
    return model.eval()


def forward_on_every_pair(model: PairScorer, users: np.ndarray) -> torch.Tensor:
    """[len(users), n_items] logits through forward(), one flat call over every (user, item) pair."""
    u = torch.as_tensor(users).repeat_interleave(N_ITEMS)
    i = torch.arange(N_ITEMS).repeat(len(users))
    with torch.no_grad():
        return model(u, i).reshape(len(users), N_ITEMS)


USERS_TWICE = np.array([6, 0, 3, 3, 1, 5, 2, 4])  # every user, one twice, out of order


@pytest.mark.parametrize("layers", [[6], [8, 4], [16, 8], [12, 10, 6, 4], [20, 16, 12, 8, 4]])
@pytest.mark.parametrize("max_elements", [1 << 24, 50])  # one block, and a block per user
def test_mlp_score_all_equals_forward_on_every_pair(layers, max_elements):
    model = randomised(MLP(N_USERS, N_ITEMS, layers, dropout=0.3))
    model.train()  # score_all switches to eval: dropout off
    expected = forward_on_every_pair(model.eval(), USERS_TWICE)
    model.train()
    got = model.score_all(USERS_TWICE, max_elements=max_elements)
    assert got.shape == (len(USERS_TWICE), N_ITEMS) and got.dtype == torch.float32 and model.training
    assert expected.std() > 0.1
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.score_block(torch.as_tensor(USERS_TWICE)).detach(), expected,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layers", [[6], [16, 8, 4], [12, 10, 6]])
@pytest.mark.parametrize("max_elements", [1 << 24, 50])
def test_neumf_score_all_equals_forward_on_every_pair(layers, max_elements):
    model = randomised(NeuMF(N_USERS, N_ITEMS, 5, layers, dropout=0.2), seed=1)
    expected = forward_on_every_pair(model, USERS_TWICE)
    got = model.score_all(USERS_TWICE, max_elements=max_elements)
    assert got.shape == (len(USERS_TWICE), N_ITEMS) and got.dtype == torch.float32
    assert expected.std() > 0.1
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # the GMF half alone moves the scores too (not an MLP-only check)
    with torch.no_grad():
        model.output.weight[0, :5] = 0.0
    torch.testing.assert_close(model.score_all(USERS_TWICE), forward_on_every_pair(model, USERS_TWICE),
                               rtol=1e-5, atol=1e-5)
    assert not torch.allclose(model.score_all(USERS_TWICE), got, atol=1e-3)


@pytest.mark.parametrize("name", ["gmf", "mf"])
def test_factor_models_score_all_equals_forward_on_every_pair(name):
    model = randomised(get(name)(N_USERS, N_ITEMS, 6), seed=2)
    expected = forward_on_every_pair(model, USERS_TWICE)
    assert expected.std() > 0.1
    torch.testing.assert_close(model.score_all(USERS_TWICE), expected, rtol=1e-5, atol=1e-5)


def test_mlp_dropout_draws_from_its_generator():
    model = randomised(MLP(N_USERS, N_ITEMS, [16, 16, 8], dropout=0.5)).train()
    users, items = torch.arange(N_USERS), torch.arange(N_USERS)
    outputs = []
    for global_seed in (0, 99):
        torch.manual_seed(global_seed)  # the global generator must not matter once one is set
        model.dropout_generator = torch.Generator().manual_seed(7)
        outputs.append(model(users, items))
    assert torch.equal(outputs[0], outputs[1])
    model.dropout_generator = torch.Generator().manual_seed(8)
    assert not torch.equal(model(users, items), outputs[0])
    with torch.no_grad():
        assert not torch.equal(model.eval()(users, items), outputs[0])  # the draws did drop units
    # inverted dropout: each kept activation is scaled by 1 / (1 - p), so the mean is unchanged
    x = torch.ones(200_000)
    model.train().dropout_generator = torch.Generator().manual_seed(0)
    dropped = model.drop(x, model.dropout)
    assert set(dropped.unique().tolist()) == {0.0, 2.0}
    assert abs(dropped.mean().item() - 1.0) < 0.01
