"""The object pool of a `UgemBuffer`: objects of deleted keys, kept to store new values in.

Why: filling a new object costs far more than the copy itself, since every page of it is
allocated and zeroed first (on the 2-vCPU dev VM, writing 32 MiB into a new object took
~34 ms, into an object whose pages are resident ~13 ms, into fresh heap memory ~7 ms).
Dask's workers keep producing values of the sizes they just released (the chunks of one
array), so the pages of a released value are the cheapest place for the next one.

Rules (`admit` runs on the writer thread, writer.py; `take` on the thread copying a value,
the writer or one sending it; the entries change under a lock):
- `admit(buf)`: an object enters the pool only if the buffer made it itself (never one
  received from another worker or adopted), no view of it is in use in this process (the
  buffer checks both), it fits in `capacity`, and the daemon confirms that this handle is
  all that refers to it (`Device.sole`: no other handle in any client, no mapping, this
  process's included (a value deserialized from the mapping may still hold a view of
  it), no transfer, share or device work in flight, never exported). A value sent to
  another worker by reference holds a view here until the receiver has opened or copied
  it, and a receiver still using it holds a handle or a mapping, so `sole` sees every
  reader. Anything else is closed, as before. A pooled object is marked DONTNEED: its
  pages stay resident and in the daemon's accounting (`purgeable_bytes`), and the daemon
  purges them first when its budget needs room;
- `take(length)`: the smallest pooled object whose size is between `length` rounded up to
  a page and an eighth more, marked WILLNEED again (one that was purged meanwhile is
  closed and the next tried). The caller overwrites every byte of it (the value, then
  zeros to its end), so no reader ever sees what it held before;
- at most `capacity` bytes are pooled, the oldest object let go first; `clear()` closes
  every pooled object (a closed connection releases them anyway).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from ..client.buffer import Buffer
from ..constants import DONTNEED, WILLNEED, page_align

__all__ = ["Pool", "Pooled"]


@dataclass(slots=True)
class Pooled:
    buf: Buffer
    size: int


class Pool:
    """Objects kept for reuse, at most `capacity` bytes (module rules)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._entries: list[Pooled] = []  # oldest first
        self._bytes = 0
        #: what happened so far: objects admitted, refused (not sole, too big), reused, found purged
        self.counts = {"admitted": 0, "refused": 0, "reused": 0, "purged": 0}

    @property
    def bytes(self) -> int:
        return self._bytes

    def admit(self, buf: Buffer) -> None:
        size = buf.size
        if buf.closed or size > self.capacity or not buf.device.sole(buf.handle):
            self._count("refused")
            buf.close()
            return
        buf.madvise(DONTNEED)
        dropped: list[Pooled] = []
        with self._lock:
            self._entries.append(Pooled(buf, size))
            self._bytes += size
            while self._bytes > self.capacity:
                dropped.append(self._entries.pop(0))
                self._bytes -= dropped[-1].size
            self.counts["admitted"] += 1
        for entry in dropped:
            entry.buf.close()

    def take(self, length: int) -> Pooled | None:
        need = page_align(max(length, 1))
        while True:
            with self._lock:
                fits = [e for e in self._entries if need <= e.size <= need + need // 8]
                if not fits:
                    return None
                entry = min(fits, key=lambda e: e.size)
                self._entries.remove(entry)
                self._bytes -= entry.size
            if entry.buf.madvise(WILLNEED):
                self._count("reused")
                return entry
            self._count("purged")  # the daemon needed the room: its pages are gone
            entry.buf.close()

    def _count(self, what: str) -> None:
        with self._lock:
            self.counts[what] += 1

    def clear(self) -> None:
        with self._lock:
            entries, self._entries, self._bytes = self._entries, [], 0
        for entry in entries:
            entry.buf.close()
