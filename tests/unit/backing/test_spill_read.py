"""backing/spill_read.py and SpillStore.read: a spilled object's bytes read straight from
the spill files through a pipe, on real memfds, a real spill directory and real pipes."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ugem.backing import spill_read
from ugem.backing.spill import STRIPE, Extent, SpillStore, read_plan

PAGE = 4096
MiB = 1 << 20


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SpillStore]:
    s = SpillStore(str(tmp_path))
    try:
        yield s
    finally:
        s.close()


def _spilled(store: SpillStore, size: int, runs: list[tuple[int, bytes]]) -> Extent:
    """An extent holding a `size`-byte memfd that has `runs` (offset, bytes) and holes elsewhere."""
    fd = os.memfd_create("spill-read-test", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        for offset, data in runs:
            os.pwrite(fd, data, offset)
        extent = store.reserve(sum(len(d) for _, d in runs))
        store.store(fd, extent, size)
        return extent
    finally:
        os.close(fd)


def _expected(size: int, runs: list[tuple[int, bytes]]) -> bytearray:
    whole = bytearray(size)
    for offset, data in runs:
        whole[offset:offset + len(data)] = data
    return whole


def _read(store: SpillStore, extent: Extent, start: int, end: int) -> bytearray:
    """What a client makes of the stream: the runs from the pipe, zeros elsewhere."""
    read = store.read(extent, start, end, 1 << 20)
    assert read is not None
    runs, read_end, work = read
    pump = threading.Thread(target=work)
    pump.start()
    out = bytearray(end - start)
    with read_end:
        for at, _, _, length in runs:
            assert start <= at and at + length <= end
            done = 0
            while done < length:
                chunk = os.read(read_end.fd, length - done)
                assert chunk, "the pipe ended early"
                out[at - start + done:at - start + done + len(chunk)] = chunk
                done += len(chunk)
        assert os.read(read_end.fd, 1) == b""  # nothing more: the pump closed its end
    pump.join()
    store.read_done(extent)
    return out


def test_any_window_reads_the_bytes_and_zeros_of_a_sparse_striped_extent(store: SpillStore) -> None:
    size = 3 * STRIPE
    runs = [(0, os.urandom(MiB + 100)), (STRIPE - 5 * PAGE, os.urandom(3 * STRIPE // 2)),
            (size - PAGE, os.urandom(PAGE))]
    extent = _spilled(store, size, runs)
    assert len(extent.nodes) == 2  # its data lies in both files: the windows below cross from one to the other
    whole = _expected(size, runs)
    for start, end in [(0, size), (7, MiB + 1000), (MiB + 200, 2 * MiB), (STRIPE - 1, STRIPE + 3 * MiB + 1),
                       (size - PAGE - 3, size), (2 * MiB, 3 * MiB)]:
        assert _read(store, extent, start, end) == whole[start:end], (start, end)


def test_plan_lists_only_the_runs_in_the_window_in_object_order(store: SpillStore) -> None:
    runs = [(PAGE, b"a" * PAGE), (4 * PAGE, b"b" * 2 * PAGE), (10 * PAGE, b"c" * PAGE)]
    extent = _spilled(store, 16 * PAGE, runs)
    plan = read_plan(extent, PAGE + 10, 5 * PAGE)
    assert [(at, n) for at, _, _, n in plan] == [(PAGE + 10, PAGE - 10), (4 * PAGE, PAGE)]
    assert read_plan(extent, 2 * PAGE, 4 * PAGE) == []  # a hole only
    assert store.read(extent, 0, 16 * PAGE, max_runs=2) is None  # three runs: too many


def test_a_release_while_read_waits_for_the_last_read(store: SpillStore) -> None:
    data = os.urandom(2 * MiB)
    extent = _spilled(store, 2 * MiB, [(0, data)])
    used = store.used_bytes
    read = store.read(extent, 0, 2 * MiB, 16)
    assert read is not None
    _, read_end, work = read
    store.punch(extent)  # (a restore's punch) skipped while read
    store.release(extent)  # freed meanwhile: its ranges stay reserved
    assert store.used_bytes == used
    for _ in range(2):  # space handed out now (in either file) lies elsewhere: the data read is intact
        other = store.reserve(2 * MiB)
        node, theirs = other.nodes[0], extent.nodes[0]
        assert other.files != extent.files or node.start >= theirs.start + theirs.size \
            or theirs.start >= node.start + node.size
        store.release(other)
    pump = threading.Thread(target=work)
    pump.start()
    with read_end:
        got = b""
        while chunk := os.read(read_end.fd, MiB):
            got += chunk
    pump.join()
    assert got == data
    store.read_done(extent)  # the last read: now it is given back
    assert store.used_bytes == used - 2 * MiB


def test_the_pump_gives_up_when_the_reader_closes_its_end(store: SpillStore) -> None:
    extent = _spilled(store, 4 * MiB, [(0, os.urandom(4 * MiB))])
    read = store.read(extent, 0, 4 * MiB, 16)
    assert read is not None
    _, read_end, work = read
    read_end.close()
    with pytest.raises(OSError) as gave_up:
        work()
    assert gave_up.value.errno == errno.EPIPE
    store.read_done(extent)


def test_the_pump_gives_up_on_a_reader_that_never_reads(store: SpillStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spill_read, "STALL_S", 0.2)
    extent = _spilled(store, 4 * MiB, [(0, os.urandom(4 * MiB))])
    read = store.read(extent, 0, 4 * MiB, 16)
    assert read is not None
    _, read_end, work = read
    with read_end, pytest.raises(OSError) as gave_up:
        work()  # the pipe fills, nobody reads
    assert gave_up.value.errno == errno.ETIMEDOUT
    store.read_done(extent)


def test_the_pump_closes_what_it_was_given_even_when_it_fails(store: SpillStore) -> None:
    before = len(os.listdir("/proc/self/fd"))
    extent = _spilled(store, MiB, [(0, os.urandom(MiB))])
    read = store.read(extent, 0, MiB, 16)
    assert read is not None
    _, read_end, work = read
    read_end.close()
    with pytest.raises(OSError):
        work()
    store.read_done(extent)
    assert len(os.listdir("/proc/self/fd")) == before  # its dups of the spill files and the pipe's write end
