"""FakeBackingStore: a `BackingStore` in plain Python memory, for core tests without memfds.

With a `FakeGpu`, it lets a test build a `Core` (or drive `Memory` and the reclaim
engine) with no Manager, daemon, fd or file: `Core(config, FakeBackingStore(), FakeGpu())`.

Rules (the parts of the memfd store's behaviour the core's policy depends on):
- a backing is a `FakeBacking`: `size` zero bytes and a set of allocated pages; `write`
  allocates the pages it touches, `purge` frees them all. Pages written through `map()`
  (the device working in place, a test standing in for a client's mapping) count as
  allocated once they hold a nonzero byte, when next measured;
- `open_count` counts backings created and not released; `max_open` (default: no limit
  that a test would reach) bounds them, as the fd limit bounds memfds;
- nothing is pooled for reuse (`release` always frees; the pool needs real memfds, so
  tests of recycling use the MemfdStore);
- spill storage holds `spill_capacity` bytes; an extent is reserved for the data an
  object holds; `spill_out`/`spill_in` copy the allocated pages only (holes stay holes)
  and return the bytes copied; `fail_spills` makes the next copies fail with that OSError.
- fds (`open_description`, `scratch`, `inspect`, `adopt`, `map_range`) are not faked:
  they raise NotImplementedError, so a test that needs them uses the real MemfdStore.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..backing.base import Inspection
from ..constants import PAGE_SIZE
from ..errors import OutOfMemory
from ..fd import OwnedFd

__all__ = ["FakeBacking", "FakeBackingStore", "FakeExtent"]

_ids = itertools.count(1)


@dataclass(eq=False)
class FakeBacking:
    size: int
    data: bytearray = field(init=False)
    pages: set[int] = field(default_factory=set)  # allocated page indexes
    ident: int = field(default_factory=lambda: next(_ids))

    def __post_init__(self) -> None:
        self.data = bytearray(self.size)

    def measure(self) -> int:
        view = memoryview(self.data)
        for page in range(-(-self.size // PAGE_SIZE)):
            if page not in self.pages and any(view[page * PAGE_SIZE:(page + 1) * PAGE_SIZE]):
                self.pages.add(page)
        return len(self.pages) * PAGE_SIZE


@dataclass(eq=False)
class FakeExtent:
    nbytes: int  # reserved
    pages: dict[int, bytes] = field(default_factory=dict)


class FakeBackingStore:
    def __init__(self, *, max_open: int = 1 << 20, spill_capacity: int = 1 << 40) -> None:
        self.open_count = 0
        self.pooled_bytes = self.pooled_fds = self.recycled = 0
        self.max_open = max_open
        self.limit_text = f"the limit of {max_open} object memfds"
        self.spill_capacity = spill_capacity
        self.spill_used = 0
        self.fail_spills: OSError | None = None  # the error the next spill copies fail with

    # -- lifetime and I/O ------------------------------------------------------------

    def create(self, size: int, uid: int | None = None) -> FakeBacking:
        self.open_count += 1
        return FakeBacking(size)

    def release(self, backing: FakeBacking, uid: int | None = None, room: int = 0) -> None:
        self.open_count -= 1

    def has_pooled(self, size: int, uid: int) -> bool:
        return False

    def clear(self, entry: Any) -> int:
        raise AssertionError("FakeBackingStore pools nothing")

    def zeroed(self, entry: Any, error: OSError | None) -> None:
        raise AssertionError("FakeBackingStore pools nothing")

    def drop_pooled(self, nbytes: int = 0, fds: int = 0) -> tuple[int, int]:
        return 0, 0

    def expire_pooled(self) -> None:
        pass

    def close_later(self, later: Callable[[Callable[[], None]], None]) -> None:
        pass

    def key(self, backing: FakeBacking) -> tuple[int, int]:
        return (0, backing.ident)

    def read(self, backing: FakeBacking, offset: int, into: Any) -> None:
        view = memoryview(into).cast("B")
        view[:] = backing.data[offset:offset + len(view)]

    def write(self, backing: FakeBacking, offset: int, data: Any) -> None:
        view = memoryview(data).cast("B")
        backing.data[offset:offset + len(view)] = view
        backing.pages.update(range(offset // PAGE_SIZE, -(-(offset + len(view)) // PAGE_SIZE)))

    def resident_bytes(self, backing: FakeBacking) -> int:
        return backing.measure()

    def missing_bytes(self, backing: FakeBacking, offset: int, length: int) -> int:
        backing.measure()
        touched = range(offset // PAGE_SIZE, -(-(offset + length) // PAGE_SIZE))
        return sum(PAGE_SIZE for p in touched if p not in backing.pages)

    def holes(self, backing: FakeBacking) -> tuple[tuple[int, int], ...]:
        backing.measure()
        return tuple((p * PAGE_SIZE, PAGE_SIZE) for p in range(-(-backing.size // PAGE_SIZE))
                     if p not in backing.pages)

    def close(self) -> None:
        assert self.open_count == 0, f"{self.open_count} backings still open"

    @staticmethod
    def zero(into: Any) -> None:
        memoryview(into).cast("B")[:] = bytes(len(memoryview(into).cast("B")))

    def purge(self, backing: FakeBacking) -> None:
        backing.data[:] = bytes(backing.size)
        backing.pages.clear()

    def populate_all(self, backing: FakeBacking) -> None:
        backing.pages.update(range(-(-backing.size // PAGE_SIZE)))

    def map(self, backing: FakeBacking) -> memoryview:
        return memoryview(backing.data)

    @staticmethod
    def device_file(backing: FakeBacking) -> None:
        return None  # no fd: the device writes through map()

    # -- spill storage ---------------------------------------------------------------

    def spill_free(self) -> int:
        return self.spill_capacity - self.spill_used

    def spill_reserve(self, nbytes: int) -> FakeExtent:
        if nbytes > self.spill_free():
            raise OutOfMemory(f"spill storage is full ({self.spill_used} of {self.spill_capacity} bytes used)")
        self.spill_used += nbytes
        return FakeExtent(nbytes)

    def spill_punch(self, extent: FakeExtent) -> int:
        extent.pages.clear()
        return extent.nbytes

    def spill_release(self, extent: FakeExtent) -> None:
        self.spill_used -= extent.nbytes

    def spill_out(self, backing: FakeBacking, extent: FakeExtent, size: int) -> int:
        if self.fail_spills is not None:
            raise self.fail_spills
        backing.measure()
        for page in backing.pages:
            extent.pages[page] = bytes(backing.data[page * PAGE_SIZE:(page + 1) * PAGE_SIZE])
        return len(extent.pages) * PAGE_SIZE

    def spill_in(self, extent: FakeExtent, backing: FakeBacking, size: int) -> int:
        for page, data in extent.pages.items():
            self.write(backing, page * PAGE_SIZE, data)
        return len(extent.pages) * PAGE_SIZE

    # -- fds: not faked ----------------------------------------------------------------

    def scratch(self, size: int) -> OwnedFd:
        raise NotImplementedError("FakeBackingStore has no fds: use MemfdStore")

    def open_description(self, backing: Any, writable: bool) -> OwnedFd:
        raise NotImplementedError("FakeBackingStore has no fds: use MemfdStore")

    def map_range(self, fd: OwnedFd, offset: int, length: int, writable: bool) -> Any:
        raise NotImplementedError("FakeBackingStore has no fds: use MemfdStore")

    def buffer_view(self, buffer: Any) -> Any:
        raise NotImplementedError("FakeBackingStore has no fds: use MemfdStore")

    def inspect(self, fd: OwnedFd, whole: bool = True) -> Inspection:
        raise NotImplementedError("FakeBackingStore has no fds: use MemfdStore")

    def adopt(self, fd: OwnedFd, inspection: Inspection) -> Any:
        raise NotImplementedError("FakeBackingStore has no fds: use MemfdStore")
