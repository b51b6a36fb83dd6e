"""GEM_SHARE_BATCH and GEM_CLAIM_MAPPED_BATCH: many shares, many mapped claims, in one request.
Each record is served exactly as the single request it stands for; one that fails fails
alone (a share's error kept for its claimer, a claim's nobody's) and the request succeeds;
a malformed list (not whole records, unknown flags) is EINVAL and nothing is done. Raw
requests run in both modes (in embedded mode the manager's fds are this process's)."""

from __future__ import annotations

import errno
import gc
import os

import numpy as np
import pytest

import ugem
from ugem import cmd
from ugem.backing.mapping import map_shared
from ugem.client.daemon_fds import pidfd_getfd
from ugem.client.registry import mapping_of
from ugem.testing import NOBODY
from ugem.wire import structs_share as ss
from ugem.wire.frames import Op

PAGE = ugem.PAGE_SIZE
CHOSEN = ss.CHOSEN_MAP_IDS
W = 1  # WRITABLE


def _entry(view: memoryview):
    entry = mapping_of(np.frombuffer(view, np.uint8))
    assert entry is not None
    return entry


def _objects(dev) -> int:
    gc.collect()
    return int(dev.stats()["objects"])


def _shares(dev, *records: tuple[int, int, int, int, int]) -> None:
    """GEM_SHARE_BATCH of (map_id, flags, offset, length, token) records, waiting for the reply."""
    dev._call(Op.GEM_SHARE_BATCH, ss.ShareBatchReq(records=b"".join(ss.SHARE_BATCH_RECORD.pack(*r) for r in records)))


def _claims(dev, *records: tuple[int, int, int, int, tuple[int, int]], post: bool = False) -> None:
    """GEM_CLAIM_MAPPED_BATCH of (owner, token, flags, map_id, key) records."""
    req = ss.ClaimMappedBatchReq(records=b"".join(ss.CLAIM_BATCH_RECORD.pack(o, t, f, m, *key)
                                                  for o, t, f, m, key in records))
    if post:
        dev._post(Op.GEM_CLAIM_MAPPED_BATCH, req)
    else:
        dev._call(Op.GEM_CLAIM_MAPPED_BATCH, req)


def _take(env, entry):
    """The manager's own fd of the memory of `entry`, mapped, as a receiver takes it."""
    pidfd = os.pidfd_open(env.daemon.pid if env.daemon is not None else os.getpid())
    try:
        with pidfd_getfd(pidfd, entry.source) as fd:
            return map_shared(fd.fd, entry.offset, entry.length, True)
    finally:
        os.close(pidfd)


def test_a_share_batch_makes_each_share(env):
    sender, receiver = env.open(), env.open()
    hs = [sender.create(2 * PAGE) for _ in range(3)]
    views = [sender.mmap(h) for h in hs]
    entries = [_entry(v) for v in views]
    owner, last = sender._share(entries[0].map_id, 0, PAGE, True)  # (a single share first: tokens continue)
    _shares(sender, *((e.map_id, W, 0, 2 * PAGE, last + 1 + i) for i, e in enumerate(entries)))
    sender._last_share = last + 3  # (raw requests: the client counts the tokens it sends itself)
    views[1][:3] = b"one"
    got = receiver._claim(owner, last + 2, True)
    assert bytes(got[:3]) == b"one" and len(got) == 2 * PAGE
    assert sender._share(entries[0].map_id, 0, PAGE, False) == (owner, last + 4)  # the batch used 3 tokens
    del views
    for h in hs:
        sender.close_handle(h)
    assert _objects(sender) == 3  # the shares (and the claimed mapping) hold them
    for token in (last, last + 1, last + 3, last + 4):
        receiver._drop_share(owner, token)
    del got
    assert _objects(receiver) == 0  # every share was used up


