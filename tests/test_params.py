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
    raw = copy.deepcopy(base)
    raw.update(changes)
    return raw


def test_repository_params_validate(base):
    params = load_params(REPO_PARAMS)
    assert set(params) == set(SPECS)
    assert params == validate(base)
    assert isinstance(params["lr"], float) and isinstance(params["seed"], int)
    assert isinstance(params["layers"], list) and all(isinstance(v, int) for v in params["layers"])
    assert params["layers"][0] % 2 == 0
    assert params["topK"] <= params["test_negatives"] + 1


NUMERIC = ("seed", "layers", "lr", "weight_decay", "dropout", "batch_size", "epochs", "negatives",
           "test_negatives", "topK")


def test_validate_returns_a_copy_with_the_same_values(base):
    raw = with_(base, seed=3, layers=[8, 4], lr=0.5, weight_decay=1, dropout=0, batch_size=1,
                epochs=1, negatives=1, test_negatives=1, topK=2)
    params = {k: v for k, v in validate(raw).items() if k in NUMERIC}
    assert params == {"seed": 3, "layers": [8, 4], "lr": 0.5, "weight_decay": 1.0, "dropout": 0.0,
                      "batch_size": 1, "epochs": 1, "negatives": 1, "test_negatives": 1, "topK": 2}
    assert type(params["weight_decay"]) is float and type(params["dropout"]) is float


# --- conversions of the strings DVC writes -------------------------------------------------------

@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("lr", "1e-05", 1e-05),
        ("lr", " 0.5 ", 0.5),
        ("lr", 1, 1.0),
        ("weight_decay", "0", 0.0),
        ("dropout", "0.25", 0.25),
        ("negatives", "8", 8),
        ("epochs", "3", 3),
        ("seed", "0", 0),
        ("seed", 2**32 - 1, 2**32 - 1),
        ("layers", "[64,32,16,8]", [64, 32, 16, 8]),
        ("layers", "[8, 4]", [8, 4]),
        ("layers", ["16", 8], [16, 8]),
        ("layers", [2], [2]),
    ],
)
def test_conversions(base, key, value, expected):
    params = validate(with_(base, **{key: value}))
    assert params[key] == expected
    assert type(params[key]) is type(expected)


def test_dvc_style_params_file(tmp_path, base):
    """What `dvc exp run -S lr=0.00001 -S negatives=8` can leave in params.yaml."""
    others = {k: v for k, v in base.items() if k not in ("lr", "negatives")}
    text = yaml.safe_dump(others) + "lr: 1e-05\nnegatives: '8'\n"
    path = tmp_path / "params.yaml"
    path.write_text(text, encoding="utf-8")
    assert yaml.safe_load(text)["lr"] == "1e-05"  # PyYAML reads this as a string
    params = load_params(path)
    assert params["lr"] == 1e-05 and type(params["lr"]) is float
    assert params["negatives"] == 8 and type(params["negatives"]) is int


# --- bad values: the message names the key -------------------------------------------------------

@pytest.mark.parametrize(
    "key, value",
    [
        # wrong type
        ("lr", "abc"),
        ("lr", None),
        ("lr", True),
        ("lr", float("nan")),
        ("lr", float("inf")),
        ("epochs", 2.5),
        ("epochs", "2.5"),
        ("batch_size", True),
        ("seed", [1]),
        ("layers", [64, "x"]),
        ("layers", [64, 32.5]),
        ("layers", []),
        ("layers", 64),
        ("layers", "abc"),
        # out of range
        ("lr", 0),
        ("lr", 2),
        ("lr", -0.1),
        ("weight_decay", -0.01),
        ("weight_decay", 1.5),
        ("dropout", 1.0),
        ("dropout", -0.1),
        ("negatives", 0),
        ("epochs", 0),
        ("batch_size", 0),
        ("test_negatives", 0),
        ("topK", 0),
        ("seed", -1),
        ("seed", 2**32),
        ("layers", [64, 0]),
        ("layers", [64, -8]),
    ],
)
def test_bad_value_names_the_key(base, key, value):
    with pytest.raises(PipelineError) as info:
        validate(with_(base, **{key: value}))
    assert f"'{key}'" in str(info.value)


@pytest.mark.parametrize("key, value, shown", [("lr", "abc", "'abc'"), ("dropout", 1.0, "1.0"),
                                               ("seed", -1, "-1")])
def test_bad_value_message_shows_the_value_and_range(base, key, value, shown):
    with pytest.raises(PipelineError) as info:
        validate(with_(base, **{key: value}))
    message = str(info.value)
    assert shown in message
    assert {"lr": "(0, 1]", "dropout": "[0, 1)", "seed": "[0, 4294967295]"}[key] in message


@pytest.mark.parametrize("key, value", [("lr", 1.0), ("dropout", 0.0), ("weight_decay", 1.0),
                                        ("weight_decay", 0.0), ("seed", 0), ("negatives", 1000)])
def test_range_boundaries_that_are_allowed(base, key, value):
    assert validate(with_(base, **{key: value}))[key] == value


@pytest.mark.parametrize("layers", [[63, 32], [7], "[9, 4]"])
def test_odd_first_layer(base, layers):
    with pytest.raises(PipelineError, match="'layers'.*even"):
        validate(with_(base, layers=layers))


def test_odd_later_layers_are_fine(base):
    assert validate(with_(base, layers=[8, 5, 3]))["layers"] == [8, 5, 3]


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
    path.write_text(yaml.safe_dump(with_(base, lr="abc")), encoding="utf-8")
    with pytest.raises(PipelineError, match="other.yaml.*'lr'"):
        load_params(path)
