"""NCF's NeuMF (He et al., WWW 2017, section 3.4.1): the GMF and MLP checkpoints fused, then fine-tuned."""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from pipeline.models._neural import PairScorer, tower_widths
from pipeline.models.gmf import GMF
from pipeline.models.mlp import MLP
from pipeline.params import DROPOUT, LOOP, Search, Spec


class NeuMF(PairScorer):
    """NCF's NeuMF: a GMF branch and an MLP branch, concatenated into one output logit."""

    label = "NeuMF"
    fused_from = ("gmf", "mlp")
    params = {"dropout": DROPOUT, **LOOP,
              "optimizer": Spec("choice", choices=("adam", "sgd"), doc="fine-tuning: adam (AdamW, fresh moments) "
                                                                      "or sgd (plain SGD, the NCF paper's recipe)")}
    search = {"optimizer": Search(choices=("sgd", "adam")), "lr": Search(1e-4, 1e-1, log=True),
              "weight_decay": Search(0.0, 0.1), "dropout": Search(0.0, 0.5), "negatives": Search(1, 10)}

    @classmethod
    def from_sources(cls, sources: list, section: dict) -> "NeuMF":
        gmf, mlp = sources
        return cls.from_pretrained(gmf, mlp, dropout=section["dropout"])

    def __init__(self, n_users: int, n_items: int, factors: int, layers: list[int], dropout: float = 0.0):
        super().__init__()
        self.gmf = GMF(n_users, n_items, factors)
        self.mlp = MLP(n_users, n_items, layers, dropout)
        del self.gmf.output, self.mlp.output  # the fused output layer replaces both
        self.output = nn.Linear(factors + layers[-1], 1)

    @property
    def n_items(self) -> int:
        return self.gmf.item_embedding.num_embeddings

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        both = torch.cat([self.gmf.hidden(users, items), self.mlp.hidden(users, items)], dim=-1)
        return self.output(both).squeeze(-1)

    @property
    def pair_width(self) -> int:
        return self.mlp.pair_width

    def score_block(self, users: torch.Tensor) -> torch.Tensor:
        """GMF's half as a matrix product, the MLP's through its tower for every item (MLP.hidden_grid)."""
        factors = self.gmf.user_embedding.embedding_dim
        weight = self.output.weight[0]
        gmf = (self.gmf.user_embedding(users) * weight[:factors]) @ self.gmf.item_embedding.weight.T
        return gmf + self.mlp.hidden_grid(users) @ weight[factors:] + self.output.bias

    @classmethod
    def from_pretrained(cls, gmf: GMF, mlp: MLP, alpha: float = 0.5, dropout: float | None = None) -> "NeuMF":
        """NeuMF initialised from trained GMF and MLP (NCF, section 3.4.1): output = alpha/(1-alpha) mix.

        The MLP branch's dropout is `dropout`, or the MLP's own when None."""
        n_users, factors = gmf.user_embedding.weight.shape
        layers = [2 * mlp.user_embedding.weight.shape[1]] + [layer.out_features for layer in mlp.tower]
        model = cls(n_users, gmf.n_items, factors, layers, mlp.dropout if dropout is None else dropout)
        gmf_state = {k: v for k, v in gmf.state_dict().items() if not k.startswith("output.")}
        mlp_state = {k: v for k, v in mlp.state_dict().items() if not k.startswith("output.")}
        model.gmf.load_state_dict(gmf_state)
        model.mlp.load_state_dict(mlp_state)
        with torch.no_grad():
            model.output.weight.copy_(torch.cat([alpha * gmf.output.weight, (1 - alpha) * mlp.output.weight], dim=1))
            model.output.bias.copy_(alpha * gmf.output.bias + (1 - alpha) * mlp.output.bias)
        return model

    @staticmethod
    def sizes_from_state(state: Mapping[str, torch.Tensor]) -> dict:
        n_users, factors = state["gmf.user_embedding.weight"].shape
        dim = state["mlp.user_embedding.weight"].shape[1]
        return {"n_users": n_users, "n_items": state["gmf.item_embedding.weight"].shape[0], "factors": factors,
                "layers": [2 * dim] + tower_widths(state, "mlp.tower")}


MODEL = NeuMF
