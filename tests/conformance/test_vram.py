"""Device memory: placement, overcommit and eviction, pinning in VRAM (SPEC §2 execbuffer
ENOSPC, pin, stats vram_bytes / evicted_total / bytes_moved_total / purged_total; §3 "vram";
gem-reference §4.4 TTM placement and eviction, §5.10 IGT gem_lmem_swapping).

Each test runs on a manager with a small VRAM of its own (make_env), so counters and
placements are this test's alone. Objects carry distinct random data plus a device write,
so a lost eviction copy or a mixed-up object shows up as wrong bytes.
"""

from __future__ import annotations

import errno
import os
import time

import pytest

import ugem
from ugem.cmd import Copy, Fill, SemaphoreWait
from ugem.testing.data import fill as _fill
from ugem.testing.data import filled as _filled
from ugem.testing.data import random_bytes as _data
from ugem.testing.data import write_new as _written

PAGE = ugem.PAGE_SIZE
MiB = 1 << 20


# -- ENOSPC and what needs no VRAM -----------------------------------------------------

def test_cached_objects_do_not_need_vram(make_env):
    dev = make_env(vram="4M").open()
    a, a_data = _written(dev, 4 * MiB, seed=1)
    b = dev.create(4 * MiB)
    for h in (a, b):
        dev.set_caching(h, ugem.CACHING_CACHED)
    dev.execbuffer([Copy(src=a, src_offset=0, dst=b, dst_offset=0, length=4 * MiB)])
    assert dev.pread(b, 0, 4 * MiB) == a_data
    assert dev.stats()["vram_bytes"] == 0
    assert dev.info(a).placement == dev.info(b).placement == "system"


def test_objects_pinned_in_vram_leave_less_room_enospc(make_env, errno_of):
    dev = make_env(vram="8M").open()
    pinned = dev.create(2 * MiB)
    dev.execbuffer([_fill(pinned, byte=9)])
    dev.pin(pinned)
    assert dev.info(pinned).placement == "vram"
    hs = [_written(dev, 2 * MiB, seed=i)[0] for i in range(4)]
    copies = [Copy(src=hs[i], src_offset=0, dst=hs[i + 1], dst_offset=0, length=8) for i in range(3)]
    assert errno_of(dev.execbuffer, copies) == errno.ENOSPC  # 4 x 2 MiB + 2 MiB pinned > 8 MiB
    assert all(dev.info(h).placement == "system" for h in hs)
    dev.execbuffer(copies[:2])  # 3 x 2 MiB + 2 MiB pinned fit
    dev.unpin(pinned)
    dev.execbuffer(copies)  # and now it can be evicted
    assert dev.info(pinned).placement == "system"
    assert dev.pread(pinned, 0, 16) == b"\x09" * 16


def test_no_contiguous_hole_between_pinned_objects_is_enospc_and_changes_nothing(make_env, errno_of):
    # Four 2 MiB objects fill 8 MiB of VRAM; pinning the 1st and 3rd leaves two free-able
    # slots that are never adjacent, whatever end the allocator fills from.
    dev = make_env(vram="8M").open()
    objs = [_written(dev, 2 * MiB, seed=i) for i in range(4)]
    for i, (h, _) in enumerate(objs):
        dev.execbuffer([_fill(h, byte=0x10 + i)])
    for h, _ in objs[0::2]:
        dev.pin(h)
    assert all(dev.info(h).placement == "vram" for h, _ in objs)
    big = dev.create(4 * MiB)
    before = dev.stats()
    assert errno_of(dev.execbuffer, [_fill(big)]) == errno.ENOSPC
    after = dev.stats()
    for key in ("vram_bytes", "evicted_total", "bytes_moved_total"):
        assert after[key] == before[key], key
    assert all(dev.info(h).placement == "vram" for h, _ in objs)
    assert dev.info(big).placement == "none"
    for i, (h, data) in enumerate(objs):
        assert dev.pread(h, 0, 2 * MiB) == _filled(data, 0, 16, 0x10 + i)


# -- VRAM overcommit -------------------------------------------------------------------


