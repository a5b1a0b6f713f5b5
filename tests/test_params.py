"""params.yaml validation: conversions DVC needs, and an error naming the key for every bad value."""
from __future__ import annotations

import copy

import pytest
import yaml

from conftest import REPO
from pipeline.common import PipelineError
from pipeline.models import get as get_model, label, list_models
from pipeline.params import SPECS, load_params, model_section, trained_models, validate

REPO_PARAMS = REPO / "params.yaml"
MLP_KEYS = tuple(get_model("mlp").params)  # the MLP's knobs: top-level keys
SECTIONS = ("gmf", "mf", "ease", "sasrec", "neumf")  # the models with a section in params.yaml
ALL_KEYS = (*SPECS, *MLP_KEYS, *SECTIONS)  # every top-level key of params.yaml


@pytest.fixture(scope="module")
def base() -> dict:
    """The repository's params, as PyYAML reads them."""
    return yaml.safe_load(REPO_PARAMS.read_text(encoding="utf-8"))


def with_(base: dict, **changes) -> dict:
    """A copy of base with keys replaced; 'gmf.lr' replaces lr inside the gmf section, 'lr' the top-level key."""
    raw = copy.deepcopy(base)
    for key, value in changes.items():
        section, _, field = key.rpartition(".")
        (raw[section] if section else raw)[field] = value
    return raw


def pick(params: dict, key: str):
    """params['gmf']['lr'] for 'gmf.lr', params['lr'] for 'lr'."""
    section, _, field = key.rpartition(".")
    return (params[section] if section else params)[field]


def test_repository_params_validate(base):
    params = load_params(REPO_PARAMS)
    assert set(params) == set(ALL_KEYS) == set(base)
    assert set(MLP_KEYS) == {"layers", "dropout", "lr", "weight_decay", "epochs", "batch_size", "negatives"}
    assert params == validate(base)
    assert isinstance(params["lr"], float) and isinstance(params["seed"], int)
    assert isinstance(params["gmf"]["lr"], float) and isinstance(params["candidate_seed"], int)
    assert isinstance(params["refit"], bool)
    layers = params["layers"]
    assert isinstance(layers, list) and all(isinstance(v, int) for v in layers) and layers[0] % 2 == 0
    assert params["topK"] <= params["test_negatives"] + 1


NUMERIC = ("seed", "layers", "lr", "weight_decay", "dropout", "batch_size", "epochs",
           "negatives", "test_negatives", "topK")


def test_validate_returns_a_copy_with_the_same_values(base):
    values = {"seed": 3, "layers": [8, 4], "lr": 0.5, "weight_decay": 1, "dropout": 0,
              "batch_size": 1, "epochs": 1, "negatives": 1, "test_negatives": 1, "topK": 2}
    params = {k: pick(validate(with_(base, **values)), k) for k in NUMERIC}
    assert params == {**values, "weight_decay": 1.0, "dropout": 0.0}
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
    got = pick(validate(with_(base, **{key: value})), key)
    assert got == expected
    assert type(got) is type(expected)


def test_dvc_style_params_file(tmp_path, base):
    """What `dvc exp run -S lr=0.00001 -S negatives=8 -S gmf.lr=0.00002` can leave in params.yaml."""
    raw = with_(base)
    del raw["lr"], raw["negatives"]
    raw["gmf"] = {k: v for k, v in raw["gmf"].items() if k != "lr"}
    text = "lr: 1e-05\nnegatives: '8'\n" + yaml.safe_dump(raw).replace("gmf:\n", "gmf:\n  lr: 2e-05\n")
    path = tmp_path / "params.yaml"
    path.write_text(text, encoding="utf-8")
    assert yaml.safe_load(text)["lr"] == "1e-05"  # PyYAML reads this as a string
    assert yaml.safe_load(text)["gmf"]["lr"] == "2e-05"
    params = load_params(path)
    assert params["lr"] == 1e-05 and type(params["lr"]) is float
    assert params["negatives"] == 8 and type(params["negatives"]) is int
    assert params["gmf"]["lr"] == 2e-05 and type(params["gmf"]["lr"]) is float


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
    assert pick(validate(with_(base, **{key: value})), key) == value


@pytest.mark.parametrize("layers", [[63, 32], [7], "[9, 4]"])
def test_odd_first_layer(base, layers):
    with pytest.raises(PipelineError, match="'layers' first entry must be even"):
        validate(with_(base, **{"layers": layers}))


