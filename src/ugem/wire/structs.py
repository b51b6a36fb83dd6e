"""One dataclass per request and reply, with its fixed little-endian layout.

Each struct is a `Struct` (wire/codec.py: the layout rules, `check()`, `encode`/`decode`,
re-exported here) listing `LAYOUT`, pairs of (field, struct code), in wire order; `pad*`
fields must be zero and `flags` must fit `FLAGS`, or the request is EINVAL.

The embedded transport builds the same dataclasses and calls the same `check()`, so the
embedded manager rejects exactly what the daemon rejects. A struct holds what crosses the
wire and nothing else: the embedded caller's own memory (pread's `into`, userptr's
`buffer`) and the state a request keeps while it waits live in the transports' `Call`
(core/call.py). Rules: structs grow only by appending fields; a short payload is
zero-extended, a longer one is EINVAL; nothing here does I/O.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, fields
from typing import Any

from ..fd import OwnedFd
from .codec import Struct, decode, encode
from .frames import MAX_PAYLOAD, PROTOCOL_VERSION

__all__ = [
    "MAX_IDS", "CloseBatchReq", "CloseReq", "CreateReply", "CreateReq", "Empty", "ExportReply", "ExportReq",
    "FlinkReply", "FlinkReq", "HandleReq", "MadviseReply", "MadviseReq", "HelloReply", "HelloReq", "ImportReply",
    "ImportReq", "InfoReply", "InfoReq", "JsonReply", "LazyChannelReq", "MapExportReq", "MmapReply", "MmapReq",
    "MunmapReq",
    "OpenReply", "OpenReq",
    "PreadReply", "PreadReq", "PwriteReply", "PwriteReq", "Struct", "UserptrReq", "XferDoneReq", "XFER", "READONLY",
    "TAKES_FD", "TO_END", "WRITABLE", "HELD", "STREAM", "STREAMED", "STREAM_TAKES", "PIECE", "SPILL_RUN", "TAKEN",
    "TAKEN_FD", "decode", "encode",
]

# flag bits
XFER = 0x1  # pread/pwrite: hand me a file description instead of copying through the socket
WRITABLE = 0x1  # mmap/export: writable access
READONLY = 0x1  # import/info replies: the handle is read-only
HELD = 0x2  # import reply: this client already held that handle (re-import), nothing new to close
TO_END = 0x2  # mmap: map from offset to the end of the object (length ignored)
# mmap, create_mapped, pread/pwrite with XFER: the client takes the daemon's own fd of the
# memory (`server_fd`) itself (pidfd_getfd, client/daemon_fds.py): no fd in the reply.
# Honoured for memory the daemon holds as an fd; otherwise the reply carries an fd as usual.
TAKES_FD = 0x4
TAKEN = 0x2  # PreadReply/PwriteReply.flags: TAKES_FD honoured, `data` is a TAKEN_FD record
TAKEN_FD = struct.Struct("<iIQQ")  # (server_fd, 0, st_dev, st_ino): the daemon's fd of the memory and its identity
# pread with XFER: the bytes of a spilled object may come through a pipe, straight from spill
# storage, without bringing the object back (core/stream.py). The reply then says STREAMED.
STREAM = 0x2
STREAMED = 0x1  # PreadReply.flags
PIECE = struct.Struct("<qq")  # a STREAMED reply's data: (offset, length) of each run of bytes the pipe carries
# pread with XFER|STREAM|TAKES_FD: the client may instead read the runs from the daemon's own
# spill files, taken as TAKES_FD memory is (core/stream.py): STREAMED|TAKEN, `data` SPILL_RUN records.
STREAM_TAKES = 0x8
SPILL_RUN = struct.Struct("<iIQQqqq")  # (server_fd, 0, st_dev, st_ino, file offset, object offset, length)


# -- handshake ---------------------------------------------------------------------------

@dataclass(slots=True)
class HelloReq(Struct):
    LAYOUT = (("magic", "4s"), ("version", "H"), ("pad", "H"), ("flags", "I"))
    magic: bytes = b"UGEM"
    version: int = PROTOCOL_VERSION
    pad: int = 0
    flags: int = 0


@dataclass(slots=True)
class HelloReply(Struct):
    LAYOUT = (("magic", "4s"), ("version", "H"), ("pad", "H"), ("client_id", "I"), ("server_pid", "i"),
              ("max_payload", "I"), ("max_inline", "I"))
    magic: bytes = b"UGEM"
    version: int = PROTOCOL_VERSION
    pad: int = 0
    client_id: int = 0
    server_pid: int = 0
    max_payload: int = 0
    max_inline: int = 0


# -- generic -----------------------------------------------------------------------------

@dataclass(slots=True)
class LazyChannelReq(Struct):
    """LAZY_CHANNEL: the daemon's end of the client's lazy channel (a connected Unix stream
    socket; daemon/lazy.py, client/lazy.py). Reply: Empty."""
    LAYOUT = ()
    FDS = ("fd",)
    fd: OwnedFd | None = None


@dataclass(slots=True)
class Empty(Struct):
    LAYOUT = ()


@dataclass(slots=True)
class JsonReply(Struct):
    LAYOUT = ()
    TAIL = "data"
    data: bytes = b""


# -- objects -----------------------------------------------------------------------------

@dataclass(slots=True)
class CreateReq(Struct):
    LAYOUT = (("size", "q"), ("flags", "I"), ("pad", "I"))
    FLAGS = TAKES_FD  # GEM_CREATE_MAPPED only
    size: int = 0
    flags: int = 0
    pad: int = 0


@dataclass(slots=True)
class CreateReply(Struct):
    LAYOUT = (("handle", "I"), ("pad", "I"), ("size", "Q"))
    handle: int = 0
    pad: int = 0
    size: int = 0


@dataclass(slots=True)
class CloseReq(Struct):
    LAYOUT = (("handle", "I"), ("pad", "I"))
    handle: int = 0
    pad: int = 0


@dataclass(slots=True)
class InfoReq(Struct):
    LAYOUT = (("handle", "I"), ("flags", "I"))
    FLAGS = 0x1  # INFO_ASK_SOLE: also report INFO_SOLE (an older daemon refuses it: EINVAL)
    handle: int = 0
    flags: int = 0


@dataclass(slots=True)
class InfoReply(Struct):
    LAYOUT = (("size", "Q"), ("placement", "B"), ("madvise", "B"), ("flags", "H"), ("name", "I"),
              ("tiling", "I"), ("stride", "I"), ("caching", "I"), ("pad", "I"))
    FLAGS = 0x3F
    size: int = 0
    placement: int = 0
    madvise: int = 0
    flags: int = 0  # INFO_* bits below
    name: int = 0
    tiling: int = 0
    stride: int = 0
    caching: int = 0
    pad: int = 0


INFO_BUSY, INFO_PINNED, INFO_USERPTR, INFO_READONLY, INFO_FOREIGN, INFO_SOLE = 0x1, 0x2, 0x4, 0x8, 0x10, 0x20
INFO_ASK_SOLE = 0x1  # InfoReq.flags


@dataclass(slots=True)
class PreadReq(Struct):
    LAYOUT = (("handle", "I"), ("flags", "I"), ("offset", "q"), ("length", "q"))
    FLAGS = XFER | STREAM | TAKES_FD | STREAM_TAKES
    handle: int = 0
    flags: int = 0
    offset: int = 0
    length: int = 0


@dataclass(slots=True)
class PreadReply(Struct):
    """Inline: the bytes are `data`. XFER: read `length` bytes at `offset` from `fd`
    (a private read-only description), then send XFER_DONE(xfer_id); TAKEN (asked for with
    TAKES_FD): no `fd`, take the daemon's own that `data` names (TAKEN_FD). No `fd` and not
    TAKEN: the object has no pages, the range reads as zeros. STREAMED (asked for with STREAM):
    `fd` is a pipe carrying, in order, the bytes of the runs `data` lists (PIECE records,
    within the range asked for); the rest of the range reads as zeros; no XFER_DONE.
    STREAMED|TAKEN (asked for with STREAM_TAKES too): no `fd`; `data` lists the runs as
    SPILL_RUN records, each naming the daemon's spill file to take (as TAKEN_FD names
    memory) and where in it the run lies; the rest reads as zeros; then XFER_DONE(xfer_id)."""

    LAYOUT = (("xfer_id", "I"), ("flags", "I"))
    FLAGS = STREAMED | TAKEN
    TAIL = "data"
    FDS = ("fd",)
    xfer_id: int = 0
    flags: int = 0
    data: Any = b""
    fd: OwnedFd | None = None


@dataclass(slots=True)
class PwriteReq(Struct):
    LAYOUT = (("handle", "I"), ("flags", "I"), ("offset", "q"), ("length", "q"))
    FLAGS = XFER | TAKES_FD
    TAIL = "data"
    handle: int = 0
    flags: int = 0
    offset: int = 0
    length: int = 0
    data: Any = b""


@dataclass(slots=True)
class PwriteReply(Struct):
    """Inline: nothing. XFER: write at `offset` through `fd` (a private writable
    description), then send XFER_DONE(xfer_id); TAKEN (asked for with TAKES_FD): no `fd`,
    take the daemon's own that `data` names (TAKEN_FD)."""

    LAYOUT = (("xfer_id", "I"), ("flags", "I"))
    FLAGS = TAKEN
    TAIL = "data"
    FDS = ("fd",)
    xfer_id: int = 0
    flags: int = 0
    data: Any = b""
    fd: OwnedFd | None = None


