"""Request handlers: one per op, all with the signature ``handler(core, client, req) -> reply``.

Handlers stay thin (drm_gem_*_ioctl): validate in the kernel's order, look up, call the
Core's library functions, build the reply. They never see sockets; fds appear only as
OwnedFd values in request/reply structs, handed straight to or from the BackingStore.

Order of checks follows SPEC §2 (and the kernel where SPEC defers to it); each check is
written where it fires so the order can be read top to bottom.
"""

from __future__ import annotations

import json
import struct
from typing import TYPE_CHECKING, Any

from ..backing.base import FdKind
from ..constants import DONTNEED, MAX_OBJECT_SIZE, PAGE_SIZE, WILLNEED, page_align
from ..errors import (
    BadAddress,
    Busy,
    InvalidArgument,
    NoDevice,
    NoSuchObject,
    PermissionDenied,
    QuotaExceeded,
    TooBig,
)
from ..wire import structs as s
from ..wire.frames import MAX_INLINE
from .client import Client
from .core import Core
from .cpu_access import pinned_in_vram, pread_vram, prepare_cpu, pwrite_vram
from .object import BufferObject, Kind
from .recycle import describe, handed_over, transfer_fd
from .states import Placement
from .stream import stream_spilled

if TYPE_CHECKING:
    from .call import Call

__all__ = [
    "debug_open", "gem_close", "gem_create", "gem_flink", "gem_info", "gem_madvise", "gem_mmap", "gem_munmap",
    "gem_open", "gem_pin", "gem_pread", "gem_pwrite", "gem_unpin", "list_clients", "list_objects",
    "prime_fd_to_handle", "prime_handle_to_fd", "stats", "xfer_done",
]

def gem_create(core: Core, client: Client, req: s.CreateReq) -> s.CreateReply:
    if req.flags:
        raise InvalidArgument(f"GEM_CREATE takes no flags, got {req.flags:#x}")
    if req.size <= 0:
        raise InvalidArgument(f"object size must be positive, got {req.size}")
    if req.size > MAX_OBJECT_SIZE:
        raise TooBig(f"object size {req.size} exceeds the maximum of 2**46 bytes")
    size = page_align(req.size)
    obj = core.object_new(client, size)
    try:
        handle = core.handle_create(client, obj)
    except BaseException:
        core.discard_unpublished(obj)
        raise
    return s.CreateReply(handle, 0, size)  # positionally (LAYOUT: handle, pad, size): keywords cost 0.2 us


def gem_create_mapped(core: Core, client: Client, req: s.CreateReq) -> s.MmapReply:
    """A new object and a writable mapping of all of it, in one request, and no handle: the
    mapping is its only reference (what `ugem.empty` makes). Limits as GEM_CREATE's and
    GEM_MMAP's; nothing is left when it fails."""
    if req.size <= 0:
        raise InvalidArgument(f"object size must be positive, got {req.size}")
    if req.size > MAX_OBJECT_SIZE:
        raise TooBig(f"object size {req.size} exceeds the maximum of 2**46 bytes")
    core.check_object_limit(client)  # refused at the handle limit, as GEM_CREATE is
    size = page_align(req.size)
    obj = core.object_new(client, size)
    try:
        return map_object(core, client, obj, 0, size, True, "the new object", bool(req.flags & s.TAKES_FD))
    except BaseException:  # Pending included: the request runs again from the start
        core.discard_unpublished(obj)
        raise


def gem_close(core: Core, client: Client, req: s.CloseReq) -> s.Empty:
    core.handle_delete(client, req.handle)
    return s.Empty()


def gem_close_batch(core: Core, client: Client, req: s.CloseBatchReq) -> s.Empty:
    """GEM_CLOSE of each listed handle this client holds; the others are skipped, not an
    error: the batch is how a client closes the handles of Buffers it dropped, and one
    Buffer made over a bogus handle must not keep the others open (or fail an unrelated
    request the batch goes out with)."""
    if len(req.handles) % 4:
        raise InvalidArgument(f"handle list of {len(req.handles)} bytes is not a list of u32")
    for (handle,) in struct.iter_unpack("<I", req.handles):
        if handle in client.handles:
            core.handle_delete(client, handle)
    return s.Empty()


