"""The one training loop every neural model shares, and the helpers around it.

An epoch visits every train interaction once, in a seeded random order, in chunks of at most
`chunk_pairs` training pairs: each chunk's positives get `negatives` items their user has not
interacted with, drawn afresh on the training device, and the chunk's pairs are shuffled and cut
into batches (slices of tensors: no per-sample Python). So an epoch's memory is bounded by the
chunk, whatever the data's size, and nothing is copied to or from the host per step.

Fused AdamW (decoupled weight decay; or SGD, for NeuMF's fine-tuning) minimises binary cross-entropy.
After each epoch HR@topK and NDCG@topK on the validation users, by the protocol `select_by` names
(the sampled candidates, or full ranking), decide which epoch's weights are kept (the earliest
best HR, then NDCG); both protocols are measured and written to the curve.
`refit` trains a fresh model the same way on train plus validation for a given number of epochs
(the one picked on validation). A NaN or infinite loss stops training: no diverged checkpoint is
ever kept.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import multiprocessing as mp
import threading
import time
from typing import Callable, Iterator

import numpy as np
import scipy.sparse as sp
import torch

from pipeline.common import PipelineError
from pipeline.data import Candidates, History, matrix_of
from pipeline.metrics import full_rank_sample, full_ranks, heldout_rank, hit_ratio, ndcg
from pipeline.models import Model
from pipeline.sampling import ComplementSampler

log = logging.getLogger("training")

NEGATIVE_STREAM, ORDER_STREAM, DROPOUT_STREAM, SHUFFLE_STREAM = 2, 3, 4, 5  # random streams of `seed`
CHUNK_PAIRS = 1 << 21  # training pairs built at a time: about 40 MB, whatever the data's size


@dataclasses.dataclass
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
    optimizer: str = "adam"
    select_by: str = "sampled"

    @classmethod
    def from_section(cls, section: dict, seed: int, k: int, select_by: str = "sampled") -> "FitConfig":
        """The loop's settings from a model's params section (the MLP's: the top-level keys)."""
        return cls(seed, section["lr"], section.get("weight_decay", 0.0), section["epochs"], section["batch_size"],
                   section.get("negatives", 1), k, optimizer=section.get("optimizer", "adam"), select_by=select_by)


@dataclasses.dataclass
class EpochStats:
    """One row of the training curve: validation HR@k and NDCG@k by the sampled protocol and by full
    ranking (NaN when there is no validation, or no full ranking of it)."""

    epoch: int
    loss: float
    val_hr: float
    val_ndcg: float
    val_full_hr: float = math.nan
    val_full_ndcg: float = math.nan

    def key(self, select_by: str) -> tuple[float, float]:
        """What picks the epoch: (HR@k, NDCG@k) of the `select_by` protocol."""
        return (self.val_full_hr, self.val_full_ndcg) if select_by == "full" else (self.val_hr, self.val_ndcg)


@dataclasses.dataclass
class Validation:
    """The validation users, by both protocols: `sampled` (each user's validation item among its
    sampled candidates) and full ranking of the validation item of `full_users` (positions into
    sampled.users) against every item not in `seen` (the train interactions)."""

    sampled: Candidates
    full_users: np.ndarray | None = None
    seen: sp.csr_matrix | None = None

    @classmethod
    def of(cls, sampled: Candidates, seen: sp.csr_matrix, full_rank_users: int, seed: int) -> "Validation":
        """Both protocols; full ranking for all users, or a seeded sample of `full_rank_users` (0: all)."""
        return cls(sampled, full_rank_sample(len(sampled.users), full_rank_users, seed), seen)

    def measure(self, model: Model, k: int) -> EpochStats:
        """An EpochStats (epoch 0, no loss) with the model's validation metrics."""
        hr, nd = evaluate_ranking(model, self.sampled, k)
        if self.full_users is None:
            return EpochStats(0, math.nan, hr, nd)
        users = self.sampled.users[self.full_users]
        ranks = full_ranks(model.score_all, users, self.sampled.items[self.full_users, 0], self.seen)
        return EpochStats(0, math.nan, hr, nd, hit_ratio(ranks, k), ndcg(ranks, k))


def seeded_generator(seed: int, stream: int, device: torch.device) -> torch.Generator:
    """A torch generator on `device` for one independent random stream of `seed`."""
    state = int(np.random.SeedSequence([seed, stream]).generate_state(1, np.uint64)[0] >> np.uint64(1))
    return torch.Generator(device=device).manual_seed(state)


class _Lazy(torch.optim.Optimizer):
    """An optimiser for embedding tables with sparse gradients: a step moves only the rows the batch
    touched, so it costs O(batch), not O(table) (a 20M-interaction table's step costs about what a
    100K one's does).

    Weight decay is decoupled (as in AdamW): every row shrinks by (1 - lr x weight_decay) at every
    step, whether or not the batch touched it, exactly as the dense optimisers do it. A row's decay
    is applied when a batch next touches it, and for every row by `flush()` (called before the
    weights are read: after each epoch), so the decay each row gets does not depend on which path
    its table took.
    """

    def _decay(self, param: torch.Tensor, group: dict, state: dict, rows: torch.Tensor | None) -> None:
        """Bring `rows` (None: all) up to date with the decay of every step so far."""
        shrink = 1.0 - group["lr"] * group["weight_decay"]
        if shrink == 1.0:
            return
        last = state["decayed"] if rows is None else state["decayed"][rows]
        factor = shrink ** (state["step"] - last).to(param.dtype)
        if rows is None:
            param.mul_(factor[:, None])
            state["decayed"].fill_(state["step"])
        else:
            param[rows] *= factor[:, None]
            state["decayed"][rows] = state["step"]

    def _state(self, param: torch.Tensor) -> dict:
        state = self.state[param]
        if not state:
            state["step"] = 0
            state["decayed"] = torch.zeros(param.shape[0], dtype=torch.int64, device=param.device)
            self._init_state(param, state)
        return state

    def _init_state(self, param: torch.Tensor, state: dict) -> None:
        pass

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad.coalesce()
                rows, values = grad.indices()[0], grad.values()
                state = self._state(param)
                state["step"] += 1
                self._decay(param, group, state, rows)
                self._update(param, group, state, rows, values)

    @torch.no_grad()
    def flush(self) -> None:
        """Apply every row's pending decay."""
        for group in self.param_groups:
            for param in group["params"]:
                if self.state[param]:
                    self._decay(param, group, self.state[param], None)


class LazyAdam(_Lazy):
    """Adam on the touched rows, with the step count shared by the table (as TensorFlow's LazyAdam):
    rows not in the batch keep their weights (but for the decay) and moments."""

    def __init__(self, params, lr: float, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "betas": betas, "eps": eps})

    def _init_state(self, param: torch.Tensor, state: dict) -> None:
        state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(param), torch.zeros_like(param)

    def _update(self, param, group, state, rows, values) -> None:
        beta1, beta2 = group["betas"]
        exp_avg = state["exp_avg"][rows].mul_(beta1).add_(values, alpha=1 - beta1)
        exp_avg_sq = state["exp_avg_sq"][rows].mul_(beta2).addcmul_(values, values, value=1 - beta2)
        state["exp_avg"][rows], state["exp_avg_sq"][rows] = exp_avg, exp_avg_sq
        denom = (exp_avg_sq / (1 - beta2 ** state["step"])).sqrt_().add_(group["eps"])
        param.index_add_(0, rows, exp_avg / denom, alpha=-group["lr"] / (1 - beta1 ** state["step"]))


