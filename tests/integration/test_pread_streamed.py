"""pread_into of a spilled object, served straight from spill storage through a pipe
(core/stream.py, backing/spill_read.py), on a real daemon: the right bytes for any range,
the object left spilled, nothing restored; the extent outlives a free while it is read;
a reader that stops early or never reads holds nothing; the limits per uid.

Raw requests (conftest's RawClient) stand for a client that asks for a stream and then
does not read it, which the client library never does."""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import ugem
from ugem.backing.spill_read import STALL_S
from ugem.core.stream import STREAMS_PER_UID
from ugem.testing import DaemonProcess, run_daemon
from ugem.testing.data import SAFETY_S, wait_until
from ugem.wire import structs as s
from ugem.wire.frames import HEADER, XFER_ABOVE, FrameKind, Op

MiB = 1 << 20
PAGE = 4096
SIZE = 16 * MiB
BUDGET = "64M"


@pytest.fixture
def daemon() -> Iterator[DaemonProcess]:
    with run_daemon(system_budget=BUDGET) as d:
        yield d


def _push_out(dev: ugem.Device, *targets: int) -> list[int]:
    """Write new objects until every target is spilled (the budget holds four of SIZE)."""
    fillers = []
    while any(dev.info(h).placement != "spilled" for h in targets):
        assert len(fillers) < 16, [dev.info(h).placement for h in targets]
        h = dev.create(SIZE)
        dev.pwrite(h, 0, np.full(SIZE, len(fillers) + 1, np.uint8))
        fillers.append(h)
    return fillers


def _streams_ended(dev: ugem.Device) -> None:
    """Wait until the daemon has seen every stream end: a read the client has finished counts
    against STREAMS_PER_UID until then (its pump's end reaches the daemon's loop a moment
    later), and a pread past that limit restores the object, as it should."""
    wait_until(lambda: dev.stats()["streams"] == 0, SAFETY_S, what="the daemon to see its streams end")


def _sparse(dev: ugem.Device, seed: int) -> tuple[int, np.ndarray]:
    """An object with data in three places (crossing the spill extent's two files) and holes."""
    rng = np.random.default_rng(seed)
    expected = np.zeros(SIZE, np.uint8)
    h = dev.create(SIZE)
    for offset, length in [(0, MiB + 100), (3 * MiB - 5 * PAGE, 7 * MiB), (SIZE - PAGE, PAGE)]:
        expected[offset:offset + length] = rng.integers(0, 256, length, dtype=np.uint8)
        dev.pwrite(h, offset, expected[offset:offset + length])
    return h, expected


def test_pread_into_reads_a_spilled_object_where_it_lies(daemon: DaemonProcess, kit: Any) -> None:
    with daemon.connect() as dev:
        baseline = daemon.fd_count()
        h, expected = _sparse(dev, 1)
        _push_out(dev, h)
        before = dev.stats()
        with pytest.raises(ugem.InvalidArgument):  # past the end: the request's own error (asked again without
            dev.pread_into(h, SIZE - PAGE, np.empty(XFER_ABOVE + 1, np.uint8))  # STREAM), streams on after it
        for offset, length in [(0, SIZE), (7, MiB + 1000), (MiB + 200, MiB), (3 * MiB, 9 * MiB + 1),
                               (SIZE - XFER_ABOVE - 3, XFER_ABOVE + 3), (11 * MiB, 2 * MiB)]:  # (smaller: inline)
            out = np.full(length, 0xEE, np.uint8)  # the holes must come out as zeros, not as what was there
            assert dev.pread_into(h, offset, out) == length
            assert np.array_equal(out, expected[offset:offset + length]), (offset, length)
            _streams_ended(dev)
        after = dev.stats()
        assert dev.info(h).placement == "spilled"  # read where it lies: not brought back
        assert after["restored_total"] == before["restored_total"]
        moved = {k: (before[k], after[k]) for k in before if k.endswith("_total") and before[k] != after[k]}
        assert after["bytes_moved_total"] == before["bytes_moved_total"], moved  # (what moved, if anything)
        assert after["resident_bytes"] <= before["resident_bytes"]
        assert np.array_equal(np.frombuffer(dev.pread(h, 0, SIZE), np.uint8), expected)  # pread of bytes restores
        assert dev.stats()["restored_total"] == before["restored_total"] + 1
    kit.wait_fd_count(daemon, baseline - 1)  # (less the Device's socket)


