"""The cyclic collector is paused while a thread is in a batch (client/batch.py rules)."""

from __future__ import annotations

import contextlib
import gc
import os
import threading
from collections.abc import Iterator
from multiprocessing.reduction import ForkingPickler

import pytest

import ugem.client.pickling  # noqa: F401  (wraps ForkingPickler.dumps and loads in batches)
from ugem.client.batch import batch


class _Probe:
    """Records whether the collector runs while it is pickled and unpickled."""

    seen: list[bool] = []

    def __reduce__(self) -> tuple[object, ...]:
        _Probe.seen.append(gc.isenabled())
        return _probe, ()


def _probe() -> _Probe:
    _Probe.seen.append(gc.isenabled())
    return _Probe()


@pytest.fixture(autouse=True)
def _collector_on() -> Iterator[None]:
    was = gc.isenabled()
    gc.enable()
    _Probe.seen.clear()
    yield
    if not was:
        gc.disable()


def test_off_while_pickling_and_unpickling_and_on_after() -> None:
    loaded = ForkingPickler.loads(ForkingPickler.dumps([_Probe(), 1]))
    assert isinstance(loaded[0], _Probe)
    assert _Probe.seen == [False, False]
    assert gc.isenabled()


def test_on_after_a_failing_pickle() -> None:
    with pytest.raises(TypeError):
        ForkingPickler.dumps(threading.Lock())
    assert gc.isenabled()


def test_left_off_when_it_was_off() -> None:
    gc.disable()
    ForkingPickler.loads(ForkingPickler.dumps(_Probe()))
    assert not gc.isenabled()


@contextlib.contextmanager
def _another_thread_in_a_batch() -> Iterator[None]:
    """Another thread enters a batch and stays in it until the block ends."""
    inside, leave = threading.Event(), threading.Event()

    def other() -> None:
        with batch():
            inside.set()
            leave.wait(60)

    thread = threading.Thread(target=other)
    thread.start()
    try:
        assert inside.wait(60)
        yield
    finally:
        leave.set()
        thread.join(60)


def test_on_only_when_the_last_thread_leaves() -> None:
    with _another_thread_in_a_batch():
        with batch():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the other thread is still in its batch
    assert gc.isenabled()


def test_nested_batches_resume_once() -> None:
    with batch():
        with batch():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork only")
def test_child_forked_while_another_thread_is_in_a_batch_has_it_on() -> None:
    with _another_thread_in_a_batch():
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: the other thread's batch never ends here
            os.write(write, b"1" if gc.isenabled() else b"0")
            os._exit(0)
        os.close(write)
        with os.fdopen(read, "rb") as pipe:
            answer = pipe.read()
        os.waitpid(pid, 0)
    assert answer == b"1"
