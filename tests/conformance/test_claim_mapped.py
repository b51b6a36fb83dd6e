"""GEM_CLAIM_MAPPED: the claim of a receiver that took the manager's own fd of a share's
memory (pidfd_getfd) and maps it already; the manager tracks that mapping under the id the
client chose and uses the share up. Raw requests run in both modes (in embedded mode the
manager's fds are this process's); the client's no-round-trip claim needs a daemon."""

from __future__ import annotations

import errno
import gc
import os

import numpy as np
import pytest

import ugem
from ugem.backing.mapping import map_shared
from ugem.client.daemon_fds import DaemonFds, pidfd_getfd
from ugem.client.registry import mapping_of
from ugem.testing.data import wait_until
from ugem.wire import structs as s
from ugem.wire import structs_share as ss
from ugem.wire.frames import Op

PAGE = ugem.PAGE_SIZE
CHOSEN = ss.CHOSEN_MAP_IDS


def _entry(view: memoryview):
    entry = mapping_of(np.frombuffer(view, np.uint8))
    assert entry is not None
    return entry


def _manager_pid(env) -> int:
    return env.daemon.pid if env.daemon is not None else os.getpid()


def _take(env, entry):
    """The manager's own fd of the memory of `entry`, as a receiver takes it, mapped."""
    pidfd = os.pidfd_open(_manager_pid(env))
    try:
        with pidfd_getfd(pidfd, entry.source) as fd:
            assert os.fstat(fd.fd).st_ino == entry.key[1]
            return map_shared(fd.fd, entry.offset, entry.length, True)
    finally:
        os.close(pidfd)


def _claim(dev, owner: int, token: int, key, map_id: int, writable: bool = True) -> None:
    dev._call(Op.GEM_CLAIM_MAPPED, ss.ClaimMappedReq(owner=owner, token=token, flags=1 if writable else 0,
                                                     map_id=map_id, dev=key[0], ino=key[1]))


def _objects(dev) -> int:
    gc.collect()
    return int(dev.stats()["objects"])


def test_a_mapped_claim_is_tracked_and_holds_the_object(env):
    sender, receiver = env.open(), env.open()
    h = sender.create(2 * PAGE)
    view = sender.mmap(h)
    entry = _entry(view)
    assert entry.source >= 0  # the manager said which of its fds holds the memory
    owner, token = sender._share(entry.map_id, 0, 2 * PAGE, True)
    region = _take(env, entry)
    _claim(receiver, owner, token, entry.key, CHOSEN + 7)
    region[:5] = b"hello"
    del view
    sender.close_handle(h)
    assert _objects(sender) == 1  # the receiver's tracked mapping holds it now
    assert receiver.stats()["objects"] == 1
    with pytest.raises(ugem.NoSuchObject):
        receiver._claim(owner, token, True)  # used up
    receiver._released.append(CHOSEN + 7)  # the release, as the client queues it when the mapping dies
    assert _objects(receiver) == 0
    assert bytes(region[:5]) == b"hello"  # the memory lives while mapped, whatever the manager did
    region.close()


def test_bad_mapped_claims(env, errno_of):
    sender, receiver = env.open(), env.open()
    view = sender.mmap(sender.create(PAGE))
    other = _entry(sender.mmap(sender.create(PAGE)))
    entry = _entry(view)
    owner, token = sender._share(entry.map_id, 0, PAGE, True)
    assert errno_of(_claim, receiver, owner, token, entry.key, 5) == errno.EINVAL  # the manager's id range
    assert errno_of(_claim, receiver, owner, token, other.key, CHOSEN) == errno.EINVAL  # not that share's memory
    assert errno_of(_claim, receiver, owner, token + 1 + ss.SHARE_LAG, entry.key, CHOSEN) == errno.ENOENT
    assert errno_of(_claim, receiver, 10 ** 6, 1, entry.key, CHOSEN) == errno.ENOENT
    _claim(receiver, owner, token, entry.key, CHOSEN)
    owner, token = sender._share(entry.map_id, 0, PAGE, True)
    assert errno_of(_claim, receiver, owner, token, entry.key, CHOSEN) == errno.EINVAL  # id in use
    _claim(receiver, owner, token, entry.key, CHOSEN + 1)
    owner, token = sender._share(entry.map_id, 0, PAGE, False)
    assert errno_of(_claim, receiver, owner, token, entry.key, CHOSEN + 2) == errno.EACCES  # read-only share
    _claim(receiver, owner, token, entry.key, CHOSEN + 2, writable=False)