def _stream(raw: Any, handle: int, offset: int, length: int) -> tuple[s.PreadReply, list[int]]:
    """A GEM_PREAD asking for a stream, its reply and fds kept open (RawClient closes them)."""
    seq = raw.struct_frame(Op.GEM_PREAD, s.PreadReq(handle=handle, flags=s.XFER | s.STREAM, offset=offset,
                                                    length=length))
    fds: list[int] = []
    length_, op, nfds, kind, seq_, status = HEADER.unpack(raw._recv_exact(HEADER.size, fds))
    payload = raw._recv_exact(length_, fds)
    assert (op, kind, seq_, status, nfds) == (Op.GEM_PREAD, FrameKind.REPLY, seq, 0, len(fds)), (status, fds)
    return s.decode(s.PreadReply, payload, []), fds


def _open(raw: Any, dev: ugem.Device, handle: int) -> int:
    reply = raw.call(Op.GEM_OPEN, s.OpenReq(name=dev.flink(handle)))
    assert reply.status == 0, reply
    return s.decode(s.OpenReply, reply.payload, []).handle


def _streamed_unread(daemon: DaemonProcess, dev: ugem.Device, raw: Any,
                     seed: int) -> tuple[int, int, np.ndarray, int, list[int], s.PreadReply, list[int]]:
    """A spilled sparse object of `dev`, opened by `raw` too, whose stream `raw` asked for
    and has not read: (daemon fds before, handle, bytes, raw's handle, fillers, reply, fds)."""
    raw.hello()
    baseline = daemon.fd_count()
    h, expected = _sparse(dev, seed)
    theirs = _open(raw, dev, h)
    fillers = _push_out(dev, h)
    reply, fds = _stream(raw, theirs, 0, SIZE)
    assert reply.flags & s.STREAMED and len(fds) == 1
    return baseline, h, expected, theirs, fillers, reply, fds


def _read_all(fd: int, pieces: bytes, offset: int, length: int) -> np.ndarray:
    out = np.zeros(length, np.uint8)
    view = memoryview(out)
    for at, n in s.PIECE.iter_unpack(pieces):
        done = 0
        while done < n:
            got = os.readv(fd, [view[at - offset + done:at - offset + n]])
            assert got > 0, "the stream ended early"
            done += got
    assert os.read(fd, 1) == b""
    return out


def test_the_bytes_streamed_are_those_of_the_request_even_if_the_object_is_freed(daemon: DaemonProcess,
                                                                                  kit: Any) -> None:
    """Freed while its stream waits unread, then its spill space wanted by new spills: the
    extent is given back only once the read has ended, so the pipe still carries the bytes."""
    with daemon.connect() as dev, kit.RawClient(daemon.path) as raw:
        baseline, h, expected, theirs, fillers, reply, fds = _streamed_unread(daemon, dev, raw, 2)
        try:
            assert raw.call(Op.GEM_CLOSE, s.CloseReq(handle=theirs)).status == 0
            dev.close_handle(h)  # the object is gone now
            for f in fillers:
                dev.close_handle(f)
            more = [dev.create(SIZE) for _ in range(8)]  # 128 MiB of other data through a 64 MiB budget
            for i, m in enumerate(more):
                dev.pwrite(m, 0, np.full(SIZE, 0xA0 + i, np.uint8))
            assert dev.stats()["spilled_total"] >= 4
            assert np.array_equal(_read_all(fds[0], reply.data, 0, SIZE), expected)
        finally:
            for fd in fds:
                os.close(fd)
        for m in more:
            dev.close_handle(m)
        kit.wait_until(lambda: dev.stats()["spilled_bytes"] == 0, what="spill storage given back")
        kit.wait_fd_count(daemon, baseline)


def test_a_reader_that_stops_early_leaves_nothing_behind(daemon: DaemonProcess, kit: Any) -> None:
    with daemon.connect() as dev, kit.RawClient(daemon.path) as raw:
        baseline, h, expected, theirs, fillers, _, fds = _streamed_unread(daemon, dev, raw, 3)
        first = os.read(fds[0], 4096)
        assert first == expected[:len(first)].tobytes()
        os.close(fds[0])  # the pump gives up (EPIPE)
        out = np.empty(SIZE, np.uint8)
        dev.pread_into(h, 0, out)  # the next read streams again, whole
        assert np.array_equal(out, expected)
        for f in [h, *fillers]:
            dev.close_handle(f)
        assert raw.call(Op.GEM_CLOSE, s.CloseReq(handle=theirs)).status == 0
        kit.wait_fd_count(daemon, baseline)


