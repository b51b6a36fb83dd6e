"""busy / wait / wait_fence and hang detection (SPEC §2 busy, wait, wait_fence; §3 "device
commands"; gem-reference §2.5 BUSY, §2.6 WAIT, §5.6 IGT gem_wait wait/busy/invalid-buf).

The device is kept busy the way IGT keeps a GPU busy, with a spinner: a SemaphoreWait on a
CACHED object that holds the device until the test writes the u32 it polls (through a
mapping, which needs no request, so it also works while the client is blocked in a wait).
Every spinner is released at teardown, so a failing test cannot hold the shared daemon's
device for `hang_timeout`. Timing bounds are one-sided where a slow machine could only
make things later.
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable, Iterator

import pytest

import ugem
from ugem.cmd import Fill, SemaphoreWait

PAGE = ugem.PAGE_SIZE
GO = (1).to_bytes(4, "little")


class Spinner:
    """A CACHED semaphore object and its mapping; `start(*extra)` submits a SemaphoreWait
    (then the `extra` commands) and returns the fence; `release()` lets it go."""

    def __init__(self, dev) -> None:
        self.dev = dev
        self.sem = dev.create(PAGE)
        dev.set_caching(self.sem, ugem.CACHING_CACHED)
        self.map = dev.mmap(self.sem)

    def start(self, *extra) -> int:
        return int(self.dev.execbuffer([SemaphoreWait(obj=self.sem, offset=0, value=1), *extra]))

    def release(self) -> None:
        self.map[0:4] = GO

    def release_after(self, delay: float) -> threading.Thread:
        thread = threading.Thread(target=lambda: (time.sleep(delay), self.release()))
        thread.start()
        return thread


@pytest.fixture
def spinner(dev) -> Iterator[Callable[..., Spinner]]:
    made: list[Spinner] = []

    def make(device=None) -> Spinner:
        made.append(Spinner(device if device is not None else dev))
        return made[-1]

    yield make
    for s in made:
        s.release()
        s.map.release()


def _timed(fn, *args):
    start = time.monotonic()
    try:
        return fn(*args), time.monotonic() - start
    except ugem.UgemError as exc:
        return exc, time.monotonic() - start


# -- ENOENT ----------------------------------------------------------------------------


@pytest.mark.parametrize("handle", [0, 2, 99, 2**32])
def test_busy_and_wait_of_an_unknown_handle_are_enoent(dev, errno_of, handle):
    dev.create(PAGE)
    assert errno_of(dev.busy, handle) == errno.ENOENT
    assert errno_of(dev.wait, handle, 0) == errno.ENOENT
    assert errno_of(dev.wait, handle, -1) == errno.ENOENT


def test_wait_fence_of_a_never_issued_fence_is_enoent(dev, errno_of):
    h = dev.create(PAGE)
    last = dev.execbuffer([Fill(dst=h, offset=0, length=1, byte=1)])
    for fence in (0, last + 1, last + 1000, 2**63):
        assert errno_of(dev.wait_fence, fence, 0) == errno.ENOENT
        assert errno_of(dev.wait_fence, fence, -1) == errno.ENOENT
    assert dev.wait_fence(last, -1) == -1


# -- fences ----------------------------------------------------------------------------


def test_fences_increase_and_stay_waitable(dev):
    h = dev.create(PAGE)
    fences = [dev.execbuffer([Fill(dst=h, offset=16 * i, length=16, byte=i)]) for i in range(1, 6)]
    assert fences == sorted(fences) and len(set(fences)) == len(fences) and fences[0] > 0
    for f in fences:
        assert dev.wait_fence(f, -1) == -1
        assert dev.wait_fence(f, 0) == 0


def test_fences_are_manager_wide(env):
    a, b = env.open(), env.open()
    ha, hb = a.create(PAGE), b.create(PAGE)
    f1 = a.execbuffer([Fill(dst=ha, offset=0, length=1, byte=1)])
    f2 = b.execbuffer([Fill(dst=hb, offset=0, length=1, byte=1)])
    f3 = a.execbuffer([Fill(dst=ha, offset=0, length=1, byte=1)])
    assert f1 < f2 < f3
    assert b.wait_fence(f1, -1) == -1  # any client may wait for any fence


# -- idle objects ----------------------------------------------------------------------


@pytest.mark.parametrize("used", [False, True])
def test_wait_on_an_idle_object_returns_the_timeout(dev, used):
    h = dev.create(PAGE)
    if used:
        dev.execbuffer([Fill(dst=h, offset=0, length=PAGE, byte=3)])
        dev.wait(h, -1)
    assert dev.busy(h) is False
    assert dev.wait(h, 0) == 0
    assert dev.wait(h, -1) == -1
    assert dev.wait(h, -12345) == -12345
    remaining = dev.wait(h, 10**9)
    assert 0.5e9 < remaining <= 10**9


def test_fences_stay_waitable_after_completion(dev):
    h = dev.create(PAGE)
    first = dev.execbuffer([Fill(dst=h, offset=0, length=1, byte=1)])
    for i in range(20):
        dev.execbuffer([Fill(dst=h, offset=i, length=1, byte=i)])
    dev.wait(h, -1)
    assert dev.wait_fence(first, 0) == 0
    assert dev.wait_fence(first, -1) == -1
    assert 0 < dev.wait_fence(first, 10**9) <= 10**9


# -- busy objects ----------------------------------------------------------------------


def test_busy_while_blocked_and_idle_after_release(dev, spinner):
    spin = spinner()
    h = dev.create(PAGE)
    fence = spin.start(Fill(dst=h, offset=0, length=8, byte=0x77))
    time.sleep(0.05)
    assert dev.busy(h) is True and dev.busy(spin.sem) is True
    assert dev.info(h).busy is True
    spin.release()
    assert dev.wait_fence(fence, -1) == -1
    assert dev.wait(h, -1) == -1
    assert dev.busy(h) is False and dev.busy(spin.sem) is False
    assert dev.pread(h, 0, 8) == b"\x77" * 8


def test_wait_zero_on_a_busy_object_is_etime(dev, spinner, errno_of):
    spin = spinner()
    h = dev.create(PAGE)
    fence = spin.start(Fill(dst=h, offset=0, length=1, byte=1))
    assert errno_of(dev.wait, h, 0) == errno.ETIME
    assert errno_of(dev.wait_fence, fence, 0) == errno.ETIME
    assert dev.busy(h) is True


def test_wait_with_a_timeout_is_etime_after_the_timeout(dev, spinner):
    spin = spinner()
    h = dev.create(PAGE)
    fence = spin.start(Fill(dst=h, offset=0, length=1, byte=1))
    for call in (lambda: dev.wait(h, 200_000_000), lambda: dev.wait_fence(fence, 200_000_000)):
        exc, elapsed = _timed(call)
        assert isinstance(exc, ugem.UgemError) and exc.errno == errno.ETIME, exc
        assert 0.2 <= elapsed < 5.0
    assert dev.busy(h) is True


def test_wait_forever_returns_minus_one_once_released(dev, spinner):
    spin = spinner()
    h = dev.create(PAGE)
    spin.start(Fill(dst=h, offset=0, length=4, byte=9))
    releaser = spin.release_after(0.3)
    result, elapsed = _timed(dev.wait, h, -1)
    releaser.join()
    assert result == -1
    assert elapsed >= 0.25
    assert dev.busy(h) is False
    assert dev.pread(h, 0, 4) == b"\x09" * 4


def test_wait_returns_the_time_left(dev, spinner):
    spin = spinner()
    h = dev.create(PAGE)
    fence = spin.start(Fill(dst=h, offset=0, length=4, byte=9))
    releaser = spin.release_after(0.3)
    remaining, elapsed = _timed(dev.wait_fence, fence, 5 * 10**9)
    releaser.join()
    assert isinstance(remaining, int)
    assert 0 < remaining <= 5 * 10**9 - 0.25e9
    assert remaining >= 5 * 10**9 - elapsed * 1e9 - 0.05e9


def test_wait_released_by_a_second_client(env, dev, spinner):
    spin = spinner()
    other = env.open()
    sem, _ = other.open_name(dev.flink(spin.sem))
    h = dev.create(PAGE)
    spin.start(Fill(dst=h, offset=0, length=4, byte=5))
    releaser = threading.Thread(target=lambda: (time.sleep(0.3), other.pwrite(sem, 0, GO)))
    releaser.start()
    result, elapsed = _timed(dev.wait, h, -1)
    releaser.join()
    assert result == -1 and elapsed >= 0.25
    assert dev.pread(h, 0, 4) == b"\x05" * 4


def test_other_clients_are_served_while_one_waits(env, dev, spinner):
    spin = spinner()
    h = dev.create(PAGE)
    spin.start(Fill(dst=h, offset=0, length=4, byte=5))
    results: list = []
    waiter = threading.Thread(target=lambda: results.append(_timed(dev.wait, h, -1)))
    waiter.start()
    try:
        time.sleep(0.2)  # the waiter is parked by now
        other = env.open()
        start = time.monotonic()
        mine = other.create(PAGE)
        other.pwrite(mine, 0, b"served")
        assert other.pread(mine, 0, 6) == b"served"
        assert other.busy(mine) is False
        fence = other.execbuffer([Fill(dst=mine, offset=0, length=1, byte=1)])  # queued behind the spinner
        with pytest.raises(ugem.UgemError) as exc:
            other.wait_fence(fence, 0)
        assert exc.value.errno == errno.ETIME
        assert time.monotonic() - start < 1.0
        assert not results, "the waiter returned before the release"
    finally:
        spin.release()
        waiter.join(10)
    assert results and results[0][0] == -1


@pytest.mark.parametrize("level", [ugem.CACHING_NONE, ugem.CACHING_CACHED])
def test_set_domain_cpu_waits_for_the_device(dev, spinner, level):
    spin = spinner()
    h = dev.create(PAGE)
    dev.set_caching(h, level)
    spin.start(Fill(dst=h, offset=0, length=PAGE, byte=0x42))
    releaser = spin.release_after(0.3)
    _, elapsed = _timed(dev.set_domain, h, ugem.DOMAIN_CPU)
    releaser.join()
    assert elapsed >= 0.25
    with dev.mmap(h) as m:
        assert bytes(m) == b"\x42" * PAGE


@pytest.mark.parametrize("level", [ugem.CACHING_NONE, ugem.CACHING_CACHED])
def test_pread_waits_for_device_writes(dev, spinner, level):
    spin = spinner()
    h = dev.create(2 * PAGE)
    dev.set_caching(h, level)
    dev.pwrite(h, 0, b"old!" * (2 * PAGE // 4))
    spin.start(Fill(dst=h, offset=PAGE, length=PAGE, byte=0x99))
    releaser = spin.release_after(0.3)
    data, elapsed = _timed(dev.pread, h, 0, 2 * PAGE)
    releaser.join()
    assert data == b"old!" * (PAGE // 4) + b"\x99" * PAGE
    assert elapsed >= 0.25


def test_fences_complete_in_order(dev, spinner, errno_of):
    spin = spinner()
    a, b = dev.create(PAGE), dev.create(PAGE)
    first = spin.start()
    second = dev.execbuffer([Fill(dst=a, offset=0, length=1, byte=1)])  # nothing to wait for itself
    third = dev.execbuffer([Fill(dst=b, offset=0, length=1, byte=1)])
    assert first < second < third
    time.sleep(0.1)
    for fence in (first, second, third):
        assert errno_of(dev.wait_fence, fence, 0) == errno.ETIME
    assert dev.busy(a) and dev.busy(b)
    spin.release()
    assert dev.wait_fence(third, -1) == -1
    assert dev.wait_fence(first, 0) == 0 and dev.wait_fence(second, 0) == 0


# -- hangs -----------------------------------------------------------------------------


@pytest.fixture
def hanging(make_env):
    """A client of a manager that cancels work after 0.5 s."""
    return make_env(hang_timeout=0.5).open()


def test_a_hung_submission_is_eio_and_the_device_goes_on(hanging, errno_of):
    dev = hanging
    sem = dev.create(PAGE)
    dev.set_caching(sem, ugem.CACHING_CACHED)
    t = dev.create(PAGE)
    hung = dev.execbuffer([SemaphoreWait(obj=sem, offset=0, value=1), Fill(dst=t, offset=0, length=8, byte=1)])
    later = dev.execbuffer([Fill(dst=t, offset=8, length=8, byte=2)])  # another object would do too
    assert errno_of(dev.wait_fence, later, 0) == errno.ETIME  # in order: behind the hung one
    exc, elapsed = _timed(dev.wait, sem, -1)
    assert isinstance(exc, ugem.UgemError) and exc.errno == errno.EIO, exc
    assert 0.4 <= elapsed < 5.0
    assert errno_of(dev.wait_fence, hung, 0) == errno.EIO
    assert dev.wait_fence(later, -1) == -1
    assert dev.wait(t, -1) == -1  # its last work (`later`) completed fine
    assert dev.busy(sem) is False
    # the rest of the hung list never ran; the later fill did
    assert dev.pread(t, 0, 16) == bytes(8) + b"\x02" * 8


def test_wait_on_an_object_whose_last_work_hung_is_eio(hanging, errno_of):
    dev = hanging
    sem = dev.create(PAGE)
    dev.set_caching(sem, ugem.CACHING_CACHED)
    t = dev.create(PAGE)
    dev.execbuffer([SemaphoreWait(obj=sem, offset=0, value=1), Fill(dst=t, offset=0, length=8, byte=1)])
    exc, elapsed = _timed(dev.wait, t, 5 * 10**9)
    assert isinstance(exc, ugem.UgemError) and exc.errno == errno.EIO, exc
    assert elapsed >= 0.4
    assert errno_of(dev.wait, t, 0) == errno.EIO  # stays so until new work uses it
    fence = dev.execbuffer([Fill(dst=t, offset=0, length=PAGE, byte=0xAB)])
    assert dev.wait_fence(fence, -1) == -1
    assert dev.wait(t, 0) == 0
    assert dev.pread(t, 0, PAGE) == b"\xab" * PAGE


def test_a_released_spinner_is_not_a_hang(hanging):
    dev = hanging
    spin = Spinner(dev)
    try:
        h = dev.create(PAGE)
        spin.start(Fill(dst=h, offset=0, length=4, byte=6))
        releaser = spin.release_after(0.2)
        assert dev.wait(h, -1) == -1
        releaser.join()
        assert dev.pread(h, 0, 4) == b"\x06" * 4
    finally:
        spin.release()
        spin.map.release()
