"""Recommender models with one scoring interface, and the registry that every stage asks.

Every model scores with score(users, items) -> [len(users), candidates] (higher is better) and
score_all(users) -> [len(users), n_items]. `REGISTRY` maps a model's name to its class; a class
says how it is built from its params section (`from_params`, neural models) or fitted
(`fit`, closed-form models), and how it is rebuilt from a saved checkpoint (`from_state`).
A stage never branches on a model's name: a new model is a class and a registry entry.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from pipeline.common import PipelineError, inverted_dropout
from pipeline.data import History, matrix_of


def pick_device(choice: str) -> torch.device:
    """Return the torch device for the `device` param: auto (cuda if present, else cpu), cpu or cuda."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise PipelineError("params.yaml: 'device' is 'cuda', but PyTorch sees no CUDA device here; "
                            "use 'auto' or 'cpu'")
    return torch.device(choice)


class ItemPop:
    """Scores an item by its number of train interactions, whoever the user is."""

    label = "ItemPop"
    neural = False

    def __init__(self, counts: np.ndarray):
        self.counts = np.asarray(counts)

    @staticmethod
    def fit(train: sp.csr_matrix, section: dict) -> dict[str, torch.Tensor]:
        """Return the checkpoint: each item's interaction count in `train`."""
        return {"counts": torch.from_numpy(np.bincount(train.indices, minlength=train.shape[1]).astype(np.int64))}

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor], history: sp.csr_matrix) -> "ItemPop":
        return cls(state["counts"].numpy())

    @property
    def n_items(self) -> int:
        return len(self.counts)

    def score(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Return popularity counts shaped like `items` (users are ignored)."""
        return self.counts[items].astype(np.float64)

    def score_all(self, users: np.ndarray) -> torch.Tensor:
        """The counts of every item, one row per user (a broadcast view, no copy)."""
        return torch.from_numpy(self.counts.astype(np.float32)).expand(len(users), len(self.counts))


class PairScorer(nn.Module):
    """A neural model: forward(users, items) -> one logit per pair; scoring helpers for evaluation."""

    label = "model"  # the display name: "MLP"
    neural = True

    @classmethod
    def from_params(cls, n_users: int, n_items: int, section: dict) -> "PairScorer":
        """A freshly initialised model with the sizes in its params section."""
        raise NotImplementedError

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor], history: sp.csr_matrix) -> "PairScorer":
        """The model saved as `state` (a checkpoint's tensors), in eval mode."""
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
            raise ValueError(f"not {_article(cls.label)} {cls.label} state_dict ({type(err).__name__}: {err})") from None
        return model.eval()

    @staticmethod
    def sizes_from_state(state: Mapping[str, torch.Tensor]) -> dict:
        raise NotImplementedError


def _article(word: str) -> str:
    if word.startswith("Neu"):  # said as a word ("new"), not spelt out: "a NeuMF"
        return "a"
    return "an" if word[0] in "AEFHILMNORSX" else "a"  # by the letter's sound: "an MLP", "a GMF"


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

    label = "MLP"

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
        self.dropout_generator: torch.Generator | None = None  # set by the training loop: its own draws
        self.tower = nn.ModuleList(nn.Linear(a, b) for a, b in zip(layers[:-1], layers[1:]))
        self.output = nn.Linear(layers[-1], 1)
        nn.init.normal_(self.user_embedding.weight, std=0.01)
        nn.init.normal_(self.item_embedding.weight, std=0.01)

    def hidden(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Return the tower's last activations, [..., layers[-1]]."""
        x = torch.cat([self.user_embedding(users), self.item_embedding(items)], dim=-1)
        for layer in self.tower:
            x = torch.relu(layer(x))
            if self.dropout > 0 and self.training:
                x = self._drop(x)
        return x

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return inverted_dropout(x, self.dropout, self.dropout_generator)

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
                "layers": [2 * dim] + _tower_widths(state, "tower")}


class GMF(PairScorer):
    """NCF's generalised matrix factorisation: a learned weighting of p_u * q_i, one output logit."""

    label = "GMF"

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

    sizes_from_state = staticmethod(_factor_sizes)


class MF(PairScorer):
    """Biased matrix factorisation (Rendle et al. 2020): b + b_u + b_i + <p_u, q_i>."""

    label = "MF"

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

    sizes_from_state = staticmethod(_factor_sizes)


class NeuMF(PairScorer):
    """NCF's NeuMF: a GMF branch and an MLP branch, concatenated into one output logit."""

    label = "NeuMF"

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
                "layers": [2 * dim] + _tower_widths(state, "mlp.tower")}


class EASE:
    """EASE (Steck 2019): item-item weights B from the Gram matrix; a user's scores are x_u B."""

    label = "EASE"
    neural = False

    def __init__(self, weights: torch.Tensor, history: "History | sp.csr_matrix"):
        self.weights = weights  # [n_items, n_items], zero diagonal
        self.history = matrix_of(history).tocsr()

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor], history: sp.csr_matrix) -> "EASE":
        """EASE with the saved weights, scoring each user from their row of `history`."""
        return cls(state["weights"].float(), history)

    @classmethod
    def fit(cls, train: sp.csr_matrix, section: dict) -> dict[str, torch.Tensor]:
        """Return the checkpoint: the weights for the `lambda` of the section."""
        if train.shape[1] > MAX_EASE_ITEMS:
            raise PipelineError(f"ease: {train.shape[1]:,} items; EASE inverts an items x items matrix "
                                f"({4 * train.shape[1] ** 2 / 2**30:.1f} GiB in float32), and this pipeline stops at "
                                f"{MAX_EASE_ITEMS:,} items. Remove ease from 'models' in params.yaml, or keep fewer "
                                "items (min_rating, or a custom table of the popular ones).")
        return {"weights": cls.weights_for(train, section["lambda"])}

    @staticmethod
    def weights_for(train: sp.csr_matrix, lam: float) -> torch.Tensor:
        """Return B = I - P / diag(P), P = (X^T X + lam I)^-1, as float32.

        One items x items matrix in memory: the Gram matrix is built in place, Cholesky-factored and
        inverted in place (LAPACK potrf/potri through torch), then scaled in place. In float64 up to
        EXACT_EASE_ITEMS items; above, in float32 (half the memory and time: 2.9 GB and about 4
        minutes at ml-20m's 26,744 items on one core; on ml-100k both give the same ranks).
        """
        n = train.shape[1]
        dtype = torch.float64 if n <= EXACT_EASE_ITEMS else torch.float32
        gram = torch.from_numpy(gram_matrix(train, np.float64 if dtype == torch.float64 else np.float32))
        gram.diagonal().add_(lam)
        torch.linalg.cholesky(gram, out=gram)
        torch.cholesky_inverse(gram, out=gram)  # gram now holds P
        scale = gram.diagonal().clone().neg_()
        weights = gram.div_(scale[None, :])
        weights.diagonal().zero_()
        return weights.float()

    @property
    def n_items(self) -> int:
        return self.weights.shape[0]

    def score_all(self, users: np.ndarray) -> torch.Tensor:
        rows = self.history[np.asarray(users)].astype(np.float32)
        return torch.from_numpy(np.asarray(rows @ self.weights.numpy()))

    def score(self, users: np.ndarray, items: np.ndarray, max_gathers: int = 1 << 24) -> np.ndarray:
        """Scores of each user's candidate items: the sum of B[h, c] over the user's history items h.

        Gathers only the candidates' columns (history x candidates per user), not every item's
        score: at ml-20m that is 2 billion gathers instead of 534 billion multiply-adds."""
        users, items = np.asarray(users), np.asarray(items)
        out = torch.zeros(items.shape, dtype=torch.float32)
        rows = self.history[users]
        counts = np.diff(rows.indptr)
        for lo, hi in chunk_bounds(counts * max(items.shape[1], 1), max_gathers):
            owner = torch.from_numpy(np.repeat(np.arange(hi - lo), counts[lo:hi]))
            history = torch.from_numpy(rows.indices[rows.indptr[lo]:rows.indptr[hi]].astype(np.int64))
            candidates = torch.from_numpy(items[lo:hi].astype(np.int64))
            out[lo:hi].index_add_(0, owner, self.weights[history[:, None], candidates[owner]])
        return out.numpy().astype(np.float64)


