"""The one training loop every neural model shares, and the helpers around it.

An epoch visits every train interaction once, in a seeded random order, in chunks of at most
`chunk_pairs` training pairs: each chunk's positives get `negatives` items their user has not
interacted with, drawn afresh on the training device, and the chunk's pairs are shuffled and cut
into batches (slices of tensors: no per-sample Python). So an epoch's memory is bounded by the
chunk, whatever the data's size, and nothing is copied to or from the host per step.

Fused Adam minimises binary cross-entropy. After each epoch HR@topK and NDCG@topK on the
validation candidates decide which epoch's weights are kept (the earliest best HR, then NDCG).
`refit` trains a fresh model the same way on train plus validation for a given number of epochs
(the one picked on validation). A NaN or infinite loss stops training: no diverged checkpoint is
ever kept.
"""
from __future__ import annotations

import csv
import io
import logging
import math
import multiprocessing as mp
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import scipy.sparse as sp
import torch

from pipeline.common import PipelineError
from pipeline.data import Candidates, matrix_of
from pipeline.metrics import heldout_rank, hit_ratio, ndcg

log = logging.getLogger("training")

NEGATIVE_STREAM, ORDER_STREAM, DROPOUT_STREAM, SHUFFLE_STREAM = 2, 3, 4, 5  # random streams of `seed`
CHUNK_PAIRS = 1 << 21  # training pairs built at a time: about 40 MB, whatever the data's size


@dataclass
class FitConfig:
    """What the loop needs: the optimiser's settings, the sampling, the selection metric."""

    seed: int
    lr: float
    weight_decay: float
    epochs: int
    batch_size: int
    negatives: int
    topK: int
    chunk_pairs: int = CHUNK_PAIRS

    @classmethod
    def from_section(cls, section: dict, seed: int, k: int) -> "FitConfig":
        """The loop's settings from a model's params section (the MLP's: the top-level keys)."""
        return cls(seed, section["lr"], section.get("weight_decay", 0.0), section["epochs"], section["batch_size"],
                   section.get("negatives", 1), k)


@dataclass
class EpochStats:
    """One row of the training curve (val_hr and val_ndcg are NaN when there is no validation)."""

    epoch: int
    loss: float
    val_hr: float
    val_ndcg: float


def seeded_generator(seed: int, stream: int, device: torch.device) -> torch.Generator:
    """A torch generator on `device` for one independent random stream of `seed`."""
    state = int(np.random.SeedSequence([seed, stream]).generate_state(1, np.uint64)[0] >> np.uint64(1))
    return torch.Generator(device=device).manual_seed(state)


