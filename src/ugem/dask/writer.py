"""The writer thread of a `UgemBuffer`: copies new values into objects off Dask's event loop.

Rules:
- Dask stores a task's result from its event loop; `UgemBuffer.__setitem__` only files the
  value as pending and hands its key to this thread (`submit`), which copies it into a new object
  through a connection of its own (so a copy the daemon throttles while it makes room never
  holds up the worker's other requests), then hands the handle over to the worker's main
  connection (flink, open the name there, close its own) and tells the buffer;
- a key submitted with its size is deferred first: it waits, oldest first, while the
  deferred keys add up to at most `defer` bytes, and is queued for the thread when newer
  ones push it out, when `queue_oldest()` asks for it (eviction), or at `flush()`;
  `undefer(key)` forgets a deferred key (deleted, or being copied by another thread), so
  a value deleted while deferred is never copied;
- the thread holds its buffer only weakly between keys, so a buffer nobody references is
  still garbage collected (its finalizer stops the thread); `flush()` queues every deferred
  key and waits until every key handed over so far is done; `close()` stops the thread and
  closes its connection (objects it had not handed over yet go with it).
"""

from __future__ import annotations

import logging
import queue
import threading
import weakref
from collections.abc import Callable, Hashable
from typing import Any

from ..client.connect import connect
from ..client.device import Device

__all__ = ["Writer"]

logger = logging.getLogger("ugem.dask")
_STOP = object()


class Writer:
    """One thread and one connection; `write(key)` is called on the owner for each key."""

    def __init__(self, socket: str, owner: Any, write: Callable[[Any, Hashable], None], defer: int = 0) -> None:
        self.device: Device = connect(socket)
        self.defer = defer
        self.deferred: dict[Hashable, int] = {}  # keys not queued yet, oldest first -> their bytes
        self._deferred_bytes = 0
        self._lock = threading.Lock()
        self._queue: queue.Queue[object] = queue.Queue()
        owner_ref = weakref.ref(owner)
        self._thread = threading.Thread(target=_run, args=(self._queue, owner_ref, write), daemon=True,
                                        name="ugem-dask-writer")
        self._thread.start()

    def submit(self, key: Hashable, size: int | None = None) -> None:
        """Queue `key`; with its `size`, defer it first (module rules)."""
        if size is None:
            self._queue.put(key)
            return
        with self._lock:
            self.deferred[key] = size
            self._deferred_bytes += size
            due = self._due(self.defer)
        for old in due:
            self._queue.put(old)

    def _due(self, room: int) -> list[Hashable]:
        """The oldest deferred keys, taken out until the rest fit in `room` bytes."""
        due = []
        while self._deferred_bytes > room and self.deferred:
            key = next(iter(self.deferred))
            self._deferred_bytes -= self.deferred.pop(key)
            due.append(key)
        return due

    def undefer(self, key: Hashable) -> None:
        with self._lock:
            self._deferred_bytes -= self.deferred.pop(key, 0)

    def queue_oldest(self) -> int:
        """Queue the oldest deferred key; its size, or -1 if none is deferred."""
        with self._lock:
            if not self.deferred:
                return -1
            key = next(iter(self.deferred))
            size = self.deferred.pop(key)
            self._deferred_bytes -= size
        self._queue.put(key)
        return size

    def flush(self) -> None:
        with self._lock:
            due = self._due(0)
        for key in due:
            self._queue.put(key)
        self._queue.join()

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(_STOP)
            if threading.current_thread() is not self._thread:
                self._thread.join()
        self.device.close()


def _run(q: queue.Queue[object], owner_ref: weakref.ref[Any], write: Callable[[Any, Hashable], None]) -> None:
    while True:
        key = q.get()
        try:
            if key is _STOP:
                return
            owner = owner_ref()
            if owner is None:
                return
            try:
                write(owner, key)
            except Exception:  # keep serving later keys; the value stays in the heap (buffer.py)
                logger.exception("ugem.dask: storing %r failed", key)
            del owner
        finally:
            q.task_done()
