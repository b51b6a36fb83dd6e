"""Shares (GEM_SHARE / GEM_CLAIM / GEM_DROP_SHARES): the one-use references that carry a
mapping to another process when a daemon client's array is pickled by reference. Each
test runs in both modes (the ops are in the one request table); the claimer is another
client of the same manager, as a worker process's client is."""

from __future__ import annotations

import errno
import gc

import numpy as np
import pytest

import ugem
from ugem.client.registry import find_mapping
from ugem.testing import NOBODY, in_child
from ugem.wire import structs_share as ss

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


def test_a_closed_senders_shares_pass_to_another_client_of_its_process(env):
    """As an fd in flight outlives the Device that exported it: a sender that closes its
    Device leaves its unclaimed shares to another client of the same process, which hands
    them on in turn when it closes; they can still be claimed meanwhile."""
    sender, heir = env.open(), env.open()
    h = sender.create(PAGE)
    sender.pwrite(h, 0, b"still here")
    view = sender.mmap(h)
    first, second, third = (_share(sender, view) for _ in range(3))
    del view
    sender.close()
    assert bytes(heir._claim(*first, False)[:10]) == b"still here"
    heir._drop_share(*second)
    heir.stats()  # (the drop goes out with a request; close() would just forget it)
    next_heir = env.open()
    heir.close()  # `third` passes on again
    assert bytes(next_heir._claim(*third, False)[:10]) == b"still here"
    with pytest.raises(ugem.NoSuchObject):
        next_heir._claim(*second, False)  # dropped: used up


def test_unclaimed_shares_die_with_their_sending_process(mode, env):
    if mode != "daemon":
        pytest.skip("an embedded manager lives in one process")
    path = env.daemon.path

    def send_and_exit():
        dev = ugem.connect(path)
        view = dev.mmap(dev.create(PAGE))
        shares = [_share(dev, view) for _ in range(3)]
        other = ugem.connect(path)  # a client of the same process inherits them from `dev`...
        dev.close()
        other.close()  # ...and, the last one, lets them go
        return shares

    outcome = in_child(send_and_exit)
    assert "ok" in outcome, outcome
    watcher = env.open()
    assert _objects(watcher) == 0
    for owner, token in outcome["ok"]:
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


def test_a_posted_share_costs_no_round_trip_and_its_failure_goes_to_the_claimer(env, errno_of):
    sender, receiver = env.open(), env.open()
    view = sender.mmap(sender.create(2 * PAGE))
    entry = _entry(view)
    good = sender._post_share(entry.map_id, 0, PAGE, True)
    bad = sender._post_share(entry.map_id, PAGE, 4 * PAGE, True)  # past the end: fails in the manager
    assert good[1] + 1 == bad[1]
    assert len(receiver._claim(*good, True)) == PAGE
    with pytest.raises(ugem.InvalidArgument, match=f"share {bad[1]} of client {bad[0]} failed: cannot share"):
        receiver._claim(*bad, True)
    assert sender.stats()["objects"] >= 1  # the sender's connection is in step after unread replies
    owner, token = sender._share(entry.map_id, 0, PAGE, False)
    assert token == bad[1] + 1 and len(receiver._claim(owner, token, False)) == PAGE


def test_many_posted_shares_without_a_call_in_between(env):
    """More posted shares than replies left unread (SHARE_AHEAD): the sender reads them as it
    goes, so neither side ever blocks; every one is claimable."""
    sender, receiver = env.open(), env.open()
    view = sender.mmap(sender.create(PAGE))
    entry = _entry(view)
    shares = [sender._post_share(entry.map_id, 0, PAGE, True) for _ in range(500)]
    for owner, token in shares[::50]:
        assert len(receiver._claim(owner, token, False)) == PAGE
    for owner, token in shares:
        receiver._drop_share(owner, token)
    receiver.stats()
    del view
    assert _objects(sender) == 1  # the handle: every share was used up