class LazyAdam(torch.optim.Optimizer):
    """Adam for embedding tables with sparse gradients: a step moves only the rows the batch touched.

    For those rows it is Adam with L2 weight decay (the decay is added to the gradient, as in
    torch.optim.Adam), with the step count shared by the table, as TensorFlow's LazyAdam. Rows not
    in the batch keep their weights and moments, so a step costs O(batch), not O(table): a 20M
    interaction table's step costs about what a 100K one's does.
    """

    def __init__(self, params, lr: float, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad.coalesce()
                rows, values = grad.indices()[0], grad.values()
                if group["weight_decay"]:
                    values = values + group["weight_decay"] * param[rows]
                state = self.state[param]
                if not state:
                    state["step"], state["exp_avg"], state["exp_avg_sq"] = 0, torch.zeros_like(param), torch.zeros_like(param)
                state["step"] += 1
                exp_avg = state["exp_avg"][rows].mul_(beta1).add_(values, alpha=1 - beta1)
                exp_avg_sq = state["exp_avg_sq"][rows].mul_(beta2).addcmul_(values, values, value=1 - beta2)
                state["exp_avg"][rows], state["exp_avg_sq"][rows] = exp_avg, exp_avg_sq
                denom = (exp_avg_sq / (1 - beta2 ** state["step"])).sqrt_().add_(group["eps"])
                param.index_add_(0, rows, exp_avg / denom, alpha=-group["lr"] / (1 - beta1 ** state["step"]))


class _Optimizers:
    """Several optimizers stepped as one."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = list(optimizers)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()


LAZY_ROWS_PER_BATCH = 8  # a table with more rows than this many batches' pairs is updated lazily


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, batch_size: int) -> _Optimizers:
    """Fused Adam, except LazyAdam for embedding tables of more than LAZY_ROWS_PER_BATCH x batch_size rows.

    Fused Adam updates every tensor in one kernel (about 4x less optimiser time per step on CPU
    than plain Adam), but it reads and writes a whole table at every step: at ml-20m's 138,493
    users that made an MLP step 11 times slower than at ml-100k's 943. A large table is switched to
    sparse gradients and LazyAdam, which moves only the rows a batch touched. A small one stays
    dense (LazyAdam's bookkeeping costs more than it saves there, and dense Adam also moves the
    rows a batch missed, by their momentum).
    """
    tables = [module for module in model.modules()
              if isinstance(module, torch.nn.Embedding) and module.num_embeddings > LAZY_ROWS_PER_BATCH * batch_size
              and getattr(model, "lazy_tables", True)]  # SASRec's item table is also its output layer: dense
    for table in tables:
        table.sparse = True
    lazy = {id(table.weight) for table in tables}
    dense = [p for p in model.parameters() if id(p) not in lazy]
    optimizers = [torch.optim.Adam(dense, lr=lr, weight_decay=weight_decay, fused=True)] if dense else []
    if tables:
        optimizers.append(LazyAdam([table.weight for table in tables], lr=lr, weight_decay=weight_decay))
    return _Optimizers(*optimizers)


class NegativeSampler:
    """Draw items a user has not interacted with, uniformly, as tensors on one device.

    A rank r in [0, allowed items) is mapped to the r-th item outside the user's row of the
    excluded matrix with one searchsorted (the same mapping as pipeline.sampling.ComplementSampler):
    no rejection loop, and the cost is linear in the number of draws.
    """

    def __init__(self, excluded: sp.csr_matrix, device: torch.device):
        excluded = excluded.tocsr()
        excluded.sum_duplicates()
        excluded.sort_indices()
        self.n_items = excluded.shape[1]
        indptr = excluded.indptr.astype(np.int64)
        counts = np.diff(indptr)
        rows = np.repeat(np.arange(excluded.shape[0], dtype=np.int64), counts)
        local = np.arange(excluded.nnz, dtype=np.int64) - indptr[rows]
        keys = rows * (self.n_items + 1) + excluded.indices.astype(np.int64) - local  # sorted
        self.indptr = torch.from_numpy(indptr).to(device)
        self.keys = torch.from_numpy(keys).to(device)
        self.allowed = torch.from_numpy(self.n_items - counts).to(device)
        short = np.flatnonzero(self.n_items - counts < 1)
        if len(short):
            raise PipelineError(f"user index {short[0]} (and {len(short) - 1} more) interacted with every item: "
                                "there is no negative to sample")

    def sample(self, users: torch.Tensor, per_user: int, gen: torch.Generator) -> torch.Tensor:
        """Return [len(users), per_user] items, each uniform over the user's non-interacted items."""
        allowed = self.allowed[users][:, None]
        uniform = torch.rand((len(users), per_user), generator=gen, device=users.device, dtype=torch.float64)
        ranks = torch.minimum((uniform * allowed).long(), allowed - 1)
        query = users[:, None] * (self.n_items + 1) + ranks
        below = torch.searchsorted(self.keys, query, right=True) - self.indptr[users][:, None]
        return ranks + below


def positives(train: sp.csr_matrix, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (users, items) of every interaction in `train`, as int64 tensors on `device`."""
    train = train.tocsr()
    users = np.repeat(np.arange(train.shape[0], dtype=np.int64), np.diff(train.indptr))
    return torch.from_numpy(users).to(device), torch.from_numpy(train.indices.astype(np.int64)).to(device)


def epoch_chunks(pos_users: torch.Tensor, pos_items: torch.Tensor, sampler: NegativeSampler, negatives: int,
                 chunk_pairs: int, order_gen: torch.Generator, negative_gen: torch.Generator,
                 shuffle_gen: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield one epoch as shuffled (users, items, labels) chunks of at most max(chunk_pairs, 1 + negatives) pairs.

    The positives are visited in one random order; each chunk takes the next positives, draws their
    negatives from `negative_gen` (so the epoch's pairs do not depend on the chunk size), and shuffles.
    """
    per_chunk = max(1, chunk_pairs // (1 + negatives))
    device = pos_users.device
    order = torch.randperm(len(pos_users), generator=order_gen, device=device)
    for lo in range(0, len(order), per_chunk):
        picked = order[lo:lo + per_chunk]
        users, items = pos_users[picked], pos_items[picked]
        negative_items = sampler.sample(users, negatives, negative_gen)
        all_users = torch.cat([users, users.repeat_interleave(negatives)])
        all_items = torch.cat([items, negative_items.reshape(-1)])
        labels = torch.zeros(len(all_users), dtype=torch.float32, device=device)
        labels[:len(users)] = 1.0
        shuffle = torch.randperm(len(all_users), generator=shuffle_gen or order_gen, device=device)
        yield all_users[shuffle], all_items[shuffle], labels[shuffle]


@dataclass
class Generators:
    """The training run's random streams: the order of the examples, the negatives, the shuffles."""

    order: torch.Generator
    negative: torch.Generator
    shuffle: torch.Generator


class PairObjective:
    """What the loop optimises for a (user, item) model: binary cross-entropy on every train pair
    plus `negatives` sampled negatives per positive, batches cut from the epoch's chunks."""

    def __init__(self, model: torch.nn.Module, train, cfg: FitConfig, device: torch.device):
        matrix = matrix_of(train)
        self.model, self.cfg = model, cfg
        self.sampler = NegativeSampler(matrix, device)
        self.users, self.items = positives(matrix, device)
        self.loss_fn = torch.nn.BCEWithLogitsLoss(reduction="sum")

    def batches(self, gens: Generators) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        size = self.cfg.batch_size
        for users, items, labels in epoch_chunks(self.users, self.items, self.sampler, self.cfg.negatives,
                                                 self.cfg.chunk_pairs, gens.order, gens.negative, gens.shuffle):
            for lo in range(0, len(labels), size):
                yield users[lo:lo + size], items[lo:lo + size], labels[lo:lo + size]

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """(summed loss, number of examples) of one batch."""
        users, items, labels = batch
        return self.loss_fn(self.model(users, items), labels), len(labels)


def evaluate_ranking(model, cands: Candidates, k: int) -> tuple[float, float]:
    """Return (HR@k, NDCG@k) of the model on a candidate set."""
    ranks = heldout_rank(model.score(cands.users, cands.items))
    return hit_ratio(ranks, k), ndcg(ranks, k)


def _state_on_cpu(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: v.detach().to("cpu", copy=True) for key, v in model.state_dict().items()}


def fit(model: torch.nn.Module, train: sp.csr_matrix, val: Candidates | None, cfg: FitConfig,
        device: torch.device = torch.device("cpu"), name: str = "model",
        on_epoch: Callable[[int, torch.nn.Module, int], bool] | None = None,
        ) -> tuple[dict[str, torch.Tensor], list[EpochStats], int]:
    """Train `model` in place for cfg.epochs; return (kept state on the CPU, per-epoch curve, kept epoch).

    `train` is a History (or a binary CSR, for the models that need no order). The model's `objective`
    (PairObjective unless the model names another, as SASRec does) says what a batch is and its loss.

    With validation candidates the kept state is the best epoch's; with `val` None (a refit) it is the
    last. `on_epoch(epoch, model, kept_epoch)`, if given, is called after each epoch; training stops when
    it returns False. Every random draw comes from generators of cfg.seed owned by this call (dropout's too), so
    two calls may run at once in two threads and give the same bits as one after the other.
    """
    gens = Generators(seeded_generator(cfg.seed, ORDER_STREAM, device),
                      seeded_generator(cfg.seed, NEGATIVE_STREAM, device),
                      seeded_generator(cfg.seed, SHUFFLE_STREAM, device))  # apart: an epoch's pairs don't depend on chunks
    model.to(device)
    dropout_gen = seeded_generator(cfg.seed, DROPOUT_STREAM, device)  # one stream for every dropout layer
    for module in model.modules():
        if hasattr(module, "dropout_generator"):
            module.dropout_generator = dropout_gen
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, cfg.batch_size)
    objective = (getattr(model, "objective", None) or PairObjective)(model, train, cfg, device)
    if val is not None and hasattr(model, "use_history"):
        model.use_history(train)  # a sequence model scores the validation item from the train sequence
    k = cfg.topK
    curve: list[EpochStats] = []
    best_state, best_key, best_epoch = None, (-1.0, -1.0), 0
    for epoch in range(1, cfg.epochs + 1):
        start = time.perf_counter()
        model.train()
        total = torch.zeros((), dtype=torch.float64, device=device)
        count = torch.zeros((), dtype=torch.float64, device=device)
        for batch in objective.batches(gens):
            loss, n = objective.loss(batch)
            optimizer.zero_grad(set_to_none=True)
            (loss / n).backward()
            optimizer.step()
            total += loss.detach()
            count += n
        mean_loss = float(total) / max(float(count), 1.0)
        if not math.isfinite(mean_loss):
            raise PipelineError(
                f"{name}: training diverged at epoch {epoch} (loss is {mean_loss}); try a smaller lr "
                f"(now {cfg.lr}). No checkpoint was written."
            )
        if val is None:
            curve.append(EpochStats(epoch, mean_loss, math.nan, math.nan))
            log.info("%s epoch %d: loss %.4f (%.1f s)", name, epoch, mean_loss, time.perf_counter() - start)
            if on_epoch is not None and not on_epoch(epoch, model, epoch):
                break
            continue
        hr, nd = evaluate_ranking(model, val, k)
        curve.append(EpochStats(epoch, mean_loss, hr, nd))
        if (hr, nd) > best_key:
            best_key, best_epoch = (hr, nd), epoch
            best_state = _state_on_cpu(model)
        log.info("%s epoch %d: loss %.4f, val HR@%d %.4f, NDCG@%d %.4f (%.1f s)",
                 name, epoch, mean_loss, k, hr, k, nd, time.perf_counter() - start)
        if on_epoch is not None and not on_epoch(epoch, model, best_epoch):
            break
    if val is None:
        return _state_on_cpu(model), curve, len(curve)
    return best_state, curve, best_epoch


def _refit_worker(model: torch.nn.Module, refit_on: sp.csr_matrix, cfg: FitConfig, device: torch.device, name: str,
                  inbox: Callable[[bool], tuple[str, int] | None], send: Callable[[tuple], None]) -> None:
    """Run a refit for up to cfg.epochs, keeping the states the validation run may still choose.

    Messages from the validation run: ('floor', e), no epoch before e can be chosen any more;
    ('stop', e), epoch e was chosen (0: the validation run failed). Sends ('state', arrays of the
    state after epoch e) or ('error', message).
    """
    floor, stop = 1, None
    states: dict[int, dict[str, np.ndarray]] = {}

    def read(block: bool = False) -> None:
        nonlocal floor, stop
        while stop is None and (message := inbox(block)) is not None:
            kind, epoch = message
            if kind == "floor":
                floor = epoch
                for old in [e for e in states if e < floor]:
                    del states[old]
            else:
                stop = epoch

    def keep(epoch: int, refit_model: torch.nn.Module, _: int) -> bool:
        read()
        if epoch >= floor and (stop is None or epoch <= stop):
            states[epoch] = {k: v.numpy() for k, v in _state_on_cpu(refit_model).items()}
        return stop is None or epoch < stop

    try:
        fit(model, refit_on, None, cfg, device, name, on_epoch=keep)
        read(block=True)
        send(("state", states.get(stop)))
    except PipelineError as err:
        send(("error", str(err)))


def _die_with_parent() -> None:
    """In a forked child: be killed when the parent dies (Linux), so no orphan keeps training."""
    try:
        import ctypes
        import signal
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _forked_refit(conn, *args) -> None:
    _die_with_parent()
    _refit_worker(*args, inbox=lambda block: conn.recv() if block or conn.poll() else None, send=conn.send)


def fit_and_refit(make_model: Callable[[bool], torch.nn.Module], train: sp.csr_matrix, refit_on: sp.csr_matrix,
                  val: Candidates, cfg: FitConfig, device: torch.device = torch.device("cpu"), name: str = "model"
                  ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[EpochStats], int]:
    """Choose the epoch on validation, and refit on `refit_on` for that many epochs, side by side.

    `make_model(refit)` builds a fresh, seeded model. The refit is a second `fit` with the same seed
    and no validation, running at the same time (in a forked process on the CPU with one intra-op
    thread, as in the stages; otherwise a thread, since a child forked after torch's OpenMP pool has
    run with more threads hangs in its first parallel operation):
    its state after epoch e equals a refit stopped at e, so the state after the chosen epoch is kept.
    On two cores the pair takes the time of one run; each uses one thread, so the bits do not depend
    on the core count or on which of the two is ahead.
    Returns (refitted state, validation-chosen state, validation curve, chosen epoch).
    """
    models = make_model(False), make_model(True)  # built one after the other: the seed's draws are fixed
    args = (models[1], refit_on, cfg, device, f"{name} (refit)")
    if device.type == "cpu" and torch.get_num_threads() == 1 and "fork" in mp.get_all_start_methods():
        here, there = mp.get_context("fork").Pipe()
        worker = mp.get_context("fork").Process(target=_forked_refit, args=(there, *args), daemon=True)
        tell, receive = here.send, here.recv
    else:
        inbox, outbox = queue.Queue(), queue.Queue()

        def take(block: bool):
            try:
                return inbox.get(block)
            except queue.Empty:
                return None
        worker = threading.Thread(target=_refit_worker, args=(*args, take, outbox.put), daemon=True)
        tell, receive = inbox.put, outbox.get
    worker.start()
    best = 0
    try:
        state, curve, best = fit(models[0], train, val, cfg, device, name,
                                 on_epoch=lambda epoch, model, kept: tell(("floor", kept)) or True)
    finally:
        tell(("stop", best))  # the refit stops once it has reached the chosen epoch (at once on an error)
        try:
            kind, payload = receive()
        except EOFError:
            kind, payload = "error", f"{name}: the refit process ended without a result"
        worker.join()
    if kind == "error":
        raise PipelineError(payload)
    return {k: torch.from_numpy(v) for k, v in payload.items()}, state, curve, best


def curve_csv(curve: list[EpochStats]) -> str:
    """Return the training curve as CSV text (epoch, loss, val_hr, val_ndcg); loss may be empty."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["epoch", "loss", "val_hr", "val_ndcg"])
    for row in curve:
        loss = "" if math.isnan(row.loss) else f"{row.loss:.6f}"
        writer.writerow([row.epoch, loss, f"{row.val_hr:.6f}", f"{row.val_ndcg:.6f}"])
    return buf.getvalue()
