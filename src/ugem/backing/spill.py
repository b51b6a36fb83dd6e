"""SpillStore: spill storage on disk for objects pushed out of memory (SPEC §3).

Layout: one private subdirectory of `spill_dir` per manager (``ugem-<pid>-<random>``),
holding a lock file (flock, held for the manager's life) and FILES large sparse files
(``spill-0``, ``spill-1``). Each spilled object gets an extent: one contiguous range of
one file, or, for STRIPE bytes or more, one range in each file (its first half in
``spill-0``, its second in ``spill-1``), given by a RangeAllocator per file (page units),
sized for the data the object holds, never for its size: only its data segments
(SEEK_DATA/SEEK_HOLE) are copied, packed one after another through the extent's ranges,
and the extent remembers where each came from, so holes stay holes and a sparse 32 TiB
object holding one page takes one page of the 8 TiB range.

Why two files: a buffered write holds the file's inode lock, so two threads writing one
file take turns; into two files they copy at once. A spill of 64 MiB on a 2-CPU machine
runs ~1.6x faster as two halves into two files, each half freeing its source as it goes
(below), than as one copy followed by one free (bench/bench_memory.py measures it).

Rules:
- spilled objects hold no fd: an extent is its ranges in the shared files plus its
  segment map;
- running out of room (the range, or the disk under it) is ENOMEM naming the spill
  directory; a copy that fails leaves the object where it was. The disk space a store
  needs is allocated (fallocate) before anything is copied, so a full disk fails the
  spill before it frees a byte of the object;
- `store(..., free_source=True)` (a spill) frees the object's pages as it goes: each
  CHUNK is punched out of the memfd once it is in the file, so freeing overlaps copying.
  If a later chunk then fails (an I/O error), the chunks already freed are copied back
  from the file before the error is raised;
- a spilled object may be read from the spill files by the reader itself (`read_direct`:
  a client that may copy the daemon's fds, core/stream.py), or through a pipe this store
  pumps (`read`); either way the extent's release waits until `read_done`;
- an extent's ranges are copied at the same time, the first on the calling thread, the
  others on the store's helper threads (`ugem-spill`), which run nothing else; both
  directions (`store`, `load`);
- the space of a dead or restored object is given back with fallocate(PUNCH_HOLE);
- `close()` removes the subdirectory and everything in it; the lock and the files are
  `OwnedFd`s, and each copy works on its own dup of a file, so a copy racing `close()`
  fails EBADF (or finishes into the removed file) rather than touching a reused fd number;
- at start, the subdirectories of managers that died are removed (spill_dirs.py). Each is
  made as ``.ugem-<pid>-<random>``, locked, filled, then renamed ``ugem-<pid>-<random>``;
- extent allocation and freeing happen on the core's thread; the copies (`store`, `load`)
  are the long part and run on worker threads, at explicit offsets, so concurrent copies
  share a spill file's description without sharing a file position: both splice
  (`write_out`, `copy_ranges`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from ..constants import PAGE_SIZE, page_align
from ..errors import NoSpace, OutOfMemory
from ..fd import OwnedFd, pipe
from ..mm.range import Node, RangeAllocator
from .spill_dirs import sweep_stale
from .spill_read import Run, pump

__all__ = ["Extent", "SpillStore", "copy_ranges", "data_segments", "punch_hole", "read_plan"]

_CAPACITY = 1 << 43  # bytes addressable in each sparse spill file (8 TiB)
FILES = 2  # spill files (module rules)
STRIPE = 4 << 20  # an extent of at least this many bytes is split across the files
CHUNK = 4 << 20  # a spill frees its source this many bytes at a time
_PIPE = 1 << 20  # bytes a copy's private pipe holds (at most; see _pipe_size)
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


Range = tuple[int, int, int]  # (source offset, destination offset, length) of one copy


@dataclass(eq=False)
class Extent:
    """Where one spilled object's data lives: `nodes` (pages of spill file i for the i-th
    node; one node, in the file `files[0]` names, for a small extent), holding the
    object's data segments `(object offset, length)` packed in order from the start of the
    first node through the last (filled in by the copy out)."""

    nodes: list[Node[object]]
    files: list[int]
    segments: list[tuple[int, int]] = field(default_factory=list)
    readers: int = 0  # reads in flight straight from the extent (spill_read.py): its release waits for them
    released: bool = False  # released while read: given back when the last read ends

    @property
    def capacity(self) -> int:
        return sum(node.size for node in self.nodes) * PAGE_SIZE


_libc = ctypes.CDLL(None, use_errno=True)
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


def punch_hole(fd: int, offset: int, length: int) -> None:
    """fallocate(PUNCH_HOLE|KEEP_SIZE): free the blocks of a range; it then reads as zeros."""
    mode = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE
    if _libc.fallocate(fd, mode, ctypes.c_long(offset), ctypes.c_long(length)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fallocate(PUNCH_HOLE) failed: {os.strerror(err)}")


def fallocate(fd: int, offset: int, length: int) -> None:
    """Allocate the disk blocks of a range of a file (fallocate, mode 0): ENOSPC now rather
    than when it is written. Where the filesystem cannot (EOPNOTSUPP), nothing is done."""
    if _libc.fallocate(fd, 0, ctypes.c_long(offset), ctypes.c_long(length)) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EOPNOTSUPP, errno.ENOSYS):
            raise OSError(err, f"fallocate failed: {os.strerror(err)}")


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


def copy_ranges(src: int, dst: int, ranges: list[Range]) -> int:
    """Copy each `(src offset, dst offset, length)` from `src` to `dst` (`write_out` through
    one private pipe); returns bytes copied."""
    with _private_pipe() as ends:
        for piece in ranges:
            write_out(src, dst, piece, ends)
    return sum(n for _, _, n in ranges)


@contextlib.contextmanager
def _private_pipe() -> Iterator[tuple[int, int]]:
    """A pipe of up to 1 MiB (`_pipe_size`) for one copy's splices: (read end, write end)."""
    read_end, write_end = pipe(os.O_CLOEXEC)
    with read_end, write_end:
        fcntl.fcntl(write_end.fd, _F_SETPIPE_SZ, _pipe_size())
        yield read_end.fd, write_end.fd


