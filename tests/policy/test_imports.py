"""course_lib's modules import each other without a cycle, and only downwards through its layers
(lazy imports inside functions included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import course_lib

PACKAGE = Path(course_lib.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(name: str, modules: set[str]) -> str | None:
    """The course_lib module an import refers to (a package attribute like `course_lib.masks` counts)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                base = node.module
                if node.level:  # relative import
                    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        package = package.rpartition(".")[0]
                    base = f"{package}.{node.module}"
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in targets:
                if target.startswith("course_lib"):
                    resolved = _resolve(target, modules)
                    if resolved and resolved != name:
                        edges.add(resolved)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            # a package's __init__ re-exporting its own submodules is not a cycle
            if nxt.startswith(node + ".") or node.startswith(nxt + "."):
                continue
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_course_lib_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = import_graph()
    graph["course_lib.masks"] = graph["course_lib.masks"] | {"course_lib.mha"}  # mha imports masks already
    assert find_cycle(graph) is not None


def test_the_graph_sees_lazy_imports():
    assert "course_lib.kernels" in import_graph()["course_lib.attention"]  # imported inside a function


# ------------------------------------------------------------------------------------------ layers
# course_lib's folders are layers. A module may import its own layer and the layers listed here, nothing
# else: the spine (the root modules: the numpy reference, attention, masks, caches, positions, the modules)
# needs only the input checks and the optional Triton kernels; today's variants and the parallel code are
# built on the spine; the experiments use all of that plus the tools (device, viz, paths) and the cost
# formulas; benchmarks and exercise checkers sit on top and never import each other.
BELOW_SPINE = {"_validate", "kernels"}
LAYER_IMPORTS: dict[str, set[str]] = {
    "_validate": set(),
    "tools": {"_validate"},
    "cost": {"_validate"},
    "kernels": {"_validate"},
    "spine": BELOW_SPINE,
    "modern": BELOW_SPINE | {"spine"},
    "parallel": BELOW_SPINE | {"spine"},
    "experiments": BELOW_SPINE | {"spine", "modern", "parallel", "tools", "cost"},
    "bench": BELOW_SPINE | {"spine", "modern", "parallel", "tools", "cost", "experiments"},
    "checks": BELOW_SPINE | {"spine", "modern", "parallel", "tools", "cost", "experiments"},
}
# Modules held to less than their layer allows: the pure numpy reference, which every other
# implementation is checked against, depends on numpy and the input checks only.
MODULE_IMPORTS: dict[str, set[str]] = {"course_lib.numpy_ref": {"course_lib._validate"}}
FOLDERS = set(LAYER_IMPORTS) - {"_validate", "spine"}


def layer_of(module: str) -> str | None:
    """The layer of a course_lib module: its folder, "spine" for the root modules, None if unknown."""
    parts = module.split(".")
    if module == "course_lib._validate":
        return "_validate"
    if len(parts) > 1 and parts[1] in FOLDERS:
        return parts[1]
    if len(parts) == 1 or (len(parts) == 2 and not (PACKAGE / parts[1]).is_dir()):
        return "spine"  # the package itself and the modules at its root
    return None  # a folder the table does not know


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """One line per import that crosses the layers the wrong way (or leaves a module's own allowance)."""
    found = []
    for module in sorted(graph):
        layer = layer_of(module)
        if layer is None:
            found.append(f"{module} is in no known layer: add its folder to LAYER_IMPORTS")
            continue
        for target in sorted(graph[module]):
            target_layer = layer_of(target)
            if module in MODULE_IMPORTS:
                if target not in MODULE_IMPORTS[module]:
                    found.append(f"{module} imports {target}; it may import only {sorted(MODULE_IMPORTS[module])}")
            elif target_layer != layer and target_layer not in LAYER_IMPORTS[layer]:
                found.append(f"{module} ({layer}) imports {target} ({target_layer}); {layer} may import only "
                             f"{sorted(LAYER_IMPORTS[layer] | {layer})}")
    return found


def test_course_lib_imports_follow_its_layers():
    found = layer_violations(import_graph())
    assert not found, "imports against the layers:\n" + "\n".join(found)


def test_every_layer_of_the_table_has_modules():
    empty = set(LAYER_IMPORTS) - {layer_of(m) for m in import_graph()}
    assert not empty, f"LAYER_IMPORTS names layers with no module (a folder renamed?): {sorted(empty)}"


@pytest.mark.parametrize(("module", "target", "message"), [
    ("course_lib.numpy_ref", "course_lib.cost.io_complexity",
     "course_lib.numpy_ref imports course_lib.cost.io_complexity; it may import only ['course_lib._validate']"),
    ("course_lib.numpy_ref", "course_lib.masks", "course_lib.numpy_ref imports course_lib.masks"),
    ("course_lib.mha", "course_lib.tools.device",
     "course_lib.mha (spine) imports course_lib.tools.device (tools); spine may import only"),
    ("course_lib.modern.mla", "course_lib.parallel.distributed",
     "course_lib.modern.mla (modern) imports course_lib.parallel.distributed (parallel)"),
    ("course_lib.experiments.precision", "course_lib.bench.timing",
     "course_lib.experiments.precision (experiments) imports course_lib.bench.timing (bench)"),
    ("course_lib.checks.nb09", "course_lib.bench.timing",
     "course_lib.checks.nb09 (checks) imports course_lib.bench.timing (bench)"),
    ("course_lib.cost.flops", "course_lib.tools.device",
     "course_lib.cost.flops (cost) imports course_lib.tools.device (tools)"),
])
def test_the_layer_check_finds_a_planted_violation(module, target, message):
    graph = import_graph()
    assert target not in graph[module]
    graph[module] = graph[module] | {target}
    found = layer_violations(graph)
    assert len(found) == 1 and found[0].startswith(message), found


def test_the_layer_check_names_a_folder_it_does_not_know():
    graph = import_graph() | {"course_lib.extras.thing": {"course_lib.mha"}}
    assert layer_violations(graph) == ["course_lib.extras.thing is in no known layer: add its folder to LAYER_IMPORTS"]
