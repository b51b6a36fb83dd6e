"""Eviction scan (drm_mm "lru scan roster"): find the fewest nodes whose eviction opens a hole.

Purpose
    Evicting from the LRU head until an insert fits throws out far too much: the freed
    ranges are scattered. Instead, offer candidates one at a time; the scan pretends each is
    free and reports as soon as some contiguous free stretch can take the request::

        scan = EvictionScan(allocator, size, alignment=..., mode=...)
        roster = []
        for node in candidates_oldest_first:          # e.g. an Lru, skipping pinned nodes
            roster.append(node)
            if scan.add(node):
                break
        victims = [node for node in reversed(roster) if scan.remove(node)]
        scan.finish()
        for node in victims:                           # now evict them for real
            allocator.remove(node)
        node = allocator.insert(size, alignment=..., mode=InsertMode.EVICT)

Rules
    - `remove` must be called for every added node in EXACTLY the reverse order of `add`;
      anything else raises AssertionError (drm_mm would silently corrupt itself).
    - While the scan holds nodes, the allocator refuses insert, reserve and remove, and no
      second scan may add nodes. `finish()` asserts that every node was handed back.
    - After the last `remove`, the allocator is exactly as before the scan: the scan never
      touches the allocator's indexes, only a per-node "scanned" mark and a counter.
    - `add` returns True when the free stretch around *this* node can take the request, and
      records it as ``hit_start``/``hit_end`` (a later success overwrites it). `remove`
      returns True for the nodes overlapping the hit: exactly the ones to evict.

Must not
    Evict anything itself, know about buffer objects or pins (the caller chooses the
    candidates), or do I/O.

How it works, and what it costs
    The scan keeps its own map of "virtual holes": maximal stretches made of real holes and
    scanned nodes. A virtual hole always swallows the real holes at both of its ends, so a
    newly added node can only touch a virtual hole exactly at its own start or end, or a real
    hole there. `add` is therefore a few dict lookups, O(1), and logs what it merged;
    `remove` pops that log entry and undoes the merge, O(1). Total O(scanned nodes).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType
from typing import Generic

from ..errors import InvalidArgument, NoSpace
from .range import InsertMode, Node, OwnerT, RangeAllocator, fit_in_hole

__all__ = ["EvictionScan"]


@dataclass(frozen=True, slots=True)
class _Step(Generic[OwnerT]):
    """What one `add` did, so `remove` can undo it: the node, the virtual hole it built,
    and the virtual holes it swallowed on either side."""

    node: Node[OwnerT]
    start: int
    end: int
    left: tuple[int, int] | None
    right: tuple[int, int] | None


class EvictionScan(Generic[OwnerT]):
    """One eviction scan over `allocator` for a request of `size` (drm_mm_scan_init_with_range).

    The request parameters mean what they mean for `RangeAllocator.insert`; `mode` only
    matters as HIGH (take the top of a stretch) or not. Raises `NoSpace` for a request that
    can never fit (size <= 0 or larger than the range), `InvalidArgument` for an empty range
    or a negative alignment.
    """

    def __init__(
        self,
        allocator: RangeAllocator[OwnerT],
        size: int,
        *,
        alignment: int = 1,
        mode: InsertMode = InsertMode.BEST,
        range_start: int | None = None,
        range_end: int | None = None,
    ) -> None:
        if allocator._scan is not None:
            raise AssertionError("another eviction scan is active on this allocator")
        lo = allocator.start if range_start is None else range_start
        hi = allocator.end if range_end is None else range_end
        if lo >= hi:
            raise InvalidArgument(f"empty range [{lo:#x}, {hi:#x})")
        if alignment < 0:
            raise InvalidArgument(f"negative alignment {alignment}")
        if size <= 0 or size > hi - lo:
            raise NoSpace(f"a scan for {size} in [{lo:#x}, {hi:#x}) can never succeed")
        self.allocator = allocator
        self.size = size
        self.alignment = max(alignment, 1)
        self.mode = mode
        self.range_start = lo
        self.range_end = hi
        self.hit_start: int | None = None
        self.hit_end: int | None = None
        self._steps: list[_Step[OwnerT]] = []
        self._end_of: dict[int, int] = {}  # virtual hole start -> end
        self._start_of: dict[int, int] = {}  # virtual hole end -> start

    @property
    def found(self) -> bool:
        """True once some `add` found room; ``hit_start``/``hit_end`` say where."""
        return self.hit_start is not None

    def __len__(self) -> int:
        """How many nodes the scan holds (added and not yet removed)."""
        return len(self._steps)

    def add(self, node: Node[OwnerT]) -> bool:
        """Pretend `node` is free (drm_mm_scan_add_block).

        Returns True if the stretch of free space around `node` (real holes plus scanned
        nodes) can now take the request; the placement is recorded as the hit.
        """
        self.allocator._scan_take(self, node)
        start, end = node.start, node.end
        left = right = None
        if start in self._start_of:  # a virtual hole ends where this node starts
            left = (self._start_of.pop(start), start)
            del self._end_of[left[0]]
            start = left[0]
        else:
            hole_start = self.allocator._hole_ending_at(start)
            start = start if hole_start is None else hole_start
        if end in self._end_of:  # a virtual hole starts where this node ends
            right = (end, self._end_of.pop(end))
            del self._start_of[right[1]]
            end = right[1]
        else:
            hole_end = self.allocator._hole_starting_at(end)
            end = end if hole_end is None else hole_end
        self._end_of[start] = end
        self._start_of[end] = start
        self._steps.append(_Step(node, start, end, left, right))
        hit = fit_in_hole(start, end, self.size, self.alignment, self.mode, self.range_start, self.range_end)
        if hit is None:
            return False
        self.hit_start, self.hit_end = hit, hit + self.size
        return True

    def remove(self, node: Node[OwnerT]) -> bool:
        """Hand `node` back (drm_mm_scan_remove_block); call in exactly the reverse order of `add`.

        Returns True if `node` overlaps the hit and must be evicted; always False when no
        hit was found.
        """
        if not self._steps:
            raise AssertionError(f"EvictionScan.remove of a node that was never added: {node!r}")
        step = self._steps[-1]
        if step.node is not node:
            raise AssertionError(
                f"EvictionScan.remove must be called in exactly the reverse order of add: "
                f"expected {step.node!r}, got {node!r}"
            )
        self._steps.pop()
        del self._end_of[step.start]
        del self._start_of[step.end]
        for piece in (step.left, step.right):
            if piece is not None:
                self._end_of[piece[0]] = piece[1]
                self._start_of[piece[1]] = piece[0]
        self.allocator._scan_release(self, node)
        if self.hit_start is None or self.hit_end is None:
            return False
        return node.start < self.hit_end and node.end > self.hit_start

    def finish(self) -> None:
        """Assert the scan ended cleanly: every added node was removed again."""
        if self._steps:
            raise AssertionError(f"eviction scan finished while holding {len(self._steps)} nodes")
        assert not self._end_of and not self._start_of

    def __enter__(self) -> EvictionScan[OwnerT]:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.finish()
