"""Lingering mappings (client/linger.py), with real worker processes and a real daemon: a
process sent the same memory again takes its mapping back (the same mapping id, no new
claim), in one thread or several at once; a lingering mapping holds its object no longer
than the process's next request, the share a mapping taken back uses up is dropped at once
(with the claims when unpickling ends; outside a batch, on the spot), nothing is left when a
worker that took one back is killed, and a fork releases them first."""

from __future__ import annotations

import gc
import multiprocessing
import os
import signal
from multiprocessing.reduction import ForkingPickler

import numpy as np
import pytest

import ugem
from ugem.testing import DaemonProcess
from ugem.testing import workers as w
from ugem.testing.data import SAFETY_S, wait_until

SIZE = 4 << 20


def _objects() -> int:
    return int(ugem.default_device().stats()["objects"])


def test_memory_received_again_takes_its_lingering_mapping_back(default_daemon: DaemonProcess) -> None:
    a, b = ugem.empty(SIZE, np.uint8), ugem.empty(SIZE, np.uint8)
    with multiprocessing.get_context("fork").Pool(1) as pool:
        first, again = pool.apply(w.map_id_of, (a,)), pool.apply(w.map_id_of, (a,))
        other = pool.apply(w.map_id_of, (b,))
        a[0] = 0
        assert pool.apply(w.map_id_of, (a[:100],)) == first  # a part of what it maps
    assert first == again != other
    assert a[0] == b[0] == w.MARK_OUT  # the worker wrote through the mapping it took back


def test_past_linger_any_only_small_mappings_linger(default_daemon: DaemonProcess) -> None:
    """A worker sent the same 300 small arrays again takes every mapping back; of 100 bigger
    ones, LINGER_ANY."""
    from ugem.client.linger import LINGER_ANY, LINGER_SMALL
    small = [ugem.empty(4096, np.uint8) for _ in range(300)]
    big = [ugem.empty(LINGER_SMALL + 4096, np.uint8) for _ in range(100)]
    with multiprocessing.get_context("fork").Pool(1) as pool:
        first, again = pool.apply(w.map_ids_of, (big,)), pool.apply(w.map_ids_of, (big,))
        assert len(set(first) & set(again)) == LINGER_ANY
        first, again = pool.apply(w.map_ids_of, (small,)), pool.apply(w.map_ids_of, (small,))
        assert first == again and len(set(first)) == 300  # (LINGER_ANY big ones linger too meanwhile)
    assert all(a[0] == w.MARK_OUT for a in small + big)


def test_a_lingering_mapping_holds_its_object_only_until_the_next_request(default_daemon: DaemonProcess) -> None:
    a = ugem.empty(SIZE, np.uint8)
    with multiprocessing.get_context("fork").Pool(1) as pool:
        pool.apply(w.map_id_of, (a,))
        pool.apply(w.map_id_of, (a,))  # taken back, and dropped when the task ends
        pool.apply(w.then, ("request",))
        del a
        gc.collect()
        wait_until(lambda: _objects() == 0, what="the object freed while the worker lives")


def test_taken_back_outside_a_pickling_batch_its_share_is_used_up_at_once(default_daemon: DaemonProcess) -> None:
    a = ugem.empty(SIZE, np.uint8)
    first, second = bytes(ForkingPickler.dumps(a)), bytes(ForkingPickler.dumps(a))  # two shares
    with multiprocessing.get_context("fork").Pool(1) as pool:
        ids = pool.apply(w.load_plain_twice, (first, second))
    assert ids[0] == ids[1]  # (the worker is SIGTERMed on leaving the block: it makes no request after)
    del a
    gc.collect()
    wait_until(lambda: _objects() == 0, what="the object freed: neither share left held")


def test_threads_receiving_the_same_memory_at_once(default_daemon: DaemonProcess) -> None:
    """Mappings die and linger in one thread while others take them back (the callbacks only
    append; the Device files them under its send lock): every array arrives right, the
    sender sees every thread's writes, few mappings are made, and nothing is left."""
    arrays = [ugem.empty(1 << 16, np.uint8) for _ in range(8)]
    for a in arrays:
        a[5] = a[4096 + 5] = w.MARK_IN  # (each pickle: an array, and a part of another from 4096 on)
    threads, per_thread = 4, 150
    pickles = [[bytes(ForkingPickler.dumps([arrays[(t + i) % 8], arrays[(3 * t + i) % 8][4096:]]))
                for i in range(per_thread)] for t in range(threads)]
    with multiprocessing.get_context("fork").Pool(1) as pool:
        errors, mappings = pool.apply(w.load_in_threads, (pickles,))
    assert errors == []
    assert all(a[10 + t] == a[4096 + 10 + t] == 1 for a in arrays for t in range(threads))
    assert mappings < threads * per_thread  # (2 arrays a pickle: 1,200 received)
    del arrays, pickles, a
    gc.collect()
    wait_until(lambda: _objects() == 0, what="every object freed")


def test_a_worker_killed_after_taking_a_mapping_back_leaves_nothing(default_daemon: DaemonProcess) -> None:
    ctx = multiprocessing.get_context("fork")
    a = ugem.empty(SIZE, np.uint8)
    mine, theirs = ctx.Pipe()
    proc = ctx.Process(target=w.receive_twice_until_killed, args=(theirs,))
    proc.start()
    mine.send(a)
    mine.send(a)
    assert mine.poll(SAFETY_S)
    first, again = mine.recv()
    assert first == again
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(SAFETY_S)
    del a
    gc.collect()
    wait_until(lambda: _objects() == 0, what="every object released")


def test_a_fork_releases_lingering_mappings_first(default_daemon: DaemonProcess) -> None:
    """The child would inherit them, which the daemon does not know of: the Device tells its
    daemon of the fork (MAPPINGS_FORKED), which sends its queue first, lingering mappings
    unmapped and released; the child inherits none, and the memory stays recyclable."""
    dev = ugem.default_device()
    if not dev._fds().usable:
        pytest.skip("this process may not copy the daemon's fds: its mappings carry fds, never recycled")
    with multiprocessing.get_context("fork").Pool(1) as pool:
        h = dev.create(SIZE)
        view = dev.mmap(h)
        a = np.frombuffer(view, dtype=np.uint8)
        a[:] = 1
        pool.apply(w.map_id_of, (a,))  # the worker's mapping lingers once the task ends
        assert pool.apply(w.then, ("fork",)) == 0  # memfd mappings the child inherited
        del a, view
        gc.collect()
        dev.close_handle(h)
        wait_until(lambda: dev.stats()["objects"] == 0, what="the object freed")
        assert dev.stats()["pooled_memfds"] == 1
