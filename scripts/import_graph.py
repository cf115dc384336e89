"""The package's import graph from its source (ast: every import, function-level ones too): its circles, and
the arrows that run back up the floors. Floors, lowest first: errors, infra, config, data, engine, eval, tools,
cli/__main__. A module may import from its own floor or below.

    python scripts/import_graph.py            # prints the circles and the upward arrows; exit 1 if any
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "electra_scale"
FLOORS = ["errors", "infra", "config", "data", "engine", "eval", "tools", "cli", "__main__"]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def floor(module: str) -> int:
    part = module.split(".")[1] if "." in module else ""
    return FLOORS.index(part) if part in FLOORS else -1  # the package's own __init__: below everything


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in (ROOT / PACKAGE).rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from its package, up level - 1
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*up, base] if base else up)
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            for target in targets:
                while target and target not in modules:  # a name imported from a module: the module
                    target = target.rsplit(".", 1)[0] if "." in target else ""
                if target and target != name:
                    edges[name].add(target)
    return edges


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def upward(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((a, b) for a, bs in edges.items() for b in bs if floor(b) > floor(a))


def main() -> int:
    edges = graph()
    cycles, up = circles(edges), upward(edges)
    print(f"{len(edges)} modules, {sum(map(len, edges.values()))} imports")
    print(f"circles: {len(cycles)}")
    for c in cycles:
        print("  " + " <-> ".join(c))
    print(f"arrows back up the floors ({' < '.join(FLOORS)}): {len(up)}")
    for a, b in up:
        print(f"  {a} -> {b}")
    return 1 if cycles or up else 0


if __name__ == "__main__":
    sys.exit(main())
