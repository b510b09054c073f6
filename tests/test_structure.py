"""The package's shape: no import cycle, layers that import only downwards, every module importable
on its own. The import graph is ruff's (`ruff analyze graph`): every import counts, at the top of a
module, inside a function (imported late to start faster) or under `if TYPE_CHECKING:` (only
naming types, but a reader still follows it); the check is here."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "attnfuse"

# Layers, lowest first: a module may import from its own layer and the layers below it only. A
# module missing from this table fails the test, so that a new module is placed on purpose.
LAYERS: list[tuple[str, list[str]]] = [
    # ../attnfuse_cli.py: the program's start and end (the Ctrl-C guard), the standard library only
    (
        "base",
        [
            "_version.py",
            "checks.py",
            "options.py",
            "metrics.py",
            "distributed.py",
            "files.py",
            "threads.py",
            "../attnfuse_cli.py",
        ],
    ),
    ("nn", ["nn/"]),
    ("data", ["data/"]),
    ("model", ["modules.py", "fusion.py", "ensemble.py", "portfolio.py", "baselines.py", "heads.py"]),
    ("training", ["training.py", "splitplan.py", "calibration.py", "stacking.py", "workers.py"]),
    ("model directories", ["checkpoint.py", "runstate.py"]),
    ("pipeline", ["fit.py", "pipeline.py", "tune.py", "export.py", "robustness.py", "serve.py"]),
    ("explanation", ["explain/"]),
    ("Python estimator", ["predictor.py"]),
    ("command line", ["cli/", "__main__.py"]),
    ("public API", ["__init__.py"]),
]


def layer_of(path: str) -> int:
    rel = Path(os.path.relpath(path, PACKAGE)).as_posix()
    for rank, (_, members) in enumerate(LAYERS):
        for m in members:
            if rel == m or (m.endswith("/") and rel.startswith(m)):
                return rank
    raise AssertionError(f"{rel}: not in any layer of tests/test_structure.py's LAYERS; place it there")


def import_graph(package: Path) -> dict[str, list[str]]:
    """{module path: [paths of the package's modules it imports]}, every import counted."""
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed (it comes with the test extras: pip install -e '.[test]')")
    out = subprocess.run([ruff, "analyze", "graph", str(package)], capture_output=True, text=True, check=True)
    edges = json.loads(out.stdout)
    return {str(Path(k).resolve()): [str(Path(v).resolve()) for v in vs] for k, vs in edges.items()}


@pytest.fixture(scope="module")
def graph() -> dict[str, list[str]]:
    return import_graph(PACKAGE)


def test_the_import_graph_sees_every_kind_of_import(tmp_path):
    """The oracle itself: imports inside functions and under TYPE_CHECKING are edges too."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from . import b\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import c\n")
    (pkg / "c.py").write_text("")
    edges = {Path(k).name: {Path(v).name for v in vs} for k, vs in import_graph(pkg).items()}
    assert edges["a.py"] == {"b.py"} and edges["b.py"] == {"c.py"}


def test_the_import_graph_has_no_cycle(graph):
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, []):
            if state.get(nxt) == 1:
                cycle = [*path[path.index(nxt) :], nxt]
                raise AssertionError("import cycle: " + " -> ".join(Path(p).relative_to(SRC).as_posix() for p in cycle))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])


def test_layers_import_only_downwards(graph):
    upward = [
        f"{Path(m).relative_to(PACKAGE)} ({LAYERS[layer_of(m)][0]}) imports "
        f"{Path(d).relative_to(PACKAGE)} ({LAYERS[layer_of(d)][0]})"
        for m, deps in graph.items()
        for d in deps
        if layer_of(d) > layer_of(m)
    ]
    assert not upward, "\n".join(upward)


def test_the_attention_core_depends_on_torch_alone(graph):
    """attnfuse.nn imports torch, itself and the argument checks: it can be lifted out whole."""
    nn_modules = [m for m in graph if Path(m).relative_to(PACKAGE).as_posix().startswith("nn/")]
    assert nn_modules
    for m in nn_modules:
        deps = [Path(d).relative_to(PACKAGE).as_posix() for d in graph[m]]
        assert all(d.startswith("nn/") or d == "checks.py" for d in deps), (m, deps)


def test_every_module_imports_on_its_own():
    """Each module imported first, in a fresh package state: an import that works only after some
    other module was loaded (a hidden cycle) fails here."""
    modules = sorted(
        "attnfuse." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")
        for p in PACKAGE.rglob("*.py")
        if p.name != "__main__.py"
    )
    script = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'attnfuse' or m.startswith('attnfuse.')]:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module(name.removesuffix('.'))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_public_api_is_documented_with_shapes():
    """Every class and function re-exported from attnfuse has a docstring; every module (a class
    with tensors in and out) says the shapes it takes and gives."""
    import inspect
    import re

    from torch import nn

    import attnfuse

    undocumented, shapeless = [], []
    for name in attnfuse.__all__:
        obj = getattr(attnfuse, name)
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        doc = inspect.getdoc(obj) or ""
        if not doc.strip():
            undocumented.append(name)
        elif (
            inspect.isclass(obj) and issubclass(obj, nn.Module) and not re.search(r"\((?:B|N|L|S|T|K)\b|\(\.\.\.", doc)
        ):
            shapeless.append(name)
    assert not undocumented and not shapeless, f"no docstring: {undocumented}; no shapes: {shapeless}"
