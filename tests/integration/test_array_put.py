"""`ugem.array(value)` (client/arrays.py) with a real daemon and real processes: a copy of the
value in ugem memory; the object of an array this Device made that died a moment ago is
reused in place only when nothing else holds or sees it (GEM_REUSE, core/recycle.py): not
while a worker holds the array it was sent, not after a fork that inherited its mapping.
Either way every process reads its own bytes."""

from __future__ import annotations

import gc
import multiprocessing
import os

import numpy as np
import pytest

import ugem
from ugem.client.device_share import REUSE_MIN
from ugem.client.registry import mapping_of
from ugem.testing import DaemonProcess
from ugem.testing import workers as w
from ugem.wire import structs as s
from ugem.wire.frames import Op

N = REUSE_MIN // 8 + 1000  # int64 items: a little over REUSE_MIN, not a whole number of pages


def _address(a: np.ndarray) -> int:
    return int(a.__array_interface__["data"][0])


def _key(a: np.ndarray) -> tuple[int, int]:
    """The identity of the memfd `a` lies in."""
    entry = mapping_of(a)
    assert entry is not None
    return entry.key


def _objects(dev: ugem.Device) -> int:
    return int(dev.stats()["objects"])


@pytest.mark.parametrize("how", ["embedded", "daemon"])
def test_an_array_that_died_gives_its_object_to_the_next_of_its_size(how: str, daemon: DaemonProcess) -> None:
    with (ugem.embedded() if how == "embedded" else ugem.connect(daemon.path)) as dev:
        first = ugem.array(np.arange(N), device=dev)
        place = _address(first)
        raw = np.frombuffer(first.base, dtype=np.uint8)  # (the whole mapping: the last page's rest too)
        raw[first.nbytes:] = 7  # as if an earlier value had been longer
        del first, raw
        again = ugem.array(-np.arange(N), device=dev)
        assert _address(again) == place  # in place: same object, same mapping
        assert np.array_equal(again, -np.arange(N)) and again.dtype == np.int64 and again.shape == (N,)
        assert not np.frombuffer(again.base, dtype=np.uint8)[again.nbytes:].any()  # the rest zeroed
        assert _objects(dev) == 1
        other = ugem.array(np.ones((3, N)), device=dev)  # another size: a new object
        assert _address(other) != place and _objects(dev) == 2
        del again, other
        gc.collect()
        dev.stats()  # (a request: what lingers is released)
        assert _objects(dev) == 0


def test_only_objects_of_reuse_min_or_more_may_be_reused(daemon: DaemonProcess) -> None:
    with ugem.connect(daemon.path) as dev:
        small, big = ugem.array(np.arange(1000), device=dev), ugem.array(np.arange(N), device=dev)
        small_entry, big_entry = mapping_of(small), mapping_of(big)
        assert small_entry is not None and big_entry is not None
        assert not small_entry.made and big_entry.made
        assert np.array_equal(small, np.arange(1000)) and _objects(dev) == 2


def test_an_array_a_worker_still_holds_is_not_reused(default_daemon: DaemonProcess) -> None:
    dev = ugem.default_device()
    a = ugem.array(np.full(N, 5))
    memory = _key(a)
    parent, child = multiprocessing.get_context("fork").Pipe()
    worker = multiprocessing.get_context("fork").Process(target=w.hold_and_sum, args=(child,))
    worker.start()
    try:
        parent.send(a)
        assert parent.recv() == 5 * N
        del a
        b = ugem.array(np.full(N, 9))
        assert _key(b) != memory and int(b.sum()) == 9 * N
        parent.send("again")
        assert parent.recv() == 5 * N  # the worker's bytes are its own still
    finally:
        parent.send("stop")
        worker.join(30)
        if worker.exitcode is None:
            worker.kill()
            worker.join()
        parent.close()
        child.close()
    assert worker.exitcode == 0
    assert _objects(dev) >= 1


def test_an_array_a_forked_child_inherited_is_not_reused(daemon: DaemonProcess) -> None:
    with ugem.connect(daemon.path) as dev:
        a = ugem.array(np.full(N, 3), device=dev)
        memory = _key(a)
        go_r, go_w = os.pipe()
        out_r, out_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: its inherited mapping of `a` must keep 3s
            try:
                os.close(go_w)
                os.close(out_r)
                os.read(go_r, 1)
                os.write(out_w, b"y" if int(a.sum()) == 3 * N else b"n")
            finally:
                os._exit(0)
        os.close(go_r)
        os.close(out_w)
        try:
            del a
            b = ugem.array(np.full(N, 4), device=dev)
            assert _key(b) != memory
            os.write(go_w, b"g")
            assert os.read(out_r, 1) == b"y"
        finally:
            os.close(go_w)
            os.close(out_r)
            os.waitpid(pid, 0)


def test_gem_reuse_refuses_what_may_be_held_or_seen_elsewhere(daemon: DaemonProcess) -> None:
    with ugem.connect(daemon.path) as dev:
        with pytest.raises(ugem.InvalidArgument, match="not tracked"):
            dev._call(Op.GEM_REUSE, s.ReuseReq(map_id=12345))
        h = dev.create(REUSE_MIN)
        view = dev.mmap(h)  # its handle holds it too
        entry = mapping_of(np.frombuffer(view, dtype=np.uint8))
        assert entry is not None
        with pytest.raises(ugem.Busy, match="cannot take new contents"):
            dev._call(Op.GEM_REUSE, s.ReuseReq(map_id=entry.map_id))
        ro = dev.mmap(h, writable=False)
        ro_entry = mapping_of(np.frombuffer(ro, dtype=np.uint8))
        assert ro_entry is not None
        with pytest.raises(ugem.PermissionDenied, match="read-only"):
            dev._call(Op.GEM_REUSE, s.ReuseReq(map_id=ro_entry.map_id))
        del view, ro, entry, ro_entry
        dev.close_handle(h)
        h = dev.create(REUSE_MIN)  # purgeable: its mapping alone holds it once the handle is closed
        dev.pwrite(h, 0, b"x" * 4096)  # (with no pages, DONTNEED would purge it at once)
        dev.madvise(h, ugem.DONTNEED)
        view = dev.mmap(h)
        entry = mapping_of(np.frombuffer(view, dtype=np.uint8))
        assert entry is not None
        dev.close_handle(h)
        with pytest.raises(ugem.Busy, match="cannot take new contents"):
            dev._call(Op.GEM_REUSE, s.ReuseReq(map_id=entry.map_id))
        del view, entry


def test_bad_values_are_refused_naming_them(daemon: DaemonProcess) -> None:
    with ugem.connect(daemon.path) as dev:
        with pytest.raises(ugem.InvalidArgument, match="object dtype"):
            ugem.array([1, "a", None], device=dev)
        with pytest.raises(ugem.InvalidArgument, match="cannot make an array"):
            ugem.array([[1, 2], [3]], dtype=np.int64, device=dev)
        with pytest.raises(ugem.InvalidArgument, match="device must be"):
            ugem.array([1], device="x")  # type: ignore[arg-type]
        empty = ugem.array(np.zeros((0, 4)), device=dev)
        assert empty.shape == (0, 4) and _objects(dev) == 1