def test_odd_later_layers_are_fine(base):
    assert validate(with_(base, **{"layers": [8, 5, 3]}))["layers"] == [8, 5, 3]


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


@pytest.mark.parametrize("key", sorted(ALL_KEYS))
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
    path.write_text(yaml.safe_dump(with_(base, **{"lr": "abc"})), encoding="utf-8")
    with pytest.raises(PipelineError, match="other.yaml.*'lr'"):
        load_params(path)


# --- the models' sections, `models`, `fused` and the keys they replaced -----------------------------

@pytest.mark.parametrize("key, value", [("gmf.lr", 0), ("gmf.factors", 0), ("mf.epochs", 0), ("mf.negatives", "x"),
                                        ("ease.lambda", 0), ("ease.lambda", -1.0), ("neumf.dropout", 1.0),
                                        ("neumf.batch_size", 0), ("neumf.weight_decay", 2)])
def test_bad_section_field_names_the_dotted_key(base, key, value):
    with pytest.raises(PipelineError) as info:
        validate(with_(base, **{key: value}))
    assert f"'{key}'" in str(info.value)


def test_section_fields_convert_like_top_level_keys(base):
    params = validate(with_(base, **{"gmf.lr": "1e-05", "mf.factors": "16", "ease.lambda": "50",
                                     "neumf.dropout": "0.25"}))
    assert params["gmf"]["lr"] == 1e-05 and type(params["gmf"]["lr"]) is float
    assert params["mf"]["factors"] == 16 and type(params["mf"]["factors"]) is int
    assert params["ease"]["lambda"] == 50.0 and type(params["ease"]["lambda"]) is float
    assert params["neumf"]["dropout"] == 0.25


def test_neumf_section_has_only_its_training_knobs(base):
    params = validate(base)
    assert set(params["neumf"]) == {"dropout", "lr", "weight_decay", "epochs", "batch_size", "negatives", "optimizer"}
    for old in ("factors", "layers", "pretrain"):  # NeuMF is always built from the GMF and MLP checkpoints
        raw = with_(base)
        raw["neumf"] = {**raw["neumf"], old: 8}
        with pytest.raises(PipelineError, match=f"unknown key.*'neumf.{old}'"):
            validate(raw)


@pytest.mark.parametrize("key, value, expected", [
    ("models", "[gmf, ease]", ["gmf", "ease"]),
    ("models", [], []),
    ("models", None, []),
    ("models", "[]", []),
    ("models", ["ease", "mf", "gmf"], ["ease", "mf", "gmf"]),
    ("fused", [], []),
    ("fused", "[neumf]", ["neumf"]),
])
def test_model_lists_convert(base, key, value, expected):
    raw = with_(base, fused=[], recommend_model="mlp")  # any `models` may go without NeuMF
    assert validate(with_(raw, **{key: value}))[key] == expected


@pytest.mark.parametrize("key, value", [
    ("models", ["gmf", "gmf"]), ("models", ["svd"]), ("models", ["neumf"]), ("models", "gmf"), ("models", 3),
    ("fused", ["gmf"]), ("fused", ["neumf", "neumf"]), ("fused", "neumf"),
])
def test_bad_model_lists_name_the_key(base, key, value):
    with pytest.raises(PipelineError) as info:
        validate(with_(base, **{key: value}))
    assert f"'{key}'" in str(info.value)


@pytest.mark.parametrize("key", ["models", "fused"])
@pytest.mark.parametrize("core", ["itempop", "mlp"])
def test_core_models_in_the_lists_name_their_stage(base, key, core):
    with pytest.raises(PipelineError) as info:
        validate(with_(base, **{key: [*base[key], core]}))
    message = str(info.value)
    assert f"'{key}'" in message and f"'{core}'" in message and f"train_{core}" in message


def test_fused_neumf_needs_gmf(base):
    raw = with_(base, models=["mf", "ease"], fused=["neumf"], recommend_model="ease")
    with pytest.raises(PipelineError) as info:
        validate(raw)
    message = str(info.value)
    assert "'neumf'" in message and "'gmf'" in message and "'models'" in message
    assert validate(with_(raw, fused=[]))["fused"] == []  # without NeuMF, GMF is not needed
    assert validate(with_(raw, models=["gmf", "ease"]))["models"] == ["gmf", "ease"]


