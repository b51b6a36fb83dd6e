"""Client: one connection (one open DRM file): its identity, handle table and holdings.

Rules:
- handles are allocated lowest-free from 1 (`IdAllocator`); 0 is never valid;
- `handles` maps handle -> object; `readonly` holds the handles that only allow reads;
  `by_object` maps object id -> this client's handle for it, or the set of them when it
  holds several (PRIME import returns the lowest). A million handles must stay small
  (SPEC §7: <= 1 KiB per object in all), so the common case costs no entry object and no
  set: these three tables change only through `handle_add`/`handle_remove`;
- mappings, transfers and unclaimed shares (core/shares.py) are references the client
  holds until it reports them done or goes away; the core drops them all in
  `Core.client_release`;
- a Client never frees anything itself: lifetimes are the Core's job;
- `UidUsage` is what all clients of one uid hold together (per-uid limits, SPEC §5):
  connections open (greeted or not), clients admitted (past HELLO), and bytes charged
  (sizes of live objects its clients created, plus the bytes each of its clients pins).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .ids import IdAllocator
from .object import BufferObject

if TYPE_CHECKING:
    from .share_table import Share

__all__ = ["Client", "Credentials", "UidUsage"]


@dataclass(frozen=True, slots=True)
class Credentials:
    pid: int
    uid: int
    gid: int


@dataclass(slots=True)
class UidUsage:
    connections: int = 0
    clients: int = 0
    bytes: int = 0

    @property
    def idle(self) -> bool:
        return not (self.connections or self.bytes)


@dataclass(eq=False)
class Client:
    id: int
    creds: Credentials
    privileged: bool
    handles: dict[int, BufferObject] = field(default_factory=dict)
    readonly: set[int] = field(default_factory=set)
    by_object: dict[int, int | set[int]] = field(default_factory=dict)
    handle_ids: IdAllocator = field(default_factory=IdAllocator)
    mappings: dict[int, BufferObject] = field(default_factory=dict)
    readonly_maps: set[int] = field(default_factory=set)  # map ids of read-only mappings
    map_ids: IdAllocator = field(default_factory=IdAllocator)
    transfers: dict[int, tuple[BufferObject, int, Any]] = field(default_factory=dict)  # -> (object, reserved, ending)
    xfer_ids: IdAllocator = field(default_factory=IdAllocator)
    shares: dict[int, Share] = field(default_factory=dict)  # token -> not yet claimed (core/share_table.py)
    last_share: int = 0  # the last token it sent
    failed_shares: dict[int, Any] = field(default_factory=dict)  # token -> why (UgemError): the latest few
    claimed_early: set[int] = field(default_factory=set)  # tokens claimed before they were read (shares.py)
    created_bytes: int = 0  # sizes of live objects this client created (quota)
    resident_bytes: int = 0  # resident system memory of those objects (kept by Memory)
    pinned_bytes: int = 0
    admitted: bool = False  # counted in its uid's clients (past HELLO)
    suspending: tuple[Any, int] | None = None  # a suspend in progress: (its request, resumes when it began)
    closed: bool = False

    def handle_add(self, handle: int, obj: BufferObject, readonly: bool) -> None:
        self.handles[handle] = obj
        if readonly:
            self.readonly.add(handle)
        held = self.by_object.get(obj.id)
        if held is None:
            self.by_object[obj.id] = handle
        elif isinstance(held, int):
            self.by_object[obj.id] = {held, handle}
        else:
            held.add(handle)

    def handle_remove(self, handle: int) -> tuple[BufferObject, bool] | None:
        """Drop `handle`; (its object, whether that was this client's last handle for it),
        or None if it is not open."""
        obj = self.handles.pop(handle, None)
        if obj is None:
            return None
        self.readonly.discard(handle)
        held = self.by_object[obj.id]
        if isinstance(held, set):
            held.discard(handle)
            if len(held) == 1:
                self.by_object[obj.id] = held.pop()
            return obj, False
        del self.by_object[obj.id]
        return obj, True

    def lowest_handle(self, obj: BufferObject) -> int | None:
        held = self.by_object.get(obj.id)
        if held is None or isinstance(held, int):
            return held
        return min(held)
