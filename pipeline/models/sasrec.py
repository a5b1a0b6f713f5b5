"""SASRec (Kang and McAuley, ICDM 2018): causal self-attention over each user's latest items.

A user is their last `max_len` items in time order, left-padded. Item embeddings (times √hidden)
plus learned position embeddings go through `blocks` pre-norm Transformer blocks whose attention
sees only earlier positions (and never padding); the output at a position is compared with every
item's embedding (the same table: tied weights) to score what comes next. Trained on each train
sequence to predict, at every position that holds an item (never from padding), the next item: by
full softmax cross-entropy (`loss: ce`, which Klenitskiy and Vasilev, RecSys 2023, found clearly
better) or, as in the paper, binary
cross-entropy against one sampled negative per position (`loss: bce`). To score a user it reads
their History: the validation item from the train sequence, the test item from the train sequence
plus the validation item, recommendations from everything.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import numpy as np
import torch
from torch import nn

from pipeline.common import PipelineError, inverted_dropout
from pipeline.data import History
from pipeline.models import Model
from pipeline.params import DROPOUT, LOOP, Search, Spec
from pipeline.sampling import ComplementSampler


def last_items(history: History, users: np.ndarray, length: int, pad: int) -> np.ndarray:
    """[len(users), length]: each user's latest `length` items, oldest first, left-padded with `pad`."""
    users = np.asarray(users, dtype=np.int64)
    ends = history.indptr[users + 1].astype(np.int64)
    starts = history.indptr[users].astype(np.int64)
    index = ends[:, None] - length + np.arange(length)[None, :]
    valid = index >= starts[:, None]
    return np.where(valid, history.items[np.clip(index, 0, max(len(history.items) - 1, 0))], pad)


