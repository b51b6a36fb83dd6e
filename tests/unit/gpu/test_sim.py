"""SimGpu: the GPU timeline (seqnos, order, completion, hangs, close) and its memory."""

from __future__ import annotations

import errno
import logging
import mmap
import os
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from ugem.cmd import Copy, Fill, SemaphoreWait
from ugem.fd import OwnedFd
from ugem.gpu.base import CopyIn, CopyOut, Execute, Surface
from ugem.gpu.commands import Hung
from ugem.gpu.sim import SimGpu, run_op
from ugem.testing.data import SAFETY_S

MiB = 1 << 20


@pytest.fixture
def dev() -> Iterator[SimGpu]:
    with SimGpu(vram_size=MiB, hang_timeout=5.0) as gpu:
        yield gpu


def fill(offset: int, length: int, byte: int, *, size: int = 4096) -> Execute:
    """An Execute filling bytes [offset, offset+length) of device memory (a 4 KiB surface there)."""
    base = offset - offset % size
    return Execute([Fill(dst=1, offset=offset - base, length=length, byte=byte)], {1: Surface(size, vram=base)})


def sem_wait(host: bytearray, offset: int, value: int) -> Execute:
    return Execute([SemaphoreWait(obj=1, offset=offset, value=value)], {1: Surface(len(host), host=host)})


# --- seqnos, order, memory ---


def test_seqnos_increase_from_one_and_complete_in_order(dev: SimGpu) -> None:
    seen: list[int] = []
    dev.set_notify(seen.append)
    seqnos = [dev.submit(CopyIn(i * 4096, bytes([i]) * 4096, 4096)) for i in range(20)]
    assert seqnos == list(range(1, 21))
    assert dev.wait(20, 5.0)
    assert dev.completed() == 20
    deadline = time.monotonic() + 5
    while len(seen) < 20 and time.monotonic() < deadline:  # notify runs just after completion
        time.sleep(0.001)
    assert seen == seqnos
    assert all(dev.error(s) is None for s in seqnos)


def test_copy_in_then_copy_out_round_trip(dev: SimGpu) -> None:
    data = bytes(range(256)) * 64
    dev.submit(CopyIn(8192, data, len(data)))
    out = bytearray(len(data))
    seq = dev.submit(CopyOut(8192, out, len(data)))
    assert dev.wait(seq, 5.0)
    assert dev.read_vram(8192, len(data)) == data
    assert out == data
    assert dev.read_vram(0, 8192) == bytes(8192)  # untouched memory reads zeros


def test_copy_takes_only_length_bytes_of_a_larger_buffer(dev: SimGpu) -> None:
    dev.submit(CopyIn(0, b"abcdefgh", 3))
    out = bytearray(b"........")
    assert dev.wait(dev.submit(CopyOut(0, out, 4)), 5.0)
    assert out == b"abc\0...."


def test_execute_runs_on_vram_slices_and_host_buffers_in_place(dev: SimGpu) -> None:
    host = bytearray(4096)
    op = Execute(
        [Fill(dst=1, offset=100, length=50, byte=0xAB), Copy(src=1, src_offset=100, dst=2, dst_offset=10, length=50)],
        {1: Surface(4096, vram=3 * 4096), 2: Surface(4096, host=host)},
    )
    assert dev.wait(dev.submit(op), 5.0)
    assert dev.read_vram(3 * 4096 + 100, 50) == b"\xab" * 50
    assert dev.read_vram(3 * 4096, 100) == bytes(100)
    assert host[10:60] == b"\xab" * 50 and host[:10] == bytes(10) and host[60:] == bytes(len(host) - 60)


def test_a_read_only_host_surface_can_be_read_but_not_written(dev: SimGpu) -> None:
    source = bytes(range(64)) * 64  # e.g. a read-only userptr
    surfaces = {1: Surface(4096, host=source), 2: Surface(4096, vram=0)}
    read = dev.submit(Execute([Copy(src=1, src_offset=0, dst=2, dst_offset=0, length=64)], surfaces))
    write = dev.submit(Execute([Fill(dst=1, offset=0, length=1, byte=1)], surfaces))
    assert dev.wait(write, 5.0)
    assert dev.error(read) is None and dev.read_vram(0, 64) == bytes(range(64))
    assert dev.error(write) == errno.EIO and source[0] == 0