def test_past_the_streams_a_uid_may_hold_a_pread_restores(daemon: DaemonProcess, kit: Any) -> None:
    """Streams nobody reads each hold a thread: past STREAMS_PER_UID of a uid, its preads
    restore as before (and so never wait for the others)."""
    with daemon.connect() as dev, kit.RawClient(daemon.path) as raw:
        raw.hello()
        baseline = daemon.fd_count()
        objs = [_sparse(dev, 10 + i) for i in range(STREAMS_PER_UID + 1)]
        handles = [_open(raw, dev, h) for h, _ in objs]
        fillers = _push_out(dev, *(h for h, _ in objs))
        held: list[int] = []
        try:
            for i, theirs in enumerate(handles):
                reply, fds = _stream(raw, theirs, 0, SIZE)
                held += fds
                if i < STREAMS_PER_UID:
                    assert reply.flags & s.STREAMED, i
                else:  # restored, and read through a description of its memory as before
                    assert not reply.flags & s.STREAMED and reply.xfer_id
                    assert dev.info(objs[i][0]).placement == "system"
                    assert os.pread(fds[0], SIZE, 0) == objs[i][1].tobytes()
                    assert raw.call(Op.XFER_DONE, s.XferDoneReq(xfer_id=reply.xfer_id)).status == 0
        finally:
            for fd in held:
                os.close(fd)
        for h in [*(h for h, _ in objs), *fillers]:
            dev.close_handle(h)
        for theirs in handles:
            assert raw.call(Op.GEM_CLOSE, s.CloseReq(handle=theirs)).status == 0
        kit.wait_fd_count(daemon, baseline)


def test_the_daemon_stops_at_once_with_a_stream_nobody_reads(kit: Any) -> None:
    """A stream's thread waits up to spill_read.STALL_S for its reader; SIGTERM must not."""
    with run_daemon(system_budget=BUDGET) as daemon, daemon.connect() as dev, kit.RawClient(daemon.path) as raw:
        fds = _streamed_unread(daemon, dev, raw, 4)[-1]
        try:
            started = time.monotonic()
            daemon.proc.send_signal(signal.SIGTERM)
            assert daemon.proc.wait(timeout=SAFETY_S) == 0
            assert time.monotonic() - started < STALL_S
            assert "Traceback" not in daemon.stderr_text()
        finally:
            for fd in fds:
                os.close(fd)


# -- a client that may copy the daemon's fds reads the spill files itself (STREAM_TAKES) ------

def _spill_disk_bytes(daemon: DaemonProcess) -> int:
    """Bytes the daemon's spill files hold on disk: an extent given back is punched out."""
    total = 0
    for directory, _, files in os.walk(os.path.join(daemon.directory, "spill")):
        total += sum(os.stat(os.path.join(directory, f)).st_blocks * 512 for f in files)
    return total


def _given_back(daemon: DaemonProcess, dev: ugem.Device, kit: Any, what: str) -> None:
    kit.wait_until(lambda: dev.stats()["spilled_bytes"] == 0 and _spill_disk_bytes(daemon) == 0, what=what)