class GeneratorDropout(nn.Module):
    """Inverted dropout drawn from `dropout_generator` when the training loop sets one (else torch's)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.dropout_generator: torch.Generator | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return inverted_dropout(x, self.p, self.dropout_generator)


class Block(nn.Module):
    """Pre-norm Transformer block: causal multi-head self-attention, then a point-wise feed-forward."""

    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.qkv, self.out = nn.Linear(hidden, 3 * hidden), nn.Linear(hidden, hidden)
        self.ff1, self.ff2 = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
        self.drop_attention, self.drop1, self.drop2, self.drop_ff = (GeneratorDropout(dropout) for _ in range(4))

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """x: [B, L, H]; allowed: [B, 1, L, L], True where position i may attend to position j."""
        b, length, hidden = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, length, 3, self.heads, hidden // self.heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, L, head size]
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        weights = self.drop_attention(torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1))
        x = x + self.drop1(self.out((weights @ v).transpose(1, 2).reshape(b, length, hidden)))
        return x + self.drop2(self.ff2(self.drop_ff(torch.relu(self.ff1(self.norm2(x))))))


class SASRec(nn.Module, Model):
    """SASRec; item `n_items` is the padding token. Scores with score(users, items) and score_all(users)."""

    label = "SASRec"
    neural = True
    lazy_tables = False  # the item table is also the output layer: its gradient is dense
    params = {
        "max_len": Spec("int", 1, 4096, doc="the latest items a user is read by"),
        "hidden": Spec("int", 1, 4096, doc="embedding and attention width"),
        "blocks": Spec("int", 1, 64, doc="Transformer blocks"),
        "heads": Spec("int", 1, 64, doc="attention heads (hidden must be a multiple)"),
        "dropout": DROPOUT,
        "loss": Spec("choice", choices=("ce", "bce"), doc="ce: full softmax cross-entropy; bce: one sampled "
                                                          "negative per position (the paper)"),
        "lr": LOOP["lr"], "weight_decay": LOOP["weight_decay"], "epochs": LOOP["epochs"],
        "batch_size": Spec("int", 1, 2**20, doc="users (sequences) per step"),
    }
    search = {"hidden": Search(choices=(32, 64, 128)), "blocks": Search(1, 3), "dropout": Search(0.0, 0.5),
              "lr": Search(1e-4, 1e-2, log=True), "weight_decay": Search(0.0, 0.1)}

    @classmethod
    def check(cls, section: dict, source: str) -> None:
        if section["hidden"] % section["heads"]:
            raise PipelineError(f"{source}: 'sasrec.hidden' ({section['hidden']}) must be a multiple of "
                                f"'sasrec.heads' ({section['heads']}): each head takes an equal share")

    def __init__(self, n_items: int, max_len: int, hidden: int, blocks: int, heads: int, dropout: float = 0.0,
                 loss: str = "ce"):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads})")
        self.item_embedding = nn.Embedding(n_items + 1, hidden, padding_idx=n_items)
        self.position_embedding = nn.Embedding(max_len, hidden)
        self.blocks = nn.ModuleList(Block(hidden, heads, dropout) for _ in range(blocks))
        self.norm = nn.LayerNorm(hidden)
        self.drop = GeneratorDropout(dropout)
        self.register_buffer("heads", torch.tensor(heads))  # not in any weight's shape: saved with them
        self.loss = loss
        self.history: History | None = None
        nn.init.normal_(self.item_embedding.weight, std=hidden ** -0.5)
        with torch.no_grad():
            self.item_embedding.weight[n_items].zero_()
        nn.init.normal_(self.position_embedding.weight, std=0.02)

    @classmethod
    def from_params(cls, n_users: int, n_items: int, section: dict) -> "SASRec":
        return cls(n_items, section["max_len"], section["hidden"], section["blocks"], section["heads"],
                   section["dropout"], section["loss"])

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor], history: History) -> "SASRec":
        """The saved model, in eval mode, reading users from `history` (a History: it needs the order)."""
        try:
            n_items, hidden = state["item_embedding.weight"].shape
            blocks = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
            model = cls(n_items - 1, state["position_embedding.weight"].shape[0], hidden, blocks, int(state["heads"]))
            model.load_state_dict(state)
        except (KeyError, AttributeError, ValueError, IndexError, TypeError, RuntimeError) as err:
            raise ValueError(f"not a SASRec state_dict ({type(err).__name__}: {err})") from None
        model.use_history(history)
        return model.eval()

    @property
    def n_items(self) -> int:
        return self.item_embedding.num_embeddings - 1

    @property
    def max_len(self) -> int:
        return self.position_embedding.num_embeddings

    @property
    def device(self) -> torch.device:
        return self.item_embedding.weight.device

    def set_dropout_generator(self, generator: torch.Generator | None) -> None:
        for module in self.modules():
            if isinstance(module, GeneratorDropout):
                module.dropout_generator = generator

    def objective(self, train: History, cfg, device: torch.device) -> "SequenceObjective":
        return SequenceObjective(self, train, cfg, device)

    def use_history(self, history: History) -> None:
        """Score users from these interactions (validation: train; test: train and validation)."""
        if not isinstance(history, History):
            raise TypeError("SASRec reads each user's items in time order: give it a History, not a matrix")
        self.history = history

    def encode(self, items: torch.Tensor) -> torch.Tensor:
        """[B, L, hidden]: the output at every position of left-padded item sequences [B, L]."""
        pad = items == self.n_items
        length = items.shape[1]
        positions = torch.arange(self.max_len - length, self.max_len, device=items.device)
        x = self.item_embedding(items) * math.sqrt(self.item_embedding.embedding_dim) + self.position_embedding(positions)
        keep = (~pad)[..., None].to(x.dtype)
        x = self.drop(x) * keep
        causal = torch.ones(length, length, dtype=torch.bool, device=items.device).tril()
        allowed = causal & (~pad[:, None, :] | torch.eye(length, dtype=torch.bool, device=items.device))
        allowed = allowed[:, None]  # [B, 1, L, L]: every position sees itself, so no row is all masked
        for block in self.blocks:
            x = block(x, allowed) * keep
        return self.norm(x)

    def _user_states(self, users: np.ndarray) -> torch.Tensor:
        """[len(users), hidden]: the output at each user's latest position."""
        if self.history is None:
            raise PipelineError("SASRec has no history to score users from")
        sequences = last_items(self.history, users, self.max_len, self.n_items)
        return self.encode(torch.as_tensor(sequences, dtype=torch.long, device=self.device))[:, -1]

    @torch.no_grad()
    def score(self, users: np.ndarray, items: np.ndarray, batch_rows: int = 1024) -> np.ndarray:
        """Return scores for users[i] against each of items[i, :]."""
        was_training = self.training
        self.eval()
        items_t = torch.as_tensor(np.asarray(items), dtype=torch.long)
        out = torch.empty(items_t.shape, dtype=torch.float32)
        for lo in range(0, len(users), batch_rows):
            states = self._user_states(np.asarray(users)[lo:lo + batch_rows])
            candidates = self.item_embedding(items_t[lo:lo + batch_rows].to(self.device))
            out[lo:lo + batch_rows] = (candidates @ states[:, :, None]).squeeze(-1).float().cpu()
        self.train(was_training)
        return out.numpy().astype(np.float64)

    @torch.no_grad()
    def score_all(self, users: np.ndarray, batch_rows: int = 1024) -> torch.Tensor:
        """Return float32 scores [len(users), n_items]: every item for each user."""
        was_training = self.training
        self.eval()
        table = self.item_embedding.weight[:self.n_items]
        out = torch.empty((len(users), self.n_items), dtype=torch.float32)
        for lo in range(0, len(users), batch_rows):
            out[lo:lo + batch_rows] = (self._user_states(np.asarray(users)[lo:lo + batch_rows]) @ table.T).float().cpu()
        self.train(was_training)
        return out


