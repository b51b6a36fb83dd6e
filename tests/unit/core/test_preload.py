"""core/preload.py: preloaded objects on a real core and real memfds, their LOAD jobs run
by hand (as the daemon's workers would): `lookup` waits (Pending) while a file loads, a
copy that fails makes the label EIO, a cancelled copy stops, the manager's own handle keeps
the name until `release`."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from typing import Any

import pytest

import ugem
from ugem.backing.memfd import MemfdStore
from ugem.config import Config
from ugem.core.call import Call
from ugem.core.client import Client, Credentials
from ugem.core.core import Core
from ugem.core.jobs import Job, JobKind, Pending
from ugem.core.requests import BY_OP, dispatch
from ugem.testing import FakeGpu
from ugem.testing.data import random_bytes
from ugem.wire import structs as s
from ugem.wire.frames import Op
from ugem.wire.structs_preload import LookupReq

MiB = 1 << 20


@pytest.fixture
def made(tmp_path: Any) -> Iterator[tuple[Core, Client, str, bytes]]:
    """A core preloading one 1 MiB + 10 byte file as "w" (copy planned, not run), one client."""
    data = random_bytes(1, MiB + 10)
    path = str(tmp_path / "w.bin")
    with open(path, "wb") as f:
        f.write(data)
    spill_dir = str(tmp_path / "spill")
    gpu = FakeGpu()
    config = Config.from_kwargs(system_budget="64M", spill_dir=spill_dir, object=[f"w={path}"])
    core = Core(config, MemfdStore(spill_dir), gpu)
    core.preloads.start(config.object, 4242, os.getuid())
    client = core.client_open(Credentials(os.getpid(), 65534, 65534), privileged=False)
    try:
        yield core, client, path, data
    finally:
        core.preloads.cancel()
        for job in core.memory.take_background():  # not run by the test: end it (closing its fds)
            job.run()
            core.memory.finish(job)
        core.client_release(client)
        core.preloads.release()
        gpu.close()
        core.backing.close()


def _call(core: Core, client: Client, op: Op, req: s.Struct) -> Any:
    return dispatch(core, client, BY_OP[op], req, Call(client, BY_OP[op], req))


def _load_job(core: Core) -> Job:
    (job,) = core.memory.take_background()
    assert job.kind is JobKind.LOAD
    return job


def test_lookup_waits_for_the_copy_then_names_the_object(made: Any) -> None:
    core, client, _path, data = made
    job = _load_job(core)
    with pytest.raises(Pending) as pending:
        _call(core, client, Op.LOOKUP, LookupReq(label=b"w"))
    assert pending.value.jobs == [job]
    assert core.memory.reserved == MiB + 4096  # the file's data in whole pages, until it lands
    job.run()
    core.memory.finish(job)
    assert core.memory.reserved == 0
    name = _call(core, client, Op.LOOKUP, LookupReq(label=b"w")).name
    opened = _call(core, client, Op.GEM_OPEN, s.OpenReq(name=name))  # another uid, unprivileged
    assert opened.size == MiB + 4096 and opened.handle in client.readonly
    tail = _call(core, client, Op.GEM_PREAD, s.PreadReq(handle=opened.handle, offset=MiB - 90, length=100))
    assert bytes(tail.data) == data[-100:]
    assert client.created_bytes == 0 and core.uids[65534].bytes == 0  # charged to nobody
    assert core.statistics()["resident_bytes"] >= MiB
    (row,) = core.list_objects()
    assert row["label"] == "w" and row["owner_pid"] == 4242 and row["handles"] == 2


def test_a_copy_that_fails_makes_the_label_eio(made: Any) -> None:
    core, client, path, _data = made
    job = _load_job(core)
    os.truncate(path, 100)  # the file shrank under the copy: a short read
    job.run()
    core.memory.finish(job)
    with pytest.raises(ugem.UgemError) as failed:
        _call(core, client, Op.LOOKUP, LookupReq(label=b"w"))
    assert failed.value.errno == errno.EIO and "'w'" in str(failed.value)
    assert core.objects == {} and core.names == {} and core.memory.reserved == 0


def test_a_cancelled_copy_stops_and_frees_the_object(made: Any) -> None:
    core, client, _path, _data = made
    job = _load_job(core)
    core.preloads.cancel()
    job.run()
    assert job.error is not None and job.error.errno == errno.ECANCELED
    core.memory.finish(job)
    assert core.objects == {} and core.backing.open_count == 0


def test_the_name_lives_while_clients_come_and_go_until_release(made: Any) -> None:
    core, client, _path, _data = made
    job = _load_job(core)
    job.run()
    core.memory.finish(job)
    name = _call(core, client, Op.LOOKUP, LookupReq(label=b"w")).name
    for _ in range(2):
        handle = _call(core, client, Op.GEM_OPEN, s.OpenReq(name=name)).handle
        _call(core, client, Op.GEM_CLOSE, s.CloseReq(handle=handle))
    assert core.names[name].label == "w"
    with pytest.raises(ugem.UgemError) as unknown:
        _call(core, client, Op.LOOKUP, LookupReq(label=b"x"))
    assert unknown.value.errno == errno.ENOENT and "'x'" in str(unknown.value)
    handle = _call(core, client, Op.GEM_OPEN, s.OpenReq(name=name)).handle
    core.preloads.release()
    assert name in core.names  # a client still holds it
    _call(core, client, Op.GEM_CLOSE, s.CloseReq(handle=handle))
    assert core.objects == {} and name not in core.names
