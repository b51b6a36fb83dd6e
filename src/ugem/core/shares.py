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
  one plus one (else EINVAL), so that it can send the pickle without waiting for the reply
  (client/device_share.py; it reads the replies later, at most SHARE_AHEAD unread); client
  ids are never reused, so a stale pair names nothing (ENOENT), never another object. A
  share that fails (e.g. EDQUOT: a client holds at most `client_max_objects` unclaimed
  shares) still uses its token up, and its error is kept (the latest SHARE_AHEAD) for its
  claimer, who gets that errno.
- A claim may reach the daemon before the share it names: the sender wrote the share
  before the pickle, but on another connection, which the daemon may read later. A claim
  of another client's token at most SHARE_AHEAD past its last is EAGAIN (the claimer tries
  again: client/device_share.py), the daemon keeping no state for it; nothing holds the
  share back for long (a sender never has a request parked while its share is unread).
  Further ahead, or the claimer's own future token, is ENOENT. Embedded managers serve
  every request at once: never EAGAIN.
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
  whose memory has that identity (none: ENOENT; not the share's: EINVAL). If the share has
  not been read yet (SHARE_AHEAD rule above), the claim is taken now, the object found by
  its identity and the uid checked against the sending client's, and the token noted in
  the sender's `claimed_early`: when its GEM_SHARE arrives it is used up at once. A claim
  that fails leaves the receiver with memory it maps untracked, which stays its own (the
  memfd lives while mapped) and is never another object's (the identity was checked);
  the release of its id then fails harmlessly (EINVAL, a note nobody reads).
- GEM_DROP_SHARES uses shares up without mapping (the receiver already maps that memory);
  unknown ones, and other uids' (unless root), are skipped.
- Where shares live, and what becomes of them when their sender's client goes away (they
  pass to another client of the same process, if any): core/share_table.py.
