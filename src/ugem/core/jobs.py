"""Jobs: long copies (spill, restore, preload, zeroing) that run off the request path, and `Pending`.

A handler that needs a long copy before it can finish (room under the budget, a spilled
object brought back) does not copy: it raises `Pending(jobs)`. The transport then runs
each job's `work` (embedded: right here; daemon: on a worker thread, so other clients
keep being served), calls `core.memory.finish(job)` on the core's thread when it is done, and
re-runs the request from the start. Re-running is safe because a handler changes nothing
before it raises Pending (except purges, which are final anyway).

Rules:
- `work` touches only the fds and extents captured when the job was planned, never core
  state; everything else happens in `Memory.finish` (spill_jobs.py), on the core's thread;
- an object with a job in flight (`obj.job`) holds an extra reference, so it cannot be
  freed under the worker; requests touching it wait for that job (Pending([obj.job]));
- a job failing (disk full, I/O error) leaves the object where it was.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .object import BufferObject

__all__ = ["Job", "JobKind", "Pending"]


class JobKind(enum.Enum):
    SPILL = "spill"
    RESTORE = "restore"
    PUNCH = "punch"  # background: give a restored object's spill space back, after the reply
    LOAD = "load"  # background: copy a preloaded object's file in (preload.py)
    ZERO = "zero"  # background: clear a freed object's memfd kept for reuse (`backing` the pool entry, memory.py)
    STREAM = "stream"  # background: pump a spilled object's bytes into a client's pipe (stream.py)


@dataclass(eq=False)
class Job:
    kind: JobKind
    obj: BufferObject
    work: Callable[[], int]  # the copy; returns bytes moved
    nbytes: int  # resident bytes this job frees (spill) or adds (restore)
    extent: Any = None
    backing: Any = None  # restore: the new memfd being filled
    started: bool = False
    done: bool = False
    moved: int = 0
    error: OSError | None = None
    then: Callable[[Job], None] | None = None  # LOAD: who applies the outcome (core/preload.py)

    def run(self) -> None:
        """Do the copy; records the outcome instead of raising (any thread)."""
        try:
            self.moved = self.work()
        except OSError as exc:
            self.error = exc


class Pending(Exception):
    """The request must wait, then be run again from the start. It waits for all of:

    - `jobs`: memory jobs (spill, restore) to finish;
    - `fence`: the device timeline to complete this seqno (0: none);
    - `resume`: the device to be resumed (a suspended daemon holds device work);
    but no longer than `deadline` (monotonic seconds; None: no limit), after which the
    request is re-run anyway and decides itself (e.g. ETIME).
    """

    def __init__(self, jobs: list[Job] | None = None, *, fence: int = 0, deadline: float | None = None,
                 resume: bool = False) -> None:
        self.jobs = list(jobs or [])
        self.fence = fence
        self.deadline = deadline
        self.resume = resume
        super().__init__(f"waiting for {len(self.jobs)} job(s), fence {fence}, resume={resume}")
