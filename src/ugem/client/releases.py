"""Releases: what a Device still has to tell the manager, and the Buffers of each handle.

- `queue`: released mappings (their ids) and dropped Buffers (their handle's `Wrapped`
  record). Finalizers append to this very deque and do nothing else: a finalizer may run
  at any moment, even in the middle of a request, so it never sends, locks or allocates
  beyond the append. A mapping that lingers (client/linger.py, `linger`) queues a marker
  (None) instead of its id: sending the queue releases every lingering mapping. The
  Device drains the queue before its next request (`drain`) and sends what it yields;
  `Device.close()` just drops it (the manager releases everything).
- beside it, appended under `_lock` (a thread that pickles, never a finalizer) and taken
  whole under it when the queue is sent: `shares`, the GEM_SHARE records held back while
  pickling (client/batch.py), and `drops`, the shares to use up unmapped (their packed
  (owner, token), client/device_share.py). The first of either queues a marker too, so
  that what is queued is sent whenever they hold anything. Shares go first, in their
  order, as GEM_SHARE_BATCH requests (a share needs its mapping tracked); they are taken
  after the queue is drained, so every share made before a release that is sent goes
  before it. (Sorting them out of one queue cost a sender five lines of Python per array.)
  Claims held back while unpickling (GEM_CLAIM_MAPPED records) wait in `claims`, sent as
  GEM_CLAIM_MAPPED_BATCH requests before all of it (a claim's mapping must be tracked
  before it is released or shared) and on their own when the batch ends.
- `Wrapped`: the live Buffers of one handle. Two Buffers can share a handle (import_fd
  returns a handle the client already holds), so they are counted, and the handle is
  closed once the last of them is closed or dropped. A record dies when its handle is
  closed, by its last Buffer or by `Device.close_handle`; a Buffer of a dead record never
  sends its number again (the manager reuses handle numbers).
- Counts change under `lock` (threads may share a Device), which finalizers never take.
"""

from __future__ import annotations

import collections
import struct
import threading
from typing import Any

from ..wire import structs as s
from ..wire import structs_share as ss
from ..wire.frames import Op
from .linger import Linger

__all__ = ["Releases", "Wrapped"]


class Wrapped:
    """The live Buffers of one handle: how many, and whether the handle is closed."""

    __slots__ = ("handle", "count", "closed")

    def __init__(self, handle: int) -> None:
        self.handle = handle
        self.count = 0
        self.closed = False


Queued = int | Wrapped | None


