"""Pickling by reference: a Buffer, and a numpy array whose memory lies in a ugem mapping,
pass through multiprocessing (Process arguments, Queue, Pipe, Pool, ProcessPoolExecutor;
fork, spawn and forkserver) without a copy, in both modes (the mode is the sender's, and the
default device of its children: $UGEM_SOCKET names a daemon, or where none listens); plain
pickle sends a daemon client's Buffer by name and refuses an embedded one; other arrays
pickle by value as before. Workers live in ugem.testing.workers (spawn must import them).
"""

from __future__ import annotations

import concurrent.futures
import gc
import multiprocessing
import multiprocessing.forkserver
import os
import pickle
import signal
from multiprocessing.reduction import ForkingPickler
from typing import Any

import numpy as np
import pytest

import ugem
from ugem.client.default import reset
from ugem.testing import DaemonProcess, run_daemon
from ugem.testing import workers as w
from ugem.testing.data import SAFETY_S, wait_until
from ugem.wire import structs_share as ss
from ugem.wire.frames import Op

METHODS = ["fork", "spawn", "forkserver"]
CHANNELS = ["process", "queue", "pipe", "pool", "executor"]


def _marked() -> tuple[np.ndarray, np.ndarray]:
    """A ugem array and a non-contiguous, offset, transposed view of it, marked at [1, 1]."""
    base = ugem.zeros((64, 48), np.int32)
    view = base[1::2, 2::3].T  # strides (12, 384), offset 4 bytes + one row
    view[1, 1] = w.MARK_IN
    return base, view


def _moved(daemon: DaemonProcess | None) -> int:
    if daemon is None:
        return 0
    with daemon.connect() as dev:
        return int(dev.stats()["bytes_moved_total"])


def _send(method: str, channel: str, a: np.ndarray) -> dict[str, Any]:
    ctx = multiprocessing.get_context(method)
    if channel in ("pool", "executor"):
        if channel == "pool":
            with ctx.Pool(1) as pool:
                got = pool.apply(w.touch, (a,))
                assert pool.map(w.touch, [a, a]) == [got] * 2
            return dict(got)
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as ex:
            return dict(ex.submit(w.touch, a).result(timeout=SAFETY_S))
    result_r, result_w = ctx.Pipe(duplex=False)
    if channel == "process":
        proc = ctx.Process(target=w.touch_into, args=(a, result_w))
        proc.start()
    elif channel == "queue":
        q = ctx.Queue()
        proc = ctx.Process(target=w.on_queue, args=(q, result_w))
        proc.start()
        q.put(a)
    else:
        mine, theirs = ctx.Pipe()
        proc = ctx.Process(target=w.on_pipe, args=(theirs, result_w))
        proc.start()
        mine.send(a)
    assert result_r.poll(SAFETY_S), "the worker never answered"
    got = result_r.recv()
    proc.join(SAFETY_S)
    assert proc.exitcode == 0
    return dict(got)


