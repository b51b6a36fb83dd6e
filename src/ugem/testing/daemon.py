"""A real daemon for tests: `run_daemon(**config)` and the two-mode `Env`."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..client.connect import connect
from ..client.device import Device
from ..manager import Manager

__all__ = ["DaemonProcess", "Env", "run_daemon"]


@dataclass
class DaemonProcess:
    proc: subprocess.Popen[bytes]
    path: str
    directory: str
    banner: bytes = b""  # what the daemon printed on stdout up to and including its first line
    _stderr: _StderrDrain | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def connect(self) -> Device:
        return connect(self.path)

    def fd_count(self) -> int:
        """The daemon's open fds, less the memfds it keeps for reuse (`pooled_fds`): those are
        not held by anything a test made, and stats() counts them."""
        total, pooled = self._fds()
        return total - pooled

    def pooled_fds(self) -> int:
        """The daemon's pooled memfds (backing/recycle.py: they alone are mode 0000), read
        from /proc without asking the daemon (which would open a connection)."""
        return self._fds()[1]

    def _fds(self) -> tuple[int, int]:
        total = pooled = 0
        for name in os.listdir(f"/proc/{self.pid}/fd"):
            path = f"/proc/{self.pid}/fd/{name}"
            try:
                if os.readlink(path).startswith("/memfd:ugem:") and stat.S_IMODE(os.stat(path).st_mode) == 0:
                    pooled += 1
            except FileNotFoundError:  # closed meanwhile: not counted
                continue
            total += 1
        return total, pooled

    def stderr_text(self) -> str:
        """Everything the daemon has logged so far (stderr is drained continuously)."""
        return self._stderr.text() if self._stderr is not None else ""


class _StderrDrain:
    """Read the daemon's stderr in a thread: an unread pipe fills after ~64 KiB of log
    lines and then blocks the daemon's next log call, stalling every client."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._chunks: list[bytes] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="ugem-daemon-stderr", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while chunk := os.read(self._stream.fileno(), 65536):
            with self._lock:
                self._chunks.append(chunk)

    def text(self) -> str:
        with self._lock:
            return b"".join(self._chunks).decode(errors="replace")

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


def _flag_args(config: dict[str, Any]) -> list[str]:
    args: list[str] = []
    for key, value in config.items():  # a list: the flag once per item (object=["a=/x", "b=/y"])
        for item in value if isinstance(value, list | tuple) else [value]:
            args += [f"--{key.replace('_', '-')}", str(item)]
    return args


@contextlib.contextmanager
def run_daemon(*, startup_timeout: float = 20.0, extra_args: tuple[str, ...] = (),
               socket: str | None = None, default_socket: bool = False, env: Mapping[str, str] | None = None,
               fd_limit: int | None = None, **config: Any) -> Iterator[DaemonProcess]:
    """Start `ugem serve` on a fresh socket; on exit SIGTERM it and require exit status 0.

    `socket` picks the socket path; `default_socket=True` passes no --socket, so the daemon
    finds its socket as in SPEC §1 under `env` (the environment of the daemon, default ours).
    If the daemon already exited when the block ends (the test stopped or killed it), its
    exit status is the test's business and is not checked here. `fd_limit` starts it with
    RLIMIT_NOFILE soft = hard = that many fds.
    """
    with tempfile.TemporaryDirectory(prefix="ugem-test-") as directory:
        environ = dict(os.environ if env is None else env)
        path = socket if socket is not None else os.path.join(directory, "ugem.sock")
        socket_args = ["--socket", path]
        if default_socket:
            path, socket_args = _default_socket_path(environ), []
        config.setdefault("spill_dir", os.path.join(directory, "spill"))
        cmd = [sys.executable, "-m", "ugem", "serve", *socket_args, *_flag_args(config), *extra_args]
        if fd_limit is not None:  # set in the child, then exec the daemon under it
            cmd = [sys.executable, "-c", "import os, resource, sys; "
                   f"resource.setrlimit(resource.RLIMIT_NOFILE, ({fd_limit}, {fd_limit})); "
                   "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])", *cmd[1:]]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                                env=environ)
        assert proc.stderr is not None
        drain = _StderrDrain(proc.stderr)
        failed = False
        try:
            banner = _wait_ready(proc, path, startup_timeout, drain)
            yield DaemonProcess(proc, path, directory, banner, drain)
        except BaseException:
            failed = True
            raise
        finally:
            status = _stop(proc, drain)
        if not failed and status is not None and status != 0:
            raise AssertionError(f"ugem serve exited with status {status} after SIGTERM; "
                                 f"stderr:\n{drain.text()}")


def _default_socket_path(environ: Mapping[str, str]) -> str:
    if environ.get("UGEM_SOCKET"):
        return environ["UGEM_SOCKET"]
    if environ.get("XDG_RUNTIME_DIR"):
        return os.path.join(environ["XDG_RUNTIME_DIR"], "ugem", "ugem.sock")
    return os.path.join("/tmp", f"ugem-{os.getuid()}", "ugem.sock")


def _wait_ready(proc: subprocess.Popen[bytes], path: str, timeout: float, drain: _StderrDrain) -> bytes:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    line = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.1)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            line += chunk
            if b"\n" in line:
                break
    expected = f"ugem: listening on {path}\n".encode()
    if not line.startswith(expected):
        _stop(proc, drain)
        raise RuntimeError(f"daemon did not start: stdout={line!r} stderr={drain.text()!r}")
    return line


def _stop(proc: subprocess.Popen[bytes], drain: _StderrDrain) -> int | None:
    """SIGTERM the daemon if it still runs; its exit status then, None if it was already gone."""
    status: int | None = None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            status = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            status = -signal.SIGKILL
    drain.join(timeout=5)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
    return status


@dataclass
class Env:
    """Clients of one manager, embedded or daemon; `open()` makes a new client each call."""

    mode: str
    manager: Manager | None = None
    daemon: DaemonProcess | None = None
    devices: list[Device] = field(default_factory=list)

    def open(self) -> Device:
        dev = self.manager.open() if self.manager is not None else connect(self._daemon().path)
        self.devices.append(dev)
        return dev

    def _daemon(self) -> DaemonProcess:
        assert self.daemon is not None
        return self.daemon

    def close(self) -> None:
        for dev in self.devices:
            dev.close()
        if self.manager is not None:
            self.manager.close()

    @classmethod
    @contextlib.contextmanager
    def start(cls, mode: str, **config: Any) -> Iterator[Env]:
        if mode == "embedded":
            config.pop("spill_dir", None)
            with tempfile.TemporaryDirectory(prefix="ugem-test-") as directory:
                env = cls(mode, manager=Manager(spill_dir=os.path.join(directory, "spill"), **config))
                try:
                    yield env
                finally:
                    env.close()
        elif mode == "daemon":
            with run_daemon(**config) as daemon:
                env = cls(mode, daemon=daemon)
                try:
                    yield env
                finally:
                    env.close()
        else:
            raise ValueError(f"unknown mode {mode!r}")
