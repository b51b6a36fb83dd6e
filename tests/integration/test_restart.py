"""The daemon restart story (docs/USAGE.md, "When the daemon goes away").

What a client sees when its daemon dies, however it dies:
- the next call on the Device raises `ugem.DaemonGone` (a ConnectionError) at once, and so
  does a call that was waiting in the daemon when it died (no hang);
- `Device.close()` still works (nothing is left to release);
- mappings and exported fds stay valid: the memory belongs to the kernel, not the daemon;
- a new daemon can start on the same socket (the stale one is replaced, the dead daemon's
  spill directory is swept), and a new `connect()` talks to it with fresh handles; the old
  Device never silently reaches the new daemon.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
import time

import pytest

import ugem
from ugem.cmd import SemaphoreWait
from ugem.testing import DaemonProcess, run_daemon
from ugem.testing.data import PROMPT_S

PAGE = 4096


def _kill(daemon: DaemonProcess, sig: int = signal.SIGKILL) -> None:
    os.kill(daemon.pid, sig)
    daemon.proc.wait(timeout=10)


def test_next_call_after_sigkill_is_daemon_gone_and_memory_survives(tmp_path: os.PathLike[str]) -> None:
    with run_daemon(spill_dir=str(tmp_path)) as daemon:
        dev = daemon.connect()
        h = dev.create(PAGE)
        dev.pwrite(h, 0, b"kept" * 1024)
        view = dev.mmap(h)
        fd = dev.export(h)
        _kill(daemon)
        started = time.monotonic()
        with pytest.raises(ugem.DaemonGone):
            dev.info(h)
        with pytest.raises(ugem.DaemonGone):  # and every call after it
            dev.create(PAGE)
        assert time.monotonic() - started < PROMPT_S
        assert isinstance(ugem.DaemonGone("x"), ConnectionError)
        assert bytes(view[:4]) == b"kept"  # the mapping is the kernel's memory
        assert os.pread(fd, 4, 4092) == b"kept"  # so is the exported fd
        os.close(fd)
        view.release()
        dev.close()  # nothing to release, no error, no hang
        dev.close()


def test_a_call_waiting_in_the_daemon_fails_when_it_dies(tmp_path: os.PathLike[str]) -> None:
    with run_daemon(spill_dir=str(tmp_path), hang_timeout=600) as daemon:
        dev = daemon.connect()
        sem = dev.create(PAGE)
        dev.set_caching(sem, ugem.CACHING_CACHED)
        dev.pwrite(sem, 0, (0).to_bytes(4, "little"))
        fence = dev.execbuffer([SemaphoreWait(obj=sem, offset=0, value=1)])  # never released
        outcome: list[BaseException | int] = []  # the wait is parked in the daemon, forever
        thread = threading.Thread(target=lambda: _capture(outcome, dev.wait_fence, fence, -1))
        thread.start()
        time.sleep(0.3)
        assert not outcome, "the wait should still be parked"
        _kill(daemon)
        thread.join(5)
        assert not thread.is_alive(), "the waiting call hung after the daemon died"
        assert len(outcome) == 1 and isinstance(outcome[0], ugem.DaemonGone), outcome
        dev.close()


def test_sigterm_fails_parked_calls_with_eshutdown_then_daemon_gone(tmp_path: os.PathLike[str]) -> None:
    with run_daemon(spill_dir=str(tmp_path), hang_timeout=600) as daemon:
        dev = daemon.connect()
        sem = dev.create(PAGE)
        dev.set_caching(sem, ugem.CACHING_CACHED)
        fence = dev.execbuffer([SemaphoreWait(obj=sem, offset=0, value=1)])
        outcome: list[BaseException | int] = []
        thread = threading.Thread(target=lambda: _capture(outcome, dev.wait_fence, fence, -1))
        thread.start()
        time.sleep(0.3)
        daemon.proc.send_signal(signal.SIGTERM)
        thread.join(10)
        assert not thread.is_alive()
        assert daemon.proc.wait(10) == 0
        assert len(outcome) == 1 and isinstance(outcome[0], ugem.UgemError), outcome
        assert outcome[0].errno == errno.ESHUTDOWN
        with pytest.raises(ugem.DaemonGone):
            dev.busy(sem)
        dev.close()


def _capture(outcome: list[BaseException | int], fn: object, *args: object) -> None:
    try:
        outcome.append(fn(*args))  # type: ignore[operator]
    except BaseException as exc:  # noqa: BLE001
        outcome.append(exc)


def test_restart_on_the_same_socket_gives_a_fresh_manager(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(str(tmp_path), "ugem.sock")
    spill = os.path.join(str(tmp_path), "spill")
    with run_daemon(socket=path, spill_dir=spill, system_budget="1M") as first:
        old = first.connect()
        handles = [old.create(1 << 19) for _ in range(4)]
        for h in handles:  # 2 MiB into a 1 MiB budget: some of it is spilled
            old.pwrite(h, 0, b"s" * (1 << 19))
        assert old.stats()["spilled_bytes"] > 0
        assert os.listdir(spill)  # the first daemon's private spill directory
        _kill(first)
    with run_daemon(socket=path, spill_dir=spill) as second:
        left = os.listdir(spill)
        assert all(f"-{second.pid}-" in d for d in left), f"the dead daemon's spill directory stayed: {left}"
        with pytest.raises(ugem.DaemonGone):  # the old connection never reaches the new daemon
            old.info(handles[0])
        new = ugem.connect(path)
        assert new.stats()["objects"] == 0
        with pytest.raises(ugem.UgemError):  # handles of the dead daemon mean nothing here
            new.info(handles[0])
        assert new.create(PAGE) == 1
        new.close()
        old.close()