def test_device_memory_is_backed_lazily() -> None:
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * mmap.PAGESIZE

    before = rss()
    with SimGpu(vram_size=1 << 30, hang_timeout=5.0) as dev:
        assert dev.vram_size == 1 << 30
        seq = dev.submit(fill(512 * MiB, 4096, 1))
        assert dev.wait(seq, 5.0)
        assert dev.read_vram(512 * MiB, 2) == b"\x01\x01"
        assert rss() - before < 64 * MiB


# --- semaphores and hangs ---


def test_semaphore_wait_holds_the_timeline_until_the_cpu_writes(dev: SimGpu) -> None:
    host = bytearray(4096)
    seq = dev.submit(sem_wait(host, 8, 7))
    later = dev.submit(fill(0, 16, 0x5A))
    assert not dev.wait(seq, 0.05)
    assert dev.completed() == seq - 1 and dev.read_vram(0, 16) == bytes(16)  # in order: later waits too
    struct.pack_into("<I", host, 8, 7)
    assert dev.wait(later, 5.0)
    assert dev.error(seq) is None and dev.error(later) is None
    assert dev.read_vram(0, 16) == b"\x5a" * 16


def test_a_hung_wait_completes_with_eio_and_the_device_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    host = bytearray(4096)
    done_at: dict[int, float] = {}
    with SimGpu(vram_size=MiB, hang_timeout=0.3) as dev:
        dev.set_notify(lambda s: done_at.setdefault(s, time.monotonic()))
        start = time.monotonic()
        hung = dev.submit(sem_wait(host, 0, 1))
        later = dev.submit(CopyIn(0, b"after", 5))
        assert not dev.wait(hung, 0.2)
        assert dev.wait(later, 5.0)
        assert dev.error(hung) == errno.EIO
        assert dev.error(later) is None
        assert dev.read_vram(0, 5) == b"after"
    assert 0.3 <= done_at[hung] - start < 1.5
    assert any("cancelled as hung" in r.getMessage() for r in caplog.records)


def test_hang_timeout_counts_from_the_start_of_the_execute_not_its_submission() -> None:
    first, second = bytearray(4096), bytearray(4096)
    with SimGpu(vram_size=MiB, hang_timeout=0.5) as dev:
        a = dev.submit(sem_wait(first, 0, 1))
        b = dev.submit(sem_wait(second, 0, 1))
        writer = threading.Timer(0.75, struct.pack_into, ("<I", second, 0, 1))  # b started at ~0.5 s
        writer.start()
        assert dev.wait(b, 5.0)
        writer.join()
        assert dev.error(a) == errno.EIO
        assert dev.error(b) is None


def test_a_failing_op_is_logged_and_completes_with_eio(dev: SimGpu, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="ugem.device")
    bad = dev.submit(Execute([Fill(dst=1, offset=4000, length=200, byte=1)], {1: Surface(4096, vram=0)}))
    missing = dev.submit(Execute([Fill(dst=9, offset=0, length=1, byte=1)], {1: Surface(4096, vram=0)}))
    good = dev.submit(fill(4096, 10, 2))
    assert dev.wait(good, 5.0)
    assert dev.error(bad) == errno.EIO and dev.error(missing) == errno.EIO and dev.error(good) is None
    assert dev.read_vram(4096, 10) == b"\x02" * 10
    assert [r.exc_info is not None for r in caplog.records] == [True, True]


def test_run_op_starts_no_command_past_the_deadline() -> None:
    memory = bytearray(8192)
    with memoryview(memory) as view, pytest.raises(Hung):
        run_op(view, fill(0, 16, 1), deadline=time.monotonic() - 1)
    assert memory == bytes(8192)


