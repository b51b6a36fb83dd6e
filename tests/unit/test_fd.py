"""ugem/fd.py: OwnedFd, pipe() and drain(); and no module keeps a raw fd as state."""

from __future__ import annotations

import ast
import os
import pathlib

import pytest

from ugem.fd import OwnedFd, drain, pipe

SRC = pathlib.Path(__file__).resolve().parents[2] / "src" / "ugem"
_MAKERS = {"open", "pipe", "pipe2", "dup", "memfd_create", "pidfd_open", "eventfd"}


def test_pipe_gives_two_owned_ends_and_drain_empties_it():
    r, w = pipe(os.O_NONBLOCK | os.O_CLOEXEC)
    with r, w:
        assert isinstance(r, OwnedFd) and isinstance(w, OwnedFd) and not os.get_inheritable(r.fd)
        os.write(w.fd, b"x" * 10000)
        drain(r)
        with pytest.raises(BlockingIOError):
            os.read(r.fd, 1)
    assert r.closed and w.closed
    with pytest.raises(OSError):
        drain(r)


def _raw_fd_state(source: str) -> list[int]:
    """Lines of `self.x = os.open(...)` (or a pipe, dup, memfd...): an fd kept as a bare int."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            func = node.value.func
            targets = [t for target in node.targets for t in (target.elts if isinstance(target, ast.Tuple)
                                                                 else [target])]
            if (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "os"
                    and func.attr in _MAKERS and any(isinstance(t, ast.Attribute) for t in targets)):
                found.append(node.lineno)
    return found


def test_the_check_finds_raw_fd_state():
    assert _raw_fd_state("self._r, self._w = os.pipe2(0)\nself.fd = os.open('x', 0)\nfd = os.open('y', 0)\n"
                         "self.ok = OwnedFd(os.open('z', 0))\n") == [1, 2]


def test_no_module_keeps_a_raw_fd_as_state():
    """Every fd an object keeps (spill store, server, job runner, listener...) is an OwnedFd."""
    bad = [f"{path.relative_to(SRC)}:{line}" for path in sorted(SRC.rglob("*.py"))
           for line in _raw_fd_state(path.read_text())]
    assert not bad, bad
