"""GEM_USERPTR: wrap memory a client already has, without copying (SPEC §2, §6).

Two forms reach the same handler:
- in-process (embedded manager): any buffer-protocol object; the object keeps a view of
  it (so it stays alive while the object does), address and length page-aligned;
- over the wire: (fd, offset, length) of a memfd sealed against shrinking; the manager
  maps that range once and keeps only the mapping (no fd).
The device uses userptr memory in place, coherently (like CACHED). The kernel's
restrictions hold elsewhere: pread/pwrite EINVAL, mmap ENODEV, export EINVAL, tiling ENXIO,
caching NONE/DISPLAY ENXIO; never purged or spilled; not counted as resident or quota.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..constants import CACHING_CACHED, PAGE_SIZE
from ..errors import InvalidArgument, PermissionDenied
from ..wire import structs as s
from .core import Core
from .object import Kind
from .states import Event

if TYPE_CHECKING:
    from .call import Call

__all__ = ["gem_userptr"]


def gem_userptr(core: Core, call: Call, req: s.UserptrReq) -> s.OpenReply:
    client = call.client
    readonly = bool(req.flags & s.READONLY)
    if call.buffer is not None:
        view = core.backing.buffer_view(call.buffer)  # EINVAL: not contiguous / unaligned / empty
        if view.readonly and not readonly:
            raise PermissionDenied("writable userptr of read-only memory; pass readonly=True")
    else:
        fd, req.fd = req.fd, None
        if fd is None:
            raise InvalidArgument("userptr needs a buffer or (fd, offset, length)")
        with fd:
            if req.offset < 0 or req.length <= 0 or req.offset % PAGE_SIZE or req.length % PAGE_SIZE:
                raise InvalidArgument(f"userptr range offset {req.offset} length {req.length} must be "
                                      f"page-aligned and nonempty")
            info = core.backing.inspect(fd, whole=False)  # EINVAL: not a memfd sealed against shrinking
            if req.offset + req.length > info.size:
                raise InvalidArgument(f"userptr range [{req.offset}, {req.offset + req.length}) is outside "
                                      f"the memfd of {info.size} bytes")
            if info.readonly and not readonly:
                raise PermissionDenied("writable userptr of a read-only fd; pass readonly=True")
            view = core.backing.map_range(fd, req.offset, req.length, writable=not readonly)
    core.check_object_limit(client)
    obj = core.object_new(client, len(view), Kind.USERPTR)
    obj.host_view = view
    obj.readonly = readonly
    obj.caching = CACHING_CACHED  # used in place, coherently
    obj.transition(Event.POPULATE)
    try:
        handle = core.handle_create(client, obj, readonly=readonly)
    except BaseException:
        core.discard_unpublished(obj)
        raise
    return s.OpenReply(handle=handle, size=obj.size)
