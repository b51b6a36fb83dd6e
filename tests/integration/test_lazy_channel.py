"""The lazy channel (client/lazy.py, daemon/lazy.py): posts written without waking the
daemon, served in the client's order with its connection's frames, about once a second when
the client is idle, and when the client ends (killed included); hostile use of it harms only
the connection that does it. Real daemon, real sockets, real worker processes.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import signal
import socket
import struct

import numpy as np
import pytest

import ugem
from ugem.client.default import default_device
from ugem.testing import workers as w
from ugem.testing.data import SAFETY_S, wait_until
from ugem.wire import structs as s
from ugem.wire.frames import FrameKind, Op, encode_header

FORK = multiprocessing.get_context("fork")


def _objects() -> int:
    return int(default_device().stats()["objects"])


def test_a_workers_claims_go_on_the_lazy_channel(default_daemon):
    """Round trips of one array to a Pool worker: the worker's claims (here: drops of shares
    whose memory a lingering mapping took back) go on its lazy channel, and nothing of them
    on its connection; every write is seen; nothing is left once the sender lets go."""
    a = ugem.zeros(4 * 4096, np.uint8)
    with FORK.Pool(1) as pool:
        pool.apply(w.mark_and_return, (a,))  # the worker connects and opens its channel
        pool.apply(w.count_channel_writes, (True,))
        for trip in range(40):
            a[0] = trip
            got = pool.apply(w.mark_and_return, (a,))
            assert np.shares_memory(got, a) and a[0] == w.MARK_OUT
            del got
        assert pool.apply(w.count_channel_writes, (False,)) == {"lazy": 40, "connection": 0}
    del a
    gc.collect()
    wait_until(lambda: _objects() == 0, what="the object released after the pool ended")


def test_lazy_claims_of_a_worker_killed_at_once_are_served_when_it_ends(default_daemon):
    """A worker that receives an array (its claim on the lazy channel) and is SIGKILLed
    before it makes any other request: the daemon serves the claim when the connection
    ends, so the sender's share is used up and the object goes once the sender drops it.
    (Left unserved, the share would hold the object as long as the sender lives.)"""
    a = ugem.zeros(4096, np.uint8)
    mine, theirs = FORK.Pipe()
    proc = FORK.Process(target=w.hold_until_killed, args=(theirs,))
    proc.start()
    mine.send(a)
    assert mine.poll(SAFETY_S) and mine.recv() == 4096
    assert a[0] == w.MARK_OUT
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(SAFETY_S)
    del a
    gc.collect()
    wait_until(lambda: _objects() == 0, what="the object released: the dead worker's lazy claim was served")


class _Lazy:
    """A raw client with a lazy channel: frames numbered from one counter for both."""

    def __init__(self, raw) -> None:
        self.raw = raw
        raw.hello()
        self.mine, theirs = socket.socketpair()
        try:
            reply = raw.call(Op.LAZY_CHANNEL, s.LazyChannelReq(), fds=[theirs.fileno()])
        finally:
            theirs.close()
        assert reply.status == 0, reply

    def post(self, op: int, msg: s.Struct, seq: int | None = None, kind: int = FrameKind.POST) -> None:
        payload = b"".join(bytes(p) for p in s.encode(msg)[0])
        if seq is None:
            self.raw.seq += 1
            seq = self.raw.seq
        self.mine.sendall(encode_header(len(payload), op, 0, kind, seq, 0) + payload)

    def info(self, handle: int, seq: int | None = None) -> int:
        """GEM_INFO on the connection (numbered `seq` if given); its errno."""
        payload = b"".join(bytes(p) for p in s.encode(s.InfoReq(handle=handle))[0])
        if seq is None:
            self.raw.seq += 1
            seq = self.raw.seq
        self.raw.send(encode_header(len(payload), Op.GEM_INFO, 0, FrameKind.REQUEST, seq, 0) + payload)
        reply = self.raw.reply()
        assert reply.seq == seq, reply
        return reply.status

    def create(self) -> int:
        reply = self.raw.call(Op.GEM_CREATE, s.CreateReq(size=4096))
        assert reply.status == 0, reply
        return int(struct.unpack_from("<I", reply.payload)[0])

    def close(self) -> None:
        self.mine.close()


def test_frames_of_both_channels_are_served_in_the_order_they_were_numbered(daemon, kit):
    """A close posted on the lazy channel with a number after a GEM_INFO's on the connection
    waits for it (the info finds the handle), even though it was written first; one numbered
    before a GEM_INFO is served first (the info gets ENOENT)."""
    lazy = _Lazy(kit.raw(daemon.path))
    try:
        h1, h2 = lazy.create(), lazy.create()
        seq = lazy.raw.seq
        lazy.post(Op.GEM_CLOSE, s.CloseReq(handle=h1), seq=seq + 2)  # written first, numbered later
        assert lazy.info(h1, seq=seq + 1) == 0
        lazy.raw.seq = seq + 2
        assert lazy.info(h1) == 2  # ENOENT: the close (numbered before this one) was served first
        lazy.post(Op.GEM_CLOSE, s.CloseReq(handle=h2))
        assert lazy.info(h2) == 2
        lazy.raw.assert_usable()
    finally:
        lazy.close()


def test_lazy_posts_of_an_idle_client_are_served_within_seconds(daemon, kit):
    """A close posted on the lazy channel by a client that then makes no request: the
    daemon's once-a-second pass serves it (nothing else would)."""
    lazy = _Lazy(kit.raw(daemon.path))
    try:
        h = lazy.create()
        lazy.post(Op.GEM_CLOSE, s.CloseReq(handle=h))
        with daemon.connect() as dev:
            wait_until(lambda: dev.stats()["objects"] == 0, what="the lazy close served by the once-a-second pass")
        assert lazy.info(h) == 2
    finally:
        lazy.close()


