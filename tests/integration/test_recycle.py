"""Recycled memfds (backing/recycle.py, core/recycle.py): a freed object's memfd backs the
next object of its uid and size, reads zeros there, and is never reused once a process
other than the daemon may still see its pages; the pool gives way first under budget and
fd pressure, and empties when idle.

Objects are written without letting a description out: through TAKES_FD mappings (the
test runs as the daemon's uid, so it may copy the daemon's fds) or inline pwrites.
Whether a memfd was reused is read from stats (`recycled_total`, `pooled_memfds`) and from
the memfd identity (st_dev, st_ino) the mappings report.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import pytest

import ugem
from ugem.backing.recycle import IDLE_S
from ugem.client.daemon_fds import DaemonFds
from ugem.client.registry import mapping_of
from ugem.errors import InvalidArgument
from ugem.testing import DaemonProcess, run_daemon
from ugem.testing.data import wait_until
from ugem.wire import structs as s
from ugem.wire.frames import XFER_ABOVE, Op

MIB = 1 << 20
SIZE = 4 * MIB
SAFETY = 120.0


@pytest.fixture
def served() -> Iterator[tuple[DaemonProcess, ugem.Device]]:
    with run_daemon() as daemon, daemon.connect() as dev:
        if not dev._fds().usable:
            pytest.skip("this process may not copy the daemon's fds (TAKES_FD)")
        yield daemon, dev


def _fill(dev: ugem.Device, size: int = SIZE, value: int = 0xAB) -> tuple[int, tuple[int, int]]:
    """A new object full of `value`, written through a TAKES_FD mapping, now unmapped;
    returns its handle and its memfd's identity."""
    h = dev.create(size)
    view = dev.mmap(h)
    pages = np.frombuffer(view, dtype=np.uint8)
    pages[:] = value
    entry = mapping_of(pages)
    assert entry is not None
    del pages, view
    return h, entry.key


def _pooled_after_close(dev: ugem.Device, h: int) -> int:
    dev.close_handle(h)
    return int(dev.stats()["pooled_memfds"])


def _reuse(dev: ugem.Device, size: int = SIZE) -> tuple[int, np.ndarray, tuple[int, int]]:
    """Objects of `size` mapped until one comes from the pool (its clearing runs on a worker:
    until it is done, new objects get fresh memfds, held meanwhile so that the pool holds
    nothing else); returns it, its pages and identity."""
    before = dev.stats()["recycled_total"]
    found: list[Any] = []
    fresh: list[int] = []

    def one() -> bool:
        h = dev.create(size)
        pages = np.frombuffer(dev.mmap(h), dtype=np.uint8)
        if dev.stats()["recycled_total"] > before:
            entry = mapping_of(pages)
            assert entry is not None
            found[:] = [h, pages, entry.key]
            return True
        fresh.append(h)
        return False

    wait_until(one, SAFETY, what="a pooled memfd reused")
    for h in fresh:
        dev.close_handle(h)
    return found[0], found[1], found[2]


def test_a_freed_memfd_backs_the_next_object_and_reads_zeros(served: tuple[DaemonProcess, ugem.Device]) -> None:
    daemon, dev = served
    h, key = _fill(dev)
    assert _pooled_after_close(dev, h) == 1
    stats = dev.stats()
    assert stats["pooled_bytes"] == SIZE and stats["resident_bytes"] == 0, stats
    h2, pages, key2 = _reuse(dev)
    assert key2 == key  # the very memfd
    assert not pages.any()  # cleared: GEM hands out zeroed objects
    assert dev.pread(h2, SIZE - 4096, 4096) == bytes(4096)
    assert dev.stats()["resident_bytes"] >= SIZE  # its pages came along
    del pages
    dev.close_handle(h2)


def test_ugem_empty_reuses_a_freed_memfd_and_reads_zeros(served: tuple[DaemonProcess, ugem.Device]) -> None:
    _, dev = served
    a = ugem.empty(SIZE, np.uint8, device=dev)
    a[:] = 9
    first = mapping_of(a)
    assert first is not None and first.source >= 0
    key, number = first.key, first.source
    del a, first  # released with the next request, which waits for the memfd's clearing (Memory.new_backing)
    b = ugem.empty(SIZE, np.uint8, device=dev)
    again = mapping_of(b)
    assert again is not None and again.key == key and dev.stats()["recycled_total"] == 1
    # under another fd number: a late claim by the old one cannot reach the memory (MemfdStore._renumbered)
    assert again.source >= 0 and again.source != number
    assert not b.any()  # its page tables filled in advance (MADV_POPULATE_WRITE): the same zeros
    b[:] = 3
    assert (b == 3).all()


