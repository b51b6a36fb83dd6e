"""The daemon under systemd's protocols: socket activation and sd_notify (SPEC §4).

Socket activation goes through a real launcher, `systemd-socket-activate` (Debian package
`systemd`), which binds the socket, waits for the first connection and then execs
`ugem serve` with LISTEN_FDS/LISTEN_PID naming it; those tests skip when it is absent.
sd_notify is received by a real NOTIFY_SOCKET datagram socket bound by the test.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest

import ugem
from ugem.testing import run_daemon
from ugem.testing.data import SAFETY_S, wait_until

LAUNCHER = shutil.which("systemd-socket-activate")
needs_launcher = pytest.mark.skipif(LAUNCHER is None, reason="systemd-socket-activate is not installed "
                                                             "(Debian package systemd)")
SERVE = [sys.executable, "-m", "ugem", "serve"]
# the launcher passes its children a minimal environment: keep the interpreter's path
PASS_ENV = [f"--setenv=PYTHONPATH={os.environ['PYTHONPATH']}"] if os.environ.get("PYTHONPATH") else []


@pytest.fixture
def short_dir() -> Iterator[str]:
    """A short directory for AF_UNIX paths (108 bytes at most)."""
    with tempfile.TemporaryDirectory(prefix="ugem-sd-") as directory:
        yield directory


def _cmdline(pid: int) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read()


def _listening(path: str) -> bool:
    """A socket bound at `path` listens (read from /proc/net/unix, without connecting, which
    would start the daemon): the launcher binds, then listens, and a connect in between is
    refused."""
    with open("/proc/net/unix") as f:
        next(f)  # Num RefCount Protocol Flags Type St Inode Path
        return any(len(fields) >= 8 and fields[7] == path and int(fields[3], 16) & 0x10000  # __SO_ACCEPTCON
                   for fields in map(str.split, f))


def _stop(proc: subprocess.Popen[bytes]) -> tuple[int, str]:
    """SIGTERM; (exit status, stderr)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=SAFETY_S)
    return proc.returncode, err.decode(errors="replace")


