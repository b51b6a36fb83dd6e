"""Transports: how a Device's requests reach the dispatcher.

- `EmbeddedTransport`: calls `dispatch()` in this process, under the Manager's lock.
- `SocketTransport`: one Unix stream socket to `ugem serve`; frames as in wire/frames.py,
  fds with SCM_RIGHTS, one request in flight at a time (a lock serialises threads).

Both take ownership of the fds inside a request struct: they are closed once sent (socket)
or consumed by the handler (embedded). Exceptions are translated at one seam on the socket
side: `error_from_errno` for a failed reply, `DaemonGone` when the daemon goes away.
Once an exchange fails (the daemon closed the connection, a malformed reply, a socket
error) the socket is closed, and that call and every later one raise `DaemonGone`.

Fork: a connection (or an embedded client) belongs to the process that made it. Devices
register with `track_for_fork`; in a forked child, `os.register_at_fork` swaps each one's
transport for a `ForkedTransport` whose every call is EBADF telling to connect again. The
child closes its copy of the socket fd (a plain close, never shutdown: the parent's
connection is untouched) and never sends, reads or waits on it; finalizers there (mapping
and Buffer release) only queue, and nothing is ever flushed. No cost per call.
"""

from __future__ import annotations

import array
import os
import socket
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

from ..core.requests import REQUESTS
from ..errors import BadFd, DaemonGone, RemoteProtocolError, TimedOut, TooBig, UgemError, error_from_errno
from ..fd import OwnedFd, fds_from_ancillary
from ..wire import structs as s
from ..wire.frames import HEADER, MAGIC, MAX_FDS, MAX_PAYLOAD, PROTOCOL_VERSION, Kind, Op, encode_header

if TYPE_CHECKING:
    from ..core.client import Client
    from ..manager import Manager

__all__ = ["EmbeddedTransport", "ForkedTransport", "SocketTransport", "track_for_fork"]


class EmbeddedTransport:
    embedded = True
    lost = False  # no daemon to lose

    def __init__(self, manager: Manager, client: Client) -> None:
        self.manager = manager
        self.client = client
        self.client_id = client.id

    def call(self, op: Op, req: s.Struct, **local: Any) -> Any:
        """`local`: the caller's own memory for the request (pread `into`, userptr `buffer`)."""
        return self.manager._call(self.client, op, req, **local)

    def close(self) -> None:
        self.manager._release(self.client)

    def forsake(self) -> None:
        """In a forked child: let go without touching the manager (its Manager is dead
        there too, manager.py)."""


class ForkedTransport:
    """A Device's transport in a forked child of the process that made it: every call is
    EBADF, at once; closing does nothing (the parent's connection is not the child's)."""

    lost = False

    def __init__(self, embedded: bool, client_id: int, parent_pid: int) -> None:
        self.embedded = embedded
        self.client_id = client_id
        self._message = (f"this Device was made by process {parent_pid} and cannot be used in its forked child "
                         f"(process {os.getpid()}): connect again in the child (ugem.connect(), or ugem.embedded() "
                         f"for a manager of its own)")

    def call(self, op: Op, req: s.Struct, **local: Any) -> Any:
        for name in req.FDS:  # a request's fds are the transport's to close, as in the others
            fd = getattr(req, name)
            if isinstance(fd, OwnedFd):
                fd.close()
        raise BadFd(self._message)

    def close(self) -> None:
        pass

    def forsake(self) -> None:
        pass


class _ForkAware(Protocol):
    def _after_fork_in_child(self) -> None: ...


_TRACKED: weakref.WeakSet[_ForkAware] = weakref.WeakSet()


def track_for_fork(obj: _ForkAware) -> None:
    """Call `obj._after_fork_in_child()` in every forked child while `obj` lives."""
    _TRACKED.add(obj)


def _after_fork_in_child() -> None:
    for obj in list(_TRACKED):
        obj._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)


_ANC_SPACE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
_FIRST_READ = 65536
_CTRUNC = int(socket.MSG_CTRUNC)  # plain ints: enum flag arithmetic costs ~0.5 us per request
_CLOEXEC = int(socket.MSG_CMSG_CLOEXEC)
_REPLY = int(Kind.REPLY)
_REPLY_MORE = int(Kind.REPLY_MORE)
_PIECE_READ = 1 << 20
_WAITS = frozenset({Op.GEM_WAIT, Op.WAIT_FENCE})  # calls whose own timeout adds to the budget
_FOREVER = 1e9  # seconds: a longer budget (a wait of decades) is no deadline at all
_CLOSE_WAIT = 30.0  # seconds close() waits for the daemon to release the client
_REPLY_TYPES: dict[int, type[s.Struct]] = {Op.HELLO: s.HelloReply, **{d.op: d.reply for d in REQUESTS}}


