"""Large reads through a mapping (backing/mapping.py `read_mapped`): the client's XFER copies
(client/bulk.py) and the manager's own reads, on real memfds (sealed as the manager seals its
own, or not)."""

from __future__ import annotations

import fcntl
import mmap
import os
import threading
from collections.abc import Iterator

import numpy as np
import pytest

import ugem
from ugem.backing import mapping, memfd
from ugem.client import bulk
from ugem.errors import IOFailure
from ugem.fd import OwnedFd

MiB = 1 << 20
MAPPED_MIN = 256 << 10  # (the tests' threshold; the real one is 1.5x the CPU's last-level cache)


def _memfd(data: bytes, sealed: bool) -> OwnedFd:
    fd = os.memfd_create("bulk-test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, len(data))
    os.pwrite(fd, data, 0)
    if sealed:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return OwnedFd(fd)


@pytest.fixture
def preadv_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    monkeypatch.setattr(bulk, "MAPPED_MIN", MAPPED_MIN)
    monkeypatch.setattr(memfd, "MAPPED_MIN", MAPPED_MIN)
    calls: list[int] = []
    real = os.preadv

    def counted(fd: int, buffers: list[memoryview], offset: int) -> int:
        calls.append(offset)
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", counted)
    yield calls


def test_a_large_read_of_sealed_memory_copies_through_a_mapping_at_any_offset(preadv_calls: list[int]) -> None:
    data = np.random.default_rng(1).integers(0, 256, 3 * MiB, dtype=np.uint8).tobytes()
    with _memfd(data, sealed=True) as fd:
        for offset, length in ((0, 3 * MiB), (4097, MAPPED_MIN), (123, 2 * MiB + 5)):
            out = bytearray(length)
            bulk.preadv_all(fd, out, offset)
            assert out == data[offset:offset + length]
    assert preadv_calls == []


def test_unsealed_memory_and_small_reads_take_preadv(preadv_calls: list[int]) -> None:
    data = os.urandom(MiB)
    with _memfd(data, sealed=False) as fd:  # its owner may shrink it under a mapping
        out = bytearray(MiB)
        bulk.preadv_all(fd, out, 0)
        assert out == data and preadv_calls == [0]
    with _memfd(data, sealed=True) as fd:
        out = bytearray(MAPPED_MIN - 1)
        bulk.preadv_all(fd, out, 7)
        assert out == data[7:7 + len(out)] and preadv_calls == [0, 7]


def test_a_read_past_the_end_is_short_never_a_fault(preadv_calls: list[int]) -> None:
    with _memfd(os.urandom(MiB), sealed=True) as fd:
        with pytest.raises(IOFailure):
            bulk.preadv_all(fd, bytearray(MiB), MiB // 2)
    assert preadv_calls


def test_an_embedded_managers_large_read_copies_through_a_mapping(preadv_calls: list[int]) -> None:
    data = os.urandom(2 * MiB)
    with ugem.embedded() as dev:
        h = dev.create(2 * MiB)
        dev.pwrite(h, 0, data)
        out = bytearray(MiB + 5)
        assert dev.pread_into(h, 4093, out) == len(out)
        assert out == data[4093:4093 + len(out)]
        assert dev.pread(h, 0, 100) == data[:100]  # (small: preadv)
    assert preadv_calls == [0]


def test_the_threshold_is_past_the_last_level_cache() -> None:
    # below it preadv copies faster (the data stays in the cache); past it a mapping does
    assert 16 * MiB <= mapping.MAPPED_MIN
    assert mapping._last_level_cache() * 3 // 2 <= mapping.MAPPED_MIN


def test_populate_write_fills_the_mapping_under_any_view(monkeypatch: pytest.MonkeyPatch) -> None:
    """A made object's mapping is viewed through an array over it (client/linger.py): its
    page tables are filled all the same (a recycled memfd's, before ugem.empty's array is written)."""
    from ugem.client import device_share
    calls: list[tuple[int, int, bool]] = []
    monkeypatch.setattr(device_share, "populate", lambda address, length, write: calls.append((address, length, write)))
    region = mmap.mmap(-1, 4 * mmap.PAGESIZE)
    pages = np.frombuffer(region, dtype=np.uint8)
    address = pages.ctypes.data
    device_share.populate_write(memoryview(region))
    device_share.populate_write(memoryview(pages))
    assert calls == [(address, 4 * mmap.PAGESIZE, True)] * 2
    del pages
    region.close()


# -- STREAMED preads (core/stream.py): runs from a pipe, zeros between ------------------------

def _streamed(runs: list[tuple[int, bytes]], close_early: bool = False) -> tuple[OwnedFd, bytes, threading.Thread]:
    """A pipe a thread fills with the runs' bytes (less the last byte if `close_early`), and the
    reply's PIECE records."""
    from ugem.wire.structs import PIECE

    r, w = os.pipe()
    payload = b"".join(data for _, data in runs)
    if close_early:
        payload = payload[:-1]

    def fill() -> None:
        with os.fdopen(w, "wb") as f:
            f.write(payload)

    pump = threading.Thread(target=fill)
    pump.start()
    return OwnedFd(r), b"".join(PIECE.pack(at, len(data)) for at, data in runs), pump


def test_read_streamed_fills_the_runs_and_zeroes_the_rest() -> None:
    runs = [(4096 + 7, os.urandom(3 * MiB + 5)), (4 * MiB, os.urandom(100)), (5 * MiB - 1, b"z")]
    fd, pieces, pump = _streamed(runs)
    out = np.full(5 * MiB - 9, 0xEE, np.uint8)  # the range asked for: [9, 5 MiB)
    with fd:
        bulk.read_streamed(fd, pieces, out, 9)
    pump.join()
    expected = np.zeros(5 * MiB, np.uint8)
    for at, data in runs:
        expected[at:at + len(data)] = np.frombuffer(data, np.uint8)
    assert np.array_equal(out, expected[9:])


def test_a_stream_that_ends_early_is_eio() -> None:
    fd, pieces, pump = _streamed([(0, os.urandom(MiB))], close_early=True)
    with fd, pytest.raises(IOFailure, match="ended 1 bytes early"):
        bulk.read_streamed(fd, pieces, np.empty(MiB, np.uint8), 0)
    pump.join()


def test_runs_outside_the_range_asked_for_are_eio() -> None:
    fd, pieces, pump = _streamed([(MiB, b"x" * 10)])
    with fd:
        with pytest.raises(IOFailure, match="outside the range"):
            bulk.read_streamed(fd, pieces, np.empty(100, np.uint8), 0)
        assert os.read(fd.fd, 10) == b"x" * 10  # (nothing was read: the writer can finish)
    pump.join()


# -- STREAMED|TAKEN preads: runs read from the daemon's spill files (client/bulk.py `read_runs`) --

def test_read_runs_reads_each_run_from_its_file_and_zeroes_the_rest() -> None:
    first, second = os.urandom(3 * MiB), os.urandom(MiB)
    with _memfd(first, sealed=False) as a, _memfd(second, sealed=False) as b:
        files = {7: a, 9: b}
        runs = [(7, 0, 0, 0, 4096, 100, 2 * MiB), (9, 0, 0, 0, 5, 2 * MiB + 4196, MiB - 5)]
        out = np.full(3 * MiB + 4200, 0xEE, np.uint8)  # the range asked for: [90, 90 + 3 MiB + 4200)
        bulk.read_runs(files, runs, out, 90)
        expected = np.zeros(len(out), np.uint8)
        expected[10:10 + 2 * MiB] = np.frombuffer(first, np.uint8)[4096:4096 + 2 * MiB]
        expected[2 * MiB + 4106:3 * MiB + 4101] = np.frombuffer(second, np.uint8)[5:]
        assert np.array_equal(out, expected)
        with pytest.raises(IOFailure, match="outside the range"):
            bulk.read_runs(files, [runs[1], runs[0]], out, 90)  # out of order
        with pytest.raises(IOFailure, match="ended early"):
            bulk.read_runs(files, [(9, 0, 0, 0, 5, 100, MiB)], out, 90)  # the file holds MiB - 5 from there
