"""`ugem fs MOUNTPOINT` (SPEC §4): a read-only FUSE view of a running daemon.

The mounted tests start a real daemon, fill it from a client, mount `ugem fs` in a
subprocess and look through the mount as any program would: `objects/<id>/data` holds
the object's bytes (read at any offset, also past the inline limit), `objects/<id>/info`
its size and placement, `names/<name>` and `clients/<cid>/<handle>` link to the object,
every change is refused (EROFS or EACCES), the listing follows the daemon within about a
second, and after `fusermount3 -u` (or SIGTERM) the view exits 0 and holds no handle; when
the daemon goes away the view unmounts and exits 3 without anyone touching it; a mount
point that is not an empty directory is refused before anything is mounted.
They skip, saying why, where FUSE is not available (no /dev/fuse, no fusermount3, no
libfuse3, no mfusepy). The FsView tests at the end need no FUSE: they drive the
operations object directly against an embedded Manager.
"""

from __future__ import annotations

import ctypes.util
import errno
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest

from ugem import Manager
from ugem.client.device import Device
from ugem.fsview import FsView
from ugem.testing import DaemonProcess, run_daemon
from ugem.testing.data import wait_until

MiB = 1 << 20
REFUSED = (errno.EROFS, errno.EACCES)


def _fuse_unavailable() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse on this machine (FUSE kernel module missing or not exposed to this container)"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "/dev/fuse is not readable and writable for this user"
    if shutil.which("fusermount3") is None:
        return "fusermount3 not found: install the Debian package fuse3 (see .ci/run)"
    if ctypes.util.find_library("fuse3") is None:
        return "libfuse3 not found: install the Debian package fuse3 (see .ci/run)"
    if importlib.util.find_spec("mfusepy") is None:
        return "mfusepy is not installed: pip install -e '.[fs]'"
    return None


needs_fuse = pytest.mark.skipif(_fuse_unavailable() is not None, reason=str(_fuse_unavailable()))




@dataclass
class Mount:
    daemon: DaemonProcess
    dev: Device  # the test's own client
    path: str
    proc: subprocess.Popen[bytes]

    def p(self, *parts: str | int) -> str:
        return os.path.join(self.path, *(str(x) for x in parts))

    def read(self, *parts: str | int, offset: int = 0, length: int = -1) -> bytes:
        with open(self.p(*parts), "rb") as f:
            f.seek(offset)
            return f.read(length)

    def wait_for(self, *parts: str | int) -> None:
        """Wait until `parts` shows in the view (the listing is cached for 0.5 s)."""
        wait_until(lambda: os.path.lexists(self.p(*parts)), 2, what=f"{'/'.join(map(str, parts))} to appear")

    def stderr(self) -> str:
        assert self.proc.stderr is not None
        return self.proc.stderr.read().decode(errors="replace") if self.proc.poll() is not None else ""

    def unmount(self) -> int:
        """fusermount3 -u, then the view's exit status."""
        subprocess.run(["fusermount3", "-u", self.path], check=True, capture_output=True, timeout=20)
        return self.proc.wait(timeout=20)

    def fs_client_handles(self) -> dict[str, int]:
        rows = [c for c in self.dev.list_clients() if c["pid"] == self.proc.pid]
        assert len(rows) == 1, rows
        return dict(rows[0]["handles"])


def _start_view(daemon: DaemonProcess, mountpoint: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "ugem", "fs", mountpoint, "--socket", daemon.path],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        wait_until(lambda: os.path.ismount(mountpoint) or proc.poll() is not None, 20, what="the view to mount")
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if proc.poll() is not None:
        assert proc.stderr is not None
        err = proc.stderr.read().decode(errors="replace")
        proc.stderr.close()
        if "not permitted" in err or "Permission denied" in err:  # e.g. a container without mount rights
            pytest.skip(f"this machine does not let us mount FUSE: {err.strip()}")
        pytest.fail(f"ugem fs exited with {proc.returncode}: {err}")
    return proc


@pytest.fixture
def mount() -> Iterator[Mount]:
    with run_daemon() as daemon, daemon.connect() as dev, \
            tempfile.TemporaryDirectory(prefix="ugem-fs-") as directory:
        mountpoint = os.path.join(directory, "mnt")
        os.mkdir(mountpoint)
        proc = _start_view(daemon, mountpoint)
        try:
            yield Mount(daemon, dev, mountpoint, proc)
        finally:
            if os.path.ismount(mountpoint):
                subprocess.run(["fusermount3", "-u", "-z", mountpoint], capture_output=True, timeout=20)
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            assert proc.stderr is not None
            proc.stderr.close()


# -- through a real mount -------------------------------------------------------------------


