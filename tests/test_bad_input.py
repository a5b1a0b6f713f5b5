"""User mistakes through the real stage entry points: bad ratings files, bad params, diverging training.

Each must stop with one clear line (exit 2) naming the file and line or the param and its allowed
range, before any work, leaving no output behind.
"""
from __future__ import annotations

import importlib
import math
import os
import re
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REMOVE, set_models, set_params, stage, user_error
from pipeline.data import load_split
from pipeline.models import get as get_model, list_models
from pipeline.params import SPECS, Spec


def train_args(model: str) -> list[str]:
    """The arguments of model's train stage (train_mlp, train@gmf, fuse@neumf, ...)."""
    return [model, "data/prepared", "data/candidates", "data/models", "metrics/training"]


STAGE_ARGS = {
    "sample_negatives": ["data/prepared", "data/candidates"],
    "train": train_args("mlp"),
    "evaluate": ["data/prepared", "data/candidates", "data/models", "metrics/test", "metrics/intervals.json",
                 "metrics/hr_at_k", "data/ranks.npz"],
}


def run_in_process(module: str, args: list[str], cwd: Path, monkeypatch, capsys) -> tuple[int, str]:
    """Run pipeline.<module> as `python -m` would, in this process; return (exit code, stderr).

    The stage's configure_torch() changes process-wide state (one thread; subnormal floats flushed to
    zero, which breaks float arithmetic in later tests, e.g. hypothesis's): it is undone afterwards."""
    from pipeline.common import run_stage
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [module, *args])
    threads = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit) as stop:
            run_stage(importlib.import_module(f"pipeline.{module}").main)
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)
    return stop.value.code, capsys.readouterr().err


def write_raw(root: Path, lines: list[str]) -> None:
    raw = root / "data/raw"
    raw.mkdir(parents=True, exist_ok=True)
    (raw / "u.data").write_text("".join(lines))
    (raw / "source.json").write_text('{"dataset": "ml-100k", "ratings": "u.data", "titles": "u.item"}')
    (raw / "u.item").write_bytes("".join(f"{i}|Movie {i} (1990)|\n" for i in range(1, 40)).encode("latin-1"))


def good_lines(n_users: int = 5, n_items: int = 30) -> list[str]:
    return [f"{u}\t{i}\t3\t{1000 * i + u}\n" for u in range(1, n_users + 1) for i in range(1, n_items + 1, 2)]


@pytest.mark.parametrize("bad, line, words", [
    ("1\t2\t3\n", 4, "expected 4"),
    ("1\t2\t3\t4\t5\n", 4, "got 5"),
    ("x\t2\t3\t4\n", 4, "user_id must be an integer, got 'x'"),
    ("1\t2.5\t3\t4\n", 4, "movie_id must be an integer, got '2.5'"),
    ("1\t2\t3\tyesterday\n", 4, "timestamp must be an integer, got 'yesterday'"),
    ("1\t\t3\t4\n", 4, "movie_id must be an integer, got nothing"),
])
def test_malformed_ratings_line_names_file_and_line(workdir: Path, bad: str, line: int, words: str) -> None:
    write_raw(workdir, good_lines()[:3] + [bad] + good_lines()[3:])
    err = user_error(stage("build_matrix", "data/raw", "data/prepared", cwd=workdir))
    assert "data/raw/u.data" in err and f"line {line}" in err and words in err, err
    assert not (workdir / "data/prepared").exists()


def test_empty_ratings_file(workdir: Path) -> None:
    write_raw(workdir, [])
    err = user_error(stage("build_matrix", "data/raw", "data/prepared", cwd=workdir))
    assert "data/raw/u.data" in err and "empty" in err
    assert not (workdir / "data/prepared").exists()


