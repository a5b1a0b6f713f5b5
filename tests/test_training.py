"""The shared training loop (pipeline.training.fit), its epochs and negatives, the refit beside the
validation run (fit_and_refit), and the train stage's model builders (pipeline.train).

Toy problem: two user groups, each interacting only with one half of the items. Every neural model
must learn it (the loss falls, and at the kept epoch each user scores an own-half item it never
trained on above every item of the other half); the kept state is the earliest best epoch's; runs
are bit-for-bit reproducible; a NaN or infinite loss stops training with an error naming the epoch.
An epoch cut into chunks holds the same pairs as one chunk; negatives are uniform over the items a
user never interacted with; the refit run side by side gives the bytes of a refit run afterwards.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import pipeline.training as training
from pipeline.common import PipelineError, pick_device
from pipeline.data import Candidates, Split
from pipeline.models import get, list_models
from pipeline.models.ease import weights_for
from pipeline.models.gmf import GMF
from pipeline.models.mf import MF
from pipeline.models.mlp import MLP
from pipeline.models.neumf import NeuMF
from pipeline.sampling import ComplementSampler
from pipeline.train import EpochLog, build, checkpoint_paths, save_checkpoint, train_closed_form, train_neural
from pipeline.training import (CHUNK_PAIRS, EpochStats, FitConfig, Validation, epoch_chunks,
                               evaluate_ranking, fit, fit_and_refit, make_optimizer, positives,
                               seeded_generator)

N_USERS, N_ITEMS = 40, 30
HALF = N_ITEMS // 2


pytestmark = pytest.mark.usefixtures("one_thread")  # bit-for-bit reproducible, as in the train stage


def planted_problem(n_users: int = N_USERS, n_items: int = N_ITEMS, negatives: int = 5, seed: int = 0
                    ) -> tuple[sp.csr_matrix, Candidates, np.ndarray]:
    """Two user groups, each liking one half of the items; two liked items per user held out.

    Returns the train CSR, the validation candidates (column 0 a held-out liked item, the other
    columns `negatives` items of the other half, which nobody in the user's group interacted with),
    and each user's second held-out liked item (the "test" item: never trained on, never a
    validation candidate).
    """
    rng = np.random.default_rng(seed)
    half = n_items // 2
    dense = np.zeros((n_users, n_items), np.float32)
    val = np.empty(n_users, np.int64)
    test = np.empty(n_users, np.int64)
    others = np.empty((n_users, negatives), np.int64)
    for u in range(n_users):
        liked = np.arange(half) + (0 if u < n_users // 2 else half)
        val[u], test[u] = liked[u % half], liked[(u + 1) % half]
        dense[u, liked] = 1.0
        dense[u, [val[u], test[u]]] = 0.0
        others[u] = rng.choice(np.setdiff1d(np.arange(n_items), liked), negatives, replace=False)
    return sp.csr_matrix(dense), Candidates(np.arange(n_users), np.column_stack([val, others])), test


def own_half(n_users: int = N_USERS, n_items: int = N_ITEMS) -> np.ndarray:
    """[users, items]: True where the item is in the half the user's group likes."""
    first_group = np.arange(n_users)[:, None] < n_users // 2
    return np.where(first_group, np.arange(n_items) < n_items // 2, np.arange(n_items) >= n_items // 2)


def every_score(model) -> np.ndarray:
    return model.score(np.arange(N_USERS), np.tile(np.arange(N_ITEMS), (N_USERS, 1)))


def assert_prefers_own_half(model, test_items: np.ndarray) -> None:
    """Each user's held-out test item beats every item of the other half; own half above on average."""
    scores = every_score(model)
    own = own_half()
    other_best = np.where(own, -np.inf, scores).max(axis=1)
    test_scores = scores[np.arange(N_USERS), test_items]
    assert np.all(test_scores > other_best), np.flatnonzero(test_scores <= other_best)
    own_mean = scores[own].reshape(N_USERS, HALF).mean(axis=1)
    other_mean = scores[~own].reshape(N_USERS, HALF).mean(axis=1)
    assert np.all(own_mean > other_mean)


# --- the MLP on the toy problem (ported from the former train_mlp tests) --------------------------

TOY = FitConfig(seed=2, lr=0.01, weight_decay=0.0, epochs=20, batch_size=64, negatives=2, topK=1)
TOY_LAYERS = [16, 8]


def seeded_mlp(seed: int, layers=TOY_LAYERS, dropout: float = 0.0, n_users: int = N_USERS,
               n_items: int = N_ITEMS) -> MLP:
    torch.manual_seed(seed)
    return MLP(n_users, n_items, list(layers), dropout)


@pytest.fixture(scope="module")
def toy_run():
    torch.set_num_threads(1)
    train_csr, val, test = planted_problem()
    model = seeded_mlp(TOY.seed)
    state, curve, best_epoch = fit(model, train_csr, val, TOY)
    return train_csr, val, test, state, curve, best_epoch


def test_training_learns_the_planted_structure(toy_run):
    _, val, _, state, curve, best_epoch = toy_run
    assert [row.epoch for row in curve] == list(range(1, TOY.epochs + 1))
    assert all(isinstance(row, EpochStats) for row in curve)
    first, last = curve[0].loss, curve[-1].loss
    assert first == pytest.approx(np.log(2), abs=0.1)  # near-zero logits at the start
    assert last < 0.5 * first
    best = curve[best_epoch - 1]
    assert best.val_hr >= 0.8  # HR@1 against 5 items of the other half
    assert best.val_hr == max(row.val_hr for row in curve)
    # the kept state is the best epoch's, not the last one's, and lives on the CPU
    assert all(v.device.type == "cpu" for v in state.values())
    model = MLP.from_state_dict(state)
    hr, nd = evaluate_ranking(model, val, TOY.topK)
    assert (hr, nd) == pytest.approx((best.val_hr, best.val_ndcg))


def test_trained_model_prefers_its_groups_half(toy_run):
    _, _, _, state, _, _ = toy_run
    scores = every_score(MLP.from_state_dict(state))
    own = own_half()
    # on average, a user's own half scores above the other half, for every user
    assert np.all(scores[own].reshape(N_USERS, HALF).mean(1) > scores[~own].reshape(N_USERS, HALF).mean(1))


def test_best_epoch_is_the_earliest_best():
    train_csr, val, _ = planted_problem()
    _, curve, best_epoch = fit(seeded_mlp(TOY.seed), train_csr, val, FitConfig(**{**vars(TOY), "epochs": 4}))
    keys = [(row.val_hr, row.val_ndcg) for row in curve]
    assert best_epoch == 1 + keys.index(max(keys))


def test_kept_state_is_the_earliest_best_epochs(monkeypatch):
    """Scripted validation results: HR first, NDCG breaks ties, a later equal result does not win."""
    script = [(0.5, 0.3), (0.7, 0.2), (0.7, 0.4), (0.7, 0.4), (0.6, 0.9), (0.7, 0.4)]
    snapshots = []

    def scripted(model, cands, k):
        snapshots.append({key: v.clone() for key, v in model.state_dict().items()})
        return script[len(snapshots) - 1]

    monkeypatch.setattr(training, "evaluate_ranking", scripted)
    train_csr, val, _ = planted_problem(20, 16)
    model = seeded_mlp(0, n_users=20, n_items=16)
    state, curve, best_epoch = fit(model, train_csr, val, FitConfig(**{**vars(TOY), "epochs": len(script)}))
    assert [(row.val_hr, row.val_ndcg) for row in curve] == script
    assert best_epoch == 3
    for key, value in state.items():
        assert torch.equal(value, snapshots[2][key]), key
    # the model itself was trained on to the last epoch
    assert not torch.equal(model.state_dict()["user_embedding.weight"], state["user_embedding.weight"])


@pytest.mark.parametrize("select_by, best", [("sampled", 2), ("full", 3)])
def test_select_by_names_the_protocol_that_picks_the_epoch(monkeypatch, select_by, best):
    """Scripted validation: sampled HR peaks at epoch 2, full-ranking HR at epoch 3."""
    sampled, full = [0.5, 0.9, 0.6, 0.4], [0.3, 0.1, 0.4, 0.2]
    calls = []

    def scripted(self, model, k):
        calls.append(k)
        i = len(calls) - 1
        return EpochStats(0, math.nan, sampled[i], 0.1, full[i], 0.05)

    monkeypatch.setattr(Validation, "measure", scripted)
    train_csr, val, _ = planted_problem(20, 16)
    checker = Validation.of(val, train_csr, 0, 0)
    cfg = FitConfig(**{**vars(TOY), "epochs": 4, "select_by": select_by})
    _, curve, best_epoch = fit(seeded_mlp(0, n_users=20, n_items=16), train_csr, checker, cfg)
    assert best_epoch == best and [row.val_full_hr for row in curve] == full


def test_full_validation_ranks_every_unseen_item():
    """Validation.measure's full protocol equals full_ranks of the validation item against train."""
    from pipeline.metrics import full_ranks
    train_csr, val, _ = planted_problem(20, 16)
    model = seeded_mlp(0, n_users=20, n_items=16)
    row = Validation.of(val, train_csr, 0, 0).measure(model, 3)
    ranks = full_ranks(model.score_all, val.users, val.items[:, 0], train_csr)
    assert (row.val_full_hr, row.val_full_ndcg) == pytest.approx((np.mean(ranks < 3), np.mean(
        np.where(ranks < 3, 1 / np.log2(ranks + 2), 0))))
    assert Validation.of(val, train_csr, 5, 0).full_users.tolist() != list(range(20))  # a seeded sample of 5
    assert len(Validation.of(val, train_csr, 5, 0).full_users) == 5


@pytest.mark.parametrize("name", ["gmf", "mf", "mlp", "neumf"])  # SASRec's: test_sasrec.py
def test_training_is_deterministic(name):
    train_csr, val, _ = planted_problem(n_users=20, n_items=16)
    cfg = FitConfig(seed=7, lr=0.01, weight_decay=0.01, epochs=3, batch_size=64, negatives=2, topK=1)

    def run(seed):
        torch.manual_seed(seed)
        model = {"mlp": lambda: MLP(20, 16, [16, 8], 0.2), "gmf": lambda: GMF(20, 16, 4),
                 "mf": lambda: MF(20, 16, 4), "neumf": lambda: NeuMF(20, 16, 4, [16, 8], 0.2)}[name]()
        return fit(model, train_csr, val, FitConfig(**{**vars(cfg), "seed": seed}))

    state_a, curve_a, best_a = run(7)
    state_b, curve_b, best_b = run(7)
    assert best_a == best_b
    assert [(r.loss, r.val_hr, r.val_ndcg) for r in curve_a] == [(r.loss, r.val_hr, r.val_ndcg) for r in curve_b]
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key
    # and the seed matters
    state_c, curve_c, _ = run(8)
    assert [r.loss for r in curve_c] != [r.loss for r in curve_a]
    assert any(not torch.equal(state_a[key], state_c[key]) for key in state_a)


# --- every neural model learns the toy problem ---------------------------------------------------

LEARNERS = {  # (build, lr, epochs): small models, each fits in well under a second
    "mlp": (lambda: MLP(N_USERS, N_ITEMS, [16, 16]), 0.02, 15),
    "gmf": (lambda: GMF(N_USERS, N_ITEMS, 8), 0.01, 10),
    "mf": (lambda: MF(N_USERS, N_ITEMS, 8), 0.01, 10),
    "neumf": (lambda: NeuMF(N_USERS, N_ITEMS, 8, [16, 16]), 0.01, 10),
}


def toy_config(lr: float, epochs: int, seed: int = 0) -> FitConfig:
    return FitConfig(seed=seed, lr=lr, weight_decay=0.0, epochs=epochs, batch_size=64, negatives=2, topK=1)


def assert_loss_falls(curve: list[EpochStats]) -> None:
    losses = [row.loss for row in curve]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.5 * losses[0], losses
    assert max(losses[-3:]) < min(losses[:2]), losses


@pytest.mark.parametrize("name", sorted(LEARNERS))
def test_every_neural_model_learns_the_planted_preference(name):
    build, lr, epochs = LEARNERS[name]
    # validation candidates: the held-out item and EVERY item of the other half
    train_csr, val, test = planted_problem(negatives=HALF)
    torch.manual_seed(0)
    model = build()
    state, curve, best_epoch = fit(model, train_csr, val, toy_config(lr, epochs))
    assert [row.epoch for row in curve] == list(range(1, epochs + 1))
    assert_loss_falls(curve)
    assert curve[best_epoch - 1].val_hr == 1.0
    kept = get(name).from_state_dict(state)
    assert_prefers_own_half(kept, test)


def test_pretrained_neumf_learns_the_planted_preference():
    train_csr, val, test = planted_problem(negatives=HALF)
    torch.manual_seed(0)
    gmf = GMF(N_USERS, N_ITEMS, 8)
    gmf_state, gmf_curve, _ = fit(gmf, train_csr, val, toy_config(0.01, 5))
    torch.manual_seed(0)
    mlp = MLP(N_USERS, N_ITEMS, [16, 16])
    mlp_state, mlp_curve, _ = fit(mlp, train_csr, val, toy_config(0.02, 10))
    assert_loss_falls(gmf_curve)
    assert_loss_falls(mlp_curve)
    gmf.load_state_dict(gmf_state)
    mlp.load_state_dict(mlp_state)
    model = NeuMF.from_pretrained(gmf, mlp, alpha=0.5)
    # fused, before any fine-tuning: already ranks every validation item first
    assert evaluate_ranking(model, val, 1) == (1.0, 1.0)
    np.testing.assert_allclose(every_score(model), 0.5 * every_score(gmf) + 0.5 * every_score(mlp),
                               rtol=1e-5, atol=1e-5)
    torch.manual_seed(0)
    state, curve, best_epoch = fit(model, train_csr, val, toy_config(0.002, 5))
    losses = [row.loss for row in curve]
    assert losses[0] < gmf_curve[0].loss and losses[0] < mlp_curve[0].loss  # it starts trained
    assert losses[-1] < losses[0], losses  # and fine-tuning still lowers the loss
    assert curve[best_epoch - 1].val_hr == 1.0
    assert_prefers_own_half(NeuMF.from_state_dict(state), test)


# --- divergence ----------------------------------------------------------------------------------

@pytest.mark.parametrize("poison", ["nan", "inf"])
def test_non_finite_loss_stops_training_naming_the_epoch(poison, monkeypatch):
    train_csr, val, _ = planted_problem(20, 16)
    cfg = FitConfig(seed=0, lr=0.01, weight_decay=0.0, epochs=6, batch_size=64, negatives=2, topK=1)
    steps_per_epoch = math.ceil(train_csr.nnz * (1 + cfg.negatives) / cfg.batch_size)
    torch.manual_seed(0)
    model = GMF(20, 16, 4)
    original = model.forward
    steps = 0
    evaluated = []

    def forward(users, items):
        nonlocal steps
        out = original(users, items)
        if model.training:
            steps += 1
            if steps > 2 * steps_per_epoch:  # from the third epoch on
                # "inf": finite logits whose summed loss overflows float32 (inf, not NaN)
                out = out * math.nan if poison == "nan" else out * 0.0 - 1e38
        return out

    def count_evaluations(model, cands, k):
        evaluated.append(1)
        return 0.5, 0.5

    monkeypatch.setattr(model, "forward", forward)
    monkeypatch.setattr(training, "evaluate_ranking", count_evaluations)
    result = "not set"
    with pytest.raises(PipelineError, match=r"training diverged at epoch 3\b.*smaller lr \(now 0\.01\)"):
        result = fit(model, train_csr, val, cfg, name="gmf")
    assert result == "not set"  # nothing came back: no state of a diverged model
    assert steps == 3 * steps_per_epoch  # it stopped after the third epoch
    assert len(evaluated) == 2  # the diverged epoch was never evaluated


def test_nan_from_the_first_step_names_epoch_one(monkeypatch):
    train_csr, val, _ = planted_problem(20, 16)
    model = MF(20, 16, 4)
    original = model.forward
    monkeypatch.setattr(model, "forward", lambda u, i: original(u, i) * math.nan)
    with pytest.raises(PipelineError, match=r"^mf: training diverged at epoch 1 .*smaller lr"):
        fit(model, train_csr, val, toy_config(0.5, 3), name="mf")


# --- the helpers ---------------------------------------------------------------------------------

CPU = torch.device("cpu")


def one_epoch(train_csr: sp.csr_matrix, negatives: int, chunk_pairs: int, seed: int = 0, burn_in: int = 0
              ) -> tuple[list[tuple[int, int, float]], list[int]]:
    """Every (user, item, label) of an epoch (sorted: a multiset) and each chunk's size.

    The generators are seeded alike whatever the chunk size; `burn_in` epochs are drawn first with a
    huge chunk size, so that the compared epoch starts from generator states other than the seed's."""
    sampler = ComplementSampler(train_csr, CPU)
    pos_users, pos_items = positives(train_csr, CPU)
    order_gen, negative_gen = seeded_generator(seed, 3, CPU), seeded_generator(seed, 2, CPU)
    for _ in range(burn_in):
        for _chunk in epoch_chunks(pos_users, pos_items, sampler, negatives, 1 << 40, order_gen, negative_gen):
            pass
    chunks = list(epoch_chunks(pos_users, pos_items, sampler, negatives, chunk_pairs, order_gen, negative_gen))
    for users, items, labels in chunks:
        assert users.dtype == items.dtype == torch.int64 and labels.dtype == torch.float32
        assert len(users) == len(items) == len(labels)
    triples = [(u, i, y) for users, items, labels in chunks
               for u, i, y in zip(users.tolist(), items.tolist(), labels.tolist())]
    return sorted(triples), [len(c[0]) for c in chunks]


def test_an_epoch_pairs_every_interaction_with_fresh_negatives():
    train_csr, _, _ = planted_problem(20, 16)
    triples, sizes = one_epoch(train_csr, 3, CHUNK_PAIRS)
    n = train_csr.nnz
    assert sizes == [4 * n]  # a small epoch: one chunk
    pos = [(u, i) for u, i, y in triples if y == 1.0]
    neg = np.array([(u, i) for u, i, y in triples if y == 0.0])
    assert len(pos) == n and len(neg) == 3 * n and all(y in (0.0, 1.0) for *_, y in triples)
    assert sorted(pos) == sorted(zip(*(a.tolist() for a in train_csr.nonzero())))  # exactly the train pairs
    dense = train_csr.toarray()
    assert np.all(dense[neg[:, 0], neg[:, 1]] == 0)  # negatives never come from the user's train items
    np.testing.assert_array_equal(np.bincount(neg[:, 0], minlength=20), 3 * np.diff(train_csr.indptr))
    # the next epoch draws other negatives (the positives are the same)
    later, _ = one_epoch(train_csr, 3, CHUNK_PAIRS, burn_in=1)
    assert [t for t in later if t[2] == 1.0] == [t for t in triples if t[2] == 1.0]
    assert [t for t in later if t[2] == 0.0] != [t for t in triples if t[2] == 0.0]


def test_an_epoch_is_shuffled():
    train_csr, _, _ = planted_problem(20, 16)
    sampler = ComplementSampler(train_csr, CPU)
    pos_users, pos_items = positives(train_csr, CPU)
    (users, _, labels), = epoch_chunks(pos_users, pos_items, sampler, 3, CHUNK_PAIRS, seeded_generator(0, 3, CPU),
                                       seeded_generator(0, 2, CPU))
    assert not torch.equal(users, users.sort().values)  # not in user order
    n = train_csr.nnz
    assert 0 < labels[:n].sum() < n  # positives are mixed among the negatives, not first


@pytest.mark.parametrize("negatives", [1, 3, 7])
@pytest.mark.parametrize("chunk_pairs", [1, 2, 5, 8, 9, 33, 100])
@pytest.mark.parametrize("burn_in", [0, 2])
def test_a_chunked_epoch_holds_the_one_shot_epochs_pairs(negatives, chunk_pairs, burn_in):
    rng = np.random.default_rng(negatives)
    train_csr = sp.csr_matrix((rng.random((13, 17)) < 0.35).astype(np.float32))
    whole, whole_sizes = one_epoch(train_csr, negatives, 1 << 40, seed=5, burn_in=burn_in)
    chunked, sizes = one_epoch(train_csr, negatives, chunk_pairs, seed=5, burn_in=burn_in)
    assert whole_sizes == [train_csr.nnz * (1 + negatives)]
    assert chunked == whole  # the same multiset of (user, item, label)
    assert max(sizes) <= max(chunk_pairs, 1 + negatives)
    assert all(size % (1 + negatives) == 0 for size in sizes)  # a positive and its negatives stay together
    if chunk_pairs < train_csr.nnz:
        assert len(sizes) > 1


def test_negatives_are_uniform_over_the_complement():
    from scipy.stats import chisquare
    excluded = sp.csr_matrix(np.array([
        [1, 1, 0, 0, 0, 0, 0, 1, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # nothing excluded: all ten items
        [1, 1, 1, 1, 1, 1, 1, 1, 1, 0],  # one item left
        [0, 1, 0, 1, 0, 1, 0, 1, 0, 1],
    ], dtype=np.float32))
    sampler = ComplementSampler(excluded, CPU)
    users = torch.tensor([0, 1, 2, 3, 3])
    draws = sampler.draw(users, 20_000, seeded_generator(0, 2, CPU))
    assert draws.shape == (5, 20_000) and draws.dtype == torch.int64
    dense = excluded.toarray()
    for row, user in enumerate(users.tolist()):
        allowed = np.flatnonzero(dense[user] == 0)
        counts = np.bincount(draws[row].numpy(), minlength=10)
        assert counts[dense[user] == 1].sum() == 0, (user, counts)  # never an excluded item
        if len(allowed) > 1:
            assert chisquare(counts[allowed]).pvalue > 1e-4, (user, counts)
            share = counts[allowed] / counts.sum()
            assert np.abs(share - 1 / len(allowed)).max() < 0.02  # each allowed item: 1/len(allowed) of the draws
        else:
            assert counts[allowed[0]] == 20_000


def test_negative_sampler_matches_an_epochs_frequencies():
    """Over an epoch, a user's negatives spread evenly over the items they never interacted with."""
    from scipy.stats import chisquare
    train_csr, _, _ = planted_problem(20, 16)
    triples, _ = one_epoch(train_csr, 200, CHUNK_PAIRS)
    dense = train_csr.toarray()
    for user in (0, 7, 19):
        items = np.array([i for u, i, y in triples if u == user and y == 0.0])
        counts = np.bincount(items, minlength=16)
        assert counts[dense[user] == 1].sum() == 0
        assert chisquare(counts[dense[user] == 0]).pvalue > 1e-4


def test_negative_sampler_refuses_a_user_with_no_negative_item():
    excluded = sp.csr_matrix(np.array([[1, 0, 1], [1, 1, 1], [0, 0, 0], [1, 1, 1]], dtype=np.float32))
    with pytest.raises(PipelineError, match=r"user index 1 \(and 1 more\) interacted with every item"):
        ComplementSampler(excluded, CPU)
    ComplementSampler(excluded[[0, 2]], CPU)  # the others are fine
    # duplicates in the CSR count once
    dup = sp.csr_matrix((np.ones(3, np.float32), ([0, 0, 0], [1, 1, 0])), shape=(1, 3))
    assert ComplementSampler(dup, CPU).draw(torch.tensor([0]), 50, seeded_generator(0, 2, CPU)).eq(2).all()


def test_positives_lists_every_interaction():
    train_csr, _, _ = planted_problem(20, 16)
    users, items = positives(train_csr, CPU)
    assert users.dtype == items.dtype == torch.int64
    assert list(zip(users.tolist(), items.tolist())) == list(zip(*(a.tolist() for a in train_csr.nonzero())))


def test_seeded_generator_streams():
    def draw(seed, stream):
        return torch.rand(8, generator=seeded_generator(seed, stream, CPU))
    assert torch.equal(draw(3, 2), draw(3, 2))
    assert not torch.equal(draw(3, 2), draw(3, 3)) and not torch.equal(draw(3, 2), draw(4, 2))
    assert seeded_generator(0, 0, CPU).device == CPU


def test_fit_config_from_section():
    section = {"lr": 0.1, "weight_decay": 0.2, "epochs": 3, "batch_size": 4, "negatives": 5, "factors": 9}
    cfg = FitConfig.from_section(section, 11, 7)
    assert cfg == FitConfig(seed=11, lr=0.1, weight_decay=0.2, epochs=3, batch_size=4, negatives=5, topK=7)
    assert cfg.chunk_pairs == CHUNK_PAIRS


def test_fit_without_validation_keeps_the_last_epoch():
    train_csr, _, _ = planted_problem(20, 16)
    model = seeded_mlp(0, n_users=20, n_items=16)
    state, curve, kept = fit(model, train_csr, None, toy_config(0.01, 3))
    assert kept == 3 and [row.epoch for row in curve] == [1, 2, 3]
    assert all(math.isnan(row.val_hr) and math.isnan(row.val_ndcg) and math.isfinite(row.loss) for row in curve)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    # on_epoch returning False stops training
    seen = []
    model = seeded_mlp(0, n_users=20, n_items=16)
    state2, curve2, kept2 = fit(model, train_csr, None, toy_config(0.01, 5),
                                on_epoch=lambda epoch, m, best: seen.append((epoch, best)) or epoch < 2)
    assert seen == [(1, 1), (2, 2)] and kept2 == 2 and len(curve2) == 2
    assert [r.loss for r in curve2] == [r.loss for r in curve[:2]]  # the same run, stopped early


def test_the_chunk_size_does_not_change_a_one_chunk_fit():
    """With every pair in one chunk, fit's result does not depend on how large the chunk may be."""
    train_csr, val, _ = planted_problem(20, 16)
    a = fit(seeded_mlp(1, n_users=20, n_items=16), train_csr, val, toy_config(0.01, 2))
    b = fit(seeded_mlp(1, n_users=20, n_items=16), train_csr, val,
            FitConfig(**{**vars(toy_config(0.01, 2)), "chunk_pairs": train_csr.nnz * 3}))
    assert all(torch.equal(a[0][k], b[0][k]) for k in a[0]) and a[1] == b[1]
    # many chunks: other batches, but it still trains
    c = fit(seeded_mlp(1, n_users=20, n_items=16), train_csr, val,
            FitConfig(**{**vars(toy_config(0.01, 2)), "chunk_pairs": 10}))
    assert c[1][-1].loss < c[1][0].loss


# --- the live log of a validated run (pipeline.train.EpochLog, through DVCLive) --------------------

def live_files(live_dir) -> dict[str, bytes]:
    """Every file under a DVCLive directory: {path relative to it: its bytes}."""
    return {str(p.relative_to(live_dir)): p.read_bytes() for p in sorted(live_dir.rglob("*")) if p.is_file()}


def read_json(path) -> dict:
    import json
    return json.loads(path.read_text())


def test_epoch_log_writes_each_epoch_as_it_ends(tmp_path):
    live = tmp_path / "training" / "mlp"
    log = EpochLog(live)
    log(EpochStats(1, 0.6931, 0.3, 0.125, 0.05, 0.02))
    epoch_1 = {"plots/metrics/loss.tsv": b"step\tloss\n1\t0.6931\n", "plots/metrics/hr.tsv": b"step\thr\n1\t0.3\n",
               "plots/metrics/ndcg.tsv": b"step\tndcg\n1\t0.125\n", "plots/metrics/full/hr.tsv": b"step\thr\n1\t0.05\n",
               "plots/metrics/full/ndcg.tsv": b"step\tndcg\n1\t0.02\n"}
    files = live_files(live)
    assert files.pop("metrics.json") and files == epoch_1  # on disk as soon as the epoch ends
    # while training, metrics.json is DVCLive's summary of the latest epoch
    assert read_json(live / "metrics.json") == {"loss": 0.6931, "hr": 0.3, "ndcg": 0.125,
                                                "full": {"hr": 0.05, "ndcg": 0.02}, "step": 1}
    log(EpochStats(2, 0.51234567, 1 / 3, 0.0412345678, 0.1, 2 / 3))  # rounded to 6 decimals
    epoch_2 = {"plots/metrics/loss.tsv": b"step\tloss\n1\t0.6931\n2\t0.512346\n",
               "plots/metrics/hr.tsv": b"step\thr\n1\t0.3\n2\t0.333333\n",
               "plots/metrics/ndcg.tsv": b"step\tndcg\n1\t0.125\n2\t0.041235\n",
               "plots/metrics/full/hr.tsv": b"step\thr\n1\t0.05\n2\t0.1\n",
               "plots/metrics/full/ndcg.tsv": b"step\tndcg\n1\t0.02\n2\t0.666667\n"}
    files = live_files(live)
    assert files.pop("metrics.json") and files == epoch_2
    assert read_json(live / "metrics.json") == {"loss": 0.512346, "hr": 0.333333, "ndcg": 0.041235,
                                                "full": {"hr": 0.1, "ndcg": 0.666667}, "step": 2}
    # the end: the chosen epoch's validation metrics, no loss and no step; the curves as they were
    log.close(EpochStats(1, 0.6931, 0.3, 0.125, 0.05, 0.02), 1)
    files = live_files(live)
    assert files.pop("metrics.json") and files == epoch_2  # nothing else: no dvc.yaml, no report
    assert read_json(live / "metrics.json") == {"epoch": 1, "hr": 0.3, "ndcg": 0.125,
                                                "full": {"hr": 0.05, "ndcg": 0.02}}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["training"]  # nothing outside its directory


def test_epoch_log_writes_no_row_for_a_missing_value(tmp_path):
    # a closed-form model: one step, no loss
    log = EpochLog(tmp_path / "ease")
    row = EpochStats(1, math.nan, 0.5, 0.25, 0.125, 0.0625)
    log(row)
    log.close(row, None)
    assert live_files(tmp_path / "ease") == {
        "metrics.json": b'{\n  "hr": 0.5,\n  "ndcg": 0.25,\n  "full": {\n    "hr": 0.125,\n'
                        b'    "ndcg": 0.0625\n  }\n}\n',
        "plots/metrics/full/hr.tsv": b"step\thr\n1\t0.125\n", "plots/metrics/full/ndcg.tsv": b"step\tndcg\n1\t0.0625\n",
        "plots/metrics/hr.tsv": b"step\thr\n1\t0.5\n", "plots/metrics/ndcg.tsv": b"step\tndcg\n1\t0.25\n"}
    assert "epoch" not in read_json(tmp_path / "ease/metrics.json")  # close(row, None): no epoch
    # an epoch without full ranking (val_full_* NaN) writes no full row; none at all: no full/ file
    log = EpochLog(tmp_path / "gmf")
    log(EpochStats(1, 0.7, 0.5, 0.25))
    assert not (tmp_path / "gmf/plots/metrics/full").exists()
    log(EpochStats(2, 0.6, 0.75, 0.5, 0.125, 0.0625))
    log(EpochStats(3, 0.5, 0.5, 0.25))
    files = live_files(tmp_path / "gmf")
    assert files["plots/metrics/full/hr.tsv"] == b"step\thr\n2\t0.125\n"
    assert files["plots/metrics/full/ndcg.tsv"] == b"step\tndcg\n2\t0.0625\n"
    assert files["plots/metrics/hr.tsv"] == b"step\thr\n1\t0.5\n2\t0.75\n3\t0.5\n"
    assert files["plots/metrics/loss.tsv"] == b"step\tloss\n1\t0.7\n2\t0.6\n3\t0.5\n"
    log.close(EpochStats(2, 0.6, 0.75, 0.5, 0.125, 0.0625), 2)
    assert read_json(tmp_path / "gmf/metrics.json") == {"epoch": 2, "hr": 0.75, "ndcg": 0.5,
                                                        "full": {"hr": 0.125, "ndcg": 0.0625}}


def test_epoch_log_starts_afresh(tmp_path):
    """A rerun in the same directory: the former run's curves are gone, not appended to."""
    log = EpochLog(tmp_path / "mlp")
    for epoch in (1, 2, 3):
        log(EpochStats(epoch, 0.5, 0.5, 0.25, 0.125, 0.0625))
    log.close(EpochStats(1, 0.5, 0.5, 0.25, 0.125, 0.0625), 1)
    log = EpochLog(tmp_path / "mlp")  # now a closed-form model, say: no loss.tsv may stay behind
    log(EpochStats(1, math.nan, 0.25, 0.125, 0.0625, 0.03125))
    log.close(EpochStats(1, math.nan, 0.25, 0.125, 0.0625, 0.03125), None)
    files = live_files(tmp_path / "mlp")
    assert sorted(files) == ["metrics.json", "plots/metrics/full/hr.tsv", "plots/metrics/full/ndcg.tsv",
                             "plots/metrics/hr.tsv", "plots/metrics/ndcg.tsv"]
    assert files["plots/metrics/hr.tsv"] == b"step\thr\n1\t0.25\n"
    assert read_json(tmp_path / "mlp/metrics.json") == {"hr": 0.25, "ndcg": 0.125,
                                                        "full": {"hr": 0.0625, "ndcg": 0.03125}}


def test_fit_calls_on_row_once_per_validated_epoch_as_it_ends():
    train_csr, cands, _ = planted_problem(20, 16)
    val = Validation.of(cands, train_csr, 0, 0)  # both protocols, as in the train stage
    events = []
    _, curve, best = fit(seeded_mlp(0, n_users=20, n_items=16), train_csr, val, toy_config(0.01, 3),
                         on_row=lambda row: events.append(("row", row)),
                         on_epoch=lambda epoch, model, kept: events.append(("epoch", epoch)) or True)
    assert [kind for kind, _ in events] == ["row", "epoch"] * 3  # each row before its epoch's end
    rows = [row for kind, row in events if kind == "row"]
    assert rows == curve and all(a is b for a, b in zip(rows, curve))  # the curve's own rows
    assert [row.epoch for row in rows] == [1, 2, 3] and all(math.isfinite(row.loss) for row in rows)
    assert all(math.isfinite(row.val_hr) and math.isfinite(row.val_full_hr) for row in rows)
    # stopped early: the epochs it ran
    rows = []
    _, curve, _ = fit(seeded_mlp(0, n_users=20, n_items=16), train_csr, val, toy_config(0.01, 5), on_row=rows.append,
                      on_epoch=lambda epoch, model, kept: epoch < 2)
    assert rows == curve and len(rows) == 2
    # without validation (a refit) there is no validated epoch: never called
    rows = []
    _, curve, _ = fit(seeded_mlp(0, n_users=20, n_items=16), train_csr, None, toy_config(0.01, 2), on_row=rows.append)
    assert rows == [] and len(curve) == 2


def test_make_optimizer_is_fused_adam_over_every_parameter_of_small_tables():
    model = NeuMF(5, 6, 2, [4, 2])
    opt = make_optimizer(model, 0.01, 0.001, batch_size=4)  # every table has at most 8 x 4 rows: dense
    assert len(opt.optimizers) == 1
    adam = opt.optimizers[0]
    assert isinstance(adam, torch.optim.Adam)
    assert adam.defaults["lr"] == 0.01 and adam.defaults["weight_decay"] == 0.001 and adam.defaults["fused"]
    assert sum(len(g["params"]) for g in adam.param_groups) == len(list(model.parameters()))
    assert not any(m.sparse for m in model.modules() if isinstance(m, torch.nn.Embedding))


def test_make_optimizer_updates_large_tables_lazily():
    model = MLP(100, 12, [8, 4])  # at batch 2: the user table (100 rows > 16) is lazy, the item table not
    opt = make_optimizer(model, 0.01, 0.001, batch_size=2)
    adam, lazy = opt.optimizers
    assert isinstance(lazy, training.LazyAdam) and isinstance(adam, torch.optim.Adam)
    assert [id(p) for g in lazy.param_groups for p in g["params"]] == [id(model.user_embedding.weight)]
    assert model.user_embedding.sparse and not model.item_embedding.sparse
    assert sum(len(g["params"]) for g in adam.param_groups) == len(list(model.parameters())) - 1


def test_lazy_adam_equals_adamw_where_every_row_is_touched():
    """With a gradient on every row at every step, LazyAdam is AdamW (decoupled weight decay)."""
    torch.manual_seed(0)
    dense_table, lazy_table = torch.nn.Embedding(6, 3), torch.nn.Embedding(6, 3, sparse=True)
    lazy_table.load_state_dict(dense_table.state_dict())
    adam = torch.optim.AdamW(dense_table.parameters(), lr=0.05, weight_decay=0.01)
    lazy = training.LazyAdam(lazy_table.parameters(), lr=0.05, weight_decay=0.01)
    rows = torch.tensor([0, 1, 2, 3, 4, 5, 2, 5])  # repeated rows: their gradients add up
    target = torch.randn(8, 3)
    for _ in range(4):
        for table, opt in ((dense_table, adam), (lazy_table, lazy)):
            opt.zero_grad()
            ((table(rows) - target) ** 2).sum().backward()
            opt.step()
    torch.testing.assert_close(lazy_table.weight, dense_table.weight, rtol=1e-6, atol=1e-6)


def test_lazy_adam_leaves_untouched_rows_alone_but_for_the_decay():
    torch.manual_seed(0)
    table = torch.nn.Embedding(10, 3, sparse=True)
    before = table.weight.detach().clone()
    opt = training.LazyAdam(table.parameters(), lr=0.1, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        table(torch.tensor([1, 4])).sum().backward()
        opt.step()
    untouched = [i not in (1, 4) for i in range(10)]
    torch.testing.assert_close(table.weight[untouched], before[untouched])  # their decay is pending
    opt.flush()
    torch.testing.assert_close(table.weight[untouched], before[untouched] * (1 - 0.1 * 0.1) ** 3)
    assert not opt.state[table.weight]["exp_avg"][[0, 2, 3, 5]].any()


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_weight_decay_means_the_same_on_the_dense_and_the_lazy_path(kind):
    """The same model, value and batches: a table updated densely (fused AdamW / SGD) and lazily
    (LazyAdam / LazySGD) regularise alike. Rows no batch touches shrink by exactly (1 - lr wd) per
    step on both paths; with plain SGD (no momentum to tell the paths apart) every weight agrees."""
    torch.manual_seed(0)
    dense, lazy = seeded_mlp(0, layers=[8, 4], n_users=40, n_items=30), seeded_mlp(0, layers=[8, 4], n_users=40, n_items=30)
    opt_dense = make_optimizer(dense, 0.05, 0.2, batch_size=100, kind=kind)  # 40 rows <= 8 x 100: dense
    opt_lazy = make_optimizer(lazy, 0.05, 0.2, batch_size=2, kind=kind)  # 40 rows > 8 x 2: lazy
    assert lazy.user_embedding.sparse and not dense.user_embedding.sparse
    before = dense.user_embedding.weight.detach().clone()
    users, items = torch.randint(0, 20, (64,)), torch.randint(0, 30, (64,))  # users 20..39 never train
    labels = (torch.rand(64) < 0.5).float()
    steps = 5
    for model, opt in ((dense, opt_dense), (lazy, opt_lazy)):
        for step in range(steps):
            lo = 16 * (step % 4)
            opt.zero_grad()
            torch.nn.functional.binary_cross_entropy_with_logits(model(users[lo:lo + 16], items[lo:lo + 16]),
                                                                 labels[lo:lo + 16]).backward()
            opt.step()
        opt.flush()
    shrunk = before[20:] * (1 - 0.05 * 0.2) ** steps
    for model in (dense, lazy):
        torch.testing.assert_close(model.user_embedding.weight[20:], shrunk)
    if kind == "sgd":
        for key, value in dense.state_dict().items():
            torch.testing.assert_close(lazy.state_dict()[key], value)


def test_pick_device():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(PipelineError, match="no CUDA device"):
            pick_device("cuda")


# --- fit_and_refit: the validation run and the refit side by side ---------------------------------

def refit_problem():
    """(train, train + validation, validation candidates) of a small planted problem."""
    train_csr, val, test = planted_problem(20, 16)
    split = Split(train_csr, val.users, val.items[:, 0], np.arange(20), test)
    return train_csr, split.train_and_val(), val


REFIT_CFG = FitConfig(seed=4, lr=0.01, weight_decay=0.001, epochs=4, batch_size=32, negatives=2, topK=1)


def make_refit_model(refit: bool) -> MLP:
    torch.manual_seed(11)
    return MLP(20, 16, [8, 6, 4], dropout=0.3)


def scripted_validation(monkeypatch, best: int) -> None:
    """Validation results with their best at epoch `best` (HR 0.5 elsewhere)."""
    calls = []

    def scripted(model, cands, k):
        calls.append(1)
        return (0.9, 0.5) if len(calls) == best else (0.5, 0.5 - 0.01 * len(calls))

    monkeypatch.setattr(training, "evaluate_ranking", scripted)


@pytest.fixture(params=["fork", "thread"])
def refit_path(request, monkeypatch):
    """fit_and_refit's CPU path: a forked process, or the thread used where fork is not available."""
    import multiprocessing
    if request.param == "fork":
        assert "fork" in multiprocessing.get_all_start_methods()
    else:
        monkeypatch.setattr(training.mp, "get_all_start_methods", lambda: [])
    started = []
    real_thread_start = training.threading.Thread.start
    monkeypatch.setattr(training.threading.Thread, "start",
                        lambda self: started.append("thread") or real_thread_start(self))
    yield request.param
    assert started == ([] if request.param == "fork" else ["thread"])


@pytest.mark.parametrize("best", [1, 2, 4])
def test_fit_and_refit_equals_a_sequential_refit(refit_path, monkeypatch, best):
    train_csr, refit_on, val = refit_problem()
    scripted_validation(monkeypatch, best)
    refit_state, chosen, curve, best_epoch = fit_and_refit(make_refit_model, train_csr, refit_on, val, REFIT_CFG,
                                                           CPU, "mlp")
    assert best_epoch == best and len(curve) == REFIT_CFG.epochs
    # the validation-chosen state: as a plain fit with validation gives it
    scripted_validation(monkeypatch, best)
    plain, plain_curve, plain_best = fit(make_refit_model(False), train_csr, val, REFIT_CFG, CPU, "mlp")
    assert plain_best == best and [r.loss for r in plain_curve] == [r.loss for r in curve]
    assert chosen.keys() == plain.keys() and all(torch.equal(chosen[k], plain[k]) for k in plain)
    # the refit: byte-identical to a fit on train + validation for `best` epochs, one after the other
    sequential, _, kept = fit(make_refit_model(True), refit_on, None,
                              FitConfig(**{**vars(REFIT_CFG), "epochs": best}), CPU, "mlp")
    assert kept == best
    assert refit_state.keys() == sequential.keys()
    for key in sequential:
        assert refit_state[key].dtype == sequential[key].dtype
        assert refit_state[key].numpy().tobytes() == sequential[key].numpy().tobytes(), key
    # and it is a refit: other data than the validation run's
    assert not torch.equal(refit_state["user_embedding.weight"], chosen["user_embedding.weight"])


def test_fit_and_refit_passes_on_row_to_the_validated_run_only(refit_path):
    import os
    import threading
    train_csr, refit_on, val = refit_problem()
    rows, callers = [], set()

    def on_row(row):
        rows.append(row)
        callers.add((os.getpid(), threading.get_ident()))

    refit_state, chosen, curve, best = fit_and_refit(make_refit_model, train_csr, refit_on, val, REFIT_CFG, CPU, "mlp",
                                                     on_row=on_row)
    assert len(rows) == REFIT_CFG.epochs and rows == curve  # the validated run's rows, not the refit's too
    assert [row.epoch for row in rows] == list(range(1, REFIT_CFG.epochs + 1))
    assert all(math.isfinite(row.val_hr) for row in rows)  # validated: a refit's rows have no validation
    assert callers == {(os.getpid(), threading.get_ident())}  # the validated run, in the caller's thread
    # the validated run as a plain fit gives it, without the callback
    plain, plain_curve, plain_best = fit(make_refit_model(False), train_csr, val, REFIT_CFG, CPU, "mlp")
    assert plain_best == best and plain_curve == curve and all(torch.equal(chosen[k], plain[k]) for k in plain)


def poisoned(model: MLP, poison: bool) -> MLP:
    if poison:
        original = model.forward
        model.forward = lambda users, items: original(users, items) * math.nan
    return model


def test_a_nan_in_the_refit_raises(refit_path):
    train_csr, refit_on, val = refit_problem()
    with pytest.raises(PipelineError, match=r"^mlp \(refit\): training diverged at epoch 1 .*smaller lr"):
        fit_and_refit(lambda refit: poisoned(make_refit_model(refit), refit), train_csr, refit_on, val, REFIT_CFG,
                      CPU, "mlp")


def test_a_nan_in_the_validation_run_raises_and_stops_the_refit(refit_path):
    train_csr, refit_on, val = refit_problem()
    with pytest.raises(PipelineError, match=r"^mlp: training diverged at epoch 1 "):
        fit_and_refit(lambda refit: poisoned(make_refit_model(refit), not refit), train_csr, refit_on, val,
                      REFIT_CFG, CPU, "mlp")


# --- a failed refit ends the run: never a hang ---------------------------------------------------

def failing(how: str):
    """make_model for fit_and_refit whose refit model fails in its first training step, `how`."""
    import os
    import signal

    def fail():
        if how == "exception":
            raise ValueError("a bug in the model")
        if how == "interrupt":
            raise KeyboardInterrupt
        if how == "oom":  # a real allocation that cannot succeed: 2^46 floats
            torch.empty(1 << 46, dtype=torch.float32)
        if how == "sigkill":  # what the kernel's out-of-memory killer does to a process
            os.kill(os.getpid(), signal.SIGKILL)

    def make(refit: bool) -> MLP:
        model = make_refit_model(refit)
        if refit:
            original = model.forward
            model.forward = lambda users, items: fail() or original(users, items)
        return model
    return make


def assert_fails_at_once(how: str, in_process: bool | None = None) -> None:
    import time
    train_csr, refit_on, val = refit_problem()
    long_run = FitConfig(**{**vars(REFIT_CFG), "epochs": 5000})  # minutes, if the failure went unnoticed
    start = time.perf_counter()
    with pytest.raises(PipelineError) as info:
        fit_and_refit(failing(how), train_csr, refit_on, val, long_run, CPU, "mlp", in_process=in_process)
    assert time.perf_counter() - start < 30
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("mlp: the refit on train + validation failed (") and message.endswith(
        "); no checkpoint was written"), message
    expected = {"exception": "ValueError: a bug in the model", "interrupt": "KeyboardInterrupt",
                "oom": "RuntimeError", "sigkill": "its process was killed by signal 9"}[how]
    assert expected in message, message


@pytest.mark.parametrize("how", ["exception", "interrupt", "oom"])
def test_a_failed_refit_ends_the_run_at_once_with_one_line(refit_path, how):
    assert_fails_at_once(how)


def test_a_killed_refit_process_ends_the_run_at_once_with_one_line():
    """SIGKILL, as the out-of-memory killer sends it (a thread cannot be killed alone: the process path)."""
    assert_fails_at_once("sigkill", in_process=True)


def test_the_refit_stage_fails_cleanly_and_writes_no_checkpoint(prepared):
    """The train stage whose refit process is killed: exit 2, one line naming the model and the refit,
    no checkpoint, within 30 seconds."""
    import subprocess
    import sys
    import time

    from conftest import REPO, set_params, stage
    set_params(prepared, epochs=3000, batch_size=64)  # long enough to notice a hang
    assert stage("sample_negatives", "data/prepared", "data/candidates", cwd=prepared).returncode == 0
    script = (  # the stage's own main, with a refit that dies as an out-of-memory kill would make it
        "import os, signal, sys\n"
        "import pipeline.training as training\n"
        "real_fit = training.fit\n"
        "def fit(model, train, val, *args, **kwargs):\n"
        "    if val is None: os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real_fit(model, train, val, *args, **kwargs)\n"
        "training.fit = fit\n"
        "from pipeline.common import run_stage\n"
        "from pipeline.train import main\n"
        "sys.argv = ['train', 'mlp', 'data/prepared', 'data/candidates', 'data/models', 'metrics/training']\n"
        "run_stage(main)\n")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", script], cwd=prepared, capture_output=True, text=True, timeout=60,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert time.perf_counter() - start < 30
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: mlp: the refit on train + validation failed (its process was killed by signal 9: "
                      "out of memory?); no checkpoint was written"], proc.stderr
    assert not list((prepared / "data").glob("models/mlp*")) and not (prepared / "metrics/training/mlp").exists()
    assert not [p for p in prepared.glob("metrics/**/*") if p.is_file()]  # no log, not even a partial one


@pytest.mark.parametrize("failure, code", [("PipelineError('stopped at epoch 2')", 2), ("KeyboardInterrupt", 130)])
def test_the_train_stage_logs_live_and_a_failure_leaves_no_log(prepared, failure, code):
    """The stage writes each epoch's row as it ends (a reader sees epochs 1 and 2 during the run); when
    the run then fails (an error, or Ctrl-C), metrics/training/mlp/ is removed and no checkpoint written."""
    import json
    import subprocess
    import sys

    from conftest import REPO, set_params, stage
    set_params(prepared, epochs=4, batch_size=64, layers=[16, 8])
    assert stage("sample_negatives", "data/prepared", "data/candidates", cwd=prepared).returncode == 0
    script = (  # the stage's own main, with a look at its live log after each epoch, failing after epoch 2
        "import json, sys\n"
        "from pathlib import Path\n"
        "import pipeline.train as train\n"
        "from pipeline.common import PipelineError, run_stage\n"
        "log_row = train.EpochLog.__call__\n"
        "def seen(self, row):\n"
        "    log_row(self, row)\n"
        "    live = Path('metrics/training/mlp')\n"
        "    print(json.dumps({'epoch': row.epoch, 'files': {str(p.relative_to(live)): p.read_text()\n"
        "        for p in sorted(live.rglob('*')) if p.is_file()}}), flush=True)\n"
        f"    if row.epoch == 2: raise {failure}\n"
        "train.EpochLog.__call__ = seen\n"
        "sys.argv = ['train', 'mlp', 'data/prepared', 'data/candidates', 'data/models', 'metrics/training']\n"
        "run_stage(train.main)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=prepared, capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == code and "Traceback" not in proc.stderr, proc.stderr
    if code == 2:
        assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == ["error: stopped at epoch 2"]
    seen = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [s["epoch"] for s in seen] == [1, 2]
    for s in seen:
        files, epoch = s["files"], s["epoch"]
        assert sorted(files) == ["metrics.json", "plots/metrics/full/hr.tsv", "plots/metrics/full/ndcg.tsv",
                                 "plots/metrics/hr.tsv", "plots/metrics/loss.tsv", "plots/metrics/ndcg.tsv"]
        for path, text in files.items():
            if path.endswith(".tsv"):
                header, *rows = text.splitlines()
                assert header == f"step\t{path.rsplit('/', 1)[-1][:-4]}"
                assert [int(r.split("\t")[0]) for r in rows] == list(range(1, epoch + 1))  # every epoch so far
                assert all(0 < float(r.split("\t")[1]) < 1 for r in rows if "loss" not in path)
        summary = json.loads(files["metrics.json"])  # DVCLive's, of the latest epoch
        assert summary["step"] == epoch
        assert f"{epoch}\t{summary['hr']}" == files["plots/metrics/hr.tsv"].splitlines()[-1]
    assert not (prepared / "metrics/training/mlp").exists()
    assert not [p for p in prepared.glob("metrics/**/*") if p.is_file()]
    assert not list((prepared / "data").glob("models/mlp*"))


# --- dropout draws from the run's own generator ----------------------------------------------------

def test_dropout_is_deterministic_whatever_the_global_generator():
    train_csr, val, _ = planted_problem(20, 16)
    cfg = FitConfig(seed=3, lr=0.01, weight_decay=0.0, epochs=2, batch_size=32, negatives=2, topK=1)
    states = []
    for global_seed, dropout in ((1, 0.3), (2, 0.3), (3, 0.0)):
        model = seeded_mlp(5, layers=[16, 8, 4], dropout=dropout, n_users=20, n_items=16)
        torch.manual_seed(global_seed)  # the global generator: other draws each time
        states.append(fit(model, train_csr, val, cfg)[0])
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert any(not torch.equal(states[0][k], states[2][k]) for k in states[0])  # dropout 0.3 did drop


# --- the train stage's builders (pipeline.train) -------------------------------------------------

def stage_params(refit: bool = True) -> dict:
    loop = {"lr": 0.01, "weight_decay": 0.0, "epochs": 3, "batch_size": 64, "negatives": 2}
    return {
        "seed": 3, "topK": 1, "refit": refit, "select_by": "sampled",
        **loop, "layers": [8, 4], "dropout": 0.1,  # the MLP's: top-level keys
        "gmf": {**loop, "factors": 4},
        "mf": {**loop, "factors": 4},
        "neumf": {**loop, "dropout": 0.2},
        "ease": {"lambda": 5.0},
        "sasrec": {**loop, "max_len": 6, "hidden": 8, "blocks": 1, "heads": 2, "dropout": 0.1, "loss": "ce"},
    }


def stage_split() -> tuple[Split, Validation]:
    train_csr, val, test = planted_problem(20, 16)
    # time order within each user: the train items in reverse id order (any fixed order will do)
    order = np.concatenate([train_csr.indices[lo:hi][::-1] for lo, hi in zip(train_csr.indptr, train_csr.indptr[1:])])
    split = Split(train_csr, val.users, val.items[:, 0], np.arange(20), test, train_order=order)
    return split, Validation.of(val, train_csr, 0, 0)


def train_sources(split: Split, val: Candidates, params: dict, models_dir) -> None:
    """gmf and mlp checkpoints (test-time and train-only) in models_dir, as their stages write them."""
    for source in ("gmf", "mlp"):
        state, train_only, _, _ = train_neural(source, split, val, params, CPU, models_dir)
        test_path, train_only_path = checkpoint_paths(models_dir, source)
        save_checkpoint(test_path, state)
        save_checkpoint(train_only_path, train_only)


@pytest.mark.parametrize("refit", [True, False])
@pytest.mark.parametrize("name", [name for name in list_models() if get(name).neural])
def test_train_neural_equals_its_parts(name, refit, tmp_path):
    split, val = stage_split()
    params = stage_params(refit)
    if name == "neumf":
        train_sources(split, val, params, tmp_path)
    state, train_only, curve, best = train_neural(name, split, val, params, CPU, tmp_path)
    assert len(curve) == 3 and 1 <= best <= 3
    model = get(name).from_state(train_only, split.history(val=False))
    assert evaluate_ranking(model, val.sampled, 1) == pytest.approx((curve[best - 1].val_hr, curve[best - 1].val_ndcg))
    measured = val.measure(model, 1)  # both protocols of the kept epoch, as the curve has them
    assert (measured.val_full_hr, measured.val_full_ndcg) == pytest.approx(curve[best - 1].key("full"))
    section = params[name] if name != "mlp" else params
    cfg = FitConfig.from_section(section, params["seed"], params["topK"])
    # the validated run: a plain fit of the freshly built (train-only sources') model
    chosen, plain_curve, plain_best = fit(build(name, split, params, tmp_path, False), split.history(val=False), val,
                                          cfg)
    assert plain_best == best and all(torch.equal(train_only[k], chosen[k]) for k in chosen)
    if not refit:
        assert state is train_only
        return
    # the test-time model: a fit on train + validation for the chosen number of epochs, from the refitted sources
    fresh = build(name, split, params, tmp_path, True)
    if name == "neumf":
        gmf = GMF.from_state_dict(torch.load(tmp_path / "gmf.pt", weights_only=True))
        assert torch.equal(fresh.gmf.user_embedding.weight, gmf.user_embedding.weight)
        assert fresh.mlp.dropout == 0.2
        other = build(name, split, params, tmp_path, False)
        assert not torch.equal(other.gmf.user_embedding.weight, gmf.user_embedding.weight)
    expected, _, _ = fit(fresh, split.history(val=True), None, FitConfig(**{**vars(cfg), "epochs": best}))
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)
    assert any(not torch.equal(state[k], train_only[k]) for k in state)
    # the same params give the same bits
    again, again_only, _, _ = train_neural(name, split, val, params, CPU, tmp_path)
    assert all(torch.equal(state[k], again[k]) and torch.equal(train_only[k], again_only[k]) for k in state)


def test_train_neumf_without_its_sources_is_a_clear_error(tmp_path):
    split, val = stage_split()
    with pytest.raises(PipelineError, match="gmf.trainonly.pt: not found; run `dvc repro` to train gmf"):
        train_neural("neumf", split, val, stage_params(), CPU, tmp_path)


@pytest.mark.parametrize("refit", [True, False])
def test_train_closed_form(refit):
    split, val = stage_split()
    params = stage_params(refit)
    both = split.train_and_val()
    state, train_only, curve, best = train_closed_form("itempop", split, val, params)
    np.testing.assert_array_equal(train_only["counts"].numpy(), np.asarray(split.train.sum(axis=0)).ravel())
    seen = both if refit else split.train
    np.testing.assert_array_equal(state["counts"].numpy(), np.asarray(seen.sum(axis=0)).ravel())
    assert best == 1 and len(curve) == 1 and math.isnan(curve[0].loss)
    state, train_only, curve, best = train_closed_form("ease", split, val, params)
    assert torch.equal(train_only["weights"], weights_for(split.train, 5.0))
    assert torch.equal(state["weights"], weights_for(seen, 5.0))
    assert best == 1 and math.isnan(curve[0].loss)
    assert curve[0].val_hr == 1.0  # EASE finds the planted groups too
    if refit:
        assert not torch.equal(state["weights"], train_only["weights"])
