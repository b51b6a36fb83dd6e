"""One reference per mapping per pickle (client/pickling.py): the arrays of one
multiprocessing pickle that lie in one mapping share one share (daemon) or one fd
(embedded), which the receiver resolves once; each pickle, a pickle inside a pickle too,
has its own. Real daemon (or embedded default device), real fork Pool workers.
"""

from __future__ import annotations

import gc
import multiprocessing
import multiprocessing.forkserver
from multiprocessing.reduction import ForkingPickler
from typing import Any

import numpy as np
import pytest

import ugem
from ugem.client import pickling
from ugem.client.default import default_device
from ugem.testing import DaemonProcess
from ugem.testing import workers as w
from ugem.testing.data import wait_until
from ugem.wire import structs_share as ss
from ugem.wire.frames import Op

ROWS = 600


def _references(monkeypatch: pytest.MonkeyPatch, sender: DaemonProcess | None) -> list[int]:
    """A list that grows by the shares (daemon: records of every GEM_SHARE_BATCH posted, and
    those held back when read) or fds (embedded) the pickles of this process make."""
    made: list[int] = []
    if sender is None:
        real_send_fd = pickling._send_fd
        monkeypatch.setattr(pickling, "_send_fd", lambda fd: (made.append(1), real_send_fd(fd))[1])
        return made
    dev = default_device()
    real_post = dev._transport.post

    def post(frames: Any) -> None:
        made.extend(1 for op, req in frames if op == Op.GEM_SHARE_BATCH
                    for _ in range(len(req.records) // ss.SHARE_BATCH_RECORD.size))
        real_post(frames)

    monkeypatch.setattr(dev._transport, "post", post)
    return made


def _held(sender: DaemonProcess | None) -> int:
    return 0 if sender is None else sum(isinstance(x, bytes) for x in default_device()._releases.claims) + \
        len(default_device()._releases.shares)


def test_many_views_of_one_array_travel_as_one_reference(sender, monkeypatch):
    """600 rows of one array in one pickle: one share (or fd), one mapping and one claim (or
    none) in the worker; every row right, every write seen by the sender; nothing left."""
    base = ugem.zeros((ROWS, 1024), np.int64)
    base[:, 0] = np.arange(ROWS)
    made = _references(monkeypatch, sender)
    data = bytes(ForkingPickler.dumps(list(base)))
    shares = len(made) + _held(sender)
    assert shares == 1, f"{shares} references for the rows of one array"
    with multiprocessing.get_context("fork").Pool(1) as pool:
        marks, writable, maps, claims = pool.apply(w.receive_views, (data,))
    assert marks == list(range(ROWS)) and all(writable)
    assert maps == 1
    if sender is not None:
        assert claims == 1, f"{claims} claims for one share"
    assert (base[:, 1] == -np.arange(ROWS)).all()
    monkeypatch.undo()
    if sender is not None:
        del base
        gc.collect()
        dev = default_device()
        wait_until(lambda: dev.stats()["objects"] == 0, what="the object released once its rows died")


def test_a_read_only_view_and_a_writable_one_of_one_mapping_take_a_reference_each(sender, monkeypatch):
    """Writability is part of the reference: each array arrives as writable as it was sent."""
    base = ugem.zeros((4, 512), np.int32)
    base[:, 0] = [10, 11, 12, 13]
    frozen = base[2:]
    frozen.flags.writeable = False
    made = _references(monkeypatch, sender)
    data = bytes(ForkingPickler.dumps([base[0], frozen[0], base[1], frozen[1]]))
    assert len(made) + _held(sender) == 2
    with multiprocessing.get_context("fork").Pool(1) as pool:
        marks, writable, maps, _ = pool.apply(w.receive_views, (data,))
    assert marks == [10, 12, 11, 13] and writable == [True, False, True, False]
    assert base[0, 1] == -10 and base[1, 1] == -11 and base[2, 1] == 0 and base[3, 1] == 0


def test_later_views_of_a_mapping_arrive_right_in_any_order_and_layout(sender):
    """The first array of a mapping in a pickle carries the reference and every later one names
    it: later ones that lie before it, or are strided, transposed, of another dtype or
    read-only, arrive with their bytes, layout and writability."""
    base = ugem.zeros((8, 512), np.int32)
    base[:] = np.arange(8 * 512, dtype=np.int32).reshape(8, 512)
    frozen = base[6:]
    frozen.flags.writeable = False
    sent = [base[5], base[1], base[:, 3], base.T[2:4], base[::2, ::3], base[2].view(np.uint8)[4:12], frozen[1],
            base[0], frozen[0, 7:]]
    data = bytes(ForkingPickler.dumps(sent))
    with multiprocessing.get_context("fork").Pool(1) as pool:
        got = pool.apply(w.load_copies, (data,))
    assert len(got) == len(sent)
    for a, (copy, writable) in zip(sent, got, strict=True):
        assert copy.dtype == a.dtype and copy.shape == a.shape and (copy == a).all()
        assert writable == a.flags.writeable


class _Inner:
    """Pickles as the multiprocessing pickle of its arrays, loaded again when unpickled: a
    pickle inside a pickle (its references must be its own)."""

    def __init__(self, arrays: list[np.ndarray]) -> None:
        self.arrays = arrays

    def __reduce__(self) -> tuple[Any, ...]:
        return ForkingPickler.loads, (bytes(ForkingPickler.dumps(self.arrays)),)


def test_a_pickle_inside_a_pickle_has_references_of_its_own(sender, monkeypatch):
    """The same memory in an outer pickle and in one made while it runs: a reference each
    (one share would be claimed twice), and both arrive right."""
    base = ugem.zeros((8, 512), np.int64)
    base[:, 0] = np.arange(8)
    made = _references(monkeypatch, sender)
    data = bytes(ForkingPickler.dumps([base[0], _Inner([base[1], base[2]]), base[3]]))
    assert len(made) + _held(sender) == 2
    with multiprocessing.get_context("fork").Pool(1) as pool:
        got = pool.apply(w.load_nested, (data,))
    assert got == [0, [1, 2], 3]


def test_what_cannot_hold_ugem_memory_is_pickled_outside_a_batch(sender, monkeypatch):
    """None, bools, numbers, strings and bytes pickle without a batch (a Pool sends None to its
    own threads with every task), and so load pickles shorter than the module's name, which
    every reference names: an array's pickle is never that short, and goes in a batch both ways."""
    entered: list[int] = []
    real_batch = pickling.batch
    monkeypatch.setattr(pickling, "batch", lambda: (entered.append(1), real_batch())[1])
    pickles = [ForkingPickler.dumps(value) for value in (None, True, 7, 2.5, 1j, "text", b"bytes")]
    assert entered == []
    short = [data for data in pickles if len(data) < len(pickling.__name__)]
    assert len(short) >= 4 and [ForkingPickler.loads(data) for data in short][:4] == [None, True, 7, "text"]
    assert entered == []
    a = ugem.zeros(8, np.int64)
    a[3] = 5
    data = bytes(ForkingPickler.dumps([a]))
    assert pickling.__name__.encode() in data and len(entered) == 1
    got = ForkingPickler.loads(data)[0]  # (embedded: the fd's handover pickles too, in batches of its own)
    assert len(entered) >= 2 and got[3] == 5
    got[4] = 6
    assert a[4] == 6  # the same memory: it went by reference
    del got, a
    gc.collect()