class SocketTransport:
    """One connection to the daemon. `timeout` (seconds, or None to wait like an ioctl):
    a call whose reply has not arrived that long after it started (plus the call's own
    timeout for GEM_WAIT/WAIT_FENCE; a negative one waits for ever) raises TimedOut and
    closes the connection, since a late reply would answer the wrong request. With None
    the socket stays blocking and a call costs no syscall beyond its send and receive."""

    embedded = False

    def __init__(self, sock: socket.socket, *, timeout: float | None = None, path: str = "") -> None:
        self._sock = sock
        self._lock = threading.Lock()
        self._seq = 0
        self._gone = "the ugem daemon closed the connection"  # why, once the connection is lost
        self._path = path or "its socket"
        self.path = path  # the socket path it was connected through ("" if not known)
        self._timeout = timeout
        self._budget: float | None = sock.gettimeout()  # the socket's timeout for the call in flight
        self._armed: float | None = None  # the budget the call in flight started with
        self._deadline = 0.0
        self._timed_out = False
        hello: s.HelloReply = self.call(Op.HELLO, s.HelloReq(magic=MAGIC, version=PROTOCOL_VERSION))
        if hello.magic != MAGIC or hello.version != PROTOCOL_VERSION:
            raise RemoteProtocolError(f"daemon speaks {hello.magic!r} version {hello.version}")
        self.client_id = hello.client_id
        self.server_pid = hello.server_pid
        self.max_inline = hello.max_inline

    def call(self, op: Op, req: s.Struct, **local: Any) -> Any:
        """`local` is never sent: a Device passes the caller's own memory only to an
        embedded transport."""
        reply_type = _REPLY_TYPES[op]
        pieces, fds = s.encode(req)
        if len(pieces) > 1 and sum(memoryview(p).nbytes for p in pieces) > MAX_PAYLOAD:
            for fd in fds:
                fd.close()
            raise TooBig(f"{op.name} request of {sum(memoryview(p).nbytes for p in pieces)} bytes does not fit "
                         f"in one frame (at most {MAX_PAYLOAD}); nothing was sent")
        with self._lock:
            try:
                if self._timeout is not None:
                    self._arm(op, req)
                self._seq = (self._seq + 1) & 0xFFFFFFFF
                self._send(op, pieces, fds)
                status, payload, got = self._receive(op, bool(reply_type.FDS))
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
            return s.decode(reply_type, payload, got)
        except BaseException:
            for fd in got:
                fd.close()
            raise

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

    def _send(self, op: int, pieces: list[Any], fds: list[OwnedFd]) -> None:
        if len(pieces) == 1 and not fds:  # a small fixed struct: one plain send
            data = encode_header(len(pieces[0]), op, 0, Kind.REQUEST, self._seq) + pieces[0]
            sent = self._sock.send(data)
            if sent < len(data):
                self._sock.sendall(data[sent:])
            return
        length = sum(len(p) if not isinstance(p, memoryview) else p.nbytes for p in pieces)
        header = encode_header(length, op, len(fds), Kind.REQUEST, self._seq)
        buffers = [header, *pieces]
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [f.fd for f in fds]))] if fds else []
        total = len(header) + length
        sent = self._sock.sendmsg(buffers, anc)
        if sent < total:  # the rest without the fds (they went with the first byte)
            data = b"".join(bytes(b) for b in buffers)
            self._sock.sendall(data[sent:])

    def _receive(self, op: int, with_fds: bool) -> tuple[int, bytes, list[OwnedFd]]:
        # One request is in flight, so nothing but its reply can arrive: read greedily.
        # A reply that carries no fds is read without ancillary space: fds the daemon sent
        # anyway would be discarded (and closed) by the kernel, with MSG_CTRUNC set.
        # MSG_CMSG_CLOEXEC: fds handed to the caller (export) are O_CLOEXEC, as in embedded mode.
        buf = b""
        fds: list[OwnedFd] = []
        if not with_fds:
            buf = self._sock.recv(_FIRST_READ)
            if not buf:
                self._abort(fds, "")
        while len(buf) < HEADER.size:
            if buf:  # not the call's first read
                self._rearm()
            data, anc, flags, _ = self._sock.recvmsg(_FIRST_READ, _ANC_SPACE if with_fds and not buf else 0,
                                                     _CLOEXEC)
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
