"""Request and reply sizes (SPEC §5 "No request or reply is too big"): a request that cannot
fit in a frame fails on the client side with E2BIG before anything is sent, the same in both
modes, and the connection and every object stay; batches the client makes itself split into
several frames; replies of any size arrive whole.
"""

from __future__ import annotations

import errno
import json
import weakref

import pytest

import ugem
from ugem.cmd import Fill
from ugem.wire import structs as s
from ugem.wire.frames import MAX_PAYLOAD, Op
from ugem.wire.structs_exec import MAX_COMMANDS

PAGE = ugem.PAGE_SIZE


def _fills(handle: int, count: int) -> list[Fill]:
    return [Fill(dst=handle, offset=i % PAGE, length=1, byte=i & 0xFF) for i in range(count)]


def test_an_execbuffer_too_big_for_a_frame_is_e2big_and_loses_nothing(env, errno_of):
    dev, other = env.open(), env.open()
    kept = dev.create(PAGE)
    dev.pwrite(kept, 0, b"kept")
    assert errno_of(dev.execbuffer, _fills(kept, MAX_COMMANDS + 1)) == errno.E2BIG
    assert errno_of(dev.execbuffer, _fills(kept, 20_000)) == errno.E2BIG
    # nothing was sent: the connection, the object and its contents are all still there
    assert dev.pread(kept, 0, 4) == b"kept" and dev.info(kept).size == PAGE
    assert dev.stats()["objects"] == 1 and other.stats()["clients"] >= 2
    assert dev.create(PAGE) == kept + 1


def test_the_largest_execbuffer_that_fits_runs_in_both_modes(dev):
    h = dev.create(PAGE)
    fence = dev.execbuffer(_fills(h, MAX_COMMANDS))
    assert dev.wait_fence(fence, -1) == -1
    expected = bytearray(PAGE)
    for i in range(MAX_COMMANDS):
        expected[i % PAGE] = i & 0xFF
    assert dev.pread(h, 0, PAGE) == bytes(expected)


def test_the_e2big_message_names_the_count_and_the_limit(dev):
    h = dev.create(PAGE)
    with pytest.raises(ugem.TooBig) as exc:
        dev.execbuffer(_fills(h, MAX_COMMANDS + 5))
    assert str(MAX_COMMANDS + 5) in str(exc.value) and str(MAX_COMMANDS) in str(exc.value)


def test_a_full_id_batch_fits_in_one_frame():
    pieces, _ = s.encode(s.MunmapReq(ids=bytes(4 * s.MAX_IDS)))
    assert sum(len(p) for p in pieces) <= MAX_PAYLOAD
    pieces, _ = s.encode(s.MunmapReq(ids=bytes(4 * s.MAX_IDS + 4)))
    assert sum(len(p) for p in pieces) > MAX_PAYLOAD


def test_released_mappings_beyond_one_frame_go_in_several_requests(dev, monkeypatch):
    monkeypatch.setattr(s, "MAX_IDS", 7)  # a small frame: 30 releases need 5 requests
    h = dev.create(PAGE)
    views = [dev.mmap(h) for _ in range(30)]
    released = [weakref.ref(v.obj) for v in views]
    del views
    assert all(r() is None for r in released)
    calls: list[int] = []
    real_call = dev._transport.call

    def counting(op, req, notes=(), **local):
        calls.extend(int(note_op) for note_op, _ in notes)
        calls.append(int(op))
        return real_call(op, req, notes, **local)

    monkeypatch.setattr(dev._transport, "call", counting)
    dev.close_handle(h)  # the mapping releases go first, then the close: the object dies
    assert calls.count(int(Op.GEM_MUNMAP)) == 5
    assert dev.stats()["objects"] == 0


def test_a_listing_bigger_than_a_frame_arrives_whole_and_loses_nothing(dev):
    count = 20_000  # ~2.3 MB of JSON rows: three frames over the daemon
    handles = [dev.create(PAGE) for _ in range(count)]
    rows = dev.list_objects()
    assert len(rows) == count
    assert len(json.dumps(rows)) > MAX_PAYLOAD  # the test really crosses the frame limit
    assert sorted(r["handles"] for r in rows) == [1] * count
    clients = dev.list_clients()
    mine = next(c for c in clients if c["id"] == dev.client_id)
    assert sorted(int(h) for h in mine["handles"]) == handles
    # the connection and every object are still there
    assert dev.stats()["objects"] == count
    assert dev.info(handles[0]).size == dev.info(handles[-1]).size == PAGE
    assert dev.create(PAGE) == count + 1