@pytest.mark.parametrize("channel", CHANNELS)
@pytest.mark.parametrize("method", METHODS)
def test_an_array_view_travels_by_reference(sender, method, channel):
    base, view = _marked()
    moved = _moved(sender)
    got = _send(method, channel, view)
    assert got == {"seen": w.MARK_IN, "shape": view.shape, "strides": view.strides, "dtype": view.dtype.str,
                   "writeable": True, "type": "ndarray"}
    assert view[0, 0] == base[1, 2] == w.MARK_OUT  # the worker's write, seen here: the same memory
    assert _moved(sender) == moved  # no byte was copied by the daemon


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_read_only_view_arrives_read_only(sender, method):
    base, view = _marked()
    view.flags.writeable = False
    with multiprocessing.get_context(method).Pool(1) as pool:
        got = pool.apply(w.touch, (view,))
    assert (got["seen"], got["writeable"]) == (w.MARK_IN, False)
    assert base[1, 2] == 0


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_writable_array_is_claimed_with_no_round_trip_where_the_daemon_allows(sender, method):
    """Same uid as the daemon (here): the worker takes the daemon's fd of the memory itself;
    a read-only array always goes through the daemon (its fd would be writable)."""
    if sender is None:
        pytest.skip("embedded arrays travel as fds")
    a = ugem.zeros(4096, np.uint8)
    a[0] = 9
    ro = ugem.zeros(4096, np.uint8)
    ro.flags.writeable = False
    with multiprocessing.get_context(method).Pool(1) as pool:
        assert pool.apply(w.claimed_how, (a,)) == {"no_round_trip": True, "seen": 9}
        assert pool.apply(w.claimed_how, (ro,)) == {"no_round_trip": False, "seen": 0}
        assert pool.apply(w.claimed_how, (a[4096 - 100:],)) == {"no_round_trip": True, "seen": 0}


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_the_receivers_array_is_the_senders_memory_both_ways(sender, method):
    base = ugem.zeros(1024, np.float32)
    ctx = multiprocessing.get_context(method)
    mine, theirs = ctx.Pipe()
    proc = ctx.Process(target=w.hold_until_killed, args=(theirs,))
    proc.start()
    try:
        mine.send(base[100:200])
        assert mine.poll(SAFETY_S) and mine.recv() == 100
        assert base[100] == w.MARK_OUT and base[101] == 0
    finally:
        proc.kill()
        proc.join(SAFETY_S)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_an_array_sent_back_comes_home_to_the_senders_own_mapping(sender, method, monkeypatch):
    """The worker returns the array it received: the parent finds that it maps that memory
    already and uses its own mapping again (no claim, no second mapping); daemon mode sends
    shares, embedded mode fds, and neither copies a byte."""
    a = ugem.zeros(3 * 4096 + 100, np.uint16)[7:]
    moved = _moved(sender)
    claims: list[object] = []
    real_claim = ugem.Device._claim
    with multiprocessing.get_context(method).Pool(1) as pool:
        for round_ in range(3):
            monkeypatch.setattr(ugem.Device, "_claim", lambda *args: claims.append(args) or real_claim(*args))
            a.flat[0] = round_
            got = pool.apply(w.mark_and_return, (a,))
            monkeypatch.undo()
            assert claims == []
            assert np.shares_memory(got, a) and got.shape == a.shape and got.strides == a.strides
            assert a.flat[0] == w.MARK_OUT
    assert _moved(sender) == moved


def test_an_array_sent_before_its_device_closes_still_arrives_intact(sender):
    """The sender drops the array and closes the Device it came from before the receiver
    loads it: it arrives whole (daemon: the share passed to another client of the sending
    process; embedded: the fd in flight holds the memory), and nothing is left after."""
    dev = ugem.connect(sender.path) if sender is not None else ugem.embedded()
    a = ugem.zeros(100_000, np.int32, device=dev)
    a[:] = np.arange(100_000)
    ctx = multiprocessing.get_context("spawn")
    mine, theirs = ctx.Pipe()
    proc = ctx.Process(target=w.load_when_told, args=(theirs,))
    proc.start()
    try:
        mine.send(a)
        del a
        gc.collect()
        dev.close()
        mine.send("go")
        assert mine.poll(SAFETY_S), "the receiver never answered"
        assert mine.recv() == int(np.arange(100_000).sum())
    finally:
        proc.join(SAFETY_S)
    assert proc.exitcode == 0
    if sender is not None:
        with sender.connect() as watcher:
            assert watcher.stats()["objects"] == 0


