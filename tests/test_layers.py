"""The import contract of pyproject.toml ``[tool.importlinter]``: every import in src/dfkd, at module level or inside a
function, goes to a layer below the importer's (commands -> engine -> methods -> losses, data, models -> config ->
utilities -> errors), and no chain of imports leads from a module back to itself.

The imports are read from the source with ``ast``, so this check needs nothing but the files; ``make lint`` runs
import-linter on the same contract, and the last tests here keep the old module paths working.
"""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own TOML reader
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
PACKAGE = "dfkd"

Imports = dict[str, dict[str, int]]  # importer -> {imported module: line of the first such import}


def module_names(src: Path) -> dict[str, Path]:
    """Dotted name -> file of every module under ``src`` (a package's name is its ``__init__.py``'s)."""
    names = {}
    for path in sorted(src.rglob("*.py")):
        parts = path.relative_to(src.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def read_imports(src: Path) -> Imports:
    """Every import of a module of the package by a module of the package, wherever in the file it stands.

    ``from a.b import c`` imports ``a.b``, and ``a.b.c`` too when that is a module; an import of a name that is no
    module counts as an import of the closest module above it.
    """
    modules = module_names(src)
    graph: Imports = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = graph.setdefault(name, {})
        for node in ast.walk(ast.parse(path.read_text(), str(path))):  # walks into function bodies too
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    found.setdefault(target, node.lineno)
    return graph


def read_layers(pyproject: Path = PYPROJECT) -> list[tuple[set[str], bool]]:
    """The layers contract, top first: (the children of the package in that layer, whether they are independent)."""
    contracts = tomllib.loads(pyproject.read_text())["tool"]["importlinter"]["contracts"]
    (layers,) = [c["layers"] for c in contracts if c["type"] == "layers"]
    return [({m.strip() for m in row.replace(":", "|").split("|")}, ":" not in row) for row in layers]


def layer_violations(graph: Imports, layers: list[tuple[set[str], bool]]) -> list[str]:
    """Each import that goes up a layer, across independent siblings, or back to the package root; and each child of
    the package that the contract does not place."""
    where = {child: (i, independent) for i, (children, independent) in enumerate(layers) for child in children}
    found = []
    for importer, imported in sorted((a, b) for a, targets in graph.items() for b in targets):
        line = graph[importer][imported]
        if importer == PACKAGE:
            continue  # the package root re-exports the API from every layer
        if imported == PACKAGE:
            found.append(f"{importer}:{line} imports the package root {PACKAGE}, which imports every layer")
            continue
        top, other = importer.split(".")[1], imported.split(".")[1]
        if top == other or top not in where or other not in where:
            continue
        (row, independent), (other_row, _) = where[top], where[other]
        if other_row < row:
            found.append(f"{importer}:{line} imports {imported}, a layer above it")
        elif other_row == row and independent:
            found.append(f"{importer}:{line} imports {imported}, an independent sibling")
    children = {name.split(".")[1] for name in graph if name != PACKAGE}
    found += [f"{PACKAGE}.{child} is in no layer of the contract" for child in sorted(children - set(where))]
    return found


def find_cycle(graph: Imports) -> list[str] | None:
    """One chain of imports that leads from a module back to itself, or None."""
    state: dict[str, str] = {}  # "open" while its imports are followed, then "done"
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for imported in sorted(graph.get(module, ())):
            if state.get(imported) == "open":
                return [*path[path.index(imported) :], imported]
            if imported not in state and (cycle := visit(imported)):
                return cycle
        state[module] = "done"
        path.pop()
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


@pytest.fixture(scope="module")
def graph() -> Imports:
    return read_imports(ROOT / "src" / PACKAGE)


def test_every_import_goes_down_a_layer(graph):
    assert layer_violations(graph, read_layers()) == []


def test_no_chain_of_imports_leads_back_to_its_start(graph):
    assert find_cycle(graph) is None


def test_the_checks_catch_an_upward_import_and_a_cycle(graph):
    assert "dfkd.engine.common" in graph["dfkd.engine.supervised"]  # what the doctored graphs below rely on
    upward = {**graph, "dfkd.models.loading": {**graph["dfkd.models.loading"], "dfkd.engine.common": 7}}
    assert layer_violations(upward, read_layers()) == [
        "dfkd.models.loading:7 imports dfkd.engine.common, a layer above it"
    ]
    circle = {**graph, "dfkd.engine.common": {**graph["dfkd.engine.common"], "dfkd.engine.supervised": 9}}
    cycle = find_cycle(circle)
    assert cycle is not None and cycle[0] == cycle[-1]
    assert "dfkd.engine.common" in cycle and "dfkd.engine.supervised" in cycle


def test_an_import_inside_a_function_counts(tmp_path):
    package = tmp_path / PACKAGE
    for folder in (package, package / "engine", package / "models"):
        folder.mkdir()
        (folder / "__init__.py").write_text("")
    (package / "engine" / "loop.py").write_text("from ..models.net import build\n")
    (package / "models" / "net.py").write_text("def build():\n    from dfkd.engine import loop\n    return loop\n")
    graph = read_imports(package)
    assert graph["dfkd.engine.loop"] == {"dfkd.models.net": 1}  # a relative import, resolved
    assert graph["dfkd.models.net"] == {"dfkd.engine": 2, "dfkd.engine.loop": 2}
    layers = [({"engine"}, True), ({"models"}, True)]
    assert layer_violations(graph, layers) == [
        "dfkd.models.net:2 imports dfkd.engine, a layer above it",
        "dfkd.models.net:2 imports dfkd.engine.loop, a layer above it",
    ]
    assert find_cycle(graph) == ["dfkd.engine.loop", "dfkd.models.net", "dfkd.engine.loop"]


def test_import_linter_keeps_the_contract(capsys):
    pytest.importorskip("importlinter.configuration").configure()  # what its command line does first
    from importlinter.application import use_cases

    passed = use_cases.lint_imports(str(PYPROJECT), cache_dir=None, no_logo=True)
    out = capsys.readouterr().out
    assert passed and "Contracts: 2 kept, 0 broken." in out, out


@pytest.mark.parametrize(
    ("old", "new"), [("dfkd.cli", "dfkd.commands.cli"), ("dfkd.plot", "dfkd.commands.plot")]
)
def test_a_moved_command_module_still_imports_by_its_old_name_and_warns(monkeypatch, old, new):
    monkeypatch.delitem(sys.modules, old, raising=False)
    with pytest.warns(DeprecationWarning, match=f"{old} is deprecated: import {new}"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)


def test_the_old_export_module_warns_and_leads_to_the_api(monkeypatch):
    import dfkd

    monkeypatch.delitem(sys.modules, "dfkd.export", raising=False)
    with pytest.warns(DeprecationWarning, match="dfkd.export is deprecated"):
        export = importlib.import_module("dfkd.export")
    assert (export.export_student, export.load_student) == (dfkd.export_student, dfkd.load_student)


def test_the_console_script_names_the_command_line():
    target = tomllib.loads(PYPROJECT.read_text())["project"]["scripts"]["dfkd"]
    module, _, function = target.partition(":")
    from dfkd.commands.cli import main

    assert getattr(importlib.import_module(module), function) is main
