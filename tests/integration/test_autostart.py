"""Daemons that start and stop by themselves: `ugem.connect(start=True)` starts a detached
`ugem serve` where none listens and reuses one that does (several starters at once end
with one daemon); `ugem serve --exit-idle SECONDS` shuts down cleanly once it has had no
client that long; `ugem serve --detach` returns once the daemon listens, leaving it in a
session of its own. Real processes throughout; every wait ends on an event (a process
exiting, a line arriving), SAFETY_S only as the net.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest

import ugem
from ugem.testing import run_daemon
from ugem.testing.data import SAFETY_S

UGEM = [sys.executable, "-m", "ugem"]
LONG_IDLE = "600"  # a started daemon must not go away in the middle of a test that does not wait for it


@pytest.fixture
def workdir(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A short private directory for sockets (AF_UNIX paths are short) and spill files;
    daemons started in it are stopped at the end."""
    with tempfile.TemporaryDirectory(prefix="ugem-as-") as directory:
        monkeypatch.setenv("XDG_CACHE_HOME", os.path.join(directory, "cache"))
        monkeypatch.setenv("UGEM_EXIT_IDLE", LONG_IDLE)
        try:
            yield directory
        finally:
            for pid in _daemons_in(directory):
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:  # it went by itself (--exit-idle) in the meantime
                    continue
                _wait_exit(pid)


def _daemons_in(directory: str) -> list[int]:
    """The pids of `ugem serve` processes whose command line or environment names `directory`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().split(b"\0")
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read()
        except OSError:
            continue
        if b"serve" in cmdline and b"ugem" in cmdline and (directory.encode() in b" ".join(cmdline + [environ])):
            found.append(int(entry))
    return found


def _wait_exit(pid: int, timeout: float = SAFETY_S) -> bool:
    """Wait for `pid` (not necessarily our child) to exit; whether it did within `timeout`."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([pidfd], [], [], timeout)[0])
    finally:
        os.close(pidfd)


def _server_pid(dev: ugem.Device) -> int:
    return int(dev._live().server_pid)  # type: ignore[attr-defined]


def _parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("PPid:")).split()[1])


# -- connect(start=True) ---------------------------------------------------------------------

def test_start_when_none_listens_then_reuse(workdir: str) -> None:
    path = os.path.join(workdir, "ugem.sock")
    with ugem.connect(path, start=True) as first:
        pid = _server_pid(first)
        assert os.getsid(pid) == pid != os.getsid(0)  # a session of its own
        assert _parent_of(pid) != os.getpid()  # not our child: it does not die with us
        with ugem.connect(path, start=True) as second:  # the one that listens
            assert _server_pid(second) == pid
            assert first.stats()["clients"] == 2
        assert first.create(4096) == 1
    assert _daemons_in(workdir) == [pid]
    log = os.path.join(workdir, "ugem.sock.log")
    assert os.stat(log).st_mode & 0o777 == 0o600


