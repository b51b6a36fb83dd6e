"""Pageable memory under a budget: residency accounting, purge, spill, restore (SPEC §3).

Theory of operation
-------------------
`resident` is what the objects' memfds really hold (allocated blocks, as the BackingStore
measures them). Each NORMAL object with system pages caches its last measurement in
`obj.resident`; the total is kept incrementally, and so is the creating client's share (all
in `measure`, through `Core.charge_resident`). Objects whose pages can change without a
request (mapped, exported, or with a bulk transfer open) are *volatile*: the core calls
`watch()` when one becomes so, and `refresh(limit)` re-measures the watched ones before any
decision that depends on the total, `make_room`'s first check included, unless the decision
cannot change: `headroom` is what the watched objects could still grow by (their sizes less
what they hold), and while resident + headroom stays within `limit` even full ones would
fit, so nothing is measured (sending thousands of arrays exports thousands of objects; they
are not fstat'ed before every request).

Before a request adds `need` bytes, `make_room(need)` frees enough that
resident + reserved + need <= budget, in three named passes over the LRU (oldest first):

1. purge: DONTNEED objects (mapped ones too: their mappings then read zeros), never
   exported, pinned or foreign ones. Hole punching is fast, so it happens at once.
2. spare: system pages of objects whose contents live in VRAM (nobody else sees them);
   dropping them is free now, and an eviction later copies the VRAM contents back.
3. spill: idle (no job, no device work), unmapped, unpinned, unexported WILLNEED objects
   are copied to spill storage by jobs off the request path; the caller waits (Pending).
   Spill storage is reserved for the data an object holds, not its size (sparse objects
   cannot exhaust it); when it has no room, that object counts as a failed spill.

Objects that device work still uses (busy) are left out of passes 2 and 3 until it
completes. If the passes cannot free enough now but could once that work is done, they
run as far as they can and the request also waits for the earliest fence after which
enough is reclaimable (Pending: the daemon parks it, other clients keep being served; the
embedded manager waits without its lock), then runs again. If the passes together cannot
free enough even then, nothing is changed and the request fails with ENOMEM.

`reserved` counts bytes promised but not yet measurable: restores in flight and open
pwrite transfers.

Pages a device op writes (a copy back from VRAM, work on an object used in place) are
charged when it is queued, as much as it may write (`expect`), and measured once it has
completed (`landing`), so a sparse object costs what it really holds.

Pages written through mappings are counted only when measured, so they can put resident
over the budget between requests. A request that adds pages reclaims that excess with its
own `make_room`; `mmap`, which populates without adding pages itself, calls `settle()`:
the same passes, best effort, never ENOMEM (a process that only writes through mappings
is still held to the budget, as IGT gem_shrink's mmap mode expects).

Each object with system pages holds one fd (a memfd): `make_fd_room` keeps the store's
`open_count` under `max_open` with the same passes counted in objects (a spill closes the
memfd when it lands); if nothing can be freed, ENOMEM names the fd limit (SPEC §7).

The spill and restore jobs themselves (planning them, applying their outcome) are in
`spill_jobs.py`, a mixin of this class.
"""

from __future__ import annotations

import errno
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

from ..constants import DONTNEED, PAGE_SIZE
from ..errors import IOFailure, NoSpace, OutOfMemory
from ..mm.lru import Lru
from .jobs import Job, JobKind, Pending
from .object import BufferObject, Kind
from .spill_jobs import SpillJobs
from .states import Event, Placement

if TYPE_CHECKING:
    from .manager import Core

__all__ = ["Memory"]


