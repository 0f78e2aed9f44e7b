"""No import cycle among the project's modules (issue 18, item 3: config and prompts imported
each other). Read from the source with `ast`, so every import counts: top level, inside
functions, under `TYPE_CHECKING`, and the packages an import runs first."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _modules(package: str) -> dict[str, Path]:
    found = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The known modules `name` imports, with the packages above them."""

    def resolve(dotted: str) -> str | None:  # `a.b.f` names a.b when f is not a module
        while dotted and dotted not in known:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets |= {resolve(a.name) for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package[: len(package) - node.level + 1], *filter(None, [base])])
            targets |= {resolve(f"{base}.{a.name}") or resolve(base) for a in node.names}
    out = set()
    for target in filter(None, targets):
        parts = target.split(".")
        out |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & known.keys()
    return out - {name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                component.append(w)
            if component:
                found.append(sorted([v, *component]))

    for v in graph:
        if v not in index:
            visit(v)
    return found


@pytest.mark.parametrize("package", ["embedder", "tasks", "flows"])
def test_no_import_cycles(package: str) -> None:
    known = {**_modules("embedder"), **_modules("tasks"), **_modules("flows")}
    graph = {name: _imports(name, path, known) for name, path in known.items()}
    assert graph["embedder.config"] >= {"embedder.model.prompts"}, "the checker sees imports"
    cycles = [c for c in _cycles(graph) if any(m.split(".")[0] == package for m in c)]
    assert not cycles, f"import cycles: {cycles}"
