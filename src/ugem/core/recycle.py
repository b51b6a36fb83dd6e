"""Which memory may take new contents: a freed object's memfd backing a new object (the
pool itself: backing/recycle.py), or a live object reused in place (GEM_REUSE).

A memfd handed to a new object must hold pages no process but the manager can see: a
stale holder would read the new object's bytes (a leak) or write them (corruption). So a
freed object's memfd is recycled only if all of these hold when it is freed (`recyclable`):

- it is NORMAL memory the manager made: not imported (FOREIGN, or our own memfd adopted
  back by import_fd: `exported`), not userptr, not preloaded (`label`);
- it was never `exported` (PRIME_HANDLE_TO_FD, PRIME_MAP_TO_FD: pickling in embedded mode
  passes such an fd), and never `escaped`, which is set when
  - a description of it leaves the daemon (`describe`, the one way handlers make one for
    a client): a GEM_MMAP, GEM_CREATE_MAPPED or GEM_CLAIM reply carrying an fd, a bulk
    pread/pwrite transfer (XFER). The client library closes those once used, but a client
    may keep or pass them on, and the daemon cannot tell. An embedded manager's clients
    are the client library in its own process, which closes them (a fork meanwhile is
    covered below), so there they do not escape;
  - a share of it dies unclaimed (its sender went away, core/share_table.py), or a
    GEM_CLAIM_MAPPED naming it fails: its receiver may map the memory already, untracked;
  - a client that maps it (or has a transfer of it open) forks (MAPPINGS_FORKED, sent by
    the client library before every fork of a process holding mappings, client/fork.py):
    the child inherits mappings (and fds) the manager does not track. Embedded clients
    send it too: the manager lives on in the parent;
  - a client that maps it (or has a transfer of it open) is closed or goes away: its
    process may live on and keep the mapping (arrays outlive their Device, or the
    connection was lost); mappings it reported released before closing do not count
    (Device.close sends its queued releases first);
- no device work still uses it (a queued copy may still write through the manager's own
  mapping or a dup of its description).

Tracked mappings are not a concern: each holds a reference, so an object is freed only once
all of them are reported released (core/object.py). TAKES_FD replies carry no fd: the client
copies the daemon's own with pidfd_getfd and closes it once mapped (the mapping is tracked).
pidfd_getfd needs ptrace-level access to the daemon (its uid or root, Yama permitting), with
which a process could read any of the daemon's memory and fds anyway, pooled or not: so a
TAKES_FD mapping does not make an object escape, nor does a bulk pread/pwrite asked with
TAKES_FD (`transfer_fd`: the client copies the daemon's fd for the transfer and closes it
once done). For the same reason GEM_CLAIM_MAPPED receivers (who take the daemon's fd the
same way) only escape an object whose claim fails.

GEM_REUSE asks the same of a live object whose only reference is the caller's tracked
mapping `map_id` (no handle, no name, no other mapping, transfer, pin or unclaimed share,
no job, WILLNEED, not purged or spilled): the client library's `ugem.array` then writes a
new value into that mapping in place of making a new object (client/device_share.py
`_reused_mapping`), which saves a mapping's page faults, where a recycled memfd saves
only the allocation. EBUSY, and nothing changes, when anything else may hold or see it;
EINVAL for a mapping this client does not track; EACCES for a read-only one.

Purged objects (DONTNEED) lose their pages before the memfd is closed, and spilled ones
close theirs when the spill lands (no pages either): neither is pooled, since an empty
memfd saves nothing; a purged object may still be mapped, so its memfd must not be anyway.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..constants import WILLNEED
from ..errors import Busy, InvalidArgument, PermissionDenied
from ..fd import OwnedFd
from ..wire import structs as s
from .object import BufferObject, Kind
from .states import Placement

if TYPE_CHECKING:
    from .client import Client
    from .core import Core

__all__ = ["describe", "escape_held", "gem_reuse", "handed_over", "mappings_forked", "recyclable", "transfer_fd"]


def recyclable(obj: BufferObject, busy: bool) -> bool:
    """Whether `obj`'s memfd may back another object once it is freed now (`busy`: device
    work still uses it)."""
    return (obj.kind == Kind.NORMAL and obj.label is None and not obj.exported and not obj.escaped
            and not busy)


def describe(core: Core, obj: BufferObject, backing: object, writable: bool) -> OwnedFd:
    """A new description of `obj`'s memory for a client (it escapes if it leaves this
    process), its identity indexed."""
    fd = core.backing.open_description(backing, writable)
    obj.escaped = obj.escaped or core.descriptions_leave
    core.index_key(obj)
    return fd


def handed_over(core: Core, obj: BufferObject, backing: object, writable: bool,
                takes_fd: bool) -> tuple[OwnedFd | None, int]:
    """(fd, server_fd) for a reply that hands `obj`'s memory to a client: our own fd number
    of it (-1: we hold it as no fd) and a new description (`describe`: it escapes), or,
    asked with TAKES_FD for memory we hold as an fd, none: the client copies ours
    (pidfd_getfd) and checks it (module rules: it does not escape; a purge may close it
    meanwhile, and the check then fails). Its identity is indexed either way."""
    server_fd = backing.fd if isinstance(backing, OwnedFd) else -1
    if takes_fd and server_fd >= 0:
        core.index_key(obj)
        return None, server_fd
    return describe(core, obj, backing, writable), server_fd


def transfer_fd(core: Core, obj: BufferObject, backing: object, writable: bool,
                takes_fd: bool) -> tuple[OwnedFd | None, int, bytes]:
    """What a bulk transfer's reply (XFER) carries of `obj`'s memory: (fd, flags, data), as
    `handed_over`; with no fd, TAKEN and the TAKEN_FD record naming ours and its identity."""
    fd, server_fd = handed_over(core, obj, backing, writable, takes_fd)
    if fd is not None:
        return fd, 0, b""
    dev, ino = obj.key or (0, 0)
    return None, s.TAKEN, s.TAKEN_FD.pack(server_fd, 0, dev, ino)


def escape_held(client: Client) -> None:
    """Every object `client` maps (or has a transfer of open) escapes."""
    for obj in client.mappings.values():
        obj.escaped = True
    for obj, _, _ in client.transfers.values():
        obj.escaped = True


def mappings_forked(core: Core, client: Client, req: s.Empty) -> s.Empty:
    """MAPPINGS_FORKED: the client's process forks; what it maps escapes."""
    escape_held(client)
    return s.Empty()


def gem_reuse(core: Core, client: Client, req: s.ReuseReq) -> s.Empty:
    """GEM_REUSE (module rules): returns if the object behind mapping `map_id` may take new
    contents in place, else raises."""
    obj = client.mappings.get(req.map_id)
    if obj is None:
        raise InvalidArgument(f"mapping {req.map_id} is not tracked for this client")
    if req.map_id in client.readonly_maps:
        raise PermissionDenied(f"mapping {req.map_id} is read-only")
    # the caller's mapping holds one reference: a handle (and so a name), another mapping, a
    # transfer or an unclaimed share would hold another (core/object.py)
    alone = (obj.refcount == 1 and not obj.pinned_by and obj.job is None and obj.madvise == WILLNEED
             and obj.placement in (Placement.NONE, Placement.SYSTEM))
    if not (alone and recyclable(obj, core.memory.busy(obj))):
        raise Busy(f"the object of mapping {req.map_id} may be held or seen elsewhere (a handle, a name, another "
                   f"mapping, a share, an export, a fork): it cannot take new contents in place")
    return s.Empty()
