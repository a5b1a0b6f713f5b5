"""Load and validate params.yaml once: types, ranges, unknown keys, cross-key rules.

DVC writes some values in a form PyYAML reads as strings (`dvc exp run -S lr=0.00001` writes
`lr: 1e-05`), so numbers given as strings are accepted and converted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.common import PipelineError

PARAMS_FILE = "params.yaml"


@dataclass(frozen=True)
class Spec:
    """One top-level key of params.yaml: its kind and allowed values.

    Kinds: 'int', 'float', 'int_list' (in [low, high]); 'choice' (one of `choices`); 'bool';
    'str' (any text); 'column' (a column name, or a 0-based position; '' for none if `optional`).
    """

    kind: str
    low: float = 0
    high: float = 0
    low_open: bool = False  # True: the value must be strictly greater than `low`
    high_open: bool = False  # True: the value must be strictly less than `high`
    choices: tuple[str, ...] = ()
    optional: bool = False
    fields: dict[str, "Spec"] | None = None  # kind 'section': a mapping with exactly these keys

    def describe(self) -> str:
        if self.kind == "choice":
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.kind == "section":
            return "a mapping with the keys " + (", ".join(self.fields) or "(none: {})")
        if self.kind == "choice_list":
            size = "a list" if self.optional else "a non-empty list"
            return f"{size} of distinct names from " + ", ".join(self.choices) + (" ([] for none)" if self.optional else "")
        if self.kind == "bool":
            return "true or false"
        if self.kind == "str":
            return "a non-empty string"
        if self.kind == "column":
            return "a column name or 0-based position" + (", or '' for none" if self.optional else "")
        lo = "(" if self.low_open else "["
        hi = ")" if self.high_open else "]"
        what = {"int": "an integer", "float": "a number", "int_list": "a list of integers, each"}[self.kind]
        return f"{what} in {lo}{_fmt(self.low)}, {_fmt(self.high)}{hi}"


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


DATASET_NAMES = ("ml-100k", "ml-1m", "ml-20m", "ml-25m", "ml-latest-small", "custom", "synthetic-1m",
                 "synthetic-20m")
CORE_MODELS = ("itempop", "mlp")  # always trained: stages train_itempop and train_mlp (the user's contract)
ADDED_MODELS = ("gmf", "mf", "ease", "sasrec")  # trained from the data alone: stage train@<name>, chosen by `models`
FUSED_MODELS = ("neumf",)  # start from other models' checkpoints: stage fuse@<name>, chosen by `fused`
MODEL_NAMES = CORE_MODELS + ADDED_MODELS + FUSED_MODELS
LABELS = {"itempop": "ItemPop", "mlp": "MLP", "gmf": "GMF", "mf": "MF", "ease": "EASE", "neumf": "NeuMF",
          "sasrec": "SASRec"}
FUSED_FROM = {"neumf": ("gmf", "mlp")}  # the checkpoints each fused model starts from
SEPARATORS = (",", "\t", ";", "|", "::", " ")

_LOOP = {  # the shared training loop's settings: top-level keys for the MLP, a section's fields for the others
    "lr": Spec("float", 0.0, 1.0, low_open=True),
    "weight_decay": Spec("float", 0.0, 1.0),
    "epochs": Spec("int", 1, 10000),
    "batch_size": Spec("int", 1, 2**24),
    "negatives": Spec("int", 1, 1000),
}
_DROPOUT = Spec("float", 0.0, 1.0, high_open=True)
# The MLP's knobs are top-level keys (`dvc exp run -S lr=0.01`): the model the project began with.
MLP_KEYS = ("layers", "dropout", *_LOOP)

SPECS: dict[str, Spec] = {
    "layers": Spec("int_list", 1, 65536),
    "dropout": _DROPOUT,
    **_LOOP,
    "topK": Spec("int", 1, 100001),
    "test_negatives": Spec("int", 1, 100000),
    "refit": Spec("bool"),
    "full_rank_users": Spec("int", 0, 2**31 - 1),
    "dataset": Spec("choice", choices=DATASET_NAMES),
    "custom_path": Spec("str"),
    "custom_sep": Spec("choice", choices=SEPARATORS),
    "custom_header": Spec("bool"),
    "custom_user": Spec("column"),
    "custom_item": Spec("column"),
    "custom_time": Spec("column", optional=True),
    "custom_rating": Spec("column", optional=True),
    "min_rating": Spec("float", 0.0, 1e9),
    "seed": Spec("int", 0, 2**32 - 1),
    "candidate_seed": Spec("int", 0, 2**32 - 1),
    "models": Spec("choice_list", choices=ADDED_MODELS, optional=True),
    "fused": Spec("choice_list", choices=FUSED_MODELS, optional=True),
    # One section per added model: its stage reads exactly its own section.
    "gmf": Spec("section", fields={"factors": Spec("int", 1, 65536), **_LOOP}),
    "mf": Spec("section", fields={"factors": Spec("int", 1, 65536), **_LOOP}),
    "ease": Spec("section", fields={"lambda": Spec("float", 0.0, 1e12, low_open=True)}),
    "neumf": Spec("section", fields={"dropout": _DROPOUT, **_LOOP}),
    "sasrec": Spec("section", fields={
        "max_len": Spec("int", 1, 4096), "hidden": Spec("int", 1, 4096), "blocks": Spec("int", 1, 64),
        "heads": Spec("int", 1, 64), "dropout": _DROPOUT, "loss": Spec("choice", choices=("ce", "bce")),
        "lr": _LOOP["lr"], "weight_decay": _LOOP["weight_decay"], "epochs": _LOOP["epochs"],
        "batch_size": Spec("int", 1, 2**20)}),
    "device": Spec("choice", choices=("auto", "cpu", "cuda")),
    "recommend_model": Spec("choice", choices=MODEL_NAMES),
    "recommend_n": Spec("int", 1, 1000),
}

# Keys of earlier releases, and what replaced them (named in the error for an unknown key).
RENAMED = {
    "mlp": "the MLP's knobs are top-level keys now: " + ", ".join(MLP_KEYS) + " (dvc exp run -S lr=0.01)",
    "itempop": "ItemPop has no knobs; it is always trained (stage train_itempop)",
}


def _to_int(key: str, value: Any, spec: Spec, source: str) -> int:
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, int):
        raise PipelineError(f"{source}: '{key}' must be {spec.describe()}, got {value!r}")
    return value


def _to_float(key: str, value: Any, spec: Spec, source: str) -> float:
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            pass
    try:
        finite = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    except OverflowError:  # an int too large for a float
        finite = False
    if not finite:
        raise PipelineError(f"{source}: '{key}' must be {spec.describe()}, got {value!r}")
    return float(value)


def _check_range(key: str, value: float, spec: Spec, shown: Any, source: str) -> None:
    too_low = value <= spec.low if spec.low_open else value < spec.low
    too_high = value >= spec.high if spec.high_open else value > spec.high
    if too_low or too_high:
        raise PipelineError(f"{source}: '{key}' must be {spec.describe()}, got {shown!r}")


def _convert(key: str, value: Any, source: str, spec: Spec | None = None) -> Any:
    spec = spec or SPECS[key]
    bad = PipelineError(f"{source}: '{key}' must be {spec.describe()}, got {value!r}")
    if spec.kind == "section":
        if value is None and not spec.fields:
            return {}
        if not isinstance(value, dict):
            raise bad
        unknown = sorted(str(k) for k in value if k not in spec.fields)
        if unknown:
            raise PipelineError(f"{source}: unknown key(s) {', '.join(repr(f'{key}.{k}') for k in unknown)}; "
                                f"'{key}' has {', '.join(spec.fields) or 'no keys'}")
        missing = [k for k in spec.fields if k not in value]
        if missing:
            raise PipelineError(f"{source}: missing key(s) {', '.join(repr(f'{key}.{k}') for k in missing)}")
        return {k: _convert(f"{key}.{k}", value[k], source, sub) for k, sub in spec.fields.items()}
    if spec.kind == "choice":
        if value not in spec.choices:
            raise bad
        return value
    if spec.kind == "choice_list":
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except Exception:  # noqa: BLE001 (reported below)
                pass
        if value is None and spec.optional:
            value = []
        if (not isinstance(value, list) or (not value and not spec.optional)
                or len(set(map(str, value))) != len(value) or any(v not in spec.choices for v in value)):
            raise PipelineError(f"{source}: '{key}' must be {spec.describe()}, got {value!r}")
        return value
    if spec.kind == "bool":
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        if not isinstance(value, bool):
            raise bad
        return value
    if spec.kind == "str":
        if not isinstance(value, str) or not value.strip():
            raise bad
        return value
    if spec.kind == "column":
        if isinstance(value, bool) or not isinstance(value, (str, int)) or (isinstance(value, int) and value < 0):
            raise bad
        if value == "" and not spec.optional:
            raise bad
        if isinstance(value, str) and value.strip().startswith("-") and value.strip()[1:].isdigit():
            raise bad  # a negative position
        return value
    if spec.kind == "int_list":
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except Exception:  # noqa: BLE001 (YAML raises many kinds for odd text); the check below reports it
                pass
        if not isinstance(value, list) or not value:
            raise PipelineError(f"{source}: '{key}' must be {spec.describe().replace('a list', 'a non-empty list', 1)}, "
                                f"got {value!r}")
        items = [_to_int(key, v, spec, source) for v in value]
        for v in items:
            _check_range(key, v, spec, value, source)
        return items
    convert = _to_int if spec.kind == "int" else _to_float
    number = convert(key, value, spec, source)
    _check_range(key, number, spec, value, source)
    return number


def validate(raw: Any, source: str = PARAMS_FILE) -> dict[str, Any]:
    """Return the params with every key converted and checked; raise PipelineError naming the key."""
    if not isinstance(raw, dict):
        raise PipelineError(f"{source}: expected a mapping of top-level keys, got {type(raw).__name__}")
    unknown = sorted(str(k) for k in raw if k not in SPECS)
    if unknown:
        moved = [f"{k!r}: {RENAMED[k]}" for k in unknown if k in RENAMED]
        raise PipelineError(
            f"{source}: unknown key(s) {', '.join(repr(k) for k in unknown)}; "
            + ("; ".join(moved) if moved else f"known keys: {', '.join(SPECS)}")
        )
    missing = [k for k in SPECS if k not in raw]
    if missing:
        raise PipelineError(f"{source}: missing key(s) {', '.join(repr(k) for k in missing)}")
    for key in ("models", "fused"):  # a core model listed here would otherwise read as a typo
        value = raw[key]
        core = [m for m in CORE_MODELS if isinstance(value, list) and m in value]
        if core:
            raise PipelineError(
                f"{source}: '{key}' lists {', '.join(map(repr, core))}, which always train (stages "
                f"{', '.join('train_' + m for m in core)}); '{key}' names only the added models: "
                f"{', '.join(SPECS[key].choices)}")
    params = {key: _convert(key, raw[key], source) for key in SPECS}
    if params["layers"][0] % 2:
        raise PipelineError(
            f"{source}: 'layers' first entry must be even (it is split into a user and an item "
            f"embedding of half that size each), got {params['layers'][0]}"
        )
    if params["sasrec"]["hidden"] % params["sasrec"]["heads"]:
        raise PipelineError(f"{source}: 'sasrec.hidden' ({params['sasrec']['hidden']}) must be a multiple of "
                            f"'sasrec.heads' ({params['sasrec']['heads']}): each head takes an equal share")
    for name in params["fused"]:
        needs = [m for m in FUSED_FROM[name] if m not in CORE_MODELS and m not in params["models"]]
        if needs:
            raise PipelineError(
                f"{source}: 'fused' has {name!r}, which starts from the {' and '.join(FUSED_FROM[name])} "
                f"checkpoints, but 'models' lacks {', '.join(map(repr, needs))}; add it to 'models' or "
                f"remove {name!r} from 'fused'")
    if params["min_rating"] > 0 and params["dataset"] == "custom" and params["custom_rating"] == "":
        raise PipelineError(f"{source}: 'min_rating' is {params['min_rating']}, but custom_rating is '' "
                            "(the custom table has no rating column); set min_rating to 0")
    if params["recommend_model"] not in trained_models(params):
        raise PipelineError(f"{source}: 'recommend_model' is {params['recommend_model']!r}, which is not "
                            f"trained ({', '.join(trained_models(params))}); add it to 'models' or 'fused', "
                            "or pick one of those")
    candidates = params["test_negatives"] + 1
    if params["topK"] > candidates:
        raise PipelineError(
            f"{source}: 'topK' must be at most test_negatives + 1 = {candidates} "
            f"(the size of each candidate list), got {params['topK']}"
        )
    return params


def trained_models(params: dict[str, Any]) -> list[str]:
    """Every model the pipeline trains and evaluates, in dvc.yaml's order: itempop, mlp, models, fused."""
    return [*CORE_MODELS, *params["models"], *params["fused"]]


def model_section(params: dict[str, Any], name: str) -> dict[str, Any]:
    """A model's own knobs: the MLP's top-level keys, another model's section ({} for ItemPop)."""
    if name == "mlp":
        return {key: params[key] for key in MLP_KEYS}
    return params.get(name, {}) if name in MODEL_NAMES else {}


def load_params(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    """Read and validate params.yaml; return every key, converted."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PipelineError(f"{path}: not found (run from the repository root)") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise PipelineError(f"{path}:{where}: not valid YAML: {problem}") from None
    return validate(raw, str(path))