def test_purged_memory_reads_zeros_in_the_receiver_never_other_bytes(monkeypatch, tmp_path):
    """A received array whose object is purged (DONTNEED, memory pressure) reads zeros, as
    every mapping of a purged object does; its pages never show another object's bytes."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with run_daemon(system_budget="8M") as daemon:
        monkeypatch.setenv("UGEM_SOCKET", daemon.path)
        reset()
        try:
            dev = ugem.default_device()
            buf = dev.new(4 << 20)
            a = buf.array(np.uint8)
            a[:] = 7
            ctx = multiprocessing.get_context("spawn")
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=w.hold_and_sum, args=(theirs,))
            proc.start()
            try:
                mine.send(a)
                assert mine.poll(SAFETY_S) and mine.recv() == 7 * (4 << 20)  # received, mapped, read
                buf.madvise(ugem.DONTNEED)
                filler = [dev.new(3 << 20) for _ in range(3)]
                for f in filler:
                    f.write(b"\xff" * (3 << 20))  # 9 MiB more under an 8 MiB budget: the DONTNEED one goes
                assert buf.madvise(ugem.WILLNEED) is False  # purged
                mine.send("again")
                assert mine.poll(SAFETY_S) and mine.recv() == 0  # zeros, not 0xff
            finally:
                mine.send("stop")
                proc.join(SAFETY_S)
            assert proc.exitcode == 0
        finally:
            reset()


def test_a_daemon_that_cannot_be_reached_is_a_clear_error_naming_the_socket(sender):
    if sender is None:
        pytest.skip("embedded arrays travel as fds: no daemon to reach")
    a = ugem.zeros(1000, np.int64)
    data = bytes(ForkingPickler.dumps(a))
    sender.proc.terminate()
    sender.proc.wait(SAFETY_S)
    ctx = multiprocessing.get_context("spawn")
    mine, theirs = ctx.Pipe()
    proc = ctx.Process(target=w.load_bytes, args=(theirs, data))
    proc.start()
    try:
        assert mine.poll(SAFETY_S), "the receiver hung"
        why = mine.recv()
    finally:
        proc.join(SAFETY_S)
    assert sender.path in why and "no ugem daemon" in why, why  # names the socket and why, never hangs


def test_a_buffer_travels_by_reference(sender):
    buf = ugem.default_device().new(8192)
    buf.write(b"from the parent", 4096)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        got = pool.apply(_buffer_roundtrip, (buf,))
    assert got == b"from the parent"
    assert buf.read(4096 + 100, 5) == b"child"


def _buffer_roundtrip(buf: ugem.Buffer) -> bytes:
    buf.write(b"child", 4096 + 100)
    return buf.read(4096, 15)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_receiver_of_2000_arrays_holds_at_most_16_more_fds(sender, method):
    base = ugem.zeros((2000, 1024), np.uint8)
    base[:, 0] = np.arange(2000) % 256
    ctx = multiprocessing.get_context(method)
    mine, theirs = ctx.Pipe()
    proc = ctx.Process(target=w.receive_many, args=(theirs, 2000))
    proc.start()
    for i in range(2000):  # one at a time: the sender's resource sharer holds each fd until fetched
        mine.send(base[i])
        assert mine.poll(SAFETY_S)
        mine.recv()
    assert mine.poll(SAFETY_S)
    before, after = mine.recv()
    proc.join(SAFETY_S)
    assert proc.exitcode == 0
    assert after - before <= 16, (before, after)


def test_an_array_received_in_embedded_mode_can_only_go_back(sender):
    base, view = _marked()
    ctx = multiprocessing.get_context("spawn")
    result_r, result_w = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=w.resend_into, args=(view, result_w))  # not a Pool's: it starts a child
    proc.start()
    assert result_r.poll(SAFETY_S), "the worker never answered"
    why = result_r.recv()
    proc.join(SAFETY_S)
    if sender is None:
        assert "can only be sent back to a process that still maps its memory" in why
    else:
        assert why == ""  # mapped through the daemon: it can go anywhere


def test_nothing_is_left_after_the_pool_ends_and_after_a_sigkilled_worker(sender):
    dev = ugem.default_device()
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:  # warm up what multiprocessing keeps for good (its fd sharer, tracker)
        pool.apply(w.touch, (_marked()[1],))
    del pool
    gc.collect()  # the pool's pipes
    wait_until(lambda: dev.stats()["objects"] == 0, what="the warm-up object released")
    fds = w.fd_count()
    base, view = _marked()
    with ctx.Pool(2) as pool:
        pool.map(w.touch, [view] * 4)
    del pool
    mine, theirs = ctx.Pipe()
    proc = ctx.Process(target=w.hold_until_killed, args=(theirs,))
    proc.start()
    mine.send(base[3])
    assert mine.poll(SAFETY_S) and mine.recv() == 48
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(SAFETY_S)
    assert base[3, 0] == w.MARK_OUT
    mine.close()
    theirs.close()
    proc.close()
    del base, view, proc
    gc.collect()
    # a request sends the queued release of this process's mapping; then nothing holds the object
    wait_until(lambda: dev.stats()["objects"] == 0, what="every object released")
    assert dev.stats()["spilled_bytes"] == 0
    wait_until(lambda: w.fd_count() <= fds, what=f"this process back to {fds} fds")


def test_plain_pickle_of_a_daemon_buffer_travels_by_name(sender, monkeypatch, tmp_path):
    if sender is None:
        buf = ugem.default_device().new(4096)
        with pytest.raises(pickle.PicklingError, match="embedded"):
            pickle.dumps(buf)
        return
    with sender.connect() as dev:  # a client of the same socket, not this process's default
        buf = dev.new(4096)
        buf.write(b"by name")
        blob = pickle.dumps(buf)
        same = pickle.loads(blob)  # the default device is a client of the same socket: it is used
        assert same.device is ugem.default_device() and same.read(0, 7) == b"by name"
        monkeypatch.setenv("UGEM_SOCKET", str(tmp_path / "elsewhere.sock"))  # now the default is embedded
        reset()
        other = pickle.loads(blob)  # through a connection of its own to that socket
        assert other.device is not dev and not other.device._live().embedded
        other.write(b"N")
        assert buf.read(0, 7) == b"Ny name"
        buf.close()
        same.close()
        other.close()
        with pytest.raises(ugem.NoSuchObject, match="is gone"):
            pickle.loads(blob)


@pytest.mark.parametrize("dumps", [pickle.dumps, ForkingPickler.dumps], ids=["pickle", "ForkingPickler"])
def test_other_arrays_pickle_by_value_as_before(sender, dumps):
    plain = np.arange(24, dtype=np.float64).reshape(4, 6)[:, ::2]
    assert bytes(dumps(plain)) == pickle.dumps(plain, protocol=pickle.DEFAULT_PROTOCOL)
    ours = ugem.zeros((4, 6))
    if dumps is pickle.dumps:  # plain pickle: ugem arrays by value too
        copy = pickle.loads(dumps(ours))
        copy[0, 0] = 1
        assert ours[0, 0] == 0


def test_one_pickle_of_many_arrays_posts_its_shares_together(sender, monkeypatch):
    """More than twice HOLD_BACK arrays in one multiprocessing pickle: their shares go to the
    daemon in a few writes (HOLD_BACK at a time, as GEM_SHARE_BATCH requests); the last few
    stay held back (the receiver claims them early, by the memory they name); the
    receiver's claims all go before loads returns, in one write."""
    if sender is None:
        pytest.skip("embedded arrays travel as fds")
    from ugem.client.batch import HOLD_BACK
    from ugem.client.default import default_device

    dev = default_device()
    n = 2 * HOLD_BACK + 88
    arrays = [ugem.zeros(4096, np.uint8) for _ in range(n)]
    for i, a in enumerate(arrays):
        a[0] = i % 256
    writes: list[int] = []  # shares sent by each write (records of its GEM_SHARE_BATCH requests)
    real_post = dev._transport.post

    def post(frames):
        writes.append(sum(len(req.records) // ss.SHARE_BATCH_RECORD.size for op, req in frames
                          if op == Op.GEM_SHARE_BATCH))
        real_post(frames)

    monkeypatch.setattr(dev._transport, "post", post)
    data = ForkingPickler.dumps(arrays)
    held = len(dev._releases.shares)
    assert held < HOLD_BACK and sum(writes) + held == n and len(writes) <= n // HOLD_BACK + 1
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply(w.load_and_count_posts, (bytes(data),)) == 1