@pytest.mark.parametrize("what", ["garbage", "request", "hello", "fds", "oversized"])
def test_a_bad_lazy_frame_drops_only_its_connection(daemon, kit, what):
    baseline = daemon.fd_count()
    bystander = kit.raw(daemon.path)
    bystander.hello()
    lazy = _Lazy(kit.raw(daemon.path))
    try:
        lazy.create()
        if what == "garbage":
            lazy.mine.sendall(b"\xff" * 64)
        elif what == "request":
            lazy.post(Op.STATS, s.Empty(), kind=FrameKind.REQUEST)
        elif what == "hello":
            lazy.post(Op.HELLO, s.HelloReq())
        elif what == "fds":
            r, wfd = os.pipe()
            try:
                header = encode_header(0, Op.STATS, 1, FrameKind.POST, lazy.raw.seq + 1, 0)
                lazy.mine.sendmsg([header], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", r))])
            finally:
                os.close(r)
                os.close(wfd)
        else:
            lazy.mine.sendall(encode_header(1 << 31, Op.STATS, 0, FrameKind.POST, lazy.raw.seq + 1, 0))
        lazy.raw.frame(Op.STATS)  # its next frame reads the lazy channel first
        lazy.raw.assert_dropped()
        bystander.assert_usable()
    finally:
        lazy.close()
        bystander.close()
    kit.assert_healthy(daemon, baseline)


@pytest.mark.parametrize("what", ["pipe", "memfd", "datagram", "second"])
def test_a_lazy_channel_that_cannot_be_one_is_einval_and_the_connection_stays(daemon, kit, what):
    baseline = daemon.fd_count()
    raw = kit.raw(daemon.path)
    lazy = None
    if what == "second":
        lazy = _Lazy(raw)
    else:
        raw.hello()
    if what == "pipe":
        fd, other = os.pipe()
    elif what == "memfd":
        fd, other = os.memfd_create("not-a-socket"), -1
    else:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM if what == "datagram" else socket.SOCK_STREAM)
        fd, other = a.detach(), b.detach()
    try:
        reply = raw.call(Op.LAZY_CHANNEL, s.LazyChannelReq(), fds=[fd])
        assert reply.status == 22, reply  # EINVAL
        assert (b"already" if what == "second" else b"LAZY_CHANNEL") in reply.payload, reply
        raw.assert_usable()
    finally:
        os.close(fd)
        if other >= 0:
            os.close(other)
        if lazy is not None:
            lazy.close()
    raw.close()
    kit.assert_healthy(daemon, baseline)


def test_a_client_flooding_its_lazy_channel_does_not_hold_up_others(daemon, kit):
    """One client fills its lazy channel with posted creates (up to 16,384: as many as its
    socket holds), then sends a request numbered after them, which must wait for all of
    them; another client's STATS, sent just after, is served before all of them are: the
    daemon serves a turn of lazy frames (LAZY_BURST), then the others, then the next turn."""
    import json

    flooder = _Lazy(kit.raw(daemon.path))
    bystander = kit.raw(daemon.path)
    bystander.hello()
    flooder.mine.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)  # (the kernel caps it)
    create = b"".join(bytes(p) for p in s.encode(s.CreateReq(size=4096))[0])
    first = flooder.raw.seq + 1
    batch = 64
    flooder.mine.setblocking(False)
    written = 0
    try:
        while written < 16384:  # whole batches (each one kernel buffer: written whole or not at all)
            chunk = b"".join(encode_header(len(create), Op.GEM_CREATE, 0, FrameKind.POST,
                                           (first + written + i) & 0xFFFFFFFF, 0) + create for i in range(batch))
            try:
                flooder.mine.send(chunk)
            except BlockingIOError:
                break
            written += batch
        assert written >= 8 * batch, written
        flooder.raw.seq = first + written
        seq = flooder.raw.frame(Op.STATS)  # numbered after the flood: served once all of it is
        reply = bystander.call(Op.STATS, s.Empty())
        assert reply.status == 0, reply
        seen = json.loads(reply.payload)["objects"]
        assert seen < written, f"another client's request waited for all {written} lazy frames of this one"
        reply = flooder.raw.reply()
        assert (reply.seq, reply.status) == (seq, 0), reply
        assert json.loads(reply.payload)["objects"] == written
    finally:
        flooder.close()
