"""NCF's MLP (He et al., WWW 2017): the seed notebook's model, and the one the user's contract tunes.

User and item embeddings of layers[0]/2 each, side by side, through a ReLU tower of the widths
layers[1:], then one output logit. Its knobs are top-level keys of params.yaml (stage train_mlp),
so that `dvc exp run -S lr=0.01` tunes it.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from pipeline.common import PipelineError
from pipeline.models._neural import PairScorer, tower_widths
from pipeline.params import DROPOUT, LOOP, Search, Spec


class MLP(PairScorer):
    """NCF's MLP: user and item embeddings of layers[0]/2 each, a ReLU tower, one output logit."""

    label = "MLP"
    top_level = True
    always_trained = True
    params = {
        "layers": Spec("int_list", 1, 65536, doc="layers[0]/2 is each embedding's size (must be even), then the "
                                                 "ReLU tower"),
        "dropout": DROPOUT,
        **LOOP,
    }
    search = {"layers": Search(choices=((64, 32, 16, 8), (128, 64, 32, 16), (256, 128, 64, 32))),
              "lr": Search(1e-4, 3e-2, log=True), "weight_decay": Search(1e-3, 0.5, log=True),
              "dropout": Search(0.0, 0.5), "negatives": Search(1, 10)}

    @classmethod
    def check(cls, section: dict, source: str) -> None:
        if section["layers"][0] % 2:
            raise PipelineError(
                f"{source}: 'layers' first entry must be even (it is split into a user and an item "
                f"embedding of half that size each), got {section['layers'][0]}")

    @classmethod
    def from_params(cls, n_users: int, n_items: int, section: dict) -> "MLP":
        return cls(n_users, n_items, section["layers"], section["dropout"])

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

    def hidden(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Return the tower's last activations, [..., layers[-1]]."""
        x = torch.cat([self.user_embedding(users), self.item_embedding(items)], dim=-1)
        for layer in self.tower:
            x = self.drop(torch.relu(layer(x)), self.dropout)
        return x

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Return one logit per (user, item) pair, shaped like `users`."""
        return self.output(self.hidden(users, items)).squeeze(-1)

    def hidden_grid(self, users: torch.Tensor) -> torch.Tensor:
        """The tower's last activations for every item, [len(users), n_items, layers[-1]] (eval mode).

        The first layer is linear in [p_u, q_i], so it is W_u p_u + (W_i q_i + b), computed once per
        user and once per item and added by broadcasting: no [pairs x layers[0]] copy of embeddings.
        """
        if not len(self.tower):  # layers: [d]: the "tower" is the two embeddings side by side
            items = torch.arange(self.n_items, device=users.device).expand(len(users), self.n_items)
            return self.hidden(users[:, None].expand_as(items), items)
        first = self.tower[0]
        dim = self.user_embedding.embedding_dim
        per_user = self.user_embedding(users) @ first.weight[:, :dim].T
        per_item = self.item_embedding.weight @ first.weight[:, dim:].T + first.bias
        x = torch.relu(per_user[:, None, :] + per_item[None, :, :])
        for layer in self.tower[1:]:
            x = torch.relu(layer(x))
        return x

    @property
    def pair_width(self) -> int:
        return 2 * self.tower[0].out_features if len(self.tower) else self.user_embedding.embedding_dim * 2

    def score_block(self, users: torch.Tensor) -> torch.Tensor:
        return self.output(self.hidden_grid(users)).squeeze(-1)

    @staticmethod
    def sizes_from_state(state: Mapping[str, torch.Tensor]) -> dict:
        n_users, dim = state["user_embedding.weight"].shape
        return {"n_users": n_users, "n_items": state["item_embedding.weight"].shape[0],
                "layers": [2 * dim] + tower_widths(state, "tower")}


MODEL = MLP
