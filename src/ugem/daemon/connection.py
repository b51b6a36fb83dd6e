"""Connection: one client socket <-> FrameParser <-> dispatch(), non-blocking.

Rules:
- a read between frames takes up to `_BURST` bytes (several pipelined requests in one
  syscall); a read inside a frame stops at its end, so fds are matched to the frame they
  came with (wire/frames.py); MSG_CTRUNC, fds a request did not expect, or any framing
  error drops this connection only;
- frames are served one at a time, in order: the next one only once the previous reply
  is written and nothing is parked (`pump`);
- the first frame must be HELLO with our magic and version; HELLO admits the client to
  its uid's clients (`Core.admit`): past `uid_max_clients` it is answered EDQUOT and the
  connection is closed; `accepted` (when the connection came) lets the server drop one
  that has not completed HELLO within the stall timeout;
- operation failures become error replies (errno + message) and the connection stays;
  a handler bug is logged with its traceback and answered EIO, never crashes the daemon;
- replies are queued and written when the socket is writable; while replies are queued
  the connection is not read (a client that does not read cannot make us buffer more);
  a reply bigger than a frame goes in several frames (wire/frames.py), never refused;
- each request runs as a `Call` (core/call.py, the run-until-done loop the embedded
  manager uses too), but a request without fds of a row whose handler takes no Call runs
  through `dispatch()` straight (most requests: a Call costs a tenth of an `info`), and
  becomes a Call only if it must wait; one that must wait (Pending: memory jobs, a fence, a resume) is
  parked with its call, and the connection is not read until the server steps it again
  (`resume`, once `Call.ready`): that client is throttled, others are served meanwhile;
- a client that went away while requests it sent were still unread (a reply's write fails:
  EPIPE) has them served all the same, unanswered, until its data ends: a worker killed
  right after sending its claims must not leave the sender's shares held (core/shares.py);
- fds in replies are closed by the daemon once sent; fds of a dropped connection are
  closed with it;
- a lazy channel (lazy.py: LAZY_CHANNEL, once per connection) is read before each frame is
  served, and its frames numbered before that one are served first; once a second
  (`serve_lazy`) when nothing else of the connection is waiting; and at the connection's
  end, before its client is released (at most LAZY_BURST of them a turn);
- every reply, success or error, is counted in the server's RequestTally (tally.py) with
  its op, errno and the seconds since its frame was complete; an EDQUOT reply is also
  logged there (throttled per client).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..core.call import Call
from ..core.jobs import Pending
from ..core.requests import BY_OP, RequestDesc, dispatch
from ..errors import InvalidArgument, QuotaExceeded, RemoteProtocolError, UgemError
from ..fd import OwnedFd
from ..scm import ANC_SPACE, fds_from_ancillary, rights
from ..wire import structs as s
from ..wire.frames import (
    HEADER,
    MAGIC,
    MAX_INLINE,
    MAX_PAYLOAD,
    PROTOCOL_VERSION,
    Frame,
    FrameKind,
    FrameParser,
    Op,
    encode_header,
)
from .lazy import LazyChannel, LazyServing
from .logs import event
from .poller import READ
from .tally import RequestTally

if TYPE_CHECKING:
    from ..core.client import Client
    from ..core.core import Core

__all__ = ["Connection"]

log = logging.getLogger("ugem.daemon")
_CTRUNC = int(socket.MSG_CTRUNC)  # a plain int: enum flag arithmetic is slow per request
_REPLY = int(FrameKind.REPLY)
_REPLY_MORE = int(FrameKind.REPLY_MORE)
_POST = int(FrameKind.POST)
_LAZY = int(Op.LAZY_CHANNEL)
_BURST = 16384  # bytes read at once between frames: bounds the frames served per wake-up
_NO_FDS: tuple[OwnedFd, ...] = ()
_monotonic = time.monotonic
_pack_header = HEADER.pack
# op -> (row, request struct, payload size, unpack) for requests that are a fixed struct (no tail,
# no fds): decoded positionally in one call (the request table's rows, looked up once)
_FIXED: dict[int, tuple[RequestDesc, type[s.Struct], int, Callable[[bytes], tuple[Any, ...]]]] = {
    desc.op: (desc, desc.req, desc.req._codec.size, desc.req._codec.unpack) for desc in BY_OP.values()
    if desc.req._plain}


class Connection(LazyServing):
    def __init__(self, sock: socket.socket, core: Core, client: Client, tally: RequestTally | None = None) -> None:
        self.sock = sock
        self.core = core
        self.client = client
        self.tally = tally if tally is not None else RequestTally()
        self._done = self.tally.done  # (bound once: called per reply)
        self.started = 0.0  # when the frame being served was complete (its reply is timed from then)
        self.parser = FrameParser(FrameKind.REQUEST)
        self.outbox: deque[tuple[memoryview, list[OwnedFd]]] = deque()
        self.greeted = False
        self.closed = False
        self.deaf = False  # the client went away: what it sent is served, unanswered (`_deafen`)
        self.accepted = self.last_progress = time.monotonic()
        self.parked: tuple[Frame, Call] | None = None  # a request that must wait
        self.events = READ  # what the server's poller watches (0: nothing)
        self.lazy: LazyChannel | None = None  # its lazy channel, once handed over (lazy.py)

    @property
    def pending(self) -> Pending | None:
        """What the parked request waits for."""
        return self.parked[1].pending if self.parked is not None else None

    @property
    def stalled_since(self) -> float | None:
        """When a partial frame last made progress, or None if between frames."""
        return self.last_progress if self.parser.mid_frame else None

    # -- reading ---------------------------------------------------------------------

    def on_readable(self) -> None:
        """Serve buffered frames, then read: until a frame is complete and served, the
        reply waits in the outbox, a request is parked, or the socket has nothing more
        (epoll reports it again if more comes). Raises RemoteProtocolError or
        ConnectionError when the connection must be dropped."""
        parser = self.parser
        ready = parser.ready
        self.lazy_turn = 0
        while not self.outbox and self.parked is None:
            if ready:
                if self.lazy is not None:
                    earlier = self._serve_lazy_before(ready[0].seq)
                    if earlier is None:
                        return  # its turn is over: `behind`, the server comes back (lazy.py)
                    if earlier:
                        continue
                self._serve(ready.popleft())
                if not ready:
                    return  # epoll reports the socket again if more is waiting
                continue
            try:
                data, anc, flags, _ = self.sock.recvmsg(parser.bytes_desired(_BURST), ANC_SPACE)
            except (BlockingIOError, InterruptedError):
                return
            fds = fds_from_ancillary(anc) if anc else _NO_FDS
            if flags & _CTRUNC:
                for fd in fds:
                    fd.close()
                raise RemoteProtocolError("truncated control message (too many fds)")
            if not data:
                for fd in fds:
                    fd.close()
                if self.lazy is not None and self._lazy_at_end():
                    return  # its lazy frames first (this turn's), then the end
                raise ConnectionResetError("client closed the connection")
            if parser.feed(data, fds):  # a partial frame is making progress
                self.last_progress = _monotonic()

    def on_writable(self) -> None:
        """Write queued replies; once they are out, serve frames that were waiting."""
        self.flush()
        if not self.outbox and self.parser.ready:
            self.on_readable()

    def _serve(self, frame: Frame) -> None:
        self.started = _monotonic()
        if not self.greeted:
            self._hello(frame)
            return
        if frame.op == _LAZY:
            self._open_lazy(frame)
            return
        fixed = _FIXED.get(frame.op)
        if fixed is not None and not frame.fds and len(frame.payload) == fixed[2]:
            row, req_type, _, unpack = fixed  # the common case: a fixed struct, whole, no fds
            if row.takes_call:
                self._run(frame, Call(self.client, row, req_type(*unpack(frame.payload))))
            else:
                self._run_plain(frame, row, req_type(*unpack(frame.payload)))
            return
        desc = BY_OP.get(frame.op)
        fds = frame.fds
        expected = len(desc.req.FDS) if desc is not None else 0
        if len(fds) != expected:
            frame.close_fds()
            raise RemoteProtocolError(f"op {frame.op} carries {len(fds)} fds, expected {expected}")
        if desc is None:
            self._reply_error(frame, errno.EINVAL, f"unknown op {frame.op}")
            return
        try:
            req = s.decode(desc.req, frame.payload, fds)
        except InvalidArgument as exc:
            frame.close_fds()
            self._reply_error(frame, exc.errno or errno.EIO, str(exc.strerror))
            return
        if desc.takes_call or fds:
            self._run(frame, Call(self.client, desc, req))
        else:
            self._run_plain(frame, desc, req)

    def _run(self, frame: Frame, call: Call) -> None:
        """Step the call; while it must wait, park it (the server starts its jobs and
        calls `resume` once it is ready)."""
        try:
            reply = call.step(self.core)  # closes the request's unclaimed fds once done
        except UgemError as exc:
            self._reply_error(frame, exc.errno or errno.EIO, str(exc.strerror))
            return
        except Exception:  # a bug in a handler: keep serving everyone, say so loudly
            self._handler_failed(frame, call.desc)
            return
        if reply is None:
            self.parked = (frame, call)
            return
        self._reply(frame, reply)

    def _run_plain(self, frame: Frame, row: RequestDesc, req: s.Struct) -> None:
        """`_run` of a request whose handler takes no Call and which carries no fds, made
        into a Call only if it must wait (as `Call.step` would leave it: its `pending` set;
        stepped again from the start, as every call is)."""
        try:
            reply = dispatch(self.core, self.client, row, req)
        except Pending as pending:
            call = Call(self.client, row, req)
            call.pending = pending
            self.parked = (frame, call)
            return
        except UgemError as exc:
            self._reply_error(frame, exc.errno or errno.EIO, str(exc.strerror))
            return
        except Exception:  # a bug in a handler: keep serving everyone, say so loudly
            self._handler_failed(frame, row)
            return
        self._reply(frame, reply)

    def _handler_failed(self, frame: Frame, row: RequestDesc) -> None:
        creds = self.client.creds
        op = row.op.name
        event(log, logging.ERROR, "handler_error", "handler for %s failed (client %d)", op, self.client.id,
              exc_info=True, client=self.client.id, pid=creds.pid, uid=creds.uid, op=op)
        self._reply_error(frame, errno.EIO, f"internal error in {op}; see the daemon log")

    def resume(self) -> None:
        """What the parked request waited for is over: step it again (then the frames that
        arrived behind it)."""
        assert self.parked is not None
        frame, call = self.parked
        self.parked = None
        self._run(frame, call)
        if not self.outbox and self.parked is None and self.parser.ready:
            self.on_readable()

    def peer_closed(self) -> bool:
        """True if the client hung up (checked without consuming any request bytes)."""
        try:
            return self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True

    def fail_parked(self, code: int, message: str) -> None:
        """Answer the parked request with an error instead (daemon shutdown: ESHUTDOWN)."""
        if self.parked is not None:
            frame, call = self.parked
            self.parked = None
            call.abandon()
            self._reply_error(frame, code, message)

    def _hello(self, frame: Frame) -> None:
        if frame.op != Op.HELLO or frame.fds or frame.kind == _POST:
            frame.close_fds()
            raise RemoteProtocolError("the first frame must be a HELLO request without fds")
        try:
            hello = s.decode(s.HelloReq, frame.payload, [])
            hello.check()
        except InvalidArgument as exc:
            raise RemoteProtocolError(f"bad HELLO: {exc.strerror}") from None
        if hello.magic != MAGIC or hello.version != PROTOCOL_VERSION:
            self._reply_error(frame, errno.EPROTONOSUPPORT,
                              f"daemon speaks {MAGIC!r} version {PROTOCOL_VERSION}, client sent "
                              f"{hello.magic!r} version {hello.version}")
            return
        try:
            self.core.admit(self.client)
        except QuotaExceeded as exc:
            self._reply_error(frame, errno.EDQUOT, str(exc.strerror))
            raise ConnectionRefusedError(errno.EDQUOT, "refused at HELLO") from None
        self.greeted = True
        self._reply(frame, s.HelloReply(version=PROTOCOL_VERSION, client_id=self.client.id, server_pid=os.getpid(),
                                        max_payload=MAX_PAYLOAD, max_inline=MAX_INLINE))

    # -- writing ---------------------------------------------------------------------

    def _reply(self, frame: Frame, reply: s.Struct) -> None:
        self._done(frame.op, 0, _monotonic() - self.started)
        if frame.kind == _POST or self.deaf:  # nobody reads it (wire/frames.py)
            if not reply._plain:
                for fd in s.encode(reply)[1]:
                    fd.close()
            return
        if reply._plain:  # a fixed struct (most replies): its whole frame in one pack, no fds
            cls = reply.__class__
            data = cls._framed.pack(cls._codec.size, frame.op, 0, _REPLY, frame.seq, 0, *cls._values(reply))
            fds: list[OwnedFd] = []
        else:
            pieces, fds = s.encode(reply)
            length = sum(memoryview(p).nbytes for p in pieces)
            if length > MAX_PAYLOAD:
                self._reply_in_pieces(frame, b"".join(pieces), fds)
                return
            data = b"".join([_pack_header(length, frame.op, len(fds), _REPLY, frame.seq, 0), *pieces])
        sent = 0
        if not self.outbox and not fds:  # the common case: one send, nothing queued
            try:
                sent = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                pass
            except (BrokenPipeError, ConnectionResetError):
                self._deafen()
                return
            if sent == len(data):
                return
        self.outbox.append((memoryview(data)[sent:], fds))
        self.flush()

    def _reply_in_pieces(self, frame: Frame, payload: bytes, fds: list[OwnedFd]) -> None:
        """A reply bigger than one frame (a listing of many objects or clients) goes as
        REPLY_MORE frames of MAX_PAYLOAD bytes and a last REPLY frame (wire/frames.py);
        headers and slices of the one payload are queued without copying it again."""
        assert not fds, "a reply that carries fds is never bigger than a frame"
        view = memoryview(payload)
        for start in range(0, len(view), MAX_PAYLOAD):
            piece = view[start:start + MAX_PAYLOAD]
            kind = _REPLY if start + MAX_PAYLOAD >= len(view) else _REPLY_MORE
            self.outbox.append((memoryview(HEADER.pack(len(piece), frame.op, 0, kind, frame.seq, 0)), []))
            self.outbox.append((piece, []))
        self.flush()

    def _reply_error(self, frame: Frame, code: int, message: str) -> None:
        now = time.monotonic()
        self.tally.done(frame.op, code, now - self.started)
        if code == errno.EDQUOT:
            self.tally.refused(self.client, frame.op, message, now)
        if frame.kind == _POST or self.deaf:
            return
        body = message.encode("utf-8", "replace")[:4096]
        header = encode_header(len(body), frame.op, 0, FrameKind.REPLY, frame.seq, code)
        self.outbox.append((memoryview(header + body), []))
        self.flush()

    def flush(self) -> None:
        """Write queued replies until the socket would block."""
        while self.outbox:
            data, fds = self.outbox[0]
            try:
                sent = self.sock.sendmsg([data], rights(fds))
            except (BlockingIOError, InterruptedError):
                return
            except (BrokenPipeError, ConnectionResetError):
                self._deafen()
                return
            for fd in fds:  # they went with the first byte
                fd.close()
            if sent < len(data):
                self.outbox[0] = (data[sent:], [])
                continue
            self.outbox.popleft()

    def _deafen(self) -> None:
        """The client went away (a reply's write failed): drop the replies queued and answer
        nothing more, but serve what it sent before it went, until its data ends (then the
        read sees the end and the connection is dropped)."""
        self.deaf = True
        for _, fds in self.outbox:
            for fd in fds:
                fd.close()
        self.outbox.clear()

    # -- teardown --------------------------------------------------------------------

    def close(self) -> None:
        """Release the client's everything and close the socket; idempotent."""
        if self.closed:
            return
        self.closed = True
        self.core.client_release(self.client)
        self.parser.close()
        if self.parked is not None:
            self.parked[1].abandon()
            self.parked = None
        for _, fds in self.outbox:
            for fd in fds:
                fd.close()
        self.outbox.clear()
        if self.lazy is not None:
            self.lazy.close()
            self.lazy = None
        self.sock.close()

