"""Shares: one-use references that carry a mapping to another process (pickling by reference).

A process that sends ugem memory through multiprocessing's pickler (client/pickling.py)
does not pass an fd (multiprocessing hands fds over through a helper thread and a fresh
authenticated connection each: slower than the whole task round trip). It asks for a share
instead, and the receiver claims it through its own client of the same manager.

Rules:
- GEM_SHARE names one of the caller's tracked mappings and the part of the object it
  covers; the share holds the object as a tracked mapping does (a reference, and never
  spilled) until it is claimed or dropped, or the sending process goes away
  (core/share_table.py): a sender may drop its array, or close its Device, right after
  sending it, as with an fd in flight. Writable
  only through a writable mapping (EACCES).
- Shares are named by (owner client id, token). The client picks the token, its previous
  one plus one (else EINVAL), so that it can send the pickle without waiting for the reply,
  or before sending the share at all (client/device_share.py, client/batch.py: a pickler
  holds its shares back and sends them with its next request); client ids are never
  reused, so a stale pair names nothing (ENOENT), never another object. A share that fails
  (e.g. EDQUOT: a client holds at most `client_max_objects` unclaimed shares) still uses
  its token up, and its error is kept (the latest SHARE_AHEAD) for its claimer, who gets
  that errno.
- Early claims: a claim (or drop) may reach the manager before the share it names, which
  comes on another connection, later or not yet sent. When the claim names the memory (the
  memfd identity (dev, ino) in the pickle: GEM_CLAIM_MAPPED always, GEM_CLAIM when its
  dev/ino are set), the owner client is connected, the token is at most SHARE_LAG past its
  last, and a live object has that memory, the claim is taken at once on that object
  (the owner's uid rule as below; the part claimed must lie in it, else EINVAL) and the
  token noted in the owner's `claimed_early` (at most SHARE_LAG: else EINVAL): when its
  GEM_SHARE arrives it is used up at once. That is safe because a sender's share is sent
  before its release of the mapping it names (one queue, in order): while the share is
  unsent, the sender's mapping holds the object. A drop of a share not yet sent is noted
  the same way (GEM_DROP_SHARES). Within one uid no boundary is drawn between clients (a
  process may ptrace another of its uid): naming a memory and a token is enough.
  Without the memory named (a plain GEM_CLAIM), a claim of another client's token at most
  SHARE_LAG past its last is EAGAIN (the claimer tries again: client/device_share.py), the
  daemon keeping no state for it. Further ahead, or the claimer's own future token, is
  ENOENT. Embedded managers serve every request at once: never EAGAIN.
- GEM_CLAIM maps the shared part for the caller exactly as GEM_MMAP maps a handle's (same
  checks and waits; nothing changes before it could wait) and uses the share up. Only a
  client of the owner's uid, or root, may claim (as for names: EACCES); a writable claim
  of a read-only share is EACCES.
- GEM_CLAIM_MAPPED is the claim of a receiver that maps the memory already, without a round
  trip (client/device_share.py): it took the daemon's own fd of the object's memfd (the
  `server_fd` of the sender's MmapReply) with pidfd_getfd, which the kernel allows only to a
  process that may ptrace the daemon (its uid, or root), checked that fd's memfd identity
  and mapped it; it sends this without waiting for the reply. The manager tracks that
  mapping under the id the client chose (CHOSEN_MAP_IDS and up, not in use: else EINVAL)
  as GEM_CLAIM would have (same preparation for CPU access; same uid rule), on the object
  whose memory has that identity (none: ENOENT; not the share's: EINVAL). A claim that
  fails leaves the receiver with memory it maps untracked, which stays its own (the memfd
  lives while mapped) and is never another object's (the identity was checked, and the
  object it names, if still alive, is never recycled: core/recycle.py); the release of its
  id then fails harmlessly (EINVAL, a note nobody reads).
- GEM_DROP_SHARES uses shares up without mapping (the receiver already maps that memory);
  unknown ones, and other uids' (unless root), are skipped.
- GEM_SHARE_BATCH and GEM_CLAIM_MAPPED_BATCH carry many GEM_SHARE and GEM_CLAIM_MAPPED
  requests as records (a pickler's shares and an unpickler's claims: one frame, one dispatch
  for dozens of arrays). The records are checked as a whole first (a whole number of them,
  every flag known: else EINVAL, nothing done); then each is served in order exactly as the
  single request it stands for, with every rule above, and one that fails fails alone, as
  a posted single request would: a share's error is kept for its claimer, a claim's is
  nobody's (the receiver's mapping stays its own), and the request as a whole succeeds. A
  claim that must wait (Pending) waits; the run after the wait starts at that record
  (`Call.done`), never serving one twice.
- Where shares live, and what becomes of them when their sender's client goes away (they
  pass to another client of the same process, if any): core/share_table.py.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from ..constants import PAGE_SIZE
from ..errors import (
    InvalidArgument,
    NoSuchObject,
    PermissionDenied,
    QuotaExceeded,
    TryAgain,
    UgemError,
    error_from_errno,
)
from ..wire import structs as s
from ..wire import structs_share as ss
from ..wire.frames import MAX_PAYLOAD
from .client import Client
from .core import Core
from .gem import cpu_mapping, map_object, track_mapping
from .object import BufferObject
from .share_table import Share

if TYPE_CHECKING:
    from .call import Call

__all__ = ["gem_claim", "gem_claim_mapped", "gem_claim_mapped_batch", "gem_drop_shares", "gem_share",
           "gem_share_batch"]


def gem_share(core: Core, client: Client, req: ss.ShareReq) -> s.Empty:
    _share(core, client, req.map_id, req.flags, req.offset, req.length, req.token)
    return s.Empty()


def _share(core: Core, client: Client, map_id: int, flags: int, offset: int, length: int, token: int) -> None:
    if token != client.last_share + 1:
        raise InvalidArgument(f"share token {token} of client {client.id} is not its previous one "
                              f"({client.last_share}) plus one")
    client.last_share = token
    if token in client.claimed_early:  # its receiver maps it already (GEM_CLAIM_MAPPED)
        client.claimed_early.discard(token)
        return
    try:
        share = _new_share(core, client, map_id, flags, offset, length)
    except UgemError as exc:
        client.failed_shares[token] = exc
        if len(client.failed_shares) > ss.SHARE_AHEAD:
            del client.failed_shares[next(iter(client.failed_shares))]
        raise
    core.shares.hold(share.obj)
    client.shares[token] = share


def _new_share(core: Core, client: Client, map_id: int, flags: int, offset: int, length: int) -> Share:
    obj = client.mappings.get(map_id)
    if obj is None:
        raise InvalidArgument(f"mapping {map_id} is not tracked for client {client.id}")
    if offset < 0 or offset % PAGE_SIZE or length <= 0 or offset + length > obj.size:
        raise InvalidArgument(f"cannot share offset {offset} length {length} of the object of mapping "
                              f"{map_id} (size {obj.size}, offsets page-aligned)")
    writable = bool(flags & s.WRITABLE)
    if writable and map_id in client.readonly_maps:
        raise PermissionDenied(f"mapping {map_id} is read-only; share it with writable=False")
    limit = core.config.client_max_objects
    if len(client.shares) >= limit:
        raise QuotaExceeded(f"client {client.id} holds {len(client.shares)} shares nobody claimed, the limit is "
                            f"{limit}")
    return Share(obj, offset, length, writable, client.creds.uid)


def _find(core: Core, client: Client, owner_id: int, token: int, may_lag: bool = True) -> Share:
    share = core.shares.find(owner_id, token)
    owner = core.clients.get(owner_id)
    if share is None and owner is not None:
        failed = owner.failed_shares.get(token)
        if failed is not None:
            raise error_from_errno(failed.errno, f"share {token} of client {owner_id} failed: {failed.strerror}")
        if may_lag and core.shares_may_lag and owner is not client and _ahead(owner, token):
            raise TryAgain(f"share {token} of client {owner_id} has not reached the daemon yet (its last is "
                           f"{owner.last_share}); claim it again")
    if share is None:
        raise NoSuchObject(f"share {token} of client {owner_id} is not held: it was claimed already, or its "
                           f"sender is gone")
    _check_uid(client, share.uid, owner_id, token)
    return share


def _ahead(owner: Client, token: int) -> bool:
    """Whether `token` may be a share of `owner` not read yet."""
    return owner.last_share < token <= owner.last_share + ss.SHARE_LAG and token not in owner.failed_shares


def _check_uid(client: Client, uid: int, owner_id: int, token: int) -> None:
    if client.creds.uid not in (0, uid):
        raise PermissionDenied(f"share {token} of client {owner_id} belongs to uid {uid}, caller is "
                               f"uid {client.creds.uid}")


def _early(core: Core, client: Client, owner_id: int, token: int,
           key: tuple[int, int]) -> tuple[Client, BufferObject] | None:
    """The owner and the object of a share that has not arrived yet, claimed (or dropped)
    early by the memory it names (the rules above), or None if that is not the case."""
    owner = core.clients.get(owner_id)
    if owner is None or owner is client or not key[1] or core.shares.find(owner_id, token) is not None \
            or not _ahead(owner, token):
        return None
    obj = core.by_key.get(key)
    if obj is None:
        return None
    _check_uid(client, owner.creds.uid, owner_id, token)
    if len(owner.claimed_early) >= ss.SHARE_LAG:
        raise InvalidArgument(f"share {token} of client {owner_id}: it has {ss.SHARE_LAG} shares claimed before "
                              f"they were sent")
    return owner, obj


def _check_part(obj: BufferObject, offset: int, length: int, what: str) -> None:
    if offset < 0 or offset % PAGE_SIZE or length <= 0 or offset + length > obj.size:
        raise InvalidArgument(f"{what}: offset {offset} length {length} is not a part of its object (size "
                              f"{obj.size}, offsets page-aligned)")


def gem_claim(core: Core, client: Client, req: ss.ClaimReq) -> s.MmapReply:
    writable = bool(req.flags & s.WRITABLE)
    what = f"the object of share {req.token}"
    early = _early(core, client, req.owner, req.token, (req.dev, req.ino))
    if early is not None:
        owner, obj = early
        _check_part(obj, req.offset, req.length, f"share {req.token} of client {req.owner}")
        core.check_pages(obj)
        reply = map_object(core, client, obj, req.offset, req.length, writable, what)
        owner.claimed_early.add(req.token)  # only now: map_object may have raised Pending
        return reply
    share = _find(core, client, req.owner, req.token, may_lag=not req.ino)  # named memory that is gone: ENOENT
    if writable and not share.writable:
        raise PermissionDenied(f"share {req.token} of client {req.owner} is read-only; claim it with "
                               f"writable=False")
    core.check_pages(share.obj)
    reply = map_object(core, client, share.obj, share.offset, share.length, writable, what)
    core.shares.take(req.owner, req.token)  # only now: map_object may have raised Pending
    core.shares.let_go(share.obj)
    return reply


def gem_claim_mapped(core: Core, client: Client, req: ss.ClaimMappedReq) -> s.Empty:
    _claim_mapped(core, client, req.owner, req.token, req.flags, req.map_id, req.dev, req.ino)
    return s.Empty()


def _claim_mapped(core: Core, client: Client, owner_id: int, token: int, flags: int, map_id: int, dev: int,
                  ino: int) -> None:
    """One GEM_CLAIM_MAPPED (or record of a batch). One that fails leaves its receiver mapping that
    memory untracked: the object with that memory is never recycled (core/recycle.py)."""
    try:
        _take_claim(core, client, owner_id, token, flags, map_id, dev, ino)
    except UgemError:
        obj = core.by_key.get((dev, ino))
        if obj is not None:
            obj.escaped = True
        raise


def _take_claim(core: Core, client: Client, owner_id: int, token: int, flags: int, map_id: int, dev: int,
                ino: int) -> None:
    if map_id < ss.CHOSEN_MAP_IDS or map_id in client.mappings:
        raise InvalidArgument(f"mapping id {map_id} is in use or below {ss.CHOSEN_MAP_IDS} (the manager's)")
    writable = bool(flags & s.WRITABLE)
    what = f"share {token} of client {owner_id}"
    early = _early(core, client, owner_id, token, (dev, ino))
    if early is not None:
        owner, obj = early
        cpu_mapping(core, obj, writable, what)
        track_mapping(core, client, obj, writable, map_id)
        owner.claimed_early.add(token)
        return
    share = _find(core, client, owner_id, token, may_lag=False)  # as GEM_CLAIM naming it
    if core.by_key.get((dev, ino)) is not share.obj:
        raise InvalidArgument(f"memory ({dev}, {ino}) is not the memory of {what}")
    if writable and not share.writable:
        raise PermissionDenied(f"{what} is read-only; claim it with writable=False")
    cpu_mapping(core, share.obj, writable, what)
    track_mapping(core, client, share.obj, writable, map_id)
    core.shares.take(owner_id, token)
    core.shares.let_go(share.obj)


def gem_drop_shares(core: Core, client: Client, req: ss.DropSharesReq) -> s.Empty:
    if len(req.records) % ss.SHARE_RECORD.size:
        raise InvalidArgument(f"share list of {len(req.records)} bytes is not a list of (u64, u64) records")
    uid = client.creds.uid
    for owner_id, token in ss.SHARE_RECORD.iter_unpack(req.records):
        share = core.shares.find(owner_id, token)
        if share is not None:
            if uid in (0, share.uid):
                core.shares.take(owner_id, token)
                core.shares.let_go(share.obj)
            continue
        owner = core.clients.get(owner_id)  # not sent yet: used up when it comes
        if owner is not None and owner is not client and uid in (0, owner.creds.uid) and _ahead(owner, token) \
                and len(owner.claimed_early) < ss.SHARE_LAG:
            owner.claimed_early.add(token)
    return s.Empty()


def gem_share_batch(core: Core, client: Client, req: ss.ShareBatchReq) -> s.Empty:
    for map_id, flags, offset, length, token in _records(req.records, ss.SHARE_BATCH_RECORD, 1, "share"):
        try:
            _share(core, client, map_id, flags, offset, length, token)
        except UgemError:  # that share failed as its GEM_SHARE would (its error kept for its claimer)
            continue
    return s.Empty()


def gem_claim_mapped_batch(core: Core, call: Call, req: ss.ClaimMappedBatchReq) -> s.Empty:
    records = _records(req.records, ss.CLAIM_BATCH_RECORD, 2, "claim")
    for i in range(call.done, len(records)):  # run again after a wait: from the record that waited
        try:
            _claim_mapped(core, call.client, *records[i])
        except UgemError:  # that claim failed as its GEM_CLAIM_MAPPED would (nobody reads it)
            pass
        call.done = i + 1
    return s.Empty()


def _records(data: bytes, record: struct.Struct, flags_at: int, what: str) -> list[tuple[int, ...]]:
    """The records of a batch request, checked as a whole before any is served: a whole
    number of them, at most a frame's worth, every one's flags known (else EINVAL)."""
    if len(data) % record.size or len(data) > MAX_PAYLOAD:
        raise InvalidArgument(f"{what} batch of {len(data)} bytes is not a list of at most "
                              f"{MAX_PAYLOAD // record.size} records of {record.size} bytes")
    records = list(record.iter_unpack(data))
    for i, fields in enumerate(records):
        if fields[flags_at] & ~s.WRITABLE:
            raise InvalidArgument(f"{what} record {i} has unknown flags {fields[flags_at]:#x}; nothing was done")
    return records