def test_a_mapped_claim_that_comes_before_its_share(env, errno_of):
    """The receiver maps and claims before the sender's share is read (the daemon reads the
    two connections in any order): the claim is taken at once, and the share, when it
    arrives, is used up by it."""
    sender, receiver = env.open(), env.open()
    h = sender.create(PAGE)
    view = sender.mmap(h)
    entry = _entry(view)
    owner, last = sender._share(entry.map_id, 0, PAGE, True)
    receiver._drop_share(owner, last)  # (only its token matters here)
    _claim(receiver, owner, last + 1, entry.key, CHOSEN)
    assert errno_of(_claim, receiver, owner, last + 2 + ss.SHARE_LAG, entry.key, CHOSEN + 1) == errno.ENOENT
    assert sender._share(entry.map_id, 0, PAGE, True) == (owner, last + 1)
    assert errno_of(receiver._claim, owner, last + 1, True) == errno.ENOENT  # used up by the early claim
    del view
    sender.close_handle(h)
    assert _objects(sender) == 1  # held by the receiver's mapping only, not by a leftover share
    receiver.close()
    assert _objects(sender) == 0


def test_a_share_in_flight_is_never_spilled(make_env):
    """Between a share and its claim the receiver may map the memfd already: the object must
    stay in it (a spill would move the bytes to another memfd behind the receiver's back)."""
    env = make_env(system_budget=8 * PAGE)
    sender, receiver, third = env.open(), env.open(), env.open()
    h = sender.create(4 * PAGE)
    sender.pwrite(h, 0, b"x" * (4 * PAGE))
    view = sender.mmap(h)
    entry = _entry(view)
    owner, token = sender._share(entry.map_id, 0, 4 * PAGE, True)
    region = _take(env, entry)  # mapped before the claim is read
    del view
    sender.close_handle(h)  # only the share holds it now
    for _ in range(4):
        sender.pwrite(sender.create(4 * PAGE), 0, b"y" * (4 * PAGE))  # twice the budget: others spill
    assert sender.stats()["spilled_total"] >= 1
    _claim(receiver, owner, token, entry.key, CHOSEN)
    region[:3] = b"zzz"
    again = receiver._share(CHOSEN, 0, 4 * PAGE, True)
    assert bytes(third._claim(*again, True)[:4]) == b"zzzx"  # the manager's memory is the one the receiver writes
    region.close()


def test_the_client_claims_without_a_round_trip_where_the_daemon_allows(mode, env):
    if mode != "daemon":
        pytest.skip("an embedded manager's memory is this process's: there is no daemon to take it from")
    sender, receiver = env.open(), env.open()
    view = sender.mmap(sender.create(PAGE))
    entry = _entry(view)
    owner, token = sender._post_share(entry.map_id, 0, PAGE, True)
    calls: list[Op] = []
    real = receiver._call
    receiver._call = lambda op, req, **kw: (calls.append(op), real(op, req, **kw))[1]  # type: ignore[method-assign]
    got = receiver._claim_mapped(owner, token, entry.key, entry.source, 0, PAGE)
    assert got is not None and calls == []  # posted, no call
    got[:2] = b"ok"
    assert bytes(view[:2]) == b"ok"
    assert _entry(got).map_id >= CHOSEN
    del got
    gc.collect()
    receiver.stats()  # the release goes out with it
    assert receiver.stats()["objects"] == 1  # the sender's; the claim was used up and released


