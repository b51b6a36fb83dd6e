"""MemfdStore: object pages in sealed memfds (SPEC §3 "system").

Each object's memory is its own memfd: MFD_CLOEXEC|MFD_ALLOW_SEALING, sized once and
sealed F_SEAL_SHRINK|F_SEAL_GROW|F_SEAL_SEAL, mode 0400, named ``ugem:<token>`` where the
token is random per manager (how `inspect` recognises its own memfds coming back).

Rules:
- The description memfd_create returns is the manager's own: it is never sent to anyone.
  Clients get *new* descriptions, opened through /proc/self/fd (`open_description`), so a
  client changing its description's flags (O_APPEND, O_NONBLOCK) cannot touch ours.
- Mode 0400 means no non-root process can open one of our memfds for writing through
  /proc; to make a writable description for a client, a non-root manager briefly makes
  its own memfd 0600 (it is the owner) and restores 0400 at once.
- Imported memory is accepted only from memfds sealed against shrinking, with a nonzero
  page-aligned size (SPEC §6); anything else is EINVAL.
- Every object with pages holds one fd here, so their number is bounded by RLIMIT_NOFILE
  (SPEC §7). `open_count` counts the memfds `create`/`adopt` handed out and `release` has
  not closed; `max_open` is the soft limit less a reserve for connections, transfers,
  device copies (`device_file`: at most 64 descriptions at once) and the manager's own
  files. The core keeps `open_count` under `max_open` by spilling (it
  closes the spilled object's memfd); should memfd_create still run out of fds, the error
  is ENOMEM naming the limit.
- Freed objects' memfds may be kept for reuse instead of closed (`release` with a uid:
  the pool of recycle.py, its rules there); `create` with a uid takes a zeroed one of
  exactly that size and uid first. Pooled memfds are not in `open_count`: `pooled_fds`
  counts them, and the core keeps `open_count + pooled_fds` under `max_open` (it drops
  pooled ones first). A memfd that has been pooled keeps the store's mapping of it (for
  the next zeroing) until it is closed; the device uses that mapping too (`map`), and
  copies through it rather than with preadv/pwritev (`device_file` None): its page tables
  are filled, so a copy runs at memcpy speed where pwritev runs at under half of it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import resource
import secrets
import stat
from collections.abc import Callable
from typing import Any

import numpy as np

from ..address import data_address
from ..bufview import flat_bytes
from ..constants import PAGE_SIZE, page_align
from ..errors import InvalidArgument, OutOfMemory
from ..fd import OwnedFd
from ..parts import preadv_into
from .base import FdKind, Inspection
from .mapping import MAPPED_MIN, map_shared, read_mapped
from .preload import load_file, open_source
from .recycle import MAX_FDS, MemfdPool, Pooled
from .spill import Extent, SpillStore, data_segments, punch_hole
from .spill_read import Run

__all__ = ["MemfdStore"]

_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
_WRITE_SEALS = fcntl.F_SEAL_WRITE | getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x10)
_MAX_IO = 1 << 30  # one preadv/pwritev moves at most this much (the kernel caps near 2 GiB)
_DEVICE_FILE_MIN = 1 << 20  # objects this big get a description for a device copy ...
_DEVICE_FILES = 64  # ... at most this many at once (closed by the device as each copy ends)


def fd_reserve(limit: int) -> int:
    """Fds kept back from object memfds: an eighth of the limit, between 32 and 4096."""
    return min(max(limit // 8, 32), 4096)


class MemfdStore:
    def __init__(self, spill_dir: str, max_open: int | None = None) -> None:
        self.token = secrets.token_hex(8)
        self._name = f"ugem:{self.token}"
        self._link = f"/memfd:{self._name} (deleted)"
        self.spill = SpillStore(spill_dir)
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft == resource.RLIM_INFINITY:
            soft = 1 << 20
        self.open_count = 0
        self._device_files: list[OwnedFd] = []  # handed to device copies; they close them
        if max_open is None:
            self.max_open = max(soft - fd_reserve(soft), 16)
            self.limit_text = (f"the fd limit (RLIMIT_NOFILE {soft}, less {soft - self.max_open} "
                               f"kept for connections): {self.max_open} object memfds")
        else:
            self.max_open = max_open
            self.limit_text = f"the limit of {max_open} object memfds"
        self.pool = MemfdPool(min(MAX_FDS, self.max_open // 8))
        self._views: dict[OwnedFd, Any] = {}  # memfds that were pooled -> the store's mapping of each

    @property
    def pooled_bytes(self) -> int:
        return self.pool.bytes

    @property
    def pooled_fds(self) -> int:
        return self.pool.count

    @property
    def recycled(self) -> int:
        return self.pool.recycled

    def close(self) -> None:
        """Close the pool and remove spill storage (objects must have been released first)."""
        self.pool.close()
        self._views.clear()
        self.spill.close()

    open_source = staticmethod(open_source)  # preloaded objects (preload.py)
    load_file = staticmethod(load_file)

    # -- lifetime --------------------------------------------------------------------

    def create(self, size: int, uid: int | None = None) -> OwnedFd:
        entry = None if uid is None else self.pool.take(size, uid)
        fd = self.scratch(size) if entry is None else self._renumbered(entry)
        self.open_count += 1
        return fd

    def _renumbered(self, entry: Pooled) -> OwnedFd:
        """A pooled memfd under a new fd number: a late receiver of a pickle of the object it
        backed before (pidfd_getfd of the old `server_fd`, checked by memfd identity: GEM_CLAIM_MAPPED)
        must not find the same memory, now another object's, under the number it was told."""
        try:
            fd = entry.fd.dup()
        except OSError:  # no fd for the copy: a fresh memfd instead (ENOMEM naming the limit if none)
            entry.fd.close()
            return self.scratch(entry.size)
        entry.fd.close()
        self._views[fd] = entry.view
        return fd

    def scratch(self, size: int) -> OwnedFd:
        try:
            fd = OwnedFd(os.memfd_create(self._name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING))
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                raise OutOfMemory(f"no fd for a memfd of {size} bytes ({os.strerror(exc.errno)}): "
                                  f"{self.open_count} object memfds open, {self.limit_text}") from None
            raise
        try:
            os.ftruncate(fd.fd, size)
            fcntl.fcntl(fd.fd, fcntl.F_ADD_SEALS, _SEALS)
            os.fchmod(fd.fd, 0o400)
        except BaseException:
            fd.close()
            raise
        return fd

    def release(self, backing: OwnedFd, uid: int | None = None, room: int = 0) -> Pooled | None:
        """Close our memfd; with a `uid`, pool it instead if it may take `room` more bytes
        (recycle.py): the entry then returned is handed out once `clear` and `zeroed` ran."""
        self.open_count -= 1
        view = self._views.pop(backing, None)
        if uid is not None:
            st = os.fstat(backing.fd)
            if self.pool.accepts(st.st_size, st.st_blocks * 512, room):
                cold = view is None
                try:
                    if view is None:
                        view = map_shared(backing.fd, 0, st.st_size, True)
                except OSError:  # no address space for it: not worth keeping
                    backing.close()
                    return None
                segments = tuple(data_segments(backing.fd, 0, st.st_size))
                return self.pool.put(backing, st.st_size, uid, st.st_blocks * 512, view, segments, cold)
        backing.close()
        return None

    clear = staticmethod(MemfdPool.clear)  # the zeroing job's work (any thread)

    def has_pooled(self, size: int, uid: int) -> bool:
        return self.pool.ready(size, uid)

    def zeroed(self, entry: Pooled, error: OSError | None) -> None:
        self.pool.zeroed(entry, error)

    def drop_pooled(self, nbytes: int = 0, fds: int = 0) -> tuple[int, int]:
        return self.pool.drop(nbytes, fds)

    def expire_pooled(self) -> None:
        self.pool.expire()

    def close_later(self, later: Callable[[Callable[[], None]], None]) -> None:
        self.pool.later = later

    def key(self, backing: OwnedFd) -> tuple[int, int]:
        st = os.fstat(backing.fd)
        return (st.st_dev, st.st_ino)

    # -- the manager's own I/O -------------------------------------------------------

    def read(self, backing: OwnedFd, offset: int, into: memoryview) -> None:
        view = memoryview(into).cast("B")
        if len(view) >= MAPPED_MIN and read_mapped(backing.fd, view, offset):
            return
        for start, end in preadv_into(backing.fd, view, offset):  # past the sealed size cannot happen:
            view[start:end] = bytes(end - start)  # zero-fill defensively

    def write(self, backing: OwnedFd, offset: int, data: memoryview) -> None:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += os.pwritev(backing.fd, [view[done:done + _MAX_IO]], offset + done)

    def resident_bytes(self, backing: OwnedFd) -> int:
        return os.fstat(backing.fd).st_blocks * 512

    def missing_bytes(self, backing: OwnedFd, offset: int, length: int) -> int:
        """Bytes of the pages touched by [offset, offset+length) that hold no memory yet
        (what writing that range adds to resident memory)."""
        start = offset - offset % PAGE_SIZE
        end = page_align(offset + length)
        return end - start - sum(n for _, n in data_segments(backing.fd, start, end))

    def holes(self, backing: OwnedFd) -> tuple[tuple[int, int], ...]:
        """(offset, length) of the ranges of the memfd that hold no pages (SEEK_HOLE)."""
        size = os.fstat(backing.fd).st_size
        holes, pos = [], 0
        for offset, length in data_segments(backing.fd, 0, size):
            if offset > pos:
                holes.append((pos, offset - pos))
            pos = offset + length
        if pos < size:
            holes.append((pos, size - pos))
        return tuple(holes)

    @staticmethod
    def zero(into: Any) -> None:
        """Fill a caller's buffer with zeros (a read of pages that do not exist yet)."""
        np.frombuffer(into, dtype=np.uint8).fill(0)

    def purge(self, backing: OwnedFd) -> None:
        """Free every page; mappings and other fds of the memfd now read zeros."""
        punch_hole(backing.fd, 0, os.fstat(backing.fd).st_size)

    def populate_all(self, backing: OwnedFd) -> None:
        """Allocate every page now (pin), so later use cannot fail for memory."""
        os.posix_fallocate(backing.fd, 0, os.fstat(backing.fd).st_size)

    def map(self, backing: OwnedFd) -> memoryview:
        """A shared writable mapping of the whole memfd for the device (holds no fd): the
        store's own for a recycled memfd (its page tables filled by the zeroing)."""
        view = self._views.get(backing)
        if view is not None:
            return memoryview(view)
        size = os.fstat(backing.fd).st_size
        writable = fcntl.fcntl(backing.fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDONLY
        return memoryview(map_shared(backing.fd, 0, size, writable))

    def device_file(self, backing: OwnedFd) -> OwnedFd | None:
        """The manager's own description, duplicated for one device copy in or out (preadv,
        pwritev: no page faults; the copy closes it when done). Only for objects
        of at least `_DEVICE_FILE_MIN` bytes (below that the faults cost little), and at most
        `_DEVICE_FILES` at once, so that a suspend of thousands of objects cannot run the
        process out of fds: past that, or if dup fails for want of fds, None (the device
        writes through the mapping). None too for a recycled memfd: its mapping (`map`) is
        faster to copy through."""
        if backing in self._views or os.fstat(backing.fd).st_size < _DEVICE_FILE_MIN:
            return None
        self._device_files = [f for f in self._device_files if not f.closed]
        if len(self._device_files) >= _DEVICE_FILES:
            return None
        try:
            file = backing.dup()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                return None
            raise
        self._device_files.append(file)
        return file

    @staticmethod
    def map_range(fd: OwnedFd, offset: int, length: int, writable: bool) -> memoryview:
        """Map [offset, offset+length) of a client's memfd (userptr); holds no fd."""
        return memoryview(map_shared(fd.fileno(), offset, length, writable))

    @staticmethod
    def buffer_view(buffer: Any) -> memoryview:
        """A flat byte view of an in-process buffer; EINVAL unless contiguous, nonempty and
        page-aligned in address and length."""
        flat = flat_bytes(buffer, what="userptr memory")
        if len(flat) == 0 or len(flat) % PAGE_SIZE:
            raise InvalidArgument(f"userptr length {len(flat)} must be a nonzero multiple of {PAGE_SIZE}")
        address = data_address(np.frombuffer(flat, dtype=np.uint8))
        if address % PAGE_SIZE:
            raise InvalidArgument(f"userptr address {address:#x} is not page-aligned")
        return flat

    # -- spill storage ---------------------------------------------------------------

    def spill_free(self) -> int:
        """Bytes the spill directory's filesystem can still take."""
        st = os.statvfs(self.spill.directory)
        return st.f_bavail * st.f_frsize

    def spill_reserve(self, nbytes: int) -> Extent:
        return self.spill.reserve(nbytes)

    def spill_release(self, extent: Extent) -> None:
        self.spill.release(extent)

    def spill_out(self, backing: OwnedFd, extent: Extent, size: int) -> int:
        """Copy the object's data to its extent, freeing its pages as they are copied (worker
        thread: the punches cost nearly as much as the copy and must not stall the request
        loop; backing/spill.py overlaps them). Nobody else sees a spilled object's memfd,
        so freeing it before the core takes note is safe."""
        return self.spill.store(backing.fd, extent, size, free_source=True)

    def spill_in(self, extent: Extent, backing: OwnedFd, size: int) -> int:
        """Copy an extent back into a fresh memfd (worker thread)."""
        return self.spill.load(extent, backing.fd)

    def spill_read(self, extent: Extent, start: int, end: int,
                   max_runs: int) -> tuple[list[Run], OwnedFd, Callable[[], int]] | None:
        return self.spill.read(extent, start, end, max_runs)

    def spill_read_direct(self, extent: Extent, start: int, end: int, max_runs: int) -> list[tuple[int, ...]] | None:
        return self.spill.read_direct(extent, start, end, max_runs)

    def spill_read_done(self, extent: Extent) -> None:
        self.spill.read_done(extent)

    def spill_punch(self, extent: Extent) -> int:
        """Give an extent's disk space back (any thread); `spill_release` then skips it."""
        self.spill.punch(extent)
        return 0

    # -- descriptions for clients ----------------------------------------------------

    def open_description(self, backing: OwnedFd, writable: bool) -> OwnedFd:
        path = f"/proc/self/fd/{backing.fd}"
        if not writable:
            return OwnedFd(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
        try:
            return OwnedFd(os.open(path, os.O_RDWR | os.O_CLOEXEC))
        except PermissionError:
            # not root: we own the memfd, so lift 0400 for the one open (see module rules)
            os.fchmod(backing.fd, 0o600)
            try:
                return OwnedFd(os.open(path, os.O_RDWR | os.O_CLOEXEC))
            finally:
                os.fchmod(backing.fd, 0o400)

    # -- import ----------------------------------------------------------------------

    def inspect(self, fd: OwnedFd, whole: bool = True) -> Inspection:
        """`whole`: the memfd as one object (import), so its size must be page-aligned;
        else only a range of it is used (userptr) and the caller checks the range."""
        raw = fd.fileno()
        st = os.fstat(raw)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidArgument(f"fd {raw} is not memory (not a regular file); import needs a sealed memfd")
        try:
            seals = fcntl.fcntl(raw, fcntl.F_GET_SEALS)
        except OSError:
            raise InvalidArgument(f"fd {raw} is a file, not a memfd; import needs a sealed memfd") from None
        link = os.readlink(f"/proc/self/fd/{raw}")
        if not link.startswith("/memfd:"):
            raise InvalidArgument(f"fd {raw} ({link}) is not a memfd; import needs a sealed memfd")
        if not seals & fcntl.F_SEAL_SHRINK:
            raise InvalidArgument(f"memfd fd {raw} is not sealed with F_SEAL_SHRINK (seals {seals:#x})")
        if whole and (st.st_size <= 0 or st.st_size % PAGE_SIZE):
            raise InvalidArgument(f"memfd fd {raw} has size {st.st_size}, not a nonzero multiple of {PAGE_SIZE}")
        access = fcntl.fcntl(raw, fcntl.F_GETFL) & os.O_ACCMODE
        if access == os.O_WRONLY:
            raise InvalidArgument(f"fd {raw} is write-only; memory must be readable")
        ours = link == self._link and seals == _SEALS  # ours never carry write seals
        # write-sealed memory cannot be written through any fd: it is read-only memory
        readonly = access == os.O_RDONLY or bool(seals & _WRITE_SEALS)
        return Inspection(FdKind.OURS if ours else FdKind.FOREIGN, (st.st_dev, st.st_ino), st.st_size, readonly)

    def adopt(self, fd: OwnedFd, inspection: Inspection) -> OwnedFd:
        """Our own description for the memory behind `fd` (which this call closes).

        A foreign memfd we cannot reopen (its mode forbids us) is kept through the
        client's description: the one case where the manager's I/O shares a description.
        """
        flags = (os.O_RDONLY if inspection.readonly else os.O_RDWR) | os.O_CLOEXEC
        path = f"/proc/self/fd/{fd.fileno()}"
        self.open_count += 1
        try:
            if inspection.kind is FdKind.OURS and not inspection.readonly:
                own = self.open_description(fd, writable=True)
            else:
                own = OwnedFd(os.open(path, flags))
        except PermissionError:
            return fd
        except BaseException:
            self.open_count -= 1
            raise
        fd.close()
        return own
