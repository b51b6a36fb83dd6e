"""IdAllocator: lowest-free integer ids from 1 (Linux idr_alloc(start=1) semantics).

Handles (per client) and names (per manager) both use it. Freed ids go into a min-heap;
the lowest free id is the heap's minimum if any, else the next never-used id. Every heap
entry is below `_next`, so this is exactly "lowest free". alloc/free are O(log n), which
keeps the tables O(1)-ish at a million entries. 0 is never handed out.
"""

from __future__ import annotations

import heapq

__all__ = ["IdAllocator"]


class IdAllocator:
    __slots__ = ("_next", "_free", "_limit")

    def __init__(self, limit: int = 2**31 - 1) -> None:
        self._next = 1
        self._free: list[int] = []
        self._limit = limit

    def alloc(self) -> int:
        if self._free:
            return heapq.heappop(self._free)
        if self._next > self._limit:
            raise OverflowError("id space exhausted")
        ident = self._next
        self._next += 1
        return ident

    def free(self, ident: int) -> None:
        heapq.heappush(self._free, ident)

    def __len__(self) -> int:
        """Number of ids currently allocated."""
        return self._next - 1 - len(self._free)