@pytest.mark.parametrize("small_first", [True, False])
def test_a_placement_that_exists_is_found_whatever_the_command_order(make_env, small_first):
    # VRAM slots a b c d (2 MiB each, filled in order from one end), b pinned, c least
    # recently used. A working set of 2 + 4 MiB fits only as 4 MiB over c+d and 2 MiB over a;
    # placing the small one first into the LRU victim's slot (c) would leave no 4 MiB hole.
    dev = make_env(vram="8M").open()
    objs = [_written(dev, 2 * MiB, seed=20 + i) for i in range(4)]
    (a, _), (b, _), (c, _), (d, _) = objs
    for h, _ in objs:
        dev.execbuffer([_fill(h, byte=0x20 + h)])
    dev.pin(b)
    dev.execbuffer([_fill(a, byte=0x20 + a)])
    dev.execbuffer([_fill(d, byte=0x20 + d)])  # LRU now: c, a, d
    small, large = dev.create(2 * MiB), dev.create(4 * MiB)
    cmds = [_fill(small, byte=1), _fill(large, byte=2)]
    dev.execbuffer(cmds if small_first else cmds[::-1])
    assert dev.info(small).placement == dev.info(large).placement == "vram"
    assert dev.info(b).placement == "vram"
    assert dev.stats()["vram_bytes"] == 8 * MiB
    for h, data in objs:
        assert dev.pread(h, 0, 2 * MiB) == _filled(data, 0, 16, 0x20 + h)
    assert dev.pread(large, 0, 32) == b"\x02" * 16 + bytes(16)


def test_vram_overcommit_keeps_every_objects_data(make_env):
    dev = make_env(vram="8M").open()
    objs = [_written(dev, 2 * MiB, seed=100 + i) for i in range(12)]
    expected = []
    for i, (h, data) in enumerate(objs):
        dev.execbuffer([_fill(h, offset=i * 4096 + 7, length=100, byte=i + 1)])
        expected.append(_filled(data, i * 4096 + 7, 100, i + 1))
        assert dev.stats()["vram_bytes"] <= 8 * MiB
    stats = dev.stats()
    assert stats["evicted_total"] > 0 and stats["bytes_moved_total"] > 0
    assert sum(dev.info(h).placement == "vram" for h, _ in objs) <= 4
    for (h, _), want in zip(objs, expected, strict=True):
        assert dev.pread(h, 0, 2 * MiB) == want


def test_vram_overcommit_round_trips_twice(make_env):
    # every object goes out and back in again: copies both ways keep the data
    dev = make_env(vram="8M").open()
    objs = [_written(dev, 2 * MiB, seed=200 + i) for i in range(6)]
    expected = [bytearray(d) for _, d in objs]
    for rnd in range(2):
        for i, (h, _) in enumerate(objs):
            off = rnd * 8192 + i
            dev.execbuffer([_fill(h, offset=off, length=10, byte=0x80 + i)])
            expected[i][off:off + 10] = bytes([0x80 + i]) * 10
    for (h, _), want in zip(objs, expected, strict=True):
        assert dev.pread(h, 0, 2 * MiB) == bytes(want)


def test_dontneed_objects_are_dropped_when_evicted(make_env, errno_of):
    dev = make_env(vram="8M").open()
    gone = [_written(dev, 2 * MiB, seed=i)[0] for i in range(2)]
    kept = [_written(dev, 2 * MiB, seed=10 + i) for i in range(2)]
    for h in gone + [h for h, _ in kept]:
        dev.execbuffer([_fill(h, byte=1)])
    for h in gone:
        assert dev.madvise(h, ugem.DONTNEED) is True  # in VRAM: resident, not purged yet
    dev.wait(kept[-1][0], -1)
    before = dev.stats()
    for h, _ in kept:  # most recently used: these stay in VRAM
        dev.execbuffer([_fill(h, byte=1)])
    for _ in range(2):  # 4 MiB more: evicts the two least recently used, the DONTNEED ones
        dev.execbuffer([_fill(dev.create(2 * MiB), byte=2)])  # never populated: cleared, not copied
    after = dev.stats()
    assert after["evicted_total"] == before["evicted_total"] + 2
    assert after["purged_total"] == before["purged_total"] + 2
    assert after["bytes_moved_total"] == before["bytes_moved_total"]  # dropped, not copied out
    for h in gone:
        info = dev.info(h)
        assert (info.placement, info.madvise) == ("purged", "purged")
        assert errno_of(dev.pread, h, 0, 16) == errno.EFAULT
        assert dev.madvise(h, ugem.WILLNEED) is False
    for h, data in kept:
        assert dev.pread(h, 0, 2 * MiB) == _filled(data, 0, 16, 1)


