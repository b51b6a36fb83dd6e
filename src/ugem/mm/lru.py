"""Least-recently-used lists for the shrinker (drm_gem_lru).

Purpose
    An `Lru` orders items (buffer objects, to the core) from least to most recently used
    and keeps a running total of their weights (pages). `Lru.scan` is the shrinker's
    walk: from the head, offer each item to a ``shrink`` callback until enough weight is
    freed (drm_gem_lru_scan).

Rules
    - An item is on at most one LRU of a family. LRUs built with ``shares_with=`` form a
      family (drm: LRUs that share one lock); `move_tail` onto one takes the item off
      whichever other one it was on (drm moves objects between "willneed", "dontneed" and
      "unbacked" lists so). The core uses single LRUs today: Memory's resident objects
      (core/memory.py) and Gpu's unpinned VRAM objects (core/gpu.py).
    - An item's weight is read once, when it joins an LRU, and is what `count` and
      `scan` use until it leaves, so a shrink that empties the item cannot skew the totals.
    - A shrink callback that returns True must have taken the item off this LRU (moved it
      to another LRU of the family, or removed it); `scan` asserts this, even under -O.
      Items the callback refuses keep their relative order and go to the tail once the
      walk ends, so one scan never offers the same item twice; with ``rotate=False`` they
      go back to the head instead (a walk that does not age them: the reclaim engine runs
      several passes over one LRU, each in least-recently-used order). ``until`` ends
      the walk early once it returns True (progress measured by the caller, in bytes).
    - Items are identified by ``id()``; the LRU holds a strong reference, so an id cannot
      be reused while the item is on it. `scan` is not re-entrant.

Must not
    Decide policy (which items are purgeable, pinned or idle: the callback decides), call
    into the backing store, take locks, or do I/O.

Costs
    `move_tail`, `remove`, `discard`, membership and `count` are O(1) (an OrderedDict per
    LRU plus one id -> LRU dict per family); iteration is O(n); `scan` is O(items offered).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

__all__ = ["Lru"]

T = TypeVar("T")


def _one(_item: object) -> int:
    return 1


class Lru(Generic[T]):
    """An LRU of items with weights; iteration starts at the least recently used."""

    def __init__(self, *, weight: Callable[[T], int] = _one, shares_with: Lru[T] | None = None) -> None:
        self._weight = weight
        self._items: OrderedDict[int, tuple[T, int]] = OrderedDict()
        # Items a running scan has offered and the callback refused; spliced back at the end.
        self._skipped: OrderedDict[int, tuple[T, int]] | None = None
        self._count = 0
        # id(item) -> the LRU of this family that holds it; one dict shared by the family.
        self._where: dict[int, Lru[T]] = {} if shares_with is None else shares_with._where

    @property
    def count(self) -> int:
        """The total weight of the items on this LRU (drm_gem_lru.count: pages)."""
        return self._count

    def __len__(self) -> int:
        return len(self._items) + (len(self._skipped) if self._skipped is not None else 0)

    def __contains__(self, item: object) -> bool:
        return self._where.get(id(item)) is self

    def __iter__(self) -> Iterator[T]:
        """Items from least to most recently used. Do not mutate the LRU while iterating."""
        for item, _weight in self._items.values():
            yield item
        if self._skipped is not None:
            for item, _weight in self._skipped.values():
                yield item

    def move_tail(self, item: T) -> None:
        """Mark `item` most recently used here, taking it off any other LRU of the family."""
        key = id(item)
        holder = self._where.get(key)
        if holder is self and key in self._items:
            self._items.move_to_end(key)
            return
        if holder is self:
            entry = self._take(key)  # parked by a running scan: back into the walk order
        else:
            if holder is not None:
                holder._take(key)
            entry = (item, self._weight(item))
        self._items[key] = entry
        self._count += entry[1]
        self._where[key] = self

    def remove(self, item: T) -> None:
        """Take `item` off this LRU. Raises KeyError if it is not on this LRU."""
        if self._where.get(id(item)) is not self:
            raise KeyError(item)
        self._take(id(item))

    def discard(self, item: T) -> bool:
        """Take `item` off whichever LRU of the family holds it (drm_gem_lru_remove).

        Returns True if it was on one.
        """
        holder = self._where.get(id(item))
        if holder is None:
            return False
        holder._take(id(item))
        return True

    def scan(self, nr: int, shrink: Callable[[T], bool], *, rotate: bool = True,
             until: Callable[[], bool] | None = None) -> int:
        """Offer items to `shrink` from the head until `nr` weight is freed, `until()` is
        true (checked before each offer) or the LRU is empty.

        Returns the weight freed: the sum of the weights of the items `shrink` accepted.
        A shrink that returns True must have taken the item off this LRU (AssertionError).
        Refused items go to the tail, or back to the head with `rotate` False.
        If `shrink` raises, the refused items are put back and the exception propagates.
        """
        if self._skipped is not None:
            raise AssertionError("Lru.scan is not re-entrant")
        skipped: OrderedDict[int, tuple[T, int]] = OrderedDict()
        self._skipped = skipped
        freed = 0
        try:
            while freed < nr and self._items and not (until is not None and until()):
                # Park the head first, as drm_gem_lru_scan does with still_in_lru, so the
                # callback may move or remove it (or any other item) while we hold it.
                key, entry = self._items.popitem(last=False)
                skipped[key] = entry
                if shrink(entry[0]):
                    if self._where.get(key) is self:
                        raise AssertionError(f"shrink returned True but left {entry[0]!r} on the LRU")
                    freed += entry[1]
        finally:
            self._skipped = None
            self._items.update(skipped)  # refused items go to the tail in their old order
            if not rotate:  # ... or back to the head, as if never offered
                for key in reversed(skipped):
                    self._items.move_to_end(key, last=False)
        return freed

    def _take(self, key: int) -> tuple[T, int]:
        """Unlink the item with id `key` from this LRU and return its entry."""
        if key in self._items:
            entry = self._items.pop(key)
        else:
            assert self._skipped is not None
            entry = self._skipped.pop(key)
        self._count -= entry[1]
        del self._where[key]
        return entry