@needs_fuse
def test_data_info_and_links(mount: Mount) -> None:
    dev = mount.dev
    small = dev.create(4096)
    dev.pwrite(small, 0, b"hello, ugem fs\n")
    name = dev.flink(small)
    big = dev.create(3 * MiB)
    pattern = bytes(range(256)) * (MiB // 256)  # 1 MiB, not zeros, and past the inline limit
    dev.pwrite(big, MiB + 123, pattern)
    ids = {row["size"]: row["id"] for row in dev.list_objects()}
    sid, bid = ids[4096], ids[3 * MiB]
    mount.wait_for("clients", dev.client_id, big)

    assert sorted(os.listdir(mount.path)) == ["clients", "names", "objects"]
    assert sorted(os.listdir(mount.p("objects")), key=int) == [str(sid), str(bid)]
    assert sorted(os.listdir(mount.p("objects", sid))) == ["data", "info"]
    assert os.stat(mount.p("objects", sid, "data")).st_size == 4096
    assert os.stat(mount.p("objects", bid, "data")).st_size == 3 * MiB
    assert mount.read("objects", sid, "data") == b"hello, ugem fs\n" + bytes(4096 - 15)
    assert mount.read("objects", bid, "data", offset=MiB + 123, length=MiB) == pattern
    assert mount.read("objects", bid, "data", offset=3 * MiB - 10, length=100) == bytes(10)  # EOF
    whole = mount.read("objects", bid, "data")
    assert len(whole) == 3 * MiB and whole[MiB + 123:2 * MiB + 123] == pattern

    info = mount.read("objects", sid, "info").decode()
    lines = dict(line.split(": ", 1) for line in info.splitlines())
    assert lines["size"] == "4096" and lines["placement"] == "system" and lines["name"] == str(name)
    assert lines["id"] == str(sid) and lines["owner_pid"] == str(os.getpid()) and lines["pinned"] == "false"
    assert lines["mapped"] == "0" and "label" not in lines  # no label: the line is left out
    assert len(lines) == len(info.splitlines()), info  # no key twice (ls row and GEM_INFO)
    assert os.stat(mount.p("objects", sid, "info")).st_size == len(info)

    assert os.listdir(mount.p("names")) == [str(name)]
    assert os.readlink(mount.p("names", name)) == f"../objects/{sid}"
    assert os.path.realpath(mount.p("names", name)) == os.path.realpath(mount.p("objects", sid))
    assert mount.read("names", name, "data", length=5) == b"hello"

    cid = str(dev.client_id)
    assert os.listdir(mount.p("clients")) == [cid]  # the view's own client is left out
    assert sorted(os.listdir(mount.p("clients", cid)), key=int) == [str(small), str(big)]
    assert os.readlink(mount.p("clients", cid, big)) == f"../../objects/{bid}"
    assert mount.read("clients", cid, small, "data", length=5) == b"hello"
    # every file read above was released (the kernel sends RELEASE after close() returns)
    wait_until(lambda: mount.fs_client_handles() == {}, 5, what="the view to close its handles")


def _touch(path: str, mode: str) -> None:
    with open(path, mode):
        pass


@needs_fuse
def test_everything_is_read_only(mount: Mount) -> None:
    dev = mount.dev
    h = dev.create(4096)
    dev.pwrite(h, 0, b"keep")
    dev.flink(h)
    oid = dev.list_objects()[0]["id"]
    mount.wait_for("names", 1)
    data = mount.p("objects", oid, "data")
    attempts: list[tuple[str, Callable[[], object]]] = [
        ("write", lambda: _touch(data, "r+b")),
        ("truncate", lambda: os.truncate(data, 0)),
        ("append", lambda: _touch(data, "ab")),
        ("create", lambda: _touch(mount.p("objects", oid, "new"), "wb")),
        ("create at top", lambda: _touch(mount.p("new"), "wb")),
        ("unlink", lambda: os.unlink(data)),
        ("unlink link", lambda: os.unlink(mount.p("names", "1"))),
        ("rmdir", lambda: os.rmdir(mount.p("objects", oid))),
        ("mkdir", lambda: os.mkdir(mount.p("objects", "99"))),
        ("rename", lambda: os.rename(data, mount.p("objects", oid, "moved"))),
        ("symlink", lambda: os.symlink("objects", mount.p("names", "2"))),
        ("chmod", lambda: os.chmod(data, 0o666)),
        ("utime", lambda: os.utime(data, (0, 0))),
    ]
    for what, attempt in attempts:
        with pytest.raises(OSError) as info:
            attempt()
        assert info.value.errno in REFUSED, (what, info.value)
    assert mount.read("objects", oid, "data", length=4) == b"keep"
    assert dev.pread(h, 0, 4) == b"keep"
    assert os.statvfs(mount.path).f_flag & os.ST_RDONLY


@needs_fuse
def test_listing_follows_the_daemon(mount: Mount) -> None:
    dev = mount.dev
    first = dev.create(4096)
    wait_until(lambda: len(os.listdir(mount.p("objects"))) == 1, 2, what="the first object")
    second = dev.create(8192)
    name = dev.flink(second)
    sid = max(int(row["id"]) for row in dev.list_objects())
    start = time.monotonic()
    wait_until(lambda: os.path.exists(mount.p("objects", sid, "data")), 2, what="the new object to appear")
    wait_until(lambda: os.path.islink(mount.p("names", name)), 2, what="its name to appear")
    appeared = time.monotonic() - start
    dev.close_handle(second)
    start = time.monotonic()
    wait_until(lambda: not os.path.exists(mount.p("objects", sid)), 2, what="the closed object to disappear")
    wait_until(lambda: str(name) not in os.listdir(mount.p("names")), 2, what="its name to disappear")
    gone = time.monotonic() - start
    assert appeared < 1.5 and gone < 1.5, (appeared, gone)
    assert str(second) not in os.listdir(mount.p("clients", dev.client_id))
    dev.close_handle(first)
    wait_until(lambda: os.listdir(mount.p("objects")) == [], 2, what="an empty objects/")


@needs_fuse
def test_unmount_exits_and_leaves_no_handles(mount: Mount) -> None:
    dev = mount.dev
    handles = [dev.create(64 << 10) for _ in range(3)]
    ids = [row["id"] for row in dev.list_objects()]
    mount.wait_for("objects", ids[-1])
    held = [open(mount.p("objects", i, "data"), "rb") for i in ids]  # noqa: SIM115 (held open on purpose)
    try:
        for f in held:
            assert f.read(10) == bytes(10)
        assert len(mount.fs_client_handles()) == 3  # one read-only handle per open data file
        stats = dev.stats()
        assert stats["objects"] == 3
    finally:
        for f in held:
            f.close()
    wait_until(lambda: mount.fs_client_handles() == {}, 5, what="the view to close its handles on release")
    assert mount.unmount() == 0, mount.stderr()
    assert not os.path.ismount(mount.path)
    wait_until(lambda: dev.stats()["clients"] == 1, 5, what="the view's client to go")
    stats = dev.stats()
    assert stats["objects"] == len(handles), stats
    [only] = dev.list_clients()
    assert sorted(only["handles"]) == sorted(str(h) for h in handles)
    assert sorted(only["handles"].values()) == sorted(ids)


@needs_fuse
def test_sigterm_unmounts(mount: Mount) -> None:
    mount.proc.send_signal(signal.SIGTERM)
    assert mount.proc.wait(timeout=20) == 0, mount.stderr()
    assert not os.path.ismount(mount.path)


@needs_fuse
@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_daemon_going_away_unmounts_the_view_by_itself(mount: Mount, how: str) -> None:
    """Nobody touches the mount: the view notices the hang-up, unmounts and exits 3, even with a
    file held open in it."""
    h = mount.dev.create(4096)
    oid = mount.dev.list_objects()[0]["id"]
    mount.wait_for("objects", oid, "data")
    held = os.open(mount.p("objects", oid, "data"), os.O_RDONLY)
    try:
        assert os.pread(held, 4, 0) == bytes(4)
        mount.dev.close_handle(h)
        mount.dev.close()
        mount.daemon.proc.send_signal(getattr(signal, how))
        mount.daemon.proc.wait(timeout=60)
        assert mount.proc.wait(timeout=60) == 3
    finally:
        try:
            os.close(held)
        except OSError as exc:  # the flush at close meets the aborted connection (the fd is closed)
            assert exc.errno == errno.ENOTCONN, exc
    stderr = mount.stderr()
    assert stderr.splitlines() == [f"ugem: fs: the ugem daemon at {mount.daemon.path} went away; "
                                   f"{mount.path} was unmounted"], stderr
    assert not os.path.ismount(mount.path)


@needs_fuse
def test_bad_mountpoint_fails_cleanly() -> None:
    with run_daemon() as daemon, tempfile.TemporaryDirectory(prefix="ugem-fs-") as directory:
        out = subprocess.run([sys.executable, "-m", "ugem", "fs", os.path.join(directory, "missing"),
                              "--socket", daemon.path], capture_output=True, text=True, timeout=30)
        assert out.returncode == 1, out
        assert "could not mount" in out.stderr and "Traceback" not in out.stderr


@needs_fuse
def test_a_non_empty_or_non_directory_mount_point_is_refused() -> None:
    with run_daemon() as daemon, tempfile.TemporaryDirectory(prefix="ugem-fs-") as directory:
        full = os.path.join(directory, "full")
        os.mkdir(full)
        with open(os.path.join(full, "keep"), "w") as f:
            f.write("mine")
        a_file = os.path.join(directory, "file")
        with open(a_file, "w"):
            pass
        for path, why in ((full, "not empty"), (a_file, "Not a directory")):
            out = subprocess.run([sys.executable, "-m", "ugem", "fs", path, "--socket", daemon.path],
                                 capture_output=True, text=True, timeout=30)
            assert out.returncode == 1 and out.stdout == "", out
            assert out.stderr.splitlines() == [out.stderr.strip()], out.stderr  # one line
            assert f"ugem: fs: could not mount {path}: " in out.stderr and why in out.stderr, out.stderr
            assert not os.path.ismount(path)
        assert os.listdir(full) == ["keep"]


# -- the operations object, without FUSE ----------------------------------------------------


@pytest.fixture
def view() -> Iterator[tuple[Device, FsView, list[float]]]:
    with tempfile.TemporaryDirectory(prefix="ugem-fs-") as directory:
        manager = Manager(spill_dir=os.path.join(directory, "spill"))
        try:
            with manager.open() as owner, manager.open() as looker:
                now = [0.0]
                yield owner, FsView(looker, clock=lambda: now[0]), now
        finally:
            manager.close()


def _fi(flags: int = os.O_RDONLY) -> Any:
    return SimpleNamespace(flags=flags, fh=0, direct_io=0)


def test_view_reads_through_a_handle_closed_on_release(view: tuple[Device, FsView, list[float]]) -> None:
    owner, fs, _ = view
    h = owner.create(8192)
    owner.pwrite(h, 4090, b"across a page")
    oid = owner.list_objects()[0]["id"]
    fi = _fi()
    fs.open(f"/objects/{oid}/data", fi)
    assert fs.read("", 13, 4090, fi) == b"across a page"
    assert fs.read("", 100, 8190, fi) == b"\0\0" and fs.read("", 10, 9000, fi) == b""
    assert owner.list_objects()[0]["handles"] == 2  # the view's read-only handle
    fs.release("", fi)
    assert owner.list_objects()[0]["handles"] == 1
    info = _fi()
    fs.open(f"/objects/{oid}/info", info)
    assert info.direct_io == 1 and b"size: 8192\n" in fs.read("", 4096, 0, info)
    fs.release("", info)
    assert owner.list_objects()[0]["handles"] == 1


def test_view_caches_the_listing(view: tuple[Device, FsView, list[float]]) -> None:
    owner, fs, now = view
    assert fs.readdir("/objects", 0) == [".", ".."]
    owner.create(4096)
    assert fs.readdir("/objects", 0) == [".", ".."]  # within the ttl: the old listing
    now[0] += 1.0
    assert len(fs.readdir("/objects", 0)) == 3


def test_view_refuses_writes_and_unknown_paths(view: tuple[Device, FsView, list[float]]) -> None:
    owner, fs, _ = view
    owner.create(4096)
    oid = owner.list_objects()[0]["id"]
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
        with pytest.raises(OSError) as info:
            fs.open(f"/objects/{oid}/data", _fi(flags))
        assert info.value.errno == errno.EROFS
    for call in (lambda: fs.write("/x", b"", 0, 0), lambda: fs.unlink("/objects"), lambda: fs.chmod("/", 0o777)):
        with pytest.raises(OSError) as info:
            call()
        assert info.value.errno == errno.EROFS
    for path in ("/nope", "/objects/999", f"/objects/{oid}/other", "/names/1", "/clients/1/2/3", "/objects/x"):
        with pytest.raises(OSError) as info:
            fs.getattr(path)
        assert info.value.errno == errno.ENOENT, path


def test_view_after_a_hang_up_fails_with_eio_and_asks_to_exit(view: tuple[Device, FsView, list[float]]) -> None:
    owner, _, now = view
    assert owner.hangup_fd() is None  # embedded: no connection to watch
    asked: list[bool] = []
    fs = FsView(owner, on_daemon_gone=lambda: asked.append(True), clock=lambda: now[0])
    assert fs.statfs("/")["f_namemax"] == 255 and not asked
    fs.hung_up = True  # what the watcher sets when the daemon hangs up
    for call in (lambda: fs.statfs("/"), lambda: fs.readdir("/objects", 0)):
        with pytest.raises(OSError) as info:
            call()
        assert info.value.errno == errno.EIO
    assert asked == [True, True] and fs.daemon_gone