def test_host_buffers_are_released_when_the_op_completes(dev: SimGpu) -> None:
    # Once its seqno completed, the core may unmap a host buffer: no view of it may survive.
    region = mmap.mmap(-1, 4096)
    with memoryview(region) as host:
        copied = dev.submit(CopyOut(0, host, 4096))
        assert dev.wait(copied, 5.0)
    region.close()


def test_a_logged_traceback_pins_no_memory(caplog: pytest.LogCaptureFixture) -> None:
    # The failure is logged with its traceback and caplog keeps the record; the frames of
    # commands.execute hold numpy arrays over the views, so they must have been cleared.
    region = mmap.mmap(-1, 4096)
    dev = SimGpu(vram_size=MiB, hang_timeout=5.0)
    with memoryview(region) as host:
        surfaces = {1: Surface(4096, host=host), 2: Surface(4096, vram=0)}
        bad = dev.submit(Execute([Copy(src=1, src_offset=0, dst=2, dst_offset=4000, length=200)], surfaces))
        assert dev.wait(bad, 5.0) and dev.error(bad) == errno.EIO
        del surfaces
    assert any(r.exc_info for r in caplog.records)
    region.close()  # BufferError if a view of the host buffer survived
    dev.close()
    assert not any("still has views" in r.getMessage() for r in caplog.records)


# --- notify, volume, threads ---


def test_a_thousand_small_fills_complete_and_notify_each() -> None:
    seen: list[int] = []
    all_seen = threading.Event()

    def notify(seqno: int) -> None:
        seen.append(seqno)
        if seqno == 1000:
            all_seen.set()

    with SimGpu(vram_size=MiB, hang_timeout=5.0) as dev:
        dev.set_notify(notify)
        seqnos = [dev.submit(fill(i * 64, 64, i % 256)) for i in range(1000)]
        assert dev.wait(seqnos[-1], 10.0)
        assert all_seen.wait(5.0)
        assert seen == list(range(1, 1001))
        assert dev.read_vram(0, 64 * 1000) == b"".join(bytes([i % 256]) * 64 for i in range(1000))


def test_a_failing_notify_callback_does_not_stop_the_device(
    dev: SimGpu, caplog: pytest.LogCaptureFixture
) -> None:
    def notify(seqno: int) -> None:
        raise RuntimeError(f"boom {seqno}")

    dev.set_notify(notify)
    seqs = [dev.submit(fill(0, 1, 1)) for _ in range(3)]
    assert dev.wait(seqs[-1], 5.0)
    dev.set_notify(None)
    assert dev.wait(dev.submit(fill(0, 1, 2)), 5.0)
    assert sum("notify callback failed" in r.getMessage() for r in caplog.records) == 3


def test_submit_from_several_threads(dev: SimGpu) -> None:
    got: list[list[int]] = [[] for _ in range(8)]
    start = threading.Barrier(8)

    def worker(k: int) -> None:
        start.wait()
        for i in range(200):
            got[k].append(dev.submit(CopyIn((k * 200 + i) * 8, struct.pack("<Q", k * 1000 + i), 8)))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    everything = sorted(s for seqs in got for s in seqs)
    assert everything == list(range(1, 1601))
    assert all(seqs == sorted(seqs) for seqs in got)
    assert dev.wait(1600, 10.0)
    for k in range(8):
        for i in (0, 199):
            assert struct.unpack("<Q", dev.read_vram((k * 200 + i) * 8, 8))[0] == k * 1000 + i


def test_wait_times_out_and_polls(dev: SimGpu) -> None:
    host = bytearray(4096)
    seq = dev.submit(sem_wait(host, 0, 1))
    t0 = time.monotonic()
    assert not dev.wait(seq, 0)
    assert not dev.wait(seq, 0.1)
    assert 0.1 <= time.monotonic() - t0 < 1.0
    assert dev.wait(0, None)  # nothing to wait for
    struct.pack_into("<I", host, 0, 1)
    assert dev.wait(seq, None)