def write_out(src: int, dst: int, piece: Range, ends: tuple[int, int]) -> None:
    """Copy bytes [offset, offset + length) of `src` to `at` in `dst`, piece = (offset, at,
    length): splice(2) through the private pipe `ends`, page cache to page cache. Nothing is
    mapped or faulted in: a spill that wrote from a mapping of the object spent a third of
    its time filling page tables (MADV_POPULATE_READ: 12 ms per 64 MiB on the dev VM), and
    splicing ran ~1.2x faster (bench/bench_memory.py, prewarmed rows). 16x fewer rounds than
    sendfile, whose internal pipe holds 64 KiB (each round is a write call into the
    destination with its own fixed cost). Both ends take explicit offsets, so no file
    position is used: any description of `src`/`dst` will do (but never one opened O_APPEND)."""
    offset, at, length = piece
    read_end, write_end = ends
    done = 0
    while done < length:
        n = os.splice(src, write_end, min(length - done, _PIPE), offset_src=offset + done)
        if n <= 0:
            raise OSError(errno.EIO, f"short copy at byte {done} of a {length}-byte segment")
        out = 0
        while out < n:
            out += os.splice(read_end, dst, n - out, offset_dst=at + done + out)
        done += n


class SpillStore:
    def __init__(self, spill_dir: str) -> None:
        os.makedirs(spill_dir, mode=0o700, exist_ok=True)
        sweep_stale(spill_dir)
        made = tempfile.mkdtemp(prefix=f".ugem-{os.getpid()}-", dir=spill_dir)  # named once locked (module rules)
        self._lock = OwnedFd(os.open(os.path.join(made, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        self._files: list[OwnedFd] = []
        try:
            fcntl.flock(self._lock.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held while we live: not stale
            for i in range(FILES):
                self._files.append(OwnedFd(os.open(os.path.join(made, f"spill-{i}"),
                                                   os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)))
            self.directory = os.path.join(spill_dir, os.path.basename(made)[1:])
            os.rename(made, self.directory)
        except BaseException:
            for f in self._files:
                f.close()
            self._lock.close()
            shutil.rmtree(made, ignore_errors=True)
            raise
        self._spaces: list[RangeAllocator[object]] = [RangeAllocator(0, _CAPACITY // PAGE_SIZE) for _ in range(FILES)]
        self._next = 0  # the file of the next small extent (they take turns)
        self._punched: set[int] = set()  # extents a worker already punched (id of the extent)
        self._helpers = ThreadPoolExecutor(max_workers=FILES, thread_name_prefix="ugem-spill")
        self._keys = [(st.st_dev, st.st_ino) for st in map(os.fstat, (f.fd for f in self._files))]  # (read_direct)

    @property
    def used_bytes(self) -> int:
        return sum(space.used for space in self._spaces) * PAGE_SIZE

    def reserve(self, nbytes: int) -> Extent:
        """An extent for `nbytes` of data (at least a page); ENOMEM naming the spill
        directory when a file's range has no room for it."""
        pages = max(page_align(nbytes) // PAGE_SIZE, 1)
        if FILES > 1 and pages * PAGE_SIZE >= STRIPE:
            first = (pages + 1) // 2
            sizes, files = [first, pages - first], [0, 1]
        else:
            sizes, files = [pages], [self._next]
            self._next = (self._next + 1) % FILES
        nodes: list[Node[object]] = []
        try:
            for size, i in zip(sizes, files, strict=True):
                nodes.append(self._spaces[i].insert(size))
        except NoSpace:
            for node, i in zip(nodes, files, strict=False):
                self._spaces[i].remove(node)
            raise OutOfMemory(f"spill storage in {self.directory} is full: no room for {pages * PAGE_SIZE} "
                              f"bytes ({self.used_bytes} of {FILES * _CAPACITY} in use)") from None
        return Extent(nodes, files)

    def store(self, src: int, extent: Extent, size: int, free_source: bool = False) -> int:
        """Copy the data segments of src[0:size] into the extent, packed (worker thread);
        returns bytes copied. With `free_source`, each chunk copied is punched out of `src`
        (module rules). Disk errors, and data beyond what was reserved (a bug: the object
        changed after it was measured), fail naming the spill directory."""
        segments = data_segments(src, 0, size)
        total = sum(n for _, n in segments)
        if total > extent.capacity:
            raise OSError(errno.ENOSPC, f"spilling {total} bytes into {extent.capacity} reserved in spill "
                                        f"storage in {self.directory}")
        plans = _split(segments, extent)
        try:
            moved = self._run(extent, plans, src, True, free_source)
        except OSError as exc:
            raise OSError(exc.errno, f"writing {total} bytes to spill storage in {self.directory} failed: "
                                     f"{exc.strerror}") from exc
        extent.segments = segments
        return moved

    def load(self, extent: Extent, dst: int) -> int:
        """Copy the extent's segments back to where they came from in `dst` (worker thread)."""
        plans = [[(pos, offset, n) for offset, pos, n in ranges] for ranges in _split(extent.segments, extent)]
        return self._run(extent, plans, dst, False, False)

    def _run(self, extent: Extent, plans: list[list[Range]], fd: int, out: bool, free_source: bool) -> int:
        """Copy each file's `plans` (ranges from `fd` to the file if `out`, else back) at
        the same time: the first here, the others on helper threads; once every copy has
        ended, copy back what a spill freed if any copy failed, and raise its error."""
        dups: list[OwnedFd] = []
        freed: list[list[Range]] = [[] for _ in plans]  # per file: chunks punched out of `fd`
        try:
            for i in extent.files[:len(plans)]:
                dups.append(self._files[i].dup())  # a close() meanwhile cannot hand its number to another file
            work = [((fd, d.fd) if out else (d.fd, fd), ranges, done if free_source else None)
                    for d, ranges, done in zip(dups, plans, freed, strict=True)]
            try:
                futures: list[Future[int]] = [self._helpers.submit(_copy, *w) for w in work[1:]]
            except RuntimeError:  # (shut down)
                raise OSError(errno.EBADF, "spill storage is closed") from None
            moved, error = 0, None
            try:
                moved = _copy(*work[0])
            except OSError as exc:
                error = exc
            for f in futures:
                try:
                    moved += f.result()
                except OSError as exc:
                    error = error or exc
            if error is not None:
                for d, done in zip(dups, freed, strict=True):
                    with contextlib.suppress(OSError):
                        copy_ranges(d.fd, fd, [(at, offset, n) for offset, at, n in done])
                raise error
            return moved
        finally:
            for d in dups:
                d.close()

    def punch(self, extent: Extent) -> None:
        """Give the extent's disk space back now (any thread; the ranges stay reserved),
        unless it is being read: then `release` does, once the last read has ended (no read
        can begin after a restore, the one time a punch comes before the release)."""
        if extent.readers:
            return
        for node, i in zip(extent.nodes, extent.files, strict=True):
            punch_hole(self._files[i].fd, node.start * PAGE_SIZE, node.size * PAGE_SIZE)
        self._punched.add(id(extent))

    def read(self, extent: Extent, start: int, end: int,
             max_runs: int) -> tuple[list[Run], OwnedFd, Callable[[], int]] | None:
        """A read of [start, end) straight from the extent (spill_read.py): its runs, the
        read end of a new pipe, and the work (worker thread) that pumps the runs into it;
        None if that takes more than `max_runs` runs. Until `read_done`, the extent's
        release waits. OSError if no pipe can be made."""
        runs = read_plan(extent, start, end)
        if len(runs) > max_runs:
            return None
        read_end, write_end = pipe(os.O_CLOEXEC)
        with contextlib.suppress(OSError):  # a smaller pipe only costs more wakeups
            fcntl.fcntl(write_end.fd, _F_SETPIPE_SZ, _pipe_size())
        extent.readers += 1
        return runs, read_end, lambda: pump(self._files, runs, write_end)

    def read_direct(self, extent: Extent, start: int, end: int, max_runs: int) -> list[tuple[int, ...]] | None:
        """A read of [start, end) that the reader makes from the spill files themselves
        (core/stream.py): its runs as (our fd of the file, its st_dev, st_ino, file offset,
        object offset, length), or None past `max_runs` runs. Until `read_done`, the
        extent's release waits, as for `read`."""
        runs = read_plan(extent, start, end)
        if len(runs) > max_runs:
            return None
        extent.readers += 1
        return [(self._files[i].fd, *self._keys[i], at, offset, n) for offset, i, at, n in runs]

    def read_done(self, extent: Extent) -> None:
        extent.readers -= 1
        if extent.released and not extent.readers:
            self.release(extent)

    def release(self, extent: Extent) -> None:
        """Give the extent's space back (unless a worker already punched it) and its ranges;
        once no read of it is in flight."""
        if extent.readers:
            extent.released = True
            return
        if id(extent) not in self._punched:
            self.punch(extent)
        self._punched.discard(id(extent))
        for node, i in zip(extent.nodes, extent.files, strict=True):
            self._spaces[i].remove(node)

    def close(self) -> None:
        if not self._lock.closed:
            for f in self._files:
                f.close()
            self._lock.close()
            self._helpers.shutdown(wait=True)
            shutil.rmtree(self.directory, ignore_errors=True)


def _split(segments: list[tuple[int, int]], extent: Extent) -> list[list[Range]]:
    """The copies that pack `segments` through the extent's nodes: per node, (object offset,
    file offset, length), a segment that crosses from one node to the next cut in two."""
    plans: list[list[Range]] = [[] for _ in extent.nodes]
    k = 0
    start, room = extent.nodes[0].start * PAGE_SIZE, extent.nodes[0].size * PAGE_SIZE
    for offset, length in segments:
        while length:
            if not room:
                k += 1
                start, room = extent.nodes[k].start * PAGE_SIZE, extent.nodes[k].size * PAGE_SIZE
            n = min(length, room)
            plans[k].append((offset, start, n))
            offset, start, length, room = offset + n, start + n, length - n, room - n
    return plans


def read_plan(extent: Extent, start: int, end: int) -> list[Run]:
    """The runs of [start, end) the extent holds, (object offset, file, file offset, length)
    in object order: the spill's own copies (`_split`), cut to the range (spill_read.py)."""
    runs: list[Run] = []
    for i, ranges in zip(extent.files, _split(extent.segments, extent), strict=True):
        for offset, at, length in ranges:
            lo, hi = max(offset, start), min(offset + length, end)
            if lo < hi:
                runs.append((lo, i, at + lo - offset, hi - lo))
    return runs


def _copy(ends: tuple[int, int], ranges: list[Range], freed: list[Range] | None) -> int:
    """`copy_ranges` from ends[0] to ends[1]; with `freed` (a spill: ends[1] is the file)
    the file's space is allocated first, then each CHUNK is written out (`write_out`) and
    punched out of the source, and listed in `freed` (module rules)."""
    src, dst = ends
    if freed is None:
        return copy_ranges(src, dst, ranges)
    for _, at, length in ranges:
        fallocate(dst, at, length)
    with _private_pipe() as pipe_ends:
        for offset, at, length in ranges:
            for done in range(0, length, CHUNK):
                piece = (offset + done, at + done, min(CHUNK, length - done))
                write_out(src, dst, piece, pipe_ends)
                punch_hole(src, piece[0], piece[2])
                freed.append(piece)
    return sum(n for _, _, n in ranges)
