"""The handle layer (SPEC §2) against a pure Python model, across 3 clients of one manager.

The model keeps, per client, a dict handle -> object id (handles lowest-free from 1), a
manager-wide dict name -> object id (names lowest-free from 1, removed with the object's
last handle), and per object its bytes (a bytearray) and whether it is safe from an
immediate purge by DONTNEED (written, or exported; SPEC §2 madvise). Objects live while
any handle holds them (no mappings are made here). After every step the live-object count
must match ``stats()["objects"]``.

Rules: create, close_handle (real or bogus), pwrite, pread (including zero-length and
out-of-range), flink, open_name (real, vanished or bogus), export + import_fd across
clients (the exported fd is closed at once), madvise (WILLNEED always; DONTNEED only on
objects that cannot be purged at once, so contents stay predictable), and disconnect
(close a client's Device and open a new one in its slot).

Both modes run: embedded (a fresh ``ugem.Manager()`` per example) and daemon (one
``run_daemon()`` per test function, shared by its examples; each example waits for the
previous example's clients to be gone, so it starts from an empty manager).

Seeds: Hypothesis draws a fresh seed per run; a failure prints the shrunk step sequence
and a ``@reproduce_failure`` blob (``print_blob=True``). Replay a whole run with
``pytest --hypothesis-seed=<n>``.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

import ugem
from ugem.testing import run_daemon

PAGE = ugem.PAGE_SIZE
NCLIENTS = 3

clients = st.integers(min_value=0, max_value=NCLIENTS - 1)
picks = st.integers(min_value=0, max_value=1000)
sizes = st.integers(min_value=1, max_value=3 * PAGE)
offsets = st.one_of(st.integers(min_value=0, max_value=3 * PAGE + 8), st.sampled_from([-1]))
lengths = st.one_of(st.integers(min_value=0, max_value=3 * PAGE + 8), st.sampled_from([-1]))
payloads = st.binary(min_size=0, max_size=64)
bogus_flags = st.integers(min_value=0, max_value=4).map(lambda n: n == 0)  # 1 in 5 picks is bogus


def round_up(size: int) -> int:
    return -(-size // PAGE) * PAGE


def lowest_free(used: Any) -> int:
    n = 1
    while n in used:
        n += 1
    return n


def expect_errno(code: int, fn: Callable[..., Any], *args: Any, **kw: Any) -> None:
    with pytest.raises(ugem.UgemError) as info:
        fn(*args, **kw)
    assert info.value.errno == code, f"{fn.__name__}{args}: errno {info.value.errno}, expected {code}"


def wait_stats(dev: ugem.Device, clients_expected: int, objects_expected: int | None = None,
               timeout: float = 10.0) -> dict[str, Any]:
    """Daemon disconnects are processed asynchronously: poll until the sweep is done."""
    deadline = time.monotonic() + timeout
    while True:
        st_ = dev.stats()
        if st_["clients"] == clients_expected and (objects_expected is None or st_["objects"] == objects_expected):
            return st_
        if time.monotonic() > deadline:
            return st_
        time.sleep(0.005)


class ObjModel:
    __slots__ = ("data", "name", "safe")

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)
        self.name = 0
        self.safe = False  # written or exported: DONTNEED will not purge it without pressure


class HandleModel(RuleBasedStateMachine):
    # set by the factory: opens a fresh client (and, embedded, owns a fresh manager)
    start: Callable[[], Callable[[], ugem.Device]]
    stop: Callable[[], None]

    def __init__(self) -> None:
        super().__init__()
        self.devs: list[ugem.Device] = []
        self.handles: list[dict[int, int]] = [{} for _ in range(NCLIENTS)]
        self.names: dict[int, int] = {}
        self.objs: dict[int, ObjModel] = {}
        self.next_id = 1

    # -- setup / teardown -------------------------------------------------------------

    @initialize()
    def open_clients(self) -> None:
        self.open_client = type(self).start()
        for _ in range(NCLIENTS):
            self.devs.append(self.open_client())
        st_ = wait_stats(self.devs[0], NCLIENTS, 0)
        assert st_["clients"] == NCLIENTS and st_["objects"] == 0, st_

    def teardown(self) -> None:
        for dev in self.devs:
            dev.close()
        type(self).stop()

    # -- model helpers ----------------------------------------------------------------

    def pick_handle(self, c: int, pick: int, bogus: bool) -> int:
        hs = sorted(self.handles[c])
        if hs and not bogus:
            return hs[pick % len(hs)]
        return [0, lowest_free(self.handles[c]), max(hs, default=0) + 1 + pick][pick % 3]

    def holders(self, oid: int) -> int:
        return sum(1 for hs in self.handles for o in hs.values() if o == oid)

    def drop_if_dead(self, oid: int) -> None:
        if self.holders(oid) == 0:
            obj = self.objs.pop(oid)
            if obj.name:
                del self.names[obj.name]

    def new_handle(self, c: int, oid: int) -> int:
        h = lowest_free(self.handles[c])
        self.handles[c][h] = oid
        return h

    # -- rules ------------------------------------------------------------------------

    @rule(c=clients, size=sizes)
    def create(self, c: int, size: int) -> None:
        h = self.devs[c].create(size)
        oid, self.next_id = self.next_id, self.next_id + 1
        self.objs[oid] = ObjModel(round_up(size))
        assert h == self.new_handle(c, oid)
        assert self.devs[c].info(h).size == round_up(size)

    @rule(c=clients, pick=picks, bogus=bogus_flags)
    def close_handle(self, c: int, pick: int, bogus: bool) -> None:
        h = self.pick_handle(c, pick, bogus)
        if h not in self.handles[c]:
            expect_errno(errno.EINVAL, self.devs[c].close_handle, h)
            return
        self.devs[c].close_handle(h)
        oid = self.handles[c].pop(h)
        self.drop_if_dead(oid)

    @rule(c=clients, pick=picks, bogus=bogus_flags, offset=offsets, data=payloads)
    def pwrite(self, c: int, pick: int, bogus: bool, offset: int, data: bytes) -> None:
        h = self.pick_handle(c, pick, bogus)
        dev = self.devs[c]
        if offset < 0:
            if data:
                expect_errno(errno.EINVAL, dev.pwrite, h, offset, data)
            return
        if not data:
            dev.pwrite(h, offset, data)  # length 0: no lookup, no error
            return
        if h not in self.handles[c]:
            expect_errno(errno.ENOENT, dev.pwrite, h, offset, data)
            return
        obj = self.objs[self.handles[c][h]]
        if offset + len(data) > len(obj.data):
            expect_errno(errno.EINVAL, dev.pwrite, h, offset, data)
            return
        dev.pwrite(h, offset, data)
        obj.data[offset:offset + len(data)] = data
        obj.safe = True

    @rule(c=clients, pick=picks, bogus=bogus_flags, offset=offsets, length=lengths)
    def pread(self, c: int, pick: int, bogus: bool, offset: int, length: int) -> None:
        h = self.pick_handle(c, pick, bogus)
        dev = self.devs[c]
        if length == 0:
            if offset >= 0:  # length 0: no lookup, no error (a negative offset with it is unspecified)
                assert dev.pread(h, offset, 0) == b""
            return
        if offset < 0 or length < 0:
            expect_errno(errno.EINVAL, dev.pread, h, offset, length)
            return
        if h not in self.handles[c]:
            expect_errno(errno.ENOENT, dev.pread, h, offset, length)
            return
        obj = self.objs[self.handles[c][h]]
        if offset + length > len(obj.data):
            expect_errno(errno.EINVAL, dev.pread, h, offset, length)
            return
        assert dev.pread(h, offset, length) == bytes(obj.data[offset:offset + length])

    @rule(c=clients, pick=picks, bogus=bogus_flags)
    def flink(self, c: int, pick: int, bogus: bool) -> None:
        h = self.pick_handle(c, pick, bogus)
        if h not in self.handles[c]:
            expect_errno(errno.ENOENT, self.devs[c].flink, h)
            return
        obj = self.objs[self.handles[c][h]]
        if not obj.name:
            obj.name = lowest_free(self.names)
            self.names[obj.name] = self.handles[c][h]
        assert self.devs[c].flink(h) == obj.name
        assert self.devs[c].info(h).name == obj.name

    @rule(c=clients, pick=picks, bogus=bogus_flags)
    def open_name(self, c: int, pick: int, bogus: bool) -> None:
        live = sorted(self.names)
        if live and not bogus:
            name = live[pick % len(live)]
        else:  # 0, the lowest unused name (often a vanished one), or far beyond
            name = [0, lowest_free(self.names), max(live, default=0) + 1 + pick][pick % 3]
        if name not in self.names:
            expect_errno(errno.ENOENT, self.devs[c].open_name, name)
            return
        oid = self.names[name]
        h, size = self.devs[c].open_name(name)
        assert (h, size) == (self.new_handle(c, oid), len(self.objs[oid].data))

    @rule(src=clients, dst=clients, pick=picks, bogus=bogus_flags)
    def export_import(self, src: int, dst: int, pick: int, bogus: bool) -> None:
        h = self.pick_handle(src, pick, bogus)
        if h not in self.handles[src]:
            expect_errno(errno.ENOENT, self.devs[src].export, h)
            return
        oid = self.handles[src][h]
        fd = self.devs[src].export(h)
        try:
            self.objs[oid].safe = True
            got = self.devs[dst].import_fd(fd)
        finally:
            os.close(fd)
        held = sorted(k for k, v in self.handles[dst].items() if v == oid)
        expected = held[0] if held else self.new_handle(dst, oid)
        assert got == expected
        assert self.devs[dst].info(got).readonly is False

    @rule(c=clients, pick=picks, bogus=bogus_flags, dontneed=st.booleans())
    def madvise(self, c: int, pick: int, bogus: bool, dontneed: bool) -> None:
        h = self.pick_handle(c, pick, bogus)
        if h not in self.handles[c]:
            expect_errno(errno.ENOENT, self.devs[c].madvise, h, ugem.WILLNEED)
            return
        obj = self.objs[self.handles[c][h]]
        advice = ugem.DONTNEED if dontneed and obj.safe else ugem.WILLNEED
        assert self.devs[c].madvise(h, advice) is True

    @rule(c=clients)
    def disconnect(self, c: int) -> None:
        self.devs[c].close()
        self.devs[c] = self.open_client()
        gone, self.handles[c] = set(self.handles[c].values()), {}
        for oid in gone:
            self.drop_if_dead(oid)
        st_ = wait_stats(self.devs[c], NCLIENTS)
        assert st_["clients"] == NCLIENTS, st_

    # -- invariants -------------------------------------------------------------------

    @invariant()
    def objects_agree(self) -> None:
        if not self.devs:
            return
        st_ = self.devs[0].stats()
        assert st_["objects"] == len(self.objs), (st_["objects"], len(self.objs))
        per = {pc["id"]: pc["objects"] for pc in st_["per_client"]}
        for c, dev in enumerate(self.devs):
            assert per.get(dev.client_id) == len(self.handles[c]), (c, per, self.handles)


# -- the two modes ----------------------------------------------------------------------

EMBEDDED = settings(max_examples=40, stateful_step_count=30, deadline=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow])
DAEMON = settings(max_examples=15, stateful_step_count=30, deadline=None, print_blob=True,
                  suppress_health_check=[HealthCheck.too_slow])


def embedded_machine() -> type[HandleModel]:
    managers: list[ugem.Manager] = []

    def start() -> Callable[[], ugem.Device]:
        managers.append(ugem.Manager())
        return managers[-1].open

    def stop() -> None:
        while managers:
            managers.pop().close()

    return type("EmbeddedHandleModel", (HandleModel,), {"start": staticmethod(start), "stop": staticmethod(stop)})


def daemon_machine(path: str) -> type[HandleModel]:
    def start() -> Callable[[], ugem.Device]:
        return lambda: ugem.connect(path)

    return type("DaemonHandleModel", (HandleModel,), {"start": staticmethod(start), "stop": staticmethod(lambda: None)})


@pytest.fixture(scope="module")
def daemon():
    with run_daemon() as d:
        yield d


def test_model_embedded() -> None:
    run_state_machine_as_test(embedded_machine(), settings=EMBEDDED)


def test_model_daemon(daemon) -> None:
    run_state_machine_as_test(daemon_machine(daemon.path), settings=DAEMON)
