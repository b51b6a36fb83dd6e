"""FakeGpu (ugem.testing): synchronous unless paused, deterministic hangs and failures."""

from __future__ import annotations

import errno
import os
import struct
import threading

import pytest

import ugem.testing
from ugem.cmd import Fill, SemaphoreWait
from ugem.fd import OwnedFd
from ugem.gpu.base import CopyIn, CopyOut, Execute, Surface
from ugem.testing import FakeGpu

MiB = 1 << 20


def fill(offset: int, length: int, byte: int) -> Execute:
    return Execute([Fill(dst=1, offset=offset, length=length, byte=byte)], {1: Surface(MiB, vram=0)})


def sem_wait(host: bytearray, value: int) -> Execute:
    return Execute([SemaphoreWait(obj=1, offset=0, value=value)], {1: Surface(len(host), host=host)})


def test_exported_from_ugem_testing() -> None:
    assert "FakeGpu" in ugem.testing.__all__
    assert ugem.testing.FakeGpu is FakeGpu


def test_ops_run_synchronously_on_submit_and_notify_before_it_returns() -> None:
    seen: list[int] = []
    with FakeGpu(MiB) as dev:
        dev.set_notify(seen.append)
        assert dev.vram_size == MiB
        a = dev.submit(CopyIn(16, b"hello", 5))
        assert (a, dev.completed(), seen) == (1, 1, [1])
        assert dev.read_vram(16, 5) == b"hello"
        out = bytearray(5)
        b = dev.submit(CopyOut(16, out, 5))
        assert (b, dev.completed(), out) == (2, 2, b"hello")
        c = dev.submit(fill(100, 3, 7))
        assert dev.read_vram(99, 5) == b"\0\x07\x07\x07\0"
        assert dev.wait(c, 0) and dev.error(c) is None
        assert dev.history == [(1, "copy_in"), (2, "copy_out"), (3, "execute")]
        assert seen == [1, 2, 3]


def test_paused_device_holds_work_busy_until_released() -> None:
    with FakeGpu(MiB, paused=True) as dev:
        seqs = [dev.submit(fill(i, 1, 0xFF)) for i in range(3)]
        assert seqs == [1, 2, 3]
        assert dev.completed() == 0 and dev.held == 3
        assert not dev.wait(1, 0)
        assert dev.read_vram(0, 3) == bytes(3)
        assert dev.release(1) == 1
        assert dev.completed() == 1 and dev.read_vram(0, 3) == b"\xff\0\0"
        assert dev.release() == 2
        assert dev.completed() == 3 and dev.held == 0
        assert dev.release() == 0


def test_unpausing_runs_new_work_at_once_but_held_work_waits_for_release() -> None:
    with FakeGpu(MiB, paused=True) as dev:
        dev.submit(fill(0, 1, 1))
        dev.paused = False
        # in order: the held op runs before the new one
        assert dev.submit(fill(0, 1, 2)) == 2
        assert dev.completed() == 2 and dev.read_vram(0, 1) == b"\x02"


def test_a_satisfied_semaphore_passes_an_unsatisfied_one_hangs_at_once() -> None:
    host = bytearray(4096)
    with FakeGpu(MiB, paused=True) as dev:
        ok = dev.submit(sem_wait(host, 5))
        struct.pack_into("<I", host, 0, 5)
        hung = dev.submit(sem_wait(host, 6))
        after = dev.submit(fill(0, 1, 9))
        dev.release()
        assert dev.error(ok) is None
        assert dev.error(hung) == errno.EIO and "Hung" in dev.failures[hung]
        assert dev.error(after) is None and dev.read_vram(0, 1) == b"\x09"


def test_fail_makes_a_held_or_future_op_complete_with_eio_without_running() -> None:
    with FakeGpu(MiB) as dev:
        dev.fail(2)
        assert dev.submit(fill(0, 1, 1)) == 1
        assert dev.submit(fill(0, 1, 2)) == 2
        assert dev.error(1) is None and dev.error(2) == errno.EIO
        assert dev.read_vram(0, 1) == b"\x01"  # seqno 2 did not run
        assert dev.failures == {2: "fail()"}
        dev.paused = True
        held = dev.submit(fill(0, 1, 3))
        dev.fail(held)
        dev.release()
        assert dev.error(held) == errno.EIO and dev.read_vram(0, 1) == b"\x01"
        with pytest.raises(ValueError):
            dev.fail(1)


def test_a_bad_command_completes_with_eio() -> None:
    with FakeGpu(MiB) as dev:
        bad = dev.submit(Execute([Fill(dst=1, offset=4000, length=200, byte=1)], {1: Surface(4096, vram=0)}))
        assert dev.error(bad) == errno.EIO and "InvalidArgument" in dev.failures[bad]


def test_notify_may_submit_again_and_order_holds() -> None:
    seen: list[int] = []
    with FakeGpu(MiB) as dev:

        def notify(seqno: int) -> None:
            seen.append(seqno)
            if seqno == 1:
                dev.submit(fill(0, 1, 2))

        dev.set_notify(notify)
        dev.submit(fill(0, 1, 1))
        assert seen == [1, 2] and dev.completed() == 2 and dev.read_vram(0, 1) == b"\x02"


def test_wait_on_another_thread_returns_when_released() -> None:
    with FakeGpu(MiB, paused=True) as dev:
        seq = dev.submit(fill(0, 1, 1))
        result: list[bool] = []
        waiter = threading.Thread(target=lambda: result.append(dev.wait(seq, 10.0)))
        waiter.start()
        assert not dev.wait(seq, 0.05)
        dev.release()
        waiter.join(10.0)
        assert result == [True]


def test_submit_checks_ops_like_the_simulated_device() -> None:
    with FakeGpu(MiB) as dev:
        with pytest.raises(ValueError):
            dev.submit(CopyIn(MiB, b"x", 1))
        with pytest.raises(ValueError):
            dev.read_vram(MiB - 1, 2)
        assert dev.submit(CopyIn(0, b"x", 1)) == 1


def test_close_runs_held_work_and_is_idempotent() -> None:
    dev = FakeGpu(MiB, paused=True)
    out = bytearray(2)
    dev.submit(CopyIn(0, b"ab", 2))
    last = dev.submit(CopyOut(0, out, 2))
    dev.close()
    assert dev.completed() == last and out == b"ab"
    dev.close()
    with pytest.raises(RuntimeError):
        dev.submit(CopyIn(0, b"x", 1))
    assert not dev.wait(last + 1, None)


def test_a_copy_out_closes_its_file_whether_it_ran_failed_or_was_refused() -> None:
    fd = os.memfd_create("fake-test", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 4096)
        host = bytearray(4096)
        with FakeGpu(MiB) as dev:
            dev.submit(CopyIn(0, b"\x09" * 4096, 4096))
            ran = OwnedFd(os.dup(fd))
            dev.submit(CopyOut(0, host, 4096, file=ran))
            assert ran.closed and os.pread(fd, 4, 0) == b"\x09" * 4
            dev.fail(3)
            doomed = OwnedFd(os.dup(fd))
            assert dev.submit(CopyOut(0, host, 4096, file=doomed)) == 3
            assert doomed.closed and dev.error(3) == errno.EIO
            refused = OwnedFd(os.dup(fd))
            with pytest.raises(ValueError):
                dev.submit(CopyOut(2 * MiB, host, 4096, file=refused))
            assert refused.closed
    finally:
        os.close(fd)
