"""Shared fixtures.

Every conformance check runs twice: against an embedded Manager and against a real
`ugem serve` process. `env` gives a fresh embedded Manager per test, or new clients of one
session-wide default daemon (each test's clients are closed at its end, so the daemon is
empty again). `make_env(**config)` starts a manager with custom flags in the current mode
(a daemon of its own in daemon mode).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import pytest

from ugem.testing import DaemonProcess, Env, run_daemon

MODES = ["embedded", "daemon"]


@pytest.fixture(scope="session")
def shared_daemon() -> Iterator[DaemonProcess]:
    with run_daemon() as daemon:
        yield daemon


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def env(mode: str, request: pytest.FixtureRequest) -> Iterator[Env]:
    if mode == "embedded":
        with Env.start(mode) as e:
            yield e
        return
    daemon: DaemonProcess = request.getfixturevalue("shared_daemon")
    e = Env(mode, daemon=daemon)
    try:
        yield e
    finally:
        e.close()


@pytest.fixture
def make_env(mode: str) -> Iterator[Callable[..., Env]]:
    with ExitStack() as stack:
        def factory(**config: Any) -> Env:
            return stack.enter_context(Env.start(mode, **config))
        yield factory


@pytest.fixture
def dev(env: Env) -> Any:
    return env.open()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))