# InfoReply.flags of an object's kind (an enum member lookup costs 0.1 us on Python 3.11)
_KIND_INFO = {Kind.NORMAL: 0, Kind.USERPTR: s.INFO_USERPTR, Kind.FOREIGN: s.INFO_FOREIGN}


def gem_info(core: Core, client: Client, req: s.InfoReq) -> s.InfoReply:
    obj = core.lookup(client, req.handle)
    flags = _KIND_INFO[obj.kind]
    if obj.pinned_by:
        flags |= s.INFO_PINNED
    if obj.last_fence and core.gpu.busy(obj):  # (never used by the device: not busy, without the calls)
        flags |= s.INFO_BUSY
    if req.handle in client.readonly:
        flags |= s.INFO_READONLY
    if req.flags and req.flags & s.INFO_ASK_SOLE and _sole(obj):
        flags |= s.INFO_SOLE
    # positionally, in InfoReply's LAYOUT order (keywords cost 0.3 us): size, placement, madvise, flags,
    # name, tiling, stride, caching
    return s.InfoReply(obj.size, obj.placement, obj.reported_advice, flags, obj.name, obj.tiling, obj.stride,
                       obj.caching)


def _sole(obj: BufferObject) -> bool:
    """The caller's handle is all that refers to `obj`: no other handle (in any client, the
    caller's included), no mapping (the caller's included), no transfer, share or job in
    flight, never exported; so nobody sees its bytes (a client reusing an object for new
    contents asks this first: INFO_ASK_SOLE)."""
    if obj.kind != Kind.NORMAL or obj.exported or obj.handle_count != 1 or obj.pinned_by:
        return False
    return obj.refcount == 1  # the handles' one reference


def _rw_lookup(core: Core, client: Client, handle: int, offset: int, length: int, write: bool) -> BufferObject:
    """pread/pwrite checks after the length-0 shortcut: EINVAL, ENOENT, range, RO, userptr, EFAULT."""
    if offset < 0 or length < 0:
        raise InvalidArgument(f"offset {offset} and length {length} must not be negative")
    obj = core.lookup(client, handle)
    if offset + length > obj.size:
        raise InvalidArgument(f"range [{offset}, {offset + length}) is outside object {handle} of size {obj.size}")
    if write and handle in client.readonly:
        raise InvalidArgument(f"handle {handle} is read-only")
    if obj.kind == Kind.USERPTR:
        raise InvalidArgument(f"pread/pwrite of userptr handle {handle} is not allowed")
    core.check_pages(obj)
    return obj


def gem_pread(core: Core, call: Call, req: s.PreadReq) -> s.PreadReply:
    client = call.client
    if req.length == 0:
        return s.PreadReply()
    obj = _rw_lookup(core, client, req.handle, req.offset, req.length, write=False)
    streams = req.flags & (s.XFER | s.STREAM) == s.XFER | s.STREAM  # (with TAKES_FD or not)
    if streams and (streamed := stream_spilled(core, client, obj, req)) is not None:
        return streamed  # (a spilled object's bytes straight from spill storage)
    core.memory.ensure_system(obj)
    if pinned_in_vram(obj):
        return pread_vram(core, call, obj, req)
    core.gpu.to_cpu(obj, write=False)
    if req.flags & s.XFER:
        if obj.backing is None:
            return s.PreadReply()  # no pages: the client reads zeros without populating
        fd, flags, data = transfer_fd(core, obj, obj.backing, False, bool(req.flags & s.TAKES_FD))
        return s.PreadReply(xfer_id=core.xfer_add(client, obj), flags=flags, data=data, fd=fd)
    if call.into is None and req.length > MAX_INLINE:  # the frame limit binds only replies sent inline
        raise InvalidArgument(f"inline pread of {req.length} bytes exceeds {MAX_INLINE}; use XFER")
    into = call.into if call.into is not None else bytearray(req.length)
    if obj.backing is None:
        core.backing.zero(into)
    else:
        core.backing.read(obj.backing, req.offset, into)
    return s.PreadReply(data=into)


