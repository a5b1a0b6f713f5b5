"""What the (user, item) neural models share: batched scoring, rebuilding from a state_dict, dropout."""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from pipeline.common import inverted_dropout
from pipeline.data import History
from pipeline.models import Model


class PairScorer(nn.Module, Model):
    """A neural model: forward(users, items) -> one logit per pair; scoring helpers for evaluation."""

    neural = True

    def __init__(self):
        super().__init__()
        self.dropout_generator: torch.Generator | None = None  # set by the training loop: its own draws

    def set_dropout_generator(self, generator: torch.Generator | None) -> None:
        for module in self.modules():
            if isinstance(module, PairScorer):
                module.dropout_generator = generator

    def objective(self, train: History, cfg, device: torch.device):
        """Binary cross-entropy on every train pair and sampled negatives (pipeline.training.PairObjective)."""
        from pipeline.training import PairObjective  # here: scoring a model needs no training loop

        return PairObjective(self, train, cfg, device)

    def drop(self, x: torch.Tensor, p: float) -> torch.Tensor:
        """Inverted dropout at rate p while training (drawn from the loop's generator); x as is otherwise."""
        if p > 0 and self.training:
            return inverted_dropout(x, p, self.dropout_generator)
        return x

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor], history: History) -> "PairScorer":
        """The model saved as `state` (a checkpoint's tensors), in eval mode; it reads no history."""
        return cls.from_state_dict(state)

    @torch.no_grad()
    def score(self, users: np.ndarray, items: np.ndarray, batch_rows: int = 4096) -> np.ndarray:
        """Return logits for users[i] against each of items[i, :], in batches of rows."""
        was_training = self.training
        self.eval()
        users_t = torch.as_tensor(np.asarray(users), dtype=torch.long)
        items_t = torch.as_tensor(np.asarray(items), dtype=torch.long)
        out = torch.empty(items_t.shape, dtype=torch.float32)
        device = self.device
        for start in range(0, len(users_t), batch_rows):
            rows = slice(start, start + batch_rows)
            u = users_t[rows, None].expand_as(items_t[rows])
            out[rows] = self(u.to(device), items_t[rows].to(device)).cpu()
        self.train(was_training)
        return out.numpy().astype(np.float64)

    @torch.no_grad()
    def score_all(self, users: np.ndarray, max_elements: int = 1 << 24) -> torch.Tensor:
        """Return float32 logits [len(users), n_items]: every item for each user.

        Users go through `score_block` in chunks of about max_elements floats of intermediate
        values (64 MB), so memory stays bounded.
        """
        was_training = self.training
        self.eval()
        n_items = self.n_items
        users_t = torch.as_tensor(np.asarray(users), dtype=torch.long, device=self.device)
        out = torch.empty((len(users_t), n_items), dtype=torch.float32)
        step = max(1, max_elements // max(n_items * self.pair_width, 1))
        for lo in range(0, len(users_t), step):
            out[lo:lo + step] = self.score_block(users_t[lo:lo + step]).float().cpu()
        self.train(was_training)
        return out

    @property
    def pair_width(self) -> int:
        """Floats of intermediate values per (user, item) pair in score_block: sets its chunk size."""
        return 1

    def score_block(self, users: torch.Tensor) -> torch.Tensor:
        """Logits [len(users), n_items] (eval mode, no grad): every pair through forward()."""
        grid = torch.arange(self.n_items, device=users.device).expand(len(users), self.n_items)
        return self(users[:, None].expand_as(grid), grid)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def n_items(self) -> int:
        return self.item_embedding.num_embeddings

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor]) -> "PairScorer":
        """Rebuild the model (in eval mode) from a saved state_dict; its shapes give the sizes."""
        try:
            model = cls(**cls.sizes_from_state(state))
            model.load_state_dict(state)
        except (KeyError, AttributeError, ValueError, IndexError, TypeError, RuntimeError) as err:
            raise ValueError(f"not {article(cls.label)} {cls.label} state_dict ({type(err).__name__}: {err})") from None
        return model.eval()

    @staticmethod
    def sizes_from_state(state: Mapping[str, torch.Tensor]) -> dict:
        """The constructor's keyword arguments, read from a state_dict's shapes."""
        raise NotImplementedError


def article(word: str) -> str:
    """'a' or 'an' before a model's label, by how it is said: "an MLP", "a GMF", "a NeuMF"."""
    if word.startswith("Neu"):  # said as a word ("new"), not spelt out
        return "a"
    return "an" if word[0] in "AEFHILMNORSX" else "a"


def tower_widths(state: Mapping[str, torch.Tensor], prefix: str) -> list[int]:
    """Output widths of the Linear layers prefix.0, prefix.1, ... in a state_dict, in order."""
    linear = sorted((int(k[len(prefix) + 1:].split(".")[0]), v.shape) for k, v in state.items()
                    if k.startswith(prefix + ".") and k.endswith(".weight"))
    return [shape[0] for _, shape in linear]


def factor_sizes(state: Mapping[str, torch.Tensor]) -> dict:
    """n_users, n_items and factors of a model with user_ and item_embedding (GMF, MF)."""
    n_users, factors = state["user_embedding.weight"].shape
    return {"n_users": n_users, "n_items": state["item_embedding.weight"].shape[0], "factors": factors}