# --- close, validation ---


def test_close_with_work_queued_does_not_hang(caplog: pytest.LogCaptureFixture) -> None:
    host = bytearray(4096)
    out = bytearray(4096)
    dev = SimGpu(vram_size=MiB, hang_timeout=60.0)
    waits = [dev.submit(sem_wait(host, 0, 1)) for _ in range(3)]
    copy_in = dev.submit(CopyIn(0, b"\x11" * 4096, 4096))
    copy_out = dev.submit(CopyOut(0, out, 4096))
    t0 = time.monotonic()
    dev.close()
    assert time.monotonic() - t0 < 2.0
    assert dev.completed() == copy_out
    assert [dev.error(s) for s in waits] == [errno.EIO] * 3  # waits are abandoned as hung
    assert dev.error(copy_in) is None and out == b"\x11" * 4096  # data movement still lands
    dev.close()  # idempotent
    with pytest.raises(RuntimeError):
        dev.submit(CopyIn(0, b"x", 1))
    assert not dev.wait(copy_out + 1, None)  # never issued: does not block after close
    with pytest.raises(ValueError):
        dev.read_vram(0, 1)


def test_close_from_the_notify_callback_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    with SimGpu(vram_size=MiB, hang_timeout=5.0) as dev:
        errors: list[BaseException] = []

        def notify(seqno: int) -> None:
            try:
                dev.close()
            except RuntimeError as exc:
                errors.append(exc)

        dev.set_notify(notify)
        assert dev.wait(dev.submit(CopyIn(0, b"1", 1)), 5.0)  # a copy runs on the worker
        dev.set_notify(None)
        assert dev.wait(dev.submit(CopyIn(0, b"1", 1)), 5.0)  # still running
    assert len(errors) == 1


@pytest.mark.parametrize(
    "op",
    [
        CopyIn(MiB - 4, b"12345678", 8),  # past the end of device memory
        CopyIn(-1, b"1", 1),
        CopyIn(0, b"short", 6),  # host buffer shorter than length
        CopyOut(0, b"read-only", 4),  # CopyOut needs a writable host buffer
        Execute([], {1: Surface(4096, vram=MiB)}),
        Execute([], {1: Surface(4096)}),  # neither vram nor host
        Execute([], {1: Surface(4096, vram=0, host=bytearray(4096))}),  # both
        Execute([], {1: Surface(4096, host=bytearray(100))}),
        CopyIn(0, bytes(8192), 8192, holes=((4096, 4096), (0, 4096))),  # holes out of order
        CopyOut(0, bytearray(8192), 8192, holes=((4096, 8192),)),  # a hole past the length
        CopyOut(0, bytearray(8192), 8192, holes=((0, 0),)),  # an empty hole
    ],
)
def test_submit_refuses_ops_that_cannot_run_without_using_a_seqno(dev: SimGpu, op: object) -> None:
    with pytest.raises(ValueError):
        dev.submit(op)  # type: ignore[arg-type]
    assert dev.submit(CopyIn(0, b"x", 1)) == 1


def test_submit_refuses_what_is_not_an_op(dev: SimGpu) -> None:
    with pytest.raises(TypeError):
        dev.submit(Fill(dst=1, offset=0, length=1, byte=0))  # type: ignore[arg-type]


def test_constructor_checks_its_arguments() -> None:
    with pytest.raises(ValueError):
        SimGpu(vram_size=0, hang_timeout=1.0)
    with pytest.raises(ValueError):
        SimGpu(vram_size=MiB, hang_timeout=0)


# --- holes stay holes ---

PAGE = 4096


def _memfd_map(pages: int) -> tuple[int, mmap.mmap]:
    fd = os.memfd_create("sim-test", os.MFD_CLOEXEC)
    os.ftruncate(fd, pages * PAGE)
    return fd, mmap.mmap(fd, pages * PAGE)


def _allocated(fd: int) -> int:
    return os.fstat(fd).st_blocks * 512


