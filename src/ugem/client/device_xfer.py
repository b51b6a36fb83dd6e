"""Bulk pread/pwrite over the daemon (XFER), a mixin of Device (client/device.py).

Beyond the transport's `inline_limit` the bytes do not travel in frames: the daemon hands
over its object's memory as an fd, this process does the one copy (client/bulk.py), then
reports XFER_DONE (which fails EFAULT if the object was purged meanwhile: the bytes moved
were not its contents).

Rules:
- where this process may copy the daemon's fds (its uid, or root: client/daemon_fds.py) a
  transfer asks TAKES_FD: the reply (TAKEN) names the daemon's own fd and its memory's
  identity instead of carrying a new description; this process copies that fd, checks it
  is that memory, and closes it once the copy is done. No description of the object then
  leaves the daemon, so a freed object moved this way may back a new one (core/recycle.py:
  its memfd is pooled) where one whose description left may not. The daemon may still
  answer with an fd (an object pinned in device memory goes through a bounce buffer);
- a transfer runs as a mapping is made (`_mapping`: client/device_share.py, fork.py): a
  fork of this process meanwhile, whose child would inherit the daemon's fd, tells the
  manager first (MAPPINGS_FORKED), so that the object escapes as a forked mapping's does;
- if the copy of the daemon's fd fails its check (the object was purged and its memfd
  closed meanwhile, or the kernel refuses now) the transfer is ended (XFER_DONE: EFAULT if
  purged) and asked again with an fd;
- a daemon that does not know a flag answers EINVAL: the request is asked again without it
  (STREAM_TAKES first, then TAKES_FD, then STREAM) and the flag is not asked again if that
  succeeds; an EINVAL of the request's own comes back again and is raised;
- a pread into a buffer may ask STREAM: a spilled object's bytes come through a pipe from
  spill storage (core/stream.py) and it stays spilled; with TAKES_FD it asks STREAM_TAKES
  too, and the daemon may name its spill files instead (STREAMED|TAKEN): this process copies
  them, checks each is the file named, reads the runs from them in parts on its copy threads
  (client/bulk.py `read_runs`), closes them and ends the transfer (XFER_DONE). If a copy
  fails its check, the transfer is ended and asked again without STREAM_TAKES;
- `write_taken(handle, frames)`: several buffers written one after another from offset 0 in
  one request, straight into the daemon's own memfd of an object, copied as for a TAKES_FD
  mapping (a tracked mapping asked for, never mapped, released once written, all under
  `_mapping()`): like a transfer that takes the daemon's fd it leaves the object's memfd
  recyclable (core/recycle.py), and unlike a mapping it fills no page tables: the kernel
  writes into the pages a recycled memfd holds, or allocates new ones without zeroing them
  first. False, with nothing written, where this process may not copy the daemon's fds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..bufview import flat_bytes
from ..errors import InvalidArgument, IOFailure, OutOfMemory
from ..fd import OwnedFd
from ..wire import structs as s
from ..wire.frames import Op
from .args import ident
from .bulk import pread_all, preadv_all, pwritev_all, read_runs, read_streamed

__all__ = ["TransferOps"]


class TransferOps:
    _released: Any  # the Device's release queue (client/releases.py)
    _streams: bool  # the Device's: preads into a buffer may ask STREAM
    _xfer_takes = True  # transfers may ask TAKES_FD (until a daemon says EINVAL to it)
    _stream_takes = True  # streamed preads may ask STREAM_TAKES (likewise)

    def _call(self, op: Op, req: s.Struct, **local: Any) -> Any:
        raise NotImplementedError

    def _take_flag(self) -> int:
        raise NotImplementedError

    def _fds(self) -> Any:
        raise NotImplementedError

    def _mapping(self) -> Any:
        raise NotImplementedError

    def _take(self, reply: s.MmapReply) -> bool:
        raise NotImplementedError

    def _pread_xfer(self, handle: int, offset: int, length: int, into: Any) -> bytes:
        """Read [offset, offset + length) of `handle` into `into` (or, with None, return it)."""
        stream = s.STREAM if into is not None and self._streams else 0  # into a buffer: a spilled object may stream
        req = s.PreadReq(handle=handle, flags=s.XFER | stream, offset=offset, length=length)
        with self._mapping():  # (module rules: a fork meanwhile)
            return self._read(req, into)

    def _read(self, req: s.PreadReq, into: Any) -> bytes:
        handle, offset, length = req.handle, req.offset, req.length
        reply: s.PreadReply = self._transfer(Op.GEM_PREAD, req)
        if reply.flags & s.STREAMED and reply.flags & s.TAKEN:
            if self._read_spilled(reply, into, offset):
                return b""
            reply = self._transfer(Op.GEM_PREAD, req, spill_files=False)  # (a spill file changed hands) a pipe
        try:
            if reply.flags & s.STREAMED:
                if reply.fd is None:  # (never asked for: not zeros)
                    raise IOFailure(f"pread of handle {handle}: a streamed reply came without its pipe")
                with reply.fd as fd:
                    read_streamed(fd, reply.data, into, offset)
                return b""
            if reply.fd is None:  # no pages yet: zeros, and nothing to release
                if into is None:
                    return bytes(length)
                np.frombuffer(into, dtype=np.uint8).fill(0)
                return b""
            with reply.fd as fd:
                try:
                    if into is None:
                        return pread_all(fd, length, offset)
                    preadv_all(fd, into, offset)
                    return b""
                finally:
                    self._call(Op.XFER_DONE, s.XferDoneReq(xfer_id=reply.xfer_id))
        except MemoryError:
            raise OutOfMemory(f"pread of {length} bytes of handle {handle}: this process cannot hold that "
                              f"much at once; read it into a buffer of your own with pread_into, in parts, "
                              f"or map the object") from None

    def _read_spilled(self, reply: s.PreadReply, into: Any, offset: int) -> bool:
        """Read a STREAMED|TAKEN reply's runs from the daemon's spill files (module rules);
        False, with the transfer ended and nothing read, if a file fails its check."""
        runs = list(s.SPILL_RUN.iter_unpack(reply.data))
        files: dict[int, OwnedFd] = {}
        try:
            for server_fd, _, dev, ino, _, _, _ in runs:
                if server_fd not in files:
                    fd = self._fds().take(server_fd, (dev, ino))
                    if fd is None:
                        self._call(Op.XFER_DONE, s.XferDoneReq(xfer_id=reply.xfer_id))
                        return False
                    files[server_fd] = fd
            try:
                read_runs(files, runs, into, offset)
            finally:
                self._call(Op.XFER_DONE, s.XferDoneReq(xfer_id=reply.xfer_id))
            return True
        finally:
            for fd in files.values():
                fd.close()

    def _pwrite_xfer(self, handle: int, offset: int, view: memoryview) -> None:
        """Write `view` at `offset` of `handle`."""
        req = s.PwriteReq(handle=handle, flags=s.XFER, offset=offset, length=len(view))
        with self._mapping():  # (module rules: a fork meanwhile)
            reply: s.PwriteReply = self._transfer(Op.GEM_PWRITE, req)
            if reply.fd is None:
                return
            with reply.fd as fd:
                try:
                    pwritev_all(fd, view, offset)
                finally:
                    self._call(Op.XFER_DONE, s.XferDoneReq(xfer_id=reply.xfer_id))

    def _transfer(self, op: Op, req: s.PreadReq | s.PwriteReq, spill_files: bool = True) -> Any:
        """Open the transfer `req` asks (TAKES_FD added where it may be); the reply's `fd` is
        the memory to copy from or to (module rules), None only where a pread reads zeros."""
        if self._xfer_takes:
            req.flags |= self._take_flag()
            req.flags &= ~s.STREAM_TAKES
            if req.flags & s.STREAM and req.flags & s.TAKES_FD and self._stream_takes and spill_files:
                req.flags |= s.STREAM_TAKES  # (a spilled object's runs may come as spill files to take)
        while True:
            reply = self._call_dropping(op, req)
            if not reply.flags & s.TAKEN or reply.flags & s.STREAMED:  # (STREAMED|TAKEN: `_read_spilled`)
                return reply
            server_fd, _, dev, ino = s.TAKEN_FD.unpack_from(reply.data)
            fd: OwnedFd | None = self._fds().take(server_fd, (dev, ino))
            if fd is not None:
                reply.fd, reply.data = fd, b""
                return reply
            self._call(Op.XFER_DONE, s.XferDoneReq(xfer_id=reply.xfer_id))  # EFAULT if it was purged
            req.flags &= ~(s.TAKES_FD | s.STREAM_TAKES)  # (the memory changed hands meanwhile) ask again for an fd

    def _call_dropping(self, op: Op, req: s.PreadReq | s.PwriteReq) -> Any:
        """`_call`, asked again without the flags an older daemon may not know (module rules)."""
        try:
            return self._call(op, req)
        except InvalidArgument:
            for bit in (s.STREAM_TAKES, s.TAKES_FD, s.STREAM):
                if not req.flags & bit:
                    continue
                req.flags &= ~bit
                try:
                    reply = self._call(op, req)
                except InvalidArgument:
                    continue
                if bit == s.STREAM_TAKES:
                    self._stream_takes = False
                elif bit == s.TAKES_FD:
                    self._xfer_takes = False
                else:
                    self._streams = False
                return reply
            raise

    def write_taken(self, handle: int, frames: Sequence[Any]) -> bool:
        """Write the contiguous buffers `frames` one after another from offset 0 of object
        `handle`, through the daemon's own fd of its memory (module rules); False if this
        process may not copy the daemon's fds (nothing written: write it another way)."""
        views = [flat_bytes(f, writable=False, what="write_taken data") for f in frames]
        req = s.MmapReq(handle=ident(handle), flags=s.WRITABLE | s.TO_END | self._take_flag())
        if not req.flags & s.TAKES_FD:
            return False
        with self._mapping():
            reply: s.MmapReply = self._call(Op.GEM_MMAP, req)
            try:
                if not self._take(reply):
                    return False
                assert reply.fd is not None
                with reply.fd as fd:
                    length = sum(len(v) for v in views)
                    if length > reply.length:
                        raise InvalidArgument(f"write_taken of {length} bytes into handle {req.handle} of "
                                              f"{reply.length} bytes")
                    position = reply.offset
                    for view in views:
                        pwritev_all(fd, view, position)
                        position += len(view)
            finally:
                self._released.append(reply.map_id)
        return True
