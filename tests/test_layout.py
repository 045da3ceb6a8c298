"""The package layout's import rules, read from the source with `ast` (nothing is imported or run).

serve_app/ is layered: the top-level modules (config, errors, metrics, periodic) at the bottom; accounts/, replica/
and cluster/ on them; the gateway on accounts and replica's torch-free parts; the builders and thin command entry
points (app, keys, usage, capacity) on top. models/ is the engines, below all of serve_app and without Ray.
Every import statement counts, inside functions too (a deferred import is still a dependency); only imports under
`if TYPE_CHECKING:` are left out, since they never run.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("serve_app", "models")
TOP_LEVEL_LIMIT = 9  # app, config, errors, metrics, periodic and the thin entry points keys, usage, capacity (+1)

# Which capability may import which. A unit is a top-level package of serve_app, a top-level module of it, or models.
BASE = {"serve_app.config", "serve_app.errors", "serve_app.metrics", "serve_app.periodic"}
ALLOWED = {
    "models": set(),
    "serve_app.config": set(),
    "serve_app.errors": set(),
    "serve_app.periodic": set(),
    "serve_app.metrics": set(),
    "serve_app.accounts": BASE,
    "serve_app.replica": BASE | {"models"},
    "serve_app.cluster": BASE,
    "serve_app.gateway": BASE | {"serve_app.accounts", "serve_app.replica"},
}
ENTRY_POINTS = {"serve_app.app", "serve_app.keys", "serve_app.usage", "serve_app.capacity"}
# The parts of replica/ the gateway may use: no torch behind them.
GATEWAY_MAY_USE_FROM_REPLICA = {"serve_app.replica.quantization", "serve_app.replica.instructions"}
TORCH_LIBRARIES = {"torch", "transformers", "safetensors"}


def module_files() -> dict[str, Path]:
    files = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported_names(path: Path, module: str) -> set[str]:
    """Every dotted name an import statement of the file reaches for (`from a.b import c` gives a.b and a.b.c)."""
    is_package = path.name == "__init__.py"
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            names.add(source)
            names.update(f"{source}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return names


@pytest.fixture(scope="module")
def graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """({module: project modules it imports}, {module: outside top-level packages it imports})."""
    files = module_files()
    internal: dict[str, set[str]] = {}
    external: dict[str, set[str]] = {}
    for module, path in files.items():
        names = imported_names(path, module)
        # `from serve_app import PROJECT_ROOT` is the package itself; `from serve_app.gateway import protocol`
        # the module.
        internal[module] = {name for name in names if name in files and name != module}
        external[module] = {name.split(".")[0] for name in names if name.split(".")[0] not in PACKAGES}
    return internal, external


def unit_of(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "models":
        return "models"
    return ".".join(parts[:2]) if len(parts) > 1 else module


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), or with a self-loop."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges.get(node, ()):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in edges.get(node, ()):
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            connect(node)
    return found


def test_no_module_imports_itself_through_others(graph):
    internal, _ = graph
    # A package's __init__ importing nothing of its own makes "package -> its module" edges harmless; drop them so
    # `from serve_app.gateway import protocol` (package, then module) is not read as a circle through the package.
    edges = {module: {target for target in targets if not module.startswith(f"{target}.")}
             for module, targets in internal.items()}
    assert cycles(edges) == []


def test_no_capability_imports_another_in_a_circle(graph):
    internal, _ = graph
    edges: dict[str, set[str]] = defaultdict(set)
    for module, targets in internal.items():
        edges[unit_of(module)].update(unit_of(target) for target in targets if unit_of(target) != unit_of(module)
                                      and target != "serve_app")
    assert cycles(edges) == []


def test_each_capability_imports_only_the_layers_below_it(graph):
    internal, _ = graph
    wrong = []
    for module, targets in sorted(internal.items()):
        unit = unit_of(module)
        if unit in ENTRY_POINTS or module == "serve_app":
            continue
        assert unit in ALLOWED, f"{module}: a new top-level module or package; give it a place in ALLOWED"
        for target in sorted(targets):
            target_unit = unit_of(target)
            if target == "serve_app" or target_unit == unit:
                continue
            if target_unit not in ALLOWED[unit]:
                wrong.append(f"{module} imports {target}")
            # `from serve_app.replica import quantization` names the package too: its __init__ holds only a
            # docstring, and test_the_gateway_never_reaches_torch would see anything it ever imported.
            elif (unit == "serve_app.gateway" and target_unit == "serve_app.replica" and target != target_unit
                  and not any(target == allowed or target.startswith(f"{allowed}.")
                              for allowed in GATEWAY_MAY_USE_FROM_REPLICA)):
                wrong.append(f"{module} imports {target} (the gateway may use only the torch-free "
                             f"{sorted(GATEWAY_MAY_USE_FROM_REPLICA)})")
    assert wrong == []


def test_the_gateway_never_reaches_torch(graph):
    """Not directly, nor through any project module it imports, however deep."""
    internal, external = graph
    reached: dict[str, list[str]] = {}
    for start in (module for module in internal if unit_of(module) == "serve_app.gateway"):
        seen, todo = {start}, [start]
        while todo:
            module = todo.pop()
            for library in external[module] & TORCH_LIBRARIES:
                reached.setdefault(start, []).append(f"{library} (in {module})")
            for target in internal[module] - seen:
                seen.add(target)
                todo.append(target)
    assert reached == {}


def test_models_never_import_ray_or_the_serving_app(graph):
    internal, external = graph
    wrong = {module: sorted((external[module] & {"ray"}) | {t for t in internal[module] if t.startswith("serve_app")})
             for module in internal if unit_of(module) == "models"}
    assert {module: found for module, found in wrong.items() if found} == {}


def test_the_top_of_serve_app_stays_small():
    top = sorted(path.name for path in (REPO / "serve_app").glob("*.py") if path.name != "__init__.py")
    assert len(top) <= TOP_LEVEL_LIMIT - 1, top


def test_the_rules_see_a_forbidden_import(tmp_path):
    """The reader finds imports where they hide: in functions, relative, and not under TYPE_CHECKING."""
    source = tmp_path / "probe.py"
    source.write_text("from typing import TYPE_CHECKING\n"
                      "if TYPE_CHECKING:\n    from serve_app.gateway.handling import Served\n"
                      "def late():\n    import torch\n    from .bodies import json_body\n")
    names = imported_names(source, "serve_app.gateway.probe")
    assert {"torch", "serve_app.gateway.bodies", "serve_app.gateway.bodies.json_body"} <= names
    assert not any("handling" in name for name in names)
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