class LazySGD(_Lazy):
    """Plain SGD on the touched rows (the rows a batch missed have a zero gradient: only the decay)."""

    def __init__(self, params, lr: float, weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})

    def _update(self, param, group, state, rows, values) -> None:
        param.index_add_(0, rows, values, alpha=-group["lr"])


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

    def flush(self) -> None:
        """Apply the lazy tables' pending weight decay (before the weights are read)."""
        for opt in self.optimizers:
            if isinstance(opt, _Lazy):
                opt.flush()


LAZY_ROWS_PER_BATCH = 8  # a table with more rows than this many batches' pairs is updated lazily
OPTIMIZERS = ("adam", "sgd")


def make_optimizer(model: Model, lr: float, weight_decay: float, batch_size: int, kind: str = "adam") -> _Optimizers:
    """AdamW (or SGD), fused, except lazily updated embedding tables of more than LAZY_ROWS_PER_BATCH x
    batch_size rows.

    Fused AdamW updates every tensor in one kernel, but it reads and writes a whole table at every
    step, so its step grows with the table (ml-20m's 138,493 users against ml-100k's 943: measured
    in docs/scale.md). A large table is switched to sparse gradients and LazyAdam (LazySGD), which
    moves only the rows a batch touched. A small one stays dense (the lazy bookkeeping costs more
    than it saves there, and dense Adam also moves the rows a batch missed, by their momentum).
    Weight decay is decoupled on every path (each weight shrinks by lr x weight_decay per step), so a
    value means the same whatever the table's size or the batch size.
    """
    if kind not in OPTIMIZERS:
        raise ValueError(f"optimizer {kind!r}: expected one of {OPTIMIZERS}")
    tables = [module for module in model.modules()
              if isinstance(module, torch.nn.Embedding) and module.num_embeddings > LAZY_ROWS_PER_BATCH * batch_size
              and model.lazy_tables]  # SASRec's item table is also its output layer: dense
    for table in tables:
        table.sparse = True
    lazy = {id(table.weight) for table in tables}
    dense = [p for p in model.parameters() if id(p) not in lazy]
    optimizers: list[torch.optim.Optimizer] = []
    if dense:  # SGD's L2 decay is already decoupled: w - lr (g + wd w) = (1 - lr wd) w - lr g
        optimizers.append(torch.optim.AdamW(dense, lr=lr, weight_decay=weight_decay, fused=True) if kind == "adam"
                          else torch.optim.SGD(dense, lr=lr, weight_decay=weight_decay))
    if tables:
        weights = [table.weight for table in tables]
        optimizers.append(LazyAdam(weights, lr=lr, weight_decay=weight_decay) if kind == "adam"
                          else LazySGD(weights, lr=lr, weight_decay=weight_decay))
    return _Optimizers(*optimizers)