def test_a_stale_fd_number_or_another_memory_falls_back(mode, env):
    if mode != "daemon":
        pytest.skip("needs a daemon process")
    sender, receiver = env.open(), env.open()
    view = sender.mmap(sender.create(PAGE))
    entry = _entry(view)
    owner, token = sender._share(entry.map_id, 0, PAGE, True)
    assert receiver._claim_mapped(owner, token, entry.key, 10 ** 6, 0, PAGE) is None  # EBADF there
    assert receiver._claim_mapped(owner, token, (entry.key[0], entry.key[1] + 1), entry.source, 0, PAGE) is None
    assert receiver._daemon_fds is not None and receiver._daemon_fds.usable  # still tried next time
    assert len(receiver._claim(owner, token, True)) == PAGE  # the share was not used up


def test_daemon_fds_give_up_when_the_kernel_refuses():
    gone = os.fork()
    if gone == 0:
        os._exit(0)
    os.waitpid(gone, 0)
    fds = DaemonFds((gone, os.geteuid()))
    assert fds.usable and fds.take(0, (0, 0)) is None  # ESRCH: the process is gone
    assert not fds.usable
    if os.geteuid() != 0:
        assert not DaemonFds((os.getpid(), os.geteuid() + 1)).usable  # another uid: never tried
    assert not DaemonFds(None).usable


def test_a_posted_request_carries_the_queued_releases(env):
    """A process that only posts (a worker that receives arrays and returns them) still
    releases the mappings it dropped: they go out in the same write as its next post."""
    dev = env.open()
    keep = dev.mmap(dev.create(PAGE))
    entry = _entry(keep)
    h = dev.create(PAGE)
    dropped = dev.mmap(h)
    dev.close_handle(h)
    del dropped
    gc.collect()
    assert dev._released  # queued, not sent
    observer = env.open()
    assert observer.stats()["objects"] == 2
    dev._post_share(entry.map_id, 0, PAGE, True)
    assert not dev._released
    wait_until(lambda: observer.stats()["objects"] == 1)  # the dropped mapping's object is gone (posted: soon)


def test_a_mapping_comes_without_an_fd_where_the_client_takes_the_daemons(mode, env, monkeypatch):
    """TAKES_FD: where this process may copy the daemon's fds, mmap and ugem.empty get no fd
    in the reply (the client copies the daemon's own, checked against the memory the reply
    names, and maps it read-only if asked so); if that copy fails (the memory changed
    meanwhile), the client asks again for an fd."""
    if mode != "daemon":
        pytest.skip("an embedded manager's memory is this process's: there is no daemon to take it from")
    dev = env.open()
    h = dev.create(2 * PAGE)
    dev.pwrite(h, 0, b"taken")
    replies = []
    real_call = dev._call

    def call(op, req, **local):
        reply = real_call(op, req, **local)
        replies.append((op, req.flags, reply.fd is None if isinstance(reply, s.MmapReply) else None))
        return reply

    monkeypatch.setattr(dev, "_call", call)
    view = dev.mmap(h)
    assert bytes(view[:5]) == b"taken"
    assert replies == [(Op.GEM_MMAP, s.WRITABLE | s.TO_END | s.TAKES_FD, True)]
    a = ugem.empty(100, np.uint8, device=dev)
    a[:] = 7
    assert replies[-1] == (Op.GEM_CREATE_MAPPED, s.TAKES_FD, True)
    replies.clear()
    ro = dev.mmap(h, writable=False)
    assert bytes(ro[:5]) == b"taken" and ro.readonly
    assert replies == [(Op.GEM_MMAP, s.TO_END | s.TAKES_FD, True)]
    del ro
    replies.clear()
    monkeypatch.setattr(DaemonFds, "take", lambda self, number, key: None)  # as if the fd changed hands
    again = dev.mmap(h)
    again[5:7] = b"!!"
    assert bytes(view[:7]) == b"taken!!"
    assert [(op, flags & s.TAKES_FD, no_fd) for op, flags, no_fd in replies] == [
        (Op.GEM_MMAP, s.TAKES_FD, True), (Op.GEM_MMAP, 0, False)]
    monkeypatch.undo()
    del view, again, a
    gc.collect()
    dev.close_handle(h)
    assert _objects(dev) == 0  # the mapping given up was released too
