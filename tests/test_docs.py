"""Every example in the docs runs: the python blocks of README.md, README.zh-CN.md and docs/*.md, each
documented ``torchsgd`` command line, and the docstring examples of the package.

Convention (docs/README authors follow it): a fenced block whose info string is ``python`` is executed;
the blocks of one file run in order in one namespace (like a notebook), in a fresh temporary directory, in
a process of their own (so a block may set torch's thread count or matplotlib's backend). Output goes in
``text`` blocks, shell commands in ``bash`` blocks; a ``torchsgd ...`` line of a bash block must parse.
"""

from __future__ import annotations

import doctest
import importlib
import os
import pkgutil
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import torchsgd

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", ROOT / "README.zh-CN.md", *(ROOT / "docs").glob("*.md")])
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```\s*$", re.S | re.M)
KNOWN_INFOS = {"", "python", "text", "bash"}
# Files whose python blocks another test runs, with what it needs (the frameworks extra).
RUN_ELSEWHERE = {"integrations.md": "tests/test_integrations.py"}

RUNNER = r"""
import re, sys
path = sys.argv[1]
text = open(path, encoding="utf-8").read()
namespace = {"__name__": "__main__"}
for match in re.finditer(r"^```python\n(.*?)^```\s*$", text, re.S | re.M):
    line = text.count("\n", 0, match.start()) + 2
    source = "\n" * (line - 1) + match.group(1)  # tracebacks name the line in the Markdown file
    exec(compile(source, path, "exec"), namespace)
    print(f"ok: {path}:{line}", flush=True)
"""


def blocks(path: Path) -> list[tuple[str, int, str]]:
    """(info string, first line, body) of every fenced block."""
    text = path.read_text(encoding="utf-8")
    return [(m.group(1).strip(), text.count("\n", 0, m.start()) + 2, m.group(2)) for m in FENCE.finditer(text)]


def with_python(path: Path) -> bool:
    return any(info == "python" for info, _, _ in blocks(path))


def test_the_docs_have_examples_to_run() -> None:
    """The collection below cannot silently shrink to nothing (a renamed fence, a moved folder)."""
    runnable = [p.name for p in DOCS if with_python(p)]
    assert {"README.md", "README.zh-CN.md", "tutorial.md", "tutorial.zh-CN.md", "api.md"} <= set(runnable)


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_every_fence_is_python_text_or_bash(path: Path) -> None:
    """An unknown info string (``py``, ``python3``, ``pycon``) would be skipped silently."""
    for info, line, _ in blocks(path):
        assert info in KNOWN_INFOS, f"{path.name}:{line}: fence info {info!r}; use python, text or bash"


@pytest.mark.parametrize(
    "path", [p for p in DOCS if with_python(p) and p.name not in RUN_ELSEWHERE], ids=lambda p: p.name
)
def test_python_blocks_run(path: Path, tmp_path: Path) -> None:
    env = {**os.environ, "MPLBACKEND": "Agg", "LC_ALL": "C.UTF-8"}
    out = subprocess.run(
        [sys.executable, "-c", RUNNER, str(path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, f"{path.name}: a python block failed\n{out.stdout[-2000:]}\n{out.stderr[-6000:]}"
    expected = sum(info == "python" for info, _, _ in blocks(path))
    assert out.stdout.count("ok: ") == expected


@pytest.mark.parametrize("name", sorted(RUN_ELSEWHERE))
def test_docs_run_elsewhere_are_run_there(name: str) -> None:
    test_file = (ROOT / RUN_ELSEWHERE[name]).read_text(encoding="utf-8")
    assert name in test_file, f"{RUN_ELSEWHERE[name]} does not read docs/{name}'s examples"


def documented_commands() -> list[tuple[str, str]]:
    commands = []
    for path in DOCS:
        for info, line, body in blocks(path):
            if info != "bash":
                continue
            for k, text in enumerate(body.splitlines()):
                command = text.split("#", 1)[0].strip()
                if command.startswith(("torchsgd ", "python -m torchsgd ")):
                    commands.append((f"{path.name}:{line + k}", command))
    return commands


@pytest.mark.parametrize("where, command", documented_commands(), ids=[w for w, _ in documented_commands()])
def test_documented_command_lines_parse(where: str, command: str) -> None:
    from torchsgd.cli.main import build_parser

    words = shlex.split(command)
    words = words[3:] if words[0] == "python" else words[1:]
    parser, unavailable = build_parser()
    assert words[0] not in unavailable, unavailable.get(words[0])
    try:
        parser.parse_args(words)
    except SystemExit as exit_:
        pytest.fail(f"{where}: `{command}` does not parse (exit {exit_.code})")


def test_documented_commands_are_found() -> None:
    assert any("explain" in c for _, c in documented_commands())
    assert any("build" in c for _, c in documented_commands())


def package_modules() -> list[str]:
    return sorted(
        info.name
        for info in pkgutil.walk_packages(torchsgd.__path__, "torchsgd.")
        if not info.name.endswith("__main__")
    )


@pytest.mark.parametrize("module_name", package_modules())
def test_docstring_examples_run(module_name: str) -> None:
    module = importlib.import_module(module_name)
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in finder.find(module, module_name):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{module_name}: {result.failed} of {result.attempted} docstring examples failed"


def test_docstring_examples_exist() -> None:
    """The modules known to carry examples still do (a doctest that is never found never fails)."""
    finder = doctest.DocTestFinder()
    counted = {
        name: sum(len(t.examples) for t in finder.find(importlib.import_module(name), name))
        for name in ("torchsgd.optim.sgd", "torchsgd.rules.sgd", "torchsgd.groups")
    }
    assert all(counted.values()), counted


def test_the_formula_is_written_once() -> None:
    """rules/sgd.py's FORMULA is the one statement of the update: the docstrings are generated from it and
    docs/api.md shows it verbatim, so none of them can drift from the others."""
    import textwrap

    from torchsgd.rules import sgd as rule

    block = textwrap.indent(rule.FORMULA, "    ")
    assert "{FORMULA}" not in (rule.__doc__ or "") and "{FORMULA}" not in (torchsgd.SGD.__doc__ or "")
    assert block in (rule.__doc__ or "")
    assert textwrap.indent(rule.FORMULA, "        ") in (torchsgd.SGD.__doc__ or "")
    assert block in (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
