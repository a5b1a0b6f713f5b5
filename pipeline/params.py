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
            return "a non-empty list of distinct names from " + ", ".join(self.choices)
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
MODEL_NAMES = ("itempop", "mlp", "gmf", "neumf", "mf", "ease")
SEPARATORS = (",", "\t", ";", "|", "::", " ")

_LOOP = {  # the shared training loop's settings, in every neural model's section
    "lr": Spec("float", 0.0, 1.0, low_open=True),
    "weight_decay": Spec("float", 0.0, 1.0),
    "epochs": Spec("int", 1, 10000),
    "batch_size": Spec("int", 1, 2**24),
    "negatives": Spec("int", 1, 1000),
}

SPECS: dict[str, Spec] = {
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
    "models": Spec("choice_list", choices=MODEL_NAMES),
    # One section per model: its stage `train@<model>` reads exactly its own section.
    "itempop": Spec("section", fields={}),
    "mlp": Spec("section", fields={
        "layers": Spec("int_list", 1, 65536), "dropout": Spec("float", 0.0, 1.0, high_open=True), **_LOOP}),
    "gmf": Spec("section", fields={"factors": Spec("int", 1, 65536), **_LOOP}),
    "neumf": Spec("section", fields={
        "factors": Spec("int", 1, 65536), "layers": Spec("int_list", 1, 65536),
        "dropout": Spec("float", 0.0, 1.0, high_open=True), "pretrain": Spec("bool"),
        "pretrain_lr": Spec("float", 0.0, 1.0, low_open=True), "pretrain_epochs": Spec("int", 1, 10000), **_LOOP}),
    "mf": Spec("section", fields={"factors": Spec("int", 1, 65536), **_LOOP}),
    "ease": Spec("section", fields={"lambda": Spec("float", 0.0, 1e12, low_open=True)}),
    "test_negatives": Spec("int", 1, 100000),
    "topK": Spec("int", 1, 100001),
    "device": Spec("choice", choices=("auto", "cpu", "cuda")),
    "recommend_model": Spec("choice", choices=MODEL_NAMES),
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
    if spec.kind == "choice_list":
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except Exception:  # noqa: BLE001 (reported below)
                pass
        if (not isinstance(value, list) or not value or len(set(map(str, value))) != len(value)
                or any(v not in spec.choices for v in value)):
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


def _sections_with(field: str) -> list[str]:
    """The model sections that have `field` (e.g. 'lr' -> mlp, gmf, neumf, mf)."""
    return [name for name, spec in SPECS.items() if spec.kind == "section" and field in spec.fields]


def validate(raw: Any, source: str = PARAMS_FILE) -> dict[str, Any]:
    """Return the params with every key converted and checked; raise PipelineError naming the key."""
    if not isinstance(raw, dict):
        raise PipelineError(f"{source}: expected a mapping of top-level keys, got {type(raw).__name__}")
    unknown = sorted(str(k) for k in raw if k not in SPECS)
    if unknown:
        moved = [f"{k!r} is now per model: {', '.join(repr(f'{name}.{k}') for name in _sections_with(k))} "
                 f"(dvc exp run -S {_sections_with(k)[0]}.{k}=...)" for k in unknown if _sections_with(k)]
        raise PipelineError(
            f"{source}: unknown key(s) {', '.join(repr(k) for k in unknown)}; "
            + ("; ".join(moved) if moved else f"known keys: {', '.join(SPECS)}")
        )
    missing = [k for k in SPECS if k not in raw]
    if missing:
        raise PipelineError(f"{source}: missing key(s) {', '.join(repr(k) for k in missing)}")
    params = {key: _convert(key, raw[key], source) for key in SPECS}
    for key in ("mlp", "neumf"):
        if params[key]["layers"][0] % 2:
            raise PipelineError(
                f"{source}: '{key}.layers' first entry must be even (it is split into a user and an item "
                f"embedding of half that size each), got {params[key]['layers'][0]}"
            )
    if params["min_rating"] > 0 and params["dataset"] == "custom" and params["custom_rating"] == "":
        raise PipelineError(f"{source}: 'min_rating' is {params['min_rating']}, but custom_rating is '' "
                            "(the custom table has no rating column); set min_rating to 0")
    if params["recommend_model"] not in params["models"]:
        raise PipelineError(f"{source}: 'recommend_model' is {params['recommend_model']!r}, which is not in "
                            f"'models' ({', '.join(params['models'])}); add it there or pick one of those")
    candidates = params["test_negatives"] + 1
    if params["topK"] > candidates:
        raise PipelineError(
            f"{source}: 'topK' must be at most test_negatives + 1 = {candidates} "
            f"(the size of each candidate list), got {params['topK']}"
        )
    return params


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
