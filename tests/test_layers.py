"""The README's architecture, checked: each layer of the package imports only the layers above it."""
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
# capacity/deploy.py writes a plan's server configs through the serving generators
EXCEPTIONS = {("capacity/deploy.py", "serving")}


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
