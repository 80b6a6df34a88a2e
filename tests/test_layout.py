"""The package's layering, read from the source: no import cycles, training code only where it
belongs, models free of data and training code, and thin scripts.

Imports are collected with ``ast`` from every file under ``pipeline/``, those inside functions
included (they run too, only later); imports under ``if TYPE_CHECKING:`` never run and are left out.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pipeline"
SCRIPTS = ["train_efficientnet.py", "train_caption_rnn.py", "inference.py"]
MAX_SCRIPT_LINES = 40
# What a model may not depend on: models are built from tensors and settings alone.
NOT_FOR_MODELS = ("pipeline.data", "pipeline.engine", "pipeline.train", "pipeline.branches", "pipeline.prediction",
                  "pipeline.inference", "pipeline.tools")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}

# The package's floors: a package imports only packages on lower floors, never one beside or above it.
FLOORS = {
    "choices": 0, "io": 0, "labels": 0, "preprocessing": 0,        # option choices, files, label names, pixels
    "models": 1, "data": 1, "shards": 1, "checkpoint": 1, "metrics": 1,  # networks, datasets, stores, scores
    "stacking": 1,                                                 # the out-of-fold stacker (numpy, scikit-learn)
    "engine": 2, "fusion": 2,                                      # the loop and runtimes; fusion
    "config": 3, "features": 3, "text_features": 3, "report": 3, "report_page": 3,    # settings, cached features, pages
    "branches": 4, "inference_config": 4,                                   # what training and inference share
    "train": 5, "prediction": 5,                                            # training; the prediction core
    "inference": 6, "predictor": 6,                                         # the CLI's and the Python API's, on the core
    "tools": 7,
    "cli": 8,                                                               # the three programs
}


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(node: ast.AST):
    for child in ast.iter_child_nodes(node):
        # The body of ``if TYPE_CHECKING:`` never runs; its ``else:`` does.
        statements = child.orelse if isinstance(child, ast.If) and _is_type_checking(child) else [child]
        for statement in statements:
            if isinstance(statement, (ast.Import, ast.ImportFrom)):
                yield statement
            yield from _import_nodes(statement)


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute module an ``from ... import`` reads from, relative imports included."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_in(module: str, source: str) -> frozenset[str]:
    """The project modules the source of ``module`` names in its imports.

    ``from pipeline.data import dataset`` and ``from pipeline.data.dataset import X`` both name
    ``pipeline.data.dataset``; ``from pipeline.data import X`` with ``X`` not a module names
    ``pipeline.data``.
    """
    found = set()
    for node in _import_nodes(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if _within(alias.name, "pipeline"))
            continue
        origin = _resolve(module, node)
        if not _within(origin, "pipeline"):
            continue
        for alias in node.names:
            found.add(f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in MODULES else origin)
    return frozenset(found)


@cache
def imports(module: str) -> frozenset[str]:
    return imports_in(module, MODULES[module].read_text(encoding="utf-8"))


def _loaded_by(module: str) -> set[str]:
    """What importing ``module`` names directly: its imports and, for each, the packages above
    it (``import pipeline.train.image`` runs ``pipeline/train/__init__.py`` first)."""
    loaded = set()
    for name in imports(module):
        parts = name.split(".")
        loaded.update(".".join(parts[:k]) for k in range(1, len(parts) + 1))
    return {name for name in loaded if name in MODULES and name != module}


def transitive_imports(module: str) -> dict[str, list[str]]:
    """Every project module importing ``module`` loads, each with one chain of imports leading to it."""
    chains = {module: [module]}
    pending = [module]
    while pending:
        current = pending.pop()
        for name in sorted(_loaded_by(current)):
            if name not in chains:
                chains[name] = chains[current] + [name]
                pending.append(name)
    del chains[module]
    return chains


def import_graph() -> dict[str, list[str]]:
    """Each project module and the other project modules it names in its imports."""
    return {module: sorted(name for name in imports(module) if name in MODULES and name != module)
            for module in MODULES}


def find_cycle(graph: dict[str, list[str]]) -> list[str] | None:
    """One cycle of ``graph`` (as a closed list of names, first name repeated last), or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once fully explored
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for name in graph.get(module, []):
            if state.get(name) == "open":
                return path[path.index(name):] + [name]
            if name not in state and (cycle := visit(name)):
                return cycle
        path.pop()
        state[module] = "done"
        return None

    for module in graph:
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_the_walk_sees_the_package_and_every_import_form():
    """Guards the checks below against passing because the walk found nothing."""
    assert {"pipeline.inference", "pipeline.train.image", "pipeline.models.backbones"} <= set(MODULES)
    assert "pipeline.data.dataset" in imports("pipeline.inference")
    source = ("import pipeline.io\n"
              "from pipeline.data import dataset\n"
              "from pipeline.data.text import Vocabulary\n"
              "from pipeline import metrics as m\n"
              "from . import heads\n"
              "from .decoder import LabelDecoder\n"
              "import numpy\n"
              "def later():\n    from pipeline.fusion import load_fusion\n"
              "from typing import TYPE_CHECKING\n"
              "if TYPE_CHECKING:\n    from pipeline.train import image\n"
              "else:\n    import pipeline.report\n"
              "try:\n    from pipeline import labels\nexcept ImportError:\n    pass\n")
    assert imports_in("pipeline.models.caption", source) == {
        "pipeline.io", "pipeline.data.dataset", "pipeline.data.text", "pipeline.metrics", "pipeline.models.heads",
        "pipeline.models.decoder", "pipeline.fusion", "pipeline.report", "pipeline.labels"}


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": ["b"], "b": ["c", "d"], "c": ["a"], "d": []}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": ["b", "c"], "b": ["c"], "c": []}) is None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_only_training_modules_and_tools_import_training_modules():
    """The bench times the training step, so tools may; inference and the shared floors may not."""
    offenders = [f"{module} imports {name}" for module in MODULES
                 if not (_within(module, "pipeline.train") or _within(module, "pipeline.tools")
                         or module == "pipeline.cli")
                 for name in sorted(imports(module)) if _within(name, "pipeline.train")]
    assert offenders == []


