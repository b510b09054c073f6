"""Functions a reader can hold in their head: none in ``src/`` is longer than 60 lines (its
docstring not counted) or nests compound statements (if/for/while/with/try/match) more than 4 deep.
The few exceptions are listed with their reason; a new long function fails here and is split into
helpers that each do one thing."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_LINES, MAX_DEPTH = 60, 4
NESTING = (ast.If, ast.For, ast.AsyncFor, ast.While, ast.With, ast.AsyncWith, ast.Try, ast.Match)
NESTING += tuple(getattr(ast, name) for name in ("TryStar",) if hasattr(ast, name))  # Python >= 3.11

# "module:qualified name" -> why it stays as it is.
ALLOWED: dict[str, str] = {
}


def depth(node: ast.AST, level: int = 0) -> int:
    """How deep compound statements nest inside ``node`` (a nested function starts its own count)."""
    deepest = level
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        deepest = max(deepest, depth(child, level + isinstance(child, NESTING)))
    return deepest


def body_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from ``def`` to the function's last line, less its docstring."""
    lines = fn.end_lineno - fn.lineno + 1
    first = fn.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        lines -= first.end_lineno - first.lineno + 1
    return lines


def functions(tree: ast.AST, prefix: str = ""):
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield f"{prefix}{node.name}", node
            yield from functions(node, f"{prefix}{node.name}.")
        elif isinstance(node, ast.ClassDef):
            yield from functions(node, f"{prefix}{node.name}.")
        else:
            yield from functions(node, prefix)


def offenders() -> dict[str, str]:
    found = {}
    for path in sorted(SRC.rglob("*.py")):
        module = path.relative_to(SRC).as_posix()
        for name, fn in functions(ast.parse(path.read_text(encoding="utf-8"))):
            lines, nest = body_lines(fn), depth(fn)
            if lines > MAX_LINES or nest > MAX_DEPTH:
                found[f"{module}:{name}"] = f"{lines} lines, nesting {nest}"
    return found


def test_no_function_is_too_long_or_too_deep():
    new = {k: v for k, v in offenders().items() if k not in ALLOWED}
    assert not new, "split these into helpers (or list them in ALLOWED with a reason):\n" + "\n".join(
        f"  {k}: {v}" for k, v in new.items()
    )


def test_the_allow_list_names_only_real_exceptions():
    stale = sorted(set(ALLOWED) - set(offenders()))
    assert not stale, f"no longer long or deep, remove from ALLOWED: {stale}"


def test_the_measure_itself():
    tree = ast.parse(
        "def f():\n"
        '    """doc\n    string"""\n'
        "    for i in x:\n        if i:\n            with y:\n                try:\n                    pass\n"
        "                except E:\n                    pass\n"
        "    def g():\n        if a:\n            pass\n"
    )
    fn = dict(functions(tree))
    assert depth(fn["f"]) == 4 and depth(fn["f.g"]) == 1
    assert body_lines(fn["f"]) == 13 - 2
