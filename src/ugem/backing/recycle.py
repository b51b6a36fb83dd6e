"""MemfdPool: memfds of freed objects kept for reuse (TTM's page pool).

Why: a fresh memfd costs the kernel a page allocation and a zeroing of every 4 KiB page
(shmem gets no huge pages), then a page-table fill in whoever maps it: filling one runs at
~1 GB/s end to end where numpy's own memory runs at ~5 GB/s. A memfd freed by one object
already holds its pages; cleared with a memset (~40 GB/s through a mapping whose page
tables are filled) it backs the next object of the same size at about twice the speed.

Rules:
- the core alone decides that a freed object's memfd may be pooled (core/recycle.py: no
  process but the manager can still see its pages); this module keeps it, per (uid, size):
  a memfd freed by uid A's object only backs uid A's objects again, and since memfds are
  sealed against growing and shrinking, reuse is by exact size;
- a pooled memfd keeps its old bytes until zeroed. `clear(entry)` (any thread: the manager
  runs it as a background job, core/jobs.py) clears the data segments found when it was
  pooled (holes read zeros already; writing them would allocate pages) through a mapping
  the store keeps for that memfd as long as the memfd lives, so only the first zeroing
  fills page tables in (MADV_POPULATE_WRITE first: twice as fast as faulting them in).
  `take` hands out only entries marked `zeroed` (on the core's thread): never one whose
  zeroing has not finished, or failed. A request that would find one of its uid and size
  but for a zeroing in flight waits for it (core/memory.py `new_backing`);
- bounds: only memfds of at least MIN_SIZE bytes holding pages are pooled, at most `max_fds`
  of them (64, and an eighth of the memfd limit) and only if their whole size fits in the
  bytes the core allows (`room`: a quarter of the system budget, within the budget,
  core/memory.py); else the memfd is closed as before (also if it cannot be mapped).
  As TTM's pool, it gives pages back when memory is wanted (the reclaim engine drops
  pooled memfds before anything else, and the daemon reclaims under the machine's memory
  pressure), not on a short clock: an entry lives until it has been unused for IDLE_S
  seconds (60: longer than a workload's pause between two rounds of the same sizes), then
  `expire` takes it out, one per call, oldest first, so an idle manager still gives its
  memory back. Closing 64 MiB of pages takes ~12 ms: with `later` set (the daemon's mover
  threads), the close runs there, not on the request loop (a daemon that had pooled 32
  memfds stalled its next 32 requests after an idle minute, 12 ms each); else on the
  caller's thread (embedded);
- `drop` closes entries oldest first (the reclaim engine's first pass, before anything is
  purged or spilled). An entry may go while its zeroing runs: the job holds its own
  reference to the mapping, which is unmapped only when the last reference goes, so the
  memset never touches an unmapped page (the pages themselves go with it);
- a memfd handed out again gets a new fd number (MemfdStore `create`): a process told the
  old number for the object it backed before (a pickle's `server_fd`) cannot take the same
  memory, now another object's, by that number;
- a pooled memfd is mode 0000 (an object's is 0400): nobody opens it through /proc while
  it waits, and ugem.testing tells pooled fds from leaked ones by it.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..address import data_address
from ..fd import OwnedFd
from .mapping import populate

__all__ = ["IDLE_S", "MAX_FDS", "MIN_SIZE", "MemfdPool", "Pooled"]

MIN_SIZE = 1 << 20  # smaller objects cost little to make fresh: the request costs more than their pages
MAX_FDS = 64
IDLE_S = 60.0


@dataclass(eq=False)
class Pooled:
    fd: OwnedFd
    size: int
    uid: int
    nbytes: int  # resident bytes it holds (counted against the system budget while pooled)
    view: Any  # the store's writable mapping of all of it (holds no fd)
    segments: tuple[tuple[int, int], ...]  # (offset, length) holding data when pooled: what to zero
    since: float
    cold: bool  # `view` was just made: its page tables are empty
    ready: bool = False  # zeroed: may be handed out




class MemfdPool:
    def __init__(self, max_fds: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_fds = max_fds
        self.clock = clock
        self.bytes = 0
        self.recycled = 0  # memfds handed out again since start
        self._entries: dict[Pooled, None] = {}  # oldest first
        self.later: Callable[[Callable[[], None]], None] | None = None  # runs an expired entry's close
        self._by_kind: dict[tuple[int, int], list[Pooled]] = {}  # (uid, size) -> entries, newest last

    @property
    def count(self) -> int:
        return len(self._entries)

    def accepts(self, size: int, nbytes: int, room: int) -> bool:
        """Whether a memfd of `size` bytes holding `nbytes` may be pooled within `room` bytes:
        all of its size must fit (a huge sparse one is not worth mapping for its few pages)."""
        return MIN_SIZE <= size <= room and nbytes > 0 and len(self._entries) < self.max_fds

    def put(self, fd: OwnedFd, size: int, uid: int, nbytes: int, view: Any,
            segments: tuple[tuple[int, int], ...], cold: bool) -> Pooled:
        """Keep `fd` (the caller checked `accepts`); it is handed out once `zeroed`."""
        os.fchmod(fd.fd, 0)
        entry = Pooled(fd, size, uid, nbytes, view, segments, self.clock(), cold)
        self._entries[entry] = None
        self._by_kind.setdefault((uid, size), []).append(entry)
        self.bytes += nbytes
        return entry

    @staticmethod
    def clear(entry: Pooled) -> int:
        """Clear what the memfd held (any thread); returns the bytes cleared."""
        view = entry.view  # our own reference: a drop meanwhile cannot unmap it under us
        if view is None:
            return 0
        pages = np.frombuffer(view, dtype=np.uint8)
        for offset, length in entry.segments:
            if entry.cold:  # fill the page tables in one call: twice as fast as faulting them in
                populate(data_address(pages) + offset, length, True)
            pages[offset:offset + length] = 0
        return sum(length for _, length in entry.segments)

    def zeroed(self, entry: Pooled, error: OSError | None) -> None:
        """The zeroing job is done (core's thread): the entry may be handed out, or is
        closed if the zeroing failed."""
        if entry in self._entries:
            if error is None:
                entry.ready = True
                entry.since = self.clock()
            else:
                self._close(entry)

    def ready(self, size: int, uid: int) -> bool:
        """Whether `take(size, uid)` would hand one out."""
        return any(entry.ready for entry in self._by_kind.get((uid, size), ()))

    def take(self, size: int, uid: int) -> Pooled | None:
        """The newest zeroed entry of `uid` and `size`, out of the pool (mode 0400 again)."""
        kind = self._by_kind.get((uid, size))
        if not kind:
            return None
        for i in range(len(kind) - 1, -1, -1):
            entry = kind[i]
            if entry.ready:
                self._remove(entry)
                os.fchmod(entry.fd.fd, 0o400)
                self.recycled += 1
                return entry
        return None

    def drop(self, nbytes: int = 0, fds: int = 0) -> tuple[int, int]:
        """Close entries, oldest first, until `nbytes` bytes or `fds` fds are freed (or the
        pool is empty); returns (fds, bytes) freed."""
        closed = freed = 0
        for entry in list(self._entries):
            if freed >= nbytes and closed >= fds:
                break
            freed += entry.nbytes
            closed += 1
            self._close(entry)
        return closed, freed

    def expire(self) -> None:
        """Close the oldest entry if it has been unused for IDLE_S seconds (one per call;
        through `later` if set)."""
        if self._entries:
            entry = next(iter(self._entries))
            if entry.ready and entry.since <= self.clock() - IDLE_S:  # (ready: no zeroing holds it)
                self._remove(entry)
                if self.later is None:
                    self._release(entry)
                else:
                    self.later(functools.partial(self._release, entry))

    def close(self) -> None:
        for entry in list(self._entries):
            self._close(entry)

    def _remove(self, entry: Pooled) -> None:
        del self._entries[entry]
        kind = self._by_kind[(entry.uid, entry.size)]
        kind.remove(entry)
        if not kind:
            del self._by_kind[(entry.uid, entry.size)]
        self.bytes -= entry.nbytes

    def _close(self, entry: Pooled) -> None:
        self._remove(entry)
        self._release(entry)

    @staticmethod
    def _release(entry: Pooled) -> None:
        """Free an entry out of the pool (any thread): its mapping, then its pages."""
        entry.view = None  # unmapped once a zeroing in flight lets go of it too
        entry.fd.close()
