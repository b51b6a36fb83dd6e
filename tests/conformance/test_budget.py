"""The system budget and spill storage (SPEC §2 pread/pwrite ENOMEM and stats, §3 "system",
"budget", "spill storage"; gem-reference §4.3 shrinker: purge_list before shrink_list).

Every test runs a manager of its own with a small `system_budget` and writes random bytes
(fixed seeds), so that every figure and every byte read back can be checked exactly.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import glob
import os
import resource
import signal
import threading
import time

import numpy as np
import pytest

import ugem
from ugem.cmd import Fill, SemaphoreWait
from ugem.testing import run_daemon
from ugem.testing.data import random_bytes as _data
from ugem.testing.data import wait_until
from ugem.testing.data import write_new as _written

PAGE = ugem.PAGE_SIZE
MiB = 1 << 20
BUDGET = 16 * MiB


def _pressure(dev, total: int = BUDGET, size: int = 2 * MiB, seed: int = 1000) -> list[int]:
    """Write `total` bytes into new objects (enough to push every older object out)."""
    return [_written(dev, size, seed + i)[0] for i in range(total // size)]


@pytest.fixture
def small(make_env):
    return make_env(system_budget=BUDGET).open()


def _placements(dev, handles) -> dict[str, int]:
    counts: dict[str, int] = {}
    for h in handles:
        p = dev.info(h).placement
        counts[p] = counts.get(p, 0) + 1
    return counts


# -- staying within the budget ---------------------------------------------------------


def test_writing_far_more_than_the_budget_stays_within_it(small):
    size, count = 1 * MiB, 48  # three times the budget
    objects = {}
    for i in range(count):
        h, data = _written(small, size, seed=i)
        objects[h] = data
        stats = small.stats()
        assert stats["resident_bytes"] <= BUDGET, (i, stats)
    stats = small.stats()
    placements = _placements(small, objects)
    assert placements.get("spilled", 0) >= count - BUDGET // size, placements
    assert stats["spilled_total"] >= count - BUDGET // size
    assert stats["spilled_bytes"] == placements["spilled"] * size  # random data: every page is data
    assert stats["purged_total"] == 0
    for h, data in objects.items():  # every byte comes back, restored ones included
        assert small.pread(h, 0, size) == data, f"object {h} changed"
        assert small.stats()["resident_bytes"] <= BUDGET


def test_spilled_figures_grow_and_shrink(small):
    h, data = _written(small, 4 * MiB, seed=1)
    before = small.stats()
    assert (before["spilled_bytes"], before["spilled_total"]) == (0, 0)
    _pressure(small)
    spilled = small.stats()
    assert small.info(h).placement == "spilled"
    assert spilled["spilled_total"] == 1
    assert spilled["spilled_bytes"] == 4 * MiB
    assert spilled["bytes_moved_total"] == before["bytes_moved_total"] + 4 * MiB
    assert small.pread(h, 0, 4 * MiB) == data
    restored = small.stats()
    assert small.info(h).placement == "system"
    # two 2 MiB objects went out to make room for it, and its 4 MiB came back in
    assert restored["spilled_total"] == 3
    assert restored["spilled_bytes"] == 4 * MiB
    assert restored["bytes_moved_total"] == spilled["bytes_moved_total"] + 4 * MiB + 4 * MiB
    assert restored["resident_bytes"] <= BUDGET


def test_a_sparse_object_spills_only_its_data(small):
    h = small.create(8 * MiB)
    small.pwrite(h, 3 * MiB, b"island")
    _pressure(small)
    stats = small.stats()
    assert small.info(h).placement == "spilled"
    assert stats["spilled_bytes"] == PAGE
    assert small.pread(h, 3 * MiB - 2, 10) == b"\0\0island\0\0"
    assert small.pread(h, 0, 8 * MiB).count(0) == 8 * MiB - 6


def test_clients_spilling_and_restoring_at_once_get_every_byte_and_hole_back(make_env):
    # three clients push each other's objects out and read them back at the same time;
    # the objects are larger than a copy's pipe (1 MiB), not multiples of it, and sparse
    env = make_env(system_budget=BUDGET)
    size = 3 * MiB + 5 * PAGE
    errors: list[BaseException] = []

    def client(k: int) -> None:
        try:
            dev = env.open()
            objects = {}
            for i in range(6):  # 6 x 3 clients x ~2.3 MiB of data: more than the budget
                h = dev.create(size)
                head, tail = _data(100 * k + i, 2 * MiB + 3 * PAGE), _data(200 * k + i, PAGE)
                dev.pwrite(h, 0, head)  # then a hole of ~1 MiB, then one page
                dev.pwrite(h, size - PAGE, tail)
                objects[h] = (head, tail)
            for _ in range(2):
                for h, (head, tail) in objects.items():
                    got = bytearray(size)
                    dev.pread_into(h, 0, got)
                    assert got[:len(head)] == head and got[size - PAGE:] == tail
                    assert got[len(head):size - PAGE].count(0) == size - PAGE - len(head)
            dev.close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    stats = env.open().stats()
    assert stats["spilled_total"] > 0 and stats["resident_bytes"] <= BUDGET


TiB = 1 << 40


def _spill_sparse_then_write(env, sparse: dict[int, dict[int, bytes]], owner) -> None:
    """Another client writes 24 MiB (1.5 budgets): the idle sparse objects of `owner` are
    spilled first, then some of its own; everything reads back exactly."""
    other = env.open()
    objects = dict(_written(other, 2 * MiB, seed=100 + i) for i in range(12))
    assert all(owner.info(h).placement == "spilled" for h in sparse)
    assert _placements(other, objects).get("spilled", 0) >= 2
    for h, data in objects.items():
        assert other.pread(h, 0, 2 * MiB) == data
    for h, pages in sparse.items():
        for offset, data in pages.items():
            assert owner.pread(h, offset, len(data)) == data
        assert owner.pread(h, PAGE * 3, 16) == bytes(16)


def test_an_idle_32_tib_object_holding_one_page_does_not_use_up_spill_storage(make_env):
    # spill storage is reserved for what an object holds, not its size (8 TiB of range)
    env = make_env(system_budget=BUDGET)
    owner = env.open()
    big = owner.create(32 * TiB)
    owner.pwrite(big, 5 * TiB, b"one page")
    _spill_sparse_then_write(env, {big: {5 * TiB: b"one page"}}, owner)
    assert owner.info(big).size == 32 * TiB


def test_eight_sparse_1_tib_objects_do_not_use_up_spill_storage(make_env):
    env = make_env(system_budget=BUDGET)
    owner = env.open()
    sparse = {}
    for i in range(8):  # 32 KiB each, in pages spread over the whole TiB
        h = owner.create(TiB)
        sparse[h] = {j * (TiB // 8) + PAGE: bytes([i + 1, j + 1]) * (PAGE // 2) for j in range(8)}
        for offset, data in sparse[h].items():
            owner.pwrite(h, offset, data)
    _spill_sparse_then_write(env, sparse, owner)
    stats = owner.stats()
    assert stats["spilled_bytes"] >= 8 * 8 * PAGE


def test_least_recently_used_is_spilled_first(small):
    a, data_a = _written(small, 4 * MiB, seed=1)
    b, _ = _written(small, 4 * MiB, seed=2)
    c, _ = _written(small, 4 * MiB, seed=3)
    d, _ = _written(small, 4 * MiB, seed=4)
    assert small.pread(a, 0, 16) == data_a[:16]  # a is now the most recently used
    _written(small, 4 * MiB, seed=5)
    assert [small.info(x).placement for x in (a, b, c, d)] == ["system", "spilled", "system", "system"]


def test_pwrite_into_resident_pages_at_a_full_budget_needs_no_room(small):
    # SPEC §3: room is made for pages a request adds; overwriting adds none
    handles = _pressure(small)
    assert small.stats()["resident_bytes"] == BUDGET
    small.pwrite(handles[-1], 0, _data(9, 2 * MiB))
    small.pwrite(handles[0], 100, b"over")
    assert small.stats()["spilled_total"] == 0
    assert small.pread(handles[0], 100, 4) == b"over"


def test_a_spilled_object_can_be_overwritten_partly(small):
    h, data = _written(small, 4 * MiB, seed=1)
    _pressure(small)
    small.pwrite(h, MiB, b"patched")
    expected = data[:MiB] + b"patched" + data[MiB + 7:]
    assert small.pread(h, 0, 4 * MiB) == expected


def test_mmap_of_a_spilled_object_brings_it_back(small):
    h, data = _written(small, 4 * MiB, seed=1)
    _pressure(small)
    view = small.mmap(h, writable=False)
    assert small.info(h).placement == "system"
    assert bytes(view) == data
    del view


# -- purge before spill ----------------------------------------------------------------


def test_dontneed_objects_are_purged_before_anything_is_spilled(small):
    old = [_written(small, 4 * MiB, seed=i) for i in range(2)]  # WILLNEED, least recently used
    caches = [_written(small, 4 * MiB, seed=10 + i)[0] for i in range(2)]  # DONTNEED, newer
    for h in caches:
        small.madvise(h, ugem.DONTNEED)
    before = small.stats()
    assert before["purgeable_bytes"] == 8 * MiB
    _written(small, 8 * MiB, seed=20)
    after = small.stats()
    assert [small.info(h).placement for h in caches] == ["purged", "purged"]
    assert [small.info(h).placement for h, _ in old] == ["system", "system"]
    assert after["spilled_total"] == 0
    assert after["purged_total"] == before["purged_total"] + 2
    assert after["purgeable_bytes"] == 0
    for h, data in old:
        assert small.pread(h, 0, 4 * MiB) == data


def test_only_as_many_caches_as_needed_are_purged(small):
    caches = [_written(small, 4 * MiB, seed=i)[0] for i in range(4)]
    for h in caches:
        small.madvise(h, ugem.DONTNEED)
    _written(small, 4 * MiB, seed=20)
    assert [small.info(h).placement for h in caches] == ["purged", "system", "system", "system"]
    stats = small.stats()
    assert (stats["purged_total"], stats["spilled_total"]) == (1, 0)


def test_spilling_starts_once_the_caches_are_gone(small):
    kept, data = _written(small, 4 * MiB, seed=1)
    cache, _ = _written(small, 4 * MiB, seed=2)
    small.madvise(cache, ugem.DONTNEED)
    _pressure(small)
    stats = small.stats()
    assert small.info(cache).placement == "purged"
    assert small.info(kept).placement == "spilled"
    assert (stats["purged_total"], stats["spilled_total"]) == (1, 1)
    assert small.pread(kept, 0, 4 * MiB) == data


# -- mapped objects --------------------------------------------------------------------


def test_a_mapped_object_is_never_spilled(small):
    h = small.create(4 * MiB)
    view = small.mmap(h)
    data = _data(1, 4 * MiB)
    view[:] = data
    array = np.frombuffer(view, dtype=np.uint8)
    _pressure(small, total=2 * BUDGET)
    stats = small.stats()
    assert small.info(h).placement == "system"
    assert stats["spilled_total"] >= BUDGET // (2 * MiB)  # the pressure did spill others
    assert bytes(view) == data
    assert array[123456] == data[123456]
    assert small.pread(h, 0, 4 * MiB) == data
    del view, array


def test_a_mapping_kept_after_close_handle_still_protects_the_object(small):
    h = small.create(4 * MiB)
    view = small.mmap(h)
    data = _data(1, 4 * MiB)
    view[:] = data
    small.close_handle(h)
    _pressure(small, total=2 * BUDGET)
    assert bytes(view) == data
    assert small.stats()["resident_bytes"] <= BUDGET
    del view


def test_a_released_mapping_makes_the_object_spillable_again(small):
    h = small.create(4 * MiB)
    view = small.mmap(h)
    array = np.frombuffer(view, dtype=np.uint8)
    data = _data(1, 4 * MiB)
    view[:] = data
    _pressure(small)
    assert small.info(h).placement == "system"
    del view, array
    gc.collect()
    _pressure(small, seed=2000)  # its first request reports the release
    assert small.info(h).placement == "spilled"
    assert small.pread(h, 0, 4 * MiB) == data


def test_writes_through_a_mapping_are_counted(small):
    h = small.create(4 * MiB)
    view = small.mmap(h)
    before = small.stats()["resident_bytes"]
    view[: 3 * MiB] = _data(1, 3 * MiB)
    assert small.stats()["resident_bytes"] == before + 3 * MiB
    del view


def test_pages_written_through_a_mapping_are_reclaimed_at_the_next_populating_request(small):
    spillable = _pressure(small, total=12 * MiB)
    h = small.create(8 * MiB)
    view = small.mmap(h)
    view[:] = _data(1, 8 * MiB)
    over = small.stats()
    assert over["resident_bytes"] == 20 * MiB  # over the budget until the next request that adds pages
    _written(small, 1 * MiB, seed=5)
    stats = small.stats()
    assert stats["resident_bytes"] <= BUDGET
    assert small.info(h).placement == "system"
    assert _placements(small, spillable).get("spilled", 0) >= 3
    del view


# -- exported and foreign objects ------------------------------------------------------


def test_an_exported_object_is_never_spilled(small, fds):
    h, data = _written(small, 4 * MiB, seed=1)
    fd = fds.add(small.export(h))
    _pressure(small, total=2 * BUDGET)
    assert small.info(h).placement == "system"
    os.pwrite(fd, b"after", 0)  # the fd and the object still share their pages
    assert small.pread(h, 0, 5) == b"after"
    assert small.pread(h, 5, 4 * MiB - 5) == data[5:]


def test_adopted_memory_is_never_spilled(small, fds):
    h, data = _written(small, 4 * MiB, seed=1)
    fd = fds.add(small.export(h))
    small.close_handle(h)
    adopted = small.import_fd(fd)
    _pressure(small, total=2 * BUDGET)
    assert small.info(adopted).placement == "system"
    os.pwrite(fd, b"after", 0)
    assert small.pread(adopted, 0, 5) == b"after"
    assert small.pread(adopted, 5, 4 * MiB - 5) == data[5:]


def test_foreign_memory_is_not_counted_and_never_spilled(small, sealed_memfd):
    data = _data(5, 8 * MiB)
    memfd = sealed_memfd(8 * MiB, data=data)
    h = small.import_fd(memfd)
    assert small.stats()["resident_bytes"] == 0
    small.pwrite(h, 0, b"own")  # writing foreign memory needs no room under the budget
    _pressure(small, total=2 * BUDGET)
    assert small.info(h).placement == "system"
    assert os.pread(memfd, 3, 0) == b"own"
    assert small.pread(h, 3, 8 * MiB - 3) == data[3:]


def test_mapped_pages_are_reclaimed_even_if_nobody_looked_at_them(small):
    # no stats() in between: the populating request itself must notice the mapped pages
    spillable = _pressure(small, total=12 * MiB)
    h = small.create(8 * MiB)
    view = small.mmap(h)
    view[:] = _data(1, 8 * MiB)
    _written(small, 1 * MiB, seed=5)
    assert small.stats()["resident_bytes"] <= BUDGET
    assert _placements(small, spillable).get("spilled", 0) >= 3
    del view


def test_a_process_writing_only_through_mappings_is_held_to_the_budget(small):
    # IGT gem_shrink mmap mode: every object is populated through a mapping, never pwrite;
    # the next mmap (a populating request) reclaims what the previous mappings added
    objects = {}
    for i in range(12):
        h = small.create(4 * MiB)
        view = small.mmap(h)
        objects[h] = _data(i, 4 * MiB)
        view[:] = objects[h]
        del view
    stats = small.stats()
    assert stats["resident_bytes"] <= BUDGET + 4 * MiB  # the last one is not reclaimed yet
    assert stats["spilled_total"] >= 12 - (BUDGET + 4 * MiB) // (4 * MiB)
    for h, data in objects.items():
        assert small.pread(h, 0, 4 * MiB) == data


# -- ENOMEM ----------------------------------------------------------------------------


@pytest.fixture
def full(make_env, fds):
    """A budget filled with memory nothing can free: pinned, mapped, exported."""
    dev = make_env(system_budget=BUDGET, pin_limit=BUDGET).open()
    pinned, pinned_data = _written(dev, 8 * MiB, seed=1)
    dev.pin(pinned)
    mapped = dev.create(4 * MiB)
    view = dev.mmap(mapped)
    mapped_data = _data(2, 4 * MiB)
    view[:] = mapped_data
    exported, exported_data = _written(dev, 4 * MiB, seed=3)
    fd = fds.add(dev.export(exported, writable=False))
    assert dev.stats()["resident_bytes"] == BUDGET
    contents = {pinned: pinned_data, mapped: mapped_data, exported: exported_data}
    yield dev, contents, view, fd
    del view


def _intact(dev, contents):
    for h, data in contents.items():
        assert dev.pread(h, 0, len(data)) == data


def test_pwrite_that_cannot_be_made_room_for_is_enomem(full, errno_of):
    dev, contents, view, fd = full
    h = dev.create(PAGE)
    before = dev.stats()
    assert errno_of(dev.pwrite, h, 0, b"x") == errno.ENOMEM
    assert dev.stats() == before
    assert dev.info(h).placement == "none"
    _intact(dev, contents)
    assert bytes(view[:16]) == contents[2][:16]
    assert os.pread(fd, 16, 0) == contents[3][:16]


def test_large_pwrite_that_cannot_be_made_room_for_is_enomem(full, errno_of):
    dev, contents, _, _ = full
    h = dev.create(4 * MiB)
    before = dev.stats()
    assert errno_of(dev.pwrite, h, 0, _data(9, 4 * MiB)) == errno.ENOMEM
    assert dev.stats() == before
    assert dev.info(h).placement == "none"
    _intact(dev, contents)


def test_pwrite_larger_than_the_budget_is_enomem_and_frees_nothing(small, errno_of):
    # 8 MiB could be freed, but that cannot make 20 MiB fit: nothing is purged or spilled
    spillable = [_written(small, 4 * MiB, seed=i) for i in range(2)]
    cache, _ = _written(small, 4 * MiB, seed=5)
    small.madvise(cache, ugem.DONTNEED)
    h = small.create(20 * MiB)
    before = small.stats()
    assert errno_of(small.pwrite, h, 0, _data(9, 20 * MiB)) == errno.ENOMEM
    assert small.stats() == before
    assert small.info(cache).placement == "system"
    assert small.info(h).placement == "none"
    for x, data in spillable:
        assert small.info(x).placement == "system"
        assert small.pread(x, 0, 4 * MiB) == data


def test_a_failed_pwrite_leaves_the_manager_usable(full, errno_of):
    dev, contents, _, _ = full
    h = dev.create(PAGE)
    assert errno_of(dev.pwrite, h, 0, b"x") == errno.ENOMEM
    dev.unpin(1)  # the pinned object can now be spilled
    dev.pwrite(h, 0, b"x")
    assert dev.pread(h, 0, 1) == b"x"
    assert dev.info(1).placement == "spilled"
    _intact(dev, {k: v for k, v in contents.items() if k != 1})
    assert dev.stats()["resident_bytes"] <= BUDGET


@contextlib.contextmanager
def _file_size_limit(limit: int):
    """RLIMIT_FSIZE for this process (and the processes it starts meanwhile): writes to
    regular files past `limit` fail with EFBIG (SIGXFSZ ignored), as on a full disk."""
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, old_handler)


def test_spill_storage_that_cannot_grow_is_enomem_not_a_hang(mode, tmp_path, errno_of):
    # spill storage takes 4 MiB (2 MiB in each of its two files: small extents take turns),
    # then every copy to it fails: the request must fail
    with contextlib.ExitStack() as stack:
        limited = stack.enter_context(contextlib.ExitStack())
        limited.enter_context(_file_size_limit(2 * MiB))
        if mode == "embedded":
            dev = stack.enter_context(ugem.embedded(spill_dir=str(tmp_path), system_budget=BUDGET))
        else:  # the daemon inherits the limit; this process needs it no longer
            daemon = stack.enter_context(run_daemon(spill_dir=str(tmp_path), system_budget=BUDGET))
            limited.close()
            dev = stack.enter_context(daemon.connect())
        objects = dict(_written(dev, 2 * MiB, seed=i) for i in range(10))  # two of them spilled
        assert dev.stats()["spilled_total"] == 2
        h = dev.create(2 * MiB)
        before = dev.stats()
        with pytest.raises(ugem.UgemError) as failed:
            dev.pwrite(h, 0, _data(99, 2 * MiB))
        assert failed.value.errno == errno.ENOMEM
        assert str(tmp_path) in str(failed.value)  # names the spill directory
        assert errno_of(dev.pwrite, h, 0, _data(99, 2 * MiB)) == errno.ENOMEM  # the next try too
        after = dev.stats()
        assert after["spilled_total"] == before["spilled_total"]
        assert after["resident_bytes"] == before["resident_bytes"] == BUDGET
        assert dev.info(h).placement == "none"
        resident = [x for x in objects if dev.info(x).placement == "system"]
        for x in resident:
            assert dev.pread(x, 0, 2 * MiB) == objects[x]
        dev.close_handle(resident[0])  # room without spilling
        dev.pwrite(h, 0, b"fits now")
        assert dev.pread(h, 0, 8) == b"fits now"
        limited.close()


def test_mapping_with_spill_storage_that_cannot_grow_does_not_hang(mode, tmp_path):
    # mmap reclaims what mappings added, as far as it can; a failed spill is not retried
    # for ever, and mmap itself never fails for it
    with contextlib.ExitStack() as stack:
        limited = stack.enter_context(contextlib.ExitStack())
        limited.enter_context(_file_size_limit(4 * MiB))  # a 4 MiB spill: 2 MiB in each of the two files
        if mode == "embedded":
            dev = stack.enter_context(ugem.embedded(spill_dir=str(tmp_path), system_budget=BUDGET))
        else:
            daemon = stack.enter_context(run_daemon(spill_dir=str(tmp_path), system_budget=BUDGET))
            limited.close()
            dev = stack.enter_context(daemon.connect())
        objects = {}
        for i in range(8):  # 32 MiB through mappings: 16 MiB fit, 8 MiB can be spilled
            h = dev.create(4 * MiB)
            view = dev.mmap(h)
            objects[h] = _data(i, 4 * MiB)
            view[:] = objects[h]
            del view
        stats = dev.stats()
        assert stats["spilled_bytes"] == 8 * MiB
        assert stats["resident_bytes"] == 24 * MiB  # over the budget: nothing else could go
        resident = [h for h in objects if dev.info(h).placement == "system"]
        assert len(resident) == 6
        for h in resident:
            assert dev.pread(h, 0, 4 * MiB) == objects[h]
        limited.close()


def test_pread_of_a_spilled_object_without_room_is_enomem(make_env, errno_of):
    dev = make_env(system_budget=BUDGET, pin_limit=BUDGET).open()
    h, data = _written(dev, 4 * MiB, seed=1)
    blockers = _pressure(dev, total=BUDGET, size=4 * MiB)
    assert dev.info(h).placement == "spilled"
    for b in blockers:
        dev.pin(b)
    before = dev.stats()
    assert errno_of(dev.pread, h, 0, 16) == errno.ENOMEM
    assert dev.stats() == before
    assert dev.info(h).placement == "spilled"
    dev.unpin(blockers[0])
    assert dev.pread(h, 0, 4 * MiB) == data


def test_pwrite_waits_for_device_work_that_holds_the_rest_of_the_budget(make_env):
    # The device is held by a SemaphoreWait until the test releases it; behind it, work
    # uses every object of the budget (in VRAM, their system pages a spare copy; CACHED,
    # used in place). A pwrite needing room must wait for that work, not fail with ENOMEM
    # at once. It first purges what it can now (a DONTNEED marker): that is how the test
    # knows the pwrite is waiting before it releases the device.
    env = make_env(system_budget=BUDGET, vram="64M", hang_timeout=120)
    dev, writer = env.open(), env.open()
    sem = dev.create(PAGE)
    dev.set_caching(sem, ugem.CACHING_CACHED)
    view = dev.mmap(sem)
    marker, _ = _written(dev, 2 * PAGE, seed=1)
    dev.madvise(marker, ugem.DONTNEED)
    objects = {}
    for i in range(7):  # 14 MiB
        h, data = _written(dev, 2 * MiB, seed=10 + i)
        if i % 2:
            dev.set_caching(h, ugem.CACHING_CACHED)
        objects[h] = data
    dev.execbuffer([SemaphoreWait(obj=sem, offset=0, value=1)])
    for h in objects:
        dev.execbuffer([Fill(dst=h, offset=0, length=4, byte=0xEE)])
        objects[h] = b"\xee" * 4 + objects[h][4:]
    assert all(dev.busy(h) for h in objects)
    target = writer.create(4 * MiB)
    data = _data(99, 4 * MiB)
    outcome: list[BaseException | None] = []

    def write() -> None:
        try:
            writer.pwrite(target, 0, data)
            outcome.append(None)
        except ugem.UgemError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=write)
    thread.start()
    try:
        wait_until(lambda: outcome or dev.info(marker).placement == "purged", timeout=120,
                   what="the pwrite to purge what it could")
        assert not outcome, f"the pwrite did not wait for the device: {outcome}"
        assert all(dev.busy(h) for h in objects)  # others are served meanwhile
    finally:
        view[0:4] = (1).to_bytes(4, "little")  # release the device
        thread.join(120)
    assert outcome == [None]
    assert writer.pread(target, 0, 4 * MiB) == data
    assert dev.stats()["resident_bytes"] <= BUDGET
    for h, want in objects.items():
        assert dev.pread(h, 0, 2 * MiB) == want
    view.release()


# -- spill storage ---------------------------------------------------------------------


def _spill_root(env) -> str:
    if env.manager is not None:
        return env.manager.config.spill_dir
    return os.path.join(env.daemon.directory, "spill")


def _private_dir(env) -> str:
    [directory] = glob.glob(os.path.join(_spill_root(env), "ugem-*"))
    return directory


def _spill_blocks(env) -> int:
    return sum(os.stat(p).st_blocks for p in glob.glob(os.path.join(_private_dir(env), "spill-*")))


def _spill_bytes_drop_to(env, limit: int) -> int:
    """The spill files' allocated bytes once they are at most `limit`, or after 30 s: a restored
    object's space is punched by a background job after the reply (one punch per spill file)."""
    deadline = time.monotonic() + 30.0
    while (held := _spill_blocks(env) * 512) > limit and time.monotonic() < deadline:
        time.sleep(0.01)
    return held


