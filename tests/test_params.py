"""params.yaml validation: conversions DVC needs, and an error naming the key for every bad value."""
from __future__ import annotations

import copy

import pytest
import yaml

from conftest import REPO
from pipeline.common import PipelineError
from pipeline.params import SPECS, load_params, validate

REPO_PARAMS = REPO / "params.yaml"


@pytest.fixture(scope="module")
def base() -> dict:
    """The repository's params, as PyYAML reads them."""
    return yaml.safe_load(REPO_PARAMS.read_text(encoding="utf-8"))


def with_(base: dict, **changes) -> dict:
    """A copy of base with keys replaced; 'mlp.lr' replaces lr inside the mlp section."""
    raw = copy.deepcopy(base)
    for key, value in changes.items():
        section, _, field = key.rpartition(".")
        (raw[section] if section else raw)[field] = value
    return raw


def pick(params: dict, key: str):
    """params['mlp']['lr'] for 'mlp.lr'."""
    section, _, field = key.rpartition(".")
    return (params[section] if section else params)[field]


def test_repository_params_validate(base):
    params = load_params(REPO_PARAMS)
    assert set(params) == set(SPECS)
    assert params == validate(base)
    assert isinstance(params["mlp"]["lr"], float) and isinstance(params["seed"], int)
    layers = params["mlp"]["layers"]
    assert isinstance(layers, list) and all(isinstance(v, int) for v in layers) and layers[0] % 2 == 0
    assert params["topK"] <= params["test_negatives"] + 1


NUMERIC = ("seed", "mlp.layers", "mlp.lr", "mlp.weight_decay", "mlp.dropout", "mlp.batch_size", "mlp.epochs",
           "mlp.negatives", "test_negatives", "topK")


def test_validate_returns_a_copy_with_the_same_values(base):
    values = {"seed": 3, "mlp.layers": [8, 4], "mlp.lr": 0.5, "mlp.weight_decay": 1, "mlp.dropout": 0,
              "mlp.batch_size": 1, "mlp.epochs": 1, "mlp.negatives": 1, "test_negatives": 1, "topK": 2}
    params = {k: pick(validate(with_(base, **values)), k) for k in NUMERIC}
    assert params == {**values, "mlp.weight_decay": 1.0, "mlp.dropout": 0.0}
    assert type(params["mlp.weight_decay"]) is float and type(params["mlp.dropout"]) is float


# --- conversions of the strings DVC writes -------------------------------------------------------

@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("mlp.lr", "1e-05", 1e-05),
        ("mlp.lr", " 0.5 ", 0.5),
        ("mlp.lr", 1, 1.0),
        ("mlp.weight_decay", "0", 0.0),
        ("mlp.dropout", "0.25", 0.25),
        ("mlp.negatives", "8", 8),
        ("mlp.epochs", "3", 3),
        ("seed", "0", 0),
        ("seed", 2**32 - 1, 2**32 - 1),
        ("mlp.layers", "[64,32,16,8]", [64, 32, 16, 8]),
        ("mlp.layers", "[8, 4]", [8, 4]),
        ("mlp.layers", ["16", 8], [16, 8]),
        ("mlp.layers", [2], [2]),
    ],
)
def test_conversions(base, key, value, expected):
    got = pick(validate(with_(base, **{key: value})), key)
    assert got == expected
    assert type(got) is type(expected)


def test_dvc_style_params_file(tmp_path, base):
    """What `dvc exp run -S mlp.lr=0.00001 -S mlp.negatives=8` can leave in params.yaml."""
    raw = with_(base)
    raw["mlp"] = {k: v for k, v in raw["mlp"].items() if k not in ("lr", "negatives")}
    text = yaml.safe_dump(raw).replace("mlp:\n", "mlp:\n  lr: 1e-05\n  negatives: '8'\n")
    path = tmp_path / "params.yaml"
    path.write_text(text, encoding="utf-8")
    assert yaml.safe_load(text)["mlp"]["lr"] == "1e-05"  # PyYAML reads this as a string
    params = load_params(path)
    assert params["mlp"]["lr"] == 1e-05 and type(params["mlp"]["lr"]) is float
    assert params["mlp"]["negatives"] == 8 and type(params["mlp"]["negatives"]) is int


# --- bad values: the message names the key -------------------------------------------------------

