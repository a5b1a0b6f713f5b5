"""The shared training loop (pipeline.training.fit) and the train stage's model builders.

Toy problem: two user groups, each interacting only with one half of the items. Every neural model
must learn it (the loss falls, and at the kept epoch each user scores an own-half item it never
trained on above every item of the other half); the kept state is the earliest best epoch's; runs
are bit-for-bit reproducible; a NaN or infinite loss stops training with an error naming the epoch.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import pipeline.training as training
from pipeline.common import PipelineError
from pipeline.data import Candidates
from pipeline.models import EASE, GMF, MF, MLP, MODEL_CLASSES, NeuMF
from pipeline.sampling import ComplementSampler
from pipeline.train import train_closed_form, train_neural
from pipeline.training import (EpochStats, FitConfig, curve_csv, epoch_data, evaluate_ranking, fit, make_optimizer,
                               pick_device)

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


@pytest.mark.parametrize("name", sorted(MODEL_CLASSES))
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
    kept = MODEL_CLASSES[name].from_state_dict(state)
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

def test_epoch_data_pairs_every_interaction_with_fresh_negatives():
    train_csr, _, _ = planted_problem(20, 16)
    sampler = ComplementSampler(train_csr)
    rng = np.random.default_rng(0)
    users, items, labels = epoch_data(train_csr, sampler, 3, rng)
    n = train_csr.nnz
    assert users.dtype == items.dtype == torch.int64 and labels.dtype == torch.float32
    assert len(users) == len(items) == len(labels) == 4 * n
    assert labels[:n].eq(1).all() and labels[n:].eq(0).all()
    dense = train_csr.toarray()
    u, i = users.numpy(), items.numpy()
    assert np.all(dense[u[:n], i[:n]] == 1)  # the positives are exactly the train pairs
    assert sorted(zip(u[:n].tolist(), i[:n].tolist())) == sorted(zip(*train_csr.nonzero()))
    assert np.all(dense[u[n:], i[n:]] == 0)  # negatives never come from the user's train items
    np.testing.assert_array_equal(np.bincount(u[n:], minlength=20), 3 * np.diff(train_csr.indptr))
    # the next epoch draws other negatives
    _, items2, _ = epoch_data(train_csr, sampler, 3, rng)
    assert not torch.equal(items2[n:], items[n:])


def test_curve_csv():
    text = curve_csv([EpochStats(1, 0.6931, 0.25, 0.125), EpochStats(2, math.nan, 1.0, 1 / 3)])
    assert text == "epoch,loss,val_hr,val_ndcg\n1,0.693100,0.250000,0.125000\n2,,1.000000,0.333333\n"


def test_make_optimizer_is_fused_adam_over_every_parameter():
    model = NeuMF(5, 6, 2, [4, 2])
    opt = make_optimizer(model, 0.01, 0.001)
    assert isinstance(opt, torch.optim.Adam)
    assert opt.defaults["lr"] == 0.01 and opt.defaults["weight_decay"] == 0.001 and opt.defaults["fused"]
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_pick_device():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(PipelineError, match="no CUDA device"):
            pick_device("cuda")


# --- the train stage's builders (pipeline.train) -------------------------------------------------

def stage_params() -> dict:
    loop = {"lr": 0.01, "weight_decay": 0.0, "epochs": 2, "batch_size": 64, "negatives": 2}
    return {
        "seed": 3, "topK": 1,
        "mlp": {**loop, "layers": [8, 4], "dropout": 0.0},
        "gmf": {**loop, "factors": 4},
        "mf": {**loop, "factors": 4},
        "neumf": {**loop, "factors": 4, "layers": [8, 4], "dropout": 0.0, "pretrain": True,
                  "pretrain_lr": 0.01, "pretrain_epochs": 3},
        "ease": {"lambda": 5.0},
    }


@pytest.mark.parametrize("name", sorted(MODEL_CLASSES))
def test_train_neural_builds_trains_and_returns_a_loadable_state(name):
    train_csr, val, _ = planted_problem(20, 16)
    params = stage_params()
    state, curve, best, extra = train_neural(name, train_csr, val, params, torch.device("cpu"))
    assert len(curve) == 2 and 1 <= best <= 2
    model = MODEL_CLASSES[name].from_state_dict(state)
    assert evaluate_ranking(model, val, 1) == pytest.approx((curve[best - 1].val_hr, curve[best - 1].val_ndcg))
    if name == "neumf":
        assert set(extra["pretrained"]) == {"gmf", "mlp"}
        for branch in ("gmf", "mlp"):
            assert 1 <= extra["pretrained"][branch]["best_epoch"] <= 3
            assert 0.0 <= extra["pretrained"][branch]["val_hr"] <= 1.0
    else:
        assert extra == {}
    # the same params give the same bits
    again, _, _, _ = train_neural(name, train_csr, val, params, torch.device("cpu"))
    assert all(torch.equal(state[key], again[key]) for key in state)


def test_train_closed_form():
    train_csr, val, _ = planted_problem(20, 16)
    params = stage_params()
    state, curve, best, extra = train_closed_form("itempop", train_csr, val, params)
    np.testing.assert_array_equal(state["counts"].numpy(), np.asarray(train_csr.sum(axis=0)).ravel())
    assert best == 1 and extra == {} and len(curve) == 1 and math.isnan(curve[0].loss)
    state, curve, best, _ = train_closed_form("ease", train_csr, val, params)
    assert torch.equal(state["weights"], EASE.fit(train_csr, 5.0))
    assert best == 1 and math.isnan(curve[0].loss)
    assert curve[0].val_hr == 1.0  # EASE finds the planted groups too