def positives(train: sp.csr_matrix, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (users, items) of every interaction in `train`, as int64 tensors on `device`."""
    train = train.tocsr()
    users = np.repeat(np.arange(train.shape[0], dtype=np.int64), np.diff(train.indptr))
    return torch.from_numpy(users).to(device), torch.from_numpy(train.indices.astype(np.int64)).to(device)


def epoch_chunks(pos_users: torch.Tensor, pos_items: torch.Tensor, sampler: ComplementSampler, negatives: int,
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
        negative_items = sampler.draw(users, negatives, negative_gen)
        all_users = torch.cat([users, users.repeat_interleave(negatives)])
        all_items = torch.cat([items, negative_items.reshape(-1)])
        labels = torch.zeros(len(all_users), dtype=torch.float32, device=device)
        labels[:len(users)] = 1.0
        shuffle = torch.randperm(len(all_users), generator=shuffle_gen or order_gen, device=device)
        yield all_users[shuffle], all_items[shuffle], labels[shuffle]


@dataclasses.dataclass
class Generators:
    """The training run's random streams: the order of the examples, the negatives, the shuffles."""

    order: torch.Generator
    negative: torch.Generator
    shuffle: torch.Generator


class PairObjective:
    """What the loop optimises for a (user, item) model: binary cross-entropy on every train pair
    plus `negatives` sampled negatives per positive, batches cut from the epoch's chunks."""

    def __init__(self, model: Model, train: History | sp.csr_matrix, cfg: FitConfig, device: torch.device):
        matrix = matrix_of(train)
        self.model, self.cfg = model, cfg
        self.sampler = ComplementSampler(matrix, device)
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


def fit(model: Model, train: History | sp.csr_matrix, val: Validation | Candidates | None, cfg: FitConfig,
        device: torch.device = torch.device("cpu"), name: str = "model",
        on_epoch: Callable[[int, Model, int], bool] | None = None,
        on_batch: Callable[[], None] | None = None,
        on_row: Callable[[EpochStats], None] | None = None,
        ) -> tuple[dict[str, torch.Tensor], list[EpochStats], int]:
    """Train `model` in place for cfg.epochs; return (kept state on the CPU, per-epoch curve, kept epoch).

    `train` is a History (or a binary CSR, for the models that need no order). The model's `objective`
    says what a batch is and its loss.

    With validation the kept state is the best epoch's by cfg.select_by (candidates alone: sampled);
    with `val` None (a refit) it is the last. `on_epoch(epoch, model, kept_epoch)`, if given, is called after each epoch; training stops when
    it returns False. `on_batch()`, if given, is called before each step (it may raise to stop);
    `on_row(row)`, if given, gets each validated epoch's curve row as it ends (the live log). Every random draw comes from generators of cfg.seed owned by this call (dropout's too), so
    two calls may run at once in two threads and give the same bits as one after the other.
    """
    gens = Generators(seeded_generator(cfg.seed, ORDER_STREAM, device),
                      seeded_generator(cfg.seed, NEGATIVE_STREAM, device),
                      seeded_generator(cfg.seed, SHUFFLE_STREAM, device))  # apart: an epoch's pairs don't depend on chunks
    model.to(device)
    model.set_dropout_generator(seeded_generator(cfg.seed, DROPOUT_STREAM, device))  # one stream for all
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, cfg.batch_size, cfg.optimizer)
    if isinstance(val, Candidates):
        val = Validation(val)
    if val is not None and cfg.select_by == "full" and val.full_users is None:
        raise ValueError("select_by 'full' needs a Validation with full ranking")
    objective = model.objective(train, cfg, device)
    if val is not None:
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
            if on_batch is not None:
                on_batch()
            loss, n = objective.loss(batch)
            optimizer.zero_grad(set_to_none=True)
            (loss / n).backward()
            optimizer.step()
            total += loss.detach()
            count += n
        optimizer.flush()
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
        row = dataclasses.replace(val.measure(model, k), epoch=epoch, loss=mean_loss)
        curve.append(row)
        if on_row is not None:
            on_row(row)
        if row.key(cfg.select_by) > best_key:
            best_key, best_epoch = row.key(cfg.select_by), epoch
            best_state = _state_on_cpu(model)
        full = "" if math.isnan(row.val_full_hr) else f"; full HR@{k} {row.val_full_hr:.4f}, NDCG {row.val_full_ndcg:.4f}"
        log.info("%s epoch %d: loss %.4f, val HR@%d %.4f, NDCG@%d %.4f%s (%.1f s)",
                 name, epoch, mean_loss, k, row.val_hr, k, row.val_ndcg, full, time.perf_counter() - start)
        if on_epoch is not None and not on_epoch(epoch, model, best_epoch):
            break
    if val is None:
        return _state_on_cpu(model), curve, len(curve)
    return best_state, curve, best_epoch