def test_a_claim_that_comes_before_its_share_is_eagain_and_the_client_tries_again(mode, env, errno_of,
                                                                                   monkeypatch):
    if mode != "daemon":
        pytest.skip("an embedded manager serves each request at once: a share is there before any claim")
    sender, receiver = env.open(), env.open()
    view = sender.mmap(sender.create(PAGE))
    entry = _entry(view)
    owner, last = sender._share(entry.map_id, 0, PAGE, True)
    tries: list[int] = []
    real_call = receiver._call

    def call(op, req):  # the first claim goes out before the share exists; the retry after it does
        tries.append(int(op))
        if len(tries) == 1:
            with pytest.raises(ugem.TryAgain, match=f"share {last + 1} of client {owner} has not reached"):
                real_call(op, req)
            sender._post_share(entry.map_id, 0, PAGE, True)
            sender.stats()  # (the share is read by now)
            raise ugem.TryAgain("not yet")
        return real_call(op, req)

    monkeypatch.setattr(receiver, "_call", call)
    assert len(receiver._claim(owner, last + 1, True)) == PAGE
    assert len(tries) == 2
    monkeypatch.undo()
    assert errno_of(receiver._claim, owner, last + 2 + ss.SHARE_LAG, True) == errno.ENOENT  # too far ahead: no
    assert errno_of(sender._claim, owner, last + 2, True) == errno.ENOENT  # its own future share: never coming
    monkeypatch.setattr("ugem.client.device_share.CLAIM_PATIENCE_S", 0.2)
    assert errno_of(receiver._claim, owner, last + 2, True) == errno.EAGAIN  # never sent: gives up, in time


def test_a_claim_naming_its_memory_is_taken_before_its_share_is_sent(env, errno_of):
    """A pickler holds its shares back (client/batch.py): the receiver's claim names the
    memory (memfd identity and part), so the manager takes it at once, and the share, when
    it comes, is used up by it."""
    sender, receiver = env.open(), env.open()
    h = sender.create(2 * PAGE)
    view = sender.mmap(h)
    entry = _entry(view)
    owner, last = sender._share(entry.map_id, 0, PAGE, True)
    receiver._drop_share(owner, last)
    part = (entry.key, 0, PAGE)
    got = receiver._claim(owner, last + 1, True, part)  # the share is not sent yet
    got[0] = 42
    assert view[0] == 42
    assert errno_of(receiver._claim, owner, last + 2, True, (entry.key, PAGE, 2 * PAGE)) == errno.EINVAL  # not a part
    assert errno_of(receiver._claim, owner, last + 2, True, ((0, 1), 0, PAGE)) == errno.ENOENT  # no such memory
    assert errno_of(receiver._claim, owner, last + 2 + ss.SHARE_LAG, True, part) == errno.ENOENT  # too far
    assert sender._share(entry.map_id, 0, PAGE, True) == (owner, last + 1)  # now it comes: used up at once
    assert errno_of(receiver._claim, owner, last + 1, True, part) == errno.ENOENT
    del view
    sender.close_handle(h)
    assert _objects(sender) == 1  # the receiver's mapping holds it, no leftover share
    del got
    receiver.stats()
    assert _objects(sender) == 0


def test_a_drop_before_its_share_is_sent_uses_the_share_up_when_it_comes(env):
    sender, receiver = env.open(), env.open()
    h = sender.create(PAGE)
    view = sender.mmap(h)
    entry = _entry(view)
    owner, last = sender._share(entry.map_id, 0, PAGE, True)
    receiver._drop_share(owner, last)
    receiver._drop_share(owner, last + 1)  # not sent yet
    receiver.stats()  # (the drops are read by now)
    assert sender._share(entry.map_id, 0, PAGE, True) == (owner, last + 1)
    del view
    sender.close_handle(h)
    assert _objects(sender) == 0  # the dropped share did not keep it


@pytest.mark.parametrize("early", [False, True], ids=["sent", "not sent yet"])
def test_another_uids_share_cannot_be_claimed(open_to_all, as_user, early):
    """Another uid's claim is EACCES and its drop is skipped, whether the share was sent or
    is claimed early by the memory it names (not sent yet); root may claim it after."""
    env = open_to_all
    path = env.daemon.path
    sender = env.open()
    view = sender.mmap(sender.create(PAGE))
    entry = _entry(view)
    owner, token = _share(sender, view)
    token, memory = (token + 1, (entry.key, 0, PAGE)) if early else (token, None)

    def as_nobody():
        dev = ugem.connect(path)
        outcome = {}
        for what, call in (("claim", lambda: dev._claim(owner, token, False, memory)),
                           ("drop", lambda: (dev._drop_share(owner, token), dev.stats()))):
            try:
                call()
                outcome[what] = 0
            except ugem.UgemError as exc:
                outcome[what] = exc.errno
        return outcome

    with as_user(NOBODY, as_nobody) as got:
        assert got == {"claim": errno.EACCES, "drop": 0}  # a drop of another uid's share is skipped
    if early:
        assert _share(sender, view) == (owner, token)  # now it is sent, and the drop did not use it up
    assert len(env.open()._claim(owner, token, False)) == PAGE  # root may claim it
