"""A client that dies, even by SIGKILL, is released like a closed DRM fd (SPEC §1, §5).

A client process group (a leader, a forked member with a connection of its own, and a
forked child that inherits the leader's connection) creates, writes, flinks, maps and
exports objects, holds bulk transfers it never reports done, and is then SIGKILLed with
os.killpg. Afterwards the daemon, seen from another client, holds no object, no name, no
resident memory and exactly the fds it started with.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import numpy as np
import pytest

import ugem
from ugem.client.registry import mapping_of
from ugem.testing import DaemonProcess
from ugem.testing.data import wait_until
from ugem.wire import structs_share as ss
from ugem.wire.frames import FrameKind, Op, encode_header

from .conftest import RawClient

# The client group. argv: socket path. Prints one JSON line per connected process, then sleeps.
HOLDER = r"""
import fcntl, json, os, sys, time
import ugem
from ugem.wire import structs as s
from ugem.wire.frames import Op

def work(dev, tag):
    hs = [dev.create(3 * 4096) for _ in range(24)]
    for i, h in enumerate(hs):
        dev.pwrite(h, 100, f"{tag}:{i}".encode())
    big = dev.create(1 << 20)
    dev.pwrite(big, 0, b"y" * (1 << 20))           # bulk write: goes through an XFER description
    assert dev.pread(big, 0, 1 << 20) == b"y" * (1 << 20)
    names = [dev.flink(h) for h in hs[:12]]
    maps = [dev.mmap(h) for h in hs[:6]]
    maps[0][:5] = b"hello"
    exported = [dev.export(h) for h in hs[6:10]]
    exported.append(dev.export(hs[10], writable=False))
    held = [  # transfers handed out and never reported done (no XFER_DONE)
        dev._call(Op.GEM_PREAD, s.PreadReq(handle=big, flags=s.XFER, offset=0, length=1 << 20)).fd,
        dev._call(Op.GEM_PWRITE, s.PwriteReq(handle=hs[11], flags=s.XFER, offset=0, length=4096)).fd,
        dev._call(Op.GEM_PWRITE, s.PwriteReq(handle=hs[12], flags=s.XFER, offset=4096, length=8192)).fd,
    ]
    again = dev.open_name(names[3])[0]                # a second handle to a flinked object
    imported = dev.import_fd(exported[0])             # self-import returns the original handle
    mfd = os.memfd_create("foreign", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
    os.ftruncate(mfd, 8192)
    fcntl.fcntl(mfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    foreign = dev.import_fd(mfd)
    dev.close_handle(hs[0])                           # now alive only through its mapping
    dev.close_handle(hs[11])                          # now alive only through a held transfer
    return names, (maps, exported, held, again, imported, foreign, mfd)

path = sys.argv[1]
if os.fork() == 0:                                    # a member with a connection of its own
    dev = ugem.connect(path)
    names, keep = work(dev, "member")
    os.write(1, (json.dumps({"pid": os.getpid(), "names": names}) + "\n").encode())  # one write: two
    # processes share this pipe, and under PYTHONUNBUFFERED print() writes the newline apart
    time.sleep(600)
    os._exit(0)
dev = ugem.connect(path)
names, keep = work(dev, "leader")
if os.fork() == 0:                                    # shares the leader's connection
    time.sleep(600)
    os._exit(0)
os.write(1, (json.dumps({"pid": os.getpid(), "names": names}) + "\n").encode())
time.sleep(600)
"""

# A client that never stops working. argv: socket path. Prints "go" once busy.
WORKER = r"""
import os, sys
import ugem
dev = ugem.connect(sys.argv[1])
keep, fds, i = [], [], 0
while True:
    i += 1
    big = i % 5 == 0                                  # every fifth write goes through XFER
    h = dev.create((256 << 10) if big else 4096 * (1 + i % 7))
    dev.pwrite(h, 0, b"w" * ((200 << 10) if big else 64))
    if i % 2:
        dev.flink(h)
    if i % 3 == 0:
        keep.append(dev.mmap(h))
    if i % 4 == 0:
        fds.append(dev.export(h))
    if i % 6 == 0:
        dev.close_handle(h)
    if i == 20:
        print("go", flush=True)
"""


def _spawn(script: str, daemon: DaemonProcess) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", script, daemon.path], stdout=subprocess.PIPE,
                            start_new_session=True)


def _read_lines(proc: subprocess.Popen[bytes], count: int, timeout: float = 30.0) -> list[bytes]:
    assert proc.stdout is not None
    lines: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(lines) < count:
        assert time.monotonic() < deadline, f"client group printed only {lines}"
        line = proc.stdout.readline()
        assert line, f"client group exited early (status {proc.poll()}) after {lines}"
        lines.append(line)
    return lines


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    assert proc.stdout is not None
    proc.stdout.close()


def _assert_released(kit: Any, daemon: DaemonProcess, observer: ugem.Device, baseline: int,
                     names: list[int]) -> None:
    kit.wait_until(lambda: observer.stats()["objects"] == 0, what="the dead clients' objects to be released")
    stats = observer.stats()
    assert stats["clients"] == 1, stats
    assert [c["id"] for c in stats["per_client"]] == [observer.client_id], stats
    assert stats["resident_bytes"] == 0, stats
    assert stats["pinned_bytes"] == 0 and stats["purgeable_bytes"] == 0, stats
    for name in names:
        with pytest.raises(ugem.NoSuchObject):
            observer.open_name(name)
    assert observer.list_objects() == []
    kit.wait_fd_count(daemon, baseline)


def test_sigkilled_client_group_is_released(daemon: DaemonProcess, kit: Any) -> None:
    with daemon.connect() as observer:
        baseline = daemon.fd_count()
        group = _spawn(HOLDER, daemon)
        try:
            rows = [json.loads(line) for line in _read_lines(group, 2)]
            stats = observer.stats()
            assert stats["clients"] == 3, stats
            assert stats["objects"] >= 2 * 26, stats
            assert stats["resident_bytes"] > 2 << 20, stats
            assert daemon.fd_count() > baseline + 2 * 20  # memfds and client sockets really exist
            names = [n for row in rows for n in row["names"]]
            assert len(names) == 24 and all(n > 0 for n in names)
            h, size = observer.open_name(names[1])  # names work while the group lives...
            assert observer.pread(h, 100, 8) in (b"leader:1", b"member:1")
            observer.close_handle(h)
        finally:
            _kill_group(group)
        _assert_released(kit, daemon, observer, baseline, names)  # ...and are gone with it
    kit.assert_healthy(daemon, baseline - 1)


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.2])
def test_client_killed_mid_work_is_released(daemon: DaemonProcess, kit: Any, delay: float) -> None:
    with daemon.connect() as observer:
        baseline = daemon.fd_count()
        worker = _spawn(WORKER, daemon)
        try:
            assert _read_lines(worker, 1) == [b"go\n"]
            time.sleep(delay)  # let it get somewhere, then kill it wherever it is
            assert observer.stats()["objects"] > 0
        finally:
            _kill_group(worker)
        _assert_released(kit, daemon, observer, baseline, names=[1, 2, 3])
    kit.assert_healthy(daemon, baseline - 1)


def test_many_clients_killed_together(daemon: DaemonProcess, kit: Any) -> None:
    with daemon.connect() as observer:
        baseline = daemon.fd_count()
        groups = [_spawn(HOLDER, daemon) for _ in range(4)]
        try:
            for group in groups:
                _read_lines(group, 2)
            assert observer.stats()["clients"] == 1 + 4 * 2
        finally:
            for group in groups:
                _kill_group(group)
        _assert_released(kit, daemon, observer, baseline, names=list(range(1, 50)))
    kit.assert_healthy(daemon, baseline - 1)


def test_close_returns_only_after_release(daemon: DaemonProcess, kit: Any) -> None:
    baseline = daemon.fd_count()
    with daemon.connect() as observer:
        for _round in range(3):
            dev = daemon.connect()
            handles = [dev.create(2 * 4096) for _ in range(300)]
            for h in handles:
                dev.pwrite(h, 0, b"data")
            names = [dev.flink(h) for h in handles[:50]]
            maps = [dev.mmap(h) for h in handles[:100]]
            exported = [dev.export(h) for h in handles[100:110]]
            assert observer.stats()["objects"] == 300
            dev.close()
            stats = observer.stats()  # no polling: close() waited for the release
            assert stats["objects"] == 0 and stats["clients"] == 1, stats
            assert stats["resident_bytes"] == 0, stats
            assert daemon.fd_count() == baseline + 1, "the daemon still holds fds of the closed client"
            with pytest.raises(ugem.NoSuchObject):
                observer.open_name(names[0])
            with pytest.raises(ugem.BadFd):
                dev.create(4096)
            # mappings and exported fds outlive the client (SPEC §1, §8)
            assert bytes(maps[7][:4]) == b"data"
            assert os.pread(exported[3], 4, 0) == b"data"
            for fd in exported:
                os.close(fd)
            del maps
    kit.wait_fd_count(daemon, baseline)


def test_what_a_client_sent_before_it_went_away_is_served(daemon: DaemonProcess) -> None:
    """Frames still unread when their client goes away are served all the same, unanswered:
    a reply that cannot be written (EPIPE) does not drop the frames behind it. Here a drop
    of another client's share, behind requests whose replies nobody reads, as a Pool worker's
    last claims may be when it is terminated."""
    with daemon.connect() as sender:
        h = sender.create(4096)
        view = sender.mmap(h)
        entry = mapping_of(np.frombuffer(view, np.uint8))
        assert entry is not None
        owner, token = sender._share(entry.map_id, 0, 4096, True)
        del view, entry
        gc.collect()
        sender.close_handle(h)
        assert sender.stats()["objects"] == 1  # the share holds it
        raw = RawClient(daemon.path)
        raw.hello()
        drop = ss.SHARE_RECORD.pack(owner, token)
        raw.send(b"".join(encode_header(0, Op.STATS, 0, FrameKind.REQUEST, seq) for seq in range(2, 50))
                 + encode_header(len(drop), Op.GEM_DROP_SHARES, 0, FrameKind.POST, 50) + drop)
        raw.sock.close()  # gone before the daemon read them (most likely), or while it answers them
        wait_until(lambda: sender.stats()["objects"] == 0,
                   what="the drop sent before the client went away served (it was lost if this fails)")

