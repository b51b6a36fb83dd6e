"""Gpu: placement of objects in VRAM (device memory), eviction, CPU/GPU hand-over (TTM).

Theory of operation
-------------------
Device memory is one range (`vram_size` bytes) handed out in pages by a RangeAllocator
(drm_mm). An object the device uses is either *in VRAM* (placement VRAM, `obj.vram` is
its node) or *used in place* in host memory: CACHED objects, userptr and foreign memory,
and objects pinned in system memory (coherent, like snooped memory).

All device work happens on the backend's timeline, in order. The core never waits for it
on the request path: copies are queued behind the work that uses an object (pipelined
eviction), and each object remembers two seqnos:

- `last_fence`: the last op that touches it in any way (busy/wait look at this);
- `write_fence`: the last op that changes its bytes (CPU reads wait for this).

`vram_dirty` says the VRAM copy is newer than the system pages (the GPU wrote it);
evicting a clean object whose system pages are still there copies nothing back. While an
object is in VRAM its system pages are a spare copy the shrinker may drop.

Holes stay holes on every move: a copy in reads only the data segments of the system
pages (clearing the rest of the VRAM range), a copy back writes into holes only pages
that are not all zeros. Where the holes are is read from the memfd when the copy is
queued, so only while no queued op still writes those pages (`host_fence`); otherwise
the copy moves every page. Pages a copy may allocate are charged at once (at most the
object's size) and measured again once it has landed (`Memory.expect`).

Making a working set resident is planned first and committed only if the whole set fits:
allocate each missing object (best fit); when that fails, run an eviction scan over the
VRAM LRU, oldest first, skipping pinned objects and the working set; evict only the
nodes overlapping the hole found. If some object finds no hole, roll back and try once
more as i915's eb_reserve does: every unpinned object outside the working set out, the
missing objects placed largest first, victims whose ranges stayed free kept in place. If
that fails too, roll back and fail ENOSPC without having changed anything (SPEC: ENOSPC
only when there is no placement even after evicting every unpinned object outside the
set). Evicting a DONTNEED object drops it (purged).

CPU access (`to_cpu`) brings an object out of VRAM: a copy back if needed, the node freed
at once (later ops on the timeline run after the queued copy), and the caller waits
(Pending) for the copy.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

from ..constants import CACHING_CACHED, DONTNEED, PAGE_SIZE
from ..errors import Busy, NoSpace, UgemError
from ..gpu.base import CopyIn, CopyOut, GpuBackend, GpuOp, Holes, Surface
from ..mm.lru import Lru
from ..mm.range import InsertMode, Node, RangeAllocator
from ..mm.scan import EvictionScan
from .jobs import Pending
from .object import BufferObject, Kind
from .reclaim import Pass, ReclaimCtx, Tally, purgeable
from .states import Event, Placement

if TYPE_CHECKING:
    from ..backing.base import BackingStore
    from .memory import Memory

__all__ = ["Gpu", "Populate"]


class Populate(Protocol):
    """What Gpu needs from the object layer (`Core` implements it): system backing for an
    object the device uses in place (`populate`, never Pending here) or that leaves VRAM."""

    def populate(self, obj: BufferObject, wait: bool = True) -> Any: ...
    def populate_system(self, obj: BufferObject) -> Any: ...


class Gpu:
    """VRAM placement and the GPU timeline. It sees the rest of the core only through
    narrow interfaces: the `GpuBackend`, the `BackingStore`, `Memory` (residency and the
    reclaim engine) and a `Populate`; so it runs on fakes (tests/unit/core)."""

    def __init__(self, backend: GpuBackend, backing: BackingStore, memory: Memory, owner: Populate) -> None:
        self.backing = backing
        self.memory = memory
        self.owner = owner
        self.totals = memory.totals  # the STATS counters, for moves outside a reclaim run
        self.backend = backend
        self.space: RangeAllocator[BufferObject] = RangeAllocator(0, backend.vram_size // PAGE_SIZE)
        self.lru: Lru[BufferObject] = Lru()  # unpinned objects in VRAM, least recently used first
        self.suspended = False  # device work is held (daemon) or refused (embedded)
        self.resumes = 0  # resumes so far: a suspend that sees this change was resumed
        self.last_seq = 0

    # -- the timeline ----------------------------------------------------------------

    def submit(self, op: GpuOp) -> int:
        self.last_seq = self.backend.submit(op)
        return self.last_seq

    def completed(self) -> int:
        return self.backend.completed()

    def busy(self, obj: BufferObject) -> bool:
        return self.memory.busy(obj)

    def wait_for(self, fence: int) -> None:
        """Raise Pending until `fence` has completed."""
        if fence > self.backend.completed():
            raise Pending(fence=fence)

    @property
    def vram_bytes(self) -> int:
        return self.space.used * PAGE_SIZE

    # -- where the device sees an object ---------------------------------------------

    @staticmethod
    def in_place(obj: BufferObject) -> bool:
        """Used where it is, in host memory (coherent): CACHED, proxies, pinned in system."""
        return (obj.caching == CACHING_CACHED or obj.kind != Kind.NORMAL
                or (bool(obj.pinned_by) and obj.placement != Placement.VRAM))

    def host_view(self, obj: BufferObject) -> Any:
        """A writable view of the object's host memory (cached while its backing lives)."""
        if obj.host_view is None:
            obj.host_view = self.backing.map(obj.backing)
        return obj.host_view

    def surface(self, obj: BufferObject) -> Surface:
        if obj.placement == Placement.VRAM:
            return Surface(obj.size, vram=obj.vram.start * PAGE_SIZE, tiling=obj.tiling, stride=obj.stride)
        if obj.kind == Kind.NORMAL:
            self.owner.populate(obj, wait=False)  # mid-submission: no Pending here
        return Surface(obj.size, host=self.host_view(obj), tiling=obj.tiling, stride=obj.stride)

    # -- making a working set resident -----------------------------------------------

    def make_resident(self, objs: Iterable[BufferObject]) -> None:
        """Place every object that needs VRAM, evicting others; ENOSPC changes nothing."""
        wanted = [o for o in dict.fromkeys(objs) if not self.in_place(o)]
        missing = [o for o in wanted if o.placement != Placement.VRAM]
        if not missing:
            for obj in wanted:
                if not obj.pinned_by:
                    self.lru.move_tail(obj)
            return
        for obj in missing:  # map host memory first: a failure here must change nothing
            if obj.backing is not None:
                self.host_view(obj)
        protected = {id(o) for o in wanted}
        placed: list[tuple[BufferObject, Node[BufferObject]]] = []
        victims: list[tuple[BufferObject, int, int]] = []  # (object, start, pages) removed so far
        try:
            for obj in missing:
                placed.append((obj, self._allocate(obj, protected, victims)))
        except NoSpace:
            self._roll_back(placed, victims)
            try:  # second pass (i915 eb_reserve): everything unpinned outside the set out, largest first
                self._place_after_evicting_all(missing, protected, placed, victims)
            except NoSpace:
                self._roll_back(placed, victims)
                raise NoSpace(f"the working set of {len(wanted)} objects ({sum(o.size for o in wanted)} bytes) "
                              f"cannot be placed in {self.backend.vram_size} bytes of device memory") from None
        for victim, start, _ in victims:  # copies out are queued before the copies in
            self._leave(victim, start * PAGE_SIZE, self.totals, evicted=True)
        for obj, node in placed:
            self._move_in(obj, node)
        for obj in wanted:
            if not obj.pinned_by:
                self.lru.move_tail(obj)

    def _allocate(self, obj: BufferObject, protected: set[int],
                  victims: list[tuple[BufferObject, int, int]]) -> Node[BufferObject]:
        pages = obj.size // PAGE_SIZE
        try:
            return self.space.insert(pages, owner=obj)
        except NoSpace:
            pass
        with EvictionScan(self.space, pages) as scan:
            candidates: list[BufferObject] = []
            for cand in self.lru:
                if id(cand) in protected or cand.vram is None:
                    continue
                candidates.append(cand)
                if scan.add(cand.vram):
                    break
            hits = [c for c in reversed(candidates) if scan.remove(c.vram)]
        if not scan.found:
            raise NoSpace(f"no room for {obj.size} bytes")
        for victim in hits:
            node = victim.vram
            victims.append((victim, node.start, node.size))
            self.space.remove(node)
            victim.vram = None
        return self.space.insert(pages, mode=InsertMode.EVICT, owner=obj)

    def _roll_back(self, placed: list[tuple[BufferObject, Node[BufferObject]]],
                   victims: list[tuple[BufferObject, int, int]]) -> None:
        """Undo a failed plan: free the new nodes, put the victims back where they were."""
        for _, node in reversed(placed):
            self.space.remove(node)
        for victim, start, pages in reversed(victims):
            victim.vram = self.space.reserve(start, pages, owner=victim)
        placed.clear()
        victims.clear()

    def _place_after_evicting_all(self, missing: list[BufferObject], protected: set[int],
                                  placed: list[tuple[BufferObject, Node[BufferObject]]],
                                  victims: list[tuple[BufferObject, int, int]]) -> None:
        """The order of the greedy pass can fragment VRAM where a placement exists (a small
        object takes the one slot next to the hole a large one needs): take every unpinned
        object outside the working set out, place the largest first, then give back each
        victim whose range is still free. NoSpace leaves `placed`/`victims` to roll back."""
        for cand in list(self.lru):
            if id(cand) in protected or cand.vram is None:
                continue
            node = cand.vram
            victims.append((cand, node.start, node.size))
            self.space.remove(node)
            cand.vram = None
        for obj in sorted(missing, key=lambda o: o.size, reverse=True):
            placed.append((obj, self.space.insert(obj.size // PAGE_SIZE, owner=obj)))
        evicted = []
        for victim, start, pages in victims:
            try:
                victim.vram = self.space.reserve(start, pages, owner=victim)
            except NoSpace:
                evicted.append((victim, start, pages))
        victims[:] = evicted

    def _holes(self, obj: BufferObject) -> Holes | None:
        """The ranges of the object's system pages that hold no memory, for a copy that
        keeps them holes; None while queued device work will still write those pages
        (where its writes land is known only once it has run)."""
        if obj.host_fence > self.backend.completed():
            return None
        return self.backing.holes(obj.backing)

    def _move_in(self, obj: BufferObject, node: Node[BufferObject]) -> None:
        """Queue the copy that makes `node` hold the object's contents: its data only, the
        holes of its system pages are cleared in VRAM, never read (which would fill them)."""
        offset = node.start * PAGE_SIZE
        if obj.backing is None:  # never populated: the device's copy starts as zeros
            seq = self.submit(CopyIn(offset, None, obj.size))
        else:
            holes = self._holes(obj)
            seq = self.submit(CopyIn(offset, self.host_view(obj), obj.size, holes or (),
                                     file=self.backing.device_file(obj.backing)))
            if holes is None:  # reading every page may fill holes: count them until measured
                self.memory.expect(obj, obj.size, seq)
            self.totals.bytes_moved += obj.size - sum(n for _, n in holes or ())
        obj.vram = node
        obj.vram_dirty = False
        obj.last_fence = obj.write_fence = seq
        obj.transition(Event.MIGRATE)

    # -- leaving VRAM ----------------------------------------------------------------

    def evict(self, obj: BufferObject, tally: Tally, *, for_cpu: bool = False) -> None:
        """Take an object out of VRAM: an eviction (suspend, pressure), or a hand-over to
        the CPU (not counted as an eviction, and a DONTNEED object keeps its contents)."""
        node = obj.vram
        assert node is not None
        self.space.remove(node)
        obj.vram = None
        self._leave(obj, node.start * PAGE_SIZE, tally, evicted=not for_cpu)

    def _leave(self, obj: BufferObject, offset: int, tally: Tally, evicted: bool) -> None:
        """Copy back (if needed) from `offset`, or drop a DONTNEED object; placement SYSTEM."""
        self.lru.discard(obj)
        if evicted:
            tally.evicted += 1
        if evicted and obj.madvise == DONTNEED and purgeable(obj):  # never exported or pinned
            obj.vram_dirty = False
            self.memory.purge(obj, tally)
            return
        if obj.vram_dirty or obj.backing is None:
            self.owner.populate_system(obj)
            holes = self._holes(obj)  # pages of zeros copied into holes would fill them
            seq = self.submit(CopyOut(offset, self.host_view(obj), obj.size, holes or (),
                                      file=self.backing.device_file(obj.backing)))
            self.memory.expect(obj, obj.size, seq)  # at most; measured once it has landed
            tally.bytes_moved += obj.size
            obj.last_fence = obj.write_fence = obj.host_fence = seq
        obj.vram_dirty = False
        obj.transition(Event.EVICT)

    def to_cpu(self, obj: BufferObject, write: bool) -> None:
        """Bring the latest contents to system pages; Pending until they are there.

        Readers wait for the device's writes; writers for all its work on the object (as
        the kernel's pwrite and set_domain do: a queued read must not see a later write),
        except while a SemaphoreWait polls an object used in place: then only for writes,
        so the write that releases the semaphore does not wait for the command it releases."""
        if obj.placement == Placement.VRAM:
            if obj.pinned_by:
                raise Busy(f"object {obj.id} is pinned in device memory")
            self.evict(obj, self.totals, for_cpu=True)
        polled = self.in_place(obj) and obj.sem_fence > self.backend.completed()
        self.wait_for(obj.last_fence if write and not polled else obj.write_fence)

    def evict_all(self, tally: Tally) -> None:
        """Suspend's evict pass: every object out of VRAM (pinned ones too)."""
        for node in list(self.space):
            obj = node.owner
            assert obj is not None
            self.evict(obj, tally)

    def suspend(self) -> None:
        """Hold new device work from now on (as the kernel stops submissions first), wait
        for all work, save every VRAM object to system memory (DONTNEED ones are dropped),
        spill past the budget (the reclaim engine: its evict pass, then, once the copies
        out have landed, purge/spare/spill down to the budget). Transactional: if the host
        cannot hold the data, fail (ENOMEM/ENOSPC) before anything moved, device running.
        Pending until it is all done; each run after a wait takes up where the last one
        stopped."""
        self.suspended = True
        self.wait_for(self.last_seq)
        if self.space.used:
            need = sum(n.owner.size for n in self.space if n.owner is not None
                       and n.owner.madvise != DONTNEED and (n.owner.vram_dirty or n.owner.backing is None))
            try:
                self.memory.check_capacity(need)
            except UgemError:
                self.resume()
                raise
            self.memory.reclaim(ReclaimCtx(0, passes=(Pass.EVICT,), evict=self.evict_all))
        self.wait_for(self.last_seq)  # the copies out
        jobs = self.memory.shrink(self.memory.budget) + self.memory.spilling()
        if jobs:
            raise Pending(jobs)

    def resume(self) -> None:
        """Run device work again; a suspend still in progress then ends without effect
        (`resumes` tells it a resume came after it)."""
        self.suspended = False
        self.resumes += 1

    def release(self, obj: BufferObject) -> None:
        """The object is freed: give its VRAM back (queued work keeps the timeline order)."""
        if obj.vram is not None:
            self.lru.discard(obj)
            self.space.remove(obj.vram)
            obj.vram = None
