"""The shape of the package (issue 16): module and function sizes, no import circles (lazy
imports included), and no private name imported from another module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = REPO / "jewelclf"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, str | None, int]]:
    """(module imported, name taken from it or None, line) for every import, lazy ones too."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(a.name, None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                if f"{base}.{a.name}" in MODULES:  # "from pkg import module"
                    found.append((f"{base}.{a.name}", None, node.lineno))
                else:
                    found.append((base, a.name, node.lineno))
    return [f for f in found if f[0] == "jewelclf" or f[0].startswith("jewelclf.")]


def _graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        deps = set()
        for module, _, _ in _imports(name, path):
            # importing a.b.c runs a and a.b first, but their __init__ files are empty here
            if module in MODULES and module != name:
                deps.add(module)
        graph[name] = deps
    return graph


def test_no_module_is_over_the_size_limit():
    big = {n: len(p.read_text(encoding="utf-8").splitlines()) for n, p in MODULES.items()}
    assert {n: c for n, c in big.items() if c > MAX_MODULE_LINES} == {}


def test_no_function_is_over_the_size_limit():
    long = {}
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long[f"{name}.{node.name}"] = n
    assert long == {}


def test_no_import_circle_lazy_imports_included():
    graph = _graph()
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert cycles == []


def test_no_private_name_is_imported_from_another_module():
    private = []
    for name, path in MODULES.items():
        for module, imported, line in _imports(name, path):
            last = (imported or module.rpartition(".")[2])
            if last.startswith("_") and not last.startswith("__"):
                private.append(f"{path.name}:{line} imports {module}:{imported}")
    assert private == []


@pytest.mark.parametrize("broken, rule", [
    ("import jewelclf.config\n", "circle"),
    ("from jewelclf.errors import _hidden\n", "private"),
])
def test_the_checks_catch_what_they_are_for(tmp_path, monkeypatch, broken, rule):
    """Each rule fails on a module that breaks it (the checks are not vacuous)."""
    fake = tmp_path / "errors.py"
    fake.write_text(broken)
    monkeypatch.setitem(MODULES, "jewelclf.errors", fake)
    if rule == "circle":  # config imports errors; errors importing config closes a circle
        with pytest.raises(AssertionError):
            test_no_import_circle_lazy_imports_included()
    else:
        with pytest.raises(AssertionError):
            test_no_private_name_is_imported_from_another_module()
