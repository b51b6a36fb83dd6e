"""Busy polling (ugem/spin.py) on a real daemon and socket: a burst of requests makes both
ends check before sleeping, and neither end keeps checking once the other goes quiet.

CPU time is read from the kernel (schedstat of every daemon thread; this thread's own
CPU clock), so the bounds hold however slowly a loaded machine runs the test: a window is
at most 400 us (the daemon's), and the bounds allow hundreds of them."""

from __future__ import annotations

import os
import signal
import threading
import time

from ugem.testing import DaemonProcess

BURST = 2000


def daemon_cpu(pid: int) -> float:
    """Seconds of CPU every thread of `pid` has run."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except FileNotFoundError:  # the thread ended meanwhile
            pass
    return total / 1e9


def test_daemon_sleeps_once_its_client_goes_quiet(daemon: DaemonProcess) -> None:
    with daemon.connect() as dev:
        h = dev.create(4096)
        for _ in range(BURST):  # requests back to back: the daemon's loop gets hot
            dev.busy(h)
        before = daemon_cpu(daemon.pid)
        time.sleep(1.0)
        used = daemon_cpu(daemon.pid) - before
        assert used < 0.1, f"an idle daemon ran {used:.3f} s of CPU in 1 s after a burst"
        assert dev.busy(h) is False  # and it still serves


def test_client_sleeps_on_a_reply_that_takes_long(daemon: DaemonProcess) -> None:
    with daemon.connect() as dev:
        h = dev.create(4096)
        for _ in range(BURST):  # replies back to back: the client gets hot
            dev.busy(h)
        os.kill(daemon.pid, signal.SIGSTOP)  # the next reply takes as long as the daemon is stopped
        resumed = threading.Timer(1.0, os.kill, (daemon.pid, signal.SIGCONT))
        resumed.start()
        try:
            cpu = time.thread_time()
            wall = time.monotonic()
            assert dev.busy(h) is False
            waited, used = time.monotonic() - wall, time.thread_time() - cpu
        finally:
            resumed.join()
            os.kill(daemon.pid, signal.SIGCONT)
        assert waited >= 0.9
        assert used < 0.1, f"the client ran {used:.3f} s of CPU waiting {waited:.3f} s for one reply"
