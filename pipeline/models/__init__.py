"""The models: one module per model in this package, the interface they all provide, and the registry.

A model named `x` is the class `MODEL` of `pipeline/models/x.py`, with its section `x:` in params.yaml.
`list_models()` finds the names from the files alone and `get(name)` imports just that module, so a
stage runs the code of the models it depends on and no other. Adding a model is a new module here
plus its section in params.yaml: no stage, params or report code knows a model by name.
"""
from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pipeline.common import PipelineError

if TYPE_CHECKING:  # the interface's types; importing this package imports no torch
    import numpy as np
    import scipy.sparse as sp
    import torch

    from pipeline.data import History
    from pipeline.params import Search, Spec

PACKAGE = Path(__file__).parent


class Model:
    """What every model provides: what the stages need to know of it, and how it scores.

    A model is a class (an `nn.Module` for the neural ones) with these class attributes, set in its
    module. Neural models (`neural = True`) are built by `from_params` and trained by the shared loop
    (pipeline.training.fit) on the objective `objective` returns; closed-form ones are fitted by `fit`.
    Both come back from a checkpoint (a dict of tensors) by `from_state`, and then score.
    """

    label: ClassVar[str]  # the display name, in every table and chart: "MLP"
    neural: ClassVar[bool]  # trained by the shared epoch loop (True), or fitted in closed form (False)
    params: ClassVar[Mapping[str, "Spec"]] = {}  # its knobs: the fields of its section in params.yaml
    search: ClassVar[Mapping[str, "Search"]] = {}  # the knobs `python -m pipeline.tune` searches, and their ranges
    top_level: ClassVar[bool] = False  # its knobs are top-level keys instead (the MLP: the user's contract)
    always_trained: ClassVar[bool] = False  # has a stage of its own (train_<name>), not chosen by `models`
    fused_from: ClassVar[tuple[str, ...]] = ()  # starts from these models' checkpoints (stage fuse@<name>)
    baseline: ClassVar[bool] = False  # the model every other one is also compared with (ItemPop)
    lazy_tables: ClassVar[bool] = True  # a neural model's large embedding tables may be updated sparsely

    @classmethod
    def check(cls, section: dict[str, Any], source: str) -> None:
        """Rules across its knobs, after each has been checked alone: raise PipelineError naming them."""

    @classmethod
    def from_params(cls, n_users: int, n_items: int, section: dict[str, Any]) -> "Model":
        """A neural model, freshly initialised (from torch's global generator) for its section."""
        raise NotImplementedError(f"{cls.label} is not trained by the shared loop")

    @classmethod
    def from_sources(cls, sources: list["Model"], section: dict[str, Any]) -> "Model":
        """A fused model built from trained models of `fused_from`, in that order."""
        raise NotImplementedError(f"{cls.label} is not fused from other models")

    @staticmethod
    def fit(train: "sp.csr_matrix", section: dict[str, Any]) -> dict[str, "torch.Tensor"]:
        """A closed-form model's checkpoint, fitted on the binary users x items matrix `train`."""
        raise NotImplementedError

    @classmethod
    def from_state(cls, state: Mapping[str, "torch.Tensor"], history: "History") -> "Model":
        """The model saved as `state`, ready to score users who have seen `history` (in eval mode)."""
        raise NotImplementedError

    def objective(self, train: "History", cfg: Any, device: "torch.device") -> Any:
        """What the shared loop optimises for this neural model: an object with batches(generators),
        an epoch's batches, and loss(batch) -> (summed loss, examples) (pipeline.training.PairObjective)."""
        raise NotImplementedError(f"{self.label} is not trained by the shared loop")

    def use_history(self, history: "History") -> None:
        """Score users from these interactions from now on (validation: train; test: train + validation)."""

    def set_dropout_generator(self, generator: "torch.Generator | None") -> None:
        """Draw every dropout mask from `generator` (the training loop's own stream)."""

    @property
    def n_items(self) -> int:
        raise NotImplementedError

    def score(self, users: "np.ndarray", items: "np.ndarray") -> "np.ndarray":
        """Float64 scores [len(users), items.shape[1]] of users[i] for items[i, :]; higher is better."""
        raise NotImplementedError

    def score_all(self, users: "np.ndarray") -> "torch.Tensor":
        """Float32 scores [len(users), n_items] of every item, on the CPU."""
        raise NotImplementedError


def list_models() -> list[str]:
    """Every model's name: the modules of this package (not those starting with '_'), sorted."""
    return sorted(p.stem for p in PACKAGE.glob("*.py") if not p.stem.startswith("_"))


def get(name: str) -> type[Model]:
    """The model class of module pipeline/models/<name>.py (imported only now)."""
    if name not in list_models():
        raise PipelineError(f"no model {name!r}: pipeline/models/ has {', '.join(list_models())}")
    return importlib.import_module(f"{__name__}.{name}").MODEL


def label(name: str) -> str:
    """A model's display name; the name itself for one whose module is gone (an older run's model)."""
    return get(name).label if name in list_models() else name


TRAIN_ONLY = "trainonly"  # MODEL.trainonly.pt: the validation-chosen model, trained on train only


def checkpoint_paths(models_dir: Path, name: str) -> tuple[Path, Path]:
    """(the test-time checkpoint, the train-only one) of model `name`."""
    return models_dir / f"{name}.pt", models_dir / f"{name}.{TRAIN_ONLY}.pt"


def load_state(name: str, path: Path) -> dict[str, "torch.Tensor"]:
    """Read a checkpoint written by a train stage (tensors only: torch.load(weights_only=True))."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise PipelineError(f"{path}: not found; run `dvc repro` to train {name}") from None
    except Exception as err:  # torch raises many kinds for a file that is not a checkpoint
        raise PipelineError(f"{path}: not a readable model checkpoint ({type(err).__name__}: {err})") from None


def load_model(name: str, path: Path, history: "History", device: "torch.device | None" = None) -> Model:
    """Load model `name` from `path`, scoring users who have seen `history` (what EASE and SASRec read).

    A neural model is moved to `device` (if given), where it then scores; the others score on the CPU."""
    state = load_state(name, path)
    try:
        model = get(name).from_state(state, history)
    except (KeyError, AttributeError, TypeError, ValueError) as err:
        raise PipelineError(f"{path}: not a valid {name} checkpoint ({err})") from None
    if model.n_items != history.shape[1]:
        raise PipelineError(f"{path}: {name} was trained on {model.n_items} items, the data has {history.shape[1]}; "
                            "run `dvc repro`")
    return model.to(device) if device is not None and model.neural else model
