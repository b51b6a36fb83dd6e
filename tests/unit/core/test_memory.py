"""core/memory.py against an embedded manager whose limits a test can shrink: spill
storage that runs out (its range), and reclaim that must wait for device work."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from typing import Any

import pytest

import ugem
from ugem.backing import spill
from ugem.backing.memfd import MemfdStore
from ugem.cmd import Fill
from ugem.config import Config
from ugem.core.call import Call
from ugem.core.client import Client, Credentials
from ugem.core.core import Core
from ugem.core.jobs import Pending
from ugem.core.requests import BY_OP, dispatch
from ugem.fd import OwnedFd
from ugem.testing import FakeGpu
from ugem.testing.data import random_bytes, write_new
from ugem.wire import structs as s
from ugem.wire import structs_domain as sd
from ugem.wire import structs_exec as sx
from ugem.wire.commands import encode_commands
from ugem.wire.frames import Op

MiB = 1 << 20


def test_spill_range_running_out_is_enomem_naming_the_directory_and_loses_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(spill, "_CAPACITY", 2 * MiB)  # each of the two spill files: 4 MiB in all
    with ugem.Manager(system_budget="8M", spill_dir=str(tmp_path)) as manager, manager.open() as dev:
        objects = dict(write_new(dev, MiB, seed=i) for i in range(12))  # 4 MiB spilled: the range is full
        assert dev.stats()["spilled_bytes"] == 4 * MiB
        h = dev.create(MiB)
        before = dev.stats()
        with pytest.raises(ugem.UgemError) as failed:
            dev.pwrite(h, 0, random_bytes(99, MiB))
        assert failed.value.errno == errno.ENOMEM
        assert str(tmp_path) in str(failed.value) and "full" in str(failed.value)
        assert dev.stats()["spilled_bytes"] == before["spilled_bytes"]
        resident = [x for x in objects if dev.info(x).placement == "system"]
        for x in resident[:4]:  # room for the spilled ones to come back
            dev.close_handle(x)
            del objects[x]
        for x, data in objects.items():
            assert dev.pread(x, 0, MiB) == data


# -- reclaim that waits for the device (a FakeGpu holds its work until released) -----


@pytest.fixture
def held(tmp_path: Any) -> Iterator[tuple[Core, Client, FakeGpu]]:
    """A core with a 1 MiB budget on a paused FakeGpu, and one client."""
    gpu = FakeGpu(paused=True)
    spill_dir = str(tmp_path / "spill")
    core = Core(Config.from_kwargs(system_budget="1M", spill_dir=spill_dir), MemfdStore(spill_dir), gpu)
    client = core.client_open(Credentials(os.getpid(), os.getuid(), os.getgid()), privileged=True)
    try:
        yield core, client, gpu
    finally:
        gpu.release()
        core.client_release(client)
        gpu.close()
        core.backing.close()


def _call(core: Core, client: Client, op: Op, req: s.Struct) -> Any:
    return dispatch(core, client, BY_OP[op], req, Call(client, BY_OP[op], req))


def _busy_object(core: Core, client: Client, size: int, caching: int) -> int:
    """An object written with `size` bytes that queued device work (held) still uses."""
    handle = _call(core, client, Op.GEM_CREATE, s.CreateReq(size=size)).handle
    _call(core, client, Op.GEM_PWRITE, s.PwriteReq(handle=handle, length=size, data=b"\x07" * size))
    _call(core, client, Op.GEM_SET_CACHING, sd.CachingReq(handle=handle, level=caching))
    commands = encode_commands([Fill(dst=handle, offset=0, length=8, byte=1)])
    _call(core, client, Op.GEM_EXECBUFFER, sx.ExecbufferReq(data=commands))
    return int(handle)


@pytest.mark.parametrize("caching", [ugem.CACHING_NONE, ugem.CACHING_CACHED])
def test_room_held_by_busy_objects_is_waited_for_then_reclaimed(held, caching):
    # NONE: in VRAM, its system pages a spare copy; CACHED: used in place, spilled later
    core, client, gpu = held
    busy = core.lookup(client, _busy_object(core, client, MiB, caching))
    handle = _call(core, client, Op.GEM_CREATE, s.CreateReq(size=MiB // 2)).handle
    write = s.PwriteReq(handle=handle, length=MiB // 2, data=b"\x09" * (MiB // 2))
    with pytest.raises(Pending) as waiting:
        _call(core, client, Op.GEM_PWRITE, write)
    assert waiting.value.fence == busy.last_fence and not waiting.value.jobs
    assert core.memory.resident == MiB  # nothing was changed for the wait
    gpu.release()
    while True:  # the work is done: the room comes from the busy object (spilled or dropped)
        try:
            _call(core, client, Op.GEM_PWRITE, write)
            break
        except Pending as pending:
            for job in pending.jobs:
                job.run()
                core.memory.finish(job)
    assert core.memory.resident <= MiB


def test_enomem_at_once_when_even_finished_work_would_not_free_enough(held):
    core, client, gpu = held
    _busy_object(core, client, MiB // 2, ugem.CACHING_NONE)  # half the budget, busy
    pinned = _call(core, client, Op.GEM_CREATE, s.CreateReq(size=MiB // 2)).handle
    _call(core, client, Op.GEM_PIN, s.HandleReq(handle=pinned))
    handle = _call(core, client, Op.GEM_CREATE, s.CreateReq(size=MiB)).handle
    with pytest.raises(ugem.UgemError) as failed:
        _call(core, client, Op.GEM_PWRITE, s.PwriteReq(handle=handle, length=MiB, data=bytes(MiB)))
    assert failed.value.errno == errno.ENOMEM
    assert gpu.held  # the work is still held: the request did not wait for it


def test_exported_objects_are_not_measured_before_every_request_while_they_cannot_matter(tmp_path):
    """Sending arrays by reference exports their objects, which stay volatile for good: a request
    must not fstat every one of them while even all of them filled up would fit the budget (this
    was O(N^2) for N arrays sent); once they could matter, they are measured."""
    with ugem.Manager(system_budget="64M", spill_dir=str(tmp_path)) as manager, manager.open() as dev:
        core = manager._core
        assert core is not None
        for _ in range(200):
            os.close(dev.export(dev.create(4096)))
        measured: list[object] = []
        resident_bytes = core.backing.resident_bytes
        core.backing.resident_bytes = lambda backing: measured.append(backing) or resident_bytes(backing)  # type: ignore[method-assign]
        h = dev.create(MiB)
        dev.pwrite(h, 0, b"x" * MiB)
        assert len(measured) <= 2, f"{len(measured)} objects measured for one pwrite"
        big = dev.create(62 * MiB + MiB // 2)  # 1 MiB + 800 KiB exported + this: past the 64 MiB budget
        measured.clear()
        dev.pwrite(big, 0, b"y" * (62 * MiB + MiB // 2))  # ... if the exported objects were full: measure them
        assert len(measured) >= 200
        assert dev.stats()["spilled_total"] == 0  # they were not: it fits


def test_device_files_are_private_descriptions_of_large_objects_and_bounded(tmp_path: Any) -> None:
    store = MemfdStore(str(tmp_path / "spill"))
    small, large = store.create(64 * 1024), store.create(MiB)
    files: list[OwnedFd] = []
    try:
        assert store.device_file(small) is None  # faults cost little: through the mapping
        first = store.device_file(large)
        assert first is not None and store.key(first) == store.key(large) and first.fd != large.fd
        files.append(first)
        while (file := store.device_file(large)) is not None:  # at most a bounded number at once
            files.append(file)
            assert len(files) <= 1000
        assert len(files) == 64
        files.pop().close()  # a copy out that ended makes room for the next one
        again = store.device_file(large)
        assert again is not None
        files.append(again)
    finally:
        for f in files:
            f.close()
        store.release(small)
        store.release(large)
        store.close()