@needs_launcher
def test_first_connect_starts_the_daemon_on_the_socket_it_is_handed(short_dir: str) -> None:
    path, spill = os.path.join(short_dir, "ugem.sock"), os.path.join(short_dir, "spill")
    assert LAUNCHER is not None
    cmd = [LAUNCHER, *PASS_ENV, "--listen", path, *SERVE, "--spill-dir", spill, "--log-format", "json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        wait_until(lambda: _listening(path) or proc.poll() is not None)
        assert proc.poll() is None
        assert _cmdline(proc.pid).startswith(LAUNCHER.encode()) and not os.path.exists(spill)  # not started yet
        with ugem.connect(path) as dev:  # this connect starts the daemon
            handle = dev.create(8192)
            dev.pwrite(handle, 100, b"activated")
            assert dev.pread(handle, 100, 9) == b"activated"
            assert _cmdline(proc.pid).startswith(sys.executable.encode())  # exec'd in the launcher's place
            assert os.path.isdir(spill)
        assert proc.stdout is not None
        assert proc.stdout.readline() == f"ugem: listening on {path}\n".encode()
        assert not os.path.exists(path + ".lock")  # the socket is systemd's: no lock of ours
    finally:
        status, err = _stop(proc)
    assert status == 0, err
    assert os.path.exists(path)  # left alone for the launcher's next start
    events = [json.loads(line)["event"] for line in err.splitlines() if line.startswith("{")]
    assert "client_connect" in events and "client_disconnect" in events, err


@needs_launcher
def test_with_two_passed_sockets_the_daemon_serves_the_one_named_ugem(short_dir: str) -> None:
    one, two = os.path.join(short_dir, "a.sock"), os.path.join(short_dir, "b.sock")
    spill = os.path.join(short_dir, "spill")
    assert LAUNCHER is not None
    cmd = [LAUNCHER, *PASS_ENV, "--listen", one, "--listen", two, *SERVE, "--spill-dir", spill]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    wait_until(lambda: (_listening(one) and _listening(two)) or proc.poll() is not None)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as poke:
        poke.connect(one)  # starts the daemon, which refuses to start
        err = proc.communicate(timeout=SAFETY_S)[1].decode(errors="replace")
    assert proc.returncode == 2, err
    lines = [line for line in err.splitlines() if line.startswith("ugem:")]
    assert len(lines) == 1 and "LISTEN_FDS" in lines[0] and "'ugem'" in lines[0], err
    assert not os.path.exists(spill)
    for stale in (one, two):  # left by the launcher: the next one binds afresh
        os.unlink(stale)
    named = subprocess.Popen([LAUNCHER, "--fdname=other:ugem", *cmd[1:]], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, start_new_session=True)
    try:
        wait_until(lambda: (_listening(one) and _listening(two)) or named.poll() is not None)
        with ugem.connect(two) as dev:
            assert dev.stats()["clients"] == 1
    finally:
        status, err = _stop(named)
    assert status == 0, err


@pytest.mark.parametrize("what", ["tcp", "datagram", "not_listening", "file"])
def test_a_passed_fd_that_is_not_a_listening_unix_socket_is_bad_configuration(short_dir: str, what: str) -> None:
    spill = os.path.join(short_dir, "spill")
    with contextlib.ExitStack() as stack:
        if what == "file":
            fd = os.open(os.path.join(short_dir, "f"), os.O_CREAT | os.O_RDWR, 0o600)
            stack.callback(os.close, fd)
        else:
            family = socket.AF_INET if what == "tcp" else socket.AF_UNIX
            kind = socket.SOCK_DGRAM if what == "datagram" else socket.SOCK_STREAM
            sock = stack.enter_context(socket.socket(family, kind))
            if what == "tcp":
                sock.bind(("127.0.0.1", 0))
                sock.listen()
            fd = sock.fileno()
        # the child moves the fd to 3 and sets LISTEN_PID to its own pid before exec
        code = ("import os, sys; os.dup2(int(sys.argv[1]), 3); os.environ['LISTEN_PID'] = str(os.getpid()); "
                "os.environ['LISTEN_FDS'] = '1'; os.execv(sys.executable, [sys.executable, *sys.argv[2:]])")
        result = subprocess.run([sys.executable, "-c", code, str(fd), "-m", "ugem", "serve", "--spill-dir", spill,
                                 "--socket", os.path.join(short_dir, "s")], pass_fds=(fd,), capture_output=True,
                                text=True, timeout=SAFETY_S)
    assert result.returncode == 2, result
    assert len(result.stderr.splitlines()) == 1 and "LISTEN_FDS: fd 3 is not a listening Unix stream socket" \
        in result.stderr, result.stderr
    assert not os.path.exists(spill) and not os.path.exists(os.path.join(short_dir, "s"))


def test_listen_variables_for_another_process_are_ignored() -> None:
    env = dict(os.environ, LISTEN_PID="1", LISTEN_FDS="1")
    with run_daemon(env=env) as daemon, daemon.connect() as dev:
        assert dev.stats()["clients"] == 1


def _receive(sock: socket.socket) -> dict[str, str]:
    fields = dict(line.split("=", 1) for line in sock.recv(4096).decode().splitlines())
    return fields


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_sd_notify_ready_status_and_stopping(short_dir: str, abstract: bool) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as listener:
        address = f"\0ugem-notify-{os.getpid()}" if abstract else os.path.join(short_dir, "notify")
        listener.bind(address)
        listener.settimeout(SAFETY_S)
        env = dict(os.environ, NOTIFY_SOCKET=address.replace("\0", "@"))
        with run_daemon(env=env) as daemon:
            ready = _receive(listener)
            assert ready["READY"] == "1" and ready["STATUS"].startswith("0 objects, 0 clients"), ready
            with daemon.connect() as dev:
                handle = dev.create(1 << 20)
                dev.pwrite(handle, 0, b"x" * (1 << 20))
                status = ""
                while not status.startswith("1 objects, 1 clients"):  # sent when the figures change
                    status = _receive(listener)["STATUS"]
                assert "1.0 MiB resident" in status, status
            daemon.proc.send_signal(signal.SIGTERM)
            fields = _receive(listener)
            while "STOPPING" not in fields:
                fields = _receive(listener)
            assert fields["STOPPING"] == "1"
            assert daemon.proc.wait(timeout=SAFETY_S) == 0
