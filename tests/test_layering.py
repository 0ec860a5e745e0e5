"""The package's layers import only downward (issue 20): the network (models/, attention/), the
request's plain data (sampling_params, model_input) and the chat formats (chat/) never reach up
into the engine or the serving layers above it. Read from the source with ast, every import
counted (inside functions and TYPE_CHECKING blocks too: a lazy upward import is still one)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import lmserve

PACKAGE = Path(lmserve.__file__).parent
SERVING = {"engine", "backends", "server", "platform", "cli", "llm", "config"}
# part of lmserve -> the parts it must never import
FORBIDDEN = {
    "models": SERVING | {"chat"},
    "chat": SERVING,
    "attention": SERVING | {"models", "chat"},
    "sampling_params": SERVING | {"models", "chat", "attention"},
    "model_input": SERVING | {"models", "chat", "attention", "sampling_params"},
}


def _part(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    return rel.parts[0]


def imports_by_part() -> dict[str, dict[str, set[str]]]:
    """part -> imported part of lmserve -> the files that import it."""
    found: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        package = ["lmserve", *rel.parts[:-1]]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package[:len(package) - node.level + 1] if node.level else []
                module = ".".join([*base, node.module] if node.module else base)
                names = [module] if node.module or not node.level else [f"{module}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                parts = name.split(".")
                if parts[0] == "lmserve" and len(parts) > 1 and parts[1] != _part(path):
                    found[_part(path)][parts[1]].add(str(rel))
    return found


def test_lower_layers_never_import_upward():
    found = imports_by_part()
    # The walk itself sees imports (else every rule would hold vacuously).
    assert "attention" in found["engine"] and "model_input" in found["attention"]
    broken = {f"{part} -> {target}": sorted(found[part][target])
              for part, targets in FORBIDDEN.items() for target in targets if target in found[part]}
    assert not broken, broken