def _spy(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    """Count the calls of client/device_xfer.py's `name` (read_runs or read_streamed)."""
    from ugem.client import device_xfer
    calls: list[int] = []
    real = getattr(device_xfer, name)

    def spy(*args: Any) -> None:
        calls.append(1)
        real(*args)

    monkeypatch.setattr(device_xfer, name, spy)
    return calls


def test_pread_into_reads_the_spill_files_themselves(daemon: DaemonProcess, kit: Any,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Through spill files this process copies (pidfd_getfd): the right bytes for any range,
    holes as zeros, no pipe and no pump, the object left spilled, and each transfer ended."""
    direct, piped = _spy(monkeypatch, "read_runs"), _spy(monkeypatch, "read_streamed")
    with daemon.connect() as dev:
        baseline = daemon.fd_count()
        h, expected = _sparse(dev, 20)
        fillers = _push_out(dev, h)
        before = dev.stats()
        ranges = [(0, SIZE), (7, MiB + 1000), (3 * MiB, 9 * MiB + 1), (SIZE - XFER_ABOVE - 3, XFER_ABOVE + 3)]
        for offset, length in ranges:
            out = np.full(length, 0xEE, np.uint8)
            assert dev.pread_into(h, offset, out) == length
            assert np.array_equal(out, expected[offset:offset + length]), (offset, length)
        after = dev.stats()
        assert (len(direct), len(piped)) == (len(ranges), 0)
        assert dev.info(h).placement == "spilled" and after["restored_total"] == before["restored_total"]
        assert after["streams"] == 0  # (no pump)
        for f in [h, *fillers]:
            dev.close_handle(f)
        _given_back(daemon, dev, kit, "spill storage given back: transfers ended")
        kit.wait_fd_count(daemon, baseline)


def test_where_a_spill_file_cannot_be_copied_the_read_comes_through_a_pipe(daemon: DaemonProcess, kit: Any,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from ugem.client.daemon_fds import DaemonFds
    direct, piped = _spy(monkeypatch, "read_runs"), _spy(monkeypatch, "read_streamed")
    monkeypatch.setattr(DaemonFds, "take", lambda self, number, key: None)  # as if every file changed hands
    with daemon.connect() as dev:
        h, expected = _sparse(dev, 21)
        fillers = _push_out(dev, h)
        out = np.full(SIZE, 0xEE, np.uint8)
        assert dev.pread_into(h, 0, out) == SIZE
        assert np.array_equal(out, expected) and (len(direct), len(piped)) == (0, 1)
        _streams_ended(dev)
        for f in [h, *fillers]:
            dev.close_handle(f)
        _given_back(daemon, dev, kit, "spill storage given back: transfer ended")


def _ask_direct(raw: Any, handle: int) -> s.PreadReply:
    reply = raw.call(Op.GEM_PREAD, s.PreadReq(handle=handle, flags=s.XFER | s.STREAM | s.TAKES_FD | s.STREAM_TAKES,
                                               offset=0, length=SIZE))
    assert reply.status == 0 and not reply.nfds, reply
    got = s.decode(s.PreadReply, reply.payload, [])
    assert got.flags == s.STREAMED | s.TAKEN and got.xfer_id
    return got


def _read_runs(daemon: DaemonProcess, reply: s.PreadReply) -> np.ndarray:
    """What a direct read's SPILL_RUN records name, read from the daemon's spill files as the
    client library does (each file copied and checked, its runs read at their offsets)."""
    from ugem.client.daemon_fds import DaemonFds
    taker = DaemonFds((daemon.pid, os.getuid()))
    out = np.zeros(SIZE, np.uint8)
    try:
        for server_fd, _, st_dev, st_ino, at, offset, n in s.SPILL_RUN.iter_unpack(reply.data):
            fd = taker.take(server_fd, (st_dev, st_ino))
            assert fd is not None
            with fd:
                assert os.preadv(fd.fd, [memoryview(out)[offset:offset + n]], at) == n
    finally:
        taker.close()
    return out


def test_a_direct_read_keeps_its_bytes_until_its_transfer_ends(daemon: DaemonProcess, kit: Any) -> None:
    """The object freed by its owners and 128 MiB of new spills after the reply: the runs still
    hold the bytes of the request until XFER_DONE; a client that ends without it gives the
    extent back all the same."""
    with daemon.connect() as dev, kit.RawClient(daemon.path) as raw:
        raw.hello()
        h, expected = _sparse(dev, 22)
        theirs = _open(raw, dev, h)
        fillers = _push_out(dev, h)
        reply = _ask_direct(raw, theirs)
        assert raw.call(Op.GEM_CLOSE, s.CloseReq(handle=theirs)).status == 0
        for f in [h, *fillers]:
            dev.close_handle(f)
        more = [dev.create(SIZE) for _ in range(8)]
        for i, m in enumerate(more):
            dev.pwrite(m, 0, np.full(SIZE, 0xA0 + i, np.uint8))
        assert np.array_equal(_read_runs(daemon, reply), expected)
        assert raw.call(Op.XFER_DONE, s.XferDoneReq(xfer_id=reply.xfer_id)).status == 0
        assert raw.call(Op.XFER_DONE, s.XferDoneReq(xfer_id=reply.xfer_id)).status == errno.EINVAL  # (ended once)
        for m in more:
            dev.close_handle(m)
        _given_back(daemon, dev, kit, "spill storage given back after XFER_DONE")
        h2, _ = _sparse(dev, 23)
        fillers = _push_out(dev, h2)
        reply = _ask_direct(raw, _open(raw, dev, h2))
    # raw ended without XFER_DONE (and with its handle): once dev's are closed, nothing is held
    with daemon.connect() as dev2:
        for f in [h2, *fillers]:
            with pytest.raises(ugem.NoSuchObject):
                dev2.info(f)  # (dev's handles went with dev)
        _given_back(daemon, dev2, kit, "spill storage given back at the client's end")


def test_a_direct_read_of_an_object_purged_meanwhile_ends_efault(daemon: DaemonProcess, kit: Any) -> None:
    """Purged (DONTNEED on a spilled object purges it at once) while a direct read is open:
    the runs still hold the bytes of the request, never zeros, but XFER_DONE fails EFAULT, as
    for every transfer of a purged object; the spill space goes back after it."""
    with daemon.connect() as dev, kit.RawClient(daemon.path) as raw:
        raw.hello()
        h, expected = _sparse(dev, 24)
        theirs = _open(raw, dev, h)
        fillers = _push_out(dev, h)
        reply = _ask_direct(raw, theirs)
        assert dev.madvise(h, ugem.DONTNEED) is False and dev.info(h).madvise == "purged"
        assert np.array_equal(_read_runs(daemon, reply), expected)
        assert raw.call(Op.XFER_DONE, s.XferDoneReq(xfer_id=reply.xfer_id)).status == errno.EFAULT
        assert raw.call(Op.GEM_CLOSE, s.CloseReq(handle=theirs)).status == 0
        for f in [h, *fillers]:
            dev.close_handle(f)
        _given_back(daemon, dev, kit, "spill storage given back after the purged read ended")
