"""Recommender models with one scoring interface: score(users, items) -> scores, higher is better."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from pipeline.common import PipelineError


class ItemPop:
    """Scores an item by its number of train interactions, whoever the user is."""

    def __init__(self, counts: np.ndarray):
        self.counts = np.asarray(counts)

    def score(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Return popularity counts shaped like `items` (users are ignored)."""
        return self.counts[items].astype(np.float64)


class PairScorer(nn.Module):
    """A neural model: forward(users, items) -> one logit per pair; scoring helpers for evaluation."""

    label = "a model"  # for messages: "not an MLP state_dict"

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
    def score_all(self, users: np.ndarray, max_pairs: int = 1 << 18) -> torch.Tensor:
        """Return float32 logits [len(users), n_items]: every item for each user.

        Pairs go through the network in chunks of about max_pairs, so memory stays bounded.
        """
        was_training = self.training
        self.eval()
        n_items = self.n_items
        users_t = torch.as_tensor(np.asarray(users), dtype=torch.long, device=self.device)
        out = torch.empty((len(users_t), n_items), dtype=torch.float32)
        step = max(1, max_pairs // max(n_items, 1))
        items = torch.arange(n_items, device=self.device)
        for lo in range(0, len(users_t), step):
            u = users_t[lo:lo + step]
            grid = items.expand(len(u), n_items)
            out[lo:lo + len(u)] = self(u[:, None].expand_as(grid), grid).float().cpu()
        self.train(was_training)
        return out

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
            raise ValueError(f"not {cls.label} state_dict ({type(err).__name__}: {err})") from None
        return model.eval()

    @staticmethod
    def sizes_from_state(state: Mapping[str, torch.Tensor]) -> dict:
        raise NotImplementedError


def _tower_widths(state: Mapping[str, torch.Tensor], prefix: str) -> list[int]:
    """Output widths of the Linear layers prefix.0, prefix.1, ... in a state_dict, in order."""
    linear = sorted((int(k[len(prefix) + 1:].split(".")[0]), v.shape) for k, v in state.items()
                    if k.startswith(prefix + ".") and k.endswith(".weight"))
    return [shape[0] for _, shape in linear]


def _factor_sizes(state: Mapping[str, torch.Tensor]) -> dict:
    """n_users, n_items and factors of a model with user_ and item_embedding (GMF, MF)."""
    n_users, factors = state["user_embedding.weight"].shape
    return {"n_users": n_users, "n_items": state["item_embedding.weight"].shape[0], "factors": factors}


class MLP(PairScorer):
    """NCF's MLP: user and item embeddings of layers[0]/2 each, a ReLU tower, one output logit."""

    label = "an MLP"

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
            x = torch.relu(layer(x))
            if self.dropout > 0:
                x = nn.functional.dropout(x, self.dropout, self.training)
        return x

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Return one logit per (user, item) pair, shaped like `users`."""
        return self.output(self.hidden(users, items)).squeeze(-1)

    @staticmethod
    def sizes_from_state(state: Mapping[str, torch.Tensor]) -> dict:
        n_users, dim = state["user_embedding.weight"].shape
        return {"n_users": n_users, "n_items": state["item_embedding.weight"].shape[0],
                "layers": [2 * dim] + _tower_widths(state, "tower")}


class GMF(PairScorer):
    """NCF's generalised matrix factorisation: a learned weighting of p_u * q_i, one output logit."""

    label = "a GMF"

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

    sizes_from_state = staticmethod(_factor_sizes)


class MF(PairScorer):
    """Biased matrix factorisation (Rendle et al. 2020): b + b_u + b_i + <p_u, q_i>."""

    label = "an MF"

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

    sizes_from_state = staticmethod(_factor_sizes)


class NeuMF(PairScorer):
    """NCF's NeuMF: a GMF branch and an MLP branch, concatenated into one output logit."""

    label = "a NeuMF"

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

    @classmethod
    def from_pretrained(cls, gmf: GMF, mlp: MLP, alpha: float = 0.5) -> "NeuMF":
        """NeuMF initialised from trained GMF and MLP (NCF, section 3.4.1): output = alpha/(1-alpha) mix."""
        n_users, factors = gmf.user_embedding.weight.shape
        layers = [2 * mlp.user_embedding.weight.shape[1]] + [layer.out_features for layer in mlp.tower]
        model = cls(n_users, gmf.n_items, factors, layers, mlp.dropout)
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
                "layers": [2 * dim] + _tower_widths(state, "mlp.tower")}


class EASE:
    """EASE (Steck 2019): item-item weights B from the Gram matrix; a user's scores are x_u B."""

    def __init__(self, weights: torch.Tensor, history: sp.csr_matrix):
        self.weights = weights  # [n_items, n_items], zero diagonal
        self.history = history.tocsr()

    @staticmethod
    def fit(train: sp.csr_matrix, lam: float) -> torch.Tensor:
        """Return B = I - P / diag(P) with P = (X^T X + lam I)^-1 (float64 solve, float32 result)."""
        x = train.astype(np.float64)
        gram = torch.from_numpy((x.T @ x).toarray())
        gram.diagonal().add_(lam)
        p = torch.linalg.inv(gram)
        b = -p / p.diagonal()[None, :]
        b.diagonal().zero_()
        return b.float()

    @property
    def n_items(self) -> int:
        return self.weights.shape[0]

    def score_all(self, users: np.ndarray) -> torch.Tensor:
        rows = self.history[np.asarray(users)].astype(np.float32)
        return torch.from_numpy(np.asarray(rows @ self.weights.numpy()))

    def score(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        full = self.score_all(users).numpy()
        return np.take_along_axis(full, np.asarray(items), axis=1).astype(np.float64)


MODEL_CLASSES = {"mlp": MLP, "gmf": GMF, "mf": MF, "neumf": NeuMF}


def load_model(name: str, path: Path, train: sp.csr_matrix):
    """Load a model written by `train@<name>` (tensors only: torch.load(weights_only=True))."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise PipelineError(f"{path}: not found; run `dvc repro` to train {name}") from None
    except Exception as err:  # torch raises many kinds for a file that is not a checkpoint
        raise PipelineError(f"{path}: not a readable model checkpoint ({type(err).__name__}: {err})") from None
    try:
        if name == "itempop":
            model = ItemPop(state["counts"].numpy())
        elif name == "ease":
            model = EASE(state["weights"].float(), train)
        else:
            model = MODEL_CLASSES[name].from_state_dict(state)
    except (KeyError, AttributeError, TypeError, ValueError) as err:
        raise PipelineError(f"{path}: not a valid {name} checkpoint ({err})") from None
    if getattr(model, "n_items", train.shape[1]) != train.shape[1]:
        raise PipelineError(f"{path}: {name} was trained on {model.n_items} items, the data has {train.shape[1]}; "
                            "run `dvc repro`")
    return model


def full_scores(model, n_items: int):
    """Return score_all(users) -> [users, n_items] float32 tensor for any model."""
    if isinstance(model, ItemPop):
        counts = torch.from_numpy(model.counts.astype(np.float32))
        return lambda users: counts.expand(len(users), n_items)
    return model.score_all
