"""Abusive clients on raw sockets (SPEC §5): no input can crash the daemon, leak an fd in
it, block other clients or touch another client's objects.

A malformed frame drops that connection only; an operation error (unknown op, nonzero
padding, unknown flags) is an EINVAL reply and the connection stays usable. After every
abuse the daemon must be alive, serve a fresh client, and hold exactly the fds it held
before (`kit.assert_healthy`). Fds sent to the daemon are pipe write ends (`kit.tracer()`):
the pipe's read end reaching EOF proves the daemon closed every copy it received.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import random
import socket
import struct
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ugem.testing import DaemonProcess, run_daemon
from ugem.testing.data import PROMPT_S, SAFETY_S
from ugem.wire import structs as s
from ugem.wire.frames import HEADER, MAX_FDS, MAX_PAYLOAD, FrameKind, Op, encode_header

UNKNOWN_OPS = [Op.HELLO, max(Op) + 1, 99, 0x7FFF, 0xFFFF]  # HELLO again after the handshake is not an op


def _hello_bytes() -> bytes:
    pieces, _ = s.encode(s.HelloReq())
    return encode_header(len(pieces[0]), Op.HELLO, 0, FrameKind.REQUEST, 1) + pieces[0]


# -- garbage and broken framing: the connection is dropped ------------------------------

@pytest.mark.parametrize("greet", [False, True], ids=["no-hello", "after-hello"])
def test_random_bytes_then_close(daemon: DaemonProcess, kit: Any, greet: bool) -> None:
    baseline = daemon.fd_count()
    rng = random.Random(1234)
    for size in (1, 7, 15, 16, 17, 100, 4096, 70000):
        with kit.raw(daemon.path) as raw:
            if greet:
                raw.hello()
            try:
                raw.send(rng.randbytes(size))
            except (BrokenPipeError, ConnectionResetError):
                pass  # dropped while we were still sending: fine
    kit.assert_healthy(daemon, baseline)


@pytest.mark.parametrize("greet", [False, True], ids=["no-hello", "after-hello"])
@pytest.mark.parametrize("header", [
    pytest.param(dict(length=2**32 - 1), id="length-2**32-1"),
    pytest.param(dict(length=MAX_PAYLOAD + 1), id="length-max+1"),
    pytest.param(dict(status=errno.EINVAL), id="status-in-request"),
    pytest.param(dict(status=-1), id="negative-status"),
    pytest.param(dict(kind=FrameKind.REPLY), id="kind-reply"),
    pytest.param(dict(kind=7), id="kind-7"),
    pytest.param(dict(nfds=2), id="nfds-without-fds"),
])
def test_bad_header_drops_connection(daemon: DaemonProcess, kit: Any, greet: bool, header: dict[str, int]) -> None:
    baseline = daemon.fd_count()
    raw = kit.raw(daemon.path)
    if greet:
        raw.hello()
    fields = dict(length=0, op=Op.STATS, nfds=0, kind=FrameKind.REQUEST, seq=5, status=0) | header
    logged = len(daemon.stderr_text())
    raw.send(encode_header(**fields))  # only the header: a daemon waiting for the payload would hang
    raw.assert_dropped()
    raw.close()
    kit.wait_until(lambda: len(daemon.stderr_text()) > logged, what="the daemon to log the dropped connection")
    kit.assert_healthy(daemon, baseline)


def test_requests_before_hello_are_dropped(daemon: DaemonProcess, kit: Any) -> None:
    baseline = daemon.fd_count()
    for op, msg in ((Op.STATS, s.Empty()), (Op.GEM_CREATE, s.CreateReq(size=4096))):
        with kit.raw(daemon.path) as raw:
            raw.struct_frame(op, msg)
            raw.assert_dropped()
    with kit.raw(daemon.path) as raw:  # a HELLO with nonzero padding is malformed too
        raw.struct_frame(Op.HELLO, s.HelloReq(pad=1))
        raw.assert_dropped()
    kit.assert_healthy(daemon, baseline)


def test_wrong_version_is_refused_but_can_retry(daemon: DaemonProcess, kit: Any) -> None:
    baseline = daemon.fd_count()
    with kit.raw(daemon.path) as raw:
        reply = raw.call(Op.HELLO, s.HelloReq(version=999))
        assert reply.status == errno.EPROTONOSUPPORT, reply
        reply = raw.call(Op.HELLO, s.HelloReq(magic=b"MEGU"))
        assert reply.status == errno.EPROTONOSUPPORT, reply
        raw.hello()
        raw.assert_usable()
    kit.assert_healthy(daemon, baseline)


@pytest.mark.parametrize("cut", [1, 8, 15, 16, 20, 40])
def test_truncated_frame_then_close(daemon: DaemonProcess, kit: Any, cut: int) -> None:
    baseline = daemon.fd_count()
    pieces, _ = s.encode(s.PwriteReq(handle=1, offset=0, length=32, data=b"z" * 32))
    whole = encode_header(24 + 32, Op.GEM_PWRITE, 0, FrameKind.REQUEST, 2) + b"".join(bytes(p) for p in pieces)
    for greet in (False, True):
        with kit.raw(daemon.path) as raw:
            if greet:
                raw.hello()
                raw.struct_frame(Op.GEM_CREATE, s.CreateReq(size=4096))
                assert raw.reply().status == 0
            raw.send(whole[:cut])
            time.sleep(0.01)
            assert raw.still_connected()
    kit.assert_healthy(daemon, baseline)


# -- operation errors: EINVAL reply, the connection stays -------------------------------

@pytest.mark.parametrize("op", UNKNOWN_OPS)
def test_unknown_op_is_einval_and_connection_stays(daemon: DaemonProcess, kit: Any, op: int) -> None:
    baseline = daemon.fd_count()
    with kit.raw(daemon.path) as raw:
        raw.hello()
        for payload in (b"", b"\x01" * 40):
            seq = raw.frame(op, payload)
            reply = raw.reply()
            assert (reply.op, reply.seq, reply.kind, reply.status) == (op, seq, FrameKind.REPLY, errno.EINVAL), reply
            assert reply.payload, "an error reply carries a message"
            raw.assert_usable()
    kit.assert_healthy(daemon, baseline)


@pytest.mark.parametrize("op, msg", [
    (Op.GEM_CREATE, s.CreateReq(size=4096, pad=1)),
    (Op.GEM_CREATE, s.CreateReq(size=4096, flags=1)),
    (Op.GEM_CREATE, s.CreateReq(size=4096, flags=0x80000000)),
    (Op.GEM_CLOSE, s.CloseReq(handle=1, pad=0xFFFFFFFF)),
    (Op.GEM_INFO, s.InfoReq(handle=1, flags=2)),
    (Op.GEM_PREAD, s.PreadReq(handle=1, flags=0x10, length=8)),
    (Op.GEM_PWRITE, s.PwriteReq(handle=1, flags=0x8, length=2, data=b"ab")),
    (Op.GEM_PWRITE, s.PwriteReq(handle=1, flags=0x100, length=2, data=b"ab")),
    (Op.GEM_MMAP, s.MmapReq(handle=1, flags=0x8, length=4096)),
    (Op.GEM_CREATE, s.CreateReq(size=4096, flags=s.TAKES_FD)),  # GEM_CREATE_MAPPED's flag only
    (Op.GEM_FLINK, s.FlinkReq(handle=1, pad=1)),
    (Op.GEM_OPEN, s.OpenReq(name=1, pad=1)),
    (Op.PRIME_HANDLE_TO_FD, s.ExportReq(handle=1, flags=0x2)),
    (Op.XFER_DONE, s.XferDoneReq(xfer_id=1, pad=1)),
], ids=lambda v: type(v).__name__ if isinstance(v, s.Struct) else None)
def test_bad_padding_or_flags_is_einval(daemon: DaemonProcess, kit: Any, op: int, msg: s.Struct) -> None:
    baseline = daemon.fd_count()
    with kit.raw(daemon.path) as raw:
        raw.hello()
        assert raw.call(Op.GEM_CREATE, s.CreateReq(size=4096)).status == 0  # handle 1 exists
        reply = raw.call(op, msg)
        assert reply.status == errno.EINVAL, reply
        assert reply.nfds == 0
        raw.assert_usable()
        stats = json.loads(raw.call(Op.STATS, s.Empty()).payload)
        assert stats["objects"] == 1, "the bad request must change nothing"
    kit.assert_healthy(daemon, baseline)


def test_oversized_payload_for_its_struct_is_einval(daemon: DaemonProcess, kit: Any) -> None:
    baseline = daemon.fd_count()
    with kit.raw(daemon.path) as raw:
        raw.hello()
        for op, size in ((Op.GEM_CREATE, 17), (Op.STATS, 1), (Op.GEM_CLOSE, MAX_PAYLOAD)):
            seq = raw.frame(op, b"\0" * size)
            reply = raw.reply()
            assert (reply.seq, reply.status) == (seq, errno.EINVAL), reply
        raw.assert_usable()
    kit.assert_healthy(daemon, baseline)


def test_import_with_bad_padding_or_a_pipe_closes_the_fd(daemon: DaemonProcess, kit: Any) -> None:
    baseline = daemon.fd_count()
    with kit.raw(daemon.path) as raw:
        raw.hello()
        for msg in (s.ImportReq(pad=1), s.ImportReq(flags=4), s.ImportReq()):
            tracer = kit.tracer()
            reply = raw.call(Op.PRIME_FD_TO_HANDLE, msg, fds=[tracer.write_fd])
            assert reply.status == errno.EINVAL, reply
            tracer.assert_closed_everywhere()
        raw.assert_usable()
    kit.assert_healthy(daemon, baseline)


# -- fds where they do not belong: the connection is dropped and the fds closed ---------

def _send_misplaced_fds(raw: Any, case: str, fd: int) -> None:
    stats = encode_header(0, Op.STATS, 0, FrameKind.REQUEST, 9)
    if case == "unexpected":  # an op that takes no fds, nfds honest
        raw.send(encode_header(0, Op.STATS, 1, FrameKind.REQUEST, 9), [fd])
    elif case == "undeclared":  # fds attached, header says none
        raw.send(stats, [fd])
    elif case == "miscounted":  # header says 2, one arrives
        pieces, _ = s.encode(s.ImportReq())
        raw.send(encode_header(8, Op.PRIME_FD_TO_HANDLE, 2, FrameKind.REQUEST, 9) + pieces[0], [fd])
    elif case == "two-for-import":
        pieces, _ = s.encode(s.ImportReq())
        raw.send(encode_header(8, Op.PRIME_FD_TO_HANDLE, 2, FrameKind.REQUEST, 9) + pieces[0], [fd, fd])
    elif case == "mid-header":
        raw.send(stats[:8])
        time.sleep(0.05)  # make sure the two halves arrive as two reads
        raw.send(stats[8:], [fd])
    elif case == "mid-payload":
        pieces, _ = s.encode(s.CreateReq(size=4096))
        raw.send(encode_header(16, Op.GEM_CREATE, 0, FrameKind.REQUEST, 9))
        time.sleep(0.05)
        raw.send(pieces[0], [fd])
    elif case.startswith("too-many-"):  # > MAX_FDS: MSG_CTRUNC on the daemon's side
        count = int(case.rsplit("-", 1)[1])
        raw.send(encode_header(0, Op.STATS, min(count, 255), FrameKind.REQUEST, 9), [fd] * count)
    else:
        raise AssertionError(case)


@pytest.mark.parametrize("greet", [False, True], ids=["no-hello", "after-hello"])
@pytest.mark.parametrize("case", ["unexpected", "undeclared", "miscounted", "two-for-import", "mid-header",
                                  "mid-payload", f"too-many-{MAX_FDS + 1}", "too-many-64", "too-many-253"])
def test_misplaced_fds_drop_and_are_closed(daemon: DaemonProcess, kit: Any, case: str, greet: bool) -> None:
    baseline = daemon.fd_count()
    raw = kit.raw(daemon.path)
    if greet:
        raw.hello()
    tracer = kit.tracer()
    _send_misplaced_fds(raw, case, tracer.write_fd)
    raw.assert_dropped()
    tracer.assert_closed_everywhere()
    raw.close()
    kit.assert_healthy(daemon, baseline)


def test_fds_with_hello_are_dropped(daemon: DaemonProcess, kit: Any) -> None:
    baseline = daemon.fd_count()
    tracer = kit.tracer()
    with kit.raw(daemon.path) as raw:
        pieces, _ = s.encode(s.HelloReq())
        raw.send(encode_header(12, Op.HELLO, 1, FrameKind.REQUEST, 1) + pieces[0], [tracer.write_fd])
        raw.assert_dropped()
    tracer.assert_closed_everywhere()
    kit.assert_healthy(daemon, baseline)


# -- slow, stalled and deaf clients do not block the others -----------------------------

def _timed_requests(good: Any, count: int) -> list[float]:
    """Round trips of a well-behaved raw client (it has a socket timeout, so a blocked
    daemon fails the test instead of hanging it): create, write, read back, close."""
    times = []
    for i in range(count):
        data = b"%d" % i
        t0 = time.perf_counter()
        created = good.call(Op.GEM_CREATE, s.CreateReq(size=4096))
        handle = s.decode(s.CreateReply, created.payload, []).handle
        assert good.call(Op.GEM_PWRITE, s.PwriteReq(handle=handle, length=len(data), data=data)).status == 0
        read = good.call(Op.GEM_PREAD, s.PreadReq(handle=handle, length=len(data)))
        assert read.status == 0 and read.payload.endswith(data), read
        assert good.call(Op.GEM_CLOSE, s.CloseReq(handle=handle)).status == 0
        times.append(time.perf_counter() - t0)
    return times


def _good_client(kit: Any, daemon: DaemonProcess) -> Any:
    good = kit.raw(daemon.path)
    good.hello()
    return good


def test_stalled_clients_do_not_block_others(daemon: DaemonProcess, kit: Any) -> None:
    baseline = daemon.fd_count()
    hello = _hello_bytes()  # 28 bytes
    create = encode_header(16, Op.GEM_CREATE, 0, FrameKind.REQUEST, 2) + s.encode(s.CreateReq(size=8192))[0][0]
    stalled = []
    for cut in (1, 8, 15, 16, 17, 27):  # inside the HELLO frame
        raw = kit.raw(daemon.path)
        raw.send(hello[:cut])
        stalled.append((raw, hello, cut))
    for cut in (1, 8, 15, 16, 20, 31):  # inside a request after the handshake
        raw = kit.raw(daemon.path)
        raw.hello()
        raw.send(create[:cut])
        stalled.append((raw, create, cut))
    with _good_client(kit, daemon) as good:
        times = _timed_requests(good, 200)
    assert max(times) < PROMPT_S, f"a well-behaved client waited {max(times) * 1000:.1f} ms behind stalled ones"
    for raw, frame, cut in stalled:  # still connected, and the daemon kept their partial frames
        assert raw.still_connected()
        raw.send(frame[cut:])
        reply = raw.reply()
        assert reply.status == 0 and reply.op in (Op.HELLO, Op.GEM_CREATE), reply
        raw.close()
    kit.assert_healthy(daemon, baseline)


def test_client_that_never_reads_does_not_block_others(daemon: DaemonProcess, kit: Any) -> None:
    baseline = daemon.fd_count()
    deaf = kit.raw(daemon.path)
    deaf.hello()
    deaf.sock.setblocking(False)
    request = encode_header(0, Op.STATS, 0, FrameKind.REQUEST, 3) * 1000
    sent = 0
    deadline = time.monotonic() + SAFETY_S
    while time.monotonic() < deadline:  # pipeline requests until its socket is full both ways
        try:
            sent += deaf.sock.send(request)
        except BlockingIOError:
            break
    assert sent > 0
    with _good_client(kit, daemon) as good:
        times = _timed_requests(good, 200)
    assert max(times) < PROMPT_S, f"a well-behaved client waited {max(times) * 1000:.1f} ms behind a deaf one"
    deaf.close()
    kit.assert_healthy(daemon, baseline)


def test_a_burst_of_requests_in_one_write_is_served_in_order(daemon: DaemonProcess, kit: Any) -> None:
    """One read between frames may fetch several requests (wire/frames.py): each is served in
    order, one reply each, and fds sent with the last frame of the burst belong to it."""
    baseline = daemon.fd_count()
    client = kit.raw(daemon.path)
    client.hello()
    frames = []
    for i, (op, msg) in enumerate([(Op.GEM_CREATE, s.CreateReq(size=4096)), (Op.GEM_INFO, s.InfoReq(handle=1)),
                                   (999, None), (Op.GEM_CLOSE, s.CloseReq(handle=7)),
                                   (Op.GEM_CREATE, s.CreateReq(size=8192))], start=1):
        payload = b"" if msg is None else b"".join(bytes(p) for p in s.encode(msg)[0])
        frames.append(encode_header(len(payload), op, 0, FrameKind.REQUEST, i, 0) + payload)
    memfd = os.memfd_create("burst", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(memfd, 4096)
        fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        imp = b"".join(bytes(p) for p in s.encode(s.ImportReq())[0])
        frames.append(encode_header(len(imp), Op.PRIME_FD_TO_HANDLE, 1, FrameKind.REQUEST, 6, 0) + imp)
        client.send(b"".join(frames), [memfd])  # six requests, one sendmsg, the fd with the last
    finally:
        os.close(memfd)
    replies = [client.reply() for _ in range(6)]
    assert [r.seq for r in replies] == [1, 2, 3, 4, 5, 6]
    assert [r.status for r in replies] == [0, 0, errno.EINVAL, errno.EINVAL, 0, 0]
    assert s.decode(s.CreateReply, replies[4].payload, []).handle == 2
    assert s.decode(s.ImportReply, replies[5].payload, []).handle == 3
    client.close()
    kit.assert_healthy(daemon, baseline)


def test_posts_are_served_in_order_and_answered_with_nothing(daemon: DaemonProcess, kit: Any) -> None:
    """POST frames (requests that want no reply, wire/frames.py) are served like requests, in
    order, failures included, and nothing comes back for them; a HELLO posted is dropped."""
    baseline = daemon.fd_count()
    client = kit.raw(daemon.path)
    client.hello()
    created = client.call(Op.GEM_CREATE, s.CreateReq(size=4096))
    handle = s.decode(s.CreateReply, created.payload, []).handle
    burst = []
    for i, (op, msg) in enumerate([(Op.GEM_CLOSE, s.CloseReq(handle=handle)), (Op.GEM_INFO, s.InfoReq(handle=99)),
                                   (999, None), (Op.GEM_CREATE, s.CreateReq(size=8192))], start=100):
        payload = b"" if msg is None else b"".join(bytes(p) for p in s.encode(msg)[0])
        burst.append(encode_header(len(payload), op, 0, FrameKind.POST, i, 0) + payload)
    client.send(b"".join(burst))
    reply = client.call(Op.GEM_INFO, s.InfoReq(handle=handle))  # the first reply to come is this one's
    # the posted close and create were served, in order: the new object took the closed number
    assert reply.status == 0 and s.decode(s.InfoReply, reply.payload, []).size == 8192
    client.assert_usable()
    client.close()
    posted = kit.raw(daemon.path)
    posted.frame(Op.HELLO, b"".join(bytes(p) for p in s.encode(s.HelloReq())[0]), kind=FrameKind.POST)
    posted.assert_dropped()
    posted.close()
    kit.assert_healthy(daemon, baseline)


def test_flooding_client_does_not_starve_others(daemon: DaemonProcess, kit: Any) -> None:
    baseline = daemon.fd_count()
    with kit.raw(daemon.path) as flood, _good_client(kit, daemon) as good:
        flood.hello()
        assert flood.call(Op.GEM_CREATE, s.CreateReq(size=1 << 20)).status == 0
        data = b"f" * (1 << 20)
        pieces, _ = s.encode(s.PwriteReq(handle=1, length=len(data), data=data))
        frame = encode_header(24 + len(data), Op.GEM_PWRITE, 0, FrameKind.REQUEST, 4) + bytes(pieces[0]) + data
        flood.sock.setblocking(False)
        pending = memoryview(frame * 8)
        times: list[float] = []
        for _ in range(50):
            try:
                pending = pending[flood.sock.send(pending):] or memoryview(frame * 8)
            except BlockingIOError:
                pass
            times += _timed_requests(good, 2)
        assert max(times) < PROMPT_S, f"a well-behaved client waited {max(times) * 1000:.1f} ms behind a flood"
    kit.assert_healthy(daemon, baseline)


# -- no client touches another client's objects ------------------------------------------

def test_ids_are_per_client(daemon: DaemonProcess, kit: Any) -> None:
    baseline = daemon.fd_count()
    with daemon.connect() as victim, kit.raw(daemon.path) as raw:
        h = victim.create(8192)
        victim.pwrite(h, 0, b"precious")
        m = victim.mmap(h)
        raw.hello()
        for op, msg, code in ((Op.GEM_CLOSE, s.CloseReq(handle=h), errno.EINVAL),
                              (Op.GEM_INFO, s.InfoReq(handle=h), errno.ENOENT),
                              (Op.GEM_PWRITE, s.PwriteReq(handle=h, length=4, data=b"evil"), errno.ENOENT),
                              (Op.GEM_FLINK, s.FlinkReq(handle=h), errno.ENOENT),
                              (Op.GEM_MUNMAP, s.MunmapReq(ids=struct.pack("<I", 1)), errno.EINVAL),
                              (Op.XFER_DONE, s.XferDoneReq(xfer_id=1), errno.EINVAL)):
            assert raw.call(op, msg).status == code, op
        raw.assert_usable()
        assert victim.pread(h, 0, 8) == b"precious" == bytes(m[:8])
        assert victim.info(h).size == 8192
        del m
    kit.assert_healthy(daemon, baseline)


# -- fuzzing: anything after a valid HELLO --------------------------------------------------

_frames = st.builds(
    lambda op, nfds_claim, length_delta, payload: encode_header(
        max(0, len(payload) + length_delta), op, nfds_claim, FrameKind.REQUEST, 7) + payload,
    st.sampled_from([int(op) for op in Op] + [15, 0xFFFF]),
    st.sampled_from([0, 0, 0, 1]),
    st.sampled_from([0, 0, 0, -1, 1, 100]),
    st.binary(max_size=64),
)


def test_fuzz_after_hello(kit: Any) -> None:
    with run_daemon(env={**os.environ, **kit.WARNINGS_ENV}) as daemon, daemon.connect() as good:
        baseline = daemon.fd_count()

        @settings(max_examples=300, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow])
        @given(st.lists(st.one_of(st.binary(min_size=1, max_size=80), _frames), min_size=1, max_size=6))
        def run(chunks: list[bytes]) -> None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            with sock:
                sock.connect(daemon.path)
                sock.sendall(_hello_bytes())
                head = sock.recv(HEADER.size)
                assert HEADER.unpack(head)[5] == 0
                for chunk in chunks:
                    try:
                        sock.sendall(chunk)
                    except (BrokenPipeError, ConnectionResetError):
                        break  # dropped: fine
            t0 = time.perf_counter()
            assert good.stats()["clients"] >= 1
            assert time.perf_counter() - t0 < PROMPT_S, "the daemon answered a well-behaved client late"
            deadline = time.monotonic() + SAFETY_S
            while daemon.fd_count() != baseline:  # the fuzzing connection and all it held are gone
                assert time.monotonic() < deadline, f"daemon fds stuck at {daemon.fd_count()} (baseline {baseline})"
                time.sleep(0.002)
            assert good.stats()["objects"] == 0
            assert daemon.proc.poll() is None

        run()
        stats = good.stats()
        assert stats["objects"] == 0 and stats["clients"] == 1, stats
        assert daemon.fd_count() == baseline
        kit.assert_no_leak_warnings(daemon)