def test_recommend_model_must_be_trained(base):
    raw = with_(base, models=["gmf"], fused=[], recommend_model="ease")
    with pytest.raises(PipelineError) as info:
        validate(raw)
    assert "'recommend_model'" in str(info.value) and "'ease'" in str(info.value)
    with pytest.raises(PipelineError, match="recommend_model"):
        validate(with_(raw, recommend_model="neumf"))
    for name in ("itempop", "mlp", "gmf"):  # always trained, or listed
        assert validate(with_(raw, recommend_model=name))["recommend_model"] == name
    assert validate(with_(base, models=[], fused=[], recommend_model="mlp"))["models"] == []


def test_trained_models_in_stage_order(base):
    assert trained_models(validate(base)) == ["itempop", "mlp", *base["models"], *base["fused"]]
    params = validate(with_(base, models=["ease", "gmf"], fused=[], recommend_model="gmf"))
    assert trained_models(params) == ["itempop", "mlp", "ease", "gmf"]
    params = validate(with_(base, models=[], fused=[], recommend_model="itempop"))
    assert trained_models(params) == ["itempop", "mlp"]


def test_model_section(base):
    params = validate(with_(base, lr=0.25, layers=[8, 4], dropout=0.5, **{"gmf.lr": 0.125}))
    assert model_section(params, "mlp") == {"layers": [8, 4], "dropout": 0.5, "lr": 0.25,
                                            "weight_decay": params["weight_decay"], "epochs": params["epochs"],
                                            "batch_size": params["batch_size"], "negatives": params["negatives"]}
    assert model_section(params, "gmf") == params["gmf"] and params["gmf"]["lr"] == 0.125
    assert model_section(params, "ease") == {"lambda": params["ease"]["lambda"]}
    assert model_section(params, "neumf") == params["neumf"]
    assert model_section(params, "itempop") == {}


def test_every_model_has_a_label():
    assert set(list_models()) == {"itempop", "mlp", "gmf", "mf", "ease", "neumf", "sasrec"}
    assert all(isinstance(label(name), str) and label(name) for name in list_models())
    assert label("mlp") == "MLP" and label("neumf") == "NeuMF" and label("itempop") == "ItemPop"


@pytest.mark.parametrize("old, says", [
    ("mlp", "top-level keys"),
    ("itempop", "train_itempop"),
])
def test_old_sections_say_what_replaced_them(base, old, says):
    raw = with_(base)
    raw[old] = {"lr": 0.01} if old == "mlp" else {}
    with pytest.raises(PipelineError) as info:
        validate(raw)
    message = str(info.value)
    assert f"unknown key(s) '{old}'" in message and says in message
    if old == "mlp":
        assert "lr" in message and "layers" in message


@pytest.mark.parametrize("value, expected", [(True, True), (False, False), ("true", True), ("False", False)])
def test_refit_is_a_bool(base, value, expected):
    assert validate(with_(base, refit=value))["refit"] is expected


@pytest.mark.parametrize("key, value", [("refit", 1), ("refit", "yes"), ("refit", None),
                                        ("candidate_seed", -1), ("candidate_seed", 2**32), ("candidate_seed", "x")])
def test_bad_refit_and_candidate_seed(base, key, value):
    with pytest.raises(PipelineError, match=f"'{key}'"):
        validate(with_(base, **{key: value}))


def test_candidate_seed_is_independent_of_seed(base):
    params = validate(with_(base, seed=1, candidate_seed="7"))
    assert (params["seed"], params["candidate_seed"]) == (1, 7)


@pytest.mark.parametrize("key, value, message", [
    ("select_by", "ful", "params.yaml: 'select_by' must be one of 'sampled', 'full', got 'ful'"),
    ("neumf.optimizer", "rmsprop", "params.yaml: 'neumf.optimizer' must be one of 'adam', 'sgd', got 'rmsprop'"),
])
def test_select_by_and_the_optimizer_are_one_line_errors(base, key, value, message):
    raw = copy.deepcopy(base)
    *section, last = key.split(".")
    (raw[section[0]] if section else raw)[last] = value
    with pytest.raises(PipelineError) as err:
        validate(raw, "params.yaml")
    assert str(err.value) == message
