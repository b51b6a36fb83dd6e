"""The sans-IO layers import no I/O modules (DESIGN: the core is sans-IO, like h11)."""

import ast
import pathlib

import pytest

SRC = pathlib.Path(__file__).resolve().parents[2] / "src" / "ugem"
FORBIDDEN = {"socket", "selectors", "signal", "threading", "mmap", "asyncio", "subprocess"}


def _imports(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("layer", ["core", "wire", "mm"])
def test_sans_io_layers_import_no_io(layer):
    files = sorted((SRC / layer).glob("*.py"))
    for path in files:
        bad = _imports(path) & FORBIDDEN
        assert not bad, f"{path.relative_to(SRC)} imports {sorted(bad)}"


def test_core_does_not_call_os_on_fds():
    for path in sorted((SRC / "core").glob("*.py")):
        assert "import os" not in path.read_text(), f"{path.name} imports os: memory I/O belongs in backing/"


def test_modules_stay_small():
    for path in sorted(SRC.rglob("*.py")):
        lines = len(path.read_text().splitlines())
        assert lines <= 420, f"{path.relative_to(SRC)} has {lines} lines (cap ~400)"


def test_every_module_has_a_docstring():
    for path in sorted(SRC.rglob("*.py")):
        assert ast.get_docstring(ast.parse(path.read_text())), f"{path.relative_to(SRC)} has no docstring"
