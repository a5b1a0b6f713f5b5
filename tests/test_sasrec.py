"""SASRec: causal attention, the input a user is scored from, and learning an order that MF cannot."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from pipeline.data import History, Split
from pipeline.metrics import heldout_rank, hit_ratio
from pipeline.models import get
from pipeline.models.mf import MF
from pipeline.models.sasrec import SASRec, last_items
from pipeline.training import FitConfig, fit

pytestmark = pytest.mark.usefixtures("one_thread")


def random_model(n_items: int = 20, max_len: int = 8, hidden: int = 16, blocks: int = 2, heads: int = 2,
                 seed: int = 0) -> SASRec:
    torch.manual_seed(seed)
    model = SASRec(n_items, max_len, hidden, blocks, heads, dropout=0.0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(std=0.5)
        model.item_embedding.weight[n_items].zero_()
    return model.eval()


def history_of(sequences: list[list[int]], n_items: int) -> History:
    """A History whose users have these item sequences (oldest first)."""
    indptr = np.concatenate([[0], np.cumsum([len(s) for s in sequences])])
    items = np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences]) if sequences else np.zeros(0, np.int64)
    rows = np.repeat(np.arange(len(sequences)), np.diff(indptr))
    matrix = sp.csr_matrix((np.ones(len(items), np.float32), (rows, items)), shape=(len(sequences), n_items))
    matrix.data[:] = 1.0
    return History(matrix, indptr, items)


def test_an_item_never_changes_the_output_at_earlier_positions() -> None:
    model = random_model()
    rng = np.random.default_rng(0)
    sequences = torch.as_tensor(rng.integers(0, 20, size=(6, 8)))
    sequences[:2, :3] = 20  # some left padding too
    base = model.encode(sequences)
    for t in range(8):
        changed = sequences.clone()
        changed[:, t] = (changed[:, t] + 7) % 20
        out = model.encode(changed)
        assert torch.equal(out[:, :t], base[:, :t]), t  # bit for bit: the future is masked, not down-weighted
        assert not torch.allclose(out[2:, t:], base[2:, t:])  # ... and the item itself does matter


def test_padding_is_masked_whatever_its_length() -> None:
    model = random_model(max_len=10)
    items = torch.tensor([[3, 5, 7, 11]])
    short = model.encode(torch.cat([torch.full((1, 2), 20), items], dim=1))  # 2 pads
    long = model.encode(torch.cat([torch.full((1, 6), 20), items], dim=1))  # 6 pads
    torch.testing.assert_close(short[:, -4:], long[:, -4:], rtol=1e-5, atol=1e-6)
    assert torch.isfinite(long).all()  # a padded position sees only itself: no all-masked row, no NaN


def test_last_items_truncates_from_the_left_and_pads() -> None:
    history = history_of([[1, 2, 3, 4, 5], [7], []], n_items=10)
    np.testing.assert_array_equal(last_items(history, np.array([0, 1, 2]), 3, pad=10),
                                  [[3, 4, 5], [10, 10, 7], [10, 10, 10]])
    np.testing.assert_array_equal(last_items(history, np.array([1, 0]), 6, pad=10),
                                  [[10, 10, 10, 10, 10, 7], [10, 1, 2, 3, 4, 5]])


def toy_split() -> Split:
    """Three users; train items in time order; then a validation and a test item each."""
    order = [[4, 2, 9], [1, 0], [5, 6, 7, 8]]
    indptr = np.concatenate([[0], np.cumsum([len(s) for s in order])])
    rows = np.repeat(np.arange(3), np.diff(indptr))
    items = np.concatenate(order)
    train = sp.csr_matrix((np.ones(len(items), np.float32), (rows, items)), shape=(3, 12))
    train.sort_indices()
    return Split(train, np.array([0, 1, 2]), np.array([3, 10, 11]), np.array([0, 1, 2]), np.array([7, 11, 0]),
                 train_order=items)


def test_the_test_input_is_the_train_items_in_time_order_then_the_validation_item() -> None:
    split = toy_split()
    test_input = split.history(val=True)
    assert [list(test_input.items[test_input.indptr[u]:test_input.indptr[u + 1]]) for u in range(3)] == \
        [[4, 2, 9, 3], [1, 0, 10], [5, 6, 7, 8, 11]]
    np.testing.assert_array_equal(last_items(test_input, np.arange(3), 4, pad=12),
                                  [[4, 2, 9, 3], [12, 1, 0, 10], [6, 7, 8, 11]])
    val_input = split.history(val=False)
    np.testing.assert_array_equal(last_items(val_input, np.arange(3), 4, pad=12),
                                  [[12, 4, 2, 9], [12, 12, 1, 0], [5, 6, 7, 8]])
    everything = split.history(val=True, test=True)
    assert list(everything.items[everything.indptr[0]:everything.indptr[1]]) == [4, 2, 9, 3, 7]
    # and what the model scores is exactly that input: its last position
    model = random_model(n_items=12, max_len=4)
    model.use_history(test_input)
    with torch.no_grad():
        state = model.encode(torch.as_tensor(last_items(test_input, np.arange(3), 4, pad=12)))[:, -1]
        expected = state @ model.item_embedding.weight[:12].T
    torch.testing.assert_close(model.score_all(np.arange(3)), expected)
    np.testing.assert_allclose(model.score(np.arange(3), np.array([[1, 2], [3, 4], [5, 6]])),
                               expected.gather(1, torch.tensor([[1, 2], [3, 4], [5, 6]])).numpy(), rtol=1e-5)


def successor_problem(n_items: int = 30, n_users: int = 120, length: int = 8, seed: int = 0):
    """Item i is always followed by i + 1 (modulo n_items): each user's items are a run of consecutive
    items from a random start; the validation item is the run's next one.

    Returns (train History, validation candidates). Each user's candidates are the next item, the item
    just before the run (as close to the run as the next one, but on the other side: only the order
    tells them apart), then 6 other items the user has not seen."""
    from pipeline.data import Candidates
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, n_items, n_users)
    runs = [[(s + k) % n_items for k in range(length)] for s in starts]
    train = history_of(runs, n_items)
    rows = []
    for start, run in zip(starts, runs):
        after, before = (start + length) % n_items, (start - 1) % n_items
        others = rng.permutation([i for i in range(n_items) if i not in run and i not in (after, before)])[:6]
        rows.append([after, before, *others])
    return train, Candidates(np.arange(n_users), np.array(rows))


def test_sasrec_learns_that_item_i_is_followed_by_i_plus_1_and_mf_does_not() -> None:
    train, val = successor_problem()
    n_items, users = 30, val.users
    torch.manual_seed(0)
    model = SASRec(n_items, max_len=10, hidden=32, blocks=1, heads=1, dropout=0.0)
    state, curve, _ = fit(model, train, val, FitConfig(seed=0, lr=0.01, weight_decay=0.0, epochs=30,
                                                        batch_size=32, negatives=1, topK=1))
    sasrec = SASRec.from_state(state, train)
    assert hit_ratio(heldout_rank(sasrec.score(users, val.items)), 1) > 0.95, curve[-5:]
    torch.manual_seed(0)
    mf = MF(len(users), n_items, 16)
    mf_state, mf_curve, _ = fit(mf, train.matrix, val, FitConfig(seed=0, lr=0.01, weight_decay=0.0, epochs=30,
                                                                  batch_size=32, negatives=4, topK=1))
    mf = MF.from_state_dict(mf_state)
    # the best epoch of an order-blind model: the next item and the one before the run look alike to it
    assert hit_ratio(heldout_rank(mf.score(users, val.items)), 1) < 0.75, mf_curve[-5:]


def test_sasrec_trains_with_the_papers_loss_too_and_is_seeded() -> None:
    train, val = successor_problem(n_users=40)
    states = []
    for _ in range(2):
        torch.manual_seed(3)
        model = SASRec(30, max_len=10, hidden=16, blocks=1, heads=2, dropout=0.3, loss="bce")
        state, curve, _ = fit(model, train, val, FitConfig(seed=3, lr=0.01, weight_decay=0.0, epochs=4,
                                                             batch_size=8, negatives=1, topK=1))
        assert curve[-1].loss < curve[0].loss  # binary cross-entropy against one negative per position falls
        states.append(state)
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])  # dropout drawn from the seed


def test_sasrec_is_in_the_registry_and_round_trips() -> None:
    assert get("sasrec") is SASRec
    model = random_model()
    history = history_of([[1, 2, 3], [4, 5], [6]], n_items=20)
    back = SASRec.from_state({k: v.clone() for k, v in model.state_dict().items()}, history)
    assert back.max_len == 8 and back.n_items == 20 and int(back.heads) == 2 and len(back.blocks) == 2
    model.use_history(history)
    torch.testing.assert_close(back.score_all(np.arange(3)), model.score_all(np.arange(3)))
    with pytest.raises(TypeError, match="time order"):
        SASRec.from_state(model.state_dict(), history.matrix)
    with pytest.raises(ValueError, match="not a SASRec state_dict"):
        SASRec.from_state({"item_embedding.weight": torch.zeros(3, 2)}, history)
    with pytest.raises(ValueError, match="multiple of heads"):
        SASRec(10, 4, hidden=10, blocks=1, heads=3)


@pytest.mark.parametrize("loss", ["ce", "bce"])
def test_no_loss_is_taken_where_the_input_is_padding(loss, monkeypatch) -> None:
    """Whatever the states at padding inputs hold (the final norm's bias, or anything else), every loss
    value is the same: no position is predicted from padding. Short users have such a position: the
    one before their first item, whose target is that (real) item."""
    from pipeline.models.sasrec import SequenceObjective

    n_items = 20
    train = history_of([[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [7, 8]], n_items)
    model = random_model(n_items=n_items, max_len=6).train()
    model.loss = loss
    cfg = FitConfig(seed=0, lr=0.01, weight_decay=0.0, epochs=1, batch_size=8, negatives=1, topK=1)
    objective = SequenceObjective(model, train, cfg, torch.device("cpu"))
    gens = type("Gens", (), {"order": torch.Generator().manual_seed(0), "negative": torch.Generator().manual_seed(1)})
    batch = next(objective.batches(gens))
    inputs, targets = batch[0], batch[1]
    assert ((inputs == n_items) & (targets != n_items)).any()  # the case at stake is in the batch
    base_loss, base_count = objective.loss(batch)
    encode = SASRec.encode

    def scrambled(self, items):
        states = encode(self, items)
        noise = torch.randn(states.shape, generator=torch.Generator().manual_seed(5)) * 100
        return torch.where((items == n_items)[..., None], noise, states)

    monkeypatch.setattr(SASRec, "encode", scrambled)
    loss_value, count = objective.loss(batch)
    assert int(count) == int(base_count) == int(((inputs != n_items) & (targets != n_items)).sum())
    torch.testing.assert_close(loss_value, base_loss)