class SequenceObjective:
    """What the shared loop optimises for SASRec: at every position of each train sequence, the next
    item (full softmax, or one sampled negative per position); a batch is `batch_size` users."""

    def __init__(self, model: SASRec, train: History, cfg, device: torch.device):
        if not isinstance(train, History):
            raise TypeError("SASRec trains on each user's items in time order: give it a History")
        self.model, self.cfg = model, cfg
        lengths = np.diff(train.indptr)
        self.users = np.flatnonzero(lengths >= 2)  # a sequence of one item has nothing to predict
        sequences = last_items(train, self.users, model.max_len + 1, model.n_items)
        self.sequences = torch.as_tensor(sequences, dtype=torch.long, device=device)
        self.users_t = torch.as_tensor(self.users, dtype=torch.long, device=device)
        self.sampler = ComplementSampler(train.matrix, device) if model.loss == "bce" else None

    def batches(self, gens) -> Iterator[tuple[torch.Tensor, ...]]:
        order = torch.randperm(len(self.users), generator=gens.order, device=self.sequences.device)
        for lo in range(0, len(order), self.cfg.batch_size):
            picked = order[lo:lo + self.cfg.batch_size]
            sequences = self.sequences[picked]
            inputs, targets = sequences[:, :-1], sequences[:, 1:]
            if self.sampler is None:
                yield inputs, targets
            else:
                yield inputs, targets, self.sampler.draw(self.users_t[picked], targets.shape[1], gens.negative)

    def loss(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed loss over the predicted positions, number of them)."""
        model = self.model
        inputs, targets = batch[0], batch[1]
        states = model.encode(inputs)
        # A position is predicted only from a real item: where the input is padding (before a short
        # sequence's first item) the state is the final norm's bias alone, and a loss there would
        # teach it a "popular first item" prior that is added at every position.
        mask = (targets != model.n_items) & (inputs != model.n_items)
        if self.sampler is None:
            logits = states[mask] @ model.item_embedding.weight[:model.n_items].T
            return nn.functional.cross_entropy(logits, targets[mask], reduction="sum"), mask.sum()
        positive = (states * model.item_embedding(targets)).sum(-1)[mask]
        negative = (states * model.item_embedding(batch[2])).sum(-1)[mask]
        bce = nn.functional.binary_cross_entropy_with_logits
        loss = bce(positive, torch.ones_like(positive), reduction="sum") + bce(negative, torch.zeros_like(negative),
                                                                                reduction="sum")
        return loss, mask.sum()


MODEL = SASRec
