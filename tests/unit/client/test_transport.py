"""SocketTransport against a scripted peer on a socketpair: what the client does with
replies a real daemon would only send when something is wrong (malformed, cut off), and
with replies in pieces arriving in awkward chunks. Real-daemon behaviour is tested in
tests/integration and tests/conformance.
"""

from __future__ import annotations

import errno
import socket
import threading
from collections.abc import Callable, Iterator

import pytest

import ugem
from ugem.client.device import Device
from ugem.client.transport import SocketTransport
from ugem.wire import structs as s
from ugem.wire import structs_exec as sx
from ugem.wire.frames import MAX_PAYLOAD, XFER_ABOVE, Frame, FrameKind, FrameParser, Op, encode_header

Script = Callable[[socket.socket, Callable[[], Frame]], None]


def _fixed(msg: s.Struct) -> bytes:
    return bytes(s.encode(msg)[0][0])


def _reply(frame: Frame, payload: bytes, kind: FrameKind = FrameKind.REPLY, seq: int | None = None) -> bytes:
    return encode_header(len(payload), frame.op, 0, kind, frame.seq if seq is None else seq) + payload


@pytest.fixture
def peer() -> Iterator[Callable[[Script], Device]]:
    """`peer(script, max_inline=...)`: a Device whose daemon is `script(sock, next_request)`,
    run in a thread after it answered HELLO (advertising `max_inline`)."""
    threads: list[threading.Thread] = []
    socks: list[socket.socket] = []
    devices: list[Device] = []

    def start(script: Script, max_inline: int = MAX_PAYLOAD) -> Device:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        socks.append(theirs)
        parser = FrameParser(FrameKind.REQUEST)

        def next_request() -> Frame:
            while (frame := parser.next_frame()) is None:
                data = theirs.recv(parser.bytes_desired())
                if not data:
                    raise EOFError
                parser.feed(data, [])
            return frame

        def run() -> None:
            hello = next_request()
            theirs.sendall(_reply(hello, _fixed(s.HelloReply(client_id=7, server_pid=1, max_payload=MAX_PAYLOAD,
                                                             max_inline=max_inline))))
            try:
                script(theirs, next_request)
                while theirs.recv(4096):  # like the daemon: serve until the client hangs up
                    pass
            except (EOFError, OSError):
                pass
            finally:
                theirs.close()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        threads.append(thread)
        dev = Device(SocketTransport(ours))
        devices.append(dev)
        return dev

    yield start
    for dev in devices:
        dev.close()
    for sock in socks:
        sock.close()
    for thread in threads:
        thread.join(60)


def _calls_after_loss_raise_daemon_gone(dev: Device) -> None:
    for call in (lambda: dev.info(1), dev.stats, lambda: dev.create(4096), lambda: dev.import_fd(0)):
        with pytest.raises(ugem.DaemonGone) as exc:
            call()
        assert isinstance(exc.value, ConnectionError) and exc.value.errno != errno.EBADF


def test_a_malformed_reply_loses_the_connection_and_every_later_call_is_daemon_gone(peer):
    def script(sock: socket.socket, next_request: Callable[[], Frame]) -> None:
        frame = next_request()
        sock.sendall(_reply(frame, b"", seq=frame.seq + 1))  # not the reply to this request
        next_request()

    dev = peer(script)
    with pytest.raises(ugem.DaemonGone, match="malformed reply header"):
        dev.busy(1)
    _calls_after_loss_raise_daemon_gone(dev)
    dev.close()  # still fine
    with pytest.raises(ugem.BadFd):
        dev.busy(1)


@pytest.mark.parametrize("case", ["error", "other seq", "other op", "fds announced", "reply"])
def test_a_reply_the_size_of_a_fixed_reply_is_taken_at_once_only_when_it_answers_this_call(peer, case):
    """The one-unpack path (header and fields of a fixed reply) checks what the general one does."""
    def script(sock: socket.socket, next_request: Callable[[], Frame]) -> None:
        frame = next_request()
        payload = _fixed(sx.BusyReply(busy=1)) if case == "reply" else b"gone bye"  # 8 bytes, as BusyReply
        seq, op = frame.seq + (case == "other seq"), frame.op + (case == "other op")
        sock.sendall(encode_header(len(payload), op, case == "fds announced", FrameKind.REPLY, seq,
                                   errno.ENOENT if case == "error" else 0) + payload)
        next_request()

    dev = peer(script)
    if case == "reply":
        assert dev.busy(1) is True
    elif case == "error":
        with pytest.raises(ugem.UgemError, match="gone bye") as exc:
            dev.busy(1)
        assert exc.value.errno == errno.ENOENT
    else:
        with pytest.raises(ugem.DaemonGone, match="malformed reply header"):
            dev.busy(1)


