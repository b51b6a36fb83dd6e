"""Per-client limits (SPEC §5 "Per-client limits", §2 create: EDQUOT): `client_quota` bounds
the sizes of live objects a client created, `client_max_objects` the handles it holds."""

from __future__ import annotations

import errno
import os

import pytest

import ugem

PAGE = ugem.PAGE_SIZE


# -- client_quota ----------------------------------------------------------------------


def test_create_beyond_the_quota_is_edquot(make_env, errno_of):
    env = make_env(client_quota=4 * PAGE)
    dev = env.open()
    dev.create(2 * PAGE)
    dev.create(PAGE + 1)  # rounded: 2 pages, exactly at the quota
    assert errno_of(dev.create, 1) == errno.EDQUOT
    assert errno_of(dev.create, 5 * PAGE) == errno.EDQUOT


def test_quota_counts_the_rounded_size(make_env, errno_of):
    dev = make_env(client_quota=2 * PAGE).open()
    dev.create(PAGE + 1)  # charged 2 pages
    assert errno_of(dev.create, 1) == errno.EDQUOT


def test_quota_accepts_size_strings(make_env, errno_of):
    dev = make_env(client_quota="16K").open()
    dev.create(16 << 10)
    assert errno_of(dev.create, PAGE) == errno.EDQUOT


def test_quota_is_per_client(make_env, errno_of):
    env = make_env(client_quota=2 * PAGE)
    greedy, other = env.open(), env.open()
    greedy.create(2 * PAGE)
    assert errno_of(greedy.create, PAGE) == errno.EDQUOT
    h = other.create(2 * PAGE)
    other.pwrite(h, 0, b"unaffected")
    assert other.pread(h, 0, 10) == b"unaffected"


def test_closing_objects_gives_the_quota_back(make_env, errno_of):
    dev = make_env(client_quota=3 * PAGE).open()
    handles = [dev.create(PAGE) for _ in range(3)]
    assert errno_of(dev.create, PAGE) == errno.EDQUOT
    dev.close_handle(handles[1])
    h = dev.create(PAGE)
    assert errno_of(dev.create, PAGE) == errno.EDQUOT
    for handle in (handles[0], handles[2], h):
        dev.close_handle(handle)
    dev.create(3 * PAGE)


def test_a_failed_create_leaves_no_object(make_env, errno_of):
    dev = make_env(client_quota=PAGE).open()
    dev.create(PAGE)
    before = dev.stats()
    assert errno_of(dev.create, PAGE) == errno.EDQUOT
    after = dev.stats()
    assert after["objects"] == before["objects"]
    assert after["per_client"] == before["per_client"]
    dev.close_handle(1)
    assert dev.create(PAGE) == 1


def test_size_checks_come_before_the_quota(make_env, errno_of):
    dev = make_env(client_quota=PAGE).open()
    dev.create(PAGE)
    assert errno_of(dev.create, 0) == errno.EINVAL
    assert errno_of(dev.create, 2**46 + 1) == errno.E2BIG


def test_object_stays_charged_to_its_creator_while_it_lives(make_env, errno_of):
    env = make_env(client_quota=2 * PAGE)
    creator, holder = env.open(), env.open()
    h = creator.create(2 * PAGE)
    hh, _ = holder.open_name(creator.flink(h))
    creator.close_handle(h)
    assert errno_of(creator.create, PAGE) == errno.EDQUOT  # still alive through holder
    holder.create(2 * PAGE)  # opening someone's object does not charge the opener
    holder.close_handle(hh)
    creator.create(2 * PAGE)


def test_a_mapping_keeps_the_charge_until_released(make_env, errno_of):
    dev = make_env(client_quota=PAGE).open()
    h = dev.create(PAGE)
    view = dev.mmap(h)
    dev.close_handle(h)
    assert errno_of(dev.create, PAGE) == errno.EDQUOT
    del view
    dev.create(PAGE)


def test_foreign_memory_is_not_charged(make_env, sealed_memfd):
    dev = make_env(client_quota=PAGE).open()
    h = dev.import_fd(sealed_memfd(64 * PAGE))
    dev.pwrite(h, 63 * PAGE, b"free")
    dev.create(PAGE)


def test_a_purged_object_stays_charged_until_closed(make_env, errno_of):
    # the quota counts live objects, not their pages: purging gives nothing back
    dev = make_env(client_quota=2 * PAGE).open()
    h = dev.create(2 * PAGE)
    assert dev.madvise(h, ugem.DONTNEED) is False
    assert errno_of(dev.create, PAGE) == errno.EDQUOT
    dev.close_handle(h)
    dev.create(2 * PAGE)


