"""The BackingStore protocol: everything the core needs from real memory, and nothing more.

The core treats `backing` values as opaque handles. An implementation owns the fds behind
them and must keep the rules of SPEC §3: the manager's own I/O goes through descriptions
it never shares; descriptions handed to clients are new ones (`open_description`).
`ugem.testing` may provide fakes with the same shape.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ..fd import OwnedFd

__all__ = ["BackingStore", "FdKind", "Inspection"]


class FdKind(enum.Enum):
    OURS = "ours"  # an object memfd made by this manager (adoptable if untracked)
    FOREIGN = "foreign"  # some other sealed memfd


@dataclass(frozen=True, slots=True)
class Inspection:
    kind: FdKind
    key: tuple[int, int]
    size: int
    readonly: bool


class BackingStore(Protocol):
    open_count: int  # backings created or adopted and not yet released
    max_open: int  # how many may be open at once (memfds: the fd limit less a reserve)
    limit_text: str  # what bounds max_open, for error messages

    @property
    def pooled_bytes(self) -> int:
        """Resident bytes of freed backings kept for reuse (backing/recycle.py) ..."""

    @property
    def pooled_fds(self) -> int:
        """... and how many they are (not in open_count)."""

    @property
    def recycled(self) -> int:
        """Backings handed out again since start."""

    def create(self, size: int, uid: int | None = None) -> Any:
        """New backing of `size` bytes reading as zeros, counted in open_count: with a `uid`,
        a pooled one of that uid and size if one is zeroed (its pages allocated), else an
        empty one (no pages allocated)."""

    def scratch(self, size: int) -> OwnedFd:
        """A transient, uncounted buffer of `size` bytes that the caller closes itself."""

    def release(self, backing: Any, uid: int | None = None, room: int = 0) -> Any:
        """Drop the manager's hold on the memory (close its own description); with a `uid`
        (nobody else can see it), the store may keep it for reuse if it holds at most `room`
        bytes: then it returns the pooled entry, handed out only once `clear` ran on it
        (any thread) and `zeroed` was called (the core's thread); else None."""

    def has_pooled(self, size: int, uid: int) -> bool:
        """Whether `create(size, uid)` would hand out a pooled backing now."""

    def clear(self, entry: Any) -> int:
        """Zero a pooled entry's pages (any thread); returns the bytes cleared."""

    def zeroed(self, entry: Any, error: OSError | None) -> None:
        """`clear` of `entry` finished (with `error` if it failed: the entry is closed)."""

    def drop_pooled(self, nbytes: int = 0, fds: int = 0) -> tuple[int, int]:
        """Close pooled backings, oldest first, until `nbytes` bytes or `fds` are freed;
        returns (fds, bytes) freed."""

    def expire_pooled(self) -> None:
        """Close pooled backings unused for a while."""

    def close_later(self, later: Callable[[Callable[[], None]], None]) -> None:
        """From now on run those closes through `later` (the daemon's mover threads), not
        on the caller's thread."""

    def key(self, backing: Any) -> tuple[int, int]:
        """Identity of the memory, equal for every fd to it."""

    def read(self, backing: Any, offset: int, into: Any) -> None:
        """Copy len(into) bytes at `offset` into the writable buffer `into`."""

    def write(self, backing: Any, offset: int, data: Any) -> None:
        """Copy the bytes-like `data` to `offset`."""

    def open_description(self, backing: Any, writable: bool) -> OwnedFd:
        """A new file description to the memory, for a client to own."""

    def resident_bytes(self, backing: Any) -> int:
        """Bytes of memory the backing really holds now."""

    def missing_bytes(self, backing: Any, offset: int, length: int) -> int:
        """Bytes of the pages touched by [offset, offset+length) not allocated yet."""

    def holes(self, backing: Any) -> tuple[tuple[int, int], ...]:
        """(offset, length) of the ranges that hold no pages, in order (a device copy
        keeps them holes)."""

    def close(self) -> None:
        """Remove spill storage; every object has been released."""

    @staticmethod
    def zero(into: Any) -> None:
        """Fill a caller's buffer with zeros."""

    def purge(self, backing: Any) -> None:
        """Free every page of the backing; whoever still maps it reads zeros."""

    def populate_all(self, backing: Any) -> None:
        """Allocate every page now."""

    def map(self, backing: Any) -> Any:
        """A writable buffer over the whole backing, for the device to use in place."""

    def device_file(self, backing: Any) -> OwnedFd | None:
        """A private description of the backing for one device copy (in or out), which
        the copy then owns (it reads and writes pages without faulting a mapping in);
        None: the device goes through `map()` instead."""

    def spill_free(self) -> int:
        """Bytes spill storage can still take."""

    def spill_reserve(self, nbytes: int) -> Any:
        """An extent of spill storage for `nbytes` of data, what an object holds (not its
        size); ENOMEM naming the spill directory when full."""

    def spill_punch(self, extent: Any) -> int:
        """Free an extent's disk space now (any thread); the range stays reserved."""

    def spill_release(self, extent: Any) -> None:
        """Give an extent's space back."""

    def spill_out(self, backing: Any, extent: Any, size: int) -> int:
        """Copy backing -> extent; any thread; returns bytes copied."""

    def spill_in(self, extent: Any, backing: Any, size: int) -> int:
        """Copy extent -> backing; any thread; returns bytes copied."""

    def spill_read(self, extent: Any, start: int, end: int,
                   max_runs: int) -> tuple[list[tuple[int, int, int, int]], OwnedFd, Callable[[], int]] | None:
        """A read of [start, end) straight from an extent (backing/spill_read.py): the runs
        it holds, (object offset, file, file offset, length) in order, the read end of a
        pipe, and the work (any thread) that pumps the runs into it; None if that takes
        more than `max_runs` runs. The extent's release waits until `spill_read_done`.
        OSError if no pipe can be made."""

    def spill_read_direct(self, extent: Any, start: int, end: int, max_runs: int) -> list[tuple[int, ...]] | None:
        """A read of [start, end) the reader makes from the spill files itself: its runs as
        (our fd of the file, st_dev, st_ino, file offset, object offset, length) in object
        order; None if more than `max_runs`. The extent's release waits until `spill_read_done`."""

    def spill_read_done(self, extent: Any) -> None:
        """A read of the extent has ended (core's thread)."""

    def map_range(self, fd: OwnedFd, offset: int, length: int, writable: bool) -> Any:
        """Map part of a client's memfd for userptr (the mapping holds no fd)."""

    def buffer_view(self, buffer: Any) -> Any:
        """A checked byte view of an in-process buffer for userptr (EINVAL if unusable)."""

    def inspect(self, fd: OwnedFd, whole: bool = True) -> Inspection:
        """Classify an fd offered for import; EINVAL if it is not acceptable (SPEC §6)."""

    def adopt(self, fd: OwnedFd, inspection: Inspection) -> Any:
        """Take memory behind an inspected fd as backing; consumes `fd`."""

    def open_source(self, path: str) -> tuple[OwnedFd, int, int]:
        """A file to preload, open read-only: (fd, size, bytes of data); OSError if it is
        missing, unreadable, not a regular file or empty (backing/preload.py)."""

    def load_file(self, source: OwnedFd, dest: OwnedFd, label: str, size: int, stop: Callable[[], bool]) -> int:
        """Copy the data of `source` into the backing behind `dest` (a description of it),
        holes left as holes, then close both; any thread. Returns bytes copied."""
