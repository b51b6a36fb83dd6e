"""The range allocator (drm_mm): hands out ``[start, start + size)`` ranges of one address space.

Purpose
    `RangeAllocator` tracks which parts of a linear range (a simulated VRAM aperture, a GTT)
    are taken by nodes (`Node`) and which are holes, and places new nodes by an `InsertMode`.
    Eviction is a separate, small protocol in `ugem.mm.scan` (drm_mm's "lru scan roster").

Rules
    - Nodes and holes tile ``[start, end)`` exactly, in address order; two holes are never
      adjacent (removing a node merges it with the holes on both sides). `_check()` asserts
      all of this; tests run it after every step, and ``debug=True`` runs it after every
      mutation (tests/unit/mm/test_range.py; the core's allocators run without it).
    - A request that cannot be placed raises `NoSpace` (ENOSPC): size 0, no hole fits, or a
      reserve that is not inside one hole. A malformed request (empty range, negative
      alignment) raises `InvalidArgument` (EINVAL).
    - Misuse is a bug, not an error, and raises `AssertionError` even under ``python -O``:
      removing a node this allocator does not hold, or mutating while an `EvictionScan`
      holds nodes (drm_mm: "no other operation is allowed while a scan is active").
    - `Node.owner` is opaque: the allocator never looks at it. Callers must not change a
      node's ``start`` or ``size``.

Must not
    Know about buffer objects or policy, allocate memory, evict anything by itself, take
    locks (one event loop owns it), or do I/O (tests/unit/test_layering.py checks imports).

Indexes, and why they look like this (drm_mm uses three rbtrees and a list)
    ``_holes``        dict hole start -> hole end. Its insertion order *is* drm_mm's
                      ``hole_stack``: every hole created (by a split or a merge) is
                      inserted last, so `InsertMode.EVICT` walks it reversed. One dict
                      serves address lookup and recency; do not "sort" it.
    ``_hole_at_end``  dict hole end -> hole start, so `remove` finds both neighbours in O(1).
    ``_by_addr``      sorted list of hole starts: bisect for LOW, HIGH and `reserve`.
    ``_by_size``      sorted list of (size, start): bisect for BEST; ties go to the lower
                      address (drm_mm breaks ties by age; ours is deterministic).
    ``_nodes`` / ``_node_addrs``  dict start -> Node, and the sorted starts for ordered
                      iteration and `nodes_in_range`.

Costs (n holes, m nodes)
    Finding the first candidate hole is O(log n) comparisons (EVICT: O(1), the newest
    hole). Like drm_mm, the search then walks further candidates while alignment or the
    range rejects them, so an aligned request in a fragmented space can visit many holes
    (a 4096-aligned request among 10^4 odd-sized holes: about 0.3 ms). `reserve` is
    O(log n). Every insert, reserve or remove touches at most three holes: O(1) dict work
    plus bisect-located list inserts/deletes, each a C memmove of O(n) (or O(m)) pointers;
    microseconds at 10^5 entries, and a balanced tree would need a third-party package.
    Iteration is O(m); `nodes_in_range` O(log m + k); totals O(1); `_check` O(n log n).
"""

from __future__ import annotations

import bisect
import enum
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, TypeVar

from ..errors import InvalidArgument, NoSpace

if TYPE_CHECKING:
    from .scan import EvictionScan

__all__ = ["InsertMode", "Node", "RangeAllocator", "fit_in_hole"]

OwnerT = TypeVar("OwnerT")


class InsertMode(enum.Enum):
    """Where `RangeAllocator.insert` looks first (drm_mm_insert_mode)."""

    BEST = "best"  # smallest hole that fits; place at its bottom
    LOW = "low"  # lowest-addressed hole that fits; place at its bottom
    HIGH = "high"  # highest-addressed hole that fits; place at its top, start aligned down
    EVICT = "evict"  # most recently created hole first (right after an EvictionScan); bottom


@dataclass(eq=False, slots=True)
class Node(Generic[OwnerT]):
    """One allocated range. Created by `RangeAllocator`; compare by identity."""

    start: int
    size: int
    owner: OwnerT | None = None
    _allocator: RangeAllocator[OwnerT] | None = field(default=None, repr=False, init=False)
    _scanned: bool = field(default=False, repr=False, init=False)

    @property
    def end(self) -> int:
        """One past the last address of the node."""
        return self.start + self.size

    @property
    def allocated(self) -> bool:
        """True from insert/reserve until remove."""
        return self._allocator is not None


