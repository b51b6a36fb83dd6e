"""SPEC §7: a client holding 2,000 objects obtained by open_name / import_fd holds <= 16 fds,
and still <= 16 with all 2,000 of them mapped (mappings need no fd of their own).

The counting happens in a fresh subprocess (/proc/self/fd of that process), so the pytest
process's own fds cannot blur it. The subprocess reports its fd count when it starts
(`start`), after importing ugem and numpy (`imported`), after obtaining the handles
(`opened`) and after mapping every object (`mapped`); it checks through each mapping that
it sees the right object and writes a reply into it, which this process then reads back
through the daemon. A third variant maps and unmaps repeatedly, so any fd leaked per
mapping would add up.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

import ugem
from ugem.testing import DaemonProcess
from ugem.testing.data import wait_until

COUNT = 2000
FD_BUDGET = 16  # SPEC §7

# argv: socket path, mode ("names" | "import" | "churn"), count, [fd of a socket carrying exported fds]
# stdin: JSON list of names (names mode). stdout: one JSON report line; then waits for stdin EOF.
CLIENT = r"""
import json, os, socket, struct, sys
def nfds():
    return len(os.listdir("/proc/self/fd"))
start = nfds()
import numpy, ugem
path, mode, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
imported = nfds()
dev = ugem.connect(path)
handles = []
if mode in ("names", "churn"):
    for name in json.loads(sys.stdin.readline()):
        handle, size = dev.open_name(name)
        handles.append(handle)
else:
    carrier = socket.socket(fileno=int(sys.argv[4]))
    while len(handles) < count:
        _, fds, _, _ = socket.recv_fds(carrier, 1, 253)
        for fd in fds:
            handles.append(dev.import_fd(fd))
            os.close(fd)
    carrier.close()
opened = nfds()
peak = opened
maps = []
for i, h in enumerate(handles):
    m = dev.mmap(h)
    assert struct.unpack_from("<Q", m, 0)[0] == 0x5eed0000 + i, (i, bytes(m[:8]))
    maps.append((i, m))
    if mode == "churn" and i % 2:
        del m, maps[-1]                               # unmapped again at once
        dev.info(h)                                   # (releases are reported with the next request)
    if i % 100 == 0:
        peak = max(peak, nfds())
mapped = nfds()
for i, m in maps:
    struct.pack_into("<Q", m, 8, 0xacced000 + i)
fd_list = [f"{n}->{os.readlink(f'/proc/self/fd/{n}')}" for n in os.listdir("/proc/self/fd")
           if os.path.exists(f"/proc/self/fd/{n}")]
print(json.dumps({"start": start, "imported": imported, "opened": opened, "mapped": mapped,
                  "peak": max(peak, mapped), "handles": len(set(handles)), "maps": len(maps),
                  "fds": fd_list}), flush=True)
