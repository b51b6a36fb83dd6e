"""Call: one request run until done, the loop both transports use for `Pending`.

A handler that must wait raises `Pending` (jobs.py) and is run again from the start once
the wait is over. Everything about that loop that could differ between the embedded
manager (ugem/manager.py) and the daemon (daemon/connection.py, daemon/server.py) is here,
so the two modes cannot drift:

- `Call` is the loop's context: the client, the request struct and its table row, and the
  state a handler keeps across runs: `started` (the first run's clock: GEM_WAIT and
  WAIT_FENCE time out from it), `bounce` (a copy out of VRAM in flight, for a pread of an
  object pinned there), `done` (the records of a batch request served before it waited),
  and the embedded caller's in-process inputs, which never cross the
  wire: `into` (pread's destination buffer) and `buffer` (userptr's memory). Request
  structs carry only what is on the wire.
- `Call.step(core)` runs the request once: the reply, or None with `pending` set to what
  it waits for. The request's unclaimed fds are closed once it is done (a reply or an
  error), never while it waits.
- `Call.ready(core, now)` says when the wait is over: every job done, the fence
  completed, the device resumed if it asked for that, or its deadline passed (then the
  handler decides, e.g. ETIME).
- `Call.abandon()`: a waiting call that will never be stepped again (its client went
  away, the daemon is shutting down) closes its unclaimed fds and drops its `pending`
  at once: the Pending's traceback holds the frames of the run that raised it (and the
  call itself), a cycle that gc.freeze in the daemon could otherwise keep for good. For
  the same reason nothing on the daemon's loop keeps a Pending in a local variable.
- `after_request(memory)` is the background reclaim both transports start after serving
  requests: if resident went past the budget (evictions copy back without asking) and no
  spill is in flight (one in flight is already bringing it down: shrinking again would
  spill more than needed), shrink to the budget; plus the jobs nobody waits for (spill
  space of restored objects to punch, pooled memfds to clear); and pooled memfds unused
  for a few seconds are closed (the daemon runs it at least once a second, so an idle
  daemon gives that memory back; an embedded manager at its next request).

What stays with each transport is only how: the embedded manager runs jobs inline in the
caller's thread and waits for the device without its lock; the daemon runs jobs on worker
threads, parks the connection (not read meanwhile, other clients served), and steps the
call again when `ready`. Both call `Memory.finish(job)` on the core's thread.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .jobs import Job, Pending
from .requests import RequestDesc, dispatch

if TYPE_CHECKING:
    from ..wire.structs import Struct
    from .client import Client
    from .core import Core
    from .memory import Memory

__all__ = ["Call", "after_request"]


class Call:
    """One request's run-until-done context; only `client`, `desc` and `req` (and the
    embedded caller's `into`/`buffer`) are set at first, the rest keep their class
    defaults until a handler sets them (a call that is done at once costs no more)."""

    into: Any = None  # embedded pread: the caller's buffer, filled in place
    buffer: Any = None  # embedded userptr: the caller's memory
    started: float | None = None  # the first run's clock (timeouts count from it)
    bounce: Any = None  # a copy out of VRAM in flight: (fence, bounce memfd or None, view)
    pending: Pending | None = None  # what the last run waits for
    done = 0  # records of a batch request served (core/shares.py): a run after a wait starts past them

    def __init__(self, client: Client, desc: RequestDesc, req: Struct, into: Any = None, buffer: Any = None) -> None:
        self.client = client
        self.desc = desc
        self.req = req
        if into is not None:
            self.into = into
        if buffer is not None:
            self.buffer = buffer

    def step(self, core: Core) -> Struct | None:
        """Run the request once: its reply, or None (wait for `pending`, then step again)."""
        req = self.req
        try:
            reply = dispatch(core, self.client, self.desc, req, self)
        except Pending as pending:
            self.pending = pending
            return None
        except BaseException:
            self.pending = None
            if req.FDS:
                req.close_unclaimed()
            raise
        if self.pending is not None:
            self.pending = None
        if req.FDS:
            req.close_unclaimed()
        return reply

    def abandon(self) -> None:
        """It will not be stepped again (its client went away, or the daemon is shutting
        down): close the request's unclaimed fds and drop what it waited for, whose
        exception holds the frames of its last run, and their objects, alive."""
        self.pending = None
        self.req.close_unclaimed()

    def ready(self, core: Core, now: float) -> bool:
        """The wait is over (or its deadline passed): step again."""
        pending = self.pending
        if pending is None:
            return True
        if pending.deadline is not None and now >= pending.deadline:
            return True
        return (all(job.done for job in pending.jobs) and pending.fence <= core.gpu.completed()
                and not (pending.resume and core.gpu.suspended))


def after_request(memory: Memory) -> list[Job]:
    """Background jobs to start after requests: back under the budget, spill space punched,
    freed memfds kept for reuse cleared (those kept unused for a while are closed now)."""
    backing = memory.backing
    pooled = backing.pooled_bytes  # (`memory.held` without its call: this runs after every request; a pooled
    # memfd always holds pages, backing/recycle.py, so 0 means nothing is pooled)
    if pooled:
        backing.expire_pooled()
    if memory.resident + pooled > memory.budget and not memory.spilling():
        memory.background += memory.shrink(memory.budget)
    return memory.take_background() if memory.background else []