def test_copy_in_reads_no_hole_and_clears_it_in_device_memory(dev: SimGpu) -> None:
    fd, host = _memfd_map(4)
    try:
        host[PAGE:2 * PAGE] = b"\x5a" * PAGE  # one page of data, three holes
        dev.submit(CopyIn(0, b"\xff" * (4 * PAGE), 4 * PAGE))  # device memory dirty first
        seq = dev.submit(CopyIn(0, host, 4 * PAGE, holes=((0, PAGE), (2 * PAGE, 2 * PAGE))))
        assert dev.wait(seq, 5.0)
        assert dev.read_vram(0, 4 * PAGE) == bytes(PAGE) + b"\x5a" * PAGE + bytes(2 * PAGE)
        assert _allocated(fd) == PAGE  # the holes were never read
    finally:
        host.close()
        os.close(fd)


def test_copy_out_writes_into_holes_only_pages_that_are_not_zeros(dev: SimGpu) -> None:
    fd, host = _memfd_map(6)
    try:
        host[0:PAGE] = b"\x01" * PAGE  # data: overwritten even with zeros
        vram = bytearray(6 * PAGE)
        vram[3 * PAGE + 7] = 0x77  # one nonzero page in the hole [PAGE, 6 * PAGE)
        vram[4 * PAGE:5 * PAGE] = b"\x78" * PAGE  # and the next one
        dev.submit(CopyIn(0, bytes(vram), len(vram)))
        seq = dev.submit(CopyOut(0, host, len(vram), holes=((PAGE, 5 * PAGE),)))
        assert dev.wait(seq, 5.0)
        assert _allocated(fd) == 3 * PAGE  # page 0 (data), pages 3 and 4 (not zeros)
        assert os.pread(fd, len(vram), 0) == bytes(vram)  # (reading through the mapping would fill holes)
    finally:
        host.close()
        os.close(fd)


def test_copy_out_through_the_host_file_writes_data_and_nonzero_pages_then_closes_it(dev: SimGpu) -> None:
    # the write path (pwritev into the memfd) keeps the mapping path's rules: data ranges
    # written whole, holes only where device memory is not all zeros; the op owns the file
    fd, host = _memfd_map(6)
    try:
        host[0:PAGE] = b"\x01" * PAGE
        vram = bytearray(6 * PAGE)
        vram[7] = 0x66
        vram[3 * PAGE + 7] = 0x77
        vram[4 * PAGE:5 * PAGE] = b"\x78" * PAGE
        dev.submit(CopyIn(0, bytes(vram), len(vram)))
        file = OwnedFd(os.dup(fd))
        seq = dev.submit(CopyOut(0, host, len(vram), holes=((PAGE, 5 * PAGE),), file=file))
        assert dev.wait(seq, 5.0)
        assert _allocated(fd) == 3 * PAGE  # page 0 (data), pages 3 and 4 (not zeros)
        assert os.pread(fd, len(vram), 0) == bytes(vram)
        deadline = time.monotonic() + SAFETY_S
        while not file.closed and time.monotonic() < deadline:  # closed right after completion
            time.sleep(0.001)
        assert file.closed
    finally:
        host.close()
        os.close(fd)


