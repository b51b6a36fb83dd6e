"""Frames: the fixed header, the op numbers, and a sans-IO parser that also tracks fds.

Every frame, in both directions, is a 16-byte little-endian header and a payload::

    offset  size  field
    0       4     length   payload bytes after the header (<= MAX_PAYLOAD, checked first)
    4       2     op       Op number (requests and their replies carry the same op)
    6       1     nfds     fds attached to this frame with SCM_RIGHTS
    7       1     kind     0 = request, 1 = reply
    8       4     seq      request serial, echoed by the reply
    12      4     status   replies: 0 or a positive errno (payload = utf-8 message); requests: 0

Rules:
- fds travel with the first bytes of the header (one sendmsg per frame); `bytes_desired()`
  never asks for bytes past the current frame, so fds can always be matched to their frame.
  Fds arriving anywhere else, or a count different from `nfds`, is a RemoteProtocolError.
- `length` is checked against MAX_PAYLOAD before any payload is read.
- The parser owns received fds until the frame is handed out; on error it closes them.
- Op numbers are never reused; a retired op keeps its number.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

from ..errors import RemoteProtocolError
from ..fd import OwnedFd

__all__ = [
    "HEADER",
    "MAGIC",
    "MAX_FDS",
    "MAX_INLINE",
    "MAX_PAYLOAD",
    "PROTOCOL_VERSION",
    "Frame",
    "FrameParser",
    "Kind",
    "Op",
    "encode_header",
]

MAGIC = b"UGEM"
PROTOCOL_VERSION = 1
HEADER = struct.Struct("<IHBBIi")
MAX_INLINE = 1 << 20  # pread/pwrite bytes carried in a frame; more goes through shared memory
MAX_PAYLOAD = MAX_INLINE + 4096
MAX_FDS = 4


class Kind(enum.IntEnum):
    REQUEST = 0
    REPLY = 1


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
    """Assemble frames from (bytes, fds) chunks. Sans-IO: the caller does the reading."""

    def __init__(self, expect_kind: Kind, max_payload: int = MAX_PAYLOAD) -> None:
        self._expect_kind = expect_kind
        self._max_payload = max_payload
        self._buf = bytearray()
        self._header: tuple[int, int, int, int, int, int] | None = None
        self._fds: list[OwnedFd] = []
        self._ready: list[Frame] = []

    def bytes_desired(self) -> int:
        """How many bytes to read next without crossing into the following frame."""
        if self._header is None:
            return HEADER.size - len(self._buf)
        return self._header[0] - len(self._buf)

    @property
    def mid_frame(self) -> bool:
        return bool(self._buf) or self._header is not None

    def feed(self, data: bytes, fds: list[OwnedFd]) -> None:
        """Add bytes read from the peer; raises RemoteProtocolError on any violation."""
        try:
            self._feed(data, fds)
        except RemoteProtocolError:
            for fd in fds:
                fd.close()
            self.close()
            raise

    def _feed(self, data: bytes, fds: list[OwnedFd]) -> None:
        if len(data) > self.bytes_desired():
            raise RemoteProtocolError("chunk crosses a frame boundary")
        if fds:
            if self._buf or self._header is not None or self._fds:
                raise RemoteProtocolError("fds arrived in the middle of a frame")
            if len(fds) > MAX_FDS:
                raise RemoteProtocolError(f"{len(fds)} fds in one frame (max {MAX_FDS})")
            self._fds = list(fds)
        self._buf += data
        if self._header is None and len(self._buf) == HEADER.size:
            header = HEADER.unpack(self._buf)
            length, op, nfds, kind, _seq, status = header
            if length > self._max_payload:
                raise RemoteProtocolError(f"frame length {length} exceeds {self._max_payload}")
            if kind != self._expect_kind:
                raise RemoteProtocolError(f"unexpected frame kind {kind}")
            if kind == Kind.REQUEST and status != 0:
                raise RemoteProtocolError(f"nonzero status {status} in a request")
            if nfds != len(self._fds):
                raise RemoteProtocolError(f"header announces {nfds} fds, {len(self._fds)} arrived")
            del op
            self._header = header
            self._buf.clear()
        if self._header is not None and len(self._buf) == self._header[0]:
            length, op, _nfds, kind, seq, status = self._header
            self._ready.append(Frame(op, kind, seq, status, bytes(self._buf), self._fds))
            self._header, self._fds = None, []
            self._buf.clear()

    def next_frame(self) -> Frame | None:
        return self._ready.pop(0) if self._ready else None

    def close(self) -> None:
        """Release everything held (fds of a partial frame and of undelivered frames)."""
        for fd in self._fds:
            fd.close()
        self._fds = []
        for frame in self._ready:
            frame.close_fds()
        self._ready.clear()
        self._buf.clear()
        self._header = None
