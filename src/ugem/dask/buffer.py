"""`UgemBuffer`: a Dask worker's data mapping whose values live in ugem objects.

Give it through `distributed`'s `data=` parameter (`Worker`, `Nanny`,
`LocalCluster(data=(UgemBuffer, {"socket": PATH}))`); it is made in the worker process and
connects there to the daemon at `socket` (default: as `ugem.connect()` finds it).

Rules:
- a value of at least `min_size` bytes (by Dask's `sizeof`, default 64 KiB) goes into an
  object of its own, copied there by the writer thread (writer.py), not on Dask's event
  loop, from which Dask stores results. An array is deferred first: the arrays not copied
  yet wait in this process's heap, oldest first, up to `defer` bytes (default a sixteenth
  of the daemon's system budget), and one goes to the writer thread when newer ones push
  it out, when `evict()` picks it, or at `flush()`, so an array deleted before then
  (Dask's intermediates, e.g. a rechunk's pieces and merged blocks) is never copied.
  Until its copy is made the value is pending: reading a pending array gives a read-only
  `PendingArray` view of it at once (pending.py: a task never waits for the copy; sent
  to a worker on this host, it travels as a reference once copied: the
  sending thread, which for a small message is the event loop, makes the copy itself
  unless the writer thread has started it), reading any other pending value waits for its
  copy, and `flush()` waits for every pending value. A numpy array is stored raw, any
  other value as the bytes of Dask's own serialization (stored.py).
  Smaller values stay in this process's heap (an object is at least a page, and a round
  trip to the daemon costs more than they do);
- an array that already lies in one of this process's held ugem mappings of the same
  daemon (one received by reference from another worker, or a view or slice a task
  returned) is not copied: the key gets a new handle to that object, which it keeps alive
  whole (a small slice of a large object keeps all of it); so does an array that lies in
  a pending value stored byte for byte (C- or Fortran-contiguous: a `PendingArray` a task
  returned as it is, or a view of it), once that value's copy is made;
- reading a stored key gives a zero-copy `UgemArray` on the object's mapping (other values are
  deserialized from the mapping); one the daemon spilled is read into the heap from spill
  storage instead, and stays spilled (stored.py `load`). The values this worker holds mapped are `fast`, least
  recently used first, at most `target` bytes (one value may exceed it). The default is a
  sixteenth of the daemon's system budget, at most 64 MiB: what workers keep mapped the
  daemon cannot spill, so with many workers per node pass a smaller `target`;
  values still in use elsewhere are found again through weak references, never mapped twice;
- `evict()` (Dask's manual eviction protocol, called when the worker's memory passes
  Dask's `spill` threshold) lets go of this worker's mapping of the least recently used
  value and returns its size: its pages leave the worker's memory, and the object becomes
  one the daemon may spill to disk when the node's budget needs room (with nothing mapped
  or kept in the heap, it hands the oldest deferred array to the writer thread). The
  daemon does the writing, on its own threads: nothing is written from Dask's event loop.
  A value that is in use elsewhere stays mapped until that use ends;
- a value's pages are accounted for once written (as through any mapping, stored.py): the
  daemon spills others, or the value itself, to bring the node back under its budget,
  throttling the writer's next value meanwhile. If the daemon refuses to store a value
  (ENOMEM, EDQUOT, ENOSPC: a quota, no room for its fd or for earlier writes) even after this
  worker let go of every mapping it holds, the value stays in the heap (correct, just not
  in ugem) and is `fast` too: `evict()` hands it to the writer again (and returns its
  size). Reading a value back with no room lets go of every mapping too, then tries again
  for a few seconds (other workers' tasks end and let go of theirs) before raising
  `OutOfMemory`;
- deleting a key closes its handle at once, unless a view of its mapping is still in use
  (then the handle closes once the last view is gone, so a transfer in flight can still
  open the object by name, see handoff.py). Once nothing refers to it, the daemon keeps
  its memory (at least 1 MiB) to back the next object of its size, zeroed (stored.py
  writes values so that it may); `close()` (or garbage collection) closes the
  connection, which releases every object of this worker; a worker that dies releases them
  too (the daemon frees a dead client's objects). Views already handed out stay valid.
  Dask never calls `close()` itself: a worker process releases everything when it ends;
- limits: what tasks use at once is mapped and cannot be spilled, so the daemon's budget
  must hold the working set of the tasks running at once on all the node's workers (else
  they fail with `OutOfMemory`); deferred arrays are outside that budget: the node must
  also hold each worker's `defer` bytes (pass `defer=0` to copy every value at once).
  Reading a value back (mapping it, or waiting for a pending one) and adopting one happen
  on Dask's event loop; other copying and waiting for room do not.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import ChainMap
from collections.abc import Hashable, Iterator, MutableMapping
from typing import Any, cast

import numpy as np
from distributed.sizeof import safe_sizeof

from ..address import data_address
from ..client.buffer import Buffer
from ..client.connect import connect
from ..client.device import Device
from ..config import parse_size
from ..errors import NoSpace, OutOfMemory, QuotaExceeded
from .handoff import UgemArray, held, is_held, name_of, register_device, unregister_device
from .pending import pending_view
from .stored import Stored, load, pending_source, raw, store
from .writer import Writer

__all__ = ["UgemBuffer"]

logger = logging.getLogger("ugem.dask")
_NO_ROOM = (OutOfMemory, QuotaExceeded, NoSpace)
_MISSING = object()
_RETRY_PAUSES = (0.0, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2)  # reading back with no room (module rules)


def _size(value: int | str, what: str) -> int:
    return 0 if value in (0, "0") else parse_size(value, what)


def _close(path: str, device: Device, writer: Writer) -> None:
    writer.close()
    unregister_device(path, device)
    device.close()


class UgemBuffer(MutableMapping[Hashable, object]):
    """A `distributed` worker data mapping backed by the node's ugem daemon (module rules)."""

    def __init__(self, socket: str | None = None, *, target: int | str | None = None,
                 min_size: int | str = "64K", defer: int | str | None = None) -> None:
        self.device = connect(socket)
        self.socket: str = getattr(self.device._transport, "path", "")
        budget = int(self.device.stats()["system_budget"])
        self.target = min(64 << 20, budget // 16) if target is None else _size(target, "target")
        self.defer = budget // 16 if defer is None else _size(defer, "defer")
        self.min_size = _size(min_size, "min_size")
        #: values copied into objects so far (not adopted or shared), and their bytes
        self.counts = {"copies": 0, "copied_bytes": 0}
        self._lock = threading.RLock()
        self._local: dict[Hashable, object] = {}  # small values
        self._heap: dict[Hashable, object] = {}  # values the daemon had no room for
        self._pending: dict[Hashable, object] = {}  # values the writer thread is storing
        self._writing: set[object] = set()  # tokens of the pending values a thread is copying now
        self._aliases: dict[Hashable, tuple[Hashable, object, int]] = {}  # pending views of pending values
        self._done: dict[Hashable, threading.Event] = {}  # set once a pending key is stored or gone
        self._stored: dict[Hashable, Stored] = {}
        self._mapped: dict[Hashable, object] = {}  # stored values held mapped, least recently used first
        self._weights: dict[Hashable, int] = {}  # sizeof of every value not in _local
        self._mapped_bytes = 0
        self._weak: weakref.WeakValueDictionary[Hashable, Any] = weakref.WeakValueDictionary()
        self._writer = Writer(self.socket, self, UgemBuffer._write_pending, self.defer)
        register_device(self.socket, self.device)
        self._finalizer = weakref.finalize(self, _close, self.socket, self.device, self._writer)

    # -- Dask's manual eviction protocol -------------------------------------------------

    @property
    def fast(self) -> ChainMap[Hashable, object]:
        """The values in this process's memory that `evict()` can act on: mapped ones, heap
        ones the daemon had no room for, then deferred ones (keys only: not copied yet)."""
        return ChainMap(self._mapped, self._heap, cast("dict[Hashable, object]", self._writer.deferred))

    def evict(self) -> int:
        """Let go of one value from this process's memory; its size, or -1 (never raises)."""
        with self._lock:
            try:
                if self._mapped:
                    key = next(iter(self._mapped))
                    self._unmap(key)
                    return self._weights[key]
                for key, value in self._heap.items():  # the daemon had no room then: try again
                    del self._heap[key]
                    self._make_pending(key, value, defer=False)
                    return self._weights[key]
                return self._writer.queue_oldest()  # copied now, rather than when pushed out
            except Exception:
                logger.exception("ugem.dask: eviction failed")
            return -1

    # -- MutableMapping --------------------------------------------------------------

    def __setitem__(self, key: Hashable, value: object) -> None:
        with self._lock:
            if key in self:
                del self[key]
            weight = safe_sizeof(value)
            if weight < self.min_size:
                self._local[key] = value
                return
            self._weights[key] = weight
            adopted = self._adopt(value) if isinstance(value, np.ndarray) else None
            if adopted is not None:
                self._stored[key] = adopted
                self._keep_mapped(key, value)  # no copy: it is mapped already
                return
            source = pending_source(value, self._pending, self._done) if isinstance(value, np.ndarray) else None
            if source is not None:  # a view of a pending value: it will share that value's object
                self._aliases[key] = source
            self._make_pending(key, value, defer=raw(value))

    def _shared(self, source: tuple[Hashable, object, int], value: np.ndarray[Any, Any]) -> Stored | None:
        """A new handle to the object of the pending value `source` (once stored; this
        thread copies it if no thread has started to), viewed as `value`; None if that value
        was deleted, replaced or kept in the heap."""
        key, token, offset = source
        assert isinstance(token, threading.Event)
        self._write_pending(key)
        token.wait()
        with self._lock:  # not deleted while a handle is opened by name
            stored = self._stored.get(key)
            if stored is None or stored.token is not token or stored.dtype is None:
                return None
            buf = Buffer.open_name(self.device, stored.buf.flink())
        return Stored(buf, value.dtype, value.shape, value.strides, stored.offset + offset)

    def _make_pending(self, key: Hashable, value: object, defer: bool) -> None:
        self._pending[key] = value
        self._done[key] = threading.Event()
        self._writer.submit(key, self._weights[key] if defer else None)

    def _settled(self, key: Hashable) -> None:
        """A pending key was stored, kept in the heap, or deleted: wake who waits for it."""
        done = self._done.pop(key, None)
        if done is not None:
            done.set()

    def flush(self) -> None:
        """Wait until every value stored so far is in its object (or kept in the heap)."""
        with self._lock:
            pending = list(self._done.values())
        self._writer.flush()
        for done in pending:  # one another thread copies (`_stored_view`) is done when it says so
            done.wait()

    def _write_pending(self, key: Hashable) -> None:
        """On the writer thread (or one sending the value, `_stored_view`): copy one
        pending value into an object (writer.py)."""
        with self._lock:
            value = self._pending.get(key, _MISSING)
            token = self._done.get(key)
            if value is _MISSING or token is None or token in self._writing:
                return  # deleted meanwhile, or another thread is storing it
            self._writing.add(token)
            self._writer.undefer(key)
            source = self._aliases.pop(key, None)
        try:
            try:
                stored = None if source is None or not raw(value) else self._shared(source, value)
                if stored is None:
                    stored = self._copy(value)
            except _NO_ROOM:
                with self._lock:
                    self._unmap_all()
                self.device.stats()  # any request sends the releases just queued
                stored = self._copy(value)
        except _NO_ROOM as exc:
            logger.warning("ugem.dask: no room in the daemon for %s, kept in the heap: %s", key, exc)
            stored = None
        except BaseException:
            stored = None
            raise
        finally:
            with self._lock:
                self._writing.discard(token)
                if self._pending.get(key, _MISSING) is value:
                    del self._pending[key]
                    self._settled(key)
                    if stored is None:
                        self._heap[key] = value
                    else:
                        stored.token = token
                        self._stored[key] = stored
                        stored = None
            if stored is not None:
                stored.buf.close()  # deleted or replaced meanwhile

    def _copy(self, value: object) -> Stored:
        stored = store(value, self._writer.device, self.device)
        with self._lock:
            self.counts["copies"] += 1
            self.counts["copied_bytes"] += stored.length
        return stored

    def __getitem__(self, key: Hashable) -> object:
        while True:  # a pending array is read as it is, any other pending value waited for (module rules)
            with self._lock:
                done = self._done.get(key)
                if done is None:
                    return self._get(key)
                value = self._pending[key]
                if raw(value):
                    return pending_view(self, key, value, done, UgemBuffer._stored_view)
            done.wait()

    def _stored_view(self, key: Hashable, token: object) -> UgemArray | None:
        """The stored value's `UgemArray`, once the pending value `token` is stored; None if
        that value was deleted, replaced or kept in the heap (pending.py)."""
        assert isinstance(token, threading.Event)
        with self._lock:
            first = self._done.get(key) is token and token not in self._writing
        if first:  # not started by the writer thread: store it here, now, rather than wait for its turn
            try:
                self._write_pending(key)
            except Exception:  # as on the writer thread: the value stays in the heap
                logger.exception("ugem.dask: storing %r failed", key)
        token.wait()
        with self._lock:
            stored = self._stored.get(key)
            if stored is None or stored.token is not token or stored.dtype is None:
                return None
            value = self._get(key)
        return value if isinstance(value, UgemArray) else None

    def _get(self, key: Hashable) -> object:
        with self._lock:
            if key in self._local:
                return self._local[key]
            if key in self._heap:
                return self._heap[key]
            if key in self._mapped:
                value = self._mapped.pop(key)
                self._mapped[key] = value  # most recently used now
                return value
            stored = self._stored[key]
            found = self._weak.get(key)
            value = found if found is not None else self._load_with_room(stored)
            self._keep_mapped(key, value)
            return value

    def __delitem__(self, key: Hashable) -> None:
        with self._lock:
            if key in self._local:
                del self._local[key]
                return
            if key in self._mapped:
                self._unmap(key)
            self._weak.pop(key, None)
            self._aliases.pop(key, None)
            del self._weights[key]
            if self._pending.pop(key, _MISSING) is not _MISSING:
                self._writer.undefer(key)  # never copied, if still deferred
                self._settled(key)
                return
            if self._heap.pop(key, _MISSING) is not _MISSING:
                return
            stored = self._stored.pop(key)
            if is_held(stored.buf):  # its last view lets go of it (module rules)
                return
            stored.buf.close()

    def __contains__(self, key: object) -> bool:
        return key in self._local or key in self._stored or key in self._heap or key in self._pending

    def __iter__(self) -> Iterator[Hashable]:
        with self._lock:
            keys = [*self._local, *self._stored, *self._heap, *self._pending]
        yield from keys

    def __len__(self) -> int:
        return len(self._local) + len(self._stored) + len(self._heap) + len(self._pending)

    # -- storing and loading ---------------------------------------------------------

    def _adopt(self, a: np.ndarray[Any, Any]) -> Stored | None:
        """A new handle to the held object `a` lies in, if it is one of ours (no copy)."""
        found = held(a)
        if found is None or found[0].device is not self.device:
            return None
        data = data_address(a)
        buf = Buffer.open_name(self.device, name_of(found[1]))
        return Stored(buf, a.dtype, a.shape, a.strides, found[1].offset + data - found[1].address)

    def _load_with_room(self, stored: Stored) -> object:
        """`_load`; with no room, let go of our mappings and try again (module rules)."""
        for pause in _RETRY_PAUSES:
            try:
                return load(stored)
            except _NO_ROOM:
                self._unmap_all()
                time.sleep(pause)
        return load(stored)

    # -- the mapped set ----------------------------------------------------------------

    def _keep_mapped(self, key: Hashable, value: object) -> None:
        self._mapped[key] = value
        self._mapped_bytes += self._weights[key]
        try:
            self._weak[key] = value
        except TypeError:  # not weakly referenceable: found again only while in _mapped
            pass
        while self._mapped_bytes > self.target and len(self._mapped) > 1:
            self._unmap(next(iter(self._mapped)))

    def _unmap(self, key: Hashable) -> None:
        del self._mapped[key]
        self._mapped_bytes -= self._weights[key]

    def _unmap_all(self) -> None:
        for key in list(self._mapped):
            self._unmap(key)

    # -- closing ---------------------------------------------------------------------

    def close(self) -> None:
        """Stop the writer and close the connections: the daemon releases every object of
        this worker."""
        with self._lock:
            for key in list(self._done):
                self._settled(key)
            for mapping in (self._local, self._heap, self._pending, self._stored, self._mapped, self._weights,
                            self._aliases):
                mapping.clear()
            self._mapped_bytes = 0
            self._weak = weakref.WeakValueDictionary()
        self._finalizer()  # not under the lock: it waits for the writer, which may be taking it

    def __repr__(self) -> str:
        return (f"<UgemBuffer socket={self.socket!r} stored={len(self._stored)} mapped={len(self._mapped)} "
                f"local={len(self._local)} heap={len(self._heap)}>")