def test_eviction_of_busy_objects_is_pipelined(make_env):
    # a and b are in VRAM and busy behind a blocked SemaphoreWait; c needs a's room. The
    # execbuffer returns at once: the eviction is queued behind the work, which lands first.
    dev = make_env(vram="4M", hang_timeout=5).open()
    sem = dev.create(PAGE)
    dev.set_caching(sem, ugem.CACHING_CACHED)
    gate = dev.mmap(sem)
    try:
        (a, a_data), (b, b_data) = _written(dev, 2 * MiB, seed=1), _written(dev, 2 * MiB, seed=2)
        dev.execbuffer([SemaphoreWait(obj=sem, offset=0, value=1), _fill(a, byte=0xA1), _fill(b, byte=0xB1)])
        c = dev.create(2 * MiB)
        start = time.monotonic()
        fence = dev.execbuffer([_fill(c, byte=0xC1)])
        assert time.monotonic() - start < 1.0
        assert dev.busy(c) and dev.busy(a) and dev.busy(b)
        assert dev.stats()["evicted_total"] == 1
    finally:
        gate[0:4] = (1).to_bytes(4, "little")
        gate.release()
    assert dev.wait_fence(fence, -1) == -1
    assert dev.pread(a, 0, 2 * MiB) == _filled(a_data, 0, 16, 0xA1)
    assert dev.pread(b, 0, 2 * MiB) == _filled(b_data, 0, 16, 0xB1)
    assert dev.pread(c, 0, 32) == b"\xc1" * 16 + bytes(16)


def test_evicting_a_clean_object_copies_nothing_back(make_env):
    dev = make_env(vram="4M").open()
    a, data = _written(dev, 2 * MiB, seed=1)
    sink = dev.create(PAGE)
    dev.set_caching(sink, ugem.CACHING_CACHED)  # used in place: needs no VRAM
    dev.execbuffer([Copy(src=a, src_offset=0, dst=sink, dst_offset=0, length=PAGE)])  # a only read
    dev.wait(a, -1)
    assert dev.info(a).placement == "vram"
    before = dev.stats()
    b, c = dev.create(2 * MiB), dev.create(2 * MiB)
    dev.execbuffer([_fill(b, byte=1)])
    dev.execbuffer([_fill(c, byte=2)])  # evicts a, which the device never wrote
    after = dev.stats()
    assert dev.info(a).placement == "system"
    assert after["evicted_total"] == before["evicted_total"] + 1
    assert after["bytes_moved_total"] == before["bytes_moved_total"]  # b and c were cleared, a not copied
    dev.execbuffer([_fill(a, byte=3)])  # a back in (a copy), b out (dirty: a copy)
    assert dev.stats()["bytes_moved_total"] == after["bytes_moved_total"] + 4 * MiB
    assert dev.pread(a, 0, 2 * MiB) == _filled(data, 0, 16, 3)
    assert dev.pread(b, 0, 32) == b"\x01" * 16 + bytes(16)


def test_objects_pinned_in_vram_are_never_evicted(make_env):
    dev = make_env(vram="8M").open()
    pinned, pinned_data = _written(dev, 2 * MiB, seed=1)
    dev.execbuffer([_fill(pinned, offset=5, length=5, byte=0xAA)])
    dev.pin(pinned)
    assert dev.info(pinned).placement == "vram"
    evicted = dev.stats()["evicted_total"]
    objs = [_written(dev, 2 * MiB, seed=50 + i) for i in range(8)]
    for i, (h, _) in enumerate(objs):
        dev.execbuffer([_fill(h, byte=i)])
        assert dev.info(pinned).placement == "vram"
    assert dev.stats()["evicted_total"] > evicted  # the others did go
    # still usable by the device, in place
    dev.execbuffer([Copy(src=pinned, src_offset=0, dst=objs[0][0], dst_offset=0, length=64)])
    want = _filled(pinned_data, 5, 5, 0xAA)
    assert dev.pread(pinned, 0, 2 * MiB) == want  # pread of an object pinned in VRAM reads VRAM
    assert dev.info(pinned).placement == "vram"
    assert dev.pread(objs[0][0], 0, 64) == want[:64]
    for i, (h, data) in enumerate(objs[1:], start=1):
        assert dev.pread(h, 0, 2 * MiB) == _filled(data, 0, 16, i)



# -- CPU access to objects pinned in VRAM, device access to objects pinned in system ----


def _pinned_in_vram(dev, size: int, seed: int) -> tuple[int, bytes]:
    h, data = _written(dev, size, seed)
    dev.execbuffer([_fill(h, offset=3, length=5, byte=0xAA)])
    dev.pin(h)
    assert dev.info(h).placement == "vram"
    return h, _filled(data, 3, 5, 0xAA)