def test_a_private_spill_directory_exists_while_the_manager_runs(make_env):
    env = make_env(system_budget=BUDGET)
    env.open().stats()
    directory = _private_dir(env)
    assert os.path.isdir(directory)
    assert os.stat(directory).st_mode & 0o077 == 0  # private
    if env.daemon is not None:
        assert os.path.basename(directory).startswith(f"ugem-{env.daemon.pid}-")


def test_spill_space_of_closed_objects_is_given_back(make_env):
    env = make_env(system_budget=BUDGET)
    dev = env.open()
    victims = [_written(dev, 2 * MiB, seed=i)[0] for i in range(4)]
    _pressure(dev)
    assert _placements(dev, victims) == {"spilled": 4}
    held = _spill_blocks(env) * 512
    assert held >= 8 * MiB
    for h in victims:
        dev.close_handle(h)
    dev.stats()
    assert dev.stats()["spilled_bytes"] == 0
    assert _spill_blocks(env) * 512 <= held - 8 * MiB


def test_spill_space_of_restored_objects_is_given_back(make_env):
    env = make_env(system_budget=BUDGET)
    dev = env.open()
    h, data = _written(dev, 4 * MiB, seed=1)
    others = _pressure(dev)
    assert dev.info(h).placement == "spilled"
    held = _spill_blocks(env) * 512
    assert held >= 4 * MiB
    for x in others[:2]:  # room for the restore: nothing else has to go out for it
        dev.close_handle(x)
    assert dev.pread(h, 0, 4 * MiB) == data
    stats = dev.stats()
    assert dev.info(h).placement == "system"
    assert (stats["spilled_total"], stats["spilled_bytes"]) == (1, 0)
    assert _spill_bytes_drop_to(env, held - 4 * MiB) <= held - 4 * MiB