"""

from __future__ import annotations

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
from .client import Client
from .core import Core
from .gem import cpu_mapping, map_object, track_mapping
from .share_table import Share

__all__ = ["gem_claim", "gem_claim_mapped", "gem_drop_shares", "gem_share"]


def gem_share(core: Core, client: Client, req: ss.ShareReq) -> s.Empty:
    if req.token != client.last_share + 1:
        raise InvalidArgument(f"share token {req.token} of client {client.id} is not its previous one "
                              f"({client.last_share}) plus one")
    client.last_share = req.token
    if req.token in client.claimed_early:  # its receiver maps it already (GEM_CLAIM_MAPPED)
        client.claimed_early.discard(req.token)
        return s.Empty()
    try:
        share = _new_share(core, client, req)
    except UgemError as exc:
        client.failed_shares[req.token] = exc
        if len(client.failed_shares) > ss.SHARE_AHEAD:
            del client.failed_shares[next(iter(client.failed_shares))]
        raise
    core.shares.hold(share.obj)
    client.shares[req.token] = share
    return s.Empty()


def _new_share(core: Core, client: Client, req: ss.ShareReq) -> Share:
    obj = client.mappings.get(req.map_id)
    if obj is None:
        raise InvalidArgument(f"mapping {req.map_id} is not tracked for client {client.id}")
    if req.offset < 0 or req.offset % PAGE_SIZE or req.length <= 0 or req.offset + req.length > obj.size:
        raise InvalidArgument(f"cannot share offset {req.offset} length {req.length} of the object of mapping "
                              f"{req.map_id} (size {obj.size}, offsets page-aligned)")
    writable = bool(req.flags & s.WRITABLE)
    if writable and req.map_id in client.readonly_maps:
        raise PermissionDenied(f"mapping {req.map_id} is read-only; share it with writable=False")
    limit = core.config.client_max_objects
    if len(client.shares) >= limit:
        raise QuotaExceeded(f"client {client.id} holds {len(client.shares)} shares nobody claimed, the limit is "
                            f"{limit}")
    return Share(obj, req.offset, req.length, writable, client.creds.uid)


def _find(core: Core, client: Client, owner_id: int, token: int) -> Share:
    share = core.shares.find(owner_id, token)
    owner = core.clients.get(owner_id)
    if share is None and owner is not None:
        failed = owner.failed_shares.get(token)
        if failed is not None:
            raise error_from_errno(failed.errno, f"share {token} of client {owner_id} failed: {failed.strerror}")
        ahead = owner.last_share < token <= owner.last_share + ss.SHARE_AHEAD
        if core.shares_may_lag and owner is not client and ahead:
            raise TryAgain(f"share {token} of client {owner_id} has not reached the daemon yet (its last is "
                           f"{owner.last_share}); claim it again")
    if share is None:
        raise NoSuchObject(f"share {token} of client {owner_id} is not held: it was claimed already, or its "
                           f"sender is gone")
    uid = client.creds.uid
    if uid != 0 and uid != share.uid:
        raise PermissionDenied(f"share {token} of client {owner_id} belongs to uid {share.uid}, caller is "
                               f"uid {uid}")
    return share


def gem_claim(core: Core, client: Client, req: ss.ClaimReq) -> s.MmapReply:
    share = _find(core, client, req.owner, req.token)
    writable = bool(req.flags & s.WRITABLE)
    if writable and not share.writable:
        raise PermissionDenied(f"share {req.token} of client {req.owner} is read-only; claim it with "
                               f"writable=False")
    core.check_pages(share.obj)
    reply = map_object(core, client, share.obj, share.offset, share.length, writable,
                       f"the object of share {req.token}")
    core.shares.take(req.owner, req.token)  # only now: map_object may have raised Pending
    core.shares.let_go(share.obj)
    return reply


def gem_claim_mapped(core: Core, client: Client, req: ss.ClaimMappedReq) -> s.Empty:
    if req.map_id < ss.CHOSEN_MAP_IDS or req.map_id in client.mappings:
        raise InvalidArgument(f"mapping id {req.map_id} is in use or below {ss.CHOSEN_MAP_IDS} (the manager's)")
    obj = core.by_key.get((req.dev, req.ino))
    writable = bool(req.flags & s.WRITABLE)
    what = f"share {req.token} of client {req.owner}"
    share = core.shares.find(req.owner, req.token)
    owner = core.clients.get(req.owner)
    if share is None and owner is not None and owner is not client and obj is not None \
            and req.token not in owner.failed_shares \
            and owner.last_share < req.token <= owner.last_share + ss.SHARE_AHEAD:
        uid = client.creds.uid
        if uid != 0 and uid != owner.creds.uid:
            raise PermissionDenied(f"{what} belongs to uid {owner.creds.uid}, caller is uid {uid}")
        if len(owner.claimed_early) >= ss.SHARE_AHEAD:
            raise InvalidArgument(f"{what}: client {req.owner} has {ss.SHARE_AHEAD} shares claimed before sent")
        cpu_mapping(core, obj, writable, what)
        track_mapping(core, client, obj, writable, req.map_id)
        owner.claimed_early.add(req.token)
        return s.Empty()
    share = _find(core, client, req.owner, req.token)  # raises what GEM_CLAIM would
    if obj is not share.obj:
        raise InvalidArgument(f"memory ({req.dev}, {req.ino}) is not the memory of {what}")
    if writable and not share.writable:
        raise PermissionDenied(f"{what} is read-only; claim it with writable=False")
    cpu_mapping(core, obj, writable, what)
    track_mapping(core, client, obj, writable, req.map_id)
    core.shares.take(req.owner, req.token)
    core.shares.let_go(share.obj)
    return s.Empty()


def gem_drop_shares(core: Core, client: Client, req: ss.DropSharesReq) -> s.Empty:
    if len(req.records) % ss.SHARE_RECORD.size:
        raise InvalidArgument(f"share list of {len(req.records)} bytes is not a list of (u64, u64) records")
    for owner_id, token in ss.SHARE_RECORD.iter_unpack(req.records):
        share = core.shares.find(owner_id, token)
        if share is not None and client.creds.uid in (0, share.uid):
            core.shares.take(owner_id, token)
            core.shares.let_go(share.obj)
    return s.Empty()
