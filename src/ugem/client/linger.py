"""Lingering mappings: received memory kept mapped after its last array dies, for the next time.

A worker that is sent the same memory again and again (a Pool task's input, a model's weights
with every request, an array sent and returned) would otherwise claim it each time: copy the
daemon's fd, map it, tell the manager, and unmap it and tell the manager again when the task
ends, which costs a worker more than all the rest of a Pool round trip. Instead, a mapping
made by a claim (client/pickling.py: an array received by reference) lingers when its last
view dies: still mapped and still tracked by the manager, and a later claim of that memory
in this process (the same memfd, by its identity, a part of what the mapping covers, writable
if the claim is) takes the mapping back and only drops its share, with no round trip and no
request of its own (client/device_share.py `_revive`). So does the whole mapping of an
object a Device made for an array of REUSE_MIN bytes or more (`ugem.empty`, `ugem.array`:
registry.py `Mapping.made`), which `ugem.array` may take back by its length (`take_whole`)
to write a new value into, if the manager agrees (GEM_REUSE: client/device_share.py
`_reused_mapping`).

Rules:
- a lingering mapping holds its object exactly as long as its release would have waited in
  the Device's queue anyway (client/releases.py): it is released (unmapped, its id queued)
  whenever the queue is sent (the Device's next request, a post, the HOLD_BACK-th share
  held back, `close()`), only claims sent alone at the end of an unpickling leave it
  lingering. So what a process does not use again is released no later than before;
- at most LINGER_ANY mappings of any size linger per Device, and past those only small ones
  (LINGER_SMALL bytes or less) up to LINGER_MAX in all: a mapping whose last view dies when
  there is no room for it is released as any other (unmapped, its id queued). Small arrays
  are where a claim costs most against the use of the memory (a worker sent the same 2,000
  arrays of 4 KiB with every task claimed 1,936 of them each time, 64 lingering: the task's
  round trip took 3.2x that of shared_memory by name; all lingering, 1.7x), and 4,032 small
  ones hold at most 252 MiB. A full Linger releases the newcomer, never an older one (the
  callbacks only append);
- the mapping is unmapped before its release is queued (nothing in this process can see the
  memory once the manager may reuse it); a process with lingering mappings that forks
  releases them first (client/fork.py: its MAPPINGS_FORKED call sends the queue), and in a
  forked child (whose Device cannot send) nothing lingers: what it inherited is unmapped
  and its arrays' mappings die with them, as before;
- a lingering mapping's registry entry stays (client/registry.py): only its Linger finds it
  (by the memfd's identity), taking it back makes it live again in place, and releasing it
  forgets it; a Device dropped without `close()` forgets the entries of what lingers with it
  (its mappings are unmapped as they die);
- weak-reference callbacks (which run at any moment, in any thread) only append to
  `arrived` (and, when it was empty, a marker to the Device's queue, so that the next send
  releases it); the Device files and releases them under its send lock (`take`,
  `release_all`).
"""

from __future__ import annotations

from collections import deque

from .registry import Lingering, forget, starts_of

__all__ = ["LINGER_ANY", "LINGER_MAX", "LINGER_SMALL", "Linger", "Lingering"]

LINGER_ANY = 64  # lingering mappings of any size per Device
LINGER_SMALL = 64 << 10  # past those, only mappings of at most this many bytes
LINGER_MAX = 4096  # lingering mappings per Device at most


class Linger:
    """The lingering mappings of one Device."""

    def __init__(self) -> None:
        self.arrived: deque[Lingering] = deque()  # appended by callbacks only
        self.open = True  # False once the Device closes: mappings dying then just go
        self._filed: dict[int, Lingering] = {}  # by address, oldest first
        self._by_length: dict[int, list[int]] = {}  # whole writable mappings of objects: length -> addresses

    def __bool__(self) -> bool:
        return bool(self.arrived or self._filed)

    def __del__(self) -> None:  # a Device dropped unclosed: its lingering mappings go with it
        for item in [*self.arrived, *self._filed.values()]:
            forget(item.entry)

    def room(self, length: int) -> bool:
        """Whether one more mapping, of `length` bytes, may linger (asked by callbacks: reads only)."""
        count = len(self.arrived) + len(self._filed)
        return self.open and (count < LINGER_ANY or (count < LINGER_MAX and length <= LINGER_SMALL))

    def take(self, key: tuple[int, int], offset: int, length: int, writable: bool) -> Lingering | None:
        """Take back a lingering mapping of bytes [offset, offset + length) of the memfd `key`
        (writable if asked), if there is one (the caller holds the send lock)."""
        if self.arrived:
            self._file()
        filed = self._filed
        for address in starts_of(key):  # (its entry stays in the registry: client/registry.py)
            item = filed.get(address)
            if item is not None:
                entry = item.entry
                if entry.offset <= offset and offset + length <= entry.offset + entry.length \
                        and (entry.writable or not writable):
                    return self._pop(address)
        return None

    def take_at(self, address: int) -> Lingering | None:
        """Take back the lingering mapping at `address`, if it lingers (the caller holds the send lock)."""
        if self.arrived:
            self._file()
        item = self._filed.pop(address, None)
        if item is not None and item.entry.made:
            self._unlength(item)
        return item

    def take_whole(self, length: int) -> Lingering | None:
        """Take back the newest lingering writable mapping of a whole object of `length` bytes
        (one a Device made: `ugem.array` asks the manager whether it may reuse it), if any (the
        caller holds the send lock)."""
        self._file()
        addresses = self._by_length.get(length)
        return self._pop(addresses[-1]) if addresses else None

    def release_all(self) -> list[int]:
        """Unmap every lingering mapping and forget its entry; their ids, to release (the caller
        holds the send lock)."""
        self._file()
        items = list(self._filed.values())
        self._filed.clear()
        self._by_length.clear()
        return [_unmap(item) for item in items]

    def close(self) -> None:
        """The Device closes (its manager releases everything): unmap them all, linger no more."""
        self.open = False
        self.release_all()

    def _file(self) -> None:
        arrived = self.arrived
        while arrived:
            item = arrived.popleft()  # (only this thread takes: the caller holds the send lock)
            entry = item.entry
            self._filed[entry.address] = item
            if entry.made:
                self._by_length.setdefault(entry.length, []).append(entry.address)

    def _pop(self, address: int) -> Lingering:
        item = self._filed.pop(address)
        if item.entry.made:
            self._unlength(item)
        return item

    def _unlength(self, item: Lingering) -> None:
        same = self._by_length[item.entry.length]
        same.remove(item.entry.address)
        if not same:
            del self._by_length[item.entry.length]


def _unmap(item: Lingering) -> int:
    forget(item.entry)
    assert item.region is not None  # (a lingering one keeps its mapping)
    item.region.close()  # no view of it is left: its last one died before it lingered
    return item.entry.map_id
