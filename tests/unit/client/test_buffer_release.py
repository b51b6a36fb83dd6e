"""Buffer release (SPEC §2, last paragraph): a Buffer dropped without `close()` has its
handle closed soon after, with the client's next request (never from the finalizer, never
in the middle of another request) or at `Device.close()`; a handle is closed only once no
live Buffer wraps it, and never twice. Every test runs embedded and against a daemon.
"""

from __future__ import annotations

import gc
import os

import numpy as np
import pytest

import ugem
from ugem import Buffer
from ugem.wire import structs as s
from ugem.wire.frames import Op

PAGE = ugem.PAGE_SIZE


class Calls:
    """Every request a Device sends, by op, through its transport: the releases sent ahead of
    a request (pipelined with it, no round trip of their own), then the request."""

    def __init__(self, dev: ugem.Device, monkeypatch: pytest.MonkeyPatch) -> None:
        self.ops: list[Op] = []
        real = dev._transport.call

        def call(op, req, notes=(), **local):
            self.ops.extend(Op(note_op) for note_op, _ in notes)
            self.ops.append(Op(op))
            return real(op, req, notes, **local)

        monkeypatch.setattr(dev._transport, "call", call)


def _my_objects(dev: ugem.Device) -> int:
    return next(c["objects"] for c in dev.stats()["per_client"] if c["id"] == dev.client_id)


def test_dropped_buffers_never_fill_the_handle_table(make_env):
    env = make_env(client_max_objects=16)
    dev = env.open()
    for _ in range(100):  # far more than the client may hold at once
        dev.new(PAGE).array()
    assert _my_objects(dev) <= 2
    assert dev.new(PAGE).handle <= 2  # handle numbers stay low: the table does not grow


def test_arrays_of_dropped_buffers_keep_working(make_env):
    env = make_env(client_max_objects=8)
    dev = env.open()
    arrays = []
    for i in range(40):
        arr = dev.new(PAGE).array(np.uint32)
        arr[:] = i
        arrays.append(arr)
    assert _my_objects(dev) <= 2 and dev.stats()["objects"] >= 40  # the mappings keep them
    for i, arr in enumerate(arrays):
        assert (arr == i).all()
        arr[0] = 1000 + i
    assert [int(a[0]) for a in arrays] == [1000 + i for i in range(40)]
    del arrays, arr
    gc.collect()
    dev.stats()  # the releases go out with the next request
    assert dev.stats()["objects"] == 0


def test_the_finalizer_sends_nothing_the_next_request_sends_the_close(dev, monkeypatch):
    buf = dev.new(PAGE)
    handle = buf.handle
    calls = Calls(dev, monkeypatch)
    del buf
    assert calls.ops == []
    assert dev.busy(dev.create(PAGE)) is False
    assert calls.ops[:2] == [Op.GEM_CLOSE_BATCH, Op.GEM_CREATE]
    with pytest.raises(ugem.NoSuchObject):
        dev.info(handle + 1)  # (the new object got the lowest free handle: the closed one)
    assert dev.info(handle).size == PAGE


def test_device_close_drops_the_queue_without_sending(dev, monkeypatch):
    bufs = [dev.new(PAGE) for _ in range(5)]
    calls = Calls(dev, monkeypatch)
    del bufs
    dev.close()
    assert calls.ops == []


def test_a_handle_shared_by_two_buffers_stays_open_while_either_lives(dev):
    a = dev.new(PAGE)
    a.write(b"mine")
    fd = a.export()
    try:
        _share(dev, a, fd)
    finally:
        os.close(fd)


def _share(dev: ugem.Device, a: Buffer, fd: int) -> None:
    b = Buffer.import_fd(dev, fd)
    assert b.handle == a.handle  # self-import returns the handle the client holds
    del b
    assert a.read(0, 4) == b"mine"  # dropping one Buffer did not close the shared handle
    c = Buffer.import_fd(dev, fd)
    c.close()
    assert a.read(0, 4) == b"mine" and not a.closed  # nor did closing one
    handle = a.handle
    a.close()
    with pytest.raises(ugem.NoSuchObject):
        dev.info(handle)


def test_a_closed_handle_is_never_closed_again_after_its_number_is_reused(dev):
    buf = dev.new(PAGE)
    handle = buf.handle
    dev.close_handle(handle)  # behind the Buffer's back
    assert buf.closed
    with pytest.raises(ugem.BadFd):
        buf.read(0, 1)
    reused = dev.create(PAGE)
    assert reused == handle
    del buf  # its handle number now names another object: nothing may close it
    gc.collect()
    assert dev.info(reused).size == PAGE
    closed = dev.new(PAGE)
    number = closed.handle
    closed.close()
    again = dev.create(PAGE)
    assert again == number
    del closed
    assert dev.info(again).size == PAGE
    buf2 = Buffer(dev, dev.create(PAGE))
    buf2.close()
    buf2.close()  # idempotent: one GEM_CLOSE
    assert dev.create(PAGE) == buf2.handle and dev.info(buf2.handle).size == PAGE


def test_many_dropped_buffers_close_in_several_frames(dev, monkeypatch):
    monkeypatch.setattr(s, "MAX_IDS", 3)
    bufs = [dev.new(PAGE) for _ in range(10)]
    calls = Calls(dev, monkeypatch)
    bufs.clear()
    assert dev.stats()["objects"] == 0
    assert calls.ops == [Op.GEM_CLOSE_BATCH] * 4 + [Op.STATS]


def test_buffers_and_mappings_dropped_together(dev, monkeypatch):
    held = [dev.new(PAGE) for _ in range(4)]
    views = [b.map() for b in held]
    calls = Calls(dev, monkeypatch)
    del held, views
    assert dev.stats()["objects"] == 0
    assert calls.ops == [Op.GEM_MUNMAP, Op.GEM_CLOSE_BATCH, Op.STATS]


def test_releases_go_out_with_the_next_request_and_their_failures_are_nobodys(dev, monkeypatch):
    """Queued releases are pipelined ahead of the next request (one write, no round trip of
    their own); a release the manager no longer knows (it can only be gone already) does not
    fail the request it travels with, and the connection stays in step."""
    h = dev.create(PAGE)
    view = dev.mmap(h)
    dev._released.append(9999)  # an unknown mapping
    dev._drop_share(dev.client_id, 12345)  # and an unknown share
    calls = Calls(dev, monkeypatch)
    del view
    gc.collect()
    assert dev.info(h).size == PAGE
    assert calls.ops == [Op.GEM_DROP_SHARES, Op.GEM_MUNMAP, Op.GEM_INFO]
    dev.close_handle(h)
    assert dev.stats()["objects"] == 0
