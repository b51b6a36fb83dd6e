"""MemfdPool and the MemfdStore's pooling (backing/recycle.py), on real memfds: what is
accepted, per (uid, size) reuse of cleared memfds only, clearing data segments only (holes
stay holes), oldest-first drops, idle expiry, the device's mapping of a recycled memfd, and a
drop while a clearing is in flight."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pytest

from ugem.address import data_address
from ugem.backing.memfd import MemfdStore
from ugem.backing.recycle import IDLE_S, MIN_SIZE, MemfdPool, Pooled
from ugem.fd import OwnedFd

MIB = 1 << 20
ROOM = 64 * MIB


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(tmp_path: os.PathLike[str]) -> Iterator[MemfdStore]:
    store = MemfdStore(str(tmp_path))
    store.pool = MemfdPool(8, Clock())
    try:
        yield store
    finally:
        store.close()


def _written(store: MemfdStore, size: int = MIN_SIZE, length: int | None = None, uid: int = 1) -> OwnedFd:
    """A new memfd (of the pool of `uid`, if one is ready) holding `length` bytes of data."""
    fd = store.create(size, uid)
    store.write(fd, 0, b"\x07" * (size if length is None else length))
    return fd


def _pool(store: MemfdStore, fd: OwnedFd, uid: int = 1, room: int = ROOM) -> Pooled:
    entry = store.release(fd, uid, room)
    assert entry is not None
    store.clear(entry)
    store.zeroed(entry, None)
    return entry


def test_a_cleared_memfd_comes_back_for_its_uid_and_size_reading_zeros(store: MemfdStore) -> None:
    fd = _written(store)
    key, number = store.key(fd), fd.fd
    _pool(store, fd)
    assert (store.pooled_fds, store.pooled_bytes, store.open_count) == (1, MIN_SIZE, 0)
    assert os.fstat(fd.fileno()).st_mode & 0o777 == 0
    for size, uid in ((MIN_SIZE, 2), (2 * MIN_SIZE, 1)):  # another uid, another size: a fresh one
        other = store.create(size, uid)
        assert other is not fd
        store.release(other)
    again = store.create(MIN_SIZE, uid=1)
    assert store.key(again) == key and store.recycled == 1
    assert fd.closed and again.fd != number  # the same memory under a new fd number (MemfdStore._renumbered)
    assert os.fstat(again.fileno()).st_mode & 0o777 == 0o400
    out = bytearray(MIN_SIZE)
    store.read(again, 0, memoryview(out))
    assert not any(out)
    assert store.resident_bytes(again) == MIN_SIZE  # its pages came along
    store.release(again)


def test_an_entry_is_handed_out_only_once_zeroed(store: MemfdStore) -> None:
    entry = store.release(_written(store), 1, ROOM)
    assert entry is not None
    key = store.key(entry.fd)
    fresh = [store.create(MIN_SIZE, uid=1)]
    store.clear(entry)
    fresh.append(store.create(MIN_SIZE, uid=1))  # cleared, but not yet marked so
    assert all(store.key(fd) != key for fd in fresh)
    store.zeroed(entry, None)
    fresh.append(store.create(MIN_SIZE, uid=1))
    assert store.key(fresh[-1]) == key
    for fd in fresh:
        store.release(fd)


def test_a_failed_clearing_closes_the_entry(store: MemfdStore) -> None:
    entry = store.release(_written(store), 1, ROOM)
    assert entry is not None
    store.zeroed(entry, OSError(5, "EIO"))
    assert store.pooled_fds == 0 and entry.fd.closed


def test_holes_stay_holes(store: MemfdStore) -> None:
    fd = _written(store, 4 * MIN_SIZE, length=4096)
    key = store.key(fd)
    _pool(store, fd)
    assert store.pooled_bytes == 4096
    again = store.create(4 * MIN_SIZE, uid=1)
    assert store.key(again) == key and store.resident_bytes(again) == 4096  # clearing did not fill the holes in
    out = bytearray(8192)
    store.read(again, 0, memoryview(out))
    assert not any(out)
    store.release(again)


@pytest.mark.parametrize("size, room, written", [
    (MIN_SIZE // 2, ROOM, True),  # too small to be worth it
    (MIN_SIZE, MIN_SIZE - 4096, True),  # its size does not fit the room
    (MIN_SIZE, ROOM, False),  # no pages: nothing to save
])
def test_what_is_not_pooled(store: MemfdStore, size: int, room: int, written: bool) -> None:
    fd = _written(store, size) if written else store.create(size, uid=1)
    assert store.release(fd, 1, room) is None
    assert store.pooled_fds == 0 and fd.closed


def test_at_most_max_fds(store: MemfdStore) -> None:
    fds = [_written(store) for _ in range(9)]
    entries = [store.release(fd, 1, ROOM) for fd in fds]
    assert sum(e is not None for e in entries) == 8 and store.pooled_fds == 8


def test_drops_go_oldest_first_in_bytes_or_fds(store: MemfdStore) -> None:
    first, second, third = (_pool(store, _written(store, (i + 1) * MIN_SIZE)) for i in range(3))
    assert store.drop_pooled(nbytes=1) == (1, MIN_SIZE)
    assert first.fd.closed and not second.fd.closed
    assert store.drop_pooled(fds=1) == (1, 2 * MIN_SIZE)
    assert store.drop_pooled() == (0, 0)
    assert store.pooled_fds == 1 and not third.fd.closed


def test_idle_entries_expire_one_per_call_oldest_first(store: MemfdStore) -> None:
    clock = store.pool.clock
    assert isinstance(clock, Clock)
    assert IDLE_S >= 30  # outlives a pause between two rounds of work (TTM's pool has no clock at all)
    old = _pool(store, _written(store))
    older_kind = _pool(store, _written(store, uid=3))
    clock.now += IDLE_S / 2
    young = _pool(store, _written(store, uid=2))  # (uid 1's would be `old` again)
    store.expire_pooled()
    assert not old.fd.closed  # unused for half of IDLE_S: kept
    clock.now += IDLE_S / 2
    store.expire_pooled()
    assert old.fd.closed and not older_kind.fd.closed  # one per call: each close frees its pages on the caller's thread
    store.expire_pooled()
    assert older_kind.fd.closed and not young.fd.closed
    store.expire_pooled()
    assert not young.fd.closed and store.pooled_fds == 1


def test_with_close_later_an_expired_entry_is_closed_by_whoever_runs_it(store: MemfdStore) -> None:
    """The daemon hands the close of an expired entry (12 ms per 64 MiB of pages) to its mover
    threads: the entry leaves the pool (its bytes no longer counted) at once, its fd and
    mapping go when the work runs, not before."""
    clock = store.pool.clock
    assert isinstance(clock, Clock)
    queued: list = []
    store.close_later(queued.append)
    entry = _pool(store, _written(store))
    clock.now += IDLE_S
    store.expire_pooled()
    assert (store.pooled_fds, store.pooled_bytes) == (0, 0) and len(queued) == 1
    assert not entry.fd.closed and entry.view is not None  # nothing freed on this thread
    queued.pop()()
    assert entry.fd.closed and entry.view is None


def test_a_recycled_memfd_is_copied_through_the_stores_warm_mapping(store: MemfdStore) -> None:
    """The device gets the store's mapping of a recycled memfd (page tables filled by the
    zeroing) and no description to pwritev through: a mapped copy runs at memcpy speed."""
    size = 4 * MIN_SIZE
    fresh = _written(store, size)
    file = store.device_file(fresh)  # a new memfd: the write path, no page faults
    assert file is not None
    file.close()  # (the device's copy closes it once done)
    entry = _pool(store, fresh)
    again = store.create(size, uid=1)
    assert store.device_file(again) is None
    with store.map(again) as view, memoryview(entry.view) as pooled:
        assert data_address(np.frombuffer(view, np.uint8)) == data_address(np.frombuffer(pooled, np.uint8))
        assert view.nbytes == size and not view.readonly
        np.frombuffer(view, np.uint8)[size - 3:] = 9  # what a copy out through the mapping writes
    assert os.pread(again.fileno(), 4, size - 4) == b"\x00\x09\x09\x09"
    store.release(again)
    other = store.create(size, uid=2)  # never pooled: its own mapping, and the write path
    file = store.device_file(other)
    assert file is not None
    file.close()
    store.release(other)


def test_a_drop_while_clearing_leaves_the_mapping_to_the_clearing(store: MemfdStore) -> None:
    entry = store.release(_written(store), 1, ROOM)
    assert entry is not None
    view = entry.view  # the clearing job's own reference, taken when it starts
    store.drop_pooled(fds=1)
    assert entry.fd.closed and entry.view is None
    pages = np.frombuffer(view, dtype=np.uint8)
    pages[:] = 0  # still mapped: the memory lives until the clearing lets go
    assert not pages.any()
    assert store.clear(entry) == 0  # a clearing that starts after the drop does nothing
