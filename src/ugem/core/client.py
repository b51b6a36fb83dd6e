"""Client: one connection (one open DRM file): its identity, handle table and holdings.

Rules:
- handles are allocated lowest-free from 1 (`IdAllocator`); 0 is never valid;
- `handles` maps handle -> HandleEntry; `by_object` maps object id -> the set of this
  client's handles for it (PRIME import returns the lowest of them);
- mappings and transfers are references the client holds until it reports them done or
  goes away; the core drops them all in `Core.client_release`;
- a Client never frees anything itself: lifetimes are the Core's job.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .ids import IdAllocator
from .object import BufferObject

__all__ = ["Client", "Credentials", "HandleEntry"]


@dataclass(frozen=True, slots=True)
class Credentials:
    pid: int
    uid: int
    gid: int


@dataclass(slots=True)
class HandleEntry:
    obj: BufferObject
    readonly: bool


@dataclass(eq=False)
class Client:
    id: int
    creds: Credentials
    privileged: bool
    handles: dict[int, HandleEntry] = field(default_factory=dict)
    by_object: dict[int, set[int]] = field(default_factory=dict)
    handle_ids: IdAllocator = field(default_factory=IdAllocator)
    mappings: dict[int, BufferObject] = field(default_factory=dict)
    map_ids: IdAllocator = field(default_factory=IdAllocator)
    transfers: dict[int, tuple[BufferObject, int, Any]] = field(default_factory=dict)  # -> (object, reserved, bounce)
    xfer_ids: IdAllocator = field(default_factory=IdAllocator)
    created_bytes: int = 0  # sizes of live objects this client created (quota)
    pinned_bytes: int = 0
    closed: bool = False
