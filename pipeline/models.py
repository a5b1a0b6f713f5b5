"""Recommender models with one scoring interface: score(users, items) -> scores, higher is better."""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn


class ItemPop:
    """Scores an item by its number of train interactions, whoever the user is."""

    def __init__(self, counts: np.ndarray):
        self.counts = np.asarray(counts)

    def score(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Return popularity counts shaped like `items` (users are ignored)."""
        return self.counts[items].astype(np.float64)


class MLP(nn.Module):
    """NCF's MLP: user and item embeddings of layers[0]/2 each, a ReLU tower, one output logit."""

    def __init__(self, n_users: int, n_items: int, layers: list[int], dropout: float = 0.0):
        super().__init__()
        if layers[0] % 2:
            raise ValueError(f"layers[0] must be even, got {layers[0]}")
        dim = layers[0] // 2
        self.user_embedding = nn.Embedding(n_users, dim)
        self.item_embedding = nn.Embedding(n_items, dim)
        self.dropout = dropout
        self.tower = nn.ModuleList(nn.Linear(a, b) for a, b in zip(layers[:-1], layers[1:]))
        self.output = nn.Linear(layers[-1], 1)
        nn.init.normal_(self.user_embedding.weight, std=0.01)
        nn.init.normal_(self.item_embedding.weight, std=0.01)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Return one logit per (user, item) pair, shaped like `users`."""
        x = torch.cat([self.user_embedding(users), self.item_embedding(items)], dim=-1)
        for layer in self.tower:
            x = torch.relu(layer(x))
            if self.dropout > 0:
                x = nn.functional.dropout(x, self.dropout, self.training)
        return self.output(x).squeeze(-1)

    @torch.no_grad()
    def score(self, users: np.ndarray, items: np.ndarray, batch_rows: int = 4096) -> np.ndarray:
        """Return logits for users[i] against each of items[i, :], in batches of rows."""
        was_training = self.training
        self.eval()
        users_t = torch.as_tensor(np.asarray(users), dtype=torch.long)
        items_t = torch.as_tensor(np.asarray(items), dtype=torch.long)
        out = torch.empty(items_t.shape, dtype=torch.float32)
        device = self.output.weight.device
        for start in range(0, len(users_t), batch_rows):
            rows = slice(start, start + batch_rows)
            u = users_t[rows, None].expand_as(items_t[rows])
            out[rows] = self(u.to(device), items_t[rows].to(device)).cpu()
        self.train(was_training)
        return out.numpy().astype(np.float64)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor]) -> "MLP":
        """Rebuild an MLP (in eval mode) from a saved state_dict; its shapes define the layers."""
        try:
            n_users, dim = state["user_embedding.weight"].shape
            n_items = state["item_embedding.weight"].shape[0]
            linear = sorted(
                (int(k.split(".")[1]), v.shape) for k, v in state.items()
                if k.startswith("tower.") and k.endswith(".weight")
            )
            model = cls(n_users, n_items, [2 * dim] + [shape[0] for _, shape in linear])
            model.load_state_dict(state)
        except (KeyError, AttributeError, ValueError, IndexError, TypeError, RuntimeError) as err:
            raise ValueError(f"not an MLP state_dict ({type(err).__name__}: {err})") from None
        return model.eval()
