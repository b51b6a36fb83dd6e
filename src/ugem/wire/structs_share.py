"""Request and reply structs of shares (pickling by reference, core/shares.py); same rules as
wire/structs.py. A share is named by (owner client id, token); `DropSharesReq` lists such
pairs as little-endian (u64 owner, u64 token) records. `ShareBatchReq` and
`ClaimMappedBatchReq` list many GEM_SHARE and GEM_CLAIM_MAPPED requests as records of those
structs' layouts (SHARE_BATCH_RECORD, CLAIM_BATCH_RECORD), each served as that request."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .frames import MAX_PAYLOAD
from .structs import WRITABLE, Struct

__all__ = ["CHOSEN_MAP_IDS", "CLAIM_BATCH_RECORD", "MAX_CLAIM_BATCH", "MAX_DROPS", "MAX_SHARE_BATCH", "REPLIES_AHEAD",
           "SHARE_AHEAD",
           "SHARE_BATCH_RECORD", "SHARE_LAG", "SHARE_RECORD", "ClaimMappedBatchReq", "ClaimMappedReq", "ClaimReq",
           "DropSharesReq", "ShareBatchReq", "ShareReq"]

SHARE_RECORD = struct.Struct("<QQ")  # (owner, token)
MAX_DROPS = MAX_PAYLOAD // SHARE_RECORD.size  # records that fit in one request frame
SHARE_BATCH_RECORD = struct.Struct("<IIqqQ")  # ShareReq's layout: (map_id, flags, offset, length, token)
CLAIM_BATCH_RECORD = struct.Struct("<QQIIQQ")  # ClaimMappedReq's layout: (owner, token, flags, map_id, dev, ino)
MAX_SHARE_BATCH = MAX_PAYLOAD // SHARE_BATCH_RECORD.size
MAX_CLAIM_BATCH = MAX_PAYLOAD // CLAIM_BATCH_RECORD.size
# replies a client may leave unread (one per write of posted requests: client/transport.py). Not
# much more: a small reply takes ~1 KiB of socket buffer (the kernel's per-packet overhead), ~200
# fill the daemon's default send buffer, and the daemon stops reading a connection whose replies
# wait, so a client still writing would deadlock (tried with 1024: it did).
REPLIES_AHEAD = 64
# requests a client may post before it reads a reply sent after them, counting each share of a
# GEM_SHARE_BATCH as one: how far the daemon may lag behind it in share tokens (core/shares.py)
SHARE_AHEAD = 1024
# how far a client's shares may lag behind their claims (core/shares.py): the SHARE_AHEAD it may
# have unread, and those its pickler holds back unsent (client/batch.py: HOLD_BACK), with room
SHARE_LAG = 2 * SHARE_AHEAD
CHOSEN_MAP_IDS = 1 << 31  # map ids from here up are chosen by the client (GEM_CLAIM_MAPPED); the manager's are below


@dataclass(slots=True)
class ShareReq(Struct):
    """GEM_SHARE: a one-use reference to the object behind one of this client's tracked
    mappings, for another process to claim."""

    LAYOUT = (("map_id", "I"), ("flags", "I"), ("offset", "q"), ("length", "q"), ("token", "Q"))
    FLAGS = WRITABLE
    map_id: int = 0
    flags: int = 0
    offset: int = 0  # the part of the object shared (page-aligned offset), as mmap takes it
    length: int = 0
    token: int = 0  # chosen by the client: its previous share's plus one


@dataclass(slots=True)
class ClaimReq(Struct):
    """GEM_CLAIM: map what a share refers to (reply: MmapReply) and use the share up. The
    memory it names, (dev, ino) of its memfd and the part shared, lets the manager take a
    claim that comes before its share (core/shares.py); zeros: the share must be there."""

    LAYOUT = (("owner", "Q"), ("token", "Q"), ("flags", "I"), ("pad", "I"), ("dev", "Q"), ("ino", "Q"),
              ("offset", "q"), ("length", "q"))
    FLAGS = WRITABLE
    owner: int = 0
    token: int = 0
    flags: int = 0
    pad: int = 0
    dev: int = 0
    ino: int = 0
    offset: int = 0
    length: int = 0


@dataclass(slots=True)
class ClaimMappedReq(Struct):
    """GEM_CLAIM_MAPPED: the caller maps the share's memory already (it took the daemon's fd
    of it, `server_fd` of an MmapReply, with pidfd_getfd, and checked it is the memfd
    (dev, ino)); track that mapping under `map_id` (chosen by the caller, at least
    CHOSEN_MAP_IDS) and use the share up. Sent without waiting for its reply."""

    LAYOUT = (("owner", "Q"), ("token", "Q"), ("flags", "I"), ("map_id", "I"), ("dev", "Q"), ("ino", "Q"))
    FLAGS = WRITABLE
    owner: int = 0
    token: int = 0
    flags: int = 0
    map_id: int = 0
    dev: int = 0
    ino: int = 0


@dataclass(slots=True)
class DropSharesReq(Struct):
    """GEM_DROP_SHARES: use shares up without mapping them (the receiver maps that memory
    already); one not sent yet is used up when it comes; unknown ones are skipped. At most
    MAX_DROPS records per request."""

    LAYOUT = ()
    TAIL = "records"
    records: bytes = b""


@dataclass(slots=True)
class ShareBatchReq(Struct):
    """GEM_SHARE_BATCH: several GEM_SHARE requests in one, `records` of SHARE_BATCH_RECORD
    (ShareReq's fields), served in order, each exactly as its GEM_SHARE (core/shares.py);
    at most MAX_SHARE_BATCH. Succeeds as a whole: a record that fails only fails its share."""

    LAYOUT = ()
    TAIL = "records"
    records: bytes = b""


@dataclass(slots=True)
class ClaimMappedBatchReq(Struct):
    """GEM_CLAIM_MAPPED_BATCH: several GEM_CLAIM_MAPPED requests in one, `records` of
    CLAIM_BATCH_RECORD (ClaimMappedReq's fields), served in order, each exactly as its
    GEM_CLAIM_MAPPED; at most MAX_CLAIM_BATCH. Succeeds as a whole, as GEM_SHARE_BATCH."""

    LAYOUT = ()
    TAIL = "records"
    records: bytes = b""
