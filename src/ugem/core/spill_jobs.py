"""Spill, restore and preload jobs: planning them and applying their outcome (a mixin of Memory).

`Memory` decides what to reclaim (memory.py); this module starts the copies that spill an
idle object to spill storage or bring one back, and applies a finished job on the core's
thread. The copies themselves run off the request path (jobs.py).

Rules:
- spill storage is reserved for the data an object holds, measured when the spill is
  planned (nothing can change an idle object's pages), never for its size;
- a job that fails (spill storage full, I/O error) leaves its object where it was, and the
  request that waited for it runs again. So that it cannot plan the same failing copy for
  ever, `failed` remembers the object: a failed spill keeps it out of the spill passes
  until some request has failed with ENOMEM (the next one tries it again); a failed
  restore is the error of the next request that needs the object (ENOMEM when memory or
  disk ran short, else EIO);
- a restored object's spill space is punched by a background job after the reply, and
  only then handed out again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from ..constants import DONTNEED
from ..errors import OutOfMemory
from .jobs import Job, JobKind
from .object import BufferObject
from .states import Event, Placement

if TYPE_CHECKING:
    from ..backing.base import BackingStore
    from .memory import Owner
    from .reclaim import Tally

__all__ = ["SpillJobs"]


class _Memory(Protocol):
    """What the jobs use of Memory (the class they are mixed into)."""

    backing: BackingStore
    owner: Owner
    totals: Tally
    jobs: list[Job]
    background: list[Job]
    failed: dict[BufferObject, OSError]
    clearing: dict[Any, Job]
    reserved: int
    spilled: int

    def measure(self, obj: BufferObject) -> None: ...
    def track(self, obj: BufferObject) -> None: ...
    def untrack(self, obj: BufferObject) -> None: ...
    def purge(self, obj: BufferObject, tally: Tally) -> None: ...
    def _start(self, job: Job) -> None: ...
    def _finish_spill(self, job: Job) -> None: ...
    def _finish_restore(self, job: Job) -> None: ...


class SpillJobs:
    def plan_spill(self: _Memory, obj: BufferObject) -> Job | None:
        """Start copying an idle object to spill storage, which is reserved for the data
        it holds (measured now: nothing can change an idle object's pages), not its size.
        None if spill storage has no room for it: the object is then left out of the
        spill passes as after a failed spill, and the error names the spill directory."""
        self.measure(obj)
        try:
            extent = self.backing.spill_reserve(obj.resident)
        except OutOfMemory as exc:
            self.failed[obj] = exc
            return None
        backing = obj.backing
        job = Job(JobKind.SPILL, obj, lambda: self.backing.spill_out(backing, extent, obj.size),
                  nbytes=obj.resident, extent=extent)
        self._start(job)
        return job

    def plan_restore(self: _Memory, obj: BufferObject) -> Job:
        """Bring a spilled object back; the caller has made room for its data."""
        backing = self.backing.create(obj.size, obj.creator_uid)
        extent = obj.extent
        job = Job(JobKind.RESTORE, obj, lambda: self.backing.spill_in(extent, backing, obj.size),
                  nbytes=obj.spilled, extent=extent, backing=backing)
        self.reserved += job.nbytes
        self._start(job)
        return job

    def plan_load(self: _Memory, obj: BufferObject, work: Callable[[], int], nbytes: int,
                  then: Callable[[Job], None]) -> Job:
        """Copy a preloaded object's file in, in the background; its `nbytes` of data are
        reserved until the copy lands (`then`, from preload.py, applies the outcome)."""
        job = Job(JobKind.LOAD, obj, work, nbytes=nbytes, then=then)
        self.reserved += nbytes
        self._start(job)
        self.background.append(job)
        return job

    def _start(self: _Memory, job: Job) -> None:
        job.obj.job = job
        self.owner.get(job.obj)  # the object outlives the worker's copy
        self.jobs.append(job)

    def take_background(self: _Memory) -> list[Job]:
        """Jobs nobody waits for (spill-space punches); the transport runs them."""
        jobs = list(self.background)
        self.background.clear()
        return jobs

    def finish(self: _Memory, job: Job) -> None:
        """Apply a job's outcome on the core's thread (exactly once)."""
        if job.kind is JobKind.PUNCH:  # now the range may be handed out again
            job.done = True
            self.backing.spill_release(job.extent)
            return
        if job.kind is JobKind.STREAM:  # (stream.py)
            job.done = True
            assert job.then is not None
            job.then(job)
            return
        if job.kind is JobKind.ZERO:  # a pooled memfd (of a freed object) may be handed out now
            job.done = True
            self.clearing.pop(job.backing, None)
            self.backing.zeroed(job.backing, job.error)
            return
        obj = job.obj
        self.jobs.remove(job)
        obj.job = None
        job.done = True
        if job.kind is JobKind.SPILL:
            self._finish_spill(job)
        elif job.kind is JobKind.LOAD:
            assert job.then is not None
            job.then(job)
        else:
            self._finish_restore(job)
        self.owner.put(obj)

    def _finish_spill(self: _Memory, job: Job) -> None:
        obj = job.obj
        if job.error is not None or obj.placement != Placement.SYSTEM:
            self.backing.spill_release(job.extent)
            if job.error is not None:
                self.failed[obj] = job.error
            return
        if obj.madvise == DONTNEED:  # advised away while it was being copied: drop it instead
            self.backing.spill_release(job.extent)
            self.purge(obj, self.totals)
            return
        self.untrack(obj)
        self.owner.release_backing(obj)
        obj.extent, obj.spilled = job.extent, job.moved
        self.spilled += job.moved
        obj.transition(Event.SPILL)
        self.totals.spilled += 1
        self.totals.bytes_moved += job.moved

    def _finish_restore(self: _Memory, job: Job) -> None:
        obj = job.obj
        self.reserved -= job.nbytes
        if job.error is not None or obj.placement != Placement.SPILLED:
            self.backing.release(job.backing)
            if job.error is not None:
                self.failed[obj] = job.error
            return
        extent = obj.extent  # punched off the request path, then released (finish of PUNCH)
        self.background.append(Job(JobKind.PUNCH, obj, lambda: self.backing.spill_punch(extent), 0,
                                   extent=extent))
        self.spilled -= obj.spilled
        obj.backing, obj.extent, obj.spilled = job.backing, None, 0
        obj.transition(Event.RESTORE)
        self.track(obj)
        self.totals.restored += 1
        self.totals.bytes_moved += job.moved