def test_purging_a_spilled_object_gives_its_spill_space_back(make_env):
    env = make_env(system_budget=BUDGET)
    dev = env.open()
    victims = [_written(dev, 2 * MiB, seed=i)[0] for i in range(4)]
    _pressure(dev)
    held = _spill_blocks(env) * 512
    for h in victims:
        assert dev.madvise(h, ugem.DONTNEED) is False
    assert _spill_bytes_drop_to(env, held - 8 * MiB) <= held - 8 * MiB


def test_the_spill_directory_is_removed_when_the_manager_stops(make_env):
    env = make_env(system_budget=BUDGET)
    dev = env.open()
    h, _ = _written(dev, 4 * MiB, seed=1)
    _pressure(dev)
    assert dev.info(h).placement == "spilled"
    directory = _private_dir(env)
    if env.manager is not None:
        env.manager.close()
    else:
        env.daemon.proc.send_signal(signal.SIGTERM)
        assert env.daemon.proc.wait(timeout=20) == 0
        assert not os.path.exists(env.daemon.path)
    assert not os.path.exists(directory)
    assert glob.glob(os.path.join(_spill_root(env), "ugem-*")) == []


def _start(mode, spill_dir):
    if mode == "embedded":
        return ugem.Manager(spill_dir=spill_dir, system_budget=BUDGET)
    return run_daemon(spill_dir=spill_dir, system_budget=BUDGET)


def test_stale_spill_directories_are_removed_at_start(mode, tmp_path):
    stale = tmp_path / "ugem-99999-xyz"
    stale.mkdir()
    (stale / "lock").write_bytes(b"")
    (stale / "spill-0").write_bytes(b"left behind")
    unrelated = tmp_path / "not-ours"
    unrelated.mkdir()
    with _start(mode, str(tmp_path)):
        assert not stale.exists()
        assert unrelated.exists()
        assert len(glob.glob(str(tmp_path / "ugem-*"))) == 1


def test_a_live_managers_spill_directory_is_left_alone(mode, tmp_path):
    with _start(mode, str(tmp_path)):
        [first] = glob.glob(str(tmp_path / "ugem-*"))
        with _start(mode, str(tmp_path)):
            assert os.path.isdir(first)
            assert len(glob.glob(str(tmp_path / "ugem-*"))) == 2
        assert glob.glob(str(tmp_path / "ugem-*")) == [first]