def test_a_failed_record_fails_its_share_alone(env, errno_of):
    """Records that fail (an unknown mapping, a writable share of a read-only mapping, a
    token out of order) fail as their GEM_SHARE would; the others are made."""
    sender, receiver = env.open(), env.open()
    h = sender.create(PAGE)
    view, ro = sender.mmap(h), sender.mmap(h, writable=False)
    entry, ro_entry = _entry(view), _entry(ro)
    owner, last = sender._share(entry.map_id, 0, PAGE, True)
    receiver._drop_share(owner, last)
    _shares(sender, (entry.map_id, W, 0, PAGE, last + 1), (999_999, W, 0, PAGE, last + 2),
            (ro_entry.map_id, W, 0, PAGE, last + 3), (entry.map_id, W, 0, PAGE, last + 9),
            (entry.map_id, 0, 0, PAGE, last + 4))
    sender._last_share = last + 4
    assert errno_of(receiver._claim, owner, last + 2, False) == errno.EINVAL  # kept for its claimer
    assert errno_of(receiver._claim, owner, last + 3, False) == errno.EACCES
    assert len(receiver._claim(owner, last + 1, True)) == PAGE
    assert receiver._claim(owner, last + 4, False).readonly
    assert sender._share(entry.map_id, 0, PAGE, True) == (owner, last + 5)  # last + 9 was out of order: not made
    receiver._drop_share(owner, last + 5)
    del view, ro
    sender.close_handle(h)
    assert _objects(receiver) == 0  # (its claimed mappings' releases go out first)


def test_bad_share_batches_are_einval_and_do_nothing(env, errno_of):
    sender, receiver = env.open(), env.open()
    view = sender.mmap(sender.create(PAGE))
    entry = _entry(view)
    owner, last = sender._share(entry.map_id, 0, PAGE, True)
    good = ss.SHARE_BATCH_RECORD.pack(entry.map_id, W, 0, PAGE, last + 1)
    with pytest.raises(ugem.InvalidArgument, match="share batch of 33 bytes"):
        sender._call(Op.GEM_SHARE_BATCH, ss.ShareBatchReq(records=good + b"\0"))
    with pytest.raises(ugem.InvalidArgument, match="share record 1 has unknown flags 0x8"):
        _shares(sender, (entry.map_id, W, 0, PAGE, last + 1), (entry.map_id, 8, 0, PAGE, last + 2))
    _shares(sender)  # no records: nothing to do
    assert sender._share(entry.map_id, 0, PAGE, True) == (owner, last + 1)  # nothing was made
    for token in (last, last + 1):
        receiver._drop_share(owner, token)
    receiver.stats()
    del view
    assert _objects(sender) == 1  # the handle only: no share is left


def test_a_claim_batch_tracks_each_claim_and_a_failed_record_fails_alone(env):
    sender, receiver = env.open(), env.open()
    hs = [sender.create(PAGE) for _ in range(3)]
    views = [sender.mmap(h) for h in hs]
    entries = [_entry(v) for v in views]
    shares = [sender._share(e.map_id, 0, PAGE, True) for e in entries]
    regions = [_take(env, e) for e in entries]
    (owner, t0), (_, t1), (_, t2) = shares
    _claims(receiver, (owner, t0, W, CHOSEN, entries[0].key), (owner, t1, W, 5, entries[1].key),  # id: EINVAL
            (owner, t2, W, CHOSEN + 2, entries[2].key), (owner, t2, W, CHOSEN + 3, entries[2].key))  # used up
    del views
    for h in hs:
        sender.close_handle(h)
    assert _objects(sender) == 3  # the two claims' mappings and the share whose claim failed hold them
    regions[1][:2] = b"ok"
    got = receiver._claim(owner, t1, True)
    assert bytes(got[:2]) == b"ok"  # its share was not used up
    del got
    receiver._released.extend([CHOSEN, CHOSEN + 2])  # the releases, as the client queues them
    assert _objects(receiver) == 0  # and the failed record (CHOSEN + 3) tracked nothing
    for region in regions:
        region.close()


