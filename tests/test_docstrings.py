"""The library's public functions carry their contract (issue 18): a docstring on every one,
and on every stage function the files it writes and the errors it raises."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "embedder"


def _public_defs(path: Path) -> list[tuple[str, ast.AST]]:
    """(qualified name, node) of the module's public functions, classes and their methods."""
    found: list[tuple[str, ast.AST]] = []

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                if node.name.startswith("_"):
                    continue
                found.append((prefix + node.name, node))
                if isinstance(node, ast.ClassDef):
                    visit(node.body, f"{prefix}{node.name}.")

    visit(ast.parse(path.read_text()).body, "")
    return found


@pytest.mark.parametrize(
    "path", sorted(ROOT.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT.parent))
)
def test_every_public_function_of_the_library_has_a_docstring(path: Path) -> None:
    missing = [name for name, node in _public_defs(path) if not ast.get_docstring(node)]  # type: ignore[arg-type]
    assert not missing, f"{path.name}: no docstring on {', '.join(missing)}"


def test_every_stage_function_says_what_it_writes_and_raises() -> None:
    import inspect

    from tasks import stages
    from tasks.stage import Stage

    for stage in (v for v in vars(stages).values() if isinstance(v, Stage)):
        doc = inspect.getdoc(stage.function) or ""
        assert "Raises" in doc, f"{stage.name}: the errors it raises"
        assert any(w in doc for w in ("Write", "write", "Files")), f"{stage.name}: its files"