@dataclass(slots=True)
class XferDoneReq(Struct):
    LAYOUT = (("xfer_id", "I"), ("pad", "I"))
    xfer_id: int = 0
    pad: int = 0


@dataclass(slots=True)
class MmapReq(Struct):
    LAYOUT = (("handle", "I"), ("flags", "I"), ("offset", "q"), ("length", "q"))
    FLAGS = WRITABLE | TO_END | TAKES_FD
    handle: int = 0
    flags: int = 0
    offset: int = 0
    length: int = 0  # 0: to the end of the object


@dataclass(slots=True)
class MmapReply(Struct):
    LAYOUT = (("map_id", "I"), ("pad", "I"), ("offset", "Q"), ("length", "Q"), ("server_fd", "i"), ("pad2", "I"),
              ("dev", "Q"), ("ino", "Q"))
    FDS = ("fd",)
    map_id: int = 0
    pad: int = 0
    offset: int = 0
    length: int = 0
    server_fd: int = -1  # the daemon's own fd of that memory (-1: none): core/shares.py GEM_CLAIM_MAPPED, TAKES_FD
    pad2: int = 0
    dev: int = 0  # that memory's identity (st_dev, st_ino), for a client that takes `server_fd` to check
    ino: int = 0
    fd: OwnedFd | None = None  # none with TAKES_FD where honoured


