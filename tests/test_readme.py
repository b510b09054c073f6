"""README.md's commands and snippets: each parses, and each is run by tools/readme_check.py.

CI runs ``tools/readme_check.py`` after ``make test`` (``.ci/run``): it runs every README command
and snippet verbatim and compares the output the README shows. These tests are the fast part, in
``make test``: every ``attnfuse`` command of the README parses with the command line's own parser
(an unknown option or a bad value would be a usage error), every Python snippet compiles, every
command has an entry in the script's plan and every entry is still in the README, and the paths
of the code layout exist.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import typer.main

from attnfuse.cli import app

ROOT = Path(__file__).resolve().parent.parent


def _load_checker():
    spec = importlib.util.spec_from_file_location("readme_check", ROOT / "tools" / "readme_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["readme_check"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


rc = _load_checker()
TEXT = rc.README.read_text(encoding="utf-8")
ITEMS = rc.extract(TEXT)
SHELL = [i for i in ITEMS if i.kind != "python"]
PYTHON = [i for i in ITEMS if i.kind == "python"]


def _commands():
    """Every attnfuse command the README shows or the script runs in its place."""
    out = []
    for item in SHELL:
        plan = rc.PLAN.get(item.key)
        for command in (plan.variants if plan and plan.variants else ()) or (item.text,):
            if item.text.startswith("make "):
                command = rc.make_recipe(item.text.split()[1])
            argv = rc.command_argv(command)
            if argv is not None:
                out.append(pytest.param(argv, id=f"line{item.line}:{' '.join(argv)[:60]}"))
    out.extend(pytest.param(rc.command_argv(k), id=f"inline:{k}") for k in rc.INLINE)
    return out


def test_the_readme_has_commands_and_snippets():
    assert len(SHELL) >= 20 and len(PYTHON) >= 4, (len(SHELL), len(PYTHON))


@pytest.mark.parametrize("argv", _commands())
def test_command_parses(argv):
    """The arguments go through click's parsing (group, then command) without running anything."""
    group = typer.main.get_command(app)
    try:
        ctx = group.make_context("attnfuse", list(argv))
        name, command, rest = group.resolve_command(ctx, [*ctx._protected_args, *ctx.args])
        assert command is not None, argv
        command.make_context(name, rest, parent=ctx)
    except typer.Exit as e:  # --help: printed, then a clean exit
        assert e.exit_code == 0, argv


def test_a_bad_option_is_a_parse_error():
    """The parse check above would notice a mistyped option."""
    group = typer.main.get_command(app)
    ctx = group.make_context("attnfuse", ["train", "--d-modle", "30"])
    name, command, rest = group.resolve_command(ctx, [*ctx._protected_args, *ctx.args])
    with pytest.raises(Exception, match="d-modle"):
        command.make_context(name, rest, parent=ctx)


@pytest.mark.parametrize("item", PYTHON, ids=lambda i: f"line{i.line}")
def test_python_snippet_compiles(item):
    compile(item.text, f"README.md:{item.line}", "exec")


def test_every_command_is_checked_by_the_script():
    """A README command without a check in tools/readme_check.py (or a check left for a command the
    README lost, or output shown but not compared) is listed."""
    assert rc.problems(ITEMS, TEXT) == []


def test_a_new_command_would_be_noticed():
    extra = TEXT + "\n```\n$ attnfuse train --epochs 3\n```\n"
    found = rc.problems(rc.extract(extra), extra)
    assert any("attnfuse train --epochs 3" in p for p in found), found


def test_the_make_targets_the_readme_names_exist():
    for item in SHELL:
        if item.text.startswith("make "):
            assert rc.make_recipe(item.text.split()[1])


def test_the_code_layout_exists():
    paths = rc.layout_paths(TEXT)
    assert len(paths) > 20
    assert [p for p in paths if not (ROOT / p).exists()] == []


def _shown(command):
    return next(i for i in SHELL if i.key == command)


def test_the_walkthrough_comparison_ignores_wrapping_not_numbers():
    item = _shown('attnfuse explain --query "1,2" --keys "2,3;1,0" --no-scale')
    printed = "\n".join(item.output).replace("as in small\nhand-worked", "as\nin small hand-worked")
    assert rc.shown_pattern(item.output).search("startup line\n" + printed)
    assert not rc.shown_pattern(item.output).search(printed.replace("0.99909", "0.99908"))


def test_the_diabetes_comparison_masks_the_fusion_figures_only():
    item = _shown("attnfuse train --data diabetes.npz --seed 1")
    baselines = lambda line: "(baseline)" in line  # noqa: E731
    printed = "\n".join(item.output[1:])
    pattern = rc.shown_pattern(item.output, baselines)
    assert pattern.search("attnfuse train: diabetes ...\n" + printed)
    assert pattern.search(printed.replace("49.9810", "49.9811").replace("80.7 s", "41.0 s"))
    assert not pattern.search(printed.replace("58.0737", "58.0738"))  # ridge's test rmse
    assert not pattern.search(printed.replace("candidate is concat", "candidate is self"))