def test_bad_claim_batches_are_einval_and_do_nothing(env, errno_of):
    sender, receiver = env.open(), env.open()
    view = sender.mmap(sender.create(PAGE))
    entry = _entry(view)
    owner, token = sender._share(entry.map_id, 0, PAGE, True)
    record = ss.CLAIM_BATCH_RECORD.pack(owner, token, W, CHOSEN, *entry.key)
    with pytest.raises(ugem.InvalidArgument, match="claim batch of 41 bytes"):
        receiver._call(Op.GEM_CLAIM_MAPPED_BATCH, ss.ClaimMappedBatchReq(records=record + b"\0"))
    with pytest.raises(ugem.InvalidArgument, match="claim record 0 has unknown flags 0x3"):
        _claims(receiver, (owner, token, 3, CHOSEN, entry.key))
    assert len(receiver._claim(owner, token, True)) == PAGE  # nothing used the share up
    assert errno_of(_claims, receiver, (owner, token, 0x10000, CHOSEN, entry.key)) == errno.EINVAL


def test_a_claim_that_waits_in_a_batch_is_served_once_and_the_rest_after_it(mode, env):
    """A record whose object is busy with device work waits (the connection is parked); the
    records before it are not served again, those after it are served once it is done."""
    if mode != "daemon":
        pytest.skip("an embedded manager waits in the caller's thread: nobody could release the device")
    sender, receiver = env.open(), env.open()
    sem = sender.create(PAGE)
    sender.set_caching(sem, ugem.CACHING_CACHED)
    hs = [sender.create(PAGE) for _ in range(3)]
    views = [sender.mmap(h) for h in hs]
    entries = [_entry(v) for v in views]
    shares = [sender._share(e.map_id, 0, PAGE, True) for e in entries]
    sender.set_caching(hs[1], ugem.CACHING_CACHED)
    sender.execbuffer([cmd.SemaphoreWait(obj=sem, offset=0, value=1), cmd.Fill(dst=hs[1], offset=0, length=4, byte=7)])
    records = [(o, t, W, CHOSEN + i, e.key) for i, ((o, t), e) in enumerate(zip(shares, entries, strict=True))]
    _claims(receiver, *records, post=True)
    sender.pwrite(sem, 0, (1).to_bytes(4, "little"))  # the device goes on
    assert receiver.stats()["objects"] == 4  # (a call: the batch is done by now)
    for owner, token in shares:
        with pytest.raises(ugem.NoSuchObject):
            receiver._claim(owner, token, True)  # each used up by its record
    assert bytes(views[1][:4]) == b"\x07" * 4
    receiver._released.extend([CHOSEN, CHOSEN + 1, CHOSEN + 2])
    del views
    for h in hs:
        sender.close_handle(h)
    assert _objects(receiver) == 1  # the semaphore: each record tracked one mapping, released once


def test_another_uids_records_fail_alone(open_to_all, as_user):
    """Another uid's claims in a batch are EACCES each (the share is left for its uid), the
    batch succeeds."""
    env = open_to_all
    path = env.daemon.path
    sender = env.open()
    view = sender.mmap(sender.create(PAGE))
    entry = _entry(view)
    owner, token = sender._share(entry.map_id, 0, PAGE, True)

    def as_nobody():
        dev = ugem.connect(path)
        _claims(dev, (owner, token, W, CHOSEN, entry.key), (owner, token + 1, W, CHOSEN + 1, entry.key))
        return dev.stats()["objects"]

    with as_user(NOBODY, as_nobody) as got:
        assert got == 1  # the request succeeded; nothing was tracked for nobody
    root = env.open()
    assert len(root._claim(owner, token, True)) == PAGE  # still there for its uid
    assert sender._share(entry.map_id, 0, PAGE, True) == (owner, token + 1)
    assert len(root._claim(owner, token + 1, True)) == PAGE  # not claimed early by nobody
