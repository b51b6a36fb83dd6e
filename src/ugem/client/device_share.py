"""Shares, the client side (a mixin of `Device`): how pickling by reference passes a mapping
to another process through the daemon (core/shares.py has the manager's rules).

- `_post_share(map_id, ...)`: a one-use reference to part of one of this client's tracked
  mappings, named by (this client's id, token). The token is this client's previous one
  plus one (chosen here, under `_share_lock`, in the order the requests are sent), so the
  request is sent without waiting for its reply (`transport.post`): pickling an array costs
  no round trip. It goes as a record of a GEM_SHARE_BATCH (held back with others while
  pickling, client/batch.py). A failure comes back to whoever claims it. `_share` is the
  same as a GEM_SHARE, waiting for the reply (its failure raised here);
- `_claim(owner, token, writable, memory)`: map it in this process (a tracked mapping,
  entered in the registry like any other) and use the share up. With `memory` (the memfd
  identity and the part shared, as the pickle names them) the manager takes the claim even
  before the share arrives (an early claim, core/shares.py); without it, a share the daemon
  has not read yet (EAGAIN: it comes on the sender's connection) is claimed again after a
  pause, growing from 50 us to 10 ms, for up to CLAIM_PATIENCE_S;
- `_claim_mapped(owner, token, key, source, offset, length)`: the same claim (writable
  shares only) with no round trip, where the daemon process lets this one copy its fds
  (client/daemon_fds.py: the daemon's uid, or root): take the daemon's own fd `source` of
  the memfd `key`, map it, and tell the manager with a GEM_CLAIM_MAPPED record (core/shares.py:
  GEM_CLAIM_MAPPED_BATCH) without waiting for its reply, under a map id chosen here
  (CHOSEN_MAP_IDS and up, never reused by this Device). It is held back no longer than the
  unpickling batch (client/batch.py): until it is read, the sender's share holds the
  object, and a receiver that ended without sending it would leave that share held for as
  long as the sending process lives. None when that is
  not possible (the caller then claims with the round trip). A read-only share always
  takes the round trip: the daemon's fd is writable, and only a description opened
  read-only keeps the receiver from writing;
- `_reused_mapping(size)`: the mapping of an object this Device made for an array (of
  REUSE_MIN bytes or more) whose last view died a moment ago and still lingers
  (client/linger.py), taken back if the manager says nothing else holds or sees the object
  (GEM_REUSE, core/recycle.py), for `ugem.array` to write a new value into: an 800 MiB
  object's mapping made anew costs its page faults (on the dev VM, filling the page tables
  of a recycled memfd's 800 MiB took 190 ms, the copy into them 49 ms);
- `_drop_share(owner, token)`: use it up without mapping (this process maps that memory
  already); queued with the releases and sent before the next request, never from here;
- `_enter(region, ...)`: enter a new mapping in the registry, released when its last view dies;
- `_mapping()`: around every request that makes a mapping (here and `Device.mmap`): the
  Device tells its manager before a fork that it maps memory (client/fork.py) if it has a
  live mapping or is making one (`_before_fork`);
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from ..address import data_address
from ..backing.mapping import map_placed, populate
from ..errors import Busy, InvalidArgument, TryAgain, UgemError, error_from_errno
from ..wire import structs as s
from ..wire import structs_share as ss
from ..wire.frames import Op
from .batch import HOLD_BACK, hold_back
from .daemon_fds import DaemonFds
from .fork import track_mappings
from .registry import Mapping, fd_key, register_mapping, rewatch

__all__ = ["CLAIM_PATIENCE_S", "ShareOps", "populate_write"]

def populate_write(view: memoryview) -> None:
    """Fill the page tables of the memory `view` views (a mapping, or an array over one), writable,
    in one call (backing/mapping.py `populate`: other threads run meanwhile), before writing all of
    it: faster than faulting them in."""
    pages = np.frombuffer(view, dtype=np.uint8)
    populate(data_address(pages), pages.nbytes, True)

REUSE_MIN = 1 << 20  # objects of this many bytes or more made for arrays may be reused in place (ugem.array)
CLAIM_PATIENCE_S = 60.0  # a share that has not arrived by then is not coming
_FIRST_PAUSE, _LAST_PAUSE = 50e-6, 0.01
_SHARE_RECORD = ss.SHARE_BATCH_RECORD.pack
_CLAIM_RECORD = ss.CLAIM_BATCH_RECORD.pack


class ShareOps:
    _released: Any  # the Device's release queue (client/releases.py)
    _releases: Any  # and its Releases
    _send_lock: Any  # the Device's: drain and send as one step
    _transport: Any
    _last_share = 0  # the last token sent
    _share_lock: threading.Lock  # the Device's
    _daemon_fds: DaemonFds | None = None  # made on first use
    _next_chosen = ss.CHOSEN_MAP_IDS  # the next map id of a GEM_CLAIM_MAPPED
    _mapping_threads: set[int]  # the Device's: threads making a mapping now
    _forked: bool  # the Device's: used in a forked child of the process that made it

    def _live(self) -> Any:
        raise NotImplementedError

    @property
    def client_id(self) -> int:
        raise NotImplementedError

    def _call(self, op: Op, req: s.Struct) -> Any:
        raise NotImplementedError

    def _post(self, op: Op | None, req: s.Struct | None = None) -> None:
        """Send a request without waiting for its reply, after what is queued (held claims,
        releases, held shares) in the same write; with no request, just what is queued."""
        transport = self._live()
        with self._send_lock:
            notes = self._releases.requests() if self._released or self._releases.claims else []
            transport.post(notes if op is None or req is None else [*notes, (op, req)])

    def _post_claim(self, record: bytes) -> None:
        """Post one GEM_CLAIM_MAPPED record: in an unpickling batch (client/batch.py) held
        back, sent when the batch ends (releases.py); else at once, as a batch request of one."""
        self._live()
        if hold_back(self):
            self._releases.claims.append(record)
        else:
            self._post(Op.GEM_CLAIM_MAPPED_BATCH, ss.ClaimMappedBatchReq(records=record))

    def _map_reply(self, reply: s.MmapReply, writable: bool, what: str, linger: bool = False,
                   made: bool = False) -> memoryview:
        """Map what a GEM_MMAP (GEM_CLAIM: `linger`; a `made` object's) reply describes; track it until its last
        view dies."""
        assert reply.fd is not None
        try:
            with reply.fd as fd:
                key = fd_key(fd.fd)
                region, address = map_placed(fd.fd, reply.offset, reply.length, writable)
        except OSError as exc:  # e.g. ENOMEM: no room for that much address space
            self._released.append(reply.map_id)
            raise error_from_errno(exc.errno or errno.ENOMEM, f"cannot map {reply.length} bytes of {what} "
                                   f"into this process: {exc.strerror}") from None
        except BaseException:
            self._released.append(reply.map_id)
            raise
        return self._enter(region, reply.map_id, reply.offset, writable, key, reply.server_fd, address, linger, made)

    def _share(self, map_id: int, offset: int, length: int, writable: bool) -> tuple[int, int]:
        owner = self.client_id
        flags = s.WRITABLE if writable else 0
        with self._share_lock:
            token = self._last_share = self._last_share + 1  # failed or not, the manager uses it up
            self._call(Op.GEM_SHARE, ss.ShareReq(map_id=map_id, flags=flags, offset=offset, length=length, token=token))
        return owner, token

    def _post_share(self, map_id: int, offset: int, length: int, writable: bool) -> tuple[int, int]:
        """`_share` without waiting for the reply: a GEM_SHARE_BATCH record, in a pickling
        batch (client/batch.py) held back (`_hold_share`), else sent at once, as a batch
        request of one."""
        if hold_back(self):
            return self._hold_share(map_id, offset, length, writable)
        transport = self._live()
        with self._share_lock:  # (sent in the order of the tokens)
            token = self._last_share = self._last_share + 1
            record = _SHARE_RECORD(map_id, s.WRITABLE if writable else 0, offset, length, token)
            self._post(Op.GEM_SHARE_BATCH, ss.ShareBatchReq(records=record))
        return transport.client_id, token

    def _hold_share(self, map_id: int, offset: int, length: int, writable: bool) -> tuple[int, int]:
        """`_post_share` held back, for a caller in a pickling batch (client/pickling.py):
        sent with what is queued, and once HOLD_BACK are held (releases.py)."""
        transport = self._transport
        if transport is None:
            self._live()  # (raises: closed)
        with self._share_lock:
            token = self._last_share = self._last_share + 1
            held = self._releases.hold_share(_SHARE_RECORD(map_id, s.WRITABLE if writable else 0, offset, length,
                                                           token))
        if held >= HOLD_BACK:
            self._post(None)
        return transport.client_id, token

    @contextmanager
    def _mapping(self) -> Iterator[None]:
        """Around a request that makes a mapping, until the mapping is in the registry."""
        track_mappings(self)
        me = threading.get_ident()
        self._mapping_threads.add(me)
        try:
            yield
        finally:
            self._mapping_threads.discard(me)

    def _before_fork(self, mapping: set[int]) -> None:
        """This process forks (client/fork.py): if this Device maps something (`mapping`: the
        ids of the Devices that do) or is making a mapping, its manager must never recycle
        that memory: MAPPINGS_FORKED. A manager that is gone recycles nothing. Lingering
        mappings (client/linger.py) make it call too: the call sends the queue first, which
        unmaps and releases them, so the child inherits none."""
        if self._transport is None or self._forked \
                or (id(self) not in mapping and not self._mapping_threads and not self._releases.linger):
            return
        try:
            self._call(Op.MAPPINGS_FORKED, s.Empty())
        except (UgemError, OSError):
            pass

    def _claim(self, owner: int, token: int, writable: bool,
               memory: tuple[tuple[int, int], int, int] | None = None) -> memoryview:
        with self._mapping():
            return self._claim_once(owner, token, writable, memory)

    def _claim_once(self, owner: int, token: int, writable: bool,
                    memory: tuple[tuple[int, int], int, int] | None) -> memoryview:
        (dev, ino), offset, length = memory if memory is not None else ((0, 0), 0, 0)
        req = ss.ClaimReq(owner=owner, token=token, flags=s.WRITABLE if writable else 0, dev=dev, ino=ino,
                          offset=offset, length=length)
        pause, deadline = _FIRST_PAUSE, time.monotonic() + CLAIM_PATIENCE_S
        while True:
            try:
                reply: s.MmapReply = self._call(Op.GEM_CLAIM, req)
                break
            except TryAgain:  # the share is on its way (another connection): it comes within moments
                if time.monotonic() >= deadline:
                    raise
                time.sleep(pause)
                pause = min(2 * pause, _LAST_PAUSE)
        return self._map_reply(reply, writable, f"share {token} of client {owner}", linger=True)

    def _claim_mapped(self, owner: int, token: int, key: tuple[int, int], source: int, offset: int,
                      length: int) -> memoryview | None:
        fds = self._fds()
        if not fds.usable:
            return None
        with self._mapping():
            return self._claim_mapped_taken(fds, owner, token, key, source, offset, length)

    def _claim_mapped_taken(self, fds: DaemonFds, owner: int, token: int, key: tuple[int, int], source: int,
                            offset: int, length: int) -> memoryview | None:
        fd = fds.take(source, key)
        if fd is None:
            return None
        with fd:
            region, address = map_placed(fd.fd, offset, length, True)
        with self._share_lock:
            map_id = self._next_chosen
            if map_id > 0xFFFFFFFF:
                region.close()
                return None
            self._next_chosen = map_id + 1
        try:
            self._post_claim(_CLAIM_RECORD(owner, token, s.WRITABLE, map_id, key[0], key[1]))
        except BaseException:
            region.close()
            raise
        return self._enter(region, map_id, offset, True, key, source, address, linger=True)

    def _fds(self) -> DaemonFds:
        """This Device's way to copy the daemon's fds (made on first use)."""
        fds = self._daemon_fds
        if fds is None:
            transport = self._live()
            peer = getattr(transport, "peer", None)
            fds = self._daemon_fds = DaemonFds(peer() if peer is not None else None)
        return fds

    def _take_flag(self) -> int:
        """TAKES_FD where this process may copy the daemon's fds."""
        transport = self._transport
        if transport is None or transport.embedded:
            return 0
        return s.TAKES_FD if self._fds().usable else 0

    def _take(self, reply: s.MmapReply) -> bool:
        """Give a reply that came without an fd (TAKES_FD) a copy of the daemon's own, if that
        is still the memory the reply names; False if not (purged and closed meanwhile, or
        the kernel refuses now): the caller releases the mapping and asks again without."""
        if reply.fd is not None:
            return True
        fd = self._fds().take(reply.server_fd, (reply.dev, reply.ino))
        if fd is None:
            return False
        reply.fd = fd
        return True

    def _enter(self, region: mmap.mmap, map_id: int, offset: int, writable: bool, key: tuple[int, int],
               source: int, address: int = 0, linger: bool = False, made: bool = False) -> memoryview:
        return memoryview(register_mapping(region, self, map_id, offset, writable, key,  # type: ignore[arg-type]
                                           source, address, self._released,
                                           self._releases.linger if linger or made else None, made))

    def _revive(self, key: tuple[int, int], offset: int, length: int, writable: bool,
                share: tuple[int, int] | None = None) -> memoryview | None:
        """A view of bytes [offset, offset + length) of the memfd `key` through a mapping of this
        Device that lingers (client/linger.py), entered again, and the received `share` (owner,
        token) of that memory, if any, used up (`_use_up`); None (the share untouched) if there is none."""
        linger = self._releases.linger
        if not linger or self._forked:
            return None
        with self._send_lock:
            item = linger.take(key, offset, length, writable)
            if item is None:
                return None
            watched = rewatch(item, self._released, linger)
        if share is not None:
            self._use_up(share)
        start = offset - item.entry.offset
        return memoryview(watched)[start:start + length]

    def _revive_entry(self, entry: Mapping, offset: int, length: int, share: tuple[int, int]) -> Any:
        """`_revive` of the lingering mapping of the registry entry `entry` (of this Device), if it
        still lingers: a uint8 array of those bytes (not tracked by the cyclic collector); else None."""
        linger = self._releases.linger
        with self._send_lock:
            item = linger.take_at(entry.address)
            if item is None:
                return None
            watched = rewatch(item, self._released, linger)
        self._use_up(share)
        start = offset - entry.offset
        return watched[start:start + length]

    def _reused_mapping(self, size: int) -> memoryview | None:
        """The whole mapping of an object of `size` bytes this Device made, whose last view died
        a moment ago (it lingers: client/linger.py), entered again, if the manager says that it
        may take new contents in place (GEM_REUSE: nothing else holds or sees it); else None
        (such a mapping is released as it would have been; so it is by a daemon that does not
        know GEM_REUSE, which answers EINVAL). Its bytes are the old ones."""
        linger = self._releases.linger
        if size < REUSE_MIN or not linger or self._forked:
            return None
        with self._send_lock:
            item = linger.take_whole(size)
        if item is None:
            return None
        try:
            self._call(Op.GEM_REUSE, s.ReuseReq(map_id=item.entry.map_id))
        except BaseException as exc:
            item.region.close()  # (no view of it is left)
            self._released.append(item.entry.map_id)
            if isinstance(exc, Busy | InvalidArgument):  # (EINVAL: a daemon without GEM_REUSE)
                return None
            raise
        with self._send_lock:
            return memoryview(rewatch(item, self._released, linger))

    def _send_claims(self) -> None:
        """Send the claims held back, if any, alone (client/batch.py)."""
        if self._releases.claims:
            transport = self._live()
            with self._send_lock:
                claims = self._releases.claim_requests()
                if claims:
                    transport.post_lazy(claims)  # read by the daemon later, never lost (client/lazy.py)

    def _send_held(self) -> None:
        """Before closing: send what is queued, the shares held back above all (their
        receivers may still claim them), and lingering mappings (client/linger.py), then
        linger no more; whatever fails, the manager releases the rest."""
        if (self._released or self._releases.claims) and self._transport is not None \
                and not self._transport.embedded:
            try:
                self._post(None)
            except (UgemError, OSError):  # the daemon is gone, or this is a forked child
                pass
        with self._send_lock:
            self._releases.linger.close()

    def _close_daemon_fds(self) -> None:
        if self._daemon_fds is not None:
            self._daemon_fds.close()

    def _new_mapping(self, size: int) -> memoryview:
        """A new object of `size` bytes mapped whole and writable, in one round trip, with no
        handle (GEM_CREATE_MAPPED): the mapping is all that keeps it (ugem.empty). When it
        came with all its pages (a recycled memfd, backing/recycle.py) its page tables are
        filled at once (MADV_POPULATE_WRITE: it allocates nothing then, and the caller is
        about to write it)."""
        req = s.CreateReq(size=size, flags=self._take_flag())
        with self._mapping():
            reply: s.MmapReply = self._call(Op.GEM_CREATE_MAPPED, req)
            if not self._take(reply):  # (rare) the object is dropped with its mapping: make another
                self._released.append(reply.map_id)
                reply = self._call(Op.GEM_CREATE_MAPPED, s.CreateReq(size=size))
            assert reply.fd is not None
            recycled = os.fstat(reply.fd.fd).st_blocks * 512 >= reply.length  # all its pages there already
            view = self._map_reply(reply, True, "a new object", made=size >= REUSE_MIN)
        if recycled:  # fill the page tables in one call, as it will be written: twice as fast as faulting
            populate_write(view)
        return view

    def _drop_share(self, owner: int, token: int) -> None:
        self._releases.drop(owner, token)

    def _use_up(self, share: tuple[int, int]) -> None:
        """Use up a share (owner, token) whose memory a lingering mapping took back (`_revive`):
        sent as a claim would have been (with the claims, when the unpickling batch ends; alone
        outside one), not queued: until it is read, its sender's share holds the object."""
        held = hold_back(self)
        self._releases.claims.append(share)
        if not held:
            self._send_claims()
