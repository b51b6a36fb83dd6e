"""Posting: requests sent without waiting for their replies (a mixin of SocketTransport,
client/transport.py), on the connection or on its lazy channel (client/lazy.py).

Rules:
- `post` writes POST frames in one write, the last one a REQUEST whose reply is read and
  dropped before the next call's (wire/frames.py); failures are nobody's here (shares
  report theirs to their claimer, core/shares.py). Never more than SHARE_AHEAD frames (each
  share of a GEM_SHARE_BATCH counting as one), nor REPLIES_AHEAD replies, past the last
  reply read: past that, the replies owed are read first, so the daemon never lags further
  behind (early claims count on it) nor holds replies for a client that is not reading;
- `post_lazy` writes POST frames on the lazy channel, opened on first use (one round trip,
  LAZY_CHANNEL); where there is none (a daemon that refused it) or they do not fit now, it
  posts them on the connection instead. Every frame of either channel takes its number
  from the one counter, under the transport's lock: the daemon serves both in that order.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Sequence
from typing import Any, NoReturn

from ..errors import DaemonGone, UgemError
from ..fd import OwnedFd
from ..wire import structs as s
from ..wire.frames import HEADER, MAX_PAYLOAD, FrameKind, Op
from ..wire.structs_share import REPLIES_AHEAD, SHARE_AHEAD, SHARE_BATCH_RECORD, ShareBatchReq
from .lazy import LazyEnd

__all__ = ["Posting"]

_REQUEST = int(FrameKind.REQUEST)
_POST = int(FrameKind.POST)
_REPLY = int(FrameKind.REPLY)
_pack_header = HEADER.pack
_SHARE_SIZE = SHARE_BATCH_RECORD.size


def _ahead(frames: Sequence[tuple[Op, s.Struct]]) -> int:
    """How many requests `frames` stand for: one a frame, a share batch one a share."""
    return sum(len(req.records) // _SHARE_SIZE if type(req) is ShareBatchReq else 1 for _, req in frames)


class Posting:
    _lock: threading.Lock
    _sock: socket.socket
    _seq: int
    _timeout: float | None
    _owed: list[tuple[int, int]]  # (op, seq) of posted requests whose replies are unread
    _unread: int  # frames (a share batch's shares) sent since the last reply read, maybe not served
    _lazy: LazyEnd | None  # the lazy channel, once open
    _lazy_tried: bool

    def call(self, op: Op, req: s.Struct, notes: Sequence[tuple[Op, s.Struct]] = (), **local: Any) -> Any:
        raise NotImplementedError

    def _arm(self, op: Op, req: Any) -> None:
        raise NotImplementedError

    def _expired(self, op: Op) -> UgemError:
        raise NotImplementedError

    def _lost(self, exc: OSError) -> OSError:
        raise NotImplementedError

    def _abort(self, fds: list[OwnedFd], why: str) -> NoReturn:
        raise NotImplementedError

    def _read_exactly(self, n: int) -> bytes:
        raise NotImplementedError

    def post(self, frames: Sequence[tuple[Op, s.Struct]]) -> None:
        """Send requests (no fds) in one write, without waiting for their replies (module rules)."""
        if not frames:
            return
        with self._lock:
            op, req = frames[-1]
            try:
                if self._timeout is not None:
                    self._arm(op, req)
                if self._owed and (self._unread + _ahead(frames) > SHARE_AHEAD or len(self._owed) >= REPLIES_AHEAD):
                    self._skip_owed()
                self._send_posts(frames, last_wants_reply=True)
            except DaemonGone:
                raise
            except TimeoutError as exc:
                raise self._expired(op) from exc
            except OSError as exc:
                raise self._lost(exc) from exc

    def post_lazy(self, frames: Sequence[tuple[Op, s.Struct]]) -> None:
        """Send posts (no fds) on the lazy channel (client/lazy.py), opened on first use;
        on the connection, as `post`, where there is none or they do not fit."""
        if not frames:
            return
        if not self._lazy_tried:
            self._open_lazy()
        with self._lock:
            lazy = self._lazy
            if lazy is not None and not lazy.broken:
                try:
                    if lazy.send(self._encode_posts(frames)):
                        return
                except OSError as exc:
                    raise self._lost(exc) from exc
        self.post(frames)  # (the numbers the lazy attempt took are skipped: only their order counts)

    def _open_lazy(self) -> None:
        with self._lock:
            if self._lazy_tried:
                return
            self._lazy_tried = True
        mine, theirs = LazyEnd.pair()
        try:
            self.call(Op.LAZY_CHANNEL, s.LazyChannelReq(fd=OwnedFd(theirs.detach())))
        except UgemError as exc:
            mine.close()
            if isinstance(exc, DaemonGone):
                raise
            return  # a daemon without lazy channels: the connection it is
        except BaseException:
            mine.close()
            raise
        with self._lock:
            self._lazy = mine

    def _send_posts(self, frames: Sequence[tuple[Op, s.Struct]], last_wants_reply: bool = False,
                    encoded: Any = None) -> None:
        """Write `frames` (no fds) in one write, as POSTs (the last as a REQUEST, its reply
        owed, if asked; `encoded`: the last one's payload, encoded already)."""
        self._unread += _ahead(frames)
        self._sock.sendall(self._encode_posts(frames, last_wants_reply, encoded))

    def _encode_posts(self, frames: Sequence[tuple[Op, s.Struct]], last_wants_reply: bool = False,
                      encoded: Any = None) -> bytearray:
        """`frames` as POST frames (module `_send_posts`), numbered."""
        data = bytearray()
        last = len(frames) - 1
        for i, (op, req) in enumerate(frames):
            if i == last and encoded is not None:
                payload = encoded
            elif req._plain:
                payload = req._codec.pack(*type(req)._values(req))
            else:
                pieces, fds = s.encode(req)
                assert not fds
                payload = b"".join(bytes(p) for p in pieces)
            self._seq = seq = (self._seq + 1) & 0xFFFFFFFF
            kind = _REQUEST if last_wants_reply and i == last else _POST
            data += _pack_header(len(payload), op, 0, kind, seq, 0)
            data += payload
            if kind == _REQUEST:
                self._owed.append((op, seq))
        return data

    def _skip_owed(self) -> None:
        owed, self._owed = self._owed, []
        for op, seq in owed:
            self._skip_reply(op, seq)
        self._unread = 0

    def _skip_reply(self, op: int, seq: int) -> None:
        """Read one note's reply exactly (never a byte of the next) and drop it."""
        header = self._read_exactly(HEADER.size)
        length, rop, nfds, kind, rseq, _ = HEADER.unpack(header)
        if kind != _REPLY or rop != op or rseq != seq or nfds or length > MAX_PAYLOAD:
            self._abort([], f"malformed reply header from the daemon: {HEADER.unpack(header)}")
        self._read_exactly(length)
