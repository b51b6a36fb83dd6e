"""Core: the manager's state (drm_device): objects, names, clients, and their lifetimes.

This module holds the library functions handlers call (drm_gem_handle_create, drm_gem_handle_delete,
flink/open bookkeeping, reference counting); `object.py` states the lifetime rules they implement. The
core is single-threaded and sans-IO: memory I/O goes through `self.backing` (a BackingStore); no sockets here.

Publication order (drm_gem_handle_create_tail): an object is fully set up before a handle
to it is published; if any step fails, earlier steps are undone in reverse.

Per-uid limits (SPEC §5) are kept in `uids` (uid -> UidUsage): a client counts as a connection from `client_open`
and as a client once admitted (`admit`: embedded clients at once, daemon connections at HELLO, EDQUOT past
`uid_max_clients`); an object's size is charged to its creator's uid until the object dies (so closing the
creating client and keeping the object through another does not uncharge it), a pin to the pinning client's uid
until unpinned. Privileged clients (root, the manager's own uid) are never limited.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import Any

from ..backing.base import BackingStore, Inspection
from ..config import Config
from ..constants import ADVICE_LABELS, CACHING_CACHED, DONTNEED
from ..errors import BadAddress, InvalidArgument, NoSuchObject, QuotaExceeded
from ..fd import OwnedFd
from ..gpu.base import GpuBackend
from ..wire.structs_share import CHOSEN_MAP_IDS
from .client import Client, Credentials, UidUsage
from .gpu import Gpu
from .ids import IdAllocator
from .memory import Memory
from .object import BufferObject, Kind
from .preload import Preloads
from .recycle import escape_held
from .share_table import ShareTable
from .states import Event, Placement

__all__ = ["Core"]


class Core:
    def __init__(self, config: Config, backing: BackingStore, gpu_backend: GpuBackend,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.backing = backing
        self.clock = clock
        self.hold_while_suspended = False  # the daemon holds device work while suspended
        self.shares_may_lag = False  # the daemon: a share may be claimed before its request is read
        self.descriptions_leave = False  # the daemon: descriptions made for clients leave this process (recycle.py)
        self.objects: dict[int, BufferObject] = {}
        self.by_key: dict[tuple[int, int], BufferObject] = {}
        self.names: dict[int, BufferObject] = {}
        self.pinned_bytes = 0  # sizes of objects pinned by anyone, each once
        self.name_ids = IdAllocator()
        self.clients: dict[int, Client] = {}
        self.uids: dict[int, UidUsage] = {}
        self._client_ids, self.object_ids = itertools.count(1), itertools.count(1)  # never reused
        self.memory = Memory(config.system_budget, backing, gpu_backend, self, lambda obj: self.gpu.release(obj))
        self.shares = ShareTable(self.clients, self.get, self.put, self.memory)
        self.gpu = Gpu(gpu_backend, backing, self.memory, owner=self)
        self.preloads = Preloads(self)  # manager-owned objects loaded from files (preload.py)

    # -- clients ---------------------------------------------------------------------

    def client_open(self, creds: Credentials, privileged: bool, admit: bool = True) -> Client:
        """A new client, counted as a connection of its uid; admitted now unless `admit` is
        False (the daemon admits at HELLO)."""
        client = Client(next(self._client_ids), creds, privileged)
        usage = self.uids.get(creds.uid)
        if usage is None:
            usage = self.uids[creds.uid] = UidUsage()
        usage.connections += 1
        self.clients[client.id] = client
        if admit:
            try:
                self.admit(client)
            except BaseException:
                self.client_release(client)
                raise
        return client

    def client_release(self, client: Client) -> None:
        """Release everything a client holds (drm_gem_release); idempotent."""
        if client.closed:
            return
        client.closed = True
        for handle in sorted(client.handles):
            self.handle_delete(client, handle)
        escape_held(client)  # its process may still map them (recycle.py)
        for map_id in list(client.mappings):
            self.map_release(client, map_id)
        self.shares.drop_client(client)  # unclaimed shares pass to its process's other client, or die
        for xfer_id in list(client.transfers):
            self.xfer_done(client, xfer_id)
        del self.clients[client.id]
        if client.suspending is not None and client.suspending[1] == self.gpu.resumes and not any(
                c.suspending is not None and c.suspending[1] == self.gpu.resumes for c in self.clients.values()):
            self.gpu.resume()  # its suspend was abandoned midway, as if it had failed: device running
        usage = self.uids[client.creds.uid]
        usage.connections -= 1
        if client.admitted:
            usage.clients -= 1
        self._forget_idle_uid(client.creds.uid)

    # -- per-uid limits --------------------------------------------------------------

    def uid_max_clients(self, privileged: bool) -> int | None:
        return None if privileged else self.config.uid_max_clients

    def admit(self, client: Client) -> None:
        """Count `client` among its uid's clients: EDQUOT past `uid_max_clients`."""
        uid, limit = client.creds.uid, self.uid_max_clients(client.privileged)
        usage = self.uids[uid]
        if limit is not None and usage.clients >= limit:
            raise QuotaExceeded(f"uid {uid} already has {usage.clients} clients connected; "
                                f"the limit is {limit} (uid_max_clients)")
        usage.clients += 1
        client.admitted = True

    def check_uid_quota(self, client: Client, nbytes: int, what: str) -> None:
        """EDQUOT if `nbytes` more would take the client's uid past `uid_quota`."""
        quota = None if client.privileged else self.config.uid_quota
        if quota is None:
            return
        charged = self.uids[client.creds.uid].bytes
        if charged + nbytes > quota:
            raise QuotaExceeded(f"uid {client.creds.uid}: {what} {nbytes} more bytes would exceed the uid quota "
                                f"of {quota} (its clients have created and pinned {charged})")

    def _uid_charge(self, uid: int, nbytes: int) -> None:
        """Add (or with a negative `nbytes`, give back) bytes charged to `uid`."""
        usage = self.uids[uid]
        usage.bytes += nbytes
        if nbytes < 0:
            self._forget_idle_uid(uid)

    def _forget_idle_uid(self, uid: int) -> None:
        if self.uids[uid].idle:
            del self.uids[uid]

    def lookup(self, client: Client, handle: int) -> BufferObject:
        obj = client.handles.get(handle)
        if obj is None:
            raise NoSuchObject(f"no object with handle {handle} in client {client.id}")
        return obj

    # -- object lifetime -------------------------------------------------------------

    def object_new(self, client: Client, size: int, kind: Kind = Kind.NORMAL) -> BufferObject:
        """A new object charged to `client` (quota checked); it holds no reference yet."""
        quota = self.config.client_quota
        if kind == Kind.NORMAL and quota is not None and client.created_bytes + size > quota:
            raise QuotaExceeded(f"client {client.id}: {size} more bytes would exceed the quota of "
                                f"{quota} (already {client.created_bytes})")
        self.check_object_limit(client)
        if kind == Kind.NORMAL:
            self.check_uid_quota(client, size, "creating")
        obj = BufferObject(next(self.object_ids), size, kind, client.id, client.creds.uid)
        if kind == Kind.NORMAL:
            client.created_bytes += size
            self._uid_charge(client.creds.uid, size)
        self.objects[obj.id] = obj
        return obj

    def get(self, obj: BufferObject) -> None:
        obj.refcount += 1

    def put(self, obj: BufferObject) -> None:
        obj.refcount -= 1
        if obj.refcount == 0:
            self._free(obj)

    def _free(self, obj: BufferObject) -> None:
        assert obj.handle_count == 0 and obj.name == 0 and obj.job is None, obj
        self.memory.release(obj)
        self.gpu.release(obj)
        self.release_backing(obj, freed=True)
        if obj.key is not None:
            self.by_key.pop(obj.key, None)
        obj.transition(Event.FREE)
        if obj.kind == Kind.NORMAL and obj.label is None:  # preloaded objects were charged to nobody
            creator = self.clients.get(obj.creator)
            if creator is not None:
                creator.created_bytes -= obj.size
            self._uid_charge(obj.creator_uid, -obj.size)
        del self.objects[obj.id]

    def charge_resident(self, obj: BufferObject, delta: int) -> None:
        """`obj`'s resident bytes changed by `delta`: its creator's share follows while that client lives."""
        creator = self.clients.get(obj.creator)
        if creator is not None:
            creator.resident_bytes += delta

    def discard_unpublished(self, obj: BufferObject) -> None:
        """Undo `object_new` for an object that never got a handle (error unwinding)."""
        self.get(obj)
        self.put(obj)

    # -- handles ---------------------------------------------------------------------

    def check_object_limit(self, client: Client) -> None:
        limit = self.config.client_max_objects
        if len(client.handles) >= limit:
            raise QuotaExceeded(f"client {client.id} holds {len(client.handles)} handles, the limit is {limit}")

    def handle_create(self, client: Client, obj: BufferObject, readonly: bool = False) -> int:
        """Publish a new handle to `obj` in `client`. Call last: this makes it visible."""
        self.check_object_limit(client)
        handle = client.handle_ids.alloc()
        client.handle_add(handle, obj, readonly)
        if obj.handle_count == 0:
            self.get(obj)  # all handles share one reference
        obj.handle_count += 1
        return handle

    def handle_delete(self, client: Client, handle: int) -> None:
        """GEM_CLOSE: EINVAL for an unknown, zero or already closed handle."""
        removed = client.handle_remove(handle)
        if removed is None:
            raise InvalidArgument(f"handle {handle} is not open in client {client.id}")
        obj, last = removed
        client.handle_ids.free(handle)
        if last:
            self.unpin(client, obj)
        obj.handle_count -= 1
        if obj.handle_count == 0:
            self.name_remove(obj)  # the name holds no reference: it dies with the last handle
            self.put(obj)

    # -- names -----------------------------------------------------------------------

    def flink(self, obj: BufferObject) -> int:
        if obj.handle_count == 0:  # prevent races with a concurrent close (drm_gem_flink_ioctl)
            raise NoSuchObject(f"object {obj.id} is being closed")
        if not obj.name:
            obj.name = self.name_ids.alloc()
            self.names[obj.name] = obj
        return obj.name

    def name_remove(self, obj: BufferObject) -> None:
        if obj.name:
            del self.names[obj.name]
            self.name_ids.free(obj.name)
            obj.name = 0

    # -- mappings and transfers (references held by a client) ------------------------

    def map_add(self, client: Client, obj: BufferObject, chosen: int = 0) -> int:  # chosen: core/shares.py
        self.get(obj)
        obj.maps += 1
        self.memory.watch(obj)
        map_id = chosen or client.map_ids.alloc()
        client.mappings[map_id] = obj
        return map_id

    def map_release(self, client: Client, map_id: int) -> None:
        obj = client.mappings.pop(map_id, None)
        if obj is None:
            raise InvalidArgument(f"mapping {map_id} is not tracked for client {client.id}")
        if map_id < CHOSEN_MAP_IDS:
            client.map_ids.free(map_id)
        client.readonly_maps.discard(map_id)
        obj.maps -= 1
        self.memory.measure(obj)  # pages written through the mapping are counted now
        self.put(obj)

    def xfer_add(self, client: Client, obj: BufferObject, reserve: int = 0, ending: Any = None,
                 watch: bool = True) -> int:
        """A bulk transfer holds a reference and `reserve` bytes of budget until it is done, then runs
        `ending` (a callable); `watch`: its pages may grow meanwhile (not a read of spill storage)."""
        self.get(obj)
        obj.xfers += 1
        if watch:
            self.memory.watch(obj)
        xfer_id = client.xfer_ids.alloc()
        client.transfers[xfer_id] = (obj, reserve, ending)
        self.memory.reserved += reserve
        return xfer_id

    def xfer_done(self, client: Client, xfer_id: int) -> bool:
        """End a bulk transfer; True if the object was purged while it was open (purged
        is final, and an object already purged when the transfer would have opened got
        EFAULT instead: so the bytes the client moved may not be its contents)."""
        entry = client.transfers.pop(xfer_id, None)
        if entry is None:
            raise InvalidArgument(f"transfer {xfer_id} is not open in client {client.id}")
        obj, reserve, ending = entry
        client.xfer_ids.free(xfer_id)
        obj.xfers -= 1
        if ending is not None:
            ending()
        self.memory.reserved -= reserve
        self.memory.measure(obj)
        purged = obj.placement == Placement.PURGED
        self.put(obj)
        return purged

    # -- pages -----------------------------------------------------------------------

    def check_pages(self, obj: BufferObject) -> None:
        """EFAULT for an object whose pages are gone (purged: final)."""
        if obj.placement == Placement.PURGED:
            raise BadAddress(f"object {obj.id} was purged")

    def populate(self, obj: BufferObject, wait: bool = True) -> Any:
        """Make sure the object has system backing; returns it. Needing an fd for it may
        spill others first (Pending, unless `wait` is False) or fail with ENOMEM."""
        self.check_pages(obj)
        if obj.placement == Placement.NONE:
            if obj.madvise == DONTNEED:
                raise BadAddress(f"object {obj.id} is DONTNEED and has no pages")
            self.memory.make_fd_room(keep=(obj,), wait=wait)
            obj.backing = self.memory.new_backing(obj, wait)
            obj.transition(Event.POPULATE)
            self.memory.track(obj)
        return obj.backing

    def populate_system(self, obj: BufferObject) -> Any:
        """System backing for an object leaving VRAM: never fails for the budget (the
        shrinker makes room afterwards), whatever the placement says now."""
        if obj.backing is None:
            self.memory.make_fd_room(keep=(obj,), wait=False)
            obj.backing = self.backing.create(obj.size, obj.creator_uid)
            self.memory.track(obj)
        return obj.backing

    def release_backing(self, obj: BufferObject, freed: bool = False) -> None:
        """Close the manager's hold on the object's system pages (and its device view); a
        `freed` object's may be kept to back a new object instead (Memory.close_backing)."""
        if obj.backing is not None:
            obj.host_view = None  # the mapping goes once queued device work drops it too
            self.memory.close_backing(obj, freed)
            obj.backing = None
            if obj.key is not None:  # new pages come with a new identity (index_key again)
                self.by_key.pop(obj.key, None)
                obj.key = None

    def index_key(self, obj: BufferObject) -> None:
        """Remember the memory's identity once a description of it leaves the manager."""
        if obj.key is None:
            obj.key = self.backing.key(obj.backing)
            self.by_key[obj.key] = obj

    def adopt(self, client: Client, backing: Any, key: tuple[int, int], size: int, kind: Kind,
              readonly: bool) -> BufferObject:
        """A new object around memory that came in through import_fd (not yet published)."""
        obj = self.object_new(client, size, kind)
        obj.readonly = readonly
        if kind == Kind.FOREIGN:
            obj.caching = CACHING_CACHED  # foreign memory is used in place, coherently
        obj.backing = backing
        obj.key = key
        obj.exported = True  # the fd it came through shares its pages, as after an export: never spilled or purged
        self.memory.watch(obj)
        self.by_key[key] = obj
        obj.transition(Event.POPULATE)
        self.memory.track(obj)
        return obj

    def make_writable(self, obj: BufferObject, fd: OwnedFd, info: Inspection) -> None:
        """A writable fd arrived for memory the manager holds only read-only (a read-only
        import adopted it): take our own writable description from it (consumes `fd`), so
        handles imported through writable fds can write. Handles that exist keep their mode."""
        backing = self.backing.adopt(fd, info)
        self.backing.release(obj.backing)
        obj.backing = backing
        obj.host_view = None  # the device maps the new, writable description
        obj.readonly = False

    def unpin(self, client: Client, obj: BufferObject) -> None:
        if client.id in obj.pinned_by:
            obj.pinned_by = tuple(c for c in obj.pinned_by if c != client.id)
            client.pinned_bytes -= obj.size
            self._uid_charge(client.creds.uid, -obj.size)
            if not obj.pinned_by:
                self.pinned_bytes -= obj.size
                if obj.placement == Placement.VRAM:
                    self.gpu.lru.move_tail(obj)  # evictable again

    def pin(self, client: Client, obj: BufferObject) -> None:
        """Record `client`'s pin (the caller has checked the limits and placed the object)."""
        if not obj.pinned_by:
            self.pinned_bytes += obj.size
        obj.pinned_by += (client.id,)
        client.pinned_bytes += obj.size
        self._uid_charge(client.creds.uid, obj.size)

    # -- statistics ------------------------------------------------------------------

    def statistics(self) -> dict[str, Any]:
        return {
            "objects": len(self.objects), "clients": len(self.clients),
            "handles": sum(len(c.handles) for c in self.clients.values()), "names": len(self.names),
            "vram_bytes": self.gpu.vram_bytes, "suspended": self.gpu.suspended,
            "system_budget": self.config.system_budget, "vram_size": self.gpu.backend.vram_size,
            "pinned_bytes": self.pinned_bytes,
            "memfds": self.backing.open_count, "memfd_limit": self.backing.max_open,  # object pages held open
            **self.memory.statistics(),
            **self.memory.totals.stats(),
            "per_client": [
                {"id": c.id, "pid": c.creds.pid, "uid": c.creds.uid, "objects": len(c.handles),
                 "bytes": c.created_bytes, "resident_bytes": c.resident_bytes, "pinned_bytes": c.pinned_bytes}
                for c in self.clients.values()
            ],
        }

    def list_objects(self) -> list[dict[str, Any]]:
        """One row per object (`ugem ls --json`): `name` 0 when it has none, `owner_pid` 0 once its creator
        is gone, `pinned` by any client, `mapped` the live mappings counted by the manager, `label` its
        preload label (None unless preloaded, and then the owner is the manager's own process)."""
        owners = {0: self.preloads.pid, **{c.id: c.creds.pid for c in self.clients.values()}}
        return [
            {"id": o.id, "size": o.size, "placement": o.placement.label, "madvise": ADVICE_LABELS[o.reported_advice],
             "name": o.name, "handles": o.handle_count, "owner_pid": owners.get(o.creator, 0),
             "pinned": bool(o.pinned_by), "mapped": o.maps, "label": o.label}
            for o in self.objects.values()
        ]