def test_a_daemon_that_hangs_up_makes_every_later_call_daemon_gone(peer):
    def script(sock: socket.socket, next_request: Callable[[], Frame]) -> None:
        next_request()
        sock.shutdown(socket.SHUT_RDWR)

    dev = peer(script)
    with pytest.raises(ugem.DaemonGone):
        dev.busy(1)
    _calls_after_loss_raise_daemon_gone(dev)


@pytest.mark.parametrize("chunk", [1, 7, 16, 17, 65536])
def test_a_reply_in_pieces_arrives_whole_however_it_is_cut(peer, chunk):
    payload = b'["' + b"x" * (2 * MAX_PAYLOAD + 12345) + b'"]'

    def script(sock: socket.socket, next_request: Callable[[], Frame]) -> None:
        frame = next_request()
        parts = [payload[i:i + MAX_PAYLOAD] for i in range(0, len(payload), MAX_PAYLOAD)]
        wire = b"".join(_reply(frame, p, FrameKind.REPLY if i == len(parts) - 1 else FrameKind.REPLY_MORE)
                        for i, p in enumerate(parts))
        start = wire[:20_000]  # in `chunk`-byte writes at the start, then in bulk
        for i in range(0, len(start), chunk):
            sock.sendall(start[i:i + chunk])
        boundary = len(_reply(frame, parts[0], FrameKind.REPLY_MORE))  # the second header, cut in two
        sock.sendall(wire[20_000:boundary + 5])
        sock.sendall(wire[boundary + 5:boundary + 11])
        sock.sendall(wire[boundary + 11:])
        frame = next_request()
        sock.sendall(_reply(frame, _fixed(s.FlinkReply(name=5))))

    dev = peer(script)
    assert dev.list_objects() == [payload[2:-2].decode()]
    assert dev.flink(1) == 5  # the connection is in step afterwards


@pytest.mark.parametrize("bad", ["seq", "op", "status", "too-long"])
def test_a_malformed_piece_loses_the_connection(peer, bad):
    def script(sock: socket.socket, next_request: Callable[[], Frame]) -> None:
        frame = next_request()
        sock.sendall(_reply(frame, b"x" * 10, FrameKind.REPLY_MORE))
        header = {"seq": (10, frame.op, FrameKind.REPLY, frame.seq + 1, 0),
                  "op": (10, frame.op + 1, FrameKind.REPLY, frame.seq, 0),
                  "status": (10, frame.op, FrameKind.REPLY_MORE, frame.seq, 5),
                  "too-long": (MAX_PAYLOAD + 1, frame.op, FrameKind.REPLY, frame.seq, 0)}[bad]
        length, op, kind, seq, status = header
        sock.sendall(encode_header(length, op, 0, kind, seq, status) + b"y" * 10)
        next_request()

    dev = peer(script)
    with pytest.raises(ugem.DaemonGone, match="malformed reply piece"):
        dev.list_objects()
    _calls_after_loss_raise_daemon_gone(dev)


@pytest.mark.parametrize("max_inline", [4096, MAX_PAYLOAD])
def test_pread_and_pwrite_inline_only_up_to_what_the_daemon_advertises(peer, max_inline):
    """HELLO's max_inline caps what the client sends inside a frame; beyond it (or beyond
    XFER_ABOVE, where XFER is faster) pread and pwrite ask for XFER (and TAKES_FD where the
    client may copy the daemon's fds)."""
    limit = min(max_inline, XFER_ABOVE)
    seen: list[tuple[str, int, int]] = []  # (op, flags, inline bytes)

    def script(sock: socket.socket, next_request: Callable[[], Frame]) -> None:
        for _ in range(4):
            frame = next_request()
            if frame.op == Op.GEM_PWRITE:
                req = s.decode(s.PwriteReq, frame.payload, [])
                seen.append(("pwrite", req.flags, len(req.data)))
                sock.sendall(_reply(frame, _fixed(s.PwriteReply())))  # no fd: nothing to copy
            else:
                req = s.decode(s.PreadReq, frame.payload, [])
                seen.append(("pread", req.flags, req.length))
                reply = s.PreadReply(data=bytes(req.length)) if not req.flags else s.PreadReply()
                sock.sendall(_reply(frame, b"".join(bytes(p) for p in s.encode(reply)[0])))

    dev = peer(script, max_inline=max_inline)
    dev.pwrite(1, 0, bytes(limit))
    dev.pwrite(1, 0, bytes(limit + 1))
    assert dev.pread(1, 0, limit) == bytes(limit)
    assert dev.pread(1, 0, limit + 1) == bytes(limit + 1)  # no pages: zeros without a copy
    takes = dev._take_flag()  # bulk transfers ask TAKES_FD where this process may copy the peer's fds
    assert seen == [("pwrite", 0, limit), ("pwrite", s.XFER | takes, 0), ("pread", 0, limit),
                    ("pread", s.XFER | takes, limit + 1)]