def test_other_sizes_get_fresh_memfds(served: tuple[DaemonProcess, ugem.Device]) -> None:
    _, dev = served
    h, _ = _fill(dev)
    dev.close_handle(h)
    other, _ = _fill(dev, 2 * SIZE)
    assert dev.stats()["recycled_total"] == 0
    dev.close_handle(other)


def test_small_objects_are_not_pooled(served: tuple[DaemonProcess, ugem.Device]) -> None:
    _, dev = served
    h, _ = _fill(dev, 64 << 10)
    assert _pooled_after_close(dev, h) == 0


def test_objects_without_pages_are_not_pooled(served: tuple[DaemonProcess, ugem.Device]) -> None:
    _, dev = served
    h = dev.create(SIZE)
    dev.mmap(h)
    assert _pooled_after_close(dev, h) == 0


# -- escapes: a description or mapping the daemon does not track -----------------------

def test_not_pooled_after_an_mmap_that_carried_an_fd(served: tuple[DaemonProcess, ugem.Device],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    _, dev = served
    monkeypatch.setattr(dev, "_take_flag", lambda: 0)  # as a client that may not copy the daemon's fds
    h, _ = _fill(dev)
    assert _pooled_after_close(dev, h) == 0


def _bulk(dev: ugem.Device, h: int, how: str) -> None:
    """A bulk pwrite or pread of `h` (past the inline limit: the memory is handed over as an fd)."""
    if how == "pwrite":
        dev.pwrite(h, 0, b"x" * (2 * XFER_ABOVE))
        assert dev.pread(h, 0, 4) == b"xxxx"
    else:  # into a buffer: it may ask STREAM too (a spilled object's bytes from spill storage)
        into = bytearray(2 * XFER_ABOVE)
        assert dev.pread_into(h, 0, into) == len(into) and into == b"\xab" * len(into)


@pytest.mark.parametrize("how", ["pwrite", "pread"])
def test_not_pooled_after_a_bulk_transfer_that_carried_an_fd(served: tuple[DaemonProcess, ugem.Device], how: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    _, dev = served
    h, _ = _fill(dev)
    monkeypatch.setattr(dev, "_take_flag", lambda: 0)  # as a client that may not copy the daemon's fds
    _bulk(dev, h, how)  # a new description of the memory is handed over
    assert _pooled_after_close(dev, h) == 0


@pytest.mark.parametrize("how", ["pwrite", "pread"])
def test_a_bulk_transfer_that_takes_the_daemons_fd_leaves_the_memfd_recyclable(
        served: tuple[DaemonProcess, ugem.Device], how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _, dev = served
    h, _ = _fill(dev)
    replies = []
    real_call = dev._call

    def call(op: Any, req: Any, **local: Any) -> Any:
        reply = real_call(op, req, **local)
        if isinstance(reply, s.PreadReply | s.PwriteReply) and req.flags & s.XFER:
            replies.append((req.flags & s.TAKES_FD, reply.flags & s.TAKEN, reply.fd is None))
        return reply

    monkeypatch.setattr(dev, "_call", call)
    _bulk(dev, h, how)
    assert replies == [(s.TAKES_FD, s.TAKEN, True)]  # no fd: this process took the daemon's own
    assert _pooled_after_close(dev, h) == 1


@pytest.mark.parametrize("how", ["pwrite", "pread"])
def test_a_bulk_transfer_whose_taken_fd_fails_its_check_asks_again_for_an_fd(
        served: tuple[DaemonProcess, ugem.Device], how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _, dev = served
    h, _ = _fill(dev)
    monkeypatch.setattr(DaemonFds, "take", lambda self, number, key: None)  # as if the fd changed hands
    _bulk(dev, h, how)  # the first transfer is ended, the second carries a description
    assert _pooled_after_close(dev, h) == 0


@pytest.mark.parametrize("how", ["pwrite", "pread"])
def test_a_daemon_that_refuses_takes_fd_on_transfers_is_asked_without_it(
        served: tuple[DaemonProcess, ugem.Device], how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """As a daemon older than TAKES_FD on pread/pwrite: EINVAL for the flag; the client asks
    again without it, and does not ask it again; the request's own EINVAL is still raised."""
    _, dev = served
    h, _ = _fill(dev)
    asked = []
    real_call = dev._call

    def call(op: Any, req: Any, **local: Any) -> Any:
        if op in (Op.GEM_PREAD, Op.GEM_PWRITE):
            asked.append(req.flags & (s.TAKES_FD | s.STREAM))
            if req.flags & s.TAKES_FD:
                raise InvalidArgument(f"{type(req).__name__}: unknown flags {s.TAKES_FD:#x}")
        return real_call(op, req, **local)

    monkeypatch.setattr(dev, "_call", call)
    _bulk(dev, h, how)
    first_call = len(asked)
    _bulk(dev, h, how)
    first = s.TAKES_FD | (s.STREAM if how == "pread" else 0)
    assert asked[0] == first and not asked[first_call - 1] & s.TAKES_FD  # (a pread drops STREAM_TAKES first)
    assert s.TAKES_FD not in {a & s.TAKES_FD for a in asked[first_call:]}
    with pytest.raises(InvalidArgument):
        dev.pread(h, SIZE - 4, 2 * XFER_ABOVE)  # past the end: its own EINVAL, whatever the flags
    dev.close_handle(h)


def test_inline_transfers_do_not_escape(served: tuple[DaemonProcess, ugem.Device]) -> None:
    _, dev = served
    h, _ = _fill(dev)
    dev.pwrite(h, 0, b"x" * XFER_ABOVE)
    assert dev.pread(h, 0, 4) == b"xxxx"
    assert _pooled_after_close(dev, h) == 1


def test_write_taken_writes_the_daemon_s_fd_and_leaves_the_memfd_recyclable(
        served: tuple[DaemonProcess, ugem.Device]) -> None:
    _, dev = served
    h = dev.create(SIZE)
    head, body = b"head", np.arange(SIZE // 8 - 1, dtype=np.int64)
    assert dev.write_taken(h, [head, body])  # frames one after another from offset 0
    assert dev.pread(h, 0, 4) == head and dev.pread(h, 4, 64) == body[:8].tobytes()
    assert dev.pread(h, 4 + body.nbytes, 4) == bytes(4)  # the rest still zeros
    with pytest.raises(ugem.InvalidArgument, match="write_taken of"):
        dev.write_taken(h, [bytes(SIZE + 1)])
    assert _pooled_after_close(dev, h) == 1  # no description left the daemon
    h2, pages, _ = _reuse(dev)
    assert dev.write_taken(h2, [b"\x07" * SIZE]) and (pages == 7).all()  # the very memory that is mapped
    del pages
    dev.close_handle(h2)


def test_write_taken_declines_where_the_daemon_s_fds_cannot_be_copied(
        served: tuple[DaemonProcess, ugem.Device], monkeypatch: pytest.MonkeyPatch) -> None:
    _, dev = served
    monkeypatch.setattr(dev, "_take_flag", lambda: 0)
    h = dev.create(SIZE)
    assert not dev.write_taken(h, [b"x"])
    assert dev.pread(h, 0, 1) == b"\0"


def test_not_pooled_after_an_export(served: tuple[DaemonProcess, ugem.Device]) -> None:
    _, dev = served
    h, _ = _fill(dev)
    os.close(dev.export(h, writable=False))
    assert _pooled_after_close(dev, h) == 0


def test_not_pooled_after_a_fork_with_a_live_mapping(served: tuple[DaemonProcess, ugem.Device]) -> None:
    _, dev = served
    kept, _ = _fill(dev)
    unmapped, _ = _fill(dev)
    view = dev.mmap(kept)
    pid = os.fork()
    if pid == 0:
        os._exit(0)  # the child would keep `view`'s pages mapped for as long as it lives
    assert os.waitpid(pid, 0)[1] == 0
    del view
    assert _pooled_after_close(dev, kept) == 0
    assert _pooled_after_close(dev, unmapped) == 1  # unmapped when the process forked


@pytest.mark.parametrize("how", ["pwrite", "pread"])
def test_not_pooled_after_a_fork_during_a_transfer_that_took_the_daemons_fd(
        served: tuple[DaemonProcess, ugem.Device], how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The child of a fork made while a transfer holds the daemon's fd inherits that fd: the
    object escapes (the client library says MAPPINGS_FORKED first, as for a mapping)."""
    from ugem.client import device_xfer

    _, dev = served
    h, _ = _fill(dev)
    name = "pwritev_all" if how == "pwrite" else "preadv_all"
    copy = getattr(device_xfer, name)

    def fork_then_copy(*args: Any) -> Any:
        pid = os.fork()  # (as another thread of this process might, mid-transfer)
        if pid == 0:
            os._exit(0)
        assert os.waitpid(pid, 0)[1] == 0
        return copy(*args)

    monkeypatch.setattr(device_xfer, name, fork_then_copy)
    _bulk(dev, h, how)
    monkeypatch.undo()
    assert _pooled_after_close(dev, h) == 0
    h, _ = _fill(dev)  # without the fork, the same transfer leaves it recyclable
    _bulk(dev, h, how)
    assert _pooled_after_close(dev, h) == 1


def test_not_pooled_when_its_client_closes_with_the_mapping_alive(served: tuple[DaemonProcess, ugem.Device]) -> None:
    daemon, dev = served
    other = daemon.connect()
    h, _ = _fill(other)
    pages = np.frombuffer(other.mmap(h), dtype=np.uint8)
    other.close()  # arrays outlive their Device: this process still maps the memory
    wait_until(lambda: dev.stats()["objects"] == 0, SAFETY, what="the closed client's object freed")
    assert dev.stats()["pooled_memfds"] == 0
    pages[:] = 1
    del pages


def test_releases_sent_at_close_leave_the_memfd_recyclable(served: tuple[DaemonProcess, ugem.Device]) -> None:
    daemon, dev = served
    other = daemon.connect()
    _fill(other)  # its mapping released, the release queued
    other.close()
    wait_until(lambda: dev.stats()["objects"] == 0, SAFETY, what="the closed client's object freed")
    assert dev.stats()["pooled_memfds"] == 1


def _share_and_leave(channel: Connection, path: str) -> None:
    """Share a mapped object, then drop it and go away without anyone claiming the share."""
    with ugem.connect(path) as dev:
        h, _ = _fill(dev)
        pages = np.frombuffer(dev.mmap(h), dtype=np.uint8)
        entry = mapping_of(pages)
        assert entry is not None
        dev._share(entry.map_id, 0, SIZE, writable=True)
        dev.close_handle(h)
        del pages
    channel.send("gone")


def test_not_pooled_after_an_unclaimed_share_died(served: tuple[DaemonProcess, ugem.Device], kit: Any) -> None:
    daemon, dev = served
    sender = kit.tenant(_share_and_leave, daemon.path, uid=os.getuid())  # its own process: no heir for its share
    assert sender.recv(SAFETY) == "gone"
    wait_until(lambda: dev.stats()["objects"] == 0, SAFETY, what="the share dropped with its sender")
    assert dev.stats()["pooled_memfds"] == 0


def _pooled_keys(daemon: DaemonProcess) -> set[tuple[int, int]]:
    """The identities of the daemon's pooled memfds (mode 0000, backing/recycle.py)."""
    keys = set()
    for name in os.listdir(f"/proc/{daemon.pid}/fd"):
        try:
            st = os.stat(f"/proc/{daemon.pid}/fd/{name}")
        except FileNotFoundError:
            continue
        if st.st_mode & 0o777 == 0 and os.readlink(f"/proc/{daemon.pid}/fd/{name}").startswith("/memfd:ugem:"):
            keys.add((st.st_dev, st.st_ino))
    return keys


def _make_and_free(channel: Connection, path: str, size: int) -> None:
    """As another uid: objects written inline (no description leaves the daemon), freed;
    the second is held until the test says so."""
    with ugem.connect(path) as dev:
        h = dev.create(size)
        for offset in range(0, size, XFER_ABOVE):
            dev.pwrite(h, offset, b"n" * XFER_ABOVE)
        dev.close_handle(h)
        channel.send("freed")
        channel.recv()
        h = dev.create(size)
        dev.pwrite(h, 0, b"n" * XFER_ABOVE)
        channel.send("holding")
        channel.recv()


def test_pools_are_per_uid(kit: Any) -> None:
    with run_daemon(socket=os.path.join(kit.open_dir(), "ugem.sock"), socket_mode="0666") as daemon, \
            daemon.connect() as dev:
        nobody = kit.tenant(_make_and_free, daemon.path, SIZE)
        assert nobody.recv(SAFETY) == "freed"
        theirs = _pooled_keys(daemon)
        assert len(theirs) == 1
        h, mine = _fill(dev)  # root's object of that size never gets uid 65534's memfd
        assert mine not in theirs and dev.stats()["recycled_total"] == 0
        dev.close_handle(h)
        assert _pooled_keys(daemon) == theirs | {mine}
        nobody.send("again")
        assert nobody.recv(SAFETY) == "holding"
        assert mine in _pooled_keys(daemon)  # uid 65534's new object got its own memfd or a fresh one
        nobody.send("done")


# -- accounting ------------------------------------------------------------------------

def test_budget_pressure_drops_the_pool_before_spilling() -> None:
    budget = 64 * MIB
    with run_daemon(system_budget=budget) as daemon, daemon.connect() as dev:
        keep, _ = _fill(dev, MIB)
        h, _ = _fill(dev, 16 * MIB)  # a quarter of the budget: the most the pool takes
        assert _pooled_after_close(dev, h) == 1
        big = dev.create(budget - 4 * MIB)  # with the pool, past the budget
        for offset in range(0, budget - 4 * MIB, MIB):
            dev.pwrite(big, offset, b"b" * MIB)
        stats = dev.stats()
        assert stats["pooled_memfds"] == 0 and stats["spilled_total"] == 0 and stats["purged_total"] == 0, stats
        assert dev.info(keep).placement == "system"


def test_the_pool_stays_within_the_budget() -> None:
    budget = 24 * MIB
    with run_daemon(system_budget=budget) as daemon, daemon.connect() as dev:
        h, _ = _fill(dev, 8 * MIB)  # more than a quarter of the budget
        assert _pooled_after_close(dev, h) == 0


def test_fd_pressure_drops_the_pool_first(tmp_path: Any) -> None:
    with run_daemon(fd_limit=160, spill_dir=str(tmp_path)) as daemon, daemon.connect() as dev:
        limit = dev.stats()["memfd_limit"]  # 128
        handles = [_fill(dev, MIB)[0] for _ in range(4)]
        for h in handles:
            dev.close_handle(h)
        pooled = dev.stats()["pooled_memfds"]
        assert pooled == 4
        small = [dev.create(4096) for _ in range(limit)]
        for h in small:
            dev.pwrite(h, 0, b"s")
        stats = dev.stats()
        assert stats["memfds"] == limit and stats["pooled_memfds"] == 0 and stats["spilled_total"] == 0, stats


@pytest.mark.slow  # waits out IDLE_S (60 s)
def test_an_idle_daemon_closes_its_pool(served: tuple[DaemonProcess, ugem.Device]) -> None:
    daemon, dev = served
    h, _ = _fill(dev)
    assert _pooled_after_close(dev, h) == 1
    wait_until(lambda: daemon.pooled_fds() == 0, IDLE_S + SAFETY, what=f"the pool emptied after {IDLE_S} idle seconds")
    assert dev.stats()["pooled_bytes"] == 0


# -- the device's copies through a recycled memfd ------------------------------------------

def test_device_copies_through_a_recycled_memfd_keep_every_byte() -> None:
    """The device copies a recycled memfd in and out through the daemon's own mapping of it
    (backing/memfd.py `map`, `device_file`): an object written, moved into VRAM, changed
    there and read back, and an object the device wrote evicted by suspend into a recycled
    memfd, each read back byte for byte."""
    from ugem.cmd import Fill

    data = np.random.default_rng(7).integers(0, 256, SIZE, dtype=np.uint8)
    with run_daemon(vram="16M") as daemon, daemon.connect() as dev:
        if not dev._fds().usable:
            pytest.skip("this process may not copy the daemon's fds (TAKES_FD)")
        h, _ = _fill(dev)
        assert _pooled_after_close(dev, h) == 1
        h, pages, _ = _reuse(dev)  # copied in through the mapping the zeroing filled
        pages[:] = data
        del pages
        dev.wait_fence(dev.execbuffer([Fill(dst=h, offset=MIB, length=4096, byte=0x5A)]), -1)
        assert dev.info(h).placement == "vram"
        want = data.copy()
        want[MIB:MIB + 4096] = 0x5A
        assert np.array_equal(np.frombuffer(dev.pread(h, 0, SIZE), np.uint8), want)  # copied out through it

        def suspend_into_a_recycled_memfd() -> bool:
            donor = dev.create(SIZE)
            dev.pwrite(donor, 0, data.tobytes())
            dev.close_handle(donor)  # pooled, then cleared by a worker
            y = dev.create(SIZE)  # never populated: evicted into whatever memfd is ready
            dev.execbuffer([Fill(dst=y, offset=0, length=SIZE, byte=0x66)])
            dev.wait_fence(dev.execbuffer([Fill(dst=y, offset=SIZE - 8192, length=4096, byte=0x77)]), -1)
            before = dev.stats()["recycled_total"]
            dev.suspend()
            dev.resume()
            recycled = dev.stats()["recycled_total"] > before
            got = np.frombuffer(dev.pread(y, 0, SIZE), np.uint8)
            assert (got[:SIZE - 8192] == 0x66).all() and (got[SIZE - 8192:SIZE - 4096] == 0x77).all()
            assert (got[SIZE - 4096:] == 0x66).all()
            dev.close_handle(y)
            return recycled

        wait_until(suspend_into_a_recycled_memfd, SAFETY, what="a suspend that evicted into a recycled memfd")
        dev.close_handle(h)