@dataclass(slots=True)
class MunmapReq(Struct):
    """Release tracked mappings; the ids are u32s in `ids` (at most MAX_IDS per request:
    a client splits a longer list into several requests)."""

    LAYOUT = ()
    TAIL = "ids"
    ids: bytes = b""


MAX_IDS = MAX_PAYLOAD // 4  # u32 ids that fit in one request frame


@dataclass(slots=True)
class CloseBatchReq(Struct):
    """GEM_CLOSE of every handle in `handles` (u32s, at most MAX_IDS per request) that the
    client holds, skipping the others: how a client closes the handles of Buffers it
    dropped, in one round trip."""

    LAYOUT = ()
    TAIL = "handles"
    handles: bytes = b""


@dataclass(slots=True)
class FlinkReq(Struct):
    LAYOUT = (("handle", "I"), ("pad", "I"))
    handle: int = 0
    pad: int = 0


@dataclass(slots=True)
class FlinkReply(Struct):
    LAYOUT = (("name", "I"), ("pad", "I"))
    name: int = 0
    pad: int = 0


@dataclass(slots=True)
class OpenReq(Struct):
    LAYOUT = (("name", "I"), ("pad", "I"))
    name: int = 0
    pad: int = 0


@dataclass(slots=True)
class OpenReply(Struct):
    LAYOUT = (("handle", "I"), ("pad", "I"), ("size", "Q"))
    handle: int = 0
    pad: int = 0
    size: int = 0


@dataclass(slots=True)
class ExportReq(Struct):
    LAYOUT = (("handle", "I"), ("flags", "I"))
    FLAGS = WRITABLE
    handle: int = 0
    flags: int = 0


@dataclass(slots=True)
class ReuseReq(Struct):
    """GEM_REUSE: may the object behind one of this client's tracked mappings take new
    contents in place (core/recycle.py)?"""

    LAYOUT = (("map_id", "I"), ("pad", "I"))
    map_id: int = 0
    pad: int = 0


@dataclass(slots=True)
class MapExportReq(Struct):
    """PRIME_MAP_TO_FD: export the object behind one of this client's tracked mappings."""

    LAYOUT = (("map_id", "I"), ("flags", "I"))
    FLAGS = WRITABLE
    map_id: int = 0
    flags: int = 0


@dataclass(slots=True)
class ExportReply(Struct):
    LAYOUT = ()
    FDS = ("fd",)
    fd: OwnedFd | None = None


@dataclass(slots=True)
class ImportReq(Struct):
    LAYOUT = (("flags", "I"), ("pad", "I"))
    FDS = ("fd",)
    flags: int = 0
    pad: int = 0
    fd: OwnedFd | None = None


@dataclass(slots=True)
class ImportReply(Struct):
    LAYOUT = (("handle", "I"), ("flags", "I"), ("size", "Q"))
    FLAGS = READONLY | HELD
    handle: int = 0
    flags: int = 0
    size: int = 0


@dataclass(slots=True)
class HandleReq(Struct):
    LAYOUT = (("handle", "I"), ("pad", "I"))
    handle: int = 0
    pad: int = 0


@dataclass(slots=True)
class MadviseReq(Struct):
    LAYOUT = (("handle", "I"), ("advice", "I"))
    handle: int = 0
    advice: int = 0


@dataclass(slots=True)
class MadviseReply(Struct):
    LAYOUT = (("retained", "I"), ("pad", "I"))
    retained: int = 0
    pad: int = 0


@dataclass(slots=True)
class UserptrReq(Struct):
    """Wrap memory without copying: over the wire, [offset, offset+length) of the sealed
    memfd in `fd`; in-process (embedded) the caller's buffer-protocol object instead
    (`Call.buffer`, core/call.py)."""

    LAYOUT = (("flags", "I"), ("pad", "I"), ("offset", "q"), ("length", "q"))
    FLAGS = READONLY
    FDS = ("fd",)
    flags: int = 0
    pad: int = 0
    offset: int = 0
    length: int = 0
    fd: OwnedFd | None = None


def layout_fields(cls: type[Struct]) -> list[str]:
    """Field names of a struct, for docs and the request table listing."""
    return [f.name for f in fields(cls)]  # type: ignore[arg-type]
