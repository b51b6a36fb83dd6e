"""Frames: the fixed header, the op numbers, and a sans-IO parser that also tracks fds.

Every frame, in both directions, is a 16-byte little-endian header and a payload::

    offset  size  field
    0       4     length   payload bytes after the header (<= MAX_PAYLOAD, checked first)
    4       2     op       Op number (requests and their replies carry the same op)
    6       1     nfds     fds attached to this frame with SCM_RIGHTS
    7       1     kind     0 = request, 1 = reply, 2 = piece of a reply that continues,
                           3 = post (a request that wants no reply)
    8       4     seq      request serial, echoed by the reply
    12      4     status   replies: 0 or a positive errno (payload = utf-8 message); requests: 0

Rules:
- fds travel with the first bytes of the header (one sendmsg per frame that carries fds).
  A read that starts between frames may fetch several frames; the kernel ends it at the
  message that carried fds, so they belong to the last frame starting in that read. A read
  that starts inside a frame never asks past its end (`bytes_desired()`). Fds arriving in
  the middle of a frame, or a count different from `nfds`, is a RemoteProtocolError.
- `length` is checked against MAX_PAYLOAD before any payload is read.
- A request is always one frame. A client never sends a request whose payload exceeds
  MAX_PAYLOAD: it refuses it with E2BIG before sending anything (an execbuffer of more
  than MAX_COMMANDS commands, wire/structs_exec.py), so the connection and every object
  stay; batches it makes itself (released mappings, dropped handles) are split into
  several requests instead. A daemon that receives a bigger request drops the connection.
- The parser owns received fds until the frame is handed out; on error it closes them.
- Replies of any size arrive whole. A reply payload bigger than MAX_PAYLOAD (a listing
  of a million objects, the stats of thousands of clients) is sent as a run of frames with
  the reply's op and seq: pieces of kind REPLY_MORE (each at most MAX_PAYLOAD bytes,
  status 0, no fds), then one frame of kind REPLY with the rest; the payload is their
  concatenation in order. Replies that carry fds are always small and never split. A
  client reassembles the pieces (nothing else can arrive in between: the daemon answers a
  connection's requests one at a time, in order); the daemon's request parser rejects kind
  REPLY_MORE.
- A client may send requests before reading earlier replies; replies come back in request
  order, so it reads them in that order. A POST is a request whose reply nobody reads
  (releases pipelined ahead of a request, posted shares and claims: client/transport.py):
  the daemon serves it exactly as a REQUEST, in order, and sends nothing back, not even
  an error. A client that posts ends each write of posts with a REQUEST (whose reply it
  reads later, dropping it) and never has more than SHARE_AHEAD posted frames (each share
  of a GEM_SHARE_BATCH counting as one), nor REPLIES_AHEAD such replies unread, past the
  last such reply it read: that bounds how far the daemon may lag behind it.
- Op numbers are never reused; a retired op keeps its number. PROTOCOL_VERSION (checked at
  HELLO) changes when a client may send what an older daemon would not understand.
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import RemoteProtocolError
from ..fd import OwnedFd

__all__ = [
    "HEADER",
    "MAGIC",
    "MAX_FDS",
    "MAX_INLINE",
    "XFER_ABOVE",
    "MAX_PAYLOAD",
    "PROTOCOL_VERSION",
    "Frame",
    "FrameParser",
    "FrameKind",
    "Op",
    "encode_header",
]

MAGIC = b"UGEM"
PROTOCOL_VERSION = 5  # 2: ops 32-38 (close batch, map export, lookup, shares, create mapped); 3: op 39 (claim
# mapped), MmapReply.server_fd; 4: ClaimReq names the memory (early claims of shares not yet sent), POST frames;
# 5: ops 40-42 (mappings forked, share batch, claim mapped batch)
HEADER = struct.Struct("<IHBBIi")
MAX_INLINE = 1 << 20  # pread/pwrite bytes a frame may carry (HELLO's max_inline); more goes through XFER
# pread/pwrite larger than this take XFER (shared memory) even where a frame could carry them:
# measured 2-10x faster from 256 KiB (a daemon pread of 512 KiB: 0.36 ms by XFER, 1.5 ms inline)
XFER_ABOVE = 128 << 10
MAX_PAYLOAD = MAX_INLINE + 4096
MAX_FDS = 4


class FrameKind(enum.IntEnum):
    REQUEST = 0
    REPLY = 1
    REPLY_MORE = 2  # a piece of a reply too big for one frame; the rest follows
    POST = 3  # a request that wants no reply (served as a REQUEST)


class Op(enum.IntEnum):
    HELLO = 0
    GEM_CREATE = 1
    GEM_CLOSE = 2
    GEM_INFO = 3
    GEM_PREAD = 4
    GEM_PWRITE = 5
    GEM_MMAP = 6
    GEM_MUNMAP = 7
    GEM_FLINK = 8
    GEM_OPEN = 9
    PRIME_HANDLE_TO_FD = 10
    PRIME_FD_TO_HANDLE = 11
    STATS = 12
    XFER_DONE = 13
    LIST_OBJECTS = 14
    GEM_MADVISE = 15
    GEM_PIN = 16
    GEM_UNPIN = 17
    GEM_EXECBUFFER = 18
    GEM_BUSY = 19
    GEM_WAIT = 20
    WAIT_FENCE = 21
    GEM_SET_DOMAIN = 22
    GEM_SET_TILING = 23
    GEM_GET_TILING = 24
    GEM_SET_CACHING = 25
    GEM_GET_CACHING = 26
    SUSPEND = 27
    RESUME = 28
    DEBUG_OPEN = 29
    LIST_CLIENTS = 30
    GEM_USERPTR = 31
    GEM_CLOSE_BATCH = 32
    PRIME_MAP_TO_FD = 33
    LOOKUP = 34
    GEM_SHARE = 35
    GEM_CLAIM = 36
    GEM_DROP_SHARES = 37
    GEM_CREATE_MAPPED = 38
    GEM_CLAIM_MAPPED = 39
    MAPPINGS_FORKED = 40
    GEM_SHARE_BATCH = 41
    GEM_CLAIM_MAPPED_BATCH = 42
    LAZY_CHANNEL = 43  # connection-level, as HELLO: the client's lazy channel (daemon/lazy.py)
    GEM_REUSE = 44


_HEADER_SIZE = HEADER.size
_unpack_header = HEADER.unpack_from
_REQUEST = int(FrameKind.REQUEST)
_POST = int(FrameKind.POST)
_REPLY = int(FrameKind.REPLY)


def encode_header(length: int, op: int, nfds: int, kind: int, seq: int, status: int = 0) -> bytes:
    return HEADER.pack(length, op, nfds, kind, seq, status)


@dataclass(slots=True)
class Frame:
    op: int
    kind: int
    seq: int
    status: int
    payload: bytes
    fds: list[OwnedFd] = field(default_factory=list)

    def close_fds(self) -> None:
        for fd in self.fds:
            fd.close()
        self.fds.clear()


class FrameParser:
    """Assemble frames from (bytes, fds) chunks. Sans-IO: the caller does the reading.

    A chunk that starts between frames may hold several frames and the start of another
    (one read can fetch a burst of small requests). A chunk that starts inside a frame must
    not go past its end (`bytes_desired`). Fds received with a chunk belong to the last
    frame that starts in it: the kernel ends a read at the message that carried fds, and a
    sender attaches fds to the sendmsg holding the first bytes of their frame.

    Complete frames wait in `ready` (a deque, oldest first) until taken: `next_frame()`, or
    `ready.popleft()` where a loop serves them (the daemon's connection).
    """

    def __init__(self, expect_kind: FrameKind, max_payload: int = MAX_PAYLOAD) -> None:
        self._expect_kind = expect_kind
        self._expect = int(expect_kind)  # a plain int: compared per frame
        self._also = _POST if expect_kind == FrameKind.REQUEST else -1  # a request parser takes posts too
        self._max_payload = max_payload
        self._buf = bytearray()
        self._header: tuple[int, int, int, int, int, int] | None = None
        self._fds: list[OwnedFd] = []  # fds of the frame being assembled
        self.ready: deque[Frame] = deque()

    def bytes_desired(self, between: int = HEADER.size) -> int:
        """How many bytes to read next: the rest of the current frame, or `between` (at
        least a header) when no frame is in progress."""
        if self._header is None:
            if not self._buf:
                return between if between > _HEADER_SIZE else _HEADER_SIZE
            return _HEADER_SIZE - len(self._buf)
        return self._header[0] - len(self._buf)

    @property
    def mid_frame(self) -> bool:
        return bool(self._buf) or self._header is not None

    @property
    def has_frames(self) -> bool:
        return bool(self.ready)

    def feed(self, data: bytes, fds: Sequence[OwnedFd]) -> bool:
        """Add bytes read from the peer; returns `mid_frame` (a frame is left partial).
        Raises RemoteProtocolError on any violation."""
        if not fds and self._header is None and not self._buf and len(data) >= _HEADER_SIZE:
            # the common case, checked here without a call: exactly one whole frame, no fds
            length, op, nfds, kind, seq, status = _unpack_header(data)
            if length + _HEADER_SIZE == len(data) and not nfds and length <= self._max_payload \
                    and (kind == self._expect or kind == self._also) and not (kind != _REPLY and status):
                self.ready.append(Frame(op, kind, seq, status, data[_HEADER_SIZE:], []))
                return False
        try:  # anything else (or a violation: the general path says which and cleans up)
            self._feed(data, fds)
        except RemoteProtocolError:
            for fd in fds:
                fd.close()
            self.close()
            raise
        return self.mid_frame

    def _feed(self, data: bytes, fds: Sequence[OwnedFd]) -> None:
        fresh = not self.mid_frame  # the chunk starts at a frame boundary
        if not fresh:
            if len(data) > self.bytes_desired():
                raise RemoteProtocolError("chunk crosses a frame boundary")
            if fds:
                raise RemoteProtocolError("fds arrived in the middle of a frame")
        if len(fds) > MAX_FDS:
            raise RemoteProtocolError(f"{len(fds)} fds in one frame (max {MAX_FDS})")
        buf = self._buf
        buf += data
        done: list[tuple[Frame, int]] = []  # frames completed by this chunk, with their nfds
        while True:
            if self._header is None:
                if len(buf) < HEADER.size:
                    break
                self._header = self._check(HEADER.unpack_from(buf))
                del buf[:HEADER.size]
            length, op, nfds, kind, seq, status = self._header
            if len(buf) < length:
                break
            done.append((Frame(op, kind, seq, status, bytes(buf[:length]), self._fds), nfds))
            del buf[:length]
            self._header, self._fds = None, []
        if fds:  # fresh chunk: they belong to the last frame starting in it
            if self.mid_frame:
                self._fds = list(fds)
            elif done:
                done[-1][0].fds = list(fds)
            else:
                raise RemoteProtocolError("fds arrived without a frame")
        for frame, nfds in done:
            if nfds != len(frame.fds):
                raise RemoteProtocolError(f"header announces {nfds} fds, {len(frame.fds)} arrived")
        if self._header is not None and self._header[2] != len(self._fds):
            raise RemoteProtocolError(f"header announces {self._header[2]} fds, {len(self._fds)} arrived")
        self.ready.extend(frame for frame, _ in done)

    def _check(self, header: tuple[int, int, int, int, int, int]) -> tuple[int, int, int, int, int, int]:
        length, _op, _nfds, kind, _seq, status = header
        if length > self._max_payload:
            raise RemoteProtocolError(f"frame length {length} exceeds {self._max_payload}")
        if kind != self._expect and kind != self._also:
            raise RemoteProtocolError(f"unexpected frame kind {kind}")
        if kind in (_REQUEST, _POST) and status != 0:
            raise RemoteProtocolError(f"nonzero status {status} in a request")
        return header

    def next_frame(self) -> Frame | None:
        return self.ready.popleft() if self.ready else None

    def close(self) -> None:
        """Release everything held (fds of a partial frame and of undelivered frames)."""
        for fd in self._fds:
            fd.close()
        self._fds = []
        for frame in self.ready:
            frame.close_fds()
        self.ready.clear()
        self._buf.clear()
        self._header = None