def _refit_worker(conn, model: Model, refit_on: History, cfg: FitConfig, device: torch.device, name: str) -> None:
    """The refit: train `model` on `refit_on` without validation, keeping the states the validation run
    may still choose, and send the chosen one back over the pipe `conn`.

    Messages from the validation run: ('floor', e), no epoch before e can be chosen any more;
    ('stop', e), epoch e was chosen (0: none, stop now). Sends ('state', {name: array} or None), or
    on any failure ('failed', a PipelineError's message) or ('error', the exception, on one line).
    """
    floor, stop = 1, None
    states: dict[int, dict[str, np.ndarray]] = {}

    def read(block: bool = False) -> None:
        nonlocal floor, stop
        while stop is None and (block or conn.poll()):
            kind, epoch = conn.recv()
            if kind == "stop":
                stop = epoch
            else:
                floor = epoch
                for old in [e for e in states if e < floor]:
                    del states[old]

    def keep(epoch: int, refit_model: Model, _: int) -> bool:
        read()
        if epoch >= floor and (stop is None or epoch <= stop):
            states[epoch] = {k: v.numpy() for k, v in _state_on_cpu(refit_model).items()}
        return stop is None or epoch < stop

    try:
        fit(model, refit_on, None, cfg, device, name, on_epoch=keep)
        read(block=True)
        message = ("state", states.get(stop))
    except PipelineError as err:
        message = ("failed", str(err))
    except BaseException as err:  # noqa: BLE001: whatever it is, the validation run must hear of it
        message = ("error", " ".join(f"{type(err).__name__}: {err}".split()))
    try:
        conn.send(message)
    except OSError:  # the validation run is gone
        pass


def _forked_refit(conn, *args) -> None:
    """The refit in a forked child, which the kernel kills when the parent dies (Linux)."""
    try:
        import ctypes
        import signal
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    _refit_worker(conn, *args)


