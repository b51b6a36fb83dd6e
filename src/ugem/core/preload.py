"""Preloaded, manager-owned objects (SPEC §4 `--object LABEL=PATH`, §2 `lookup`).

Theory of operation
-------------------
At start the manager turns each `(label, path)` of `Config.object` into an object it owns
(the kernel's console framebuffer: made before any client exists):

- it is NORMAL memory, counted in `objects` and `resident_bytes` like any other, sized to
  the file rounded up to a page (bytes past the file's end read as zeros), created by no
  client (`creator` 0) and charged to no quota (client, uid or pin);
- the manager holds one handle of its own on it, counted in `handle_count` and in no
  client's table, so its flink name, given at once (in the order of `Config.object`),
  lives until the manager closes (`release`), whoever else opens and closes it;
- it is read-only for everyone: `readonly` makes every handle opened on it read-only
  (GEM_OPEN, import), so writing fails as through any read-only handle (pwrite EINVAL,
  writable mmap or export EACCES, device writes EACCES); any uid may GEM_OPEN its name;
- `exported` keeps it out of every reclaim pass (never purged, spilled, or dropped as a
  spare copy), and madvise leaves it alone (Memory.madvise): it stays WILLNEED, retained;
- its contents are copied from the file by a LOAD job (jobs.py; `backing.load_file`: the
  file's data segments only, so holes stay holes) that runs off the request path: the
  daemon serves at once, and a request that needs the object before its copy is done
  waits for the job (Pending): `lookup` of its label, or any use through a handle
  (`Memory.ensure_system`). The data bytes of the file are reserved under the budget
  until the copy has landed and been measured;
- a copy that fails (an I/O error, the manager closing first) drops the object; `lookup`
  of its label then fails with EIO naming the error.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from ..constants import page_align
from ..errors import IOFailure, NoSuchObject
from ..wire import structs as s
from ..wire.structs_preload import LookupReq
from .client import Client
from .jobs import Job, Pending
from .object import BufferObject, Kind
from .states import Event

if TYPE_CHECKING:
    from .core import Core

__all__ = ["Preloads", "lookup"]


class Preloads:
    def __init__(self, core: Core) -> None:
        self.core = core
        self.by_label: dict[str, BufferObject] = {}
        self.failed: dict[str, OSError] = {}  # labels whose copy failed, with why
        self.pid = 0  # the manager's process: the owner `ugem ls` shows
        self.cancelled = False  # read by the copies (worker threads): stop, the manager is closing

    def start(self, objects: Iterable[tuple[str, str]], pid: int, uid: int) -> None:
        """Create the objects and plan their copies (`memory.background`: the transport
        runs them). OSError if a file cannot be opened now; those already made stay."""
        self.pid = pid
        for label, path in objects:
            self._start_one(label, path, uid)

    def _start_one(self, label: str, path: str, uid: int) -> None:
        core = self.core
        source, size, data = core.backing.open_source(path)
        try:
            obj = BufferObject(next(core.object_ids), page_align(size), Kind.NORMAL, 0, uid)
            obj.backing = core.backing.create(obj.size)
        except BaseException:
            source.close()
            raise
        try:
            dest = core.backing.open_description(obj.backing, writable=True)  # the copy's own file position
        except BaseException:
            source.close()
            core.release_backing(obj)
            raise
        obj.label, obj.readonly, obj.exported = label, True, True
        core.objects[obj.id] = obj
        obj.transition(Event.POPULATE)
        core.memory.track(obj)
        core.memory.watch(obj)
        core.get(obj)  # the manager's own handle
        obj.handle_count = 1
        core.flink(obj)
        self.by_label[label] = obj
        work = lambda: core.backing.load_file(source, dest, label, size, self._stop)  # noqa: E731
        core.memory.plan_load(obj, work, min(page_align(data), obj.size), self.finish)

    def _stop(self) -> bool:
        return self.cancelled

    def finish(self, job: Job) -> None:
        """A LOAD job is done (core's thread): measure what landed, or drop the object."""
        obj = job.obj
        self.core.memory.reserved -= job.nbytes
        if job.error is None:
            self.core.memory.measure(obj)
            return
        assert obj.label is not None
        self.failed[obj.label] = job.error
        del self.by_label[obj.label]
        self._drop(obj)

    def _drop(self, obj: BufferObject) -> None:
        """Drop the manager's own handle (the object lives on while clients hold it)."""
        obj.handle_count -= 1
        if obj.handle_count == 0:  # all handles share one reference: it goes with the last
            self.core.name_remove(obj)
            self.core.put(obj)

    def cancel(self) -> None:
        """The manager is closing: copies still running stop at their next chunk."""
        self.cancelled = True

    def release(self) -> None:
        """Drop the manager's handles (its close; copies have finished)."""
        for obj in self.by_label.values():
            self._drop(obj)
        self.by_label.clear()


def lookup(core: Core, client: Client, req: LookupReq) -> s.FlinkReply:
    """The flink name of the object preloaded under a label; waits while it is loading."""
    label = bytes(req.label).decode(errors="replace")
    obj = core.preloads.by_label.get(label)
    if obj is None:
        error = core.preloads.failed.get(label)
        if error is not None:
            raise IOFailure(f"the file preloaded under the label {label!r} could not be loaded: {error}")
        raise NoSuchObject(f"no object is preloaded under the label {label!r}")
    if obj.job is not None:
        raise Pending([obj.job])
    return s.FlinkReply(name=obj.name)
