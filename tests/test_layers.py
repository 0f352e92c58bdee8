"""The README's architecture, checked: each layer of the package imports only the layers above it, and no
module of the package imports itself back through others (at any depth, function-level imports included)."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "splitpack"
# layer -> what it may import (besides itself and the top-level splitpack modules: errors, publish, models)
ALLOWED = {
    "core": set(),
    "measure": {"core"},
    "experiments": {"core", "measure"},
    "serving": {"core", "measure"},
    "capacity": {"core", "measure"},
    "cli": {"core", "measure", "experiments", "serving", "capacity"},
}
EXCEPTIONS: set[tuple[str, str]] = set()  # (file, layer) allowed against the rule: none


def _imported_layers(path: Path) -> set[str]:
    layers = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
        for name in names:
            parts = name.split(".")
            if parts[0] == "splitpack" and len(parts) > 1 and parts[1] in ALLOWED:
                layers.add(parts[1])
    return layers


def test_each_layer_imports_only_the_layers_above_it():
    wrong = []
    for layer, allowed in ALLOWED.items():
        for path in sorted((PACKAGE / layer).rglob("*.py")):
            relative = str(path.relative_to(PACKAGE))
            for imported in _imported_layers(path) - allowed - {layer}:
                if (relative, imported) not in EXCEPTIONS:
                    wrong.append(f"{relative} imports splitpack.{imported}")
    assert not wrong, wrong


def test_docs_name_modules_and_files_that_exist():
    """README.md and docs/*.md point at real files (splitpack/...py) and importable names (splitpack.x.y)."""
    import importlib
    import re

    root = PACKAGE.parent
    missing = []
    for doc in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        text = doc.read_text()
        for path in set(re.findall(r"\bsplitpack/[\w/]+\.py\b", text)):
            if not (root / path).is_file():
                missing.append(f"{doc.name}: {path}")
        for dotted in set(re.findall(r"\bsplitpack(?:\.[A-Za-z_]\w*)+", text)):
            parts = dotted.split(".")
            for cut in range(len(parts), 0, -1):  # the longest importable module, then attributes
                try:
                    obj = importlib.import_module(".".join(parts[:cut]))
                    break
                except ImportError:
                    continue
            for attr in parts[cut:]:
                obj = getattr(obj, attr, None)
            if obj is None:
                missing.append(f"{doc.name}: {dotted}")
    assert not missing, missing


def _runtime_imports(path: Path, modules) -> set[str]:
    """The splitpack modules a file imports when it runs (at module or function level; not the
    ``if TYPE_CHECKING:`` ones): ``from X import name`` imports the module X.name if there is one, else X."""
    tree = ast.parse(path.read_text())
    type_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and
                 getattr(block.test, "id", getattr(block.test, "attr", None)) == "TYPE_CHECKING"
                 for stmt in block.body for n in ast.walk(stmt)}
    names = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                      for a in node.names}
    return names & modules


def test_no_import_cycles():
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {name: sorted(_runtime_imports(path, modules.keys()) - {name}) for name, path in modules.items()}
    cycles = []
    state: dict[str, str] = {}  # "open" while on the depth-first path, "done" after

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for imported in graph[name]:
            if state.get(imported) == "open":
                cycles.append(" -> ".join(path[path.index(imported):] + [name, imported]))
            elif imported not in state:
                visit(imported, path + [name])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    assert not cycles, cycles