class Memory(SpillJobs):
    def __init__(self, core: Core) -> None:
        self.core = core
        self.lru: Lru[BufferObject] = Lru()
        self.resident = 0
        self.reserved = 0
        self.spilled = 0  # bytes of data held in spill storage
        self.jobs: list[Job] = []  # in flight
        self.background: list[Job] = []  # to start, nobody waits for them
        self.watched: set[BufferObject] = set()  # volatile objects, re-measured by refresh()
        self.headroom = 0  # what the watched objects could still grow by: sum of _room(obj)
        self.landing: dict[BufferObject, int] = {}  # charged ahead of a device op (fence) writing them
        self.failed: dict[BufferObject, OSError] = {}  # its last spill/restore failed

    @property
    def budget(self) -> int:
        return self.core.config.system_budget

    # -- accounting ------------------------------------------------------------------

    def track(self, obj: BufferObject) -> None:
        """`obj` just got system pages: account for it and put it on the LRU."""
        if obj.kind == Kind.NORMAL:
            self.lru.move_tail(obj)
            self.measure(obj)

    def untrack(self, obj: BufferObject) -> None:
        """`obj` lost its system pages (freed, purged, spilled)."""
        self.lru.discard(obj)
        self.measure(obj, 0)

    def measure(self, obj: BufferObject, now: int | None = None) -> None:  # `now`: known, not measured
        if obj.kind != Kind.NORMAL or (obj.backing is None and now is None):
            return
        now = self.core.backing.resident_bytes(obj.backing) if now is None else now
        self.core.charge_resident(obj, now - obj.resident)
        self.resident += now - obj.resident
        if obj in self.watched:
            self.headroom -= self._room(obj)
            obj.resident = now
            self.headroom += self._room(obj)
        else:
            obj.resident = now

    @staticmethod
    def _room(obj: BufferObject) -> int:
        """How many more bytes `obj`'s pages could come to hold (written through a mapping)."""
        return max(0, -(-obj.size // PAGE_SIZE) * PAGE_SIZE - obj.resident)

    def expect(self, obj: BufferObject, nbytes: int, fence: int) -> None:
        """Count pages device op `fence` may write behind our back now, as at most
        `nbytes`; `refresh()` measures the object again once that op has completed."""
        if obj.kind == Kind.NORMAL:
            if nbytes > obj.resident:
                self.measure(obj, nbytes)
            self.landing[obj] = max(fence, self.landing.get(obj, 0))

    def touch(self, obj: BufferObject) -> None:
        if obj in self.lru:
            self.lru.move_tail(obj)

    @staticmethod
    def volatile(obj: BufferObject) -> bool:
        return bool(obj.maps or obj.xfers or obj.exported)

    def watch(self, obj: BufferObject) -> None:
        """`obj` just became volatile (mapped, exported, transfer opened)."""
        if obj.kind == Kind.NORMAL and obj not in self.watched:
            self.watched.add(obj)
            self.headroom += self._room(obj)

    def unwatch(self, obj: BufferObject) -> None:
        if obj in self.watched:
            self.headroom -= self._room(obj)
            self.watched.discard(obj)

    def refresh(self, limit: int | None = None) -> None:
        """Re-measure objects whose pages may have changed behind our back; the watched ones
        only if they could take resident past `limit` (None: always)."""
        done = self.core.gpu.completed()
        for obj, fence in list(self.landing.items()):
            if fence <= done:
                del self.landing[obj]
                self.measure(obj)
        if limit is not None and self.resident + self.headroom <= limit:
            return  # even if every watched object filled up, the decision would be the same
        for obj in list(self.watched):
            self.measure(obj)
            if not self.volatile(obj):
                self.unwatch(obj)

    # -- reclaim ---------------------------------------------------------------------

    @staticmethod
    def purgeable(obj: BufferObject) -> bool:
        return (obj.madvise == DONTNEED and obj.kind == Kind.NORMAL and not obj.pinned_by
                and not obj.exported and obj.job is None)

    @staticmethod
    def _private(obj: BufferObject) -> bool:
        """Nobody but the manager (and the device) sees its system pages."""
        return (obj.kind == Kind.NORMAL and obj.job is None and not obj.maps and not obj.xfers
                and not obj.pinned_by and not obj.exported)

    def spillable(self, obj: BufferObject) -> bool:
        return (obj.placement == Placement.SYSTEM and obj.madvise != DONTNEED and self._private(obj)
                and not self.core.gpu.busy(obj))

    def spare(self, obj: BufferObject) -> bool:
        """System pages of an object in VRAM that nobody else can see: a spare copy."""
        return obj.placement == Placement.VRAM and self._private(obj) and not self.core.gpu.busy(obj)

    def reclaimable_when_idle(self, obj: BufferObject) -> bool:
        """Spillable or a spare copy, but for device work still using it."""
        return (self.core.gpu.busy(obj) and self._private(obj) and obj not in self.failed
                and (obj.placement == Placement.VRAM
                     or (obj.placement == Placement.SYSTEM and obj.madvise != DONTNEED)))

    def _fence_to_wait_for(self, short: int, candidates: list[BufferObject]) -> int:
        """The earliest fence after which objects device work still uses free `short` more
        bytes (fences complete in order); 0 if even all of them cannot."""
        got = 0
        for obj in sorted((o for o in candidates if self.reclaimable_when_idle(o)), key=lambda o: o.last_fence):
            got += obj.resident
            if got >= short:
                return obj.last_fence
        return 0

    def drop_spare(self, obj: BufferObject) -> None:
        """Free the spare system copy; evicting the object later copies VRAM back."""
        self.untrack(obj)
        self.core.release_backing(obj)

    def make_room(self, need: int, keep: Collection[BufferObject] = ()) -> None:
        """Once `need` more bytes fit (none taken from `keep`) return; else Pending or ENOMEM."""
        self.refresh(self.budget - self.reserved - need)  # pages written through mappings count from here on
        deficit = self.resident + self.reserved + need - self.budget
        if deficit <= 0:
            return
        freeing = sum(j.nbytes for j in self.jobs if j.kind is JobKind.SPILL)
        if freeing >= deficit:
            raise Pending([j for j in self.jobs if j.kind is JobKind.SPILL])
        lru = [o for o in self.lru if o.resident and o not in keep]
        purge = [o for o in lru if self.purgeable(o)]
        spare = [o for o in lru if self.spare(o)]
        spill = [o for o in lru if self.spillable(o) and o not in self.failed]
        available = freeing + sum(o.resident for o in purge + spare + spill)
        fence = 0
        if available < deficit:  # everything reclaimable now goes, then wait for the device
            fence = self._fence_to_wait_for(deficit - available, lru)
            if not fence:
                raise self._no_room(deficit, available)
        deficit -= freeing
        for obj in purge:  # pass 1: purge DONTNEED, least recently used first
            if deficit <= 0:
                return
            deficit -= obj.resident
            self.purge(obj)
        for obj in spare:  # pass 2: system pages of objects whose contents live in VRAM
            if deficit <= 0:
                return
            deficit -= obj.resident
            self.drop_spare(obj)
        if deficit <= 0:
            return
        started = []
        for obj in spill:  # pass 3: spill idle objects, least recently used first
            if deficit <= 0:
                break
            job = self.plan_spill(obj)
            if job is not None:
                deficit -= job.nbytes
                started.append(job)
        jobs = started + [j for j in self.jobs if j.kind is JobKind.SPILL and j not in started]
        if not jobs and not fence:  # spill storage had no room for any of them
            raise self._no_room(deficit, 0)
        raise Pending(jobs, fence=fence)

    def _no_room(self, deficit: int, available: int) -> OutOfMemory:
        """ENOMEM for a request, naming why spilling failed; the objects whose spill failed
        may be tried again from now on."""
        failures = {str(e) for o, e in self.failed.items() if o.placement != Placement.SPILLED}
        self.failed = {o: e for o, e in self.failed.items() if o.placement == Placement.SPILLED}
        return OutOfMemory(f"cannot free {deficit} bytes under the system budget of {self.budget} "
                           f"(resident {self.resident}, reclaimable {available})"
                           + (f"; spilling failed: {'; '.join(sorted(failures))}" if failures else ""))

    def spilling(self) -> list[Job]:
        return [j for j in self.jobs if j.kind is JobKind.SPILL]

    def make_fd_room(self, keep: Collection[BufferObject] = (), wait: bool = True) -> None:
        """Return once one more backing fits under the store's fd limit; else purge and
        drop spares at once, and spill (raise Pending) or fail with ENOMEM. With `wait`
        False (an eviction mid-plan) only the immediate passes run, never Pending or ENOMEM:
        the store's reserve absorbs the excess until the next request."""
        store = self.core.backing
        excess = store.open_count + 1 - store.max_open
        spilling = self.spilling()
        if excess <= len(spilling):
            if excess > 0 and wait:
                raise Pending(spilling)
            return
        excess -= len(spilling)
        for obj in [o for o in self.lru if o not in keep and o.backing is not None and self.purgeable(o)]:
            if excess <= 0:
                return
            excess -= 1
            self.purge(obj)
        for obj in [o for o in self.lru if o not in keep and o.backing is not None and self.spare(o)]:
            if excess <= 0:
                return
            excess -= 1
            self.drop_spare(obj)
        if excess <= 0 or not wait:
            return
        spill = [o for o in self.lru if o not in keep and self.spillable(o) and o not in self.failed][:excess]
        planned = [] if len(spill) < excess and not spilling else [self.plan_spill(o) for o in spill]
        started = [j for j in planned if j is not None]
        if len(started) < excess and not spilling:
            failures = {str(self.failed[o]) for o in spill if o in self.failed}
            raise OutOfMemory(f"no fd left for object pages: {store.open_count} object memfds open, at "
                              f"{store.limit_text}, and none of them can be spilled (mapped, pinned, "
                              f"exported or busy)" + (f"; spilling failed: {'; '.join(sorted(failures))}"
                                                      if failures else ""))
        raise Pending(started + spilling)

    def check_capacity(self, need: int) -> None:
        """ENOMEM/ENOSPC unless the host can take `need` more bytes within the budget: what
        does not fit under it once DONTNEED objects are purged must go to spill storage, so
        it needs that much free space there (spilling an older object to make room costs the
        same space as spilling new data: spillable bytes are not extra capacity), and enough
        spillable data, the new bytes included, to spill."""
        self.refresh(self.budget - self.reserved - need)
        room = self.budget - self.resident - self.reserved
        purgeable = sum(o.resident for o in self.lru if self.purgeable(o))
        overflow = need - room - purgeable  # bytes that must end up in spill storage
        if overflow <= 0:
            return
        disk = self.core.backing.spill_free()
        if overflow > disk:
            raise NoSpace(f"cannot save {need} bytes: {max(room, 0)} free under the budget, {purgeable} "
                          f"purgeable, {overflow} to spill but {disk} free for spill storage")
        spillable = sum(o.resident for o in self.lru if self.spillable(o))
        if overflow > spillable + need:
            raise OutOfMemory(f"cannot save {need} bytes: {overflow} would have to be spilled but only "
                              f"{spillable + need} can be")

    def settle(self, exclude: BufferObject | None = None) -> None:
        """Best effort: free what pages written behind our back put over the budget, as far
        as anything can be freed; raise Pending for the spills started, never ENOMEM."""
        spilling = [j for j in self.jobs if j.kind is JobKind.SPILL]
        started = self.shrink(self.budget - self.reserved + sum(j.nbytes for j in spilling), exclude)
        if self.resident + self.reserved > self.budget and started + spilling:
            # wait for the spills in flight too: counting on them without waiting would let
            # every mapper that comes meanwhile count on the same bytes
            raise Pending(started + spilling)

    def shrink(self, target: int, exclude: BufferObject | None = None) -> list[Job]:
        """Background reclaim (memory pressure): bring resident down toward `target`."""
        self.refresh(target)
        jobs: list[Job] = []
        excess = self.resident - target
        if excess <= 0:
            return jobs  # the common case (every mmap settles): no walk over the LRU
        for obj in [o for o in self.lru if o is not exclude and o.resident and self.purgeable(o)]:
            if excess <= 0:
                return jobs
            excess -= obj.resident
            self.purge(obj)
        for obj in [o for o in self.lru if o is not exclude and o.resident and self.spare(o)]:
            if excess <= 0:
                return jobs
            excess -= obj.resident
            self.drop_spare(obj)
        for obj in [o for o in self.lru if o is not exclude and o.resident and self.spillable(o)
                    and o not in self.failed]:
            if excess <= 0:
                break
            job = self.plan_spill(obj)
            if job is not None:
                excess -= job.nbytes
                jobs.append(job)
        return jobs

    # -- the moves -------------------------------------------------------------------

    def purge(self, obj: BufferObject) -> None:
        """Discard the contents for good, the VRAM copy too (queued work keeps its order)."""
        if obj.backing is not None:
            self.core.backing.purge(obj.backing)
            self.untrack(obj)
            self.core.release_backing(obj)
        self.core.gpu.release(obj)
        if obj.placement == Placement.SPILLED:
            self.core.backing.spill_release(obj.extent)
            self.spilled -= obj.spilled
            obj.extent, obj.spilled = None, 0
        obj.transition(Event.PURGE)
        self.core.counters["purged_total"] += 1

    # -- entry points for handlers ---------------------------------------------------

    def ensure_system(self, obj: BufferObject, keep: Collection[BufferObject] = ()) -> None:
        """Wait out a job in flight and bring a spilled object back (raises Pending); room
        for it never comes from `keep` (the rest of a working set)."""
        if obj.job is not None:
            raise Pending([obj.job])
        if obj.placement == Placement.SPILLED:
            error = self.failed.pop(obj, None)
            if error is not None:
                short = error.errno in (errno.ENOMEM, errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
                raise (OutOfMemory if short else IOFailure)(f"bringing object {obj.id} back failed: {error}")
            self.make_room(obj.spilled, keep=(obj, *keep))
            self.make_fd_room(keep=(obj, *keep))
            raise Pending([self.plan_restore(obj)])
        self.touch(obj)

    def madvise(self, obj: BufferObject, advice: int) -> None:
        """Set the advice; DONTNEED with no resident pages purges at once. Purged is final."""
        if obj.placement == Placement.PURGED or obj.label is not None:  # purged is final; preloaded: kept
            return
        obj.madvise = advice
        no_pages = obj.placement in (Placement.NONE, Placement.SPILLED)
        if advice == DONTNEED and no_pages and obj.job is None and obj.kind == Kind.NORMAL \
                and not obj.pinned_by and not obj.exported:
            self.purge(obj)

    def release(self, obj: BufferObject) -> None:
        """The object is being freed: give back its memory and spill space."""
        self.unwatch(obj)
        self.landing.pop(obj, None)
        self.failed.pop(obj, None)
        if obj.backing is not None:
            self.untrack(obj)
        if obj.extent is not None:
            self.core.backing.spill_release(obj.extent)
            self.spilled -= obj.spilled
            obj.extent, obj.spilled = None, 0

    def statistics(self) -> dict[str, Any]:
        for obj in list(self.lru):  # exact figures: measure everything, not just the volatile
            self.measure(obj)
        purgeable = sum(o.resident for o in self.lru if o.madvise == DONTNEED)
        return {"resident_bytes": self.resident, "spilled_bytes": self.spilled, "purgeable_bytes": purgeable}