def test_pread_and_pwrite_of_an_object_pinned_in_vram_go_to_vram(make_env):
    dev = make_env(vram="8M").open()
    size = 512 * 1024  # large enough for the bulk path through the daemon
    h, want = _pinned_in_vram(dev, size, seed=1)
    assert dev.pread(h, 0, size) == want
    small, bulk = b"inline write", _data(2, 256 * 1024)
    dev.pwrite(h, 100, small)
    dev.pwrite(h, 200 * 1024, bulk)
    want = bytearray(want)
    want[100:100 + len(small)] = small
    want[200 * 1024:200 * 1024 + len(bulk)] = bulk
    assert dev.info(h).placement == "vram"
    assert dev.pread(h, 0, size) == bytes(want)
    # the device sees the CPU's writes, and the CPU the device's, in timeline order
    other = dev.create(size)
    dev.execbuffer([Copy(src=h, src_offset=0, dst=other, dst_offset=0, length=size), _fill(h, length=4, byte=1)])
    assert dev.pread(h, 0, 8) == b"\x01" * 4 + bytes(want[4:8])
    assert dev.pread(other, 0, size) == bytes(want)
    assert dev.info(h).placement == "vram"


def test_mapping_or_exporting_an_object_pinned_in_vram_is_ebusy(make_env, errno_of):
    dev = make_env(vram="8M").open()
    h, _ = _pinned_in_vram(dev, PAGE, seed=3)
    assert errno_of(dev.mmap, h) == errno.EBUSY
    assert errno_of(dev.mmap, h, writable=False) == errno.EBUSY
    assert errno_of(dev.export, h) == errno.EBUSY
    assert errno_of(dev.export, h, writable=False) == errno.EBUSY
    dev.unpin(h)
    dev.mmap(h, writable=False).release()  # brought back to system memory now
    assert dev.info(h).placement == "system"


def test_objects_pinned_in_system_memory_are_used_in_place(make_env):
    dev = make_env(vram="8M").open()
    h, data = _written(dev, 2 * PAGE, seed=4)
    dev.pin(h)
    assert dev.info(h).placement == "system"
    m = dev.mmap(h)
    dev.execbuffer([_fill(h, offset=PAGE, length=PAGE, byte=0x7E)])
    assert dev.wait(h, -1) == -1
    assert dev.info(h).placement == "system"
    assert dev.stats()["vram_bytes"] == 0
    assert bytes(m) == data[:PAGE] + b"\x7e" * PAGE  # coherent: no set_domain needed
    m[0:3] = b"cpu"
    other = dev.create(PAGE)
    dev.execbuffer([Copy(src=h, src_offset=0, dst=other, dst_offset=0, length=3)])
    assert dev.pread(other, 0, 3) == b"cpu"
    m.release()


def test_foreign_memory_is_used_in_place(make_env, sealed_memfd):
    dev = make_env(vram="8M").open()
    fd = sealed_memfd(2 * PAGE, data=b"foreign bytes")
    h = dev.import_fd(fd)
    out = dev.create(PAGE)
    dev.execbuffer([_fill(h, offset=PAGE, length=8, byte=0x66),
                    Copy(src=h, src_offset=0, dst=out, dst_offset=0, length=13)])
    assert dev.wait(h, -1) == -1
    assert dev.stats()["vram_bytes"] == PAGE  # only `out`
    assert os.pread(fd, 8, PAGE) == b"\x66" * 8  # written where it is, seen without any hand-over
    assert dev.pread(out, 0, 13) == b"foreign bytes"
    assert dev.info(h).placement == "system"


def test_closing_an_object_pinned_in_vram_gives_its_vram_back(make_env):
    dev = make_env(vram="8M").open()
    h, _ = _pinned_in_vram(dev, 2 * MiB, seed=5)
    assert dev.stats()["vram_bytes"] == 2 * MiB
    dev.close_handle(h)
    assert dev.stats()["vram_bytes"] == 0
    assert dev.stats()["pinned_bytes"] == 0


# -- VRAM and the system budget ---------------------------------------------------------


def test_eviction_past_the_system_budget_spills_and_keeps_the_data(make_env):
    # Objects whose contents exist only in VRAM: evicting them must add system pages beyond
    # the budget (eviction never fails), and the budget is then restored by spilling.
    dev = make_env(vram="8M", system_budget="4M").open()
    objs = []
    for i in range(8):
        h = dev.create(2 * MiB)
        dev.execbuffer([Fill(dst=h, offset=0, length=2 * MiB, byte=0x40 + i), _fill(h, offset=i, byte=0xFF)])
        objs.append((h, _filled(bytes([0x40 + i]) * 2 * MiB, i, 16, 0xFF)))
    assert dev.stats()["evicted_total"] >= 4
    for h, want in objs:
        assert dev.pread(h, 0, 2 * MiB) == want
    assert dev.stats()["spilled_total"] > 0


