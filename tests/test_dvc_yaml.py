"""dvc.yaml declares what each stage reads: every pipeline module its script imports (at any depth, in
functions too), and nothing else of pipeline/; a dependency read but not declared would not re-run it."""
from __future__ import annotations

import ast
import re

import pytest
import yaml

from conftest import REPO

PIPELINE = REPO / "pipeline"


def imported_modules(name: str) -> set[str]:
    """pipeline modules that pipeline/<name>.py imports, directly (module level or inside functions)."""
    tree = ast.parse((PIPELINE / f"{name}.py").read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
            if node.module == "pipeline":
                found |= {alias.name for alias in node.names}
            else:
                found.add(node.module.split(".", 1)[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".", 1)[1] for a in node.names if a.name.startswith("pipeline.")}
    return found


def closure(name: str) -> set[str]:
    """The module and everything it imports from pipeline/, transitively."""
    seen, todo = set(), [name]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(imported_modules(module))
    return seen


def stages() -> dict[str, dict]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


@pytest.mark.parametrize("stage", sorted(stages()))
def test_a_stage_declares_exactly_the_pipeline_modules_it_imports(stage: str) -> None:
    spec = stages()[stage]
    spec = spec.get("do", spec)  # a foreach stage: its template
    module = re.match(r"python -m pipeline\.(\w+)", spec["cmd"]).group(1)
    declared = {d[len("pipeline/"):-len(".py")] for d in spec["deps"]
                if isinstance(d, str) and d.startswith("pipeline/") and d.endswith(".py")}
    assert declared == closure(module), (stage, sorted(declared ^ closure(module)))


def test_the_closure_follows_imports_inside_functions() -> None:
    assert "training" in imported_modules("sasrec")  # imported in SequenceObjective.__init__
    assert {"models", "sasrec", "training"} <= closure("evaluate")
