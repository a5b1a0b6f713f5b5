"""Load and validate params.yaml once: types, ranges, unknown keys, cross-key rules.

DVC writes some values in a form PyYAML reads as strings (`dvc exp run -S lr=0.00001` writes
`lr: 1e-05`), so numbers given as strings are accepted and converted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import yaml

from pipeline.common import PipelineError
from pipeline.cpu import MODES as CPU_MODES
from pipeline.models import get as get_model, list_models

PARAMS_FILE = "params.yaml"


@dataclass(frozen=True)
class Spec:
    """One top-level key of params.yaml: its kind and allowed values.

    Kinds: 'int', 'float', 'int_list' (in [low, high]); 'choice' (one of `choices`); 'bool';
    'str' (any text); 'column' (a column name, or a 0-based position; '' for none if `optional`);
    'model' (a model's name: a module of pipeline/models/); 'model_list' (distinct names, [] for none).
    """

    kind: str
    low: float = 0
    high: float = 0
    low_open: bool = False  # True: the value must be strictly greater than `low`
    high_open: bool = False  # True: the value must be strictly less than `high`
    choices: tuple[str, ...] = ()
    optional: bool = False
    fields: dict[str, "Spec"] | None = None  # kind 'section': a mapping with exactly these keys
    doc: str = ""  # what the key means, for its comment in params.yaml and docs/params.md

    def describe(self) -> str:
        if self.kind == "choice":
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.kind == "section":
            return "a mapping with the keys " + (", ".join(self.fields) or "(none: {})")
        if self.kind == "model":
            return "one of the models " + ", ".join(list_models())
        if self.kind == "model_list":
            return "a list of distinct model names from " + ", ".join(list_models()) + " ([] for none)"
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


@dataclass(frozen=True)
class Search:
    """One knob's search range for `python -m pipeline.tune`: a number in [low, high] (sampled on a
    log scale with `log`; an integer if the knob's Spec is 'int'), or one of `choices`."""

    low: float = 0
    high: float = 0
    log: bool = False
    choices: tuple = ()

    def describe(self) -> str:
        if self.choices:
            return "one of " + ", ".join(str(c) for c in self.choices)
        return f"[{_fmt(self.low)}, {_fmt(self.high)}]" + (" (log scale)" if self.log else "")


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


DATASET_NAMES = ("ml-100k", "ml-1m", "ml-20m", "ml-25m", "ml-latest-small", "custom", "synthetic-1m",
                 "synthetic-20m")
SEPARATORS = (",", "\t", ";", "|", "::", " ")

# The shared training loop's knobs, for the models' specs (pipeline/models/): each neural model's
# section has them (the MLP's are top-level keys).
LOOP = {
    "lr": Spec("float", 0.0, 1.0, low_open=True, doc="learning rate"),
    "weight_decay": Spec("float", 0.0, 1.0, doc="decoupled weight decay: every weight shrinks by lr x weight_decay "
                                                "at every step (AdamW), on every table size"),
    "epochs": Spec("int", 1, 10000, doc="passes over the train interactions; the best-validation one is kept"),
    "batch_size": Spec("int", 1, 2**24, doc="training pairs per optimiser step"),
    "negatives": Spec("int", 1, 1000, doc="training negatives per positive, resampled every epoch"),
}
DROPOUT = Spec("float", 0.0, 1.0, high_open=True, doc="dropout rate while training")

# The keys that are not a model's: the protocol, the data, which models train, where. A model's own
# knobs are declared in its module (pipeline/models/<name>.py) and live in its section of params.yaml.
SPECS: dict[str, Spec] = {
    "topK": Spec("int", 1, 100001),
    "test_negatives": Spec("int", 1, 100000),
    "refit": Spec("bool"),
    "full_rank_users": Spec("int", 0, 2**31 - 1),
    "select_by": Spec("choice", choices=("sampled", "full")),
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
    "models": Spec("model_list"),
    "fused": Spec("model_list"),
    "device": Spec("choice", choices=("auto", "cpu", "cuda")),
    "cpu_kernels": Spec("choice", choices=CPU_MODES),
    "recommend_model": Spec("model"),
    "recommend_n": Spec("int", 1, 1000),
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
    if spec.kind == "model":
        if value not in list_models():
            raise bad
        return value
    if spec.kind == "model_list":
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except Exception:  # noqa: BLE001 (reported below)
                pass
        if value is None:
            value = []
        if (not isinstance(value, list) or len(set(map(str, value))) != len(value)
                or any(v not in list_models() for v in value)):
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


def validate(raw: Any, source: str = PARAMS_FILE, models: Iterable[str] | None = None) -> dict[str, Any]:
    """Return the params with every key converted and checked; raise PipelineError naming the key.

    The keys of SPECS always; of the models, the knobs of those named in `models` (None: every model,
    which imports every model's module). Another model's section is kept as it is, unchecked.
    """
    if not isinstance(raw, dict):
        raise PipelineError(f"{source}: expected a mapping of top-level keys, got {type(raw).__name__}")
    names = list_models() if models is None else list(dict.fromkeys(models))
    classes = {name: get_model(name) for name in names}
    known = set(SPECS) | set(list_models())
    if models is None:  # only then is every top-level key's owner known
        owned = {key: name for name, cls in classes.items() if cls.top_level for key in cls.params}
        unknown = sorted(str(k) for k in raw if k not in known | set(owned)
                         or (k in classes and (classes[k].top_level or not classes[k].params)))
        if unknown:
            moved = [f"{k!r}: {_no_section(k, classes[k])}" for k in unknown if k in classes]
            raise PipelineError(
                f"{source}: unknown key(s) {', '.join(repr(k) for k in unknown)}; "
                + ("; ".join(moved) if moved else f"known keys: {', '.join([*SPECS, *owned, *names])}"))
    missing = [k for k in SPECS if k not in raw]
    missing += [k for name, cls in classes.items() if cls.params for k in (cls.params if cls.top_level else [name])
                if k not in raw]
    if missing:
        raise PipelineError(f"{source}: missing key(s) {', '.join(repr(k) for k in missing)}")
    params = dict(raw)
    params.update({key: _convert(key, raw[key], source) for key in SPECS})
    for name, cls in classes.items():
        if cls.top_level:
            params.update({key: _convert(key, raw[key], source, spec) for key, spec in cls.params.items()})
        elif cls.params:
            params[name] = _convert(name, raw[name], source, Spec("section", fields=dict(cls.params)))
        cls.check(model_section(params, name), source)
        _check_listed(params, name, cls, source)
    for name, cls in classes.items():  # once every listed model is known to be in the right list
        _check_needs(params, name, cls, source)
    if params["min_rating"] > 0 and params["dataset"] == "custom" and params["custom_rating"] == "":
        raise PipelineError(f"{source}: 'min_rating' is {params['min_rating']}, but custom_rating is '' "
                            "(the custom table has no rating column); set min_rating to 0")
    candidates = params["test_negatives"] + 1
    if params["topK"] > candidates:
        raise PipelineError(
            f"{source}: 'topK' must be at most test_negatives + 1 = {candidates} "
            f"(the size of each candidate list), got {params['topK']}"
        )
    return params


def _no_section(name: str, cls) -> str:
    """Why model `name` has no section: its knobs are top-level keys, or it has none."""
    if cls.top_level:
        return f"the {cls.label}'s knobs are top-level keys: {', '.join(cls.params)} (dvc exp run -S KEY=VALUE)"
    return f"{cls.label} has no knobs" + (f"; it is always trained (stage train_{name})" if cls.always_trained else "")


def _check_listed(params: dict[str, Any], name: str, cls, source: str) -> None:
    """Model `name` is listed only where it belongs: `models` or `fused`, never if always trained."""
    for key in ("models", "fused"):
        if name not in params[key]:
            continue
        if cls.always_trained:
            raise PipelineError(f"{source}: '{key}' lists {name!r}, which always trains (stage train_{name}); "
                                f"'{key}' names only the models without a stage of their own")
        if bool(cls.fused_from) != (key == "fused"):
            right = "fused" if cls.fused_from else "models"
            raise PipelineError(f"{source}: '{key}' lists {name!r}; it belongs in '{right}'"
                                + (f" (it starts from {' and '.join(cls.fused_from)})" if cls.fused_from else ""))


def _check_needs(params: dict[str, Any], name: str, cls, source: str) -> None:
    """A fused model `name` has its sources trained, and it recommends only if trained."""
    if name in params["fused"]:
        needs = [m for m in cls.fused_from if m not in params["models"] and not get_model(m).always_trained]
        if needs:
            raise PipelineError(
                f"{source}: 'fused' has {name!r}, which starts from the {' and '.join(cls.fused_from)} "
                f"checkpoints, but 'models' lacks {', '.join(map(repr, needs))}; add it to 'models' or "
                f"remove {name!r} from 'fused'")
    if params["recommend_model"] == name and not is_trained(params, name):
        raise PipelineError(f"{source}: 'recommend_model' is {name!r}, which is not trained "
                            f"({', '.join(trained_models(params))}); add it to 'models' or 'fused', or pick one of "
                            "those")


def is_trained(params: dict[str, Any], name: str) -> bool:
    """Whether the pipeline trains model `name`: always, or listed in `models` or `fused`."""
    return name in params["models"] or name in params["fused"] or get_model(name).always_trained


def trained_models(params: dict[str, Any]) -> list[str]:
    """Every model the pipeline trains and evaluates, in dvc.yaml's order: the always trained, models, fused."""
    return [*(name for name in list_models() if get_model(name).always_trained), *params["models"], *params["fused"]]


def model_section(params: dict[str, Any], name: str) -> dict[str, Any]:
    """A model's own knobs: its section, or the top-level keys it owns (the MLP); {} for none."""
    cls = get_model(name)
    if cls.top_level:
        return {key: params[key] for key in cls.params}
    return params[name] if cls.params else {}


def load_params(path: str | Path = PARAMS_FILE, models: Iterable[str] | None = None) -> dict[str, Any]:
    """Read and validate params.yaml; return every key, converted (a model's knobs: see `validate`)."""
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
    return validate(raw, str(path), models)
