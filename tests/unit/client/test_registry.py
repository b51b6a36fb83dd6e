"""The registry of live mappings (client/registry.py): an entry is forgotten, and its release
queued, when its mapping dies, even if a new mapping took its address first; a mapping that
may linger (client/linger.py) outlives its last view, and is released when the queue is sent."""

from __future__ import annotations

import collections
import gc
import mmap

import numpy as np
import pytest

from ugem.client import linger as L
from ugem.client import registry


def _region() -> mmap.mmap:
    return mmap.mmap(-1, mmap.PAGESIZE)


def _address(region: mmap.mmap) -> int:
    return int(np.frombuffer(region, dtype=np.uint8).__array_interface__["data"][0])


def test_a_dead_mapping_is_forgotten_and_its_release_queued():
    released: collections.deque[int] = collections.deque()
    region = _region()
    address = _address(region)
    assert registry.register_mapping(region, None, 7, 0, True, (1, 2), released=released) is region
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
    address = _address(old)
    registry.register_mapping(old, None, 1, 0, True, (3, 4), released=released)
    registry.register_mapping(new, None, 2, 0, True, (5, 6), address=address, released=released)  # (as if)
    del old
    gc.collect()
    assert list(released) == [1]
    entry = registry.find_mapping(address, address + 1)
    assert entry is not None and entry.map_id == 2 and registry.find_by_key((3, 4), 0, 1, False) is None
    del new, entry
    gc.collect()
    assert list(released) == [1, 2] and registry.find_mapping(address, address + 1) is None


def _lingering(linger: L.Linger, released: collections.deque[int | None], map_id: int,
               key: tuple[int, int], size: int = mmap.PAGESIZE) -> tuple[mmap.mmap, int]:
    """Register a mapping (of `size` bytes) that may linger, drop its only view: the mapping and its address."""
    region = mmap.mmap(-1, size)
    address = _address(region)
    view = memoryview(registry.register_mapping(region, None, map_id, 0, True, key, released=released,
                                                linger=linger))
    view[0] = 9
    assert registry.find_by_key(key, 0, 1, True) is not None
    del view
    gc.collect()
    return region, address


def test_a_mapping_that_may_linger_outlives_its_last_view_until_released():
    linger, released = L.Linger(), collections.deque[int | None]()
    region, address = _lingering(linger, released, 7, (1, 2))
    assert registry.find_mapping(address, address + 1) is None and registry.find_by_key((1, 2), 0, 1, True) is None
    assert list(released) == [None] and linger and not region.closed  # a marker, not its id: still mapped
    assert region[0] == 9
    assert registry.starts_of((1, 2)) == [address]  # its entry stays, for its Linger only
    item = linger.take((1, 2), 0, mmap.PAGESIZE, True)
    assert item is not None and item.region is region and item.entry.map_id == 7 and not linger
    again = memoryview(registry.rewatch(item, released, linger))  # live again, in place
    assert again[0] == 9 and registry.find_mapping(address, address + 1).map_id == 7  # type: ignore[union-attr]
    assert registry.find_by_key((1, 2), 0, 1, True) is not None
    del again, item
    gc.collect()
    assert list(released) == [None, None]  # lingers again
    assert linger and linger.release_all() == [7] and region.closed and not linger
    assert registry.starts_of((1, 2)) == () and registry.find_mapping(address, address + 1) is None


def test_a_dropped_linger_forgets_the_entries_of_its_mappings():
    linger, released = L.Linger(), collections.deque[int | None]()
    _, address = _lingering(linger, released, 4, (2, 9))
    assert registry.starts_of((2, 9)) == [address]
    del linger
    gc.collect()
    assert registry.starts_of((2, 9)) == ()


def test_take_matches_memory_part_and_writability():
    linger, released = L.Linger(), collections.deque[int | None]()
    region, _ = _lingering(linger, released, 3, (5, 6))
    assert linger.take((5, 7), 0, 1, False) is None  # another memfd
    assert linger.take((5, 6), 0, mmap.PAGESIZE + 1, False) is None  # more than the mapping holds
    assert list(released) == [None]
    item = linger.take((5, 6), 0, 1, False)
    assert item is not None and item.region is region


def test_at_most_linger_max_linger_then_mappings_are_released_as_before(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(L, "LINGER_ANY", 2)
    monkeypatch.setattr(L, "LINGER_MAX", 4)
    linger, released = L.Linger(), collections.deque[int | None]()
    big = L.LINGER_SMALL + mmap.PAGESIZE
    regions = [_lingering(linger, released, i, (9, i), big)[0] for i in (1, 2, 3)]
    assert list(released) == [None, 3]  # one marker; past LINGER_ANY a big one's id at once
    regions += [_lingering(linger, released, i, (9, i), L.LINGER_SMALL)[0] for i in (4, 5, 6)]
    assert list(released) == [None, 3, 6]  # small ones linger up to LINGER_MAX in all
    assert sorted(linger.release_all()) == [1, 2, 4, 5]
    assert [r.closed for r in regions] == [True, True, False, True, True, False]
    regions[2].close()
    regions[5].close()


def test_a_closed_linger_keeps_nothing():
    linger, released = L.Linger(), collections.deque[int | None]()
    region, _ = _lingering(linger, released, 1, (4, 4))
    linger.close()
    assert region.closed and not linger
    _lingering(linger, released, 2, (4, 5))
    assert list(released) == [None, 2] and not linger


def test_nothing_lingers_in_a_forked_child():
    from ugem.client.releases import Releases
    releases = Releases()
    region, _ = _lingering(releases.linger, releases.queue, 1, (8, 1))  # type: ignore[arg-type]
    releases.after_fork_in_child()
    assert region.closed and not releases.linger
    _lingering(releases.linger, releases.queue, 2, (8, 2))  # type: ignore[arg-type]
    assert list(releases.queue) == [None, 2] and not releases.linger


class _ForkedParentsDevice:
    """What a forked child sees of the Device its parent made (client/device.py `_forked`)."""

    closed = False
    _transport = object()  # (open: the registry reads this, not `closed`)
    _forked = True


def test_a_forked_parents_entry_is_taken_off_its_key_by_the_first_lookup_that_meets_it():
    """A Pool worker forked from a process that maps the arrays it is sent inherits the
    parent's entries: the first lookup by key that meets one unlists it (nothing here can use
    it), finding a mapping of this process's own; found by address it still is, and its
    release is queued when it dies, as any other's."""
    released: collections.deque[int] = collections.deque()
    parents = _ForkedParentsDevice()
    inherited, own = _region(), _region()
    inherited_at, own_at = _address(inherited), _address(own)
    registry.register_mapping(inherited, parents, 1, 0, True, (7, 7), released=released)  # type: ignore[arg-type]
    registry.register_mapping(own, None, 2, 0, True, (7, 7), released=released)
    assert registry.starts_of((7, 7)) == [inherited_at, own_at]
    found = registry.lookup((7, 7), 0, 1, True)
    assert found is not None and found[1].map_id == 2
    assert registry.starts_of((7, 7)) == [own_at]  # unlisted by key...
    entry = registry.find_mapping(inherited_at, inherited_at + 1)
    assert entry is not None and entry.map_id == 1  # ...not forgotten
    del found, entry, inherited
    gc.collect()
    assert list(released) == [1] and registry.find_mapping(inherited_at, inherited_at + 1) is None
    assert registry.starts_of((7, 7)) == [own_at]
    del own
    gc.collect()
    assert list(released) == [1, 2] and registry.starts_of((7, 7)) == ()
