"""Pageable memory under a budget: residency accounting, purge, spill, restore (SPEC §3).

Theory of operation
-------------------
`resident` is what the objects' memfds really hold (allocated blocks, as the BackingStore
measures them). Each NORMAL object with system pages caches its last measurement in
`obj.resident`; the total is kept incrementally, and so is the creating client's share (all
in `measure`, through `Owner.charge_resident`). Objects whose pages can change without a
request (mapped, exported, or with a bulk transfer open) are *volatile*: the core calls
`watch()` when one becomes so, and `refresh(limit)` re-measures the watched ones before any
decision that depends on the total, `make_room`'s first check included, unless the decision
cannot change: `headroom` is what the watched objects could still grow by (their sizes less
what they hold), and while `held` + headroom stays within `limit` even full ones would
fit, so nothing is measured (sending thousands of arrays exports thousands of objects; they
are not fstat'ed before every request).

Before a request adds `need` bytes, `make_room(need)` frees enough that
resident + reserved + need <= budget. What to free is decided by the reclaim engine
(`reclaim.py`: the candidate filters, the passes pool -> purge -> spare -> spill,
oldest first, and the rules below); this class keeps the state (the LRU, the totals, the
jobs) and does the moves (`purge`, `drop_spare`, `plan_spill`), and its `make_room`,
`make_fd_room`, `shrink`, `settle` and `check_capacity` are one-line calls into the engine.

Spill storage is reserved for the data an object holds, not its size (sparse objects
cannot exhaust it); when it has no room, that object counts as a failed spill. Objects that
device work still uses (busy) are left out of the spare and spill passes until it
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
memfd when it lands); if nothing can be freed, ENOMEM names the fd limit.

Freed objects' memfds may be kept for reuse (backing/recycle.py; which ones, core/recycle.py):
`close_backing` pools them, each cleared by a background ZERO job before it is handed out.
Pooled pages count against the budget: `held` (resident plus pooled) is what the budget
bounds, the pool takes at most a quarter of the budget and only what fits under it
(`pool_room`), and every reclaim drops pooled memfds first (reclaim.py). Pooled memfds
count against the fd limit the same way.

Moves record what they did (purges, evictions, spills, bytes moved) into a `Tally`: the
reclaim run's, which is added to `totals` (the STATS counters) when the run ends, or
`totals` itself for moves outside a run.

The spill and restore jobs themselves (planning them, applying their outcome) are in
`spill_jobs.py`, a mixin of this class.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any, Protocol

from ..constants import DONTNEED, PAGE_SIZE
from ..errors import IOFailure, OutOfMemory
from ..mm.lru import Lru
from . import reclaim
from .jobs import Job, JobKind, Pending
from .object import BufferObject, Kind
from .reclaim import ReclaimCtx, Tally
from .recycle import recyclable
from .spill_jobs import SpillJobs
from .states import Event, Placement

if TYPE_CHECKING:
    from ..backing.base import BackingStore
    from ..gpu.base import GpuBackend

__all__ = ["Memory", "Owner"]


class Owner(Protocol):
    """What Memory needs from the object layer (`Core` implements it): references that keep
    an object alive under a job, closing its backing, the per-client share of resident bytes."""

    def get(self, obj: BufferObject) -> None: ...
    def put(self, obj: BufferObject) -> None: ...
    def release_backing(self, obj: BufferObject) -> None: ...
    def charge_resident(self, obj: BufferObject, delta: int) -> None: ...


class Memory(SpillJobs):
    """Residency state and the moves. It sees the rest of the core only through narrow
    interfaces: the budget, the `BackingStore`, the GPU backend's timeline (`completed()`, for
    `busy`), an `Owner`, and `release_vram` (a purge drops the VRAM copy too); so it runs on
    fakes (tests/unit/core)."""

    def __init__(self, budget: int, backing: BackingStore, gpu_backend: GpuBackend, owner: Owner,
                 release_vram: Callable[[BufferObject], None]) -> None:
        self.budget = budget
        self.backing = backing
        self.gpu_backend = gpu_backend
        self.owner = owner
        self.release_vram = release_vram
        self.totals = Tally()  # the STATS counters: moves outside a reclaim run record here
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
        self.clearing: dict[Any, Job] = {}  # pooled backing (the store's entry) -> its ZERO job in flight
        self.streams: dict[int, int] = {}  # uid -> reads straight from spill storage in flight (stream.py)

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
        now = self.backing.resident_bytes(obj.backing) if now is None else now
        self.owner.charge_resident(obj, now - obj.resident)
        self.resident += now - obj.resident
        if obj in self.watched:
            self.headroom -= self._room(obj)
            obj.resident = now
            self.headroom += self._room(obj)
        else:
            obj.resident = now

    @property
    def held(self) -> int:
        """Bytes of system memory the budget bounds: objects' resident pages and pooled ones."""
        return self.resident + self.backing.pooled_bytes

    def pool_room(self) -> int:
        """Bytes the pool may take now: a quarter of the budget, within the budget."""
        return min(self.budget // 4, self.budget - self.resident - self.reserved) - self.backing.pooled_bytes

    def new_backing(self, obj: BufferObject, wait: bool = True) -> Any:
        """A new backing for `obj`: a pooled one of its uid and size if one is cleared; if one
        is still being cleared (the request that freed it came just before), Pending for that
        clearing unless `wait` is False (a memset of pages mapped before runs ~10x faster than
        the kernel makes fresh ones)."""
        if wait and self.clearing:
            size, uid = obj.size, obj.creator_uid
            jobs = [j for j in self.clearing.values() if j.obj.size == size and j.obj.creator_uid == uid]
            if jobs and not self.backing.has_pooled(size, uid):
                raise Pending(jobs[:1])
        return self.backing.create(obj.size, obj.creator_uid)

    def close_backing(self, obj: BufferObject, freed: bool) -> None:
        """Close `obj`'s memfd; a `freed` one nobody else may see (core/recycle.py) may be
        pooled instead, then cleared off the request path (a background ZERO job)."""
        if not (freed and recyclable(obj, self.busy(obj))):
            self.backing.release(obj.backing)
            return
        entry = self.backing.release(obj.backing, obj.creator_uid, self.pool_room())
        if entry is not None:
            job = Job(JobKind.ZERO, obj, lambda: self.backing.clear(entry), 0, backing=entry)
            self.clearing[entry] = job
            self.background.append(job)

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
        done = self.gpu_backend.completed()
        for obj, fence in list(self.landing.items()):
            if fence <= done:
                del self.landing[obj]
                self.measure(obj)
        if limit is not None and self.held + self.headroom <= limit:
            return  # even if every watched object filled up, the decision would be the same
        for obj in list(self.watched):
            self.measure(obj)
            if not self.volatile(obj):
                self.unwatch(obj)

    # -- reclaim (the policy is core/reclaim.py; these are its entry points) -----------

    def busy(self, obj: BufferObject) -> bool:
        """Device work still uses `obj` (its pages are not ours to drop or copy yet)."""
        return obj.last_fence > self.gpu_backend.completed()

    def reclaim(self, ctx: ReclaimCtx) -> ReclaimCtx:
        return reclaim.reclaim(self, ctx)

    def make_room(self, need: int, keep: Collection[BufferObject] = ()) -> None:
        """Once `need` more bytes fit (none taken from `keep`) return; else Pending or ENOMEM."""
        reclaim.make_room(self, need, keep)

    def make_fd_room(self, keep: Collection[BufferObject] = (), wait: bool = True) -> None:
        """Return once one more backing fits under the store's fd limit; else Pending or
        ENOMEM (with `wait` False: only the immediate passes, never either)."""
        reclaim.make_fd_room(self, keep, wait)

    def check_capacity(self, need: int) -> None:
        """ENOMEM/ENOSPC unless the host can take `need` more bytes within the budget."""
        reclaim.check_capacity(self, need)

    def settle(self, exclude: BufferObject | None = None) -> None:
        """Best effort back under the budget; Pending for spills, never ENOMEM."""
        reclaim.settle(self, () if exclude is None else (exclude,))

    def shrink(self, target: int) -> list[Job]:
        """Background reclaim (memory pressure): bring resident down toward `target`."""
        return reclaim.shrink(self, target)

    def spilling(self) -> list[Job]:
        return [j for j in self.jobs if j.kind is JobKind.SPILL]

    def no_room(self, deficit: int, available: int) -> OutOfMemory:
        """ENOMEM for a request, naming why spilling failed; the objects whose spill failed
        may be tried again from now on."""
        failures = {str(e) for o, e in self.failed.items() if o.placement != Placement.SPILLED}
        self.failed = {o: e for o, e in self.failed.items() if o.placement == Placement.SPILLED}
        return OutOfMemory(f"cannot free {deficit} bytes under the system budget of {self.budget} "
                           f"(resident {self.resident}, pooled {self.backing.pooled_bytes}, reclaimable {available})"
                           + (f"; spilling failed: {'; '.join(sorted(failures))}" if failures else ""))

    def drop_spare(self, obj: BufferObject) -> None:
        """Free the spare system copy; evicting the object later copies VRAM back."""
        self.untrack(obj)
        self.owner.release_backing(obj)

    # -- the moves -------------------------------------------------------------------

    def purge(self, obj: BufferObject, tally: Tally) -> None:
        """Discard the contents for good, the VRAM copy too (queued work keeps its order)."""
        if obj.backing is not None:
            self.backing.purge(obj.backing)
            self.untrack(obj)
            self.owner.release_backing(obj)
        self.release_vram(obj)
        if obj.placement == Placement.SPILLED:
            self.backing.spill_release(obj.extent)
            self.spilled -= obj.spilled
            obj.extent, obj.spilled = None, 0
        obj.transition(Event.PURGE)
        tally.purged += 1

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
            self.purge(obj, self.totals)

    def release(self, obj: BufferObject) -> None:
        """The object is being freed: give back its memory and spill space."""
        self.unwatch(obj)
        self.landing.pop(obj, None)
        self.failed.pop(obj, None)
        if obj.backing is not None:
            self.untrack(obj)
        if obj.extent is not None:
            self.backing.spill_release(obj.extent)
            self.spilled -= obj.spilled
            obj.extent, obj.spilled = None, 0

    def statistics(self) -> dict[str, Any]:
        for obj in list(self.lru):  # exact figures: measure everything, not just the volatile
            self.measure(obj)
        purgeable = sum(o.resident for o in self.lru if o.madvise == DONTNEED)
        store = self.backing
        return {"resident_bytes": self.resident, "spilled_bytes": self.spilled, "purgeable_bytes": purgeable,
                "pooled_bytes": store.pooled_bytes, "pooled_memfds": store.pooled_fds, "recycled_total": store.recycled,
                "streams": sum(self.streams.values())}  # reads served straight from spill storage, in flight
