"""Transports: how a Device's requests reach the dispatcher.

- `EmbeddedTransport` (client/embedded.py): calls `dispatch()` in this process, under the
  Manager's lock.
- `SocketTransport` (here): one Unix stream socket to `ugem serve`; frames as in
  wire/frames.py, fds with SCM_RIGHTS, one request in flight at a time (a lock serialises
  threads). A call of a fixed-size request (no fds, no notes) costs one send and one recv
  when its whole reply arrives in one read, and one pack and one unpack (`Struct._framed`).
  While replies come soon, the first read of each checks for a moment before it sleeps
  (busy polling, ugem/spin.py; not with a timeout armed).
  Requests posted without waiting for their replies, on the socket or on its lazy channel:
  client/posting.py.

Both take ownership of the fds inside a request struct: they are closed once sent (socket)
or consumed by the handler (embedded). Exceptions are translated at one seam on the socket
side: `error_from_errno` for a failed reply, `DaemonGone` when the daemon goes away.
Once an exchange fails (the daemon closed the connection, a malformed reply, a socket
error) the socket is closed, and that call and every later one raise `DaemonGone`.

Fork safety (ForkedTransport, track_for_fork) is in client/fork.py.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Sequence
from functools import partial
from typing import Any, NoReturn

from ..core.requests import REQUESTS
from ..errors import BadFd, DaemonGone, RemoteProtocolError, TimedOut, TooBig, UgemError, error_from_errno
from ..fd import OwnedFd
from ..scm import ANC_SPACE, fds_from_ancillary, rights
from ..spin import BusyPoll
from ..wire import structs as s
from ..wire.frames import HEADER, MAGIC, MAX_PAYLOAD, PROTOCOL_VERSION, XFER_ABOVE, FrameKind, Op, encode_header
from ..wire.structs_share import SHARE_BATCH_RECORD
from .lazy import LazyEnd
from .posting import Posting

__all__ = ["SocketTransport"]


_FIRST_READ = 65536
_JOINED = 4096  # a request's tail up to this long is joined to its fixed part (one send, not sendmsg)
_DONTWAIT = int(socket.MSG_DONTWAIT)
_CTRUNC = int(socket.MSG_CTRUNC)  # plain ints: enum flag arithmetic costs ~0.5 us per request
_CLOEXEC = int(socket.MSG_CMSG_CLOEXEC)
_CLOEXEC_DONTWAIT = _CLOEXEC | _DONTWAIT  # (checked while busy polling: once, not per check)
_REPLY = int(FrameKind.REPLY)
_REPLY_MORE = int(FrameKind.REPLY_MORE)
_PIECE_READ = 1 << 20
_WAITS = frozenset({Op.GEM_WAIT, Op.WAIT_FENCE})  # calls whose own timeout adds to the budget
_FOREVER = 1e9  # seconds: a longer budget (a wait of decades) is no deadline at all
_CLOSE_WAIT = 30.0  # seconds close() waits for the daemon to release the client
_REPLY_TYPES: dict[int, type[s.Struct]] = {Op.HELLO: s.HelloReply, Op.LAZY_CHANNEL: s.Empty,
                                         **{d.op: d.reply for d in REQUESTS}}
_REQUEST = int(FrameKind.REQUEST)
_POST = int(FrameKind.POST)
_HEADER_SIZE = HEADER.size
_pack_header = HEADER.pack
_unpack_header = HEADER.unpack_from
_NO_FDS: tuple[OwnedFd, ...] = ()
_SHARE_SIZE = SHARE_BATCH_RECORD.size


class SocketTransport(Posting):
    """One connection to the daemon. `timeout` (seconds, or None to wait like an ioctl):
    a call whose reply has not arrived that long after it started (plus the call's own
    timeout for GEM_WAIT/WAIT_FENCE; a negative one waits for ever) raises TimedOut and
    closes the connection, since a late reply would answer the wrong request. With None
    the socket stays blocking and a call costs no syscall beyond its send and receive."""

    embedded = False

    def __init__(self, sock: socket.socket, *, timeout: float | None = None, path: str = "") -> None:
        self._sock = sock
        self._lock = threading.Lock()
        self.server_pid = 0
        self._spin = BusyPoll(lambda: self.server_pid or None)
        self._seq = 0
        self._gone = "the ugem daemon closed the connection"  # why, once the connection is lost
        self._path = path or "its socket"
        self.path = path  # the socket path it was connected through ("" if not known)
        self._timeout = timeout
        self._budget: float | None = sock.gettimeout()  # the socket's timeout for the call in flight
        self._armed: float | None = None  # the budget the call in flight started with
        self._deadline = 0.0
        self._timed_out = False
        self._owed: list[tuple[int, int]] = []  # (op, seq) of posted requests whose replies are unread
        self._unread = 0  # frames (a share batch's shares) sent since the last reply read, maybe not served
        self._lazy: LazyEnd | None = None  # the lazy channel (client/lazy.py), once open
        self._lazy_tried = False
        hello: s.HelloReply = self.call(Op.HELLO, s.HelloReq(magic=MAGIC, version=PROTOCOL_VERSION))
        if hello.magic != MAGIC or hello.version != PROTOCOL_VERSION:
            raise RemoteProtocolError(f"daemon speaks {hello.magic!r} version {hello.version}")
        self.client_id = hello.client_id
        self.server_pid = hello.server_pid
        self.max_inline = hello.max_inline
        self.inline_limit = min(XFER_ABOVE, hello.max_inline)  # what the daemon takes inline, at most

    def call(self, op: Op, req: s.Struct, notes: Sequence[tuple[Op, s.Struct]] = (), **local: Any) -> Any:
        """One request and its reply. `notes` (releases: no fds, each fits a frame) go first,
        as POST frames (wire/frames.py), in the same write when the request has no fds: they
        cost no round trip and no reply of their own; their failures (ids already gone) are
        nobody's to see. `local` is never sent: a Device passes the caller's own memory only
        to an embedded transport."""
        reply_type = _REPLY_TYPES[op]
        fds: Sequence[OwnedFd] = _NO_FDS
        pieces: list[Any] = []  # none for a fixed struct (most requests): its frame is packed whole below
        if not req._plain:
            pieces, fds = s.encode(req)
            if len(pieces) > 1 and sum(memoryview(p).nbytes for p in pieces) > MAX_PAYLOAD:
                for fd in fds:
                    fd.close()
                raise TooBig(f"{op.name} request of {sum(memoryview(p).nbytes for p in pieces)} bytes does not "
                             f"fit in one frame (at most {MAX_PAYLOAD}); nothing was sent")
        with self._lock:
            try:
                if self._timeout is not None:
                    self._arm(op, req)
                if notes and len(pieces) <= 1 and not fds:  # one write: the posts, then the request
                    self._send_posts([*notes, (op, req)], last_wants_reply=True, encoded=pieces[0] if pieces else None)
                    self._owed.pop()  # (its reply is read here, not skipped)
                else:
                    if notes:
                        self._send_posts(notes)
                    self._seq = (self._seq + 1) & 0xFFFFFFFF
                    if pieces:
                        self._send(op, pieces, fds)
                    else:  # header and fields in one pack, one send
                        cls = req.__class__
                        data = cls._framed.pack(cls._codec.size, op, 0, _REQUEST, self._seq, 0, *cls._values(req))
                        sent = self._sock.send(data)
                        if sent < len(data):
                            self._sock.sendall(data[sent:])
                if self._owed:
                    self._skip_owed()
                self._unread = 0  # this reply comes after everything sent before it is served
                if reply_type.FDS:
                    status, payload, got = self._receive(op, True, b"")
                else:
                    buf = self._first_read()
                    if reply_type._plain and len(buf) == reply_type._framed.size:
                        # the common case: the whole reply of a fixed struct in one read, unpacked in one call
                        values = reply_type._framed.unpack(buf)
                        if values[4] == self._seq and values[1] == op and values[3] == _REPLY \
                                and not values[2] and not values[5] and values[0] == reply_type._codec.size:
                            return reply_type(*values[6:])
                    status, payload, got = self._receive(op, False, buf)
            except DaemonGone:  # from _abort: the socket is closed already
                raise
            except TimeoutError as exc:  # socket.timeout: only with a timeout
                raise self._expired(op) from exc
            except OSError as exc:
                raise self._lost(exc) from exc
            finally:
                for fd in fds:
                    fd.close()
        if status:
            for fd in got:
                fd.close()
            raise error_from_errno(status, payload.decode("utf-8", "replace"))
        if reply_type._plain and len(payload) == reply_type._codec.size:
            return reply_type(*reply_type._codec.unpack(payload))
        try:
            return s.decode(reply_type, payload, list(got))
        except BaseException:
            for fd in got:
                fd.close()
            raise

    def _first_read(self) -> bytes:
        """The first read of a reply: busy polling first (ugem/spin.py), not with a timeout armed."""
        if self._budget is not None:
            return self._sock.recv(_FIRST_READ)
        return self._spin.check(self._try_read) or self._spin.sleep(self._sock.recv, _FIRST_READ)

    def _try_read(self) -> bytes | None:
        try:
            return self._sock.recv(_FIRST_READ, _DONTWAIT)
        except BlockingIOError:
            return None

    def _recvmsg(self, space: int) -> tuple[bytes, list[Any], int, Any]:
        return self._sock.recvmsg(_FIRST_READ, space, _CLOEXEC)

    def _try_recvmsg(self, space: int) -> tuple[bytes, list[Any], int, Any] | None:
        try:
            return self._sock.recvmsg(_FIRST_READ, space, _CLOEXEC_DONTWAIT)
        except BlockingIOError:
            return None

    def _arm(self, op: Op, req: Any) -> None:
        """Start the clock of one call: the socket's timeout is its whole budget."""
        budget: float | None = self._timeout
        if op in _WAITS:
            budget = None if req.timeout_ns < 0 or budget is None else budget + req.timeout_ns / 1e9
        if budget is not None and budget > _FOREVER:
            budget = None
        if budget != self._budget:  # a syscall only when the budget changes (wait, or a re-arm)
            self._sock.settimeout(budget)
            self._budget = budget
        self._armed = budget
        if budget is not None:
            self._deadline = time.monotonic() + budget

    def _rearm(self) -> None:
        """Before reading again within one call: what is left of its budget."""
        if self._budget is not None:
            left = self._deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self._sock.settimeout(left)
            self._budget = left

    def _expired(self, op: Op) -> UgemError:
        """No reply within the budget: the connection is out of step for good, close it."""
        self._sock.close()
        self._timed_out = True
        self._gone = f"a call got no reply from the ugem daemon at {self._path} within its timeout"
        return TimedOut(f"no reply from the ugem daemon at {self._path} within {self._armed or 0:g} s "
                        f"({op.name}); the connection is closed: connect again")

    def _send(self, op: int, pieces: list[Any], fds: Sequence[OwnedFd]) -> None:
        if not fds and (len(pieces) == 1 or (len(pieces) == 2 and pieces[1].__class__ is bytes
                                            and len(pieces[1]) <= _JOINED)):  # small, no fds: one plain send
            payload = pieces[0] if len(pieces) == 1 else b"".join(pieces)
            data = _pack_header(len(payload), op, 0, _REQUEST, self._seq, 0) + payload
            sent = self._sock.send(data)
            if sent < len(data):
                self._sock.sendall(data[sent:])
            return
        length = sum(len(p) if not isinstance(p, memoryview) else p.nbytes for p in pieces)
        header = encode_header(length, op, len(fds), FrameKind.REQUEST, self._seq)
        buffers = [header, *pieces]
        total = len(header) + length
        sent = self._sock.sendmsg(buffers, rights(fds))
        if sent < total:  # the rest without the fds (they went with the first byte)
            data = b"".join(bytes(b) for b in buffers)
            self._sock.sendall(data[sent:])

    def _read_exactly(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            if buf:
                self._rearm()
            data = self._sock.recv(n - len(buf))
            if not data:
                self._abort([], "")
            buf += data
        return bytes(buf)

    def _receive(self, op: int, with_fds: bool, buf: bytes) -> tuple[int, bytes, Sequence[OwnedFd]]:
        # One request is in flight, so nothing but its reply can arrive: read greedily.
        # A reply that carries no fds is read without ancillary space (`buf`: the caller's
        # first read of it): fds the daemon sent anyway would be discarded (and closed) by
        # the kernel, with MSG_CTRUNC set. A reply that may carry fds starts with `buf` empty.
        # MSG_CMSG_CLOEXEC: fds handed to the caller (export) are O_CLOEXEC, as in embedded mode.
        fds: list[OwnedFd] = []
        if not with_fds:
            if len(buf) >= _HEADER_SIZE:  # the common case: the whole reply in one read, checked here
                length, rop, nfds, kind, seq, status = _unpack_header(buf)
                if length + _HEADER_SIZE == len(buf) and kind == _REPLY and rop == op and seq == self._seq \
                        and not nfds:
                    return status, buf[_HEADER_SIZE:], _NO_FDS
            elif not buf:
                self._abort(fds, "")
        while len(buf) < HEADER.size:
            if buf:  # not the call's first read
                self._rearm()
            space = ANC_SPACE if with_fds and not buf else 0
            if buf or self._budget is not None:
                data, anc, flags, _ = self._sock.recvmsg(_FIRST_READ, space, _CLOEXEC)
            else:  # the call's first read: busy polling first (ugem/spin.py)
                data, anc, flags, _ = self._spin.check(partial(self._try_recvmsg, space)) \
                    or self._spin.sleep(self._recvmsg, space)
            if anc:
                fds.extend(fds_from_ancillary(anc))
            if flags & _CTRUNC:
                self._abort(fds, "truncated control message from the daemon")
            if not data:
                self._abort(fds, "")
            buf += data
        length, rop, nfds, kind, seq, status = HEADER.unpack_from(buf)
        if kind == _REPLY_MORE and not fds:
            return self._receive_pieces(op, bytearray(buf))
        if kind != _REPLY or rop != op or seq != self._seq or length > MAX_PAYLOAD or nfds != len(fds) \
                or len(buf) > HEADER.size + length:
            self._abort(fds, f"malformed reply header from the daemon: {HEADER.unpack_from(buf)}")
        if len(buf) == HEADER.size + length:
            return status, buf[HEADER.size:], fds
        payload = bytearray(length)
        view = memoryview(payload)
        got = len(buf) - HEADER.size
        view[:got] = buf[HEADER.size:]
        while got < length:
            self._rearm()
            n = self._sock.recv_into(view[got:])
            if n == 0:
                self._abort(fds, "")
            got += n
        return status, bytes(payload), fds

    def _receive_pieces(self, op: int, buf: bytearray) -> tuple[int, bytes, list[OwnedFd]]:
        """A reply too big for one frame: REPLY_MORE pieces, then a REPLY frame
        (wire/frames.py); returns the reassembled payload. `buf` holds what was read."""
        parts: list[bytes] = []
        while True:
            while len(buf) < HEADER.size:
                self._read_more(buf)
            length, rop, nfds, kind, seq, status = HEADER.unpack_from(buf)
            if kind not in (_REPLY, _REPLY_MORE) or rop != op or seq != self._seq or length > MAX_PAYLOAD or nfds \
                    or (kind == _REPLY_MORE and status):
                self._abort([], f"malformed reply piece header from the daemon: {HEADER.unpack_from(buf)}")
            while len(buf) < HEADER.size + length:
                self._read_more(buf)
            parts.append(bytes(buf[HEADER.size:HEADER.size + length]))
            del buf[:HEADER.size + length]
            if kind == _REPLY:
                if buf:
                    self._abort([], f"{len(buf)} bytes from the daemon after the last piece of a reply")
                return status, b"".join(parts), []

    def _read_more(self, buf: bytearray) -> None:
        """Append what the socket has (the rest of a reply in pieces; it carries no fds)."""
        self._rearm()
        data = self._sock.recv(_PIECE_READ)
        if not data:
            self._abort([], "")
        buf += data

    def _abort(self, fds: list[OwnedFd], why: str) -> NoReturn:
        for fd in fds:
            fd.close()
        self._sock.close()
        if why:
            self._gone = why
            raise DaemonGone(why) from RemoteProtocolError(why)
        raise DaemonGone(self._gone)

    def _lost(self, exc: OSError) -> OSError:
        """The exchange failed: the connection is out of step for good, so it is closed
        and this and every later call raise DaemonGone (a later call finds the socket
        closed: EBADF, which is turned into DaemonGone here too, never raised bare), or
        EBADF after a timeout closed it (the Device is closed then)."""
        if self._sock.fileno() < 0:  # an earlier call lost the connection
            if self._timed_out:
                return BadFd(f"the connection was closed: {self._gone}")
            return DaemonGone(f"{self._gone} (an earlier call lost the connection; connect again)")
        self._sock.close()
        if not isinstance(exc, ConnectionError):
            self._gone = f"the connection to the ugem daemon failed: {exc}"
        return DaemonGone(self._gone)

    @property
    def lost(self) -> bool:
        """The connection is gone (the daemon went away, or a timeout closed it)."""
        return self._sock.fileno() < 0

    def forsake(self) -> None:
        """In a forked child: close this process's copy of the socket, nothing else (no
        shutdown, which would end the parent's connection; its lock may be held forever)."""
        self._sock.close()
        if self._lazy is not None:
            self._lazy.close()

    def peer(self) -> tuple[int, int]:
        """(pid, uid) of the daemon process, as the kernel saw it connect (SO_PEERCRED)."""
        pid, uid, _ = struct.unpack("3i", self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        return pid, uid

    def fileno(self) -> int:
        """The connection's socket (for polling only: reading it would steal replies)."""
        return self._sock.fileno()

    def close(self) -> None:
        """Disconnect and wait until the daemon has released this client (it closes its end)."""
        with self._lock:
            if self._sock.fileno() < 0:
                return
            try:
                self._sock.shutdown(socket.SHUT_WR)
                self._sock.settimeout(_CLOSE_WAIT if self._timeout is None else min(_CLOSE_WAIT, self._timeout))
                while self._sock.recv(4096):
                    pass
            except OSError:
                pass  # the daemon is already gone: nothing left to release
            finally:
                self._sock.close()
                if self._lazy is not None:
                    self._lazy.close()
