"""pin / unpin (SPEC §2 pin, unpin, stats pinned_bytes; §3 "budget": pinned objects are never
spilled or purged; §5 per-client limits: `pin_limit` in bytes, EDQUOT)."""

from __future__ import annotations

import errno

import pytest

import ugem
from ugem.testing.data import random_bytes as _data
from ugem.testing.data import write_new as _written

PAGE = ugem.PAGE_SIZE
MiB = 1 << 20
BUDGET = 16 * MiB


def _pressure(dev, total: int = BUDGET, size: int = 2 * MiB, seed: int = 1000) -> list[int]:
    return [_written(dev, size, seed + i)[0] for i in range(total // size)]


def _row(dev) -> dict:
    [row] = [c for c in dev.stats()["per_client"] if c["id"] == dev.client_id]
    return row


@pytest.fixture
def small(make_env):
    return make_env(system_budget=BUDGET, pin_limit=4 * BUDGET).open()


# -- errno -----------------------------------------------------------------------------


@pytest.mark.parametrize("handle", [0, 2, 99, 2**32])
def test_pin_of_an_unknown_handle_is_enoent(dev, errno_of, handle):
    dev.create(PAGE)  # handle 1
    assert errno_of(dev.pin, handle) == errno.ENOENT


@pytest.mark.parametrize("handle", [0, 2, 99, 2**32])
def test_unpin_of_an_unknown_handle_is_enoent(dev, errno_of, handle):
    dev.create(PAGE)
    assert errno_of(dev.unpin, handle) == errno.ENOENT


def test_pin_of_a_closed_handle_is_enoent(dev, errno_of):
    h = dev.create(PAGE)
    dev.close_handle(h)
    assert errno_of(dev.pin, h) == errno.ENOENT


def test_pin_of_a_purged_object_is_efault(dev, errno_of):
    h = dev.create(PAGE)
    assert dev.madvise(h, ugem.DONTNEED) is False
    assert errno_of(dev.pin, h) == errno.EFAULT
    assert dev.info(h).pinned is False


def test_pin_of_an_object_purged_under_pressure_is_efault(small, errno_of):
    h, _ = _written(small, 4 * MiB, seed=1)
    small.madvise(h, ugem.DONTNEED)
    _pressure(small)
    assert small.info(h).placement == "purged"
    assert errno_of(small.pin, h) == errno.EFAULT


def test_unpin_of_an_object_not_pinned_is_einval(dev, errno_of):
    h = dev.create(PAGE)
    assert errno_of(dev.unpin, h) == errno.EINVAL


def test_unpin_twice_is_einval(dev, errno_of):
    h = dev.create(PAGE)
    dev.pin(h)
    dev.unpin(h)
    assert errno_of(dev.unpin, h) == errno.EINVAL


def test_unpin_of_an_object_pinned_by_another_client_is_einval(env, errno_of):
    owner, other = env.open(), env.open()
    h = owner.create(PAGE)
    hh, _ = other.open_name(owner.flink(h))
    owner.pin(h)
    assert errno_of(other.unpin, hh) == errno.EINVAL
    assert owner.info(h).pinned is True
    assert _row(owner)["pinned_bytes"] == PAGE


def test_unpin_of_a_purged_object_not_pinned_is_einval(dev, errno_of):
    h = dev.create(PAGE)
    dev.madvise(h, ugem.DONTNEED)
    assert errno_of(dev.unpin, h) == errno.EINVAL


# -- pin_limit (EDQUOT) ----------------------------------------------------------------


@pytest.fixture
def limited(make_env):
    return make_env(pin_limit=8 * MiB)


def test_pins_up_to_the_limit_then_edquot(limited, errno_of):
    dev = limited.open()
    a, b, c = dev.create(4 * MiB), dev.create(4 * MiB), dev.create(PAGE)
    dev.pin(a)
    dev.pin(b)  # exactly at the limit
    assert errno_of(dev.pin, c) == errno.EDQUOT
    assert _row(dev)["pinned_bytes"] == 8 * MiB


def test_an_object_larger_than_the_limit_is_edquot(limited, errno_of):
    dev = limited.open()
    h = dev.create(8 * MiB + PAGE)
    assert errno_of(dev.pin, h) == errno.EDQUOT


def test_a_refused_pin_changes_nothing(limited, errno_of):
    dev = limited.open()
    dev.pin(dev.create(6 * MiB))
    h = dev.create(4 * MiB)
    before = dev.stats()
    assert errno_of(dev.pin, h) == errno.EDQUOT
    assert dev.stats() == before
    info = dev.info(h)
    assert (info.pinned, info.placement) == (False, "none")


def test_the_limit_counts_the_full_size_not_the_resident_pages(limited, errno_of):
    dev = limited.open()
    h = dev.create(8 * MiB)
    dev.pwrite(h, 0, b"one page")
    dev.pin(h)
    assert _row(dev)["pinned_bytes"] == 8 * MiB
    assert errno_of(dev.pin, dev.create(PAGE)) == errno.EDQUOT


def test_the_pin_limit_is_per_client(limited, errno_of):
    greedy, other = limited.open(), limited.open()
    greedy.pin(greedy.create(8 * MiB))
    assert errno_of(greedy.pin, greedy.create(PAGE)) == errno.EDQUOT
    a, b = other.create(4 * MiB), other.create(4 * MiB)
    other.pin(a)
    other.pin(b)  # its own 8 MiB, untouched by greedy's
    assert errno_of(other.pin, other.create(PAGE)) == errno.EDQUOT
    assert limited.open().stats()["pinned_bytes"] == 16 * MiB


def test_pinning_someone_elses_object_charges_the_pinner(limited, errno_of):
    owner, pinner = limited.open(), limited.open()
    h = owner.create(8 * MiB)
    hh, _ = pinner.open_name(owner.flink(h))
    pinner.pin(hh)
    assert (_row(owner)["pinned_bytes"], _row(pinner)["pinned_bytes"]) == (0, 8 * MiB)
    owner.pin(h)  # owner's own limit is still free
    assert errno_of(pinner.pin, pinner.create(PAGE)) == errno.EDQUOT


def test_unpinning_gives_the_limit_back(limited, errno_of):
    dev = limited.open()
    a, b = dev.create(8 * MiB), dev.create(4 * MiB)
    dev.pin(a)
    assert errno_of(dev.pin, b) == errno.EDQUOT
    dev.unpin(a)
    dev.pin(b)
    assert _row(dev)["pinned_bytes"] == 4 * MiB


# -- pinning twice ---------------------------------------------------------------------


def test_pinning_twice_is_a_no_op_counted_once(dev):
    h = dev.create(4 * PAGE)
    dev.pin(h)
    dev.pin(h)
    assert _row(dev)["pinned_bytes"] == 4 * PAGE
    dev.unpin(h)  # one unpin ends it
    assert dev.info(h).pinned is False
    assert _row(dev)["pinned_bytes"] == 0


def test_pinning_twice_at_the_limit_is_not_edquot(limited):
    dev = limited.open()
    h = dev.create(8 * MiB)
    dev.pin(h)
    dev.pin(h)
    assert _row(dev)["pinned_bytes"] == 8 * MiB


def test_pinning_through_a_second_handle_is_the_same_pin(dev, errno_of):
    h = dev.create(4 * PAGE)
    h2, _ = dev.open_name(dev.flink(h))
    dev.pin(h)
    dev.pin(h2)
    assert _row(dev)["pinned_bytes"] == 4 * PAGE
    dev.unpin(h2)
    assert dev.info(h).pinned is False
    assert errno_of(dev.unpin, h) == errno.EINVAL


def test_an_object_pinned_by_two_clients_counts_once_manager_wide(make_env):
    env = make_env()
    owner, other = env.open(), env.open()
    h = owner.create(4 * PAGE)
    hh, _ = other.open_name(owner.flink(h))
    owner.pin(h)
    other.pin(hh)
    stats = owner.stats()
    assert stats["pinned_bytes"] == 4 * PAGE
    assert (_row(owner)["pinned_bytes"], _row(other)["pinned_bytes"]) == (4 * PAGE, 4 * PAGE)
    owner.unpin(h)
    assert other.info(hh).pinned is True  # other's pin holds on
    assert owner.stats()["pinned_bytes"] == 4 * PAGE
    other.unpin(hh)
    assert owner.stats()["pinned_bytes"] == 0


# -- what a pin does -------------------------------------------------------------------


def test_pin_populates_the_whole_object(make_env):
    dev = make_env().open()
    h = dev.create(2 * MiB)
    assert dev.info(h).placement == "none"
    dev.pin(h)
    info = dev.info(h)
    assert (info.placement, info.pinned) == ("system", True)
    stats = dev.stats()
    assert stats["resident_bytes"] == 2 * MiB
    assert stats["pinned_bytes"] == 2 * MiB
    assert dev.pread(h, 0, 2 * MiB) == bytes(2 * MiB)


def test_pin_brings_a_spilled_object_back(small):
    h, data = _written(small, 4 * MiB, seed=1)
    _pressure(small)
    assert small.info(h).placement == "spilled"
    small.pin(h)
    info = small.info(h)
    assert (info.placement, info.pinned) == ("system", True)
    assert small.stats()["resident_bytes"] <= BUDGET
    assert small.pread(h, 0, 4 * MiB) == data


def test_pin_of_a_partly_written_spilled_object_keeps_its_contents(small):
    h = small.create(4 * MiB)
    small.pwrite(h, MiB, b"middle")
    _pressure(small)
    assert small.info(h).placement == "spilled"
    small.pin(h)
    assert small.pread(h, MiB - 2, 10) == b"\0\0middle\0\0"
    assert small.stats()["resident_bytes"] <= BUDGET


def test_a_pinned_object_is_never_spilled(small):
    h, data = _written(small, 4 * MiB, seed=1)
    small.pin(h)
    _pressure(small, total=2 * BUDGET)
    stats = small.stats()
    assert stats["spilled_total"] >= BUDGET // (2 * MiB)  # the pressure spilled others
    assert small.info(h).placement == "system"
    assert small.pread(h, 0, 4 * MiB) == data


def test_a_pinned_dontneed_object_is_never_purged(small):
    h, data = _written(small, 4 * MiB, seed=1)
    small.pin(h)
    small.madvise(h, ugem.DONTNEED)
    _pressure(small, total=2 * BUDGET)
    info = small.info(h)
    assert (info.placement, info.madvise) == ("system", "dontneed")
    assert small.pread(h, 0, 4 * MiB) == data


def test_a_pinned_object_can_be_written_at_a_full_budget(small):
    # its pages are all there: writing it adds none, so it never needs room
    pinned = [_written(small, 4 * MiB, seed=i)[0] for i in range(4)]
    for h in pinned:
        small.pin(h)
    assert small.stats()["resident_bytes"] == BUDGET
    data = _data(9, 4 * MiB)
    small.pwrite(pinned[2], 0, data)
    small.pwrite(pinned[0], 5, b"tiny")
    assert small.pread(pinned[2], 0, 4 * MiB) == data
    assert small.pread(pinned[0], 5, 4) == b"tiny"


def test_pin_without_room_is_enomem_and_changes_nothing(small, errno_of):
    blockers = [_written(small, 4 * MiB, seed=i)[0] for i in range(3)]
    for h in blockers:
        small.pin(h)
    h = small.create(8 * MiB)
    small.pwrite(h, 0, b"a page")
    before = small.stats()
    assert errno_of(small.pin, h) == errno.ENOMEM
    assert small.stats() == before
    info = small.info(h)
    assert (info.pinned, info.placement) == (False, "system")
    assert small.pread(h, 0, 6) == b"a page"


def test_pin_makes_room_by_spilling_others(small):
    others = {h: d for h, d in (_written(small, 4 * MiB, seed=i) for i in range(4))}
    h = small.create(8 * MiB)
    small.pin(h)
    stats = small.stats()
    assert stats["resident_bytes"] <= BUDGET
    assert stats["spilled_total"] == 2
    for x, data in others.items():
        assert small.pread(x, 0, 4 * MiB) == data


# -- how a pin ends --------------------------------------------------------------------


def test_unpin_ends_the_pin_and_the_object_can_be_spilled_again(small):
    h, data = _written(small, 4 * MiB, seed=1)
    small.pin(h)
    _pressure(small)
    assert small.info(h).placement == "system"
    small.unpin(h)
    assert small.stats()["pinned_bytes"] == 0
    _pressure(small, seed=2000)
    assert small.info(h).placement == "spilled"
    assert small.pread(h, 0, 4 * MiB) == data


def test_closing_the_last_handle_ends_the_pin(make_env):
    env = make_env()
    owner, holder = env.open(), env.open()
    h = owner.create(4 * PAGE)
    h2, _ = owner.open_name(owner.flink(h))
    hh, _ = holder.open_name(owner.flink(h))
    owner.pin(h)
    owner.close_handle(h)  # owner still holds h2: the pin stays
    assert _row(owner)["pinned_bytes"] == 4 * PAGE
    assert holder.info(hh).pinned is True
    owner.close_handle(h2)
    assert _row(owner)["pinned_bytes"] == 0
    assert owner.stats()["pinned_bytes"] == 0
    assert holder.info(hh).pinned is False  # the object lives on through holder, unpinned


def test_disconnecting_ends_the_pins(make_env):
    env = make_env()
    pinner, watcher = env.open(), env.open()
    h = pinner.create(4 * PAGE)
    hh, _ = watcher.open_name(pinner.flink(h))
    pinner.pin(h)
    pinner.pin(pinner.create(2 * PAGE))
    assert watcher.stats()["pinned_bytes"] == 6 * PAGE
    pinner.close()
    stats = watcher.stats()
    assert stats["pinned_bytes"] == 0
    assert [c["id"] for c in stats["per_client"]] == [watcher.client_id]
    assert watcher.info(hh).pinned is False


def test_a_pin_ended_by_close_gives_the_limit_back(limited):
    dev = limited.open()
    h = dev.create(8 * MiB)
    dev.pin(h)
    dev.close_handle(h)
    dev.pin(dev.create(8 * MiB))
    assert _row(dev)["pinned_bytes"] == 8 * MiB


def test_per_client_pinned_bytes(make_env):
    env = make_env()
    a, b = env.open(), env.open()
    a.pin(a.create(3 * PAGE))
    b.pin(b.create(5 * PAGE))
    a.create(7 * PAGE)  # not pinned
    rows = {c["id"]: c["pinned_bytes"] for c in a.stats()["per_client"]}
    assert rows == {a.client_id: 3 * PAGE, b.client_id: 5 * PAGE}
    assert a.stats()["pinned_bytes"] == 8 * PAGE


def test_pin_of_a_foreign_import_counts_against_the_limit(limited, sealed_memfd, errno_of):
    dev = limited.open()
    h = dev.import_fd(sealed_memfd(8 * MiB))
    dev.pin(h)
    assert dev.info(h).pinned is True
    assert _row(dev)["pinned_bytes"] == 8 * MiB
    assert errno_of(dev.pin, dev.create(PAGE)) == errno.EDQUOT
