"""The package's shape, as ``docs/architecture.md`` describes it: no import cycles between its
modules, and no module outside ``kernels/`` past 600 lines."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "xquant_fx"


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _import_time_nodes(tree: ast.Module):
    """The import statements that run when the module is imported: those at module level,
    inside module-level ``try`` / ``if`` blocks, but not under ``if TYPE_CHECKING``."""
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.If, ast.Try)):
            if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
                continue
            yield from (n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom)))


def _imported(module: str, path: Path, node, modules) -> set[str]:
    """The package modules ``node`` (in ``module``, at ``path``) imports."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in modules}
    base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = base[: len(base) - node.level + 1] if node.level else []
    prefix = ".".join(base + ([node.module] if node.module else []))
    names = {f"{prefix}.{a.name}" for a in node.names}
    found = {name for name in names if name in modules}
    if len(found) < len(names) and prefix in modules:  # names defined in the module ``prefix``
        found.add(prefix)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports at import time. An edge to one's own parent
    package is left out: importing ``xquant_fx.cache`` runs ``xquant_fx/__init__`` first anyway."""
    modules = _modules()
    graph = {}
    for module, path in modules.items():
        deps = set()
        for node in _import_time_nodes(ast.parse(path.read_text())):
            deps |= _imported(module, path, node, modules)
        graph[module] = {d for d in deps if d != module and not module.startswith(d + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_graph_sees_the_package_imports():
    graph = import_graph()
    assert "xquant_fx.config" in graph["xquant_fx.cache"]
    assert "xquant_fx.kernels.common" in graph["xquant_fx.kernels.attend"]


def test_package_has_no_import_cycles():
    assert cycles(import_graph()) == []


def test_modules_outside_kernels_stay_under_600_lines():
    long = {str(path.relative_to(PACKAGE)): n for path in PACKAGE.rglob("*.py")
            if "kernels" not in path.parts and (n := len(path.read_text().splitlines())) > 600}
    assert long == {}
