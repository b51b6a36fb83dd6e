"""The registry of live mappings (client/registry.py): an entry is forgotten, and its release
queued, when its mapping dies, even if a new mapping took its address first."""

from __future__ import annotations

import collections
import gc
import mmap

from ugem.client import registry


def _region() -> mmap.mmap:
    return mmap.mmap(-1, mmap.PAGESIZE)


def test_a_dead_mapping_is_forgotten_and_its_release_queued():
    released: collections.deque[int] = collections.deque()
    region = _region()
    address = registry.register_mapping(region, None, 7, 0, True, (1, 2), released=released)
    assert registry.find_mapping(address, address + 1) is not None
    del region
    gc.collect()
    assert registry.find_mapping(address, address + 1) is None and list(released) == [7]
    assert registry.find_by_key((1, 2), 0, 1, False) is None


def test_a_mapping_whose_address_was_taken_first_still_queues_its_release():
    """Between a mapping's munmap and its callback another thread may map the same address:
    the new entry replaces the old, whose callback must still queue its release, and must
    not forget the new entry."""
    released: collections.deque[int] = collections.deque()
    old, new = _region(), _region()
    address = registry.register_mapping(old, None, 1, 0, True, (3, 4), released=released)
    registry.register_mapping(new, None, 2, 0, True, (5, 6), address=address, released=released)  # (as if)
    del old
    gc.collect()
    assert list(released) == [1]
    entry = registry.find_mapping(address, address + 1)
    assert entry is not None and entry.map_id == 2 and registry.find_by_key((3, 4), 0, 1, False) is None
    del new, entry
    gc.collect()
    assert list(released) == [1, 2] and registry.find_mapping(address, address + 1) is None