def package_of(module: str) -> str:
    """The top-level unit of ``module``: its subpackage (``data``) or its own name (``fusion``)."""
    return module.split(".")[1] if module != "pipeline" else ""


def upward_imports(floors: dict[str, int]) -> list[str]:
    """Each import from one package into another that is not on a strictly lower floor."""
    return [f"{module} (floor {floors[package_of(module)]}) imports {name} (floor {floors[package_of(name)]})"
            for module in MODULES if package_of(module)
            for name in sorted(imports(module))
            if package_of(name) and package_of(name) != package_of(module)
            and floors[package_of(name)] >= floors[package_of(module)]]


def test_every_package_has_a_floor():
    assert sorted({package_of(module) for module in MODULES} - {""} - set(FLOORS)) == []


def test_the_package_graph_has_no_upward_arrow():
    assert upward_imports(FLOORS) == []


def test_the_floor_check_sees_an_upward_arrow():
    """Guards the check above: with data put above features, features' imports of data point up."""
    offenders = upward_imports({**FLOORS, "data": FLOORS["features"]})
    assert "pipeline.features (floor 3) imports pipeline.data.dataset (floor 3)" in offenders


def test_the_data_floor_imports_only_lower_floors():
    """Datasets feed the models their pixels but depend on no network: what both read (the
    preprocessing and its pixel affine) is on the ground floor, so data stands beside models."""
    assert FLOORS["data"] == FLOORS["models"]
    offenders = [f"{module} imports {name}" for module in MODULES if _within(module, "pipeline.data")
                 for name in sorted(imports(module))
                 if package_of(name) not in ("", "data") and FLOORS[package_of(name)] >= FLOORS["data"]]
    assert offenders == []


def private_imports(module: str, source: str) -> list[str]:
    """``origin.name`` for each private name (a leading underscore) that the source of ``module``
    imports from another project module."""
    return [f"{origin}.{alias.name}" for node in _import_nodes(ast.parse(source)) if isinstance(node, ast.ImportFrom)
            for origin in [_resolve(module, node)] if _within(origin, "pipeline") and origin != module
            for alias in node.names if alias.name.startswith("_")]


def test_the_private_import_check_sees_one():
    """Guards the check below: the forms a private import takes, and what is not one."""
    source = ("from pipeline.inference import _run_inference, run_inference\n"
              "from .image_fit import _joint\n"
              "from pipeline.train.image import _own\n"
              "from torch.onnx import _constants\n"
              "def later():\n    from pipeline.fusion import _fitting, load_fusion\n")
    assert private_imports("pipeline.train.image", source) == [
        "pipeline.inference._run_inference", "pipeline.train.image_fit._joint", "pipeline.fusion._fitting"]


def test_no_module_imports_another_modules_private_names():
    offenders = [name for module in MODULES
                 for name in private_imports(module, MODULES[module].read_text(encoding="utf-8"))]
    assert offenders == []


@pytest.mark.parametrize("entry", ["pipeline.predictor", "pipeline.inference"])
def test_the_python_api_and_the_cli_stand_on_the_prediction_core_not_on_each_other(entry):
    """``Predictor`` and ``inference.py`` share the core; neither imports the other's module."""
    other = {"pipeline.predictor": "pipeline.inference", "pipeline.inference": "pipeline.predictor"}[entry]
    assert "pipeline.prediction" in imports(entry)
    assert [name for name in imports(entry) if _within(name, other)] == []


def test_inference_loads_no_training_module():
    chains = transitive_imports("pipeline.inference")
    assert "pipeline.data.dataset" in chains  # the walk follows imports at all
    training = {name: chain for name, chain in chains.items() if _within(name, "pipeline.train")}
    assert training == {}, "\n".join(" -> ".join(chain) for chain in training.values())


def test_models_import_no_data_engine_training_or_tool_modules():
    offenders = [f"{module} imports {name}" for module in MODULES if _within(module, "pipeline.models")
                 for name in sorted(imports(module)) if any(_within(name, banned) for banned in NOT_FOR_MODELS)]
    assert offenders == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_are_thin(script):
    lines = (ROOT / script).read_text(encoding="utf-8").splitlines()
    assert len(lines) < MAX_SCRIPT_LINES, f"{script} has {len(lines)} lines; its work belongs in pipeline/"
