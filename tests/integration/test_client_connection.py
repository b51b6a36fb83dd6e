"""A client's connection to a real daemon when things go wrong (SPEC §1, §2): the daemon dies
during a call, stops answering (SIGSTOP), or cannot be reached; what the caller sees each time.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator

import pytest

import ugem
from ugem.cmd import SemaphoreWait
from ugem.testing import DaemonProcess, run_daemon
from ugem.testing.data import PROMPT_S, SAFETY_S

PAGE = 4096


def test_after_the_daemon_dies_mid_call_every_later_call_is_daemon_gone(tmp_path):
    with run_daemon(spill_dir=str(tmp_path), hang_timeout=600) as daemon:
        dev = daemon.connect()
        sem = dev.create(PAGE)
        dev.set_caching(sem, ugem.CACHING_CACHED)
        fence = dev.execbuffer([SemaphoreWait(obj=sem, offset=0, value=1)])  # never released
        outcome: list[BaseException] = []
        sending = threading.Event()

        def call() -> None:
            sending.set()
            try:
                dev.wait_fence(fence, -1)  # read and parked by the daemon: it then dies
            except BaseException as exc:  # noqa: BLE001 - handed to the test thread
                outcome.append(exc)

        thread = threading.Thread(target=call)
        thread.start()
        sending.wait()
        time.sleep(0.5)  # (had the daemon not read it yet, the reset fails it the same way)
        os.kill(daemon.pid, signal.SIGKILL)
        daemon.proc.wait(60)
        thread.join(60)
        assert len(outcome) == 1 and isinstance(outcome[0], ugem.DaemonGone), outcome
        for later in (lambda: dev.info(sem), dev.stats, lambda: dev.create(PAGE)):
            with pytest.raises(ugem.DaemonGone) as exc:
                later()
            assert exc.value.errno != errno.EBADF
        dev.close()


@contextlib.contextmanager
def _stopped(daemon: DaemonProcess) -> Iterator[None]:
    os.kill(daemon.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(daemon.pid, signal.SIGCONT)


def test_a_call_to_a_stopped_daemon_times_out_and_closes_the_device(daemon, kit):
    baseline = daemon.fd_count()
    dev = ugem.connect(daemon.path, timeout=PROMPT_S)  # the calls before the stop must fit in it
    h = dev.create(PAGE)
    with _stopped(daemon):
        started = time.monotonic()
        with pytest.raises(ugem.TimedOut) as exc:
            dev.info(h)
        elapsed = time.monotonic() - started
    assert exc.value.errno == errno.ETIMEDOUT and isinstance(exc.value, ugem.UgemError)
    assert daemon.path in str(exc.value) and "GEM_INFO" in str(exc.value)
    assert PROMPT_S <= elapsed < SAFETY_S  # (the upper bound is only a safety net)
    assert dev.closed
    with pytest.raises(ugem.BadFd, match="timeout"):
        dev.info(h)
    dev.close()
    kit.assert_healthy(daemon, baseline)  # once continued, it released the client and serves others


def test_connecting_to_a_stopped_daemon_times_out(daemon):
    with _stopped(daemon):
        started = time.monotonic()
        with pytest.raises(ugem.TimedOut) as exc:
            ugem.connect(daemon.path, timeout=0.5)  # accepted by the kernel; HELLO gets no answer
        assert 0.5 <= time.monotonic() - started < 60
    assert exc.value.errno == errno.ETIMEDOUT and daemon.path in str(exc.value)


def test_connecting_to_a_listener_that_never_accepts_times_out(tmp_path):
    path = str(tmp_path / "full.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener, contextlib.ExitStack() as stack:
        listener.bind(path)
        listener.listen(0)
        for _ in range(8):  # fill the backlog (a blocking connect would now wait for ever)
            filler = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
            filler.setblocking(False)
            try:
                filler.connect(path)
            except BlockingIOError:
                break
        with pytest.raises(ugem.TimedOut) as exc:
            ugem.connect(path, timeout=0.5)
    assert path in str(exc.value)


def test_a_wait_gets_its_own_timeout_on_top_of_the_client_timeout(tmp_path):
    with run_daemon(spill_dir=str(tmp_path), hang_timeout=600) as daemon:
        dev = ugem.connect(daemon.path, timeout=PROMPT_S)  # the handshake must fit in it
        with _stopped(daemon):
            started = time.monotonic()
            with pytest.raises(ugem.TimedOut):
                dev.wait(1, 1_500_000_000)  # no reply comes, whatever the handle
            assert PROMPT_S + 1.5 <= time.monotonic() - started < SAFETY_S  # the client's + the wait's own
        dev.close()


def test_a_client_without_a_timeout_waits_and_keeps_a_blocking_socket(daemon):
    with ugem.connect(daemon.path) as dev:
        assert dev._transport._sock.gettimeout() is None  # no poll before each read
        h = dev.create(PAGE)
        dev.pwrite(h, 0, b"fine")
        assert dev.pread(h, 0, 4) == b"fine"


@pytest.mark.parametrize("timeout", [0, -1, float("nan"), float("inf"), "1", True])
def test_a_bad_timeout_is_einval(daemon, timeout):
    with pytest.raises(ugem.InvalidArgument, match="timeout"):
        ugem.connect(daemon.path, timeout=timeout)


def test_timed_out_and_timer_expired_are_exported():
    assert "TimedOut" in ugem.__all__ and "TimerExpired" in ugem.__all__
    assert ugem.TimedOut().errno == errno.ETIMEDOUT and ugem.TimerExpired().errno == errno.ETIME


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as another user")
def _connect_as_another_user(channel, path):
    try:
        ugem.connect(path).close()
        channel.send("connected")
    except PermissionError as exc:
        channel.send(f"{exc.errno}:{exc}")


def test_permission_denied_names_the_socket_path(daemon, kit):
    # another uid may not enter root's 0700 socket directory
    message = kit.tenant(_connect_as_another_user, daemon.path).recv()
    assert message.startswith(f"{errno.EACCES}:") and daemon.path in message, message