def _pages_added(core: Core, obj: BufferObject, offset: int, length: int) -> int:
    """Bytes of system pages writing [offset, offset+length) adds: room is made for those
    only (SPEC §3), so overwriting resident pages never waits or fails for the budget, and
    foreign memory, which the budget does not count, needs none."""
    if obj.kind != Kind.NORMAL:
        return 0
    if obj.backing is None:
        return page_align(offset + length) - (offset - offset % PAGE_SIZE)
    return int(core.backing.missing_bytes(obj.backing, offset, length))


def gem_pwrite(core: Core, client: Client, req: s.PwriteReq) -> s.PwriteReply:
    if req.length == 0:
        return s.PwriteReply()
    obj = _rw_lookup(core, client, req.handle, req.offset, req.length, write=True)
    if not req.flags & s.XFER and len(req.data) != req.length:  # before anything changes
        raise InvalidArgument(f"pwrite length {req.length} but {len(req.data)} data bytes")
    core.memory.ensure_system(obj)
    if pinned_in_vram(obj):
        return pwrite_vram(core, client, obj, req)
    core.gpu.to_cpu(obj, write=True)
    need = _pages_added(core, obj, req.offset, req.length)
    core.memory.make_room(need, keep=(obj,))  # throttles this caller (Pending) or ENOMEM
    backing = core.populate(obj)
    if req.flags & s.XFER:
        fd, flags, data = transfer_fd(core, obj, backing, True, bool(req.flags & s.TAKES_FD))
        return s.PwriteReply(xfer_id=core.xfer_add(client, obj, reserve=need), flags=flags, data=data, fd=fd)
    core.backing.write(backing, req.offset, req.data)
    core.memory.measure(obj)
    return s.PwriteReply()


def xfer_done(core: Core, client: Client, req: s.XferDoneReq) -> s.Empty:
    """End a bulk transfer. A DONTNEED object may be purged while its transfer is open
    (its pages then read as zeros through the client's description): XFER_DONE then fails
    with EFAULT, so the client never takes those zeros for data (a pread raises instead of
    returning them; a pwrite's bytes were discarded with the rest). Purging is not put
    off for an open transfer: a client that never reported XFER_DONE could otherwise keep
    purgeable memory from the shrinker for ever. Purged is final, so the check is exact."""
    if core.xfer_done(client, req.xfer_id):
        raise BadAddress(f"object was purged during transfer {req.xfer_id}: the bytes moved are not its contents")
    return s.Empty()


def gem_mmap(core: Core, client: Client, req: s.MmapReq) -> s.MmapReply:
    obj = core.lookup(client, req.handle)
    length = obj.size - req.offset if req.flags & s.TO_END else req.length
    if req.offset < 0 or req.offset % PAGE_SIZE or length <= 0 or req.offset + length > obj.size:
        raise InvalidArgument(f"cannot map offset {req.offset} length {length} of object {req.handle} "
                              f"(size {obj.size}, offsets page-aligned)")
    if obj.kind == Kind.USERPTR:
        raise NoDevice(f"userptr handle {req.handle} cannot be mapped")
    core.check_pages(obj)
    writable = bool(req.flags & s.WRITABLE)
    if writable and req.handle in client.readonly:
        raise PermissionDenied(f"handle {req.handle} is read-only; map it with writable=False")
    return map_object(core, client, obj, req.offset, length, writable, f"object {req.handle}",
                      bool(req.flags & s.TAKES_FD))


def map_object(core: Core, client: Client, obj: BufferObject, offset: int, length: int, writable: bool,
               what: str, takes_fd: bool = False) -> s.MmapReply:
    """A tracked mapping of `obj` for `client` (its checks done): GEM_MMAP, GEM_CREATE_MAPPED
    and GEM_CLAIM. With `takes_fd` (TAKES_FD) a mapping of memory we hold as an fd comes with
    no fd: the client copies ours (`server_fd`) and maps it (read-only if asked so), checking
    it is the memory the reply names (a purge may close it meanwhile). A process allowed to
    copy our fds could take that one any time, so this gives it nothing new."""
    backing = cpu_mapping(core, obj, writable, what)
    fd, server_fd = handed_over(core, obj, backing, writable, takes_fd)
    map_id = track_mapping(core, client, obj, writable)
    dev, ino = obj.key or (0, 0)
    return s.MmapReply(map_id=map_id, offset=offset, length=length, server_fd=server_fd, dev=dev, ino=ino, fd=fd)