def test_a_started_daemon_does_not_report_to_the_callers_service_manager(workdir: str,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A client running under systemd (NOTIFY_SOCKET set) starts a daemon: that daemon's
    READY=1 must not reach the client's service manager."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(os.path.join(workdir, "notify"))
        manager.setblocking(False)
        monkeypatch.setenv("NOTIFY_SOCKET", os.path.join(workdir, "notify"))
        with ugem.connect(os.path.join(workdir, "ugem.sock"), start=True) as dev:
            with open(f"/proc/{_server_pid(dev)}/environ", "rb") as f:
                assert b"NOTIFY_SOCKET=" not in f.read()
            dev.stats()  # the daemon is past its start: READY=1 would have been sent
        with pytest.raises(BlockingIOError):
            manager.recv(100)


def test_start_at_the_default_socket(workdir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = os.path.join(workdir, "run")
    os.mkdir(runtime, 0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", runtime)
    monkeypatch.delenv("UGEM_SOCKET", raising=False)
    with ugem.connect(start=True) as dev:
        assert dev.create(4096) == 1
        directory = os.path.join(runtime, "ugem")
        assert os.stat(directory).st_mode & 0o777 == 0o700
        assert sorted(os.listdir(directory)) == ["ugem.sock", "ugem.sock.lock", "ugem.sock.log"]
        with ugem.connect() as plain:  # found where connect() looks
            assert _server_pid(plain) == _server_pid(dev)


def test_without_start_nothing_is_started(workdir: str) -> None:
    path = os.path.join(workdir, "ugem.sock")
    with pytest.raises(FileNotFoundError, match="ugem serve"):
        ugem.connect(path)
    with pytest.raises(FileNotFoundError):
        ugem.connect(path, start=False)
    assert os.listdir(workdir) == []
    assert _daemons_in(workdir) == []


_STARTER = """
import sys, ugem
sys.stdout.write("ready\\n"); sys.stdout.flush()
sys.stdin.readline()  # go
with ugem.connect(sys.argv[1], start=True) as dev:
    sys.stdout.write(f"{dev._live().server_pid}\\n"); sys.stdout.flush()
    sys.stdin.readline()  # done
"""


def test_concurrent_starters_end_with_one_daemon(workdir: str) -> None:
    path = os.path.join(workdir, "ugem.sock")
    starters = [subprocess.Popen([sys.executable, "-c", _STARTER, path], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    try:
        for p in starters:
            assert p.stdout is not None and p.stdout.readline() == "ready\n", p.communicate(timeout=SAFETY_S)
        for p in starters:  # all at once
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        pids = set()
        for p in starters:
            assert p.stdout is not None
            line = p.stdout.readline()
            assert line.strip().isdigit(), (line, p.communicate(timeout=SAFETY_S))
            pids.add(int(line))
        assert len(pids) == 1, pids
        [pid] = pids
        assert _daemons_in(workdir) == [pid]
        with ugem.connect(path) as dev:
            assert dev.stats()["clients"] == 5
        for p in starters:
            out, err = p.communicate("done\n", timeout=SAFETY_S)
            assert p.returncode == 0 and err == "", err
    finally:
        for p in starters:
            if p.poll() is None:
                p.kill()
                p.communicate()


def test_a_daemon_that_cannot_start_is_reported(workdir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = os.path.join(workdir, "file")
    with open(blocker, "w"):
        pass
    monkeypatch.setenv("XDG_CACHE_HOME", blocker)  # its default spill directory cannot be made
    path = os.path.join(workdir, "ugem.sock")
    with pytest.raises(FileNotFoundError) as exc:
        ugem.connect(path, start=True)
    message = str(exc.value.strerror)
    for text in (f"no ugem daemon listening on {path}", "exited with status 2", "--spill-dir",
                 f"its log: {path}.log"):
        assert text in message, (text, message)
    assert exc.value.errno == errno.ENOENT
    assert sorted(os.listdir(workdir)) == ["file", "ugem.sock.log"]  # no socket, no lock left


def test_a_socket_directory_that_does_not_exist_is_reported(workdir: str) -> None:
    path = os.path.join(workdir, "missing", "ugem.sock")
    with pytest.raises(FileNotFoundError, match=f"cannot open its log {path}.log: No such file"):
        ugem.connect(path, start=True)
    assert _daemons_in(workdir) == []


@pytest.mark.parametrize("value", ["0", "-1", "nan", "soon"])
def test_a_bad_exit_idle_variable_is_einval(workdir: str, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("UGEM_EXIT_IDLE", value)
    with pytest.raises(ugem.InvalidArgument, match=rf"\$UGEM_EXIT_IDLE: '{value}' is not"):
        ugem.connect(os.path.join(workdir, "ugem.sock"), start=True)
    assert _daemons_in(workdir) == []


def test_a_started_daemon_exits_once_its_last_client_is_gone(workdir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    idle = 1.0
    monkeypatch.setenv("UGEM_EXIT_IDLE", str(idle))
    path = os.path.join(workdir, "ugem.sock")
    dev = ugem.connect(path, start=True)  # (should a daemon idle out before we connect, another is started)
    pid = _server_pid(dev)
    pidfd = os.pidfd_open(pid)
    try:
        dev.create(1 << 20)
        assert not select.select([pidfd], [], [], 3 * idle)[0], "it exited with a client connected"
        dev.close()
        assert select.select([pidfd], [], [], SAFETY_S)[0], "it did not exit once idle"
    finally:
        os.close(pidfd)
    assert sorted(os.listdir(workdir)) == ["cache", "ugem.sock.log"]  # socket and lock removed
    assert os.listdir(os.path.join(workdir, "cache", "ugem", "spill")) == []  # spill files removed
    with open(f"{path}.log") as f:
        assert "no client for 1 s (--exit-idle): shutting down" in f.read()
    with ugem.connect(path, start=True) as again:  # and the next start makes a new one
        assert _server_pid(again) != pid


# -- ugem serve --exit-idle, --detach ---------------------------------------------------------

def test_exit_idle_counts_from_start() -> None:
    with run_daemon(extra_args=("--exit-idle", "0.5")) as daemon:
        assert daemon.proc.wait(SAFETY_S) == 0
        assert not os.path.exists(daemon.path) and not os.path.exists(daemon.path + ".lock")
        assert os.listdir(os.path.join(daemon.directory, "spill")) == []
        assert "no client for 0.5 s (--exit-idle): shutting down" in daemon.stderr_text()


def test_detach_returns_once_listening(workdir: str) -> None:
    path = os.path.join(workdir, "ugem.sock")
    with open(os.path.join(workdir, "log"), "w") as log:
        result = subprocess.run([*UGEM, "serve", "--detach", "--socket", path, "--exit-idle", LONG_IDLE],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, text=True,
                                timeout=SAFETY_S)
    assert (result.returncode, result.stdout) == (0, f"ugem: listening on {path}\n")
    with ugem.connect(path) as dev:
        pid = _server_pid(dev)
        assert os.getsid(pid) == pid
        assert _parent_of(pid) != os.getpid()
        fds = {os.readlink(f"/proc/{pid}/fd/{n}") for n in ("0", "1")}
        assert fds == {"/dev/null"}
    # a second one on the same socket refuses: exit 3, the first unharmed
    again = subprocess.run([*UGEM, "serve", "--detach", "--socket", path], stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=SAFETY_S)
    assert again.returncode == 3 and again.stdout == "", again
    assert "another ugem daemon" in again.stderr and "Traceback" not in again.stderr, again.stderr
    assert _daemons_in(workdir) == [pid]
    with ugem.connect(path) as dev:
        assert dev.stats()["clients"] == 1


def test_detach_reports_a_failure_to_start(workdir: str) -> None:
    path = os.path.join(workdir, "missing", "ugem.sock")
    result = subprocess.run([*UGEM, "serve", "--detach", "--socket", path], stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=SAFETY_S)
    assert result.returncode == 2 and result.stdout == "", result
    assert len(result.stderr.splitlines()) == 1 and f"--socket: {path!r}" in result.stderr, result.stderr
    assert _daemons_in(workdir) == []
