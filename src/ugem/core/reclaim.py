"""The reclaim engine (TTM's ttm_operation_ctx + ttm_bo_evict, over drm_gem_lru_scan).

Every decision to free system memory or object fds goes through `reclaim(memory, ctx)`:
`Memory.make_room`, `make_fd_room`, `shrink`, `settle` and `check_capacity`, the daemon's
pressure shrinker, execbuffer's room for pages written in place and suspend are thin calls
that build a `ReclaimCtx` and read its outcome. The candidate filters (`purgeable`,
`spare`, `spillable`, `reclaimable_when_idle`) are defined here and nowhere else.

The context says what to free (`target`, in a `Unit`: bytes of resident pages or object
fds), what to keep (`keep`: never a candidate, e.g. the rest of a working set), whether
the caller may wait (`wait`: spills may be started; else only the immediate passes run),
and which passes run; it records what the run did (objects and bytes purged, spare copies
dropped, spills started, evictions) and carries a `Tally` of the moves, which is added to
the core's totals once, when the run ends (`Tally.add`; moves outside a run record into
the totals directly).

The passes, in order, each but the first two a walk over the memory LRU from its head
(least recently used first) with `Lru.scan(rotate=False)`, so a pass never ages what it refuses:

0. evict (suspend only): every object out of VRAM (`ctx.evict`, the device's hook);
1. pool: memfds of freed objects kept for reuse (backing/recycle.py), oldest first: they
   hold nobody's data, so they go before anything else;
2. purge: DONTNEED objects (mapped ones too), never exported, pinned, foreign or busy with
   a job; hole punching is immediate. The callback takes the object off the LRU (the
   scan's asserted contract);
3. spare: system pages of objects whose contents live in VRAM, nobody else sees them and
   no device work uses them; dropped at once (an eviction later copies VRAM back);
4. spill: idle, private WILLNEED objects in system memory, not left out after a failed
   spill; a job copies each to spill storage off the request path (the object stays on
   the LRU, holding its pages, until the job lands: the callback refuses it and the
   context counts the bytes the job will free). Only with `wait`.

A bytes run stops once `remaining` (what is still to free) reaches 0; each pooled memfd
dropped counts its bytes (one fd in an fds run), each purge or spare the object's resident
bytes, each spill the bytes its job will free. An fds run counts one per object; its spill
pass takes at most `remaining` objects, and plans none unless that many can be found or
spills are already in flight.

The policies built on the engine are here too (Memory's methods call them): `make_room`
is all or nothing (if all passes together, plus the spills in flight, cannot free enough
even once device work is done, nothing is changed: ENOMEM, each object counted once), and
when they can only after device work completes, it runs what it can and waits for the
earliest sufficient fence (Pending). Must not: do I/O itself (moves go through Memory and
the BackingStore) or know about transports.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..constants import DONTNEED
from ..errors import NoSpace, OutOfMemory
from .jobs import Job, Pending
from .object import BufferObject, Kind
from .states import Placement

if TYPE_CHECKING:
    from .memory import Memory

__all__ = [
    "ALL_PASSES", "Pass", "ReclaimCtx", "Tally", "Unit", "available", "check_capacity", "make_fd_room", "make_room",
    "purgeable", "reclaim", "reclaimable_when_idle", "settle", "shrink", "spare", "spillable",
]

Busy = Callable[[BufferObject], bool]


class Unit(enum.Enum):
    BYTES = "bytes"  # resident bytes of system pages
    FDS = "fds"  # objects holding a memfd open


class Pass(enum.Enum):
    EVICT = "evict"
    POOL = "pool"
    PURGE = "purge"
    SPARE = "spare"
    SPILL = "spill"


ALL_PASSES = (Pass.POOL, Pass.PURGE, Pass.SPARE, Pass.SPILL)


@dataclass
class Tally:
    """Counts of moves (the STATS counters): a run's, or the core's totals."""

    purged: int = 0
    evicted: int = 0
    spilled: int = 0
    restored: int = 0
    bytes_moved: int = 0

    def add(self, other: Tally) -> None:
        self.purged += other.purged
        self.evicted += other.evicted
        self.spilled += other.spilled
        self.restored += other.restored
        self.bytes_moved += other.bytes_moved

    def stats(self) -> dict[str, int]:
        return {"purged_total": self.purged, "evicted_total": self.evicted, "spilled_total": self.spilled,
                "restored_total": self.restored, "bytes_moved_total": self.bytes_moved}


@dataclass(eq=False)
class ReclaimCtx:
    """One reclaim operation (ttm_operation_ctx): what to free, and what it did."""

    target: int  # how much to free, in `unit`
    unit: Unit = Unit.BYTES
    keep: Collection[BufferObject] = ()  # never candidates
    wait: bool = True  # spills may be started (the caller then waits for them)
    passes: tuple[Pass, ...] = ALL_PASSES
    evict: Callable[[Tally], None] | None = None  # Pass.EVICT: the device's "everything out"
    remaining: int = field(init=False)  # still to free
    pooled: int = 0  # pooled memfds closed by this run ...
    pooled_bytes: int = 0  # ... and the bytes they held
    purged: int = 0  # objects purged by this run ...
    purged_bytes: int = 0  # ... and the resident bytes they held
    spared: int = 0  # spare system copies dropped ...
    spared_bytes: int = 0
    jobs: list[Job] = field(default_factory=list)  # spills started by this run
    failed: list[BufferObject] = field(default_factory=list)  # spill storage had no room for them
    tally: Tally = field(default_factory=Tally)  # moves, added to the core's totals at the end

    def __post_init__(self) -> None:
        self.remaining = self.target

    @property
    def spill_bytes(self) -> int:
        return sum(j.nbytes for j in self.jobs)


# -- the candidate filters (one definition each) ---------------------------------------


def purgeable(obj: BufferObject) -> bool:
    """DONTNEED, ours, and nobody else holds its pages (pinned, exported) or copies them."""
    return (obj.madvise == DONTNEED and obj.kind == Kind.NORMAL and not obj.pinned_by
            and not obj.exported and obj.job is None)


def _private(obj: BufferObject) -> bool:
    """Nobody but the manager (and the device) sees its system pages."""
    return (obj.kind == Kind.NORMAL and obj.job is None and not obj.maps and not obj.xfers
            and not obj.pinned_by and not obj.exported)


def spillable(obj: BufferObject, busy: Busy) -> bool:
    return obj.placement == Placement.SYSTEM and obj.madvise != DONTNEED and _private(obj) and not busy(obj)


def spare(obj: BufferObject, busy: Busy) -> bool:
    """System pages of an object in VRAM that nobody else can see: a spare copy."""
    return obj.placement == Placement.VRAM and _private(obj) and not busy(obj)


def reclaimable_when_idle(obj: BufferObject, busy: Busy, failed: Collection[BufferObject]) -> bool:
    """Spillable or a spare copy, but for device work still using it."""
    return (busy(obj) and _private(obj) and obj not in failed
            and (obj.placement == Placement.VRAM
                 or (obj.placement == Placement.SYSTEM and obj.madvise != DONTNEED)))


def _candidate(memory: Memory, ctx: ReclaimCtx, step: Pass) -> Callable[[BufferObject], bool]:
    """Whether an object on the LRU is a candidate of pass `step` for this context."""
    busy, failed, keep = memory.busy, memory.failed, ctx.keep

    def holds(obj: BufferObject) -> bool:  # something to free in this unit
        return bool(obj.resident) if ctx.unit is Unit.BYTES else obj.backing is not None

    if step is Pass.PURGE:
        return lambda o: o not in keep and holds(o) and purgeable(o)
    if step is Pass.SPARE:
        return lambda o: o not in keep and holds(o) and spare(o, busy)
    return lambda o: o not in keep and holds(o) and spillable(o, busy) and o not in failed


def _cost(ctx: ReclaimCtx, obj: BufferObject) -> int:
    return obj.resident if ctx.unit is Unit.BYTES else 1


# -- the engine ------------------------------------------------------------------------


def reclaim(memory: Memory, ctx: ReclaimCtx) -> ReclaimCtx:
    """Run `ctx.passes` in order until `ctx.remaining` <= 0; returns `ctx`."""
    try:
        for step in ctx.passes:
            if step is Pass.EVICT:
                assert ctx.evict is not None
                ctx.evict(ctx.tally)
            elif step is Pass.POOL:
                _drop_pooled(memory, ctx)
            elif ctx.remaining > 0 and (step is not Pass.SPILL or ctx.wait):
                _scan(memory, ctx, step)
    finally:
        memory.totals.add(ctx.tally)
    return ctx


def _drop_pooled(memory: Memory, ctx: ReclaimCtx) -> None:
    if ctx.remaining > 0:
        in_bytes = ctx.unit is Unit.BYTES
        fds, nbytes = memory.backing.drop_pooled(ctx.remaining if in_bytes else 0, 0 if in_bytes else ctx.remaining)
        ctx.pooled, ctx.pooled_bytes = ctx.pooled + fds, ctx.pooled_bytes + nbytes
        ctx.remaining -= nbytes if ctx.unit is Unit.BYTES else fds


def _scan(memory: Memory, ctx: ReclaimCtx, step: Pass) -> None:
    candidate = _candidate(memory, ctx, step)
    if step is Pass.SPILL and ctx.unit is Unit.FDS:
        found = 0
        for obj in memory.lru:
            found += candidate(obj)
            if found >= ctx.remaining:
                break
        if found < ctx.remaining and not memory.spilling():
            return  # not enough to spill and nothing in flight: plan nothing (ENOMEM follows)

    def shrink(obj: BufferObject) -> bool:
        if not candidate(obj):
            return False
        cost, held = _cost(ctx, obj), obj.resident
        if step is Pass.PURGE:
            memory.purge(obj, ctx.tally)
            ctx.purged, ctx.purged_bytes = ctx.purged + 1, ctx.purged_bytes + held
        elif step is Pass.SPARE:
            memory.drop_spare(obj)
            ctx.spared, ctx.spared_bytes = ctx.spared + 1, ctx.spared_bytes + held
        else:
            job = memory.plan_spill(obj)
            if job is not None:
                ctx.jobs.append(job)
            else:
                ctx.failed.append(obj)
            ctx.remaining -= job.nbytes if job is not None and ctx.unit is Unit.BYTES else \
                (0 if ctx.unit is Unit.BYTES else 1)
            return False  # it keeps its pages (and its place on the LRU) until the job lands
        ctx.remaining -= cost
        return True

    memory.lru.scan(len(memory.lru), shrink, rotate=False, until=lambda: ctx.remaining <= 0)


# -- the callers' policies --------------------------------------------------------------


def available(memory: Memory, ctx: ReclaimCtx) -> int:
    """What the passes of `ctx` could free now: each object counted once (a DONTNEED
    object in VRAM is a candidate of purge and spare, and purged once)."""
    candidates = [_candidate(memory, ctx, step) for step in ctx.passes if step not in (Pass.EVICT, Pass.POOL)]
    store = memory.backing
    pooled = (store.pooled_bytes if ctx.unit is Unit.BYTES else store.pooled_fds) if Pass.POOL in ctx.passes else 0
    return pooled + sum(_cost(ctx, o) for o in memory.lru if any(c(o) for c in candidates))


def _fence_to_wait_for(memory: Memory, short: int, keep: Collection[BufferObject]) -> int:
    """The earliest fence after which objects device work still uses free `short` more
    bytes (fences complete in order); 0 if even all of them cannot."""
    got = 0
    waiting = (o for o in memory.lru if o.resident and o not in keep
               and reclaimable_when_idle(o, memory.busy, memory.failed))
    for obj in sorted(waiting, key=lambda o: o.last_fence):
        got += obj.resident
        if got >= short:
            return obj.last_fence
    return 0


def make_room(memory: Memory, need: int, keep: Collection[BufferObject]) -> None:
    """Once `need` more bytes fit under the budget (none taken from `keep`) return; else
    Pending (spills started or in flight, or a fence) or ENOMEM, changing nothing."""
    memory.refresh(memory.budget - memory.reserved - need)  # pages written through mappings count from here
    deficit = memory.held + memory.reserved + need - memory.budget
    if deficit <= 0:
        return
    spilling = memory.spilling()
    freeing = sum(j.nbytes for j in spilling)
    if freeing >= deficit:
        raise Pending(spilling)
    ctx = ReclaimCtx(deficit - freeing, keep=keep)
    can = freeing + available(memory, ctx)
    fence = 0
    if can < deficit:  # everything reclaimable now goes, then wait for the device
        fence = _fence_to_wait_for(memory, deficit - can, keep)
        if not fence:
            raise memory.no_room(deficit, can)
    reclaim(memory, ctx)
    if ctx.remaining <= 0 and not ctx.jobs:
        return  # the pool, purges and spares were enough
    jobs = ctx.jobs + [j for j in spilling if j not in ctx.jobs]
    if not jobs and not fence:  # spill storage had no room for any of them
        raise memory.no_room(ctx.remaining, 0)
    raise Pending(jobs, fence=fence)


def make_fd_room(memory: Memory, keep: Collection[BufferObject], wait: bool) -> None:
    """Return once one more backing fits under the store's fd limit; else purge and drop
    spares at once, and spill (Pending) or fail with ENOMEM. With `wait` False only the
    immediate passes run, never Pending or ENOMEM (the store's reserve absorbs the excess)."""
    store = memory.backing
    excess = store.open_count + store.pooled_fds + 1 - store.max_open
    spilling = memory.spilling()
    if excess <= len(spilling):
        if excess > 0 and wait:
            raise Pending(spilling)
        return
    want = excess - len(spilling)
    ctx = reclaim(memory, ReclaimCtx(want, Unit.FDS, keep=keep, wait=wait))
    freed = ctx.pooled + ctx.purged + ctx.spared
    if freed >= want or not wait:
        return
    if len(ctx.jobs) < want - freed and not spilling:
        failures = {str(memory.failed[o]) for o in ctx.failed}
        raise OutOfMemory(f"no fd left for object pages: {store.open_count} object memfds open, at "
                          f"{store.limit_text}, and none of them can be spilled (mapped, pinned, "
                          f"exported or busy)" + (f"; spilling failed: {'; '.join(sorted(failures))}"
                                                  if failures else ""))
    raise Pending(ctx.jobs + spilling)


def shrink(memory: Memory, target: int, keep: Collection[BufferObject] = ()) -> list[Job]:
    """Background reclaim (memory pressure, after a reply): bring resident down toward
    `target` as far as anything can be freed; returns the spills started."""
    memory.refresh(target)
    if memory.held <= target:  # nothing to free: no pass would run (the common case, after every request)
        return []
    return reclaim(memory, ReclaimCtx(memory.held - target, keep=keep)).jobs


def settle(memory: Memory, keep: Collection[BufferObject]) -> None:
    """Best effort: free what pages written behind our back put over the budget, as far as
    anything can be freed; Pending for the spills started and in flight, never ENOMEM."""
    spilling = memory.spilling()
    started = shrink(memory, memory.budget - memory.reserved + sum(j.nbytes for j in spilling), keep)
    if memory.held + memory.reserved > memory.budget and started + spilling:
        # wait for the spills in flight too: counting on them without waiting would let
        # every mapper that comes meanwhile count on the same bytes
        raise Pending(started + spilling)


def check_capacity(memory: Memory, need: int) -> None:
    """ENOMEM/ENOSPC unless the host can take `need` more bytes within the budget: what
    does not fit under it once DONTNEED objects are purged must go to spill storage, so it
    needs that much free space there (spilling an older object to make room costs the same
    space as spilling new data: spillable bytes are not extra capacity), and enough
    spillable data, the new bytes included, to spill."""
    memory.refresh(memory.budget - memory.reserved - need)
    room = memory.budget - memory.resident - memory.reserved  # pooled memfds are room: they go first
    purge = sum(o.resident for o in memory.lru if purgeable(o))
    overflow = need - room - purge  # bytes that must end up in spill storage
    if overflow <= 0:
        return
    disk = memory.backing.spill_free()
    if overflow > disk:
        raise NoSpace(f"cannot save {need} bytes: {max(room, 0)} free under the budget, {purge} "
                      f"purgeable, {overflow} to spill but {disk} free for spill storage")
    spill = sum(o.resident for o in memory.lru if spillable(o, memory.busy))
    if overflow > spill + need:
        raise OutOfMemory(f"cannot save {need} bytes: {overflow} would have to be spilled but only "
                          f"{spill + need} can be")
