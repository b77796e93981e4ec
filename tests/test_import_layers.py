"""The package's import structure: no import cycles among caaxr_tf modules, and every import
(module top level and inside functions alike) goes to the same or a lower layer.

Layers, top to bottom (docs: the declared order of issue 22):

    cli → {serving, evaluation, training, synthetic, demo} → runs → tasks
        → domain (ct, severity, infection, explain) → {data, models, metrics, losses} → core

A module belongs to the layer of the longest prefix in `LAYERS` that names it (a prefix names
the module itself and its submodules). Imports inside ``if TYPE_CHECKING:`` are annotations,
not imports at run time, and are not checked.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "caaxr_tf"

CORE, LOW, DOMAIN, TASKS, RUNS, APPS, CLI = range(7)
RANK_NAMES = {CORE: "core helpers", LOW: "data/models/metrics/losses", DOMAIN: "domain", TASKS: "tasks",
              RUNS: "runs", APPS: "serving/evaluation/training/synthetic/demo", CLI: "cli"}
LAYERS = {
    # cli
    "caaxr_tf.cli": CLI,
    "caaxr_tf.__main__": CLI,
    # serving, evaluation, training, synthetic data, demo: the applications over runs and records
    "caaxr_tf.export": APPS,
    "caaxr_tf.predict": APPS,
    "caaxr_tf.evaluate": APPS,
    "caaxr_tf.cv": APPS,
    "caaxr_tf.train": APPS,
    "caaxr_tf.training": APPS,
    "caaxr_tf.demo": APPS,
    "caaxr_tf.data.synthetic": APPS,
    "caaxr_tf.data.synthetic_ct": APPS,
    "caaxr_tf.data.synthetic_qata": APPS,
    "caaxr_tf.ct.report": APPS,  # evaluates CT runs (caaxr ct-report)
    "caaxr_tf.explain.evaluation": APPS,  # Grad-CAM evaluation of runs
    "caaxr_tf.infection.cam": APPS,  # compares an infection run's maps with a classifier's CAMs
    "caaxr_tf.severity.run_features": APPS,  # severity features from trained runs
    "caaxr_tf.data.layouts": APPS,  # the synthetic writer
    "caaxr_tf.model_package": APPS,  # the model card written by export, read by predict
    "caaxr_tf.scoring": APPS,  # caaxr score
    "caaxr_tf.scoring_plots": APPS,
    "caaxr_tf.scoring_tasks": APPS,  # caaxr score of regression targets and segmentation masks
    "caaxr_tf.score_inputs": APPS,  # protocol labels and predictions files read by caaxr score
    "caaxr_tf.compare": APPS,  # caaxr compare
    "caaxr_tf.calibrate": APPS,  # caaxr calibrate
    "caaxr_tf.weights.cli": APPS,  # caaxr import-weights
    # the Run object: a run folder with its typed config, task, model and datasets
    "caaxr_tf.runs": RUNS,
    # tasks
    "caaxr_tf.tasks": TASKS,
    # domain
    "caaxr_tf.ct": DOMAIN,
    "caaxr_tf.severity": DOMAIN,
    "caaxr_tf.infection": DOMAIN,
    "caaxr_tf.explain": DOMAIN,
    # data, models, metrics, losses
    "caaxr_tf.data": LOW,
    "caaxr_tf.models": LOW,
    "caaxr_tf.metrics": LOW,
    "caaxr_tf.losses": LOW,
    "caaxr_tf.weights": LOW,  # PyTorch checkpoints onto the Keras models
    "caaxr_tf.run_files": LOW,  # the files of a run folder (loads a model: needs models, metrics)
    # core helpers
    "caaxr_tf": CORE,  # the package itself (version) and anything not named above
    "caaxr_tf.io": CORE,
    "caaxr_tf.config": CORE,
    "caaxr_tf.locks": CORE,
    "caaxr_tf.logs": CORE,
    "caaxr_tf.plots": CORE,
    "caaxr_tf.tables": CORE,
    "caaxr_tf.registry": CORE,
}


def module_files() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


MODULES = module_files()


def layer_of(module: str) -> int:
    best = max((prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + ".")), key=len)
    return LAYERS[best]


def _resolve(name: str) -> str | None:
    """The caaxr_tf module an imported name lives in (a name imported from a module is the module)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _is_type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def module_imports(module: str, path: Path) -> list[tuple[str, int, str, bool]]:
    """``(imported module, line, statement, inside a function)`` for every caaxr_tf import of ``module``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit(other, in_function)
                continue
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                         for alias in child.names]
            else:
                visit(child, nested)
                continue
            statement = ast.unparse(child)
            for target in {_resolve(name) for name in names if name.split(".")[0] == "caaxr_tf"}:
                if target and target != module:
                    found.append((target, child.lineno, statement, nested))

    visit(tree, False)
    return found


IMPORTS = {module: module_imports(module, path) for module, path in MODULES.items()}


def _where(module: str, line: int) -> str:
    return f"{MODULES[module].relative_to(PACKAGE_DIR.parent)}:{line}"


def test_every_module_has_a_layer():
    assert "caaxr_tf.tasks.base" in MODULES and layer_of("caaxr_tf.tasks.base") == TASKS
    assert layer_of("caaxr_tf.data.pipeline") == LOW
    assert layer_of("caaxr_tf.data.synthetic_ct") == APPS


def test_imports_follow_the_layers():
    wrong = []
    for module, imports in IMPORTS.items():
        for target, line, statement, _ in imports:
            if layer_of(target) > layer_of(module):
                wrong.append(f"{_where(module, line)}: `{statement}` — {module} ({RANK_NAMES[layer_of(module)]}) "
                             f"imports {target} ({RANK_NAMES[layer_of(target)]}), a higher layer")
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def _cycles() -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    graph = {module: sorted({target for target, *_ in imports}) for module, imports in IMPORTS.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph.get(node, ()):
            if other not in index:
                connect(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            connect(module)
    return components


def test_no_import_cycles():
    messages = []
    for component in _cycles():
        members = set(component)
        edges = [f"  {_where(module, line)}: `{statement}` ({module} -> {target})"
                 for module in component for target, line, statement, _ in IMPORTS[module] if target in members]
        messages.append(f"cycle among {', '.join(component)}:\n" + "\n".join(edges))
    assert not messages, "import cycles:\n" + "\n".join(messages)


@pytest.mark.parametrize("statement", ["from caaxr_tf.tasks import get_task"])
def test_a_task_import_below_the_tasks_is_reported(statement, tmp_path):
    path = tmp_path / "fake.py"
    path.write_text(f"def f():\n    {statement}\n", encoding="utf-8")
    MODULES["caaxr_tf.data.fake"] = path
    try:
        imports = module_imports("caaxr_tf.data.fake", path)
    finally:
        del MODULES["caaxr_tf.data.fake"]
    assert imports == [("caaxr_tf.tasks", 2, statement, True)]
    assert layer_of("caaxr_tf.tasks") > layer_of("caaxr_tf.data.fake")


def test_every_module_is_placed_in_a_layer_by_name():
    """A new top-level module or package (caaxr_tf.X) must be named in LAYERS: the package-wide
    fallback to the core layer would otherwise let it import anything."""
    unplaced = sorted({".".join(module.split(".")[:2]) for module in MODULES if module.count(".") >= 1}
                      - set(LAYERS))
    assert unplaced == [], f"name these in LAYERS: {unplaced}"
