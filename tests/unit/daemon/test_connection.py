"""Connection (daemon/connection.py) over a socketpair, with a real Core: how a request that
runs straight through `dispatch()` (a fixed struct of a row that takes no Call) fails, waits
and goes on."""

from __future__ import annotations

import dataclasses
import errno
import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from ugem.backing.memfd import MemfdStore
from ugem.config import Config
from ugem.core.client import Credentials
from ugem.core.core import Core
from ugem.core.jobs import Pending
from ugem.daemon import connection as conn_mod
from ugem.daemon.connection import Connection
from ugem.testing.fake_gpu import FakeGpu
from ugem.wire import structs as s
from ugem.wire.codec import decode, encode
from ugem.wire.frames import HEADER, FrameKind, Op, encode_header


class Peer:
    """The client's end: sends requests, reads one reply each (status, payload)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.seq = 0

    def send(self, op: Op, req: s.Struct) -> None:
        pieces, fds = encode(req)
        assert not fds
        payload = b"".join(bytes(p) for p in pieces)
        self.seq += 1
        self.sock.sendall(encode_header(len(payload), op, 0, FrameKind.REQUEST, self.seq) + payload)

    def reply(self) -> tuple[int, bytes]:
        header = self._exactly(HEADER.size)
        length, _op, _nfds, kind, seq, status = HEADER.unpack(header)
        assert kind == FrameKind.REPLY and seq == self.seq
        return status, self._exactly(length)

    def _exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            assert chunk, "the daemon's end closed the connection"
            data += chunk
        return data


@pytest.fixture
def wired(tmp_path: Any) -> Iterator[tuple[Connection, Peer, Core]]:
    gpu = FakeGpu()
    spill = str(tmp_path / "spill")
    core = Core(Config.from_kwargs(system_budget="64M", spill_dir=spill), MemfdStore(spill), gpu)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setblocking(False)
    client = core.client_open(Credentials(os.getpid(), os.getuid(), os.getgid()), True, admit=False)
    conn = Connection(ours, core, client)
    peer = Peer(theirs)
    peer.send(Op.HELLO, s.HelloReq())
    conn.on_readable()
    assert peer.reply()[0] == 0
    try:
        yield conn, peer, core
    finally:
        conn.close()
        theirs.close()
        gpu.close()
        core.backing.close()


def _create(conn: Connection, peer: Peer) -> int:
    peer.send(Op.GEM_CREATE, s.CreateReq(size=4096))
    conn.on_readable()
    status, payload = peer.reply()
    assert status == 0
    reply: s.CreateReply = decode(s.CreateReply, payload, [])
    return reply.handle


def _replace_handler(monkeypatch: pytest.MonkeyPatch, op: Op, handler: Any) -> None:
    row, req_type, size, unpack = conn_mod._FIXED[op]
    monkeypatch.setitem(conn_mod._FIXED, op, (dataclasses.replace(row, handler=handler), req_type, size, unpack))


def test_a_handler_bug_is_answered_eio_and_the_connection_goes_on(
        wired: tuple[Connection, Peer, Core], monkeypatch: pytest.MonkeyPatch) -> None:
    conn, peer, _ = wired
    handle = _create(conn, peer)

    def broken(core: Core, client: Any, req: Any) -> Any:
        raise RuntimeError("a bug")

    _replace_handler(monkeypatch, Op.GEM_BUSY, broken)
    peer.send(Op.GEM_BUSY, s.HandleReq(handle=handle))
    conn.on_readable()
    status, payload = peer.reply()
    assert status == errno.EIO and b"internal error in GEM_BUSY" in payload
    monkeypatch.undo()
    peer.send(Op.GEM_INFO, s.InfoReq(handle=handle))
    conn.on_readable()
    assert peer.reply()[0] == 0


def test_an_operation_failure_is_its_errno(wired: tuple[Connection, Peer, Core]) -> None:
    conn, peer, _ = wired
    peer.send(Op.GEM_INFO, s.InfoReq(handle=77))
    conn.on_readable()
    status, payload = peer.reply()
    assert status == errno.ENOENT and b"77" in payload


def test_a_request_that_must_wait_is_parked_as_a_call_and_answered_when_stepped_again(
        wired: tuple[Connection, Peer, Core], monkeypatch: pytest.MonkeyPatch) -> None:
    conn, peer, core = wired
    handle = _create(conn, peer)
    runs: list[int] = []
    real = conn_mod._FIXED[Op.GEM_INFO][0].handler

    def waits_once(core: Core, client: Any, req: Any) -> Any:
        runs.append(req.handle)
        if len(runs) == 1:
            raise Pending(fence=0)
        return real(core, client, req)

    _replace_handler(monkeypatch, Op.GEM_INFO, waits_once)
    peer.send(Op.GEM_INFO, s.InfoReq(handle=handle))
    conn.on_readable()
    assert conn.parked is not None
    frame, call = conn.parked
    assert call.pending is not None and call.desc.op == Op.GEM_INFO and call.req.handle == handle
    assert call.ready(core, 0.0)  # nothing to wait for: the server would step it again now
    conn.resume()
    assert conn.parked is None and runs == [handle, handle]
    status, payload = peer.reply()
    assert status == 0 and decode(s.InfoReply, payload, []).size == 4096
