"""A real daemon for tests: `run_daemon(**config)` and the two-mode `Env`."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
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

    @property
    def pid(self) -> int:
        return self.proc.pid

    def connect(self) -> Device:
        return connect(self.path)

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def stderr_text(self) -> str:
        return ""


def _flag_args(config: dict[str, Any]) -> list[str]:
    args: list[str] = []
    for key, value in config.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


@contextlib.contextmanager
def run_daemon(*, startup_timeout: float = 20.0, extra_args: tuple[str, ...] = (), **config: Any
               ) -> Iterator[DaemonProcess]:
    """Start `ugem serve` on a fresh socket; on exit SIGTERM it and require exit status 0."""
    with tempfile.TemporaryDirectory(prefix="ugem-test-") as directory:
        path = os.path.join(directory, "ugem.sock")
        config.setdefault("spill_dir", os.path.join(directory, "spill"))
        cmd = [sys.executable, "-m", "ugem", "serve", "--socket", path, *_flag_args(config), *extra_args]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        try:
            _wait_ready(proc, path, startup_timeout)
            daemon = DaemonProcess(proc, path, directory)
            yield daemon
        finally:
            _stop(proc)


def _wait_ready(proc: subprocess.Popen[bytes], path: str, timeout: float) -> None:
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
        _stop(proc)
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        raise RuntimeError(f"daemon did not start: stdout={line!r} stderr={err!r}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


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
