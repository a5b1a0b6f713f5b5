"""dvc.yaml declares what each stage reads: every pipeline module its script imports (at any depth, in
functions too) and the model modules it loads by name, and nothing else of pipeline/; a dependency
read but not declared would not re-run it, one declared but not read re-runs it for nothing."""
from __future__ import annotations

import ast
import re

import pytest
import yaml

from conftest import REPO
from pipeline.models import get, list_models

PIPELINE = REPO / "pipeline"
MODELS_DIR = "pipeline/models"  # a directory dep: every model's module


def module_file(module: str) -> str:
    """'pipeline/models/__init__.py' for 'pipeline.models', 'pipeline/train.py' for 'pipeline.train'."""
    path = module.replace(".", "/")
    return f"{path}/__init__.py" if (REPO / path).is_dir() else f"{path}.py"


def imported_modules(path: str) -> set[str]:
    """Files of the pipeline modules that the file `path` imports (module level or inside functions)."""
    tree = ast.parse((REPO / path).read_text(encoding="utf-8"))
    for node in ast.walk(tree):  # `if TYPE_CHECKING:` imports are for type checkers: they never run
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            node.body = []
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
            found.add(module_file(node.module))
            found |= {module_file(f"{node.module}.{a.name}") for a in node.names
                      if (REPO / node.module.replace(".", "/") / f"{a.name}.py").exists()}
        elif isinstance(node, ast.Import):
            found |= {module_file(a.name) for a in node.names if a.name.startswith("pipeline.")}
    return found - {"pipeline/__init__.py"}


def closure(*paths: str) -> set[str]:
    """The files and everything they import from pipeline/, transitively; and the package's own
    __init__.py, which Python runs before any pipeline.<module> (it runs the CPU pin)."""
    seen, todo = set(), ["pipeline/__init__.py", *paths]
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo.extend(imported_modules(path))
    return seen


def model_file(name: str) -> str:
    return f"{MODELS_DIR}/{name}.py"


def stages() -> dict[str, dict]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


def declared(spec: dict, item: str | None = None) -> set[str]:
    """The stage's deps under pipeline/, with ${item} (and ${recommend_model}) replaced by `item`."""
    deps = {re.sub(r"\$\{(item|recommend_model)\}", item or "", d) for d in spec["deps"] if isinstance(d, str)}
    return {d for d in deps if d.startswith("pipeline/")}


def possible_items(stage: str) -> list[str]:
    """The models a stage's ${item} (or recommend_model) can be: what params.py would accept there."""
    if stage == "train":
        return [m for m in list_models() if not get(m).always_trained and not get(m).fused_from]
    if stage == "fuse":
        return [m for m in list_models() if get(m).fused_from]
    return list_models()  # recommend


def needed(stage: str, spec: dict, item: str | None) -> set[str]:
    """What the stage's script imports, with the model modules it loads by name (importlib)."""
    script = re.match(r"python -m pipeline\.(\w+)", spec["cmd"]).group(1)
    loaded = []
    if script == "train":
        name = item or re.match(r"python -m pipeline\.train (\w+)", spec["cmd"]).group(1)
        loaded = [name, *get(name).fused_from]
    elif script == "recommend":
        loaded = [item]
    elif MODELS_DIR in spec["deps"]:  # evaluate, report: every model
        loaded = list_models()
    return closure(f"pipeline/{script}.py", *map(model_file, loaded))


@pytest.mark.parametrize("stage", sorted(stages()))
def test_a_stage_declares_the_pipeline_modules_it_imports(stage: str) -> None:
    spec = stages()[stage]
    template = spec.get("do", spec)  # a foreach stage: its template
    items = possible_items(stage) if "do" in spec or "${recommend_model}" in str(template["deps"]) else [None]
    union: set[str] = set()
    for item in items:
        have, need = declared(template, item), needed(stage, template, item)
        if MODELS_DIR in have:
            have |= {str(p.relative_to(REPO)) for p in (REPO / MODELS_DIR).glob("*.py")}
        assert need <= have, (stage, item, sorted(need - have))  # read but not declared: never stale
        union |= need
    for item in items:  # declared but read by none of its models: re-runs for nothing
        extra = declared(template, item) - union - {MODELS_DIR, model_file(item or "")}
        assert not extra, (stage, item, sorted(extra))


def test_the_closure_follows_imports_inside_functions() -> None:
    assert "pipeline/training.py" in imported_modules("pipeline/models/_neural.py")  # in PairScorer.objective
    assert {"pipeline/models/__init__.py", "pipeline/stats.py"} <= closure("pipeline/evaluate.py")


def test_a_training_stage_depends_on_its_own_model_and_no_other() -> None:
    """Editing one model's module re-runs that model's stages only (and a fused model's, from its sources)."""
    for stage in ("train_itempop", "train_mlp", "train", "fuse"):
        spec = stages()[stage]
        template = spec.get("do", spec)
        models = {d for d in declared(template, "${item}") if d.startswith(MODELS_DIR + "/")}
        own = {model_file("${item}")} if "do" in spec else {model_file(stage[len("train_"):])}
        sources = {model_file(m) for m in ("gmf", "mlp")} if stage == "fuse" else set()
        assert models - own - sources == {f"{MODELS_DIR}/__init__.py", f"{MODELS_DIR}/_neural.py"} - (
            {f"{MODELS_DIR}/_neural.py"} if stage == "train_itempop" else set()), (stage, sorted(models))
