"""NCF's GMF (He et al., WWW 2017): a learned weighting of the element-wise product of the embeddings."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pipeline.models._neural import PairScorer, factor_sizes
from pipeline.params import LOOP, Search, Spec


class GMF(PairScorer):
    """NCF's generalised matrix factorisation: a learned weighting of p_u * q_i, one output logit."""

    label = "GMF"
    params = {"factors": Spec("int", 1, 65536, doc="embedding size of users and items"), **LOOP}
    search = {"factors": Search(choices=(8, 16, 32, 64)), "lr": Search(1e-4, 3e-2, log=True),
              "weight_decay": Search(1e-3, 1.0, log=True), "negatives": Search(1, 10)}

    @classmethod
    def from_params(cls, n_users: int, n_items: int, section: dict) -> "GMF":
        return cls(n_users, n_items, section["factors"])

    def __init__(self, n_users: int, n_items: int, factors: int):
        super().__init__()
        self.user_embedding = nn.Embedding(n_users, factors)
        self.item_embedding = nn.Embedding(n_items, factors)
        self.output = nn.Linear(factors, 1)
        nn.init.normal_(self.user_embedding.weight, std=0.01)
        nn.init.normal_(self.item_embedding.weight, std=0.01)

    def hidden(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return self.user_embedding(users) * self.item_embedding(items)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return self.output(self.hidden(users, items)).squeeze(-1)

    @torch.no_grad()
    def score_all(self, users: np.ndarray) -> torch.Tensor:
        """Every item for each user, as one matrix product: (p_u * w) q_i + b."""
        u = torch.as_tensor(np.asarray(users), dtype=torch.long, device=self.device)
        out = (self.user_embedding(u) * self.output.weight[0]) @ self.item_embedding.weight.T + self.output.bias
        return out.float().cpu()

    sizes_from_state = staticmethod(factor_sizes)


MODEL = GMF