@pytest.mark.parametrize(
    "key, value",
    [
        # wrong type
        ("mlp.lr", "abc"),
        ("mlp.lr", None),
        ("mlp.lr", True),
        ("mlp.lr", float("nan")),
        ("mlp.lr", float("inf")),
        ("mlp.epochs", 2.5),
        ("mlp.epochs", "2.5"),
        ("mlp.batch_size", True),
        ("seed", [1]),
        ("mlp.layers", [64, "x"]),
        ("mlp.layers", [64, 32.5]),
        ("mlp.layers", []),
        ("mlp.layers", 64),
        ("mlp.layers", "abc"),
        # out of range
        ("mlp.lr", 0),
        ("mlp.lr", 2),
        ("mlp.lr", -0.1),
        ("mlp.weight_decay", -0.01),
        ("mlp.weight_decay", 1.5),
        ("mlp.dropout", 1.0),
        ("mlp.dropout", -0.1),
        ("mlp.negatives", 0),
        ("mlp.epochs", 0),
        ("mlp.batch_size", 0),
        ("test_negatives", 0),
        ("topK", 0),
        ("seed", -1),
        ("seed", 2**32),
        ("mlp.layers", [64, 0]),
        ("mlp.layers", [64, -8]),
    ],
)
def test_bad_value_names_the_key(base, key, value):
    with pytest.raises(PipelineError) as info:
        validate(with_(base, **{key: value}))
    assert f"'{key}'" in str(info.value)


@pytest.mark.parametrize("key, value, shown", [("mlp.lr", "abc", "'abc'"), ("mlp.dropout", 1.0, "1.0"),
                                               ("seed", -1, "-1")])
def test_bad_value_message_shows_the_value_and_range(base, key, value, shown):
    with pytest.raises(PipelineError) as info:
        validate(with_(base, **{key: value}))
    message = str(info.value)
    assert shown in message
    assert {"mlp.lr": "(0, 1]", "mlp.dropout": "[0, 1)", "seed": "[0, 4294967295]"}[key] in message


@pytest.mark.parametrize("key, value", [("mlp.lr", 1.0), ("mlp.dropout", 0.0), ("mlp.weight_decay", 1.0),
                                        ("mlp.weight_decay", 0.0), ("seed", 0), ("mlp.negatives", 1000)])
def test_range_boundaries_that_are_allowed(base, key, value):
    assert pick(validate(with_(base, **{key: value})), key) == value


@pytest.mark.parametrize("layers", [[63, 32], [7], "[9, 4]"])
def test_odd_first_layer(base, layers):
    with pytest.raises(PipelineError, match="'mlp.layers'.*even"):
        validate(with_(base, **{"mlp.layers": layers}))


def test_odd_later_layers_are_fine(base):
    assert validate(with_(base, **{"mlp.layers": [8, 5, 3]}))["mlp"]["layers"] == [8, 5, 3]


def test_topk_larger_than_candidate_list(base):
    assert validate(with_(base, test_negatives=9, topK=10))["topK"] == 10  # 10 candidates: allowed
    with pytest.raises(PipelineError) as info:
        validate(with_(base, test_negatives=9, topK=11))
    message = str(info.value)
    assert "topK" in message and "10" in message and "11" in message


def test_unknown_key(base):
    with pytest.raises(PipelineError) as info:
        validate(with_(base, learning_rate=0.1))
    assert "'learning_rate'" in str(info.value)
    assert "unknown" in str(info.value)


@pytest.mark.parametrize("key", sorted(SPECS))
def test_missing_key(base, key):
    raw = with_(base)
    del raw[key]
    with pytest.raises(PipelineError, match=f"missing key.*'{key}'"):
        validate(raw)


@pytest.mark.parametrize("raw", [None, [], "lr: 1", 3])
def test_not_a_mapping(raw):
    with pytest.raises(PipelineError, match="mapping"):
        validate(raw)


# --- files ---------------------------------------------------------------------------------------

def test_invalid_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("seed: 42\nlayers: [64, 32\nlr: 0.001\n", encoding="utf-8")
    with pytest.raises(PipelineError) as info:
        load_params(path)
    message = str(info.value)
    assert "broken.yaml" in message
    assert "not valid YAML" in message
    assert "line 3" in message  # the flow sequence is found unterminated on line 3


def test_invalid_yaml_bad_indentation(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("seed: 42\nlr: 0.001\n  epochs: 3\n", encoding="utf-8")
    with pytest.raises(PipelineError, match=r"params\.yaml.*line 3"):
        load_params(path)


def test_missing_params_file(tmp_path):
    with pytest.raises(PipelineError, match="not found"):
        load_params(tmp_path / "params.yaml")


def test_empty_params_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("", encoding="utf-8")
    with pytest.raises(PipelineError, match="mapping"):
        load_params(path)


def test_load_params_error_names_the_file_for_cross_key_rules(tmp_path, base):
    path = tmp_path / "other.yaml"
    path.write_text(yaml.safe_dump(with_(base, extra=1)), encoding="utf-8")
    with pytest.raises(PipelineError, match="other.yaml.*'extra'"):
        load_params(path)


def test_load_params_error_names_the_file_for_bad_values(tmp_path, base):
    path = tmp_path / "other.yaml"
    path.write_text(yaml.safe_dump(with_(base, **{"mlp.lr": "abc"})), encoding="utf-8")
    with pytest.raises(PipelineError, match="other.yaml.*'mlp.lr'"):
        load_params(path)
