"""A connection's lazy channel, the daemon's end: posts that need no prompt service, read
without being woken (client/lazy.py says what goes there and why).

Rules:
- a client hands its end over with LAZY_CHANNEL (connection-level, as HELLO: a REQUEST
  after HELLO carrying one fd, no payload), once per connection; the fd must be a Unix
  stream socket (else EINVAL, the fd closed, the connection kept; one not connected ends
  at its first read), and a second one is EINVAL. It costs the daemon one fd while the
  connection lasts;
- the daemon never polls it. It reads it (non-blocking, at most READ_LIMIT bytes a time,
  and only while fewer than LAZY_BURST of its frames wait) only: before serving each frame
  of the connection, whose frames numbered before that frame's are served first; once a
  second (`serve_lazy`), where its frames are served once the connection has nothing
  unread or waiting; and when the connection ends, where what had arrived is served
  (unanswered) before the client is released: a worker killed right after writing its
  claims leaves no share held;
- fairness: a connection serves at most LAZY_BURST lazy frames a turn; past that it is
  `behind`, and the server comes back to it (`serve_lazy`) after one turn of the others,
  as a connection's own frames are read at most _BURST bytes a wake-up;
- frame numbers (`seq`) come from one counter per client across both channels, in the
  order the client wrote them, so serving the lower first keeps the client's order
  (compared modulo 2**32);
- what may come on it: POST frames without fds, of any op but HELLO and LAZY_CHANNEL,
  served exactly as on the connection (same table, same checks, no reply). A REQUEST
  frame, an fd (the read has no room for one: the kernel sets MSG_CTRUNC), a bad header
  or an oversized frame drops the connection, as on the connection itself. Its end of
  file or a read error ends the channel only (what had arrived is still served).
"""

from __future__ import annotations

import errno
import socket
from collections import deque
from typing import Any

from ..errors import InvalidArgument, RemoteProtocolError
from ..fd import OwnedFd
from ..wire import structs as s
from ..wire.frames import Frame, FrameKind, FrameParser, Op

__all__ = ["LAZY_BURST", "READ_LIMIT", "LazyChannel", "LazyServing", "before"]

READ_LIMIT = 1 << 18  # bytes one `read` takes at most (above a socket's default send buffer, 208 KiB)
LAZY_BURST = 256  # lazy frames a connection serves a turn
_BURST = 65536
_CTRUNC = int(socket.MSG_CTRUNC)
_POST = int(FrameKind.POST)
_BANNED = frozenset({int(Op.HELLO), int(Op.LAZY_CHANNEL)})


def before(a: int, b: int) -> bool:
    """Frame number `a` was written before `b` (32-bit numbers that wrap)."""
    return a != b and (b - a) & 0xFFFFFFFF < 0x80000000