def cpu_mapping(core: Core, obj: BufferObject, writable: bool, what: str) -> Any:
    """Make `obj` ready to be mapped by the CPU; returns its backing."""
    if pinned_in_vram(obj):
        raise Busy(f"{what} is pinned in device memory")
    prepare_cpu(core, obj, write=writable)
    core.memory.settle(exclude=obj)  # reclaim what earlier writes through mappings added
    backing = core.populate(obj)
    core.index_key(obj)
    return backing


def track_mapping(core: Core, client: Client, obj: BufferObject, writable: bool, chosen: int = 0) -> int:
    """Track `client`'s mapping of `obj` (under the id it `chosen`, if any); returns its id."""
    map_id = core.map_add(client, obj, chosen)
    if not writable:
        client.readonly_maps.add(map_id)  # PRIME_MAP_TO_FD exports it read-only only
    return map_id


def gem_munmap(core: Core, client: Client, req: s.MunmapReq) -> s.Empty:
    if len(req.ids) % 4:
        raise InvalidArgument(f"mapping id list of {len(req.ids)} bytes is not a list of u32")
    unknown = []
    for (map_id,) in struct.iter_unpack("<I", req.ids):
        if map_id in client.mappings:
            core.map_release(client, map_id)
        else:
            unknown.append(map_id)
    if unknown:
        raise InvalidArgument(f"mappings {unknown} are not tracked for this client")
    return s.Empty()


def gem_flink(core: Core, client: Client, req: s.FlinkReq) -> s.FlinkReply:
    return s.FlinkReply(name=core.flink(core.lookup(client, req.handle)))


def gem_open(core: Core, client: Client, req: s.OpenReq) -> s.OpenReply:
    obj = core.names.get(req.name) if req.name else None
    if obj is None:
        raise NoSuchObject(f"no object has the name {req.name}")
    uid = client.creds.uid
    if uid != 0 and uid != obj.creator_uid and obj.label is None:  # preloaded: anyone, read-only
        raise PermissionDenied(f"name {req.name} belongs to uid {obj.creator_uid}, caller is uid {uid}")
    handle = core.handle_create(client, obj, readonly=obj.readonly)
    return s.OpenReply(handle=handle, size=obj.size)


def prime_handle_to_fd(core: Core, client: Client, req: s.ExportReq) -> s.ExportReply:
    obj = core.lookup(client, req.handle)
    return _export(core, obj, f"handle {req.handle}", bool(req.flags & s.WRITABLE), req.handle in client.readonly)


def prime_map_to_fd(core: Core, client: Client, req: s.MapExportReq) -> s.ExportReply:
    """Export the object behind one of this client's tracked mappings (no handle needed):
    the same checks as PRIME_HANDLE_TO_FD, a read-only mapping standing for a read-only handle."""
    obj = client.mappings.get(req.map_id)
    if obj is None:
        raise InvalidArgument(f"mapping {req.map_id} is not tracked for this client")
    return _export(core, obj, f"mapping {req.map_id}", bool(req.flags & s.WRITABLE),
                   req.map_id in client.readonly_maps)


def _export(core: Core, obj: BufferObject, what: str, writable: bool, readonly: bool) -> s.ExportReply:
    if obj.proxy:
        raise InvalidArgument(f"{what} is {obj.kind.name.lower()} memory and cannot be exported")
    core.check_pages(obj)
    if writable and readonly:
        raise PermissionDenied(f"{what} is read-only; export it with writable=False")
    if pinned_in_vram(obj):
        raise Busy(f"the object of {what} is pinned in device memory")
    prepare_cpu(core, obj, write=writable)
    backing = core.populate(obj)
    obj.exported = True  # from now on never spilled or purged: others may hold its pages
    core.memory.watch(obj)  # and its pages may grow through their fds
    return s.ExportReply(fd=describe(core, obj, backing, writable))