def test_a_round_trip_to_a_worker_writes_nothing_to_the_daemon_from_the_sender(sender, monkeypatch):
    """The sender's shares are held back (sent with its next request, or HOLD_BACK at a
    time): an array sent to a Pool worker and back costs the sending process no write to the
    daemon; the worker claims each one early, by the memory it names, and nothing is left
    once the sender lets go."""
    if sender is None:
        pytest.skip("embedded arrays travel as fds")
    from ugem.client.batch import HOLD_BACK
    from ugem.client.default import default_device

    dev = default_device()
    a = ugem.zeros(3 * 4096, np.uint8)
    writes: list[int] = []
    real_post = dev._transport.post
    monkeypatch.setattr(dev._transport, "post", lambda frames: (writes.append(len(frames)), real_post(frames))[1])
    rounds = HOLD_BACK // 4
    with multiprocessing.get_context("fork").Pool(1) as pool:
        for round_ in range(rounds):
            a[0] = round_
            got = pool.apply(w.mark_and_return, (a,))
            assert np.shares_memory(got, a) and a[0] == w.MARK_OUT
            del got
        assert writes == []
    monkeypatch.undo()
    del a
    gc.collect()
    wait_until(lambda: dev.stats()["objects"] == 0, what="the object released once the held shares went out")
