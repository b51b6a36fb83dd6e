"""Recycling in an embedded manager (core/recycle.py, Memory.close_backing, the reclaim
engine's pool pass): there the clearing runs inline right after the request that freed
the object, descriptions for the client library do not leave the process, and a fork
still makes what is mapped escape. Plus the `recyclable` rules one by one."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pytest

import ugem
from ugem.client.registry import mapping_of
from ugem.core.object import BufferObject, Kind
from ugem.core.reclaim import ALL_PASSES, Pass
from ugem.core.recycle import recyclable

MIB = 1 << 20
SIZE = 4 * MIB


@pytest.fixture
def dev(tmp_path: os.PathLike[str]) -> Iterator[ugem.Device]:
    with ugem.Manager(spill_dir=str(tmp_path), system_budget=256 * MIB) as manager, manager.open() as dev:
        yield dev


def _fill(dev: ugem.Device, size: int = SIZE) -> tuple[int, tuple[int, int]]:
    h = dev.create(size)
    pages = np.frombuffer(dev.mmap(h), dtype=np.uint8)
    pages[:] = 0xCD
    entry = mapping_of(pages)
    assert entry is not None
    del pages
    return h, entry.key


def test_the_next_object_reuses_the_memfd_at_once_and_reads_zeros(dev: ugem.Device) -> None:
    h, key = _fill(dev)
    dev.close_handle(h)
    assert dev.stats()["pooled_memfds"] == 1
    h = dev.create(SIZE)
    pages = np.frombuffer(dev.mmap(h), dtype=np.uint8)
    entry = mapping_of(pages)
    assert entry is not None and entry.key == key and dev.stats()["recycled_total"] == 1
    assert not pages.any()
    del pages


def test_transfers_stay_in_the_process_but_exports_escape(dev: ugem.Device) -> None:
    h, _ = _fill(dev)
    assert dev.pread(h, 0, SIZE) == b"\xcd" * SIZE  # the XFER path, in this process
    dev.close_handle(h)
    assert dev.stats()["pooled_memfds"] == 1
    h, _ = _fill(dev)  # (on the pooled memfd)
    os.close(dev.export(h))
    dev.close_handle(h)
    assert dev.stats()["pooled_memfds"] == 0


def test_a_fork_makes_what_is_mapped_escape(dev: ugem.Device) -> None:
    h, _ = _fill(dev)
    pages = np.frombuffer(dev.mmap(h), dtype=np.uint8)
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    del pages
    dev.close_handle(h)
    assert dev.stats()["pooled_memfds"] == 0


def test_the_pool_goes_first_under_the_budget(tmp_path: os.PathLike[str]) -> None:
    budget = 32 * MIB
    with ugem.Manager(spill_dir=str(tmp_path), system_budget=budget) as manager, manager.open() as dev:
        keep, _ = _fill(dev, 2 * MIB)
        h, _ = _fill(dev, 4 * MIB)
        dev.close_handle(h)
        assert dev.stats()["pooled_bytes"] == 4 * MIB
        big = dev.create(budget - 4 * MIB)
        dev.pwrite(big, 0, b"b" * (budget - 4 * MIB))
        stats = dev.stats()
        assert (stats["pooled_bytes"], stats["spilled_total"], stats["purged_total"]) == (0, 0, 0), stats
        assert dev.info(keep).placement == "system"


def test_the_pool_goes_first_under_the_fd_limit(tmp_path: os.PathLike[str]) -> None:
    with ugem.Manager(spill_dir=str(tmp_path)) as manager, manager.open() as dev:
        store = manager._core.backing  # type: ignore[union-attr]
        handles = [_fill(dev, MIB)[0] for _ in range(3)]
        for h in handles:
            dev.close_handle(h)
        assert dev.stats()["pooled_memfds"] == 3
        store.max_open = store.open_count + 5
        small = [dev.create(4096) for _ in range(5)]
        for h in small:
            dev.pwrite(h, 0, b"s")
        stats = dev.stats()
        assert (stats["memfds"], stats["pooled_memfds"], stats["spilled_total"]) == (5, 0, 0), stats


def test_the_pool_pass_is_first() -> None:
    assert ALL_PASSES[0] is Pass.POOL


def _obj(kind: Kind = Kind.NORMAL) -> BufferObject:
    return BufferObject(1, SIZE, kind, 1, 1000)


@pytest.mark.parametrize("change, expected", [
    (lambda o: None, True),
    (lambda o: setattr(o, "exported", True), False),
    (lambda o: setattr(o, "escaped", True), False),
    (lambda o: setattr(o, "label", "weights"), False),
])
def test_recyclable_rules(change: object, expected: bool) -> None:
    obj = _obj()
    change(obj)  # type: ignore[operator]
    assert recyclable(obj, busy=False) is expected


@pytest.mark.parametrize("kind", [Kind.FOREIGN, Kind.USERPTR])
def test_imported_and_userptr_memory_is_never_recycled(kind: Kind) -> None:
    assert not recyclable(_obj(kind), busy=False)


def test_memory_device_work_still_uses_is_never_recycled() -> None:
    assert not recyclable(_obj(), busy=True)