class Refit:
    """A refit running beside the validation run: a forked process on the CPU (one torch thread), a
    thread otherwise (a child forked after torch's OpenMP pool ran with more threads hangs, and CUDA
    does not survive a fork). Either way one pipe carries the messages, and any failure of the refit
    (an exception, its process killed) reaches the validation run as a PipelineError naming it."""

    def __init__(self, model: Model, refit_on: History, cfg: FitConfig, device: torch.device, name: str,
                 in_process: bool | None = None):
        self.name = name
        if in_process is None:
            in_process = device.type == "cpu" and torch.get_num_threads() == 1 and "fork" in mp.get_all_start_methods()
        self.conn, child = mp.Pipe()
        args = (child, model, refit_on, cfg, device, f"{name} (refit)")
        if in_process:
            self.worker = mp.get_context("fork").Process(target=_forked_refit, args=args, daemon=True)
            self.worker.start()
            child.close()  # the child's end lives in the child only: its death is an end-of-file here
        else:
            self.worker = threading.Thread(target=_refit_worker, args=args, daemon=True)
            self.worker.start()

    def tell(self, kind: str, epoch: int) -> None:
        try:
            self.conn.send((kind, epoch))
        except OSError:  # the refit is gone: check() says why
            self.check()

    def check(self) -> None:
        """Raise PipelineError if the refit has failed (it sends nothing else before its result)."""
        if self.conn.poll():
            self._fail(self._receive())

    def result(self) -> dict[str, torch.Tensor]:
        """Wait for the refit's chosen state."""
        kind, payload = self._receive()
        if kind != "state" or payload is None:
            self._fail((kind, payload))
        return {k: torch.from_numpy(v) for k, v in payload.items()}

    def close(self) -> None:
        """End the refit: kill its process; a thread is told to stop at its next epoch."""
        if isinstance(self.worker, mp.process.BaseProcess):
            self.worker.kill()
            self.worker.join()
        else:
            with contextlib.suppress(OSError):
                self.conn.send(("stop", 0))
        self.conn.close()

    def _receive(self) -> tuple[str, object]:
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            if isinstance(self.worker, mp.process.BaseProcess):
                self.worker.join()
                code = self.worker.exitcode
                how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with status {code}"
                return "error", f"its process {how}: out of memory?"
            return "error", "its thread ended without a result"

    def _fail(self, message: tuple[str, object]) -> None:
        kind, payload = message
        if kind == "failed":  # a PipelineError of the refit's own, which names it
            raise PipelineError(payload)
        what = payload if kind == "error" else "no state for the chosen epoch"
        raise PipelineError(f"{self.name}: the refit on train + validation failed ({what}); no checkpoint was written")


def fit_and_refit(make_model: Callable[[bool], Model], train: History, refit_on: History,
                  val: Validation | Candidates,
                  cfg: FitConfig, device: torch.device = torch.device("cpu"), name: str = "model",
                  in_process: bool | None = None, on_row: Callable[[EpochStats], None] | None = None,
                  ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[EpochStats], int]:
    """Choose the epoch on validation, and refit on `refit_on` for that many epochs, side by side.

    `make_model(refit)` builds a fresh, seeded model. The refit is a second `fit` with the same seed
    and no validation, running at the same time (see Refit): its state after epoch e equals a refit
    stopped at e, so the state after the chosen epoch is kept. On two cores the pair takes the time of
    one run; each uses one thread, so the bits do not depend on the core count or on which is ahead.
    A failure of either ends both. Returns (refitted state, validation-chosen state, curve, chosen epoch).
    `on_row` is the validated run's (fit's); the refit logs nothing.
    """
    models = make_model(False), make_model(True)  # built one after the other: the seed's draws are fixed
    refit = Refit(models[1], refit_on, cfg, device, name, in_process)
    try:
        state, curve, best = fit(models[0], train, val, cfg, device, name, on_batch=refit.check,
                                 on_epoch=lambda epoch, model, kept: refit.tell("floor", kept) or True, on_row=on_row)
        refit.tell("stop", best)  # the refit stops once it has reached the chosen epoch
        return refit.result(), state, curve, best
    finally:
        refit.close()
