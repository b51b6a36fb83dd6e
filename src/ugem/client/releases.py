"""Releases: what a Device still has to tell the manager, and the Buffers of each handle.

- `queue`: released mappings (their ids) and dropped Buffers (their handle's `Wrapped`
  record). Finalizers append to this very deque and do nothing else: a finalizer may run
  at any moment, even in the middle of a request, so it never sends, locks or allocates
  beyond the append. The Device drains the queue before its next request (`drain`) and
  sends what it yields; `Device.close()` just drops it (the manager releases everything).
- `Wrapped`: the live Buffers of one handle. Two Buffers can share a handle (import_fd
  returns a handle the client already holds), so they are counted, and the handle is
  closed once the last of them is closed or dropped. A record dies when its handle is
  closed, by its last Buffer or by `Device.close_handle`; a Buffer of a dead record never
  sends its number again (the manager reuses handle numbers).
- Counts change under `lock` (threads may share a Device), which finalizers never take.
"""

from __future__ import annotations

import collections
import threading

__all__ = ["Releases", "Wrapped"]


class Wrapped:
    """The live Buffers of one handle: how many, and whether the handle is closed."""

    __slots__ = ("handle", "count", "closed")

    def __init__(self, handle: int) -> None:
        self.handle = handle
        self.count = 0
        self.closed = False


class Releases:
    def __init__(self) -> None:
        # drained in place, never replaced, so a release can never land in a list nobody reads
        self.queue: collections.deque[int | Wrapped] = collections.deque()
        self._wrapped: dict[int, Wrapped] = {}  # open handle -> its live Buffers
        self._lock = threading.Lock()

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

    def drain(self) -> tuple[list[int], list[int]]:
        """Take everything queued: (mapping ids to release, handles to close)."""
        released: list[int | Wrapped] = []
        try:
            while True:
                released.append(self.queue.popleft())
        except IndexError:  # drained (perhaps by another thread at the same time)
            pass
        ids = [item for item in released if isinstance(item, int)]
        handles = []
        with self._lock:
            for item in released:
                if isinstance(item, Wrapped):
                    item.count -= 1
                    if item.count == 0 and not item.closed:
                        handles.append(self._retire(item))
        return ids, handles

    def after_fork_in_child(self) -> None:
        self._lock = threading.Lock()  # the parent's may have been held at the fork

    def _retire(self, record: Wrapped) -> int:
        """Mark a record's handle closed (the caller holds the lock and closes it)."""
        record.closed = True
        if self._wrapped.get(record.handle) is record:
            del self._wrapped[record.handle]
        return record.handle
