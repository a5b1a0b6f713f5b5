"""Biased matrix factorisation (Rendle et al., 2020), logistic loss on sampled negatives."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pipeline.models._neural import PairScorer, factor_sizes
from pipeline.params import LOOP, Search, Spec


class MF(PairScorer):
    """Biased matrix factorisation (Rendle et al. 2020): b + b_u + b_i + <p_u, q_i>."""

    label = "MF"
    params = {"factors": Spec("int", 1, 65536, doc="embedding size of users and items"), **LOOP}
    # `epochs` is the budget, not searched: the best epoch within it is chosen on validation
    search = {"factors": Search(choices=(16, 32, 64, 128)), "lr": Search(1e-4, 3e-2, log=True),
              "weight_decay": Search(1e-3, 1.0, log=True), "negatives": Search(1, 10)}

    @classmethod
    def from_params(cls, n_users: int, n_items: int, section: dict) -> "MF":
        return cls(n_users, n_items, section["factors"])

    def __init__(self, n_users: int, n_items: int, factors: int):
        super().__init__()
        self.user_embedding = nn.Embedding(n_users, factors)
        self.item_embedding = nn.Embedding(n_items, factors)
        self.user_bias = nn.Embedding(n_users, 1)
        self.item_bias = nn.Embedding(n_items, 1)
        self.bias = nn.Parameter(torch.zeros(()))
        for emb in (self.user_embedding, self.item_embedding):
            nn.init.normal_(emb.weight, std=0.1 / factors ** 0.5)
        nn.init.zeros_(self.user_bias.weight)
        nn.init.zeros_(self.item_bias.weight)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        dot = (self.user_embedding(users) * self.item_embedding(items)).sum(-1)
        return dot + self.user_bias(users).squeeze(-1) + self.item_bias(items).squeeze(-1) + self.bias

    @torch.no_grad()
    def score_all(self, users: np.ndarray) -> torch.Tensor:
        """Every item for each user, as one matrix product."""
        u = torch.as_tensor(np.asarray(users), dtype=torch.long, device=self.device)
        out = self.user_embedding(u) @ self.item_embedding.weight.T
        out += self.user_bias(u) + self.item_bias.weight.T + self.bias
        return out.float().cpu()

    sizes_from_state = staticmethod(factor_sizes)


MODEL = MF