def test_copy_out_through_the_file_of_a_fresh_memfd_round_trips_a_large_range() -> None:
    size = 3 * MiB + PAGE
    data = os.urandom(size)
    with SimGpu(vram_size=4 * MiB, hang_timeout=5.0) as dev:
        fd, host = _memfd_map(size // PAGE)
        try:
            dev.submit(CopyIn(0, data, size))
            assert dev.wait(dev.submit(CopyOut(0, host, size, file=OwnedFd(os.dup(fd)))), 5.0)
            assert os.pread(fd, size, 0) == data and _allocated(fd) == size
        finally:
            host.close()
            os.close(fd)


def test_a_refused_copy_out_closes_its_file(dev: SimGpu) -> None:
    fd, host = _memfd_map(1)
    try:
        file = OwnedFd(os.dup(fd))
        with pytest.raises(ValueError):
            dev.submit(CopyOut(2 * MiB, host, PAGE, file=file))  # outside device memory
        assert file.closed
    finally:
        host.close()
        os.close(fd)


def test_copy_in_through_the_host_file_reads_no_hole_clears_it_and_closes_the_file(dev: SimGpu) -> None:
    fd, host = _memfd_map(4)
    try:
        host[PAGE:2 * PAGE] = b"\x5a" * PAGE
        dev.submit(CopyIn(0, b"\xff" * (4 * PAGE), 4 * PAGE))
        file = OwnedFd(os.dup(fd))
        seq = dev.submit(CopyIn(0, host, 4 * PAGE, holes=((0, PAGE), (2 * PAGE, 2 * PAGE)), file=file))
        assert dev.wait(seq, 5.0)
        assert dev.read_vram(0, 4 * PAGE) == bytes(PAGE) + b"\x5a" * PAGE + bytes(2 * PAGE)
        assert _allocated(fd) == PAGE
        deadline = time.monotonic() + SAFETY_S
        while not file.closed and time.monotonic() < deadline:
            time.sleep(0.001)
        assert file.closed
        # with no holes given every page is read, and reading a hole through the file
        # allocates nothing (through a mapping it would)
        assert dev.wait(dev.submit(CopyIn(0, host, 4 * PAGE, file=OwnedFd(os.dup(fd)))), 5.0)
        assert dev.read_vram(0, 4 * PAGE) == bytes(PAGE) + b"\x5a" * PAGE + bytes(2 * PAGE)
        assert _allocated(fd) == PAGE
    finally:
        host.close()
        os.close(fd)


def test_a_copy_in_from_a_file_shorter_than_its_length_fails_with_eio_and_closes_it(dev: SimGpu) -> None:
    fd, host = _memfd_map(2)
    try:
        file = OwnedFd(os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC))
        os.ftruncate(fd, PAGE)  # the file now ends before the copy's length (a core bug)
        seq = dev.submit(CopyIn(0, host, 2 * PAGE, file=file))
        assert dev.wait(seq, 5.0) and dev.error(seq) == errno.EIO
        assert file.closed
    finally:
        host.close()
        os.close(fd)


# --- short command lists on an idle timeline run on the submitter's thread ---


def test_a_short_command_list_on_an_idle_device_has_completed_when_submit_returns(dev: SimGpu) -> None:
    seen: list[tuple[int, str]] = []
    dev.set_notify(lambda seqno: seen.append((seqno, threading.current_thread().name)))
    seq = dev.submit(fill(4096, 8, 0x3C))
    assert dev.completed() == seq and dev.error(seq) is None
    assert seen == [(seq, threading.current_thread().name)]
    assert dev.read_vram(4096, 8) == b"\x3c" * 8
    bad = dev.submit(Execute([Fill(dst=1, offset=4000, length=200, byte=1)], {1: Surface(4096, vram=0)}))
    assert dev.completed() == bad and dev.error(bad) == errno.EIO  # fails as on the worker
    dev.set_notify(None)


def test_a_short_command_list_behind_pending_work_waits_its_turn() -> None:
    with SimGpu(vram_size=MiB, hang_timeout=30.0) as dev:
        host = bytearray(4096)
        held = dev.submit(sem_wait(host, 0, 1))  # the worker waits for the CPU
        first = dev.submit(fill(0, 4, 0x11))
        second = dev.submit(fill(0, 4, 0x22))
        assert dev.completed() < held  # nothing ran ahead of the wait
        host[0:4] = (1).to_bytes(4, "little")
        assert dev.wait(second, SAFETY_S)
        assert dev.error(held) is None and dev.error(first) is None
        assert dev.read_vram(0, 4) == b"\x22" * 4  # in submission order
        big = dev.submit(fill(0, 2 * 65536, 0x33, size=2 * 65536))  # not short: the worker runs it
        assert dev.wait(big, SAFETY_S) and dev.read_vram(0, 4) == b"\x33" * 4