def test_a_spilled_object_used_by_the_device_comes_back_first(make_env):
    dev = make_env(vram="8M", system_budget="4M").open()
    objs = [_written(dev, MiB, seed=60 + i) for i in range(8)]  # 8 MiB written: the oldest are spilled
    first, data = objs[0]
    assert dev.info(first).placement == "spilled"
    out = dev.create(MiB)
    dev.execbuffer([Copy(src=first, src_offset=0, dst=out, dst_offset=0, length=MiB), _fill(first, byte=3)])
    assert dev.pread(out, 0, MiB) == data
    assert dev.pread(first, 0, MiB) == _filled(data, 0, 16, 3)


# -- holes stay holes: the device path is held to the budget ----------------------------


def _evict_by_pressure(dev) -> None:
    """Take every unpinned object out of VRAM by placing one that needs all of it."""
    other = dev.create(dev.stats()["vram_size"])
    dev.execbuffer([Fill(dst=other, offset=0, length=8, byte=1)])
    dev.close_handle(other)


@pytest.mark.parametrize("back", ["set_domain_cpu", "evicted"])
@pytest.mark.parametrize("how", ["set_domain_device", "execbuffer"])
def test_a_sparse_object_stays_sparse_on_its_way_to_the_device_and_back(make_env, how, back):
    # a 128 MiB object holding 8 written bytes under a 16 MiB budget: no move may fill its
    # holes (reading them through a mapping would allocate every page, uncounted)
    dev = make_env(system_budget="16M", vram="128M").open()
    size = 128 * MiB
    h = dev.create(size)
    dev.pwrite(h, 64 * MiB, b"8 bytes!")
    expected = {64 * MiB: b"8 bytes!"}
    if how == "set_domain_device":
        dev.set_domain(h, ugem.DOMAIN_DEVICE)
    else:  # the device writes a page of its own: copied back when it leaves VRAM
        dev.wait_fence(dev.execbuffer([Fill(dst=h, offset=100 * MiB + 8, length=8, byte=0x42)]), -1)
        expected[100 * MiB] = bytes(8) + b"\x42" * 8
    assert dev.info(h).placement == "vram"
    assert dev.stats()["resident_bytes"] <= 2 * PAGE
    if back == "set_domain_cpu":
        dev.set_domain(h, ugem.DOMAIN_CPU)
    else:
        _evict_by_pressure(dev)
    assert dev.info(h).placement == "system"
    assert dev.stats()["resident_bytes"] <= len(expected) * PAGE
    for offset, data in expected.items():
        assert dev.pread(h, offset, len(data)) == data
    assert dev.pread(h, 0, 16) == bytes(16) and dev.pread(h, size - 16, 16) == bytes(16)
    assert dev.stats()["resident_bytes"] <= len(expected) * PAGE


def test_an_object_only_in_vram_comes_back_with_only_the_pages_the_device_wrote(make_env):
    dev = make_env(system_budget="16M", vram="128M").open()
    h = dev.create(64 * MiB)  # never had system pages
    dev.execbuffer([Fill(dst=h, offset=3 * PAGE + 5, length=PAGE, byte=0x17)])  # two pages
    dev.suspend()  # saves VRAM to system memory
    dev.resume()
    assert dev.info(h).placement == "system"
    assert dev.stats()["resident_bytes"] <= 2 * PAGE
    assert dev.pread(h, 3 * PAGE, PAGE + 16) == bytes(5) + b"\x17" * PAGE + bytes(11)


def test_a_sparse_object_moved_again_before_its_copy_back_landed_reads_back_exactly(make_env):
    # evicted (its copy back queued behind held work), moved in again, written and evicted
    # again: where the first copy back writes is unknown when the second is queued
    dev = make_env(vram="8M", hang_timeout=120).open()
    sem = dev.create(PAGE)
    dev.set_caching(sem, ugem.CACHING_CACHED)
    view = dev.mmap(sem)
    h = dev.create(4 * MiB)
    dev.pwrite(h, 0, b"start")
    dev.execbuffer([Fill(dst=h, offset=MiB, length=PAGE, byte=0x33)])
    dev.execbuffer([SemaphoreWait(obj=sem, offset=0, value=1)])  # hold the device
    _evict_by_pressure(dev)  # h's copy back waits behind the semaphore
    dev.execbuffer([Fill(dst=h, offset=MiB, length=PAGE, byte=0)])  # back in; the page now zeros
    _evict_by_pressure(dev)
    view[0:4] = (1).to_bytes(4, "little")
    view.release()
    assert dev.pread(h, MiB, PAGE) == bytes(PAGE)
    assert dev.pread(h, 0, 5) == b"start"