def prime_fd_to_handle(core: Core, client: Client, req: s.ImportReq) -> s.ImportReply:
    fd = req.fd
    if fd is None:
        raise InvalidArgument("import needs an fd")
    info = core.backing.inspect(fd)
    obj = core.by_key.get(info.key)
    if obj is not None:
        mine = client.lowest_handle(obj)
        if mine is not None:  # re-import and self-import return the existing (lowest) handle
            readonly = mine in client.readonly
            return s.ImportReply(handle=mine, flags=s.HELD | (s.READONLY if readonly else 0), size=obj.size)
        if obj.readonly and not info.readonly:  # adopted through a read-only fd: now writable too
            req.fd = None
            core.make_writable(obj, fd, info)
        handle = core.handle_create(client, obj, readonly=info.readonly)  # read-only only if the fd is
        return s.ImportReply(handle=handle, flags=s.READONLY if info.readonly else 0, size=obj.size)
    core.check_object_limit(client)
    core.memory.make_fd_room()  # the new object keeps an fd (Pending: the request keeps its fd)
    kind = Kind.NORMAL if info.kind is FdKind.OURS else Kind.FOREIGN
    req.fd = None
    try:
        backing = core.backing.adopt(fd, info)
    except BaseException:
        fd.close()
        raise
    obj = core.adopt(client, backing, info.key, info.size, kind, readonly=info.readonly)
    try:
        handle = core.handle_create(client, obj, readonly=info.readonly)
    except BaseException:
        core.discard_unpublished(obj)
        raise
    return s.ImportReply(handle=handle, flags=s.READONLY if info.readonly else 0, size=obj.size)


def gem_madvise(core: Core, client: Client, req: s.MadviseReq) -> s.MadviseReply:
    if req.advice not in (WILLNEED, DONTNEED):
        raise InvalidArgument(f"advice must be WILLNEED (0) or DONTNEED (1), got {req.advice}")
    obj = core.lookup(client, req.handle)
    core.memory.madvise(obj, req.advice)
    return s.MadviseReply(retained=int(obj.placement != Placement.PURGED))


def gem_pin(core: Core, client: Client, req: s.HandleReq) -> s.Empty:
    obj = core.lookup(client, req.handle)
    core.check_pages(obj)
    if client.id in obj.pinned_by:
        return s.Empty()
    limit = core.config.pin_limit
    if client.pinned_bytes + obj.size > limit:
        raise QuotaExceeded(f"pinning {obj.size} more bytes would exceed the pin limit of {limit} "
                            f"(client {client.id} has {client.pinned_bytes} pinned)")
    core.check_uid_quota(client, obj.size, "pinning")
    core.memory.ensure_system(obj)
    if obj.kind == Kind.NORMAL and obj.placement != Placement.VRAM:  # in VRAM it stays there
        core.memory.make_room(obj.size - obj.resident, keep=(obj,))
        core.backing.populate_all(core.populate(obj))
        core.memory.measure(obj)
    core.gpu.lru.discard(obj)  # pinned objects are never evicted
    core.pin(client, obj)
    return s.Empty()


def gem_unpin(core: Core, client: Client, req: s.HandleReq) -> s.Empty:
    obj = core.lookup(client, req.handle)
    if client.id not in obj.pinned_by:
        raise InvalidArgument(f"handle {req.handle} is not pinned by client {client.id}")
    core.unpin(client, obj)
    return s.Empty()


def stats(core: Core, client: Client, req: s.Empty) -> s.JsonReply:
    return s.JsonReply(data=json.dumps(core.statistics()).encode())


def debug_open(core: Core, client: Client, req: s.HandleReq) -> s.OpenReply:
    """A read-only handle to any live object by its manager-wide id (privileged, for
    debugging tools such as `ugem fs`); a new handle every call, like GEM_OPEN."""
    obj = core.objects.get(req.handle) if req.handle else None
    if obj is None or obj.handle_count == 0:
        raise NoSuchObject(f"no live object with id {req.handle}")
    handle = core.handle_create(client, obj, readonly=True)
    return s.OpenReply(handle=handle, size=obj.size)


def list_clients(core: Core, client: Client, req: s.Empty) -> s.JsonReply:
    rows = [{"id": c.id, "pid": c.creds.pid, "uid": c.creds.uid,
             "handles": {str(h): o.id for h, o in sorted(c.handles.items())}} for c in core.clients.values()]
    return s.JsonReply(data=json.dumps(rows).encode())


def list_objects(core: Core, client: Client, req: s.Empty) -> s.JsonReply:
    return s.JsonReply(data=json.dumps(core.list_objects()).encode())
