"""Manager: an embedded manager in this process (SPEC §1), the daemon's twin.

`Manager(**config)` owns a Core and a MemfdStore; `open()` returns a new, independent
client Device each call; the files of its `object` key (preloaded objects) are read in
before it returns. Requests run as the daemon's do, as a `Call` (core/call.py: the
one run-until-done loop, the same `dispatch()` and request table), stepped under one lock
(the core itself is single-threaded). Memory jobs a request must wait for (spill,
restore) run inline in the caller's thread; device fences are waited for without the
lock; then the call steps again. After each request the background reclaim both modes
share (`after_request`) runs inline too. `close()` releases every client and object; any
later call is EBADF.

A Manager belongs to the process that made it: in a forked child it is dead (EBADF saying
to make a new one), and closing it there does nothing, so a child never frees, spills or
deletes what the parent's manager owns. The child keeps its copy of the core referenced,
so none of the copied fds is left to the garbage collector.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from .backing.memfd import MemfdStore
from .client.device import Device
from .client.embedded import EmbeddedTransport
from .client.fork import track_for_fork
from .config import Config
from .core.call import Call, after_request
from .core.client import Client, Credentials
from .core.core import Core
from .core.jobs import Job, Pending
from .core.requests import BY_OP, dispatch
from .errors import BadFd
from .gpu.sim import SimGpu
from .wire import structs as s
from .wire.frames import Op

__all__ = ["Manager", "embedded"]


class Manager:
    def __init__(self, **config: Any) -> None:
        self.config = Config.from_kwargs(**config)
        self._lock = threading.RLock()
        self._gpu = SimGpu(self.config.vram, self.config.hang_timeout)
        core = Core(self.config, MemfdStore(self.config.spill_dir), self._gpu)
        self._core: Core | None = core
        try:  # preloaded objects: loaded here, before the Manager is returned
            core.preloads.start(self.config.object, os.getpid(), os.getuid())
            self._run(core, after_request(core.memory))
        except BaseException:
            self._core = None
            self._shut(core)
            raise
        self._pid = os.getpid()
        self._forked_core: Core | None = None  # in a forked child: the parent's, never used
        track_for_fork(self)

    @property
    def closed(self) -> bool:
        return self._core is None

    def _live_core(self) -> Core:
        if self._core is None:
            if self._forked_core is not None:
                raise BadFd(f"this Manager was made by process {self._pid} and cannot be used in its forked child "
                            f"(process {os.getpid()}): make a new one in the child")
            raise BadFd("the Manager is closed")
        return self._core

    def _after_fork_in_child(self) -> None:
        self._forked_core, self._core = self._core, None
        self._lock = threading.RLock()  # the parent's may have been held at the fork

    def open(self) -> Device:
        """A new client of this manager (like opening the DRM device again)."""
        with self._lock:
            creds = Credentials(os.getpid(), os.getuid(), os.getgid())
            client = self._live_core().client_open(creds, privileged=True)
        return Device(EmbeddedTransport(self, client))

    def _call(self, client: Client, op: Op, req: s.Struct, **local: Any) -> Any:
        """Run one request until done; `local`: the caller's own memory (`into`, `buffer`).
        A request whose handler takes no Call and that carries no fds nor memory of the
        caller's is dispatched straight, made into a Call only if it must wait (as the
        daemon's `_run_plain`, daemon/connection.py)."""
        desc = BY_OP[op]
        if local or desc.takes_call or req.FDS:
            return self._run_call(Call(client, desc, req, **local))
        with self._lock:
            core = self._core
            if core is None or client.closed:
                core = self._open_core(client)
            try:
                reply = dispatch(core, client, desc, req)
            except Pending as waiting:
                call = Call(client, desc, req)
                call.pending = waiting
                self._run(core, waiting.jobs)  # embedded: do the copies right here
            else:
                self._run(core, after_request(core.memory))
                return reply
        self._wait(call.pending)
        return self._run_call(call)

    def _run_call(self, call: Call) -> Any:
        """Step `call` until it has its reply: jobs it waits for run inline, fences are
        waited for without the lock."""
        while True:
            with self._lock:
                core = self._open_core(call.client)
                reply = call.step(core)
                if reply is not None:
                    self._run(core, after_request(core.memory))
                    return reply
                pending = call.pending
                assert pending is not None
                self._run(core, pending.jobs)  # embedded: do the copies right here
            self._wait(pending)

    def _open_core(self, client: Client) -> Core:
        core = self._live_core()
        if client.closed:
            raise BadFd(f"client {client.id} is closed")
        return core

    def _wait(self, pending: Pending | None) -> None:
        """Wait for the device's fence of `pending`, if any, without holding the lock."""
        if pending is not None and pending.fence:
            deadline = pending.deadline
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            self._gpu.wait(pending.fence, timeout)

    @staticmethod
    def _run(core: Core, jobs: list[Job]) -> None:
        """Run memory jobs inline, in the caller's thread (under the lock)."""
        for job in jobs:
            if not job.done:
                job.run()
                core.memory.finish(job)

    def _release(self, client: Client) -> None:
        with self._lock:
            if self._core is not None:
                self._core.client_release(client)

    def statistics(self) -> dict[str, Any]:
        with self._lock:
            return self._live_core().statistics()

    def close(self) -> None:
        """Release every client and object of this manager."""
        with self._lock:
            core, self._core = self._core, None
            if core is not None:
                self._shut(core)

    def _shut(self, core: Core) -> None:
        for client in list(core.clients.values()):
            core.client_release(client)
        core.preloads.release()
        self._gpu.close()  # queued copies finish first
        core.backing.close()

    def __enter__(self) -> Manager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def embedded(**config: Any) -> Device:
    """A Device on a fresh embedded manager; closing the Device closes the manager."""
    manager = Manager(**config)
    device = manager.open()
    device._owned_manager = manager
    return device