class LazyChannel:
    @classmethod
    def adopt(cls, fd: OwnedFd) -> LazyChannel:
        """The channel over the socket `fd` (taken: closed on failure); ValueError naming
        why it cannot be one."""
        try:
            sock = socket.socket(fileno=fd.fd)
        except OSError as exc:
            fd.close()
            raise ValueError(f"the fd is not a socket ({exc.strerror})") from None
        fd.detach()
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            sock.close()
            raise ValueError("the fd is not a Unix stream socket")
        return cls(sock)

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock: socket.socket | None = sock
        self._parser = FrameParser(FrameKind.REQUEST)
        self.frames: deque[Frame] = deque()  # arrived, checked, not served yet, in order

    def read(self) -> bool:
        """Take what has arrived, up to READ_LIMIT bytes; True if it stopped there (more
        may wait). RemoteProtocolError for a frame that may not come here (module rules)."""
        taken = 0
        parser = self._parser
        while self.sock is not None and taken < READ_LIMIT:
            try:
                data, _, flags, _ = self.sock.recvmsg(parser.bytes_desired(_BURST))
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.end()
                break
            if flags & _CTRUNC:
                raise RemoteProtocolError("fds sent on the lazy channel")
            if not data:
                self.end()
                break
            taken += len(data)
            parser.feed(data, ())
        ready = parser.ready
        while ready:
            frame = ready.popleft()
            if frame.kind != _POST or frame.op in _BANNED:
                raise RemoteProtocolError(f"op {frame.op} of kind {frame.kind} on the lazy channel (only posts)")
            self.frames.append(frame)
        return taken >= READ_LIMIT

    def end(self) -> None:
        """No more will come: close the socket (what arrived stays in `frames`)."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def close(self) -> None:
        self.end()
        self._parser.close()
        self.frames.clear()


class LazyServing:
    """How a Connection (connection.py) serves its lazy channel (module rules)."""

    lazy: LazyChannel | None
    lazy_turn = 0  # lazy frames served this turn
    behind = False  # served LAZY_BURST this turn, with more waiting: the server comes back
    parser: FrameParser
    outbox: Any
    parked: Any

    def _serve(self, frame: Frame) -> None:
        raise NotImplementedError

    def on_readable(self) -> None:
        raise NotImplementedError

    def _reply(self, frame: Frame, reply: s.Struct) -> None:
        raise NotImplementedError

    def _reply_error(self, frame: Frame, code: int, message: str) -> None:
        raise NotImplementedError

    def _serve_lazy_before(self, seq: int) -> bool | None:
        """Serve the next lazy frame if it was written before frame `seq` (True); False if
        none was; None if this turn's LAZY_BURST are served (then `behind`)."""
        lazy = self.lazy
        assert lazy is not None
        frames = lazy.frames
        if len(frames) < LAZY_BURST and (not frames or before(frames[-1].seq, seq)):  # more may have come
            lazy.read()
        if not frames or not before(frames[0].seq, seq):
            return False
        if self.lazy_turn >= LAZY_BURST:
            self.behind = True
            return None
        self.lazy_turn += 1
        self._serve(frames.popleft())
        return True

    def _lazy_at_end(self) -> bool:
        """The connection ended: serve what its lazy channel holds (unanswered), LAZY_BURST a
        turn; False once nothing is left (the channel closed and forgotten)."""
        lazy = self.lazy
        assert lazy is not None
        more = lazy.read() if len(lazy.frames) < LAZY_BURST else True
        frames = lazy.frames
        while frames:
            if self.outbox or self.parked is not None:
                return True  # (the server steps it again, then reads the end once more)
            if self.lazy_turn >= LAZY_BURST:
                self.behind = True
                return True
            self.lazy_turn += 1
            self._serve(frames.popleft())
        if more:
            self.behind = True
            return True
        lazy.close()
        self.lazy = None
        return False

    def serve_lazy(self) -> None:
        """Once a second, and when the connection is `behind`: serve what the lazy channel
        holds, if nothing of the connection written before it is unread or waiting (its
        frames are read first, then the connection's, which takes every frame written before
        them), LAZY_BURST a turn."""
        self.behind = False
        lazy = self.lazy
        if lazy is None or self.outbox or self.parked is not None:
            return
        if len(lazy.frames) < LAZY_BURST:
            lazy.read()
        if not lazy.frames and lazy.sock is not None:
            return
        self.on_readable()
        lazy = self.lazy  # (gone if the connection ended meanwhile)
        if lazy is None or self.behind:
            return
        frames = lazy.frames
        if not frames and lazy.sock is None:  # its client closed it: what it sent is served
            lazy.close()
            self.lazy = None
            return
        while frames and not self.outbox and self.parked is None and not self.parser.ready \
                and not self.parser.mid_frame:
            if self.lazy_turn >= LAZY_BURST:
                self.behind = True
                return
            self.lazy_turn += 1
            self._serve(frames.popleft())

    def _open_lazy(self, frame: Frame) -> None:
        """LAZY_CHANNEL (module rules), checked as a request of the table would be."""
        if len(frame.fds) != 1:
            frame.close_fds()
            raise RemoteProtocolError(f"op {frame.op} carries {len(frame.fds)} fds, expected 1")
        try:
            req = s.decode(s.LazyChannelReq, frame.payload, frame.fds)
        except InvalidArgument as exc:
            frame.close_fds()
            self._reply_error(frame, exc.errno or errno.EINVAL, str(exc.strerror))
            return
        assert req.fd is not None
        if self.lazy is not None:
            req.fd.close()
            self._reply_error(frame, errno.EINVAL, "this connection has a lazy channel already")
            return
        try:
            self.lazy = LazyChannel.adopt(req.fd)
        except ValueError as exc:
            self._reply_error(frame, errno.EINVAL, f"LAZY_CHANNEL: {exc}")
            return
        self._reply(frame, s.Empty())