sys.stdin.read()                                      # keep everything alive until told to go
dev.close()
"""


@pytest.fixture
def creator(daemon: DaemonProcess) -> Iterator[tuple[ugem.Device, list[int]]]:
    """A client holding COUNT objects, object i tagged 0x5eed0000 + i at offset 0."""
    with daemon.connect() as dev:
        handles = [dev.create(4096) for _ in range(COUNT)]
        for i, h in enumerate(handles):
            dev.pwrite(h, 0, struct.pack("<Q", 0x5eed0000 + i))
        yield dev, handles


def _run_client(daemon: DaemonProcess, mode: str, stdin_line: bytes = b"", pass_fd: int | None = None,
                feed: Any = None) -> tuple[dict[str, Any], subprocess.Popen[bytes]]:
    args = [sys.executable, "-c", CLIENT, daemon.path, mode, str(COUNT)]
    if pass_fd is not None:
        args.append(str(pass_fd))
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            pass_fds=() if pass_fd is None else (pass_fd,))
    assert proc.stdin is not None and proc.stdout is not None
    try:
        if stdin_line:
            proc.stdin.write(stdin_line)
            proc.stdin.flush()
        if feed is not None:
            feed()
        line = proc.stdout.readline()
        assert line, f"client failed (status {proc.wait(timeout=60)})"
        return json.loads(line), proc
    except BaseException:
        proc.kill()
        proc.communicate()
        raise


def _finish(proc: subprocess.Popen[bytes]) -> None:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.close()
    status = proc.wait(timeout=60)
    proc.stdout.close()
    assert status == 0, f"client exited with status {status}"


def _check_report(report: dict[str, Any], baseline_extra: int = 0) -> None:
    fds = report["fds"]
    assert report["handles"] == COUNT
    assert report["maps"] in (COUNT, COUNT // 2)
    # ugem's share of the process's fds: what connecting and opening 2,000 objects added
    assert report["opened"] - report["start"] <= FD_BUDGET, fds
    assert report["mapped"] - report["start"] <= FD_BUDGET, fds
    assert report["peak"] - report["start"] <= FD_BUDGET, fds
    # and the whole process (stdio, the listdir fd, a carrier socket) stays within the budget too
    assert report["mapped"] <= FD_BUDGET + baseline_extra, fds


def _check_replies(dev: ugem.Device, handles: list[int], step: int = 1) -> None:
    for i in range(0, COUNT, step):
        got = struct.unpack("<Q", dev.pread(handles[i], 8, 8))[0]
        assert got == 0xacced000 + i, f"object {i}: the subprocess's write through its mapping is missing"


def test_open_name_2000_objects_few_fds(daemon: DaemonProcess, creator: tuple[ugem.Device, list[int]]) -> None:
    dev, handles = creator
    names = [dev.flink(h) for h in handles]
    report, proc = _run_client(daemon, "names", json.dumps(names).encode() + b"\n")
    try:
        _check_report(report)
        assert dev.stats()["objects"] == COUNT  # new handles to the same objects, nothing copied
        _check_replies(dev, handles)
    finally:
        _finish(proc)


def test_import_fd_2000_objects_few_fds(daemon: DaemonProcess, creator: tuple[ugem.Device, list[int]]) -> None:
    dev, handles = creator
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        def feed() -> None:
            theirs.close()
            for first in range(0, COUNT, 200):
                fds = [dev.export(h) for h in handles[first:first + 200]]
                try:
                    socket.send_fds(ours, [b"x"], fds)
                finally:
                    for fd in fds:
                        os.close(fd)

        report, proc = _run_client(daemon, "import", pass_fd=theirs.fileno(), feed=feed)
        try:
            _check_report(report)
            assert dev.stats()["objects"] == COUNT  # imports found the same objects
            _check_replies(dev, handles)
        finally:
            _finish(proc)


def test_map_unmap_churn_leaks_no_fds(daemon: DaemonProcess, creator: tuple[ugem.Device, list[int]]) -> None:
    dev, handles = creator
    names = [dev.flink(h) for h in handles]
    report, proc = _run_client(daemon, "churn", json.dumps(names).encode() + b"\n")
    try:
        _check_report(report)
        _check_replies(dev, handles, step=2)
        clients = {c["pid"]: c for c in dev.stats()["per_client"]}
        assert clients[proc.pid]["objects"] == COUNT
    finally:
        _finish(proc)


def test_daemon_fds_do_not_grow_per_handle(daemon: DaemonProcess, creator: tuple[ugem.Device, list[int]]) -> None:
    """The daemon's side of the same story: more handles and mappings of one object add no fd."""
    dev, handles = creator
    before = daemon.fd_count()
    with daemon.connect() as other:
        name = dev.flink(handles[0])
        mine = [other.open_name(name)[0] for _ in range(500)]
        maps = [other.mmap(h) for h in mine]
        # only the new client's socket; the fd of the last mmap reply is closed just after it
        # is sent, and the client may run (and count) before the daemon gets to that close
        wait_until(lambda: daemon.fd_count() == before + 1, 5, what=f"daemon fd count == {before + 1}")
        assert all(bytes(m[:8]) == struct.pack("<Q", 0x5eed0000) for m in maps)
        del maps
    wait_until(lambda: daemon.fd_count() == before, 5, what=f"daemon fd count == {before}")
