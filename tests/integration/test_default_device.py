"""`ugem.default_device()`: the process's shared default client, made on first use (a client
of the daemon at the default socket if one listens there, else an embedded manager), the
same object from every thread, replaced once closed or once its daemon went away, never the
parent's in a forked child, and closed cleanly at interpreter exit.

Every test starts and ends with no default made (`reset()`), with $UGEM_SOCKET pointing
where no daemon listens unless the test starts one there.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import ugem
from ugem.client.default import reset
from ugem.testing import in_child, run_daemon
from ugem.testing.data import SAFETY_S

PAGE = 4096


@pytest.fixture(autouse=True)
def no_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> Iterator[None]:
    monkeypatch.setenv("UGEM_SOCKET", str(tmp_path / "nobody-listens.sock"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # an embedded default's spill files
    reset()
    yield
    reset()


@pytest.fixture
def runtime_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A short private $XDG_RUNTIME_DIR (AF_UNIX paths are short), $UGEM_SOCKET unset."""
    with tempfile.TemporaryDirectory(prefix="ugem-xdg-") as directory:
        os.chmod(directory, 0o700)
        monkeypatch.setenv("XDG_RUNTIME_DIR", directory)
        monkeypatch.delenv("UGEM_SOCKET")
        yield directory


@contextlib.contextmanager
def _default_in(mode: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The default is embedded, or (mode "daemon") a client of a daemon at $UGEM_SOCKET;
    forgotten before the daemon stops."""
    if mode == "embedded":
        yield
        return
    with run_daemon() as daemon:
        monkeypatch.setenv("UGEM_SOCKET", daemon.path)
        try:
            yield
        finally:
            reset()


def _is_embedded(dev: ugem.Device) -> bool:
    return bool(dev._live().embedded)


def test_without_a_daemon_it_is_an_embedded_manager() -> None:
    dev = ugem.default_device()
    assert _is_embedded(dev)
    assert ugem.default_device() is dev
    with dev.new(PAGE) as buf:
        buf.write(b"default")
        assert buf.read(0, 7) == b"default"


def test_with_a_daemon_at_ugem_socket_it_is_a_client_of_it(monkeypatch: pytest.MonkeyPatch) -> None:
    with run_daemon() as daemon:
        monkeypatch.setenv("UGEM_SOCKET", daemon.path)
        dev = ugem.default_device()
        assert not _is_embedded(dev)
        assert dev._live().server_pid == daemon.pid  # type: ignore[attr-defined]
        assert ugem.default_device() is dev
        dev.create(PAGE)
        assert [c["pid"] for c in dev.stats()["per_client"]] == [os.getpid()]
        reset()


def test_with_a_daemon_at_the_xdg_runtime_dir_socket_it_is_a_client_of_it(runtime_dir: str) -> None:
    with run_daemon(default_socket=True, env=dict(os.environ)) as daemon:
        assert daemon.path == os.path.join(runtime_dir, "ugem", "ugem.sock")
        dev = ugem.default_device()
        assert not _is_embedded(dev)
        assert dev._live().server_pid == daemon.pid  # type: ignore[attr-defined]
        reset()


def test_an_unusable_socket_raises_instead_of_going_embedded(runtime_dir: str) -> None:
    os.mkdir(os.path.join(runtime_dir, "ugem"), 0o777)
    os.chmod(os.path.join(runtime_dir, "ugem"), 0o777)  # writable by others: refused, never ignored
    with pytest.raises(PermissionError, match="writable by group or others"):
        ugem.default_device()


def test_threads_get_one_device() -> None:
    barrier = threading.Barrier(8)
    got: list[ugem.Device] = []

    def worker() -> None:
        barrier.wait(SAFETY_S)
        got.append(ugem.default_device())

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(SAFETY_S)
    assert len(got) == 8 and all(dev is got[0] for dev in got)


@pytest.mark.parametrize("mode", ["embedded", "daemon"])
def test_a_closed_default_is_replaced(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with _default_in(mode, monkeypatch):
        first = ugem.default_device()
        arr = first.new(PAGE).array("u1")
        arr[:3] = (1, 2, 3)
        first.close()
        second = ugem.default_device()
        assert second is not first and not second.closed
        assert _is_embedded(second) == (mode == "embedded")
        assert second.create(PAGE) == 1
        assert list(arr[:3]) == [1, 2, 3]  # what the old one mapped stays valid


def test_a_default_timed_out_is_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    """A call that times out closes the Device (connect(timeout=)); the next call makes a new one."""
    with run_daemon() as daemon:
        monkeypatch.setenv("UGEM_SOCKET", daemon.path)
        first = ugem.default_device()
        os.kill(daemon.pid, signal.SIGSTOP)
        try:
            first._live()._timeout = 0.2  # type: ignore[attr-defined]  # as connect(timeout=0.2) would set
            with pytest.raises(ugem.TimedOut):
                first.stats()
        finally:
            os.kill(daemon.pid, signal.SIGCONT)
        assert first.closed
        second = ugem.default_device()
        assert second is not first and not _is_embedded(second)
        assert second.stats()["clients"] >= 1
        reset()


def test_a_default_whose_daemon_went_away_is_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    with run_daemon() as daemon:
        monkeypatch.setenv("UGEM_SOCKET", daemon.path)
        first = ugem.default_device()
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(SAFETY_S) == 0
        with pytest.raises(ugem.DaemonGone):
            first.stats()
        second = ugem.default_device()  # no daemon any more: an embedded manager
        assert second is not first and _is_embedded(second)
        assert first.closed


# -- fork ------------------------------------------------------------------------------------

def _in_child(fn: Callable[[], Any]) -> Any:
    """Run `fn` in a forked child; its result (it must not raise)."""
    outcome = in_child(fn)
    assert "ok" in outcome, outcome
    return outcome["ok"]


@pytest.mark.parametrize("mode", ["embedded", "daemon"])
def test_a_forked_child_gets_its_own_default(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with _default_in(mode, monkeypatch):
        parent = ugem.default_device()
        h = parent.create(PAGE)
        parent.pwrite(h, 0, b"parent")

        def child() -> Any:
            dev = ugem.default_device()
            assert dev is not parent and ugem.default_device() is dev
            with pytest.raises(ugem.BadFd, match="connect again in the child"):
                parent.info(h)
            with dev.new(PAGE) as buf:
                buf.write(b"child")
                return [_is_embedded(dev), dev.client_id, buf.read(0, 5).decode(), dev.stats()["clients"]]

        embedded, client_id, data, clients = _in_child(child)
        assert embedded == (mode == "embedded") and data == "child"
        if mode == "daemon":  # a client of its own, next to the parent's
            assert client_id != parent.client_id and clients == 2
        assert ugem.default_device() is parent
        assert parent.pread(h, 0, 6) == b"parent"
        assert parent.stats()["objects"] == 1


def test_a_child_forked_before_any_default_makes_its_own() -> None:
    def child() -> Any:
        return _is_embedded(ugem.default_device())

    assert _in_child(child) is True
    assert _is_embedded(ugem.default_device())


# -- interpreter exit ------------------------------------------------------------------------

def test_an_embedded_default_is_closed_at_exit(tmp_path: Any) -> None:
    """Its manager's spill files go with it (they would stay behind if it were not closed)."""
    code = ("import ugem\n"
            "dev = ugem.default_device()\n"
            "arr = dev.new(1 << 20).array('f8')\n"
            "arr[:] = 1.0\n"
            "import os\n"
            "print(len(os.listdir(os.path.join(os.environ['XDG_CACHE_HOME'], 'ugem', 'spill'))))\n")
    env = {**os.environ, "PYTHONWARNINGS": "always::ResourceWarning"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=SAFETY_S, env=env)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout == "1\n"  # its manager's directory, while it ran
    assert os.listdir(tmp_path / "cache" / "ugem" / "spill") == []


def test_a_daemon_client_default_disconnects_at_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    with run_daemon() as daemon:
        code = ("import ugem\n"
                "dev = ugem.default_device()\n"
                "dev.create(4096)\n"
                "print(dev.stats()['clients'])\n")
        env = {**os.environ, "UGEM_SOCKET": daemon.path, "PYTHONWARNINGS": "always::ResourceWarning"}
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=SAFETY_S,
                              env=env)
        assert (proc.returncode, proc.stdout, proc.stderr) == (0, "1\n", "")
        with daemon.connect() as dev:
            stats = dev.stats()
            assert (stats["clients"], stats["objects"]) == (1, 0)


# -- ugem.empty / ugem.zeros without a device ------------------------------------------------

@pytest.mark.parametrize("mode", ["embedded", "daemon"])
def test_empty_and_zeros_use_the_default_device(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with _default_in(mode, monkeypatch):
        a = ugem.zeros((2, 3), "i4")
        b = ugem.empty(5)
        dev = ugem.default_device()
        assert _is_embedded(dev) == (mode == "embedded")
        assert dev.stats()["objects"] == 2
        a[1, 2], b[4] = 7, 0.5
        assert a.sum() == 7 and b.sum() == 0.5
        del a, b
        gc.collect()
        assert dev.stats()["objects"] == 0