class Releases:
    def __init__(self) -> None:
        # drained in place, never replaced, so a release can never land in a list nobody reads
        self.queue: collections.deque[Queued] = collections.deque()
        self._wrapped: dict[int, Wrapped] = {}  # open handle -> its live Buffers
        self._lock = threading.Lock()
        self.claims: list[bytes | tuple[int, int]] = []  # held back apart: sent first, and when a batch ends
        self.shares: list[bytes] = []  # GEM_SHARE records held back (under `_lock`)
        self.drops: list[bytes] = []  # SHARE_RECORDs of shares to use up unmapped (under `_lock`)
        self.linger = Linger()

    def hold_share(self, record: bytes) -> int:
        """Hold a GEM_SHARE record back (client/batch.py); the number held now."""
        with self._lock:
            shares = self.shares
            if not shares:
                self.queue.append(None)  # (something is queued: it is sent with the next request)
            shares.append(record)
            return len(shares)

    def drop(self, owner: int, token: int) -> None:
        """Queue the share (owner, token) to be used up unmapped."""
        with self._lock:
            drops = self.drops
            if not drops:
                self.queue.append(None)
            drops.append(_PACK_SHARE(owner, token))

    def claim_requests(self) -> list[tuple[Op, s.Struct]]:
        """Take the held claims (and shares used up by a lingering mapping, client/linger.py: a
        claim of sorts), as requests."""
        held, self.claims = self.claims, []
        claims: list[bytes] = []
        drops: list[bytes] = []
        for item in held:
            if type(item) is bytes:
                claims.append(item)
            else:
                drops.append(_PACK_SHARE(*item))
        step = ss.MAX_CLAIM_BATCH
        notes: list[tuple[Op, s.Struct]] = [
            (Op.GEM_CLAIM_MAPPED_BATCH, ss.ClaimMappedBatchReq(records=b"".join(claims[i:i + step])))
            for i in range(0, len(claims), step)]
        if drops:
            notes += _drop_requests(drops)
        return notes

    def adopt(self, handle: int) -> Wrapped:
        """A new Buffer wraps `handle`: count it."""
        with self._lock:
            record = self._wrapped.get(handle)
            if record is None:
                record = self._wrapped[handle] = Wrapped(handle)
            record.count += 1
            return record

    def unwrap(self, record: Wrapped) -> int | None:
        """A Buffer was closed: the handle to close now, if it was the last live one."""
        with self._lock:
            record.count -= 1
            return None if record.count or record.closed else self._retire(record)

    def closed(self, handle: int) -> None:
        """`handle` was closed (close_handle): its Buffers are dead."""
        if self._wrapped:
            with self._lock:
                record = self._wrapped.get(handle)
                if record is not None:
                    self._retire(record)

    def requests(self) -> list[tuple[Op, s.Struct]]:
        """Drain the queue into requests, sent ahead of the Device's next one (transport
        `notes`): each fits a frame, so a batch never fails for its size; held claims first
        (nothing queued before a claim names its mapping, and what names it comes after),
        then shares and mappings (they need no handle)."""
        notes = self.claim_requests() if self.claims else []
        ids, handles = self.drain()
        if self.shares or self.drops:  # (taken after the queue: module rules)
            with self._lock:
                held, self.shares = self.shares, []
                drops, self.drops = self.drops, []
            notes += [(Op.GEM_SHARE_BATCH, ss.ShareBatchReq(records=b"".join(held[i:i + ss.MAX_SHARE_BATCH])))
                      for i in range(0, len(held), ss.MAX_SHARE_BATCH)]
            notes += _drop_requests(drops)  # shares received here, mapped already
        for start in range(0, len(ids), s.MAX_IDS):
            batch = ids[start:start + s.MAX_IDS]
            notes.append((Op.GEM_MUNMAP, s.MunmapReq(ids=struct.pack(f"<{len(batch)}I", *batch))))
        for start in range(0, len(handles), s.MAX_IDS):
            batch = handles[start:start + s.MAX_IDS]
            notes.append((Op.GEM_CLOSE_BATCH, s.CloseBatchReq(handles=struct.pack(f"<{len(batch)}I", *batch))))
        return notes

    def drain(self) -> tuple[list[int], list[int]]:
        """Take everything queued: (mapping ids to release, handles to close)."""
        ids: list[int] = []
        wrapped: list[Wrapped] = []
        by_type: dict[type, list[Any]] = {int: ids, Wrapped: wrapped}
        pop = self.queue.popleft
        try:
            while True:  # one pass, sorted by exact type (a marker, None, is none of them)
                item = pop()
                into = by_type.get(type(item))
                if into is not None:
                    into.append(item)
        except IndexError:  # drained (perhaps by another thread at the same time)
            pass
        if self.linger:
            ids += self.linger.release_all()
        handles = []
        if wrapped:
            with self._lock:
                for record in wrapped:
                    record.count -= 1
                    if record.count == 0 and not record.closed:
                        handles.append(self._retire(record))
        return ids, handles

    def after_fork_in_child(self) -> None:
        self._lock = threading.Lock()  # the parent's may have been held at the fork
        self.linger.close()  # nothing may linger in a child that cannot send (client/linger.py)

    def _retire(self, record: Wrapped) -> int:
        """Mark a record's handle closed (the caller holds the lock and closes it)."""
        record.closed = True
        if self._wrapped.get(record.handle) is record:
            del self._wrapped[record.handle]
        return record.handle


_PACK_SHARE = ss.SHARE_RECORD.pack  # (owner, token)


def _drop_requests(drops: list[bytes]) -> list[tuple[Op, s.Struct]]:
    return [(Op.GEM_DROP_SHARES, ss.DropSharesReq(records=b"".join(drops[i:i + ss.MAX_DROPS])))
            for i in range(0, len(drops), ss.MAX_DROPS)]
