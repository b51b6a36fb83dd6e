"""Helpers for the conformance suite (fixtures only: test modules are imported with
--import-mode=importlib, so they cannot import a sibling helper module).

- `errno_of(fn, *args)`: call `fn`, require a `ugem.UgemError`, return its errno;
- `fds`: a bag of raw fds a test opened (exports, pipes, memfds), closed at teardown;
- `sealed_memfd(size, seals=..., data=b"")`: a memfd to offer to `import_fd` (SPEC §6);
- `as_user(uid, fn)`: run `fn` in a forked child that dropped to `uid`, with the result
  (JSON) handed back; the child stays alive until the `with` block ends, so its client
  connection (and the objects it holds) lives that long;
- `open_to_all`: a daemon whose socket any uid may reach (mode 0666 in a 0755 directory), for
  tests of the uid rules; skipped in embedded mode (every client there is this process's uid).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import ugem
from ugem.testing import Tenant


@pytest.fixture
def errno_of() -> Callable[..., int]:
    def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
        with pytest.raises(ugem.UgemError) as exc:
            fn(*args, **kwargs)
        assert isinstance(exc.value, OSError)
        return int(exc.value.errno)
    return call


class FdBag:
    """Raw fds a test owns; `close(fd)` early, the rest are closed at teardown."""

    def __init__(self) -> None:
        self._open: set[int] = set()

    def add(self, fd: int) -> int:
        assert fd >= 0
        self._open.add(fd)
        return fd

    def close(self, fd: int) -> None:
        self._open.remove(fd)
        os.close(fd)

    def close_all(self) -> None:
        for fd in sorted(self._open):
            os.close(fd)
        self._open.clear()


@pytest.fixture
def fds() -> Iterator[FdBag]:
    bag = FdBag()
    try:
        yield bag
    finally:
        bag.close_all()


@pytest.fixture
def sealed_memfd(fds: FdBag) -> Callable[..., int]:
    def make(size: int, seals: int = fcntl.F_SEAL_SHRINK, data: bytes = b"") -> int:
        fd = fds.add(os.memfd_create("conformance", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING))
        os.ftruncate(fd, size)
        if data:
            os.pwrite(fd, data, 0)
        if seals:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
        return fd
    return make


def _report_then_hold(channel: Any, fn: Callable[[], Any]) -> None:
    channel.send(fn())
    channel.recv()  # hold on (and keep the client connected) until the parent is done


@contextlib.contextmanager
def _as_user(uid: int, fn: Callable[[], Any]) -> Iterator[Any]:
    child = Tenant(_report_then_hold, (fn,), uid)
    try:
        yield child.recv()
        child.send("done")
        assert child.join() == 0
    finally:
        child.close()


@pytest.fixture
def open_to_all(mode: str, make_env: Callable[..., Any]) -> Any:
    if mode != "daemon":
        pytest.skip("clients of an embedded manager all have this process's uid")
    env = make_env(socket_mode="0666")
    os.chmod(env.daemon.directory, 0o755)
    return env


@pytest.fixture
def as_user() -> Callable[[int, Callable[[], Any]], contextlib.AbstractContextManager[Any]]:
    return _as_user
