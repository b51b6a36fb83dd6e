"""Releases (client/releases.py): held shares and drops beside the finalizers' queue, sent
in order with it, never lost to a thread that holds one while another sends."""

from __future__ import annotations

import threading

from ugem.client.releases import Releases
from ugem.wire import structs_share as ss
from ugem.wire.frames import Op


def _record(token: int) -> bytes:
    return ss.SHARE_BATCH_RECORD.pack(1, 0, 0, 4096, token)


def _tokens(notes: list[tuple[Op, object]]) -> list[int]:
    out = []
    for op, req in notes:
        if op == Op.GEM_SHARE_BATCH:
            records = req.records  # type: ignore[attr-defined]
            size = ss.SHARE_BATCH_RECORD.size
            out += [ss.SHARE_BATCH_RECORD.unpack(records[i:i + size])[-1] for i in range(0, len(records), size)]
    return out


def test_the_first_held_share_or_drop_queues_a_marker_so_the_queue_is_sent() -> None:
    r = Releases()
    assert not r.queue
    assert r.hold_share(_record(1)) == 1 and list(r.queue) == [None]
    assert r.hold_share(_record(2)) == 2 and list(r.queue) == [None]  # one marker for them all
    r.drop(7, 9)
    assert list(r.queue) == [None, None]
    notes = r.requests()
    assert [op for op, _ in notes] == [Op.GEM_SHARE_BATCH, Op.GEM_DROP_SHARES]
    assert _tokens(notes) == [1, 2]
    assert notes[1][1].records == ss.SHARE_RECORD.pack(7, 9)  # type: ignore[attr-defined]
    assert not r.queue and not r.shares and not r.drops
    r.hold_share(_record(3))
    assert list(r.queue) == [None]  # a new marker once they were sent


def test_shares_go_before_the_releases_sent_with_them() -> None:
    r = Releases()
    r.hold_share(_record(1))
    r.queue.append(42)  # the share's mapping released after it was made
    ops = [op for op, _ in r.requests()]
    assert ops == [Op.GEM_SHARE_BATCH, Op.GEM_MUNMAP]


def test_shares_held_while_another_thread_sends_are_each_sent_once_in_order() -> None:
    r = Releases()
    lock = threading.Lock()  # (the Device's share lock: tokens in the order they are held)
    sent: list[int] = []
    done = threading.Event()
    total = 20000

    def sender() -> None:
        while not done.is_set() or r.queue:
            if r.queue:
                sent.extend(_tokens(r.requests()))

    t = threading.Thread(target=sender)
    t.start()
    for token in range(1, total + 1):
        with lock:
            r.hold_share(_record(token))
    done.set()
    t.join()
    sent.extend(_tokens(r.requests()))
    assert sent == list(range(1, total + 1))
