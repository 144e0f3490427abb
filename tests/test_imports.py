"""Import structure: no module-level import cycle in romcomp or calib, calib independent of romcomp, and
``import romcomp`` / ``import calib`` light.

The graph is read from the source with :mod:`ast`, not by importing: an edge ``a -> b`` is an import of
``b`` that runs when ``a`` is imported (module scope, class bodies, ``if``/``try``/``with`` blocks;
not function bodies, not ``if TYPE_CHECKING:``). ``from pkg import mod`` is an edge to ``pkg.mod`` when
``mod`` is a submodule, else to ``pkg``. A parent package that Python initializes on the way to a
submodule is not an edge: it is only ever partially initialized, which is harmless.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import REPO

PACKAGES = ("romcomp", "calib")


def module_files(root: Path = REPO, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """``{dotted module name: file}`` of every ``.py`` file of ``packages`` below ``root``."""
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def import_time_statements(body: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    """The import statements among ``body`` that run when the module is imported."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from import_time_statements(node.orelse)
        else:  # class bodies, if/else, try/except/finally, with, for, while, match
            for field in ("body", "orelse", "finalbody"):
                yield from import_time_statements(getattr(node, field, None) or [])
            for clause in [*(getattr(node, "handlers", None) or []), *(getattr(node, "cases", None) or [])]:
                yield from import_time_statements(clause.body)


def all_statements(tree: ast.Module) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement of a module, at any depth (functions included)."""
    return (node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom)))


def imported_modules(node: ast.Import | ast.ImportFrom, package: str, modules: set[str]) -> list[str]:
    """The dotted names one statement imports; ``package`` (the importing module's package) anchors a
    relative import."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        parts = package.split(".")
        anchor = parts[: len(parts) - (node.level - 1)]
        base = ".".join([*anchor, *([base] if base else [])])
    return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]


def _package_of(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def import_graph(files: dict[str, Path], module_level: bool = True) -> dict[str, set[str]]:
    """``{module: modules of ``files`` it imports}``; ``module_level=False`` counts imports in functions."""
    modules = set(files)
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        statements = import_time_statements(tree.body) if module_level else all_statements(tree)
        package = _package_of(module, path)
        targets = {t for node in statements for t in imported_modules(node, package, modules)}
        graph[module] = {t for t in targets if t in modules and t != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``a -> b -> ... -> a``) per strongly connected component with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(node: str) -> None:  # Tarjan; the graphs here are small enough for recursion
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_in(sorted(c)[0], graph, c) for c in components]


def _cycle_in(start: str, graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest path from ``start`` back to itself inside ``component`` (breadth first)."""
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for succ in sorted(graph[node] & component):
                if succ == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start] if node != start else [start, start]
                if succ not in parents:
                    parents[succ] = node
                    following.append(succ)
        frontier = following
    raise AssertionError(f"{start} is in a component without a cycle through it")


def test_no_module_level_import_cycle():
    found = cycles(import_graph(module_files()))
    assert not found, "module-level import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_calib_imports_nothing_from_romcomp():
    files = module_files()
    modules = set(files)
    offenders = set()
    for module, path in files.items():
        if module.split(".")[0] != "calib":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in all_statements(tree):
            for target in imported_modules(node, _package_of(module, path), modules):
                if target.split(".")[0] == "romcomp":
                    offenders.add(f"{path.relative_to(REPO)}:{node.lineno}: {target}")
    assert not offenders, "calib must not import romcomp:\n" + "\n".join(sorted(offenders))


LAYERS_BELOW = {
    "romcomp.evaluation": ("romcomp.studies", "romcomp.cli"),
    "romcomp.studies": ("romcomp.cli",),
}
"""Packages that must not import the ones listed, at any depth (function bodies included): the studies
build on evaluation, the command line on both, never the other way round."""


def test_evaluation_and_studies_do_not_import_upwards():
    files = module_files()
    graph = import_graph(files, module_level=False)
    offenders = sorted(
        f"{module} -> {target}"
        for module, targets in graph.items()
        for package, above in LAYERS_BELOW.items()
        if module == package or module.startswith(package + ".")
        for target in targets
        if any(target == a or target.startswith(a + ".") for a in above)
    )
    assert not offenders, "imports from a layer above:\n" + "\n".join(offenders)


def _loaded_after(statement: str) -> list[str]:
    """The romcomp/calib modules in ``sys.modules`` after ``statement``, in a fresh interpreter."""
    code = f"{statement}; import json, sys; print(json.dumps(sorted(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    return [m for m in loaded if m.split(".")[0] in PACKAGES]


def test_import_romcomp_is_light():
    loaded = _loaded_after("import romcomp")
    heavy = [m for m in loaded if m == "romcomp.api" or m.startswith("romcomp.compression")]
    assert not heavy, f"import romcomp loaded {heavy}"


def test_romcomp_compress_stays_the_api_function():
    """``romcomp.compress`` is the one-call API even after the pipeline package (``romcomp.compression``,
    named apart for this reason) is imported: a submodule named ``compress`` would replace it."""
    code = ("import romcomp; f = romcomp.compress; import romcomp.compression.pipeline; "
            "assert romcomp.compress is f and callable(f), romcomp.compress; print('ok')")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-1500:]


def test_import_calib_loads_no_romcomp():
    loaded = _loaded_after("import calib")
    assert "calib" in loaded
    assert not [m for m in loaded if m.split(".")[0] == "romcomp"], loaded


def test_cycle_finder_sees_a_cycle(tmp_path):
    """The checker itself: an injected three-module cycle is found; a function-level import is not one."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("from typing import TYPE_CHECKING\nfrom . import c\n")
    (pkg / "sub" / "c.py").write_text("try:\n    import pkg.a\nexcept ImportError:\n    pass\n")
    (pkg / "d.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.e\n")
    (pkg / "e.py").write_text("import pkg.d\n\ndef f():\n    import pkg.a\n")
    files = module_files(tmp_path, ("pkg",))
    graph = import_graph(files)
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.sub.c"}
    assert cycles(graph) == [["pkg.a", "pkg.sub.b", "pkg.sub.c", "pkg.a"]]
    assert "pkg.a" in import_graph(files, module_level=False)["pkg.e"]
