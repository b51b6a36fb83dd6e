"""Device: the public handle-layer API of SPEC §2, identical over both transports.

A Device is one client. Its methods check their arguments (client/args.py: anything but an integer where one
is expected is EINVAL naming it, in both modes) and build request structs sent through its transport; the only
mode-specific code is how bulk data moves:

- embedded: the handler copies straight between the caller's buffer and the object
  (a `pread` beyond the transport's `inline_limit` takes the XFER path below in both modes,
  so its result is allocated only after the manager accepted the range);
- daemon: up to `inline_limit` bytes travel inside the frame (wire.frames.XFER_ABOVE, or
  less if the daemon's HELLO advertises a smaller `max_inline`); beyond that the daemon hands
  over the object's memory as an fd (XFER: a private description, or its own fd, which this
  process copies where it may: client/device_xfer.py) and this process does the one copy
  with preadv/pwritev, then reports XFER_DONE.

Mappings hold no fd (backing/mapping.py); each is entered in this process's registry of ugem mappings
(client/registry.py), which pickling by reference consults. When the last view of a mapping dies, a finalizer
removes it from the registry and queues its id; when a Buffer is dropped without `close()`, its finalizer
queues its handle's record (client/releases.py has the rules); so do shares this process received but did not
need to map (client/device_share.py). Queued releases go out with the next request, pipelined in the same
write (GEM_DROP_SHARES, GEM_MUNMAP, then GEM_CLOSE_BATCH for the handles no live Buffer wraps any more, in as
many frames as they need; no round trip of their own), never from a finalizer itself, which may run at any
moment (even mid-request); `close()` sends the shares it holds back (client/batch.py) and drops the rest, as
the manager releases everything then.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ..bufview import flat_bytes
from ..constants import ADVICE_LABELS, PLACEMENT_LABELS, page_align
from ..errors import BadFd, InvalidArgument, TimedOut
from ..fd import OwnedFd
from ..wire import structs as s
from ..wire.frames import Op
from .args import flag, i64, ident, index, u32
from .device_ops import DeviceOps
from .device_share import ShareOps
from .device_xfer import TransferOps
from .fork import ForkedTransport, track_for_fork
from .releases import Releases, Wrapped

if TYPE_CHECKING:
    from ..manager import Manager
    from .buffer import Buffer

__all__ = ["Device", "ObjectInfo"]


@dataclass(frozen=True)
class ObjectInfo:
    size: int
    placement: str
    madvise: str
    name: int
    tiling: int
    stride: int
    caching: int
    busy: bool
    pinned: bool
    userptr: bool
    readonly: bool


# InfoReply.flags & _INFO_MASK -> ObjectInfo's (busy, pinned, userptr, readonly), looked up per info()
_INFO_MASK = s.INFO_BUSY | s.INFO_PINNED | s.INFO_USERPTR | s.INFO_READONLY
_INFO_FLAGS = tuple((bool(f & s.INFO_BUSY), bool(f & s.INFO_PINNED), bool(f & s.INFO_USERPTR),
                     bool(f & s.INFO_READONLY)) for f in range(_INFO_MASK + 1))
# ops of the per-call paths, looked up once (each `Op.X` costs 0.1 us on Python 3.11)
_CREATE, _CLOSE, _INFO = Op.GEM_CREATE, Op.GEM_CLOSE, Op.GEM_INFO


class Transport(Protocol):
    embedded: bool
    client_id: int
    inline_limit: int  # pread/pwrite bytes sent inside a frame; more take the XFER path

    @property
    def lost(self) -> bool: ...

    def call(self, op: Op, req: s.Struct, notes: Sequence[tuple[Op, s.Struct]] = (), **local: Any) -> Any: ...

    def post(self, frames: Sequence[tuple[Op, s.Struct]]) -> None: ...

    def post_lazy(self, frames: Sequence[tuple[Op, s.Struct]]) -> None: ...  # (client/lazy.py)

    def close(self) -> None: ...

    def forsake(self) -> None: ...


def _byte_view(buffer: Any, writable: bool) -> memoryview:
    return flat_bytes(buffer, writable=writable, what="the pread_into buffer" if writable else "pwrite data")


class Device(DeviceOps, ShareOps, TransferOps):
    """One client of a ugem manager. Use as a context manager; `close()` releases all."""

    def __init__(self, transport: Transport) -> None:
        self._transport: Transport | None = transport
        self._releases = Releases()
        self._released = self._releases.queue  # what finalizers append to (releases.py)
        self._owned_manager: Manager | None = None
        self._closed_why = "this Device is closed"
        self._pid = os.getpid()
        self._forked = False  # used in a forked child of the process that made it (no getpid: a system call)
        self._share_lock = threading.Lock()  # client/device_share.py
        self._send_lock = threading.RLock()  # drain the queue and send it as one step
        self._mapping_threads: set[int] = set()  # threads making a mapping now (client/fork.py)
        self._streams = not transport.embedded  # preads into a buffer may ask for STREAM (core/stream.py)
        track_for_fork(self)

    # -- plumbing --------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._transport is None

    @property
    def client_id(self) -> int:
        return self._live().client_id

    def _live(self) -> Transport:
        if self._transport is None:
            raise BadFd(self._closed_why)
        return self._transport

    def _call(self, op: Op, req: s.Struct, **local: Any) -> Any:
        transport = self._transport
        if transport is None:
            raise BadFd(self._closed_why)
        try:
            with self._send_lock:  # what is queued goes first, whichever thread sends it
                notes = self._releases.requests() if self._released or self._releases.claims else None
                if notes:
                    return transport.call(op, req, notes, **local)
                return transport.call(op, req, **local) if local else transport.call(op, req)
        except TimedOut:  # the transport closed the connection: so is this Device
            self._transport = None
            self._closed_why = "this Device was closed when a call got no reply within its timeout; connect again"
            raise

    def _unwrap(self, record: Wrapped) -> None:
        """A Buffer was closed: close its handle if no other live Buffer wraps it."""
        handle = self._releases.unwrap(record)
        if handle is not None:
            self._call(Op.GEM_CLOSE, s.CloseReq(handle=handle))

    def _connection_lost(self) -> bool:
        """Whether the daemon went away (every later call raises DaemonGone): not closed, but dead."""
        transport = self._transport
        return transport is not None and transport.lost

    def _after_fork_in_child(self) -> None:
        """This process is a forked child of the one that made this Device (transport.py)."""
        self._forked = True
        transport = self._transport
        if transport is not None:
            transport.forsake()
            self._transport = ForkedTransport(transport.embedded, transport.client_id, self._pid)
        self._releases.after_fork_in_child()

    def close(self) -> None:
        """Release every handle, mapping record and pin of this client; idempotent."""
        self._send_held()
        transport, self._transport = self._transport, None
        self._close_daemon_fds()
        if transport is not None:
            transport.close()
        if self._owned_manager is not None:
            self._owned_manager.close()

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- objects ---------------------------------------------------------------------

    def create(self, size: int) -> int:
        return int(self._call(_CREATE, s.CreateReq(i64(size, "size"))).handle)  # (positional: size)

    def close_handle(self, handle: int) -> None:
        handle = ident(handle)
        self._call(_CLOSE, s.CloseReq(handle))
        self._releases.closed(handle)  # its Buffers are dead now (never send its number again)

    def info(self, handle: int) -> ObjectInfo:
        r: s.InfoReply = self._call(_INFO, s.InfoReq(ident(handle)))  # (positional: handle)
        # built without the frozen __init__ (one object.__setattr__ per field: 2 us, a
        # tenth of a daemon round trip) nor keywords; the result is the same frozen dataclass
        info = object.__new__(ObjectInfo)
        fields = info.__dict__
        fields["size"] = r.size
        fields["placement"] = PLACEMENT_LABELS[r.placement]
        fields["madvise"] = ADVICE_LABELS[r.madvise]
        fields["name"] = r.name
        fields["tiling"] = r.tiling
        fields["stride"] = r.stride
        fields["caching"] = r.caching
        fields["busy"], fields["pinned"], fields["userptr"], fields["readonly"] = _INFO_FLAGS[r.flags & _INFO_MASK]
        return info

    # -- bulk data -------------------------------------------------------------------

    def pread(self, handle: int, offset: int, length: int) -> bytes:
        # Beyond the inline limit (or a negative length) both modes take the XFER path, which
        # allocates the result only once the manager has accepted the range: an absurd
        # length is EINVAL there, and one this process cannot hold is ENOMEM, never a
        # MemoryError.
        handle, offset, length = ident(handle), i64(offset, "offset"), i64(length, "length")
        if 0 <= length <= self._live().inline_limit:
            buf = bytearray(max(length, 0))
            self._pread(handle, offset, length, buf)
            return bytes(buf)
        return self._pread_xfer(handle, offset, length, None)

    def pread_into(self, handle: int, offset: int, buffer: Any) -> int:
        handle, offset = ident(handle), i64(offset, "offset")
        view = _byte_view(buffer, writable=True)
        self._pread(handle, offset, len(view), view)
        return len(view)

    def _pread(self, handle: int, offset: int, length: int, into: memoryview | bytearray) -> None:
        req = s.PreadReq(handle=handle, offset=offset, length=length)
        transport = self._live()
        if transport.embedded:
            self._call(Op.GEM_PREAD, req, into=into)
        elif length <= transport.inline_limit:
            reply: s.PreadReply = self._call(Op.GEM_PREAD, req)
            if length > 0:
                into[:] = reply.data
        else:
            self._pread_xfer(handle, offset, length, into)

    def pwrite(self, handle: int, offset: int, data: Any) -> None:
        handle, offset = ident(handle), i64(offset, "offset")
        view = _byte_view(data, writable=False)
        req = s.PwriteReq(handle=handle, offset=offset, length=len(view), data=view)
        transport = self._live()
        if transport.embedded or len(view) <= transport.inline_limit:
            self._call(Op.GEM_PWRITE, req)
            return
        self._pwrite_xfer(handle, offset, view)  # (client/device_xfer.py)

    # -- mappings --------------------------------------------------------------------

    def mmap(self, handle: int, *, offset: int = 0, length: int | None = None, writable: bool = True) -> memoryview:
        return self._mmap(handle, offset, length, flag(writable, "writable"))

    def _mmap(self, handle: int, offset: int, length: int | None, writable: bool, linger: bool = False) -> memoryview:
        """`mmap`; with `linger` the mapping lingers once its last view dies (a Buffer's: buffer.py `_view`)."""
        flags = (s.WRITABLE if writable else 0) | (s.TO_END if length is None else 0) | self._take_flag()
        req = s.MmapReq(handle=ident(handle), flags=flags, offset=i64(offset, "offset"),
                        length=0 if length is None else i64(length, "length"))
        with self._mapping():  # (client/fork.py)
            reply = self._call(Op.GEM_MMAP, req)
            if not self._take(reply):  # (rare) its memory changed meanwhile: ask again for an fd
                self._released.append(reply.map_id)
                req.flags &= ~s.TAKES_FD
                reply = self._call(Op.GEM_MMAP, req)
            return self._map_reply(reply, writable, f"handle {req.handle}", linger)

    # -- memory management -----------------------------------------------------------

    def madvise(self, handle: int, advice: int) -> bool:
        """WILLNEED or DONTNEED; returns whether the contents are retained (not purged)."""
        r: s.MadviseReply = self._call(Op.GEM_MADVISE, s.MadviseReq(handle=ident(handle), advice=u32(advice, "advice")))
        return bool(r.retained)

    def pin(self, handle: int) -> None:
        self._call(Op.GEM_PIN, s.HandleReq(handle=ident(handle)))

    def unpin(self, handle: int) -> None:
        self._call(Op.GEM_UNPIN, s.HandleReq(handle=ident(handle)))

    # -- sharing ---------------------------------------------------------------------

    def flink(self, handle: int) -> int:
        return int(self._call(Op.GEM_FLINK, s.FlinkReq(handle=ident(handle))).name)

    def open_name(self, name: int) -> tuple[int, int]:
        r: s.OpenReply = self._call(Op.GEM_OPEN, s.OpenReq(name=ident(name, "name")))
        return r.handle, r.size

    def export(self, handle: int, *, writable: bool = True) -> int:
        r: s.ExportReply = self._call(Op.PRIME_HANDLE_TO_FD, s.ExportReq(
            handle=ident(handle), flags=s.WRITABLE if flag(writable, "writable") else 0))
        assert r.fd is not None
        return r.fd.detach()

    def import_fd(self, fd: int) -> int:
        return self._import_fd(fd)[0]

    def _import_fd(self, fd: int) -> tuple[int, bool]:
        """import_fd, and whether this client already held that handle (then it is not new)."""
        self._live()
        r: s.ImportReply = self._call(Op.PRIME_FD_TO_HANDLE, s.ImportReq(fd=_dup(fd)))
        return int(r.handle), bool(r.flags & s.HELD)

    def _export_mapping(self, map_id: int, writable: bool) -> int:
        """PRIME_MAP_TO_FD: an fd (owned by the caller) to the object behind one of this
        client's tracked mappings; needs no handle (pickling by reference, client/pickling.py)."""
        r: s.ExportReply = self._call(Op.PRIME_MAP_TO_FD, s.MapExportReq(
            map_id=map_id, flags=s.WRITABLE if writable else 0))
        assert r.fd is not None
        return r.fd.detach()

    def userptr(self, buffer: Any, *, readonly: bool = False) -> int:
        """Wrap existing memory without copying. Embedded: any buffer-protocol object with
        page-aligned address and length (or (fd, offset, length)); over the daemon:
        (fd, offset, length) of a memfd sealed against shrinking."""
        req = s.UserptrReq(flags=s.READONLY if flag(readonly, "readonly") else 0)
        if isinstance(buffer, tuple):
            if len(buffer) != 3:
                raise InvalidArgument(f"userptr takes (fd, offset, length), got a tuple of {len(buffer)}")
            fd, offset, length = buffer
            offset, length = i64(offset, "userptr offset"), i64(length, "userptr length")
            self._live()
            req.fd, req.offset, req.length = _dup(fd), offset, length
        elif self._live().embedded:
            return int(self._call(Op.GEM_USERPTR, req, buffer=buffer).handle)
        else:
            raise InvalidArgument("over the daemon, userptr takes (fd, offset, length) of a sealed memfd")
        return int(self._call(Op.GEM_USERPTR, req).handle)

    # -- manager-wide ----------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return dict(json.loads(self._call(Op.STATS, s.Empty()).data))

    def list_objects(self) -> list[dict[str, Any]]:
        """Every object of the manager (privileged): the rows of `ugem ls --json`."""
        return list(json.loads(self._call(Op.LIST_OBJECTS, s.Empty()).data))

    def list_clients(self) -> list[dict[str, Any]]:
        """Every client with its handles -> object ids (privileged)."""
        return list(json.loads(self._call(Op.LIST_CLIENTS, s.Empty()).data))

    def debug_open(self, object_id: int) -> int:
        """A new read-only handle to object `object_id` (privileged; for debugging tools)."""
        r: s.OpenReply = self._call(Op.DEBUG_OPEN, s.HandleReq(handle=ident(object_id, "object_id")))
        return int(r.handle)

    def hangup_fd(self) -> int | None:
        """A new fd (the caller closes it, before this Device) on the connection to the daemon, to poll for
        POLLRDHUP/POLLHUP: the daemon closed it or died. Never read from it. None if embedded (no daemon to lose)."""
        fileno = getattr(self._live(), "fileno", None)
        return None if fileno is None else os.dup(fileno())

    # -- object layer ----------------------------------------------------------------

    def new(self, size: int) -> Buffer:
        """Create an object and wrap it in a Buffer (closes its handle when done)."""
        from .buffer import Buffer

        handle = self.create(size)
        return Buffer(self, handle, page_align(index(size, "size")), readonly=False)


def _dup(fd: Any) -> OwnedFd:
    """Our own copy of a caller's fd for a request (the transport closes it once sent)."""
    number = index(fd, "fd")
    try:
        return OwnedFd(os.dup(number))
    except (OSError, OverflowError) as exc:
        raise BadFd(f"fd {number} is not an open file descriptor") from exc
