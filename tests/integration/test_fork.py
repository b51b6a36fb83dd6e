"""A Device used in a forked child of the process that made it (SPEC §1, §2): EBADF at once,
saying to connect again; the child never sends on, reads or shuts down the parent's
connection (nor touches the parent's embedded manager), so the parent keeps working; a
multiprocessing worker gets the error instead of hanging. Both modes.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import pickle
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import ugem
from ugem.testing import Env, in_child

PAGE = 4096


@pytest.fixture(params=["embedded", "daemon"])
def env(request: pytest.FixtureRequest) -> Iterator[Env]:
    with Env.start(str(request.param)) as e:
        yield e


def _in_child(fn: Callable[[], Any]) -> Any:
    """Run `fn` in a forked child; its result or its exception's (type, errno, text)."""
    return in_child(fn)


def test_a_device_used_in_a_forked_child_is_ebadf_and_the_parent_keeps_working(env):
    dev = env.open()
    h = dev.create(PAGE)
    dev.pwrite(h, 0, b"parent")
    kept = dev.new(PAGE)
    dropped_in_child = dev.new(PAGE)
    view = dev.mmap(h)

    def child() -> Any:
        nonlocal dropped_in_child, view
        errors = []
        for call in (lambda: dev.info(h), dev.stats, lambda: dev.create(PAGE), lambda: kept.read(0, 1),
                     lambda: dev.import_fd(0), kept.close):
            try:
                call()
                errors.append(None)
            except ugem.UgemError as exc:
                errors.append([exc.errno, str(exc)])
        del dropped_in_child, view  # finalizers in the child: they must send nothing
        gc.collect()
        dev.close()  # nothing either: the connection is the parent's
        return errors

    result = _in_child(child)
    assert "ok" in result, result
    for error in result["ok"]:
        assert error is not None and error[0] == 9, result
        assert "connect again in the child" in error[1] and str(os.getpid()) in error[1], error
    # the parent's client is untouched: same objects, contents, handles, and in step
    assert dev.pread(h, 0, 6) == b"parent"
    assert kept.read(0, 1) == b"\0" and not kept.closed
    assert dev.info(dropped_in_child.handle).size == PAGE
    assert dev.stats()["objects"] == 3
    assert dev.create(PAGE) == 4
    del view
    gc.collect()
    assert dev.busy(h) is False  # the parent's own release goes out (and is answered) normally


def test_the_forked_childs_embedded_manager_is_dead_there():
    with Env.start("embedded") as env:
        manager = env.manager
        assert manager is not None
        dev = env.open()
        dev.pwrite(dev.create(PAGE), 0, b"kept")
        result = _in_child(lambda: manager.open().create(PAGE))
        assert result["error"][:2] == ["BadFd", 9] and "make a new one in the child" in result["error"][2]
        closing = _in_child(lambda: manager.close())  # a no-op there: the parent's manager lives on
        assert closing == {"ok": None}
        assert manager.statistics()["objects"] == 1 and dev.pread(1, 0, 4) == b"kept"
        assert env.open().create(PAGE) == 1


def test_a_new_connection_in_the_child_works(env):
    dev = env.open()
    dev.create(PAGE)

    def child() -> Any:
        fresh = env.open() if env.manager is None else ugem.embedded()
        with fresh:
            return fresh.create(PAGE)

    assert _in_child(child) == {"ok": 1}
    assert dev.create(PAGE) == 2


_INHERITED: dict[str, Any] = {}


def _use_inherited_device() -> int:
    dev = _INHERITED["dev"]
    return int(dev.info(_INHERITED["handle"]).size)


def test_a_pool_worker_that_uses_an_inherited_device_gets_ebadf(env):
    dev = env.open()
    _INHERITED.update(dev=dev, handle=dev.create(PAGE))
    try:
        with multiprocessing.get_context("fork").Pool(1) as pool:
            pending = pool.apply_async(_use_inherited_device)
            with pytest.raises(ugem.BadFd, match="connect again in the child"):
                pending.get(timeout=120)  # a safety net only: the worker fails at once
    finally:
        _INHERITED.clear()
    assert dev.info(dev.create(PAGE)).size == PAGE


def test_errors_pickle_as_themselves():
    for exc in (ugem.BadFd("gone"), ugem.TimedOut("late"), ugem.UgemError("odd", 18)):
        back = pickle.loads(pickle.dumps(exc))
        assert type(back) is type(exc) and back.errno == exc.errno and str(back) == str(exc)
