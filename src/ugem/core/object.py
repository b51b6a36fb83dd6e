"""BufferObject, and the theory of operation of object lifetimes (drm_gem.c).

Theory of operation
-------------------
An object is kept alive by its **references**; `refcount` counts them:

- all handles of the object, in every client, together hold ONE reference
  (taken when `handle_count` goes 0 -> 1, dropped when it goes 1 -> 0);
- each tracked mapping (a `mmap` the client library has not yet reported released);
- each in-flight bulk transfer (a pread/pwrite file description handed to a client until
  its XFER_DONE).

`handle_count` counts handles across all clients. A **name** (flink) holds no reference:
it is removed when `handle_count` reaches 0, even if a mapping still keeps the object
alive (so GEM_OPEN of that name is then ENOENT). When `refcount` reaches 0 the object is
freed: its memfd (the manager's own description) is closed and it leaves every table.

Exported fds and mappings made by other processes keep the *memory* alive through the
kernel's refcount on the memfd, which the manager cannot see (SPEC §8): such memory leaves
the manager's accounting when the object is freed, and `import_fd` adopts it again.

Closing a client releases all its handles, mappings and transfers in one sweep, exactly as
closing a DRM fd does (drm_gem_release).

A freed object's memfd may back a later object of its creator's uid (backing/recycle.py):
only if no process but the manager can still see its pages. `escaped` records that one
might (a description of it left the manager, a share of it died unclaimed, a client that
maps it forked); core/recycle.py has the rules.
"""

from __future__ import annotations

import enum
from typing import Any

from ..constants import ADVICE_PURGED, CACHING_NONE, TILING_NONE, WILLNEED
from .states import Event, Placement, apply

__all__ = ["BufferObject", "Kind"]


class Kind(enum.IntEnum):
    NORMAL = 0  # created by GEM_CREATE (or adopted back from one of our exported memfds)
    FOREIGN = 1  # a client's sealed memfd imported with import_fd
    USERPTR = 2  # wraps existing user memory


# members looked up once, for the per-request paths (each `Placement.X` costs 0.1 us on Python 3.11)
_NONE, _PURGED = Placement.NONE, Placement.PURGED


class BufferObject:
    __slots__ = (
        "id", "size", "kind", "backing", "key", "placement", "madvise", "refcount",
        "handle_count", "name", "creator", "creator_uid", "tiling", "stride", "caching",
        "pinned_by", "readonly", "label", "resident", "maps", "xfers", "exported", "escaped", "job", "extent",
        "spilled", "vram", "last_fence", "write_fence", "host_fence", "last_exec", "sem_fence", "vram_dirty",
        "host_view", "__weakref__",
    )

    def __init__(self, ident: int, size: int, kind: Kind, creator: int, creator_uid: int) -> None:
        self.id = ident
        self.size = size
        self.kind = kind
        self.backing: Any = None  # opaque to the core: the BackingStore's handle (an OwnedFd)
        self.key: tuple[int, int] | None = None  # identity of the backing memory (dev, inode)
        self.placement = _NONE
        self.madvise = WILLNEED
        self.refcount = 0
        self.handle_count = 0
        self.name = 0
        self.creator = creator
        self.creator_uid = creator_uid
        self.tiling = TILING_NONE
        self.stride = 0
        self.caching = CACHING_NONE
        self.pinned_by: tuple[int, ...] = ()  # ids of the clients pinning it (rarely more than one)
        self.readonly = False  # read-only for every handle: a read-only import, a preloaded object
        self.label: str | None = None  # the label of a preloaded, manager-owned object (preload.py)
        self.resident = 0  # bytes of system pages at the last measurement (core/memory.py)
        self.maps = 0  # tracked mappings
        self.xfers = 0  # open bulk transfers
        self.exported = False  # an fd to its memory was exported: never spilled or purged
        self.escaped = False  # a process the manager does not track may see its pages: never recycled
        self.job: Any = None  # spill/restore job in flight (core/jobs.py)
        self.extent: Any = None  # where its data lives in spill storage
        self.spilled = 0  # data bytes in spill storage
        self.vram: Any = None  # its node in device memory while placement is VRAM (core/gpu.py)
        self.last_fence = 0  # last device op touching it (busy, wait)
        self.write_fence = 0  # last device op changing its bytes (CPU reads wait for it)
        self.host_fence = 0  # last device op writing its system pages (a copy out, work in place)
        self.last_exec = 0  # last execbuffer using it (EIO if that was cancelled as hung)
        self.sem_fence = 0  # last execbuffer with a SemaphoreWait polling it
        self.vram_dirty = False  # the VRAM copy is newer than the system pages
        self.host_view: Any = None  # the manager's mapping of its pages, for the device

    def transition(self, event: Event) -> None:
        self.placement = apply(self.placement, event)

    @property
    def proxy(self) -> bool:
        """userptr or foreign memory: not ours to export, purge or spill."""
        return self.kind != Kind.NORMAL

    @property
    def reported_advice(self) -> int:
        """The advice info() and `ugem ls` report: ADVICE_PURGED once the contents are gone."""
        return ADVICE_PURGED if self.placement == _PURGED else self.madvise

    def __repr__(self) -> str:
        return (f"<BufferObject {self.id} size={self.size} {self.placement.label} "
                f"refs={self.refcount} handles={self.handle_count} name={self.name}>")