def fit_in_hole(
    hole_start: int, hole_end: int, size: int, alignment: int, mode: InsertMode, range_start: int, range_end: int
) -> int | None:
    """Return where a node of `size` goes in a hole, or None if it does not fit.

    The hole is first clipped to the range. HIGH takes the top of what is left and aligns the
    start down; every other mode takes the bottom and aligns the start up (drm_mm). Alignment
    is absolute (relative to address 0), and any positive value works, not only powers of 2.
    """
    lo = max(hole_start, range_start)
    hi = min(hole_end, range_end)
    if hi - lo < size:
        return None
    if mode is InsertMode.HIGH:
        start = hi - size
        start -= start % alignment
        return start if start >= lo else None
    start = lo + (-lo) % alignment
    return start if start + size <= hi else None


class RangeAllocator(Generic[OwnerT]):
    """Allocate ranges of ``[start, start + size)``; see the module docstring for the rules."""

    def __init__(self, start: int, size: int, *, debug: bool = False) -> None:
        if start < 0 or size <= 0:
            raise InvalidArgument(f"range allocator needs start >= 0 and size > 0, got {start}+{size}")
        self.start = start
        self.end = start + size
        self._debug = debug
        self._holes: dict[int, int] = {}
        self._hole_at_end: dict[int, int] = {}
        self._by_addr: list[int] = []
        self._by_size: list[tuple[int, int]] = []
        self._nodes: dict[int, Node[OwnerT]] = {}
        self._node_addrs: list[int] = []
        self._used = 0
        # The scan holding nodes right now and how many; mutations are refused while set.
        self._scan: EvictionScan[OwnerT] | None = None
        self._scanned = 0
        self._add_hole(start, self.end)

    # -- totals and iteration ------------------------------------------------------------

    @property
    def size(self) -> int:
        """The size of the whole managed range."""
        return self.end - self.start

    @property
    def used(self) -> int:
        """Bytes (units) taken by nodes."""
        return self._used

    @property
    def free(self) -> int:
        """Bytes (units) in holes; ``used + free == size`` always."""
        return self.end - self.start - self._used

    def __len__(self) -> int:
        return len(self._nodes)

    def __iter__(self) -> Iterator[Node[OwnerT]]:
        """The nodes in address order. Do not mutate the allocator while iterating."""
        for start in self._node_addrs:
            yield self._nodes[start]

    def holes(self) -> Iterator[tuple[int, int]]:
        """The holes as ``(start, end)`` in address order."""
        for start in self._by_addr:
            yield start, self._holes[start]

    def nodes_in_range(self, start: int, end: int) -> Iterator[Node[OwnerT]]:
        """The nodes overlapping ``[start, end)``, in address order (drm_mm_for_each_node_in_range)."""
        addrs = self._node_addrs
        i = bisect.bisect_right(addrs, start) - 1
        if i < 0 or self._nodes[addrs[i]].end <= start:
            i += 1
        while i < len(addrs) and addrs[i] < end:
            yield self._nodes[addrs[i]]
            i += 1

    # -- mutations -----------------------------------------------------------------------

    def insert(
        self,
        size: int,
        *,
        alignment: int = 1,
        mode: InsertMode = InsertMode.BEST,
        range_start: int | None = None,
        range_end: int | None = None,
        owner: OwnerT | None = None,
    ) -> Node[OwnerT]:
        """Place a new node of `size` inside ``[range_start, range_end)`` (default: everywhere).

        Returns the node, which the caller owns until it passes it to `remove`.
        Raises `NoSpace` if size <= 0 or no hole fits; `InvalidArgument` for an empty range
        or a negative alignment (0 and 1 both mean "no alignment").
        """
        self._refuse_during_scan("insert")
        lo = self.start if range_start is None else range_start
        hi = self.end if range_end is None else range_end
        if lo >= hi:
            raise InvalidArgument(f"empty range [{lo:#x}, {hi:#x})")
        if alignment < 0:
            raise InvalidArgument(f"negative alignment {alignment}")
        alignment = max(alignment, 1)
        if size <= 0 or hi - lo < size:
            raise NoSpace(f"cannot place {size} in [{lo:#x}, {hi:#x})")
        for hole_start, hole_end in self._candidates(mode, size, lo, hi):
            start = fit_in_hole(hole_start, hole_end, size, alignment, mode, lo, hi)
            if start is not None:
                # Safe: the candidate generator is never resumed after _place changes the indexes.
                return self._place(hole_start, hole_end, start, size, owner)
        raise NoSpace(f"no hole fits {size} (alignment {alignment}, {mode.name}) in [{lo:#x}, {hi:#x})")

    def reserve(self, start: int, size: int, owner: OwnerT | None = None) -> Node[OwnerT]:
        """Place a node at a fixed ``[start, start + size)`` (drm_mm_reserve_node: softpin, firmware).

        Raises `NoSpace` if size <= 0 or the range is not inside one hole.
        """
        self._refuse_during_scan("reserve")
        if size <= 0:
            raise NoSpace(f"cannot reserve {size} at {start:#x}")
        i = bisect.bisect_right(self._by_addr, start) - 1
        if i >= 0:
            hole_start = self._by_addr[i]
            hole_end = self._holes[hole_start]
            if start + size <= hole_end:
                return self._place(hole_start, hole_end, start, size, owner)
        raise NoSpace(f"[{start:#x}, {start + size:#x}) is not inside one hole")

    def remove(self, node: Node[OwnerT]) -> None:
        """Give a node's range back, merging it with the holes on either side."""
        self._refuse_during_scan("remove")
        start, end = node.start, node.end
        if node._allocator is not self or self._nodes.get(start) is not node:
            raise AssertionError(f"remove of a node this allocator does not hold: {node!r}")
        lo, hi = start, end
        left = self._hole_at_end.get(start)
        if left is not None:
            self._remove_hole(left)
            lo = left
        right = self._holes.get(end)
        if right is not None:
            self._remove_hole(end)
            hi = right
        self._add_hole(lo, hi)  # the merged hole goes on top of the hole stack (EVICT)
        del self._nodes[start]
        del self._node_addrs[bisect.bisect_left(self._node_addrs, start)]
        self._used -= node.size
        node._allocator = None
        if self._debug:
            self._check()

    # -- debugging -----------------------------------------------------------------------

    def dump(self) -> str:
        """Every node and hole in address order, then the totals (drm_mm_print)."""
        lines = []
        addr = self.start
        while addr < self.end:
            hole_end = self._holes.get(addr)
            if hole_end is not None:
                lines.append(f"{addr:#018x}-{hole_end:#018x}: {hole_end - addr}: free")
                addr = hole_end
                continue
            node = self._nodes.get(addr)
            if node is None:  # only on a corrupt allocator; dump() must still help debug it
                lines.append(f"{addr:#018x}: neither a node nor a hole starts here (corrupt)")
                break
            mark = " (scanned)" if node._scanned else ""
            lines.append(f"{addr:#018x}-{node.end:#018x}: {node.size}: used{mark} owner={node.owner!r}")
            addr = node.end
        lines.append(f"total: {self.size}, used {self.used} free {self.free}")
        return "\n".join(lines)

    def _check(self) -> None:
        """Assert every invariant; O(n log n). Run by tests and with ``debug=True``."""
        assert self.start < self.end
        addr, used, after_hole, nodes, scanned = self.start, 0, False, 0, 0
        while addr < self.end:
            if addr in self._holes:
                end = self._holes[addr]
                assert end > addr, f"empty hole at {addr:#x}"
                assert not after_hole, f"two adjacent holes meet at {addr:#x}"
                after_hole = True
            else:
                node = self._nodes.get(addr)
                assert node is not None, f"{addr:#x} starts neither a node nor a hole\n{self.dump()}"
                assert node._allocator is self and node.start == addr and node.size > 0, node
                end, after_hole = node.end, False
                used, nodes, scanned = used + node.size, nodes + 1, scanned + node._scanned
            addr = end
        assert addr == self.end, f"the last node or hole overruns the range to {addr:#x}"
        assert nodes == len(self._nodes) == len(self._node_addrs), "a node is not on the address walk"
        assert used == self._used and self.used + self.free == self.size
        assert self._node_addrs == sorted(self._nodes)
        assert self._hole_at_end == {end: start for start, end in self._holes.items()}
        assert self._by_addr == sorted(self._holes)
        assert self._by_size == sorted((end - start, start) for start, end in self._holes.items())
        assert scanned == self._scanned and (self._scan is None) == (scanned == 0)

    # -- internals -----------------------------------------------------------------------

    def _candidates(self, mode: InsertMode, size: int, lo: int, hi: int) -> Iterator[tuple[int, int]]:
        """Holes in the order `mode` tries them (drm_mm first_hole/next_hole: one match)."""
        holes, by_addr = self._holes, self._by_addr
        match mode:
            case InsertMode.BEST:
                by_size = self._by_size
                for i in range(bisect.bisect_left(by_size, (size,)), len(by_size)):
                    hole_size, start = by_size[i]
                    yield start, start + hole_size
            case InsertMode.LOW:
                first = bisect.bisect_right(by_addr, lo) - 1
                if first < 0 or holes[by_addr[first]] <= lo:
                    first += 1  # the hole before lo ends before it: start at the next one
                for i in range(first, len(by_addr)):
                    if by_addr[i] >= hi:
                        return
                    yield by_addr[i], holes[by_addr[i]]
            case InsertMode.HIGH:
                for i in range(bisect.bisect_left(by_addr, hi) - 1, -1, -1):
                    if holes[by_addr[i]] <= lo:
                        return
                    yield by_addr[i], holes[by_addr[i]]
            case InsertMode.EVICT:
                for start in reversed(holes):
                    yield start, holes[start]

    def _place(self, hole_start: int, hole_end: int, start: int, size: int, owner: OwnerT | None) -> Node[OwnerT]:
        """Split a hole around a new node; the leftover top part becomes the newest hole."""
        end = start + size
        self._remove_hole(hole_start)
        if start > hole_start:
            self._add_hole(hole_start, start)
        if end < hole_end:
            self._add_hole(end, hole_end)
        node: Node[OwnerT] = Node(start, size, owner)
        node._allocator = self
        self._nodes[start] = node
        bisect.insort(self._node_addrs, start)
        self._used += size
        if self._debug:
            self._check()
        return node

    def _add_hole(self, start: int, end: int) -> None:
        self._holes[start] = end  # inserted last: the top of the hole stack
        self._hole_at_end[end] = start
        bisect.insort(self._by_addr, start)
        bisect.insort(self._by_size, (end - start, start))

    def _remove_hole(self, start: int) -> None:
        end = self._holes.pop(start)
        del self._hole_at_end[end]
        del self._by_addr[bisect.bisect_left(self._by_addr, start)]
        del self._by_size[bisect.bisect_left(self._by_size, (end - start, start))]

    def _refuse_during_scan(self, what: str) -> None:
        if self._scan is not None:
            raise AssertionError(f"{what} while an eviction scan holds {self._scanned} nodes")

    # -- the EvictionScan's view (ugem.mm.scan only) --------------------------------------

    def _hole_ending_at(self, addr: int) -> int | None:
        """Start of the hole that ends at `addr`, if any."""
        return self._hole_at_end.get(addr)

    def _hole_starting_at(self, addr: int) -> int | None:
        """End of the hole that starts at `addr`, if any."""
        return self._holes.get(addr)

    def _scan_take(self, scan: EvictionScan[OwnerT], node: Node[OwnerT]) -> None:
        """Mark `node` as held by `scan`; only one scan may hold nodes at a time."""
        if node._allocator is not self or self._nodes.get(node.start) is not node:
            raise AssertionError(f"scan of a node this allocator does not hold: {node!r}")
        if node._scanned:
            raise AssertionError(f"node added to a scan twice: {node!r}")
        if self._scan is not None and self._scan is not scan:
            raise AssertionError("another eviction scan is active on this allocator")
        node._scanned = True
        self._scan = scan
        self._scanned += 1

    def _scan_release(self, scan: EvictionScan[OwnerT], node: Node[OwnerT]) -> None:
        assert self._scan is scan and node._scanned
        node._scanned = False
        self._scanned -= 1
        if self._scanned == 0:
            self._scan = None
