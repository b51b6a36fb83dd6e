"""Shares (GEM_SHARE / GEM_CLAIM / GEM_DROP_SHARES): the one-use references that carry a
mapping to another process when a daemon client's array is pickled by reference. Each
test runs in both modes (the ops are in the one request table); the claimer is another
client of the same manager, as a worker process's client is."""

from __future__ import annotations

import errno
import gc
import os

import numpy as np
import pytest

import ugem
from ugem.client.registry import find_mapping
from ugem.testing import NOBODY

PAGE = ugem.PAGE_SIZE


def _entry(view: memoryview):
    address = np.frombuffer(view, np.uint8).__array_interface__["data"][0]
    entry = find_mapping(address, address + 1)
    assert entry is not None
    return entry


def _share(dev, view: memoryview, writable: bool = True) -> tuple[int, int]:
    entry = _entry(view)
    return dev._share(entry.map_id, entry.offset, entry.length, writable)


def _objects(dev) -> int:
    gc.collect()
    return int(dev.stats()["objects"])


def test_a_claimed_share_is_the_same_memory_and_is_used_up(env, errno_of):
    sender, receiver = env.open(), env.open()
    h = sender.create(4 * PAGE)
    view = sender.mmap(h, offset=PAGE, length=2 * PAGE)
    owner, token = _share(sender, view)
    assert owner == sender.client_id and token >= 1
    got = receiver._claim(owner, token, True)
    assert len(got) == 2 * PAGE
    got[:5] = b"hello"
    assert bytes(view[:5]) == b"hello"  # one memory: object bytes [PAGE, 3 PAGE) on both sides
    view[10:12] = b"ok"
    assert bytes(got[10:12]) == b"ok"
    assert sender.pread(h, PAGE, 5) == b"hello"
    assert errno_of(receiver._claim, owner, token, True) == errno.ENOENT  # one use


def test_a_share_keeps_the_object_alive_after_the_sender_lets_go(env):
    sender, receiver = env.open(), env.open()
    h = sender.create(PAGE)
    sender.pwrite(h, 0, b"kept")
    view = sender.mmap(h)
    owner, token = _share(sender, view)
    del view
    sender.close_handle(h)  # the mapping's release goes out with this request: only the share holds it
    assert _objects(receiver) == 1
    got = receiver._claim(owner, token, False)
    assert bytes(got[:4]) == b"kept"
    del got
    assert _objects(receiver) == 0  # the claimer's mapping was the last reference


def test_unclaimed_shares_die_with_their_sender(env):
    sender, watcher = env.open(), env.open()
    h = sender.create(PAGE)
    view = sender.mmap(h)
    shares = [_share(sender, view) for _ in range(3)]
    del view
    sender.close_handle(h)
    assert _objects(watcher) == 1
    sender.close()
    assert _objects(watcher) == 0
    for owner, token in shares:
        with pytest.raises(ugem.NoSuchObject, match=f"share {token} of client {owner}"):
            watcher._claim(owner, token, False)


def test_a_read_only_share_cannot_be_claimed_writable(env, errno_of):
    sender, receiver = env.open(), env.open()
    h = sender.create(PAGE)
    ro = sender.mmap(h, writable=False)
    assert errno_of(_share, sender, ro, True) == errno.EACCES  # a read-only mapping shares read-only only
    owner, token = _share(sender, ro, writable=False)
    assert errno_of(receiver._claim, owner, token, True) == errno.EACCES
    got = receiver._claim(owner, token, False)  # still there: the refused claim changed nothing
    assert got.readonly


def test_bad_shares_are_einval_and_unknown_claims_enoent(env, errno_of):
    sender, receiver = env.open(), env.open()
    h = sender.create(2 * PAGE)
    view = sender.mmap(h)
    entry = _entry(view)
    assert errno_of(sender._share, entry.map_id + 100, 0, PAGE, True) == errno.EINVAL  # not a mapping of ours
    assert errno_of(receiver._share, entry.map_id, 0, PAGE, True) in (errno.EINVAL,)  # nor of the receiver
    for offset, length in ((1, PAGE), (0, 0), (0, 3 * PAGE), (-PAGE, PAGE), (PAGE, 2 * PAGE)):
        assert errno_of(sender._share, entry.map_id, offset, length, True) == errno.EINVAL, (offset, length)
    assert errno_of(receiver._claim, sender.client_id, 10**6, False) == errno.ENOENT
    assert errno_of(receiver._claim, 10**9, 1, False) == errno.ENOENT


def test_dropped_shares_are_used_up_without_a_mapping(env, errno_of):
    sender, receiver = env.open(), env.open()
    h = sender.create(PAGE)
    view = sender.mmap(h)
    kept, dropped = _share(sender, view), _share(sender, view)
    receiver._drop_share(*dropped)
    receiver._drop_share(sender.client_id, 10**6)  # unknown: skipped
    receiver.stats()  # the drops go out with the next request
    assert errno_of(receiver._claim, *dropped, False) == errno.ENOENT
    assert len(receiver._claim(*kept, False)) == PAGE


def test_unclaimed_shares_are_bounded_by_the_handle_limit(make_env, errno_of):
    env = make_env(client_max_objects=4)
    sender = env.open()
    view = sender.mmap(sender.create(PAGE))
    for _ in range(4):
        _share(sender, view)
    assert errno_of(_share, sender, view) == errno.EDQUOT


def test_another_uids_share_cannot_be_claimed(mode, make_env, as_user):
    if mode != "daemon":
        pytest.skip("clients of an embedded manager all have this process's uid")
    env = make_env(socket_mode="0666")
    os.chmod(env.daemon.directory, 0o755)
    path = env.daemon.path
    sender = env.open()
    view = sender.mmap(sender.create(PAGE))
    owner, token = _share(sender, view)

    def as_nobody():
        dev = ugem.connect(path)
        outcome = {}
        for what, call in (("claim", lambda: dev._claim(owner, token, False)),
                           ("drop", lambda: (dev._drop_share(owner, token), dev.stats()))):
            try:
                call()
                outcome[what] = 0
            except ugem.UgemError as exc:
                outcome[what] = exc.errno
        return outcome

    with as_user(NOBODY, as_nobody) as got:
        assert got == {"claim": errno.EACCES, "drop": 0}  # a drop of another uid's share is skipped
    assert len(env.open()._claim(owner, token, False)) == PAGE  # root may claim it, and it was not dropped
