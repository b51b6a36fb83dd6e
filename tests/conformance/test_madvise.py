"""madvise: purgeable objects (SPEC §2 madvise, §3 "budget", §8 first bullet; gem-reference
§2.7 MADVISE, §4.3 shrinker, §5.5 IGT gem_madvise dontneed-before-*/dontneed-after-mmap).

Pressure is made the honest way: a manager with a small `system_budget`, then new
objects written until the budget has to be freed. Where a test shows that something is
*not* purged, a plain DONTNEED object of the same age sits beside it and must be purged by
the same pressure, so the test cannot pass merely because nothing happened.
"""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

import ugem
from ugem.testing.data import random_bytes as _data
from ugem.testing.data import write_new as _written

PAGE = ugem.PAGE_SIZE
MiB = 1 << 20
BUDGET = 16 * MiB


def _pressure(dev, total: int = BUDGET, size: int = 2 * MiB, seed: int = 1000) -> list[int]:
    """Write `total` bytes into new objects (enough to push every older object out)."""
    handles = []
    for i in range(total // size):
        h, _ = _written(dev, size, seed + i)
        handles.append(h)
    return handles


@pytest.fixture
def small(make_env):
    """A client of a manager whose system budget is BUDGET."""
    return make_env(system_budget=BUDGET).open()


# -- errno -----------------------------------------------------------------------------


@pytest.mark.parametrize("advice", [2, 3, 0x101, 2**31, 2**32 - 1, -1, 2**40])
def test_advice_other_than_willneed_or_dontneed_is_einval(dev, errno_of, advice):
    h = dev.create(PAGE)
    assert errno_of(dev.madvise, h, advice) == errno.EINVAL
    assert dev.info(h).madvise == "willneed"


def test_purged_cannot_be_set_by_the_client(dev, errno_of):
    # __I915_MADV_PURGED (2) is internal state, never accepted as advice
    h = dev.create(PAGE)
    dev.pwrite(h, 0, b"kept")
    assert errno_of(dev.madvise, h, 2) == errno.EINVAL
    assert dev.info(h).placement == "system"
    assert dev.pread(h, 0, 4) == b"kept"


@pytest.mark.parametrize("handle", [0, 2, 99, 2**32])
def test_bad_advice_is_checked_before_the_handle(dev, errno_of, handle):
    dev.create(PAGE)  # handle 1
    assert errno_of(dev.madvise, handle, 2) == errno.EINVAL


@pytest.mark.parametrize("advice", [ugem.WILLNEED, ugem.DONTNEED])
@pytest.mark.parametrize("handle", [0, 2, 99, 2**32])
def test_unknown_handle_is_enoent(dev, errno_of, advice, handle):
    dev.create(PAGE)  # handle 1
    assert errno_of(dev.madvise, handle, advice) == errno.ENOENT


def test_closed_handle_is_enoent(dev, errno_of):
    h = dev.create(PAGE)
    dev.close_handle(h)
    assert errno_of(dev.madvise, h, ugem.DONTNEED) == errno.ENOENT


def test_another_clients_handle_is_enoent(env, errno_of):
    owner, other = env.open(), env.open()
    owner.create(PAGE)
    other.create(PAGE)
    owner.create(PAGE)  # handle 2 exists only in owner
    assert errno_of(other.madvise, 2, ugem.DONTNEED) == errno.ENOENT
    assert owner.info(2).madvise == "willneed"


# -- retained --------------------------------------------------------------------------


def test_willneed_returns_retained(dev):
    h = dev.create(PAGE)
    assert dev.madvise(h, ugem.WILLNEED) is True
    assert dev.info(h).madvise == "willneed"
    assert dev.info(h).placement == "none"  # advice alone populates nothing


def test_dontneed_with_pages_returns_retained(dev):
    h = dev.create(PAGE)
    dev.pwrite(h, 0, b"x")
    assert dev.madvise(h, ugem.DONTNEED) is True
    info = dev.info(h)
    assert (info.madvise, info.placement) == ("dontneed", "system")


def test_willneed_after_dontneed_is_willneed_again(dev):
    h = dev.create(PAGE)
    dev.pwrite(h, 0, b"x")
    dev.madvise(h, ugem.DONTNEED)
    assert dev.madvise(h, ugem.WILLNEED) is True
    assert dev.info(h).madvise == "willneed"


def test_advice_is_per_object_not_per_handle(env):
    owner, other = env.open(), env.open()
    h = owner.create(PAGE)
    owner.pwrite(h, 0, b"x")
    hh, _ = other.open_name(owner.flink(h))
    assert other.madvise(hh, ugem.DONTNEED) is True
    assert owner.info(h).madvise == "dontneed"


# -- DONTNEED on an object without pages: purged at once -------------------------------


def test_dontneed_on_a_never_used_object_purges_it_at_once(dev):
    # gem-reference §2.7 step 6: "gem_create + DONTNEED gives retained = 0 immediately"
    h = dev.create(4 * PAGE)
    assert dev.madvise(h, ugem.DONTNEED) is False
    info = dev.info(h)
    assert (info.placement, info.madvise, info.size) == ("purged", "purged", 4 * PAGE)


def test_purging_a_never_used_object_is_counted(make_env):
    dev = make_env().open()
    before = dev.stats()
    dev.madvise(dev.create(PAGE), ugem.DONTNEED)
    after = dev.stats()
    assert after["purged_total"] == before["purged_total"] + 1
    assert after["resident_bytes"] == before["resident_bytes"] == 0


def test_a_read_of_a_never_used_object_does_not_save_it(dev):
    # reading a never-used object returns zeros without populating it, so it has no pages
    h = dev.create(PAGE)
    assert dev.pread(h, 0, 16) == bytes(16)
    assert dev.madvise(h, ugem.DONTNEED) is False


def _purged(dev) -> int:
    h = dev.create(2 * PAGE)
    assert dev.madvise(h, ugem.DONTNEED) is False
    return h


def test_pread_of_a_purged_object_is_efault(dev, errno_of):
    h = _purged(dev)
    assert errno_of(dev.pread, h, 0, 16) == errno.EFAULT


def test_large_pread_of_a_purged_object_is_efault(dev, errno_of):
    h = dev.create(64 * PAGE)
    dev.madvise(h, ugem.DONTNEED)
    assert errno_of(dev.pread, h, 0, 64 * PAGE) == errno.EFAULT
    assert errno_of(dev.pread_into, h, 0, bytearray(64 * PAGE)) == errno.EFAULT


def test_pwrite_of_a_purged_object_is_efault(dev, errno_of):
    # IGT gem_madvise dontneed-before-pwrite
    h = _purged(dev)
    assert errno_of(dev.pwrite, h, 0, b"late") == errno.EFAULT
    assert dev.info(h).placement == "purged"


def test_large_pwrite_of_a_purged_object_is_efault(dev, errno_of):
    h = dev.create(64 * PAGE)
    dev.madvise(h, ugem.DONTNEED)
    assert errno_of(dev.pwrite, h, 0, bytes(64 * PAGE)) == errno.EFAULT


def _purge_during_transfer(monkeypatch, env, victim_size: int, name: str) -> None:
    """Make the client library's copy of a bulk transfer (`name` in ugem.client.device_xfer) first
    have another client write enough under the budget that a DONTNEED victim of
    `victim_size` bytes is purged: the purge lands while the transfer is open."""
    from ugem.client import device_xfer as client_device

    other = env.open()
    copy = getattr(client_device, name)

    def purge_then_copy(*args):
        monkeypatch.setattr(client_device, name, copy)  # once
        h = other.create(BUDGET)
        other.pwrite(h, 0, b"\x01" * (BUDGET - victim_size + PAGE))
        return copy(*args)

    monkeypatch.setattr(client_device, name, purge_then_copy)


@pytest.mark.parametrize("call", ["pread", "pread_into"])
def test_pread_of_an_object_purged_during_its_transfer_is_efault(make_env, mode, monkeypatch, errno_of, call):
    # over 128 KiB a pread moves through the object's memory directly (XFER): a purge then
    # makes that memory read zeros, which must never come back as data
    if call == "pread_into" and mode == "embedded":
        pytest.skip("an embedded pread_into copies under the manager's lock, with no transfer")
    env = make_env(system_budget=BUDGET)
    dev = env.open()
    size = 64 * PAGE
    h, _ = _written(dev, size, seed=7)
    assert dev.madvise(h, ugem.DONTNEED) is True
    _purge_during_transfer(monkeypatch, env, size, "pread_all" if call == "pread" else "preadv_all")
    if call == "pread":
        assert errno_of(dev.pread, h, 0, size) == errno.EFAULT
    else:
        assert errno_of(dev.pread_into, h, 0, bytearray(size)) == errno.EFAULT
    assert dev.info(h).placement == "purged"
    assert errno_of(dev.pread, h, 0, size) == errno.EFAULT  # and from now on at once


def test_pwrite_to_an_object_purged_during_its_transfer_is_efault(make_env, mode, monkeypatch, errno_of):
    if mode == "embedded":
        pytest.skip("an embedded pwrite copies under the manager's lock, with no transfer")
    env = make_env(system_budget=BUDGET)
    dev = env.open()
    size = 64 * PAGE
    h, _ = _written(dev, size, seed=8)
    assert dev.madvise(h, ugem.DONTNEED) is True
    _purge_during_transfer(monkeypatch, env, size, "pwritev_all")
    assert errno_of(dev.pwrite, h, 0, b"\x02" * size) == errno.EFAULT  # the bytes were discarded
    assert dev.info(h).placement == "purged"


def test_pread_and_pwrite_of_length_zero_on_a_purged_object_are_empty(dev):
    # length 0 returns before the lookup, so before the EFAULT check too
    h = _purged(dev)
    assert dev.pread(h, 0, 0) == b""
    dev.pwrite(h, 0, b"")


def test_range_is_checked_before_purged(dev, errno_of):
    h = _purged(dev)
    assert errno_of(dev.pread, h, 2 * PAGE, 1) == errno.EINVAL
    assert errno_of(dev.pwrite, h, 2 * PAGE - 1, b"ab") == errno.EINVAL


def test_mmap_of_a_purged_object_is_efault(dev, errno_of):
    # IGT gem_madvise dontneed-before-mmap; SPEC §8: mmap of an already purged object fails
    h = _purged(dev)
    assert errno_of(dev.mmap, h) == errno.EFAULT
    assert errno_of(dev.mmap, h, writable=False) == errno.EFAULT


def test_export_of_a_purged_object_is_efault(dev, errno_of):
    h = _purged(dev)
    fds_before = len(os.listdir("/proc/self/fd"))
    assert errno_of(dev.export, h) == errno.EFAULT
    assert errno_of(dev.export, h, writable=False) == errno.EFAULT
    assert len(os.listdir("/proc/self/fd")) == fds_before


def test_pin_of_a_purged_object_is_efault(dev, errno_of):
    h = _purged(dev)
    assert errno_of(dev.pin, h) == errno.EFAULT
    assert dev.info(h).pinned is False


def test_purged_object_still_answers_info_flink_and_close(dev, errno_of):
    h = _purged(dev)
    assert dev.flink(h) > 0
    assert dev.info(h).placement == "purged"
    dev.close_handle(h)
    assert errno_of(dev.info, h) == errno.ENOENT


def test_willneed_after_purge_stays_purged(dev, errno_of):
    # purged is final: WILLNEED does not resurrect anything
    h = _purged(dev)
    assert dev.madvise(h, ugem.WILLNEED) is False
    info = dev.info(h)
    assert (info.placement, info.madvise) == ("purged", "purged")
    assert errno_of(dev.pwrite, h, 0, b"x") == errno.EFAULT


def test_dontneed_again_after_purge_is_still_not_retained(dev):
    h = _purged(dev)
    assert dev.madvise(h, ugem.DONTNEED) is False
    assert dev.info(h).madvise == "purged"


def test_every_handle_sees_the_purge(env, errno_of):
    owner, other = env.open(), env.open()
    h = owner.create(PAGE)
    hh, _ = other.open_name(owner.flink(h))
    owner.madvise(h, ugem.DONTNEED)
    assert other.info(hh).placement == "purged"
    assert other.madvise(hh, ugem.WILLNEED) is False
    assert errno_of(other.pread, hh, 0, 1) == errno.EFAULT


# -- DONTNEED on an object with pages: kept until pressure -----------------------------


def test_dontneed_object_with_pages_stays_readable_and_writable(dev):
    h = dev.create(2 * PAGE)
    dev.pwrite(h, 0, b"cached")
    assert dev.madvise(h, ugem.DONTNEED) is True
    assert dev.pread(h, 0, 6) == b"cached"
    dev.pwrite(h, PAGE, b"more")
    assert dev.pread(h, PAGE, 4) == b"more"
    view = dev.mmap(h, writable=False)
    assert bytes(view[:6]) == b"cached"
    del view
    info = dev.info(h)
    assert (info.placement, info.madvise) == ("system", "dontneed")


def test_dontneed_object_with_pages_is_purged_under_pressure(small, errno_of):
    h, _ = _written(small, 4 * MiB, seed=1)
    assert small.madvise(h, ugem.DONTNEED) is True
    before = small.stats()
    _pressure(small)
    after = small.stats()
    info = small.info(h)
    assert (info.placement, info.madvise) == ("purged", "purged")
    assert small.madvise(h, ugem.WILLNEED) is False
    assert errno_of(small.pread, h, 0, 1) == errno.EFAULT
    assert after["purged_total"] == before["purged_total"] + 1


def test_purgeable_bytes_counts_resident_dontneed_objects(small):
    a, _ = _written(small, 2 * MiB, seed=1)
    b, _ = _written(small, 3 * MiB, seed=2)
    _written(small, 1 * MiB, seed=3)
    assert small.stats()["purgeable_bytes"] == 0
    small.madvise(a, ugem.DONTNEED)
    small.madvise(b, ugem.DONTNEED)
    assert small.stats()["purgeable_bytes"] == 5 * MiB
    small.madvise(b, ugem.WILLNEED)
    assert small.stats()["purgeable_bytes"] == 2 * MiB


def test_a_purge_gives_the_resident_memory_back(small):
    h, _ = _written(small, 4 * MiB, seed=1)
    small.madvise(h, ugem.DONTNEED)
    _pressure(small, total=BUDGET - 4 * MiB)  # exactly fills what is left: nothing purged yet
    assert small.info(h).placement == "system"
    assert small.stats()["resident_bytes"] == BUDGET
    _written(small, 1 * MiB, seed=99)
    stats = small.stats()
    assert small.info(h).placement == "purged"
    assert stats["resident_bytes"] == BUDGET - 3 * MiB
    assert stats["purgeable_bytes"] == 0
    assert stats["spilled_total"] == 0


def test_mapped_dontneed_object_is_purged_and_its_mapping_reads_zeros(small):
    # SPEC §3: purge takes "also mapped ones, whose mappings then read zeros" (§8: not SIGBUS)
    h, data = _written(small, 4 * MiB, seed=1)
    view = small.mmap(h)
    assert bytes(view[:64]) == data[:64]
    small.madvise(h, ugem.DONTNEED)
    _pressure(small)
    assert small.info(h).placement == "purged"
    assert not np.frombuffer(view, dtype=np.uint8).any()
    del view


def test_mapped_caches_are_purged_while_still_mapped(small):
    # IGT gem_shrink mmap mode with the mappings kept: only the next mmap notices their pages
    views = []
    for i in range(12):
        h = small.create(4 * MiB)
        view = small.mmap(h)
        view[:] = _data(i, 4 * MiB)
        assert small.madvise(h, ugem.DONTNEED) is True
        views.append(view)
    stats = small.stats()
    assert stats["resident_bytes"] <= BUDGET + 4 * MiB  # the last one is not reclaimed yet
    assert stats["purged_total"] >= 12 - (BUDGET + 4 * MiB) // (4 * MiB)
    assert not np.frombuffer(views[0], dtype=np.uint8).any()  # purged: reads zeros (§8)
    del view, views


def test_dontneed_on_a_spilled_object_purges_it_at_once(small):
    h, _ = _written(small, 4 * MiB, seed=1)
    _pressure(small)  # everything older is pushed out of memory: h is spilled
    assert small.info(h).placement == "spilled"
    before = small.stats()
    assert before["spilled_bytes"] >= 4 * MiB
    assert small.madvise(h, ugem.DONTNEED) is False
    after = small.stats()
    info = small.info(h)
    assert (info.placement, info.madvise) == ("purged", "purged")
    assert after["spilled_bytes"] == before["spilled_bytes"] - 4 * MiB
    assert after["purged_total"] == before["purged_total"] + 1
    assert after["bytes_moved_total"] == before["bytes_moved_total"]  # nothing was brought back


def test_willneed_on_a_spilled_object_keeps_it(small):
    h, data = _written(small, 4 * MiB, seed=1)
    _pressure(small)
    assert small.info(h).placement == "spilled"
    assert small.madvise(h, ugem.WILLNEED) is True
    assert small.info(h).placement == "spilled"
    assert small.pread(h, 0, 4 * MiB) == data


# -- never purged: exported, pinned, foreign -------------------------------------------


def _control(dev) -> int:
    """A plain DONTNEED object the coming pressure must purge."""
    h, _ = _written(dev, 2 * MiB, seed=7)
    dev.madvise(h, ugem.DONTNEED)
    return h


def test_exported_object_is_never_purged(small, fds):
    h, data = _written(small, 4 * MiB, seed=1)
    fd = fds.add(small.export(h, writable=False))
    control = _control(small)
    assert small.madvise(h, ugem.DONTNEED) is True
    _pressure(small, total=2 * BUDGET)
    assert small.info(control).placement == "purged"
    info = small.info(h)
    assert (info.placement, info.madvise) == ("system", "dontneed")
    assert small.pread(h, 0, 4 * MiB) == data
    assert os.pread(fd, 4 * MiB, 0) == data


def test_an_exported_fd_closed_again_still_counts_as_exported(small, fds):
    # the manager cannot see another process close its copy (SPEC §8): exported stays exported
    h, data = _written(small, 4 * MiB, seed=1)
    fds.close(fds.add(small.export(h)))
    control = _control(small)
    small.madvise(h, ugem.DONTNEED)
    _pressure(small, total=2 * BUDGET)
    assert small.info(control).placement == "purged"
    assert small.info(h).placement == "system"
    assert small.pread(h, 0, 4 * MiB) == data


def test_adopted_memory_is_never_purged(small, fds):
    # an fd to an object's memory outlived the object and came back through import_fd:
    # whoever holds that fd shares the pages, exactly as with an export
    h, data = _written(small, 4 * MiB, seed=1)
    fd = fds.add(small.export(h))
    small.close_handle(h)
    adopted = small.import_fd(fd)
    control = _control(small)
    assert small.madvise(adopted, ugem.DONTNEED) is True
    _pressure(small, total=2 * BUDGET)
    assert small.info(control).placement == "purged"
    assert small.info(adopted).placement == "system"
    assert os.pread(fd, 4 * MiB, 0) == data


def test_pinned_object_is_never_purged(small):
    h, data = _written(small, 4 * MiB, seed=1)
    small.pin(h)
    control = _control(small)
    assert small.madvise(h, ugem.DONTNEED) is True
    _pressure(small, total=2 * BUDGET)
    assert small.info(control).placement == "purged"
    info = small.info(h)
    assert (info.placement, info.madvise, info.pinned) == ("system", "dontneed", True)
    assert small.pread(h, 0, 4 * MiB) == data


def test_pinned_by_another_client_is_never_purged(make_env):
    env = make_env(system_budget=BUDGET)
    owner, pinner = env.open(), env.open()
    h, data = _written(owner, 4 * MiB, seed=1)
    pinner.pin(pinner.open_name(owner.flink(h))[0])
    control = _control(owner)
    owner.madvise(h, ugem.DONTNEED)
    _pressure(owner, total=2 * BUDGET)
    assert owner.info(control).placement == "purged"
    assert owner.info(h).placement == "system"
    assert owner.pread(h, 0, 4 * MiB) == data


def test_never_used_pinned_then_dontneed_is_not_purged_at_once(dev):
    # pin populates, so the object has pages when the advice comes
    h = dev.create(4 * PAGE)
    dev.pin(h)
    assert dev.madvise(h, ugem.DONTNEED) is True
    assert dev.info(h).placement == "system"


def test_foreign_import_is_never_purged(small, sealed_memfd):
    data = _data(5, 4 * MiB)
    memfd = sealed_memfd(4 * MiB, data=data)
    h = small.import_fd(memfd)
    control = _control(small)
    assert small.madvise(h, ugem.DONTNEED) is True
    _pressure(small, total=2 * BUDGET)
    assert small.info(control).placement == "purged"
    info = small.info(h)
    assert (info.placement, info.madvise) == ("system", "dontneed")
    assert small.pread(h, 0, 4 * MiB) == data
    assert os.pread(memfd, 4 * MiB, 0) == data


def test_unpinned_object_becomes_purgeable_again(small):
    h, _ = _written(small, 4 * MiB, seed=1)
    small.pin(h)
    small.madvise(h, ugem.DONTNEED)
    _pressure(small)
    assert small.info(h).placement == "system"
    small.unpin(h)
    _pressure(small, seed=2000)
    assert small.info(h).placement == "purged"
