"""Busy polling (ugem/spin.py): when a window opens, how long it lasts, when it does not.

A fake clock that only the fake yield advances makes every window exact: each yield costs
`step` seconds, so a window of SPIN seconds is SPIN / step checks."""

from __future__ import annotations

import os

import pytest

from ugem import spin
from ugem.spin import COPY_SPIN, HOT, SHARED, SPIN, BusyPoll, pinned_together


class FakeTime:
    def __init__(self, step: float) -> None:
        self.now = 1000.0
        self.step = step
        self.yields = 0

    def clock(self) -> float:
        return self.now

    def yield_(self) -> None:
        self.yields += 1
        self.now += self.step


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeTime:
    t = FakeTime(step=1e-6)
    monkeypatch.setattr(spin, "_clock", t.clock)
    monkeypatch.setattr(spin, "_yield", t.yield_)
    return t


def probe_after(t: FakeTime, checks: int) -> tuple[list[int], object]:
    """A probe that finds something on its `checks`-th call (never if 0)."""
    calls = [0]

    def probe() -> str | None:
        calls[0] += 1
        return "reply" if checks and calls[0] >= checks else None
    return calls, probe


def sleeper(t: FakeTime, seconds: float):
    def wait(arg: object) -> str:
        t.now += seconds
        return f"slept {arg}"
    return wait


def test_cold_end_never_checks_and_sleeping_soon_makes_it_hot(fake: FakeTime) -> None:
    poll = BusyPoll(lambda: None)
    calls, probe = probe_after(fake, 1)
    assert poll.check(probe) is None and calls[0] == 0  # cold: straight to sleep
    assert poll.sleep(sleeper(fake, HOT / 2), "x") == "slept x"
    assert poll.hot
    assert poll.check(probe) == "reply" and calls[0] == 1 and fake.yields == 0


def test_a_long_sleep_leaves_it_cold(fake: FakeTime) -> None:
    poll = BusyPoll(lambda: None)
    poll.check(lambda: None)
    poll.sleep(sleeper(fake, HOT * 2), None)
    assert not poll.hot


def test_the_window_checks_until_something_comes(fake: FakeTime) -> None:
    poll = BusyPoll(lambda: None)
    poll.hot = True
    calls, probe = probe_after(fake, 30)
    assert poll.check(probe) == "reply"
    assert calls[0] == 30 and fake.yields == 29  # a yield between checks
    assert poll.hot


def test_a_copy_window_spans_a_client_copying_a_megabyte(fake: FakeTime) -> None:
    """A bulk pwrite or pread of 1 MiB keeps the client copying for ~100-250 us between the
    daemon's reply and its XFER_DONE: a wait given COPY_SPIN (the daemon's, while the client
    holds an open transfer) waits that out; a plain window gives up before."""
    poll = BusyPoll(lambda: None)
    poll.hot = True
    calls, probe = probe_after(fake, 300)  # 300 us of checks (1 us each)
    assert poll.check(probe, COPY_SPIN) == "reply" and calls[0] == 300
    assert poll.hot
    calls, probe = probe_after(fake, 300)
    assert poll.check(probe) is None and calls[0] <= SPIN / fake.step + 2


def test_an_empty_window_lasts_spin_and_makes_the_next_wait_cold(fake: FakeTime) -> None:
    poll = BusyPoll(lambda: None)
    poll.hot = True
    started = fake.now
    calls, probe = probe_after(fake, 0)
    assert poll.check(probe) is None
    assert SPIN <= fake.now - started <= SPIN + 2 * fake.step
    poll.sleep(sleeper(fake, 1e-6), None)  # even a quick sleep after an empty window...
    assert not poll.hot  # ...leaves the next wait cold
    before = calls[0]
    assert poll.check(probe) is None and calls[0] == before
    poll.sleep(sleeper(fake, 1e-6), None)
    assert poll.hot  # and a quick cold sleep makes it hot again


def test_a_long_yield_ends_the_window_after_one_more_check(fake: FakeTime) -> None:
    poll = BusyPoll(lambda: None)
    poll.hot = True
    fake.step = SHARED * 2  # another thread ran on this CPU during each yield
    calls, probe = probe_after(fake, 0)
    assert poll.check(probe) is None
    assert calls[0] == 2 and fake.yields == 1
    calls, probe = probe_after(fake, 2)  # the peer answered while it had the CPU
    poll.hot = True
    assert poll.check(probe) == "reply" and fake.yields == 2


def test_no_window_when_pinned_to_the_peers_one_cpu(fake: FakeTime) -> None:
    cpus = os.sched_getaffinity(0)
    one = {min(cpus)}
    os.sched_setaffinity(0, one)
    try:
        assert pinned_together(os.getpid())  # this thread and the process's main thread: the same one CPU
        poll = BusyPoll(os.getpid)
        poll.hot = True
        calls, probe = probe_after(fake, 1)
        assert poll.check(probe) is None and calls[0] == 0
    finally:
        os.sched_setaffinity(0, cpus)
    assert not pinned_together(os.getpid()) or len(cpus) == 1
    fake.now += spin.REFRESH  # the affinities are read again after REFRESH
    if len(cpus) > 1:
        assert poll.check(probe) == "reply"


def test_pinned_together_needs_one_cpu_on_each_side_and_a_live_peer() -> None:
    assert not pinned_together(None)
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})
    try:
        assert not pinned_together(2**22 + 12345)  # no such process: not pinned with us
    finally:
        os.sched_setaffinity(0, cpus)