def test_a_spilled_object_stays_charged(make_env, errno_of):
    mib = 1 << 20
    env = make_env(client_quota=8 * mib, system_budget=4 * mib)
    dev, other = env.open(), env.open()
    first = dev.create(4 * mib)
    dev.pwrite(first, 0, b"\1" * (4 * mib))
    second = dev.create(4 * mib)
    dev.pwrite(second, 0, b"\2" * (4 * mib))
    assert dev.info(first).placement == "spilled"
    assert errno_of(dev.create, PAGE) == errno.EDQUOT
    other.create(8 * mib)  # the other client's quota is its own


# -- client_max_objects ----------------------------------------------------------------


N = 4


@pytest.fixture
def limited(make_env):
    env = make_env(client_max_objects=N)
    dev, peer = env.open(), env.open()
    target = peer.create(PAGE)
    peer.pwrite(target, 0, b"peer's")
    return dev, peer, target


def _fill(dev):
    return [dev.create(PAGE) for _ in range(N)]


def test_create_past_the_object_limit_is_edquot(limited, errno_of):
    dev, _, _ = limited
    assert _fill(dev) == [1, 2, 3, 4]
    assert errno_of(dev.create, PAGE) == errno.EDQUOT


def test_open_name_past_the_object_limit_is_edquot(limited, errno_of):
    dev, peer, target = limited
    name = peer.flink(target)
    _fill(dev)
    assert errno_of(dev.open_name, name) == errno.EDQUOT


def test_open_name_of_an_object_already_held_still_counts(limited, errno_of):
    # GEM_OPEN always makes a new handle, so it needs room even for a known object
    dev, _, _ = limited
    handles = _fill(dev)
    assert errno_of(dev.open_name, dev.flink(handles[0])) == errno.EDQUOT


def test_import_past_the_object_limit_is_edquot(limited, errno_of, fds, sealed_memfd):
    dev, peer, target = limited
    _fill(dev)
    assert errno_of(dev.import_fd, fds.add(peer.export(target))) == errno.EDQUOT
    assert errno_of(dev.import_fd, sealed_memfd(PAGE)) == errno.EDQUOT


def test_reimport_at_the_limit_returns_the_held_handle(limited, fds):
    dev, peer, target = limited
    fd = fds.add(peer.export(target))
    dev.create(PAGE)
    mine = dev.import_fd(fd)
    dev.create(PAGE)
    dev.create(PAGE)
    assert dev.import_fd(fd) == mine  # no new handle needed
    assert dev.pread(mine, 0, 6) == b"peer's"


def test_closing_a_handle_makes_room_again(limited, errno_of):
    dev, peer, _ = limited
    handles = _fill(dev)
    dev.close_handle(handles[2])
    assert dev.create(PAGE) == handles[2]
    assert errno_of(dev.create, PAGE) == errno.EDQUOT
    assert peer.create(PAGE)  # the peer holds 1 handle: not affected


def test_failed_limit_checks_leave_no_object(limited, errno_of):
    dev, _, _ = limited
    _fill(dev)
    before = dev.stats()["objects"]
    for _ in range(3):
        assert errno_of(dev.create, PAGE) == errno.EDQUOT
    assert dev.stats()["objects"] == before
    mine = next(c for c in dev.stats()["per_client"] if c["id"] == dev.client_id)
    assert mine["objects"] == N and mine["bytes"] == N * PAGE


def test_exported_fd_survives_an_import_refused_at_the_limit(limited, errno_of, fds):
    dev, peer, target = limited
    fd = fds.add(peer.export(target))
    _fill(dev)
    assert errno_of(dev.import_fd, fd) == errno.EDQUOT
    assert os.pread(fd, 6, 0) == b"peer's"
    dev.close_handle(1)
    assert dev.pread(dev.import_fd(fd), 0, 6) == b"peer's"


# -- per-uid limits ---------------------------------------------------------------------
# (uid 65534 against a daemon: tests/integration/test_tenants.py)

def test_uid_limits_are_accepted_and_never_limit_the_managers_own_uid(make_env):
    """The per-uid keys are accepted in both modes, and root / the manager's own uid is
    exempt from them (the embedded manager's clients are always its own uid)."""
    env = make_env(uid_quota="4K", uid_max_clients=1)
    first, second = env.open(), env.open()
    for dev in (first, second):
        h = dev.create(1 << 20)
        dev.pwrite(h, 0, b"y" * (1 << 20))
        dev.pin(h)
    third = env.open()
    assert third.create(PAGE) == 1


def test_unlimited_is_the_word_for_no_limit(make_env):
    dev = make_env(client_quota="unlimited", uid_quota="unlimited", uid_max_clients="UNLIMITED").open()
    h = dev.create(1 << 30)
    dev.pwrite(h, (1 << 30) - 4, b"last")
    assert dev.pread(h, (1 << 30) - 4, 4) == b"last"
