"""SPEC §7: resident objects each need a memfd, so their number is bounded by the daemon's fd
limit. When fds run short the manager spills least recently used idle objects instead of
failing; only when that cannot help (everything mapped, pinned or exported) does it fail
with ENOMEM, and the message names the fd limit.

The daemon runs under a real RLIMIT_NOFILE of 160 (so 128 object memfds: the store keeps
32 back for connections and its own files); the embedded manager gets the same bound by
setting its store's `max_open`, since lowering the test process's own limit would starve
pytest.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator

import numpy as np
import pytest

import ugem
from ugem.testing import run_daemon

FD_LIMIT = 160
MAX_OPEN = 128  # FD_LIMIT less the store's reserve (32)
COUNT = 300
SIZE = 8192


def payload(i: int) -> bytes:
    return np.full(SIZE // 8, i * 0x0101_0101 + 7, dtype=np.uint64).tobytes()


@pytest.fixture(params=["daemon", "embedded"])
def bounded(request: pytest.FixtureRequest, tmp_path: os.PathLike[str]) -> Iterator[tuple[ugem.Device, object]]:
    if request.param == "daemon":
        with run_daemon(fd_limit=FD_LIMIT, spill_dir=str(tmp_path)) as daemon:
            with daemon.connect() as dev:
                yield dev, daemon
    else:
        manager = ugem.Manager(spill_dir=str(tmp_path))
        manager._core.backing.max_open = MAX_OPEN  # type: ignore[union-attr]
        try:
            with manager.open() as dev:
                yield dev, None
        finally:
            manager.close()


def test_limit_reported(bounded: tuple[ugem.Device, object]) -> None:
    dev, _ = bounded
    assert dev.stats()["memfd_limit"] == MAX_OPEN


def test_short_of_fds_spills_instead_of_failing(bounded: tuple[ugem.Device, object]) -> None:
    dev, daemon = bounded
    handles = [dev.create(SIZE) for _ in range(COUNT)]
    for i, h in enumerate(handles):
        dev.pwrite(h, 0, payload(i))
        assert dev.stats()["memfds"] <= MAX_OPEN
    stats = dev.stats()
    assert stats["spilled_total"] >= COUNT - MAX_OPEN
    assert stats["spilled_bytes"] >= (COUNT - MAX_OPEN) * SIZE
    placements = [dev.info(h).placement for h in handles]
    assert placements[0] == "spilled" and placements[-1] == "system"  # least recently used went first
    for i, h in enumerate(handles):  # every byte back, each restore spilling another
        assert dev.pread(h, 0, SIZE) == payload(i), f"object {i}"
    assert dev.stats()["memfds"] <= MAX_OPEN
    if daemon is not None:
        assert daemon.fd_count() <= FD_LIMIT
    for h in handles:
        dev.close_handle(h)
    assert dev.stats()["memfds"] == 0


def test_enomem_names_the_fd_limit_when_nothing_can_spill(bounded: tuple[ugem.Device, object]) -> None:
    dev, _ = bounded
    handles = [dev.create(SIZE) for _ in range(MAX_OPEN)]
    maps = [dev.mmap(h) for h in handles]  # mapped objects keep their pages: never spilled
    assert dev.stats()["memfds"] == MAX_OPEN
    extra = dev.create(SIZE)
    with pytest.raises(ugem.UgemError) as info:
        dev.pwrite(extra, 0, b"x" * SIZE)
    assert info.value.errno == errno.ENOMEM
    assert "fd" in str(info.value) and "limit" in str(info.value)
    assert dev.info(extra).placement == "none"  # nothing changed
    maps[0].release()
    del maps[0]
    dev.close_handle(handles[0])  # the unmapped object is freed, its memfd closed
    dev.pwrite(extra, 0, payload(1))
    assert dev.pread(extra, 0, SIZE) == payload(1)
    for m in maps:
        m.release()


def test_import_needs_an_fd_too(bounded: tuple[ugem.Device, object]) -> None:
    dev, _ = bounded
    handles = [dev.create(SIZE) for _ in range(MAX_OPEN)]
    for i, h in enumerate(handles):
        dev.pwrite(h, 0, payload(i))
    imported = []
    for i in range(8):  # foreign memfds: each import keeps an fd, so older objects spill
        fd = os.memfd_create("peer", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
        os.pwrite(fd, payload(1000 + i), 0)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        imported.append(dev.import_fd(fd))
        os.close(fd)
    assert dev.stats()["memfds"] <= MAX_OPEN
    for i, h in enumerate(imported):
        assert dev.pread(h, 0, SIZE) == payload(1000 + i)
    for i, h in enumerate(handles):
        assert dev.pread(h, 0, SIZE) == payload(i)
