"""No two fastmdm modules import each other, directly or through a chain.

The graph is read from the source with `ast`: every `import` and `from ... import` anywhere
in a module (function bodies included, since a deferred import is still a dependency),
resolved to the fastmdm module it names (`from .pkg import name` counts as importing
pkg.name when that is a module, else pkg). A package's __init__ is a node like any other;
importing a submodule is not counted as importing its package.
"""
import ast
import graphlib
from pathlib import Path

import fastmdm

ROOT = Path(fastmdm.__file__).resolve().parent


def module_names() -> dict[str, Path]:
    names = {}
    for path in ROOT.rglob("*.py"):
        parts = ("fastmdm",) + path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[:len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:   # `import fastmdm.x.y` names fastmdm.x.y
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    """Each fastmdm module and the fastmdm modules it imports."""
    modules = module_names()
    return {name: imports_of(name, path, set(modules)) for name, path in modules.items()}


def test_the_graph_sees_relative_and_absolute_imports():
    graph = import_graph()
    assert "fastmdm.models" in graph["fastmdm.api"]          # from .models import ...
    assert "fastmdm.ops" in graph["fastmdm.models.base"]     # from ..ops import ...
    assert "fastmdm.api" in graph["fastmdm.cli"]


def test_deferred_imports_count(tmp_path):
    source = tmp_path / "probe.py"
    source.write_text("def later():\n    from . import api\n    from .models import base\n")
    assert imports_of("fastmdm.probe", source, set(module_names())) == {"fastmdm.api", "fastmdm.models.base"}


def test_the_cycle_check_finds_a_cycle():
    graph = import_graph()
    graph["fastmdm.models.base"].add("fastmdm.api")
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError:
        return
    raise AssertionError("a cycle through fastmdm.api went unnoticed")


def test_no_import_cycles():
    try:
        graphlib.TopologicalSorter(import_graph()).prepare()
    except graphlib.CycleError as error:
        raise AssertionError("modules that import each other: " + " -> ".join(error.args[1])) from None
