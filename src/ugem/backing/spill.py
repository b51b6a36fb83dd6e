"""SpillStore: spill storage on disk for objects pushed out of memory (SPEC §3).

Layout: one private subdirectory of `spill_dir` per manager (``ugem-<pid>-<random>``),
holding a lock file (flock, held for the manager's life) and one large sparse file. Each
spilled object gets a contiguous extent of that file from a RangeAllocator (page units),
sized for the data the object holds, never for its size: only its data segments
(SEEK_DATA/SEEK_HOLE) are copied, packed one after another, and the extent remembers
where each came from, so holes stay holes and a sparse 32 TiB object holding one page
takes one page of the 8 TiB range.

Rules:
- spilled objects hold no fd: an extent is (start, size) in the shared file plus its
  segment map;
- running out of room (the range, or the disk under it) is ENOMEM naming the spill
  directory; a copy that fails leaves the object where it was;
- the space of a dead or restored object is given back with fallocate(PUNCH_HOLE);
- `close()` removes the subdirectory and everything in it; the lock and the file are
  `OwnedFd`s, and each copy works on its own dup of the file, so a copy racing `close()`
  fails EBADF (or finishes into the removed file) rather than touching a reused fd number;
- at start, subdirectories whose lock nobody holds (their manager died) are removed;
- extent allocation and freeing happen on the core's thread; the copies (`store`, `load`)
  are the long part and run on worker threads, with splice through a private pipe at
  explicit offsets (`copy_ranges`), so concurrent copies share the spill file's
  description without sharing a file position.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..constants import PAGE_SIZE, page_align
from ..errors import NoSpace, OutOfMemory
from ..fd import OwnedFd, pipe
from ..mm.range import Node, RangeAllocator

__all__ = ["Extent", "SpillStore", "copy_ranges", "data_segments", "punch_hole"]

_CAPACITY = 1 << 43  # bytes addressable in the sparse spill file (8 TiB)
_PIPE = 1 << 20  # bytes a copy's private pipe holds (at most; see _pipe_size)
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


@dataclass(eq=False)
class Extent:
    """Where one spilled object's data lives: `node` (pages of the spill file), holding
    the object's data segments `(object offset, length)` packed in order from its start
    (filled in by the copy out)."""

    node: Node[object]
    segments: list[tuple[int, int]] = field(default_factory=list)

    @property
    def capacity(self) -> int:
        return self.node.size * PAGE_SIZE


_libc = ctypes.CDLL(None, use_errno=True)
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


def punch_hole(fd: int, offset: int, length: int) -> None:
    """fallocate(PUNCH_HOLE|KEEP_SIZE): free the blocks of a range; it then reads as zeros."""
    mode = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE
    if _libc.fallocate(fd, mode, ctypes.c_long(offset), ctypes.c_long(length)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fallocate(PUNCH_HOLE) failed: {os.strerror(err)}")


def data_segments(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    """(offset, length) of the ranges of `fd` within [start, end) that hold data."""
    segments = []
    pos = start
    while pos < end:
        try:
            first = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: no data at or after pos
            break
        if first >= end:
            break
        last = min(os.lseek(fd, first, os.SEEK_HOLE), end)
        segments.append((first, last - first))
        pos = last
    return segments


def _pipe_size() -> int:
    """Bytes one private pipe of a copy holds: 1 MiB, or less where the system caps pipes."""
    try:
        with open("/proc/sys/fs/pipe-max-size") as f:
            return max(PAGE_SIZE, min(int(f.read()), _PIPE))
    except (OSError, ValueError):
        return 16 * PAGE_SIZE  # the default size of every pipe


def copy_ranges(src: int, dst: int, ranges: Iterable[tuple[int, int, int]]) -> int:
    """Copy each `(src offset, dst offset, length)` from `src` to `dst`; returns bytes copied.

    splice(2) through a private pipe of up to 1 MiB: page cache to page cache, nothing to
    fault in, and 16x fewer rounds than sendfile, whose internal pipe holds 64 KiB (each
    round is a write call into the destination file with its own fixed cost). Both ends
    take explicit offsets, so no file position is used: any description of `src`/`dst`
    will do (but never one opened O_APPEND).
    """
    moved = 0
    read_end, write_end = pipe(os.O_CLOEXEC)
    with read_end, write_end:
        size = fcntl.fcntl(write_end.fd, _F_SETPIPE_SZ, _pipe_size())
        for src_offset, dst_offset, length in ranges:
            done = 0
            while done < length:
                n = os.splice(src, write_end.fd, min(length - done, size), offset_src=src_offset + done)
                if n <= 0:
                    raise OSError(errno.EIO, f"short copy at byte {done} of a {length}-byte segment")
                out = 0
                while out < n:
                    out += os.splice(read_end.fd, dst, n - out, offset_dst=dst_offset + done + out)
                done += n
            moved += length
    return moved


class SpillStore:
    def __init__(self, spill_dir: str) -> None:
        os.makedirs(spill_dir, mode=0o700, exist_ok=True)
        _sweep_stale(spill_dir)
        self.directory = tempfile.mkdtemp(prefix=f"ugem-{os.getpid()}-", dir=spill_dir)
        self._lock = OwnedFd(os.open(os.path.join(self.directory, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                                     0o600))
        try:
            fcntl.flock(self._lock.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held while we live: not stale
            self._file = OwnedFd(os.open(os.path.join(self.directory, "spill-0"),
                                         os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        except BaseException:
            self._lock.close()
            raise
        self._space: RangeAllocator[object] = RangeAllocator(0, _CAPACITY // PAGE_SIZE)
        self._punched: set[int] = set()  # extents a worker already punched (id of the node)

    @property
    def used_bytes(self) -> int:
        return self._space.used * PAGE_SIZE

    def reserve(self, nbytes: int) -> Extent:
        """An extent for `nbytes` of data (at least a page); ENOMEM naming the spill
        directory when the file's range has no room for it."""
        pages = max(page_align(nbytes) // PAGE_SIZE, 1)
        try:
            return Extent(self._space.insert(pages))
        except NoSpace:
            raise OutOfMemory(f"spill storage in {self.directory} is full: no room for {pages * PAGE_SIZE} "
                              f"bytes ({self.used_bytes} of {_CAPACITY} in use)") from None

    def offset(self, extent: Extent) -> int:
        return extent.node.start * PAGE_SIZE

    def store(self, src: int, extent: Extent, size: int) -> int:
        """Copy the data segments of src[0:size] into the extent, packed (worker thread);
        returns bytes copied. Disk errors, and data beyond what was reserved (a bug: the
        object changed after it was measured), fail naming the spill directory."""
        segments = data_segments(src, 0, size)
        total = sum(n for _, n in segments)
        if total > extent.capacity:
            raise OSError(errno.ENOSPC, f"spilling {total} bytes into {extent.capacity} reserved in spill "
                                        f"storage in {self.directory}")
        ranges, pos = [], self.offset(extent)
        for offset, length in segments:
            ranges.append((offset, pos, length))
            pos += length
        try:
            with self._file.dup() as out:  # a close() meanwhile cannot hand its number to another file
                moved = copy_ranges(src, out.fd, ranges)
        except OSError as exc:
            raise OSError(exc.errno, f"writing {total} bytes to spill storage in {self.directory} failed: "
                                     f"{exc.strerror}") from exc
        extent.segments = segments
        return moved

    def load(self, extent: Extent, dst: int) -> int:
        """Copy the extent's segments back to where they came from in `dst` (worker thread)."""
        ranges, pos = [], self.offset(extent)
        for offset, length in extent.segments:
            ranges.append((pos, offset, length))
            pos += length
        with self._file.dup() as spill:
            return copy_ranges(spill.fd, dst, ranges)

    def punch(self, extent: Extent) -> None:
        """Give the extent's disk space back now (any thread; the range stays reserved)."""
        punch_hole(self._file.fd, self.offset(extent), extent.capacity)
        self._punched.add(id(extent))

    def release(self, extent: Extent) -> None:
        """Give the extent's space back (unless a worker already punched it) and its range."""
        if id(extent) in self._punched:
            self._punched.discard(id(extent))
        else:
            punch_hole(self._file.fd, self.offset(extent), extent.capacity)
        self._space.remove(extent.node)

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
            self._lock.close()
            shutil.rmtree(self.directory, ignore_errors=True)


def _sweep_stale(spill_dir: str) -> None:
    """Remove subdirectories of managers that died without cleaning up (their lock is free)."""
    for entry in os.scandir(spill_dir):
        if not (entry.name.startswith("ugem-") and entry.is_dir(follow_symlinks=False)):
            continue
        lock_path = os.path.join(entry.path, "lock")
        try:
            lock = OwnedFd(os.open(lock_path, os.O_RDWR | os.O_CLOEXEC))
        except FileNotFoundError:
            continue  # being created right now, or not ours
        with lock:
            try:
                fcntl.flock(lock.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live manager holds it
        with contextlib.suppress(OSError):
            shutil.rmtree(entry.path)