def test_duplicates_and_short_users_are_logged_and_handled(workdir: Path) -> None:
    lines = good_lines()
    lines += ["1\t1\t5\t999999\n", "1\t1\t4\t5\n"]  # user 1 re-rated movie 1: latest wins
    lines += ["99\t3\t4\t10\n", "99\t5\t4\t20\n"]  # user 99 has two interactions only
    write_raw(workdir, lines)
    proc = stage("build_matrix", "data/raw", "data/prepared", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert "dropped 2 repeated (user, movie) ratings" in proc.stderr
    assert "1 user(s) with fewer than 3 interactions kept in train only" in proc.stderr
    split = load_split(workdir / "data/prepared")
    # user 1 (index 0): movie 1 (index 0) at timestamp 999999 is now the latest: the test item.
    assert split.test_items[split.test_users == 0].tolist() == [0]
    assert split.train[0].nnz + 2 == 15
    assert 5 not in split.test_users.tolist() and split.train[5].nnz == 2  # user 99 is index 5


WRONG_TYPE = {"int": "many", "float": "fast", "int_list": "wide", "choice": 3, "model": 3, "model_list": 3,
              "bool": "maybe", "str": 5, "column": 1.5, "section": "fast"}

# Each model's section in params.yaml, as validate checks it (the MLP's knobs are top-level keys).
SECTION_SPECS = {name: Spec("section", fields=dict(get_model(name).params)) for name in list_models()
                 if get_model(name).params and not get_model(name).top_level}
# Every value a user sets: the top-level keys (the MLP's among them), and each field of each model's
# section as 'section.field'.
PARAM_SPECS = dict(SPECS)
PARAM_SPECS.update({key: spec for name in list_models() if get_model(name).top_level
                    for key, spec in get_model(name).params.items()})
PARAM_SPECS.update({f"{key}.{name}": field for key, spec in SECTION_SPECS.items()
                    for name, field in spec.fields.items()})
SECTIONS = sorted(SECTION_SPECS)


def trainer(key: str) -> str:
    """The model whose train stage reads `key`: a section's own model; the MLP for a top-level key."""
    return key.split(".")[0] if "." in key else "mlp"


def out_of_range(spec):
    """A value of the right type that is not allowed."""
    if spec.kind == "int_list":
        return [int(spec.high) + 1]
    if spec.kind in ("int", "float"):
        return int(spec.high) + 1 if spec.kind == "int" else spec.high * 2 + 1
    return {"choice": "nonsense", "model": "nonsense", "model_list": ["nonsense"], "bool": "yes please",
            "str": "  ", "column": -1}[spec.kind]


def test_every_section_field_is_covered() -> None:
    mlp_keys = {"lr", "layers", "epochs", "batch_size", "negatives", "weight_decay", "dropout"}
    assert mlp_keys | {"refit", "candidate_seed", "models", "fused", "gmf.lr", "mf.factors", "neumf.lr",
                       "neumf.dropout", "ease.lambda"} <= set(PARAM_SPECS)
    assert SECTIONS == ["ease", "gmf", "mf", "neumf", "sasrec"]
    assert not {"mlp", "itempop", "neumf.layers", "neumf.factors"} & set(PARAM_SPECS)


@pytest.mark.parametrize("key", sorted(PARAM_SPECS))
@pytest.mark.parametrize("mistake", ["wrong_type", "out_of_range"])
def test_every_param_mistake_stops_training_before_any_work(prepared: Path, monkeypatch, capsys,
                                                            key: str, mistake: str) -> None:
    spec = PARAM_SPECS[key]
    value = WRONG_TYPE[spec.kind] if mistake == "wrong_type" else out_of_range(spec)
    set_params(prepared, **{key: value})
    code, err = run_in_process("train", train_args(trainer(key)), prepared, monkeypatch, capsys)
    assert code == 2
    allowed = spec.describe()
    if spec.kind == "int_list" and mistake == "wrong_type":  # not a list: "a non-empty list of integers, ..."
        allowed = allowed.removeprefix("a ")
    assert f"'{key}'" in err and allowed in err and "params.yaml" in err, err
    if spec.kind in ("int", "float", "int_list"):
        assert re.search(r"in [\[(][-\d.e+]+, [-\d.e+]+[\])]", err), err  # the allowed range
    assert not (prepared / "data/models").exists() and not (prepared / "metrics").exists()


@pytest.mark.parametrize("section", SECTIONS)
@pytest.mark.parametrize("mistake", ["not_a_mapping", "unknown_field", "missing_field"])
def test_every_section_mistake_stops_training_before_any_work(prepared: Path, monkeypatch, capsys,
                                                              section: str, mistake: str) -> None:
    fields = list(SECTION_SPECS[section].fields)
    if mistake == "missing_field" and not fields:
        pytest.skip(f"'{section}' has no fields to leave out")
    if mistake == "not_a_mapping":
        set_params(prepared, **{section: WRONG_TYPE["section"]})
        words = f"'{section}' must be {SECTION_SPECS[section].describe()}"
    elif mistake == "unknown_field":
        set_params(prepared, **{f"{section}.learning_rate": 0.1})
        words = f"unknown key(s) '{section}.learning_rate'"
    else:
        set_params(prepared, **{f"{section}.{fields[-1]}": REMOVE})
        words = f"missing key(s) '{section}.{fields[-1]}'"
    code, err = run_in_process("train", train_args(section), prepared, monkeypatch, capsys)
    assert code == 2 and words in err and "params.yaml" in err, err
    assert not (prepared / "data/models").exists() and not (prepared / "metrics").exists()


# Each rule, and the stages that read the keys it checks: the data stages read no model's knobs, a
# train stage ("train@<model>"; "train" is train_mlp) its own model's, evaluate every key.
PARAM_RULES = [
    ("odd_layers", {"layers": [15, 8]}, "'layers' first entry must be even", ("train", "evaluate")),
    ("neumf_without_gmf", {"models": ["mf", "ease"]},
     "'fused' has 'neumf', which starts from the gmf and mlp checkpoints", ("train@neumf", "evaluate")),
    ("mlp_in_models", {"models": ["gmf", "mlp"]}, "'models' lists 'mlp', which always trains (stage train_mlp)",
     ("train", "evaluate")),
    ("itempop_in_fused", {"fused": ["neumf", "itempop"]},
     "'fused' lists 'itempop', which always trains (stage train_itempop)", ("train@itempop", "evaluate")),
    ("recommend_untrained", {"models": ["gmf"]}, "'recommend_model' is 'ease', which is not trained", ("evaluate",)),
    ("topK", {"topK": 22}, "'topK' must be at most test_negatives + 1 = 21", ("sample_negatives", "train", "evaluate")),
    ("negatives", {"negatives": 0}, "'negatives' must be an integer in [1, 1000]", ("train", "evaluate")),
    ("gmf_lr", {"gmf.lr": 0}, "'gmf.lr' must be a number in (0, 1]", ("train@gmf", "evaluate")),
    ("unknown", {"learning_rate": 0.1}, "unknown key(s) 'learning_rate'", ("evaluate",)),
    ("old_mlp_section", {"mlp": {"lr": 0.1}},  # the old section
     "unknown key(s) 'mlp'; 'mlp': the MLP's knobs are top-level keys", ("evaluate",)),
    ("old_itempop_section", {"itempop": {}}, "unknown key(s) 'itempop'; 'itempop': ItemPop has no knobs",
     ("evaluate",)),
    ("unknown_field", {"gmf.learning_rate": 0.1}, "unknown key(s) 'gmf.learning_rate'", ("train@gmf", "evaluate")),
    ("missing_field", {"gmf.lr": REMOVE}, "missing key(s) 'gmf.lr'", ("train@gmf", "evaluate")),
    ("old_neumf_field", {"neumf.layers": [16, 8]}, "unknown key(s) 'neumf.layers'", ("train@neumf", "evaluate")),
]


def stage_args(name: str) -> tuple[str, list[str]]:
    """(module, arguments) of a stage: 'evaluate', 'train' (train_mlp), 'train@gmf' (train@gmf, fuse@neumf)."""
    module, _, model = name.partition("@")
    return module, train_args(model) if model else STAGE_ARGS[module]


@pytest.mark.parametrize("stage_name, changes, words", [
    pytest.param(name, changes, words, id=f"{name}-{rule}")
    for rule, changes, words, stages in PARAM_RULES for name in stages])
def test_param_rules_stop_every_stage_that_reads_params(prepared: Path, monkeypatch, capsys, stage_name: str,
                                                        changes: dict, words: str) -> None:
    set_params(prepared, **changes)
    module, args = stage_args(stage_name)
    code, err = run_in_process(module, args, prepared, monkeypatch, capsys)
    assert code == 2 and words in err, err
    assert not (prepared / "data/candidates").exists() and not (prepared / "metrics").exists()
    assert not (prepared / "data/models").exists()


def test_nan_loss_stops_training_naming_the_epoch(prepared: Path, monkeypatch, capsys) -> None:
    assert stage("sample_negatives", *STAGE_ARGS["sample_negatives"], cwd=prepared).returncode == 0
    set_params(prepared, epochs=3, layers=[16, 8], batch_size=64)
    MLP = get_model("mlp")
    forward = MLP.forward
    calls = {"n": 0}
    # Only the validation run diverges: the refit runs beside it (a forked process, or a thread), and
    # were it to diverge too, which of the two errors comes first would be a race.
    validation_run = (os.getpid(), threading.get_ident())

    def diverging(self, users, items):
        out = forward(self, users, items)
        if (os.getpid(), threading.get_ident()) != validation_run:
            return out
        calls["n"] += 1
        return out * math.inf if calls["n"] > 10 else out  # diverges during epoch 1's training

    monkeypatch.setattr(MLP, "forward", diverging)
    code, err = run_in_process("train", STAGE_ARGS["train"], prepared, monkeypatch, capsys)
    assert code == 2
    assert "mlp: training diverged at epoch 1" in err and "smaller lr" in err and "No checkpoint" in err, err
    assert not (prepared / "data/models").exists() or not any((prepared / "data/models").iterdir())
    assert not (prepared / "metrics/training/mlp").exists()  # no live log: it is removed with the failure
    assert not (prepared / "metrics").exists() or not [p for p in (prepared / "metrics").rglob("*") if p.is_file()]


def test_nan_scores_stop_evaluation(prepared: Path, monkeypatch, capsys) -> None:
    assert stage("sample_negatives", *STAGE_ARGS["sample_negatives"], cwd=prepared).returncode == 0
    set_models(prepared, ["itempop", "mlp"])
    MLP = get_model("mlp")
    split = load_split(prepared / "data/prepared")
    counts = torch.from_numpy(np.asarray(split.train.sum(axis=0)).ravel().astype(np.int64))
    (prepared / "data/models").mkdir(parents=True)
    torch.save({"counts": counts}, prepared / "data/models/itempop.pt")
    model = MLP(split.n_users, split.n_items, [16, 8])
    with torch.no_grad():
        model.output.bias.fill_(math.nan)
    torch.save(model.state_dict(), prepared / "data/models/mlp.pt")
    code, err = run_in_process("evaluate", STAGE_ARGS["evaluate"], prepared, monkeypatch, capsys)
    assert code == 2 and "mlp produced NaN scores" in err, err
    assert not (prepared / "metrics").exists()
    assert torch.load(prepared / "data/models/itempop.pt", weights_only=True)["counts"].sum() == split.train.nnz