def chunk_bounds(costs: np.ndarray, budget: int) -> list[tuple[int, int]]:
    """Split 0..len(costs) into consecutive (lo, hi) ranges costing about `budget` each (at least one item)."""
    cumulative = np.cumsum(np.asarray(costs, dtype=np.int64))
    if len(cumulative) == 0:
        return []
    ends = np.searchsorted(cumulative, np.arange(budget, int(cumulative[-1]) + budget, budget), side="right")
    ends = np.unique(np.append(np.clip(ends, 1, len(costs)), len(costs)))
    return list(zip(np.concatenate([[0], ends[:-1]]).tolist(), ends.tolist()))


def gram_matrix(x: sp.csr_matrix, dtype=np.float64, max_entries: int = 1 << 25) -> np.ndarray:
    """X^T X of a binary users x items matrix, dense, a block of rows at a time.

    Rows i0..i1 of the result are X[:, i0:i1]^T X, a sparse product written straight into the dense
    result; a block holds at most about max_entries values, so memory beyond the result stays bounded."""
    x = x.tocsr().astype(dtype)
    x.data[:] = 1
    n = x.shape[1]
    gram = np.zeros((n, n), dtype=dtype)
    by_item = x.T.tocsr()  # items x users
    rows = max(1, max_entries // max(n, 1))
    for lo in range(0, n, rows):
        (by_item[lo:lo + rows] @ x).toarray(out=gram[lo:lo + rows])
    return gram


EXACT_EASE_ITEMS = 16_384  # EASE inverts in float64 up to this many items (2 GB), in float32 above
MAX_EASE_ITEMS = 40_000  # float32: 6.4 GB for the one items x items matrix
from pipeline.sasrec import SASRec  # noqa: E402 (after the shared pieces it does not import)

REGISTRY: dict[str, type] = {"itempop": ItemPop, "mlp": MLP, "gmf": GMF, "mf": MF, "ease": EASE, "neumf": NeuMF,
                             "sasrec": SASRec}
MODEL_CLASSES = {name: cls for name, cls in REGISTRY.items() if cls.neural}  # the neural ones


def load_state(name: str, path: Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint written by a train stage (tensors only: torch.load(weights_only=True))."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise PipelineError(f"{path}: not found; run `dvc repro` to train {name}") from None
    except Exception as err:  # torch raises many kinds for a file that is not a checkpoint
        raise PipelineError(f"{path}: not a readable model checkpoint ({type(err).__name__}: {err})") from None


def load_model(name: str, path: Path, history: sp.csr_matrix, device: torch.device | None = None):
    """Load model `name` from `path`; `history` is what a user is known to have seen (EASE's input).

    A neural model is moved to `device` (if given), where it then scores; the others score on the CPU."""
    state = load_state(name, path)
    try:
        model = REGISTRY[name].from_state(state, history)
    except (KeyError, AttributeError, TypeError, ValueError) as err:
        raise PipelineError(f"{path}: not a valid {name} checkpoint ({err})") from None
    if model.n_items != history.shape[1]:
        raise PipelineError(f"{path}: {name} was trained on {model.n_items} items, the data has {history.shape[1]}; "
                            "run `dvc repro`")
    return model.to(device) if device is not None and model.neural else model
