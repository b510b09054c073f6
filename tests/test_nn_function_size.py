"""The attention core stays readable: no function in attnfuse.nn longer than 60 lines (its
docstring not counted) or nested deeper than 4 blocks (if/for/while/with/try/match)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

NN = Path(__file__).resolve().parents[1] / "src" / "attnfuse" / "nn"
MAX_LINES, MAX_DEPTH = 60, 4
BLOCKS = (ast.If, ast.For, ast.While, ast.With, ast.Try, ast.Match, ast.AsyncFor, ast.AsyncWith)


def depth(node: ast.AST) -> int:
    """The deepest nesting of blocks inside ``node``, nested functions and classes apart."""
    deepest = 0
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        deepest = max(deepest, depth(child) + isinstance(child, BLOCKS))
    return deepest


def functions() -> list[tuple[str, ast.FunctionDef]]:
    found = []
    for path in sorted(NN.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found.append((f"{path.name}:{node.lineno} {node.name}", node))
    return found


def length(node: ast.FunctionDef) -> int:
    """Lines from ``def`` (decorators excluded) to the end, less the docstring's."""
    lines = node.end_lineno - node.lineno + 1
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        lines -= first.end_lineno - first.lineno + 1
    return lines


@pytest.mark.parametrize(("name", "node"), functions(), ids=[n for n, _ in functions()])
def test_function_is_short_and_shallow(name, node):
    assert length(node) <= MAX_LINES, f"{name}: {length(node)} lines"
    assert depth(node) <= MAX_DEPTH, f"{name}: nested {depth(node)} deep"
