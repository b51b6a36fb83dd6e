"""The sans-IO layers import no I/O modules, not even through other modules (the core is
sans-IO, like h11); modules stay small and documented."""

import ast
import pathlib

import pytest

SRC = pathlib.Path(__file__).resolve().parents[2] / "src" / "ugem"
FORBIDDEN = {"socket", "selectors", "signal", "threading", "mmap", "asyncio", "subprocess"}


def _module(path: pathlib.Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module(path): path for path in sorted(SRC.rglob("*.py"))}


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(path: pathlib.Path) -> set[str]:
    """Every module `path` imports when it runs: at the top or inside a function (a lazy
    import still runs), not under `if TYPE_CHECKING:`. Relative imports are resolved;
    `from package import name` also counts `package.name` when that is a module."""
    name = _module(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if _type_checking_only(child):
                assert isinstance(child, ast.If)
                for stmt in child.orelse:
                    visit(stmt)
            elif isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - child.level + 1] if child.level else []
                module = ".".join(base + ([child.module] if child.module else []))
                found.add(module)
                found.update(f"{module}.{a.name}" for a in child.names if f"{module}.{a.name}" in MODULES)
            else:
                visit(child)

    visit(ast.parse(path.read_text()))
    return found


IMPORTS = {name: _imports(path) for name, path in MODULES.items()}


def _reached(start: str) -> dict[str, str | None]:
    """Every module importing `start` imports, transitively (ugem's own modules, their
    enclosing packages' __init__ below `ugem`, and the outside modules they import), each
    with the module that imported it. `ugem/__init__.py` itself is not followed: it is the
    public API, imported before any submodule, and imports every layer."""
    seen: dict[str, str | None] = {start: None}
    todo = [start]
    while todo:
        current = todo.pop()
        for target in IMPORTS.get(current, ()):
            parts = target.split(".")
            for module in [".".join(parts[:i]) for i in range(2, len(parts))] + [target]:
                if module not in seen:
                    seen[module] = current
                    if module in IMPORTS and module != "ugem":
                        todo.append(module)
    return seen


def _chain(seen: dict[str, str | None], module: str) -> str:
    chain = [module]
    while (parent := seen[chain[-1]]) is not None:
        chain.append(parent)
    return " <- ".join(chain)


@pytest.mark.parametrize("layer", ["core", "wire", "mm"])
def test_sans_io_layers_reach_no_io_module_even_through_others(layer):
    """The core, the wire and mm import no I/O module, directly or through anything they
    import (the core must not reach `socket` through backing -> fd.py)."""
    bad = []
    for name in sorted(n for n in MODULES if n == f"ugem.{layer}" or n.startswith(f"ugem.{layer}.")):
        seen = _reached(name)
        bad += [_chain(seen, m) for m in sorted(seen) if m.split(".")[0] in FORBIDDEN]
    assert not bad, "\n".join(bad)


def test_the_import_walk_sees_through_modules():
    """The walk itself: a lazy import counts, TYPE_CHECKING does not, relative imports resolve."""
    seen = _reached("ugem.daemon.connection")
    assert "socket" in seen and "ugem.core.requests" in seen and "ugem.scm" in seen
    assert seen["ugem.fd"] is not None
    assert "ugem.mm.scan" not in IMPORTS["ugem.mm.range"]  # under TYPE_CHECKING only
    assert "ugem.daemon.listener" in IMPORTS["ugem.cli"]  # imported inside _serve


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
