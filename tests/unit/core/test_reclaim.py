"""The reclaim engine (core/reclaim.py) driven alone: a Core on a FakeBackingStore and a
FakeGpu, with no Manager, daemon, memfd or fd (and Memory with no Core at all). Each
pass in order, the working set kept (spill ping-pong), execbuffer's restores not spilling
each other (livelock), fd-limit reclaim, waiting on a fence, suspend, and make_room's
all-or-nothing rule (hypothesis)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ugem.config import Config
from ugem.constants import DONTNEED, PAGE_SIZE
from ugem.core.client import Client, Credentials
from ugem.core.core import Core
from ugem.core.jobs import Pending
from ugem.core.memory import Memory
from ugem.core.object import BufferObject, Kind
from ugem.core.reclaim import Pass, ReclaimCtx, Unit, purgeable, spare, spillable
from ugem.core.states import Event, Placement
from ugem.errors import NoSpace, OutOfMemory
from ugem.testing import FakeGpu
from ugem.testing.fake_backing import FakeBackingStore

P = PAGE_SIZE


def make_core(budget: int, *, max_open: int = 1 << 20, paused: bool = False) -> Core:
    config = Config.from_kwargs(system_budget=budget, spill_dir="/nonexistent/ugem-unit-spill")
    return Core(config, FakeBackingStore(max_open=max_open), FakeGpu(paused=paused))


@pytest.fixture
def core() -> Iterator[Core]:
    yield make_core(16 * P)


def client_of(core: Core) -> Client:
    return core.client_open(Credentials(1, 1000, 1000), privileged=True)


def new(core: Core, client: Client, pages: int, *, dontneed: bool = False) -> BufferObject:
    """A published object whose `pages` pages all hold data."""
    obj = core.object_new(client, pages * P)
    core.handle_create(client, obj)
    core.populate(obj)
    core.backing.write(obj.backing, 0, b"\x01" * (pages * P))
    core.memory.measure(obj)
    if dontneed:
        core.memory.madvise(obj, DONTNEED)
    return obj


def run_jobs(core: Core, pending: Pending) -> None:
    for job in pending.jobs:
        if not job.done:
            job.run()
            core.memory.finish(job)


def until_done(core: Core, step: object) -> None:
    """Run `step` again after each wait (jobs run inline, the device released)."""
    assert callable(step)
    while True:
        try:
            step()
            return
        except Pending as pending:
            run_jobs(core, pending)
            backend = core.gpu.backend
            assert isinstance(backend, FakeGpu)
            backend.release()


def test_passes_run_in_order_purge_then_spare_then_spill(core):
    client = client_of(core)
    old = new(core, client, 2)  # least recently used: but spilled last
    vram = new(core, client, 2)
    core.gpu.make_resident([vram])  # its system pages are now a spare copy
    junk = new(core, client, 2, dontneed=True)
    assert [purgeable(junk), spare(vram, core.gpu.busy), spillable(old, core.gpu.busy)] == [True, True, True]
    ctx = core.memory.reclaim(ReclaimCtx(2 * P))
    assert (ctx.purged, ctx.spared, ctx.jobs) == (1, 0, [])  # enough after the purge pass
    ctx = core.memory.reclaim(ReclaimCtx(4 * P))
    assert (ctx.purged, ctx.spared, [j.obj for j in ctx.jobs]) == (0, 1, [old])
    assert ctx.remaining <= 0 and ctx.spill_bytes == 2 * P
    run_jobs(core, Pending(ctx.jobs))
    assert junk.placement == Placement.PURGED and vram.backing is None and old.placement == Placement.SPILLED
    assert core.memory.totals.stats() == {"purged_total": 1, "evicted_total": 0, "spilled_total": 1,
                                          "restored_total": 0, "bytes_moved_total": 4 * P}  # the copy in, the spill


def test_a_pass_walks_oldest_first_and_does_not_reorder_what_it_refuses(core):
    client = client_of(core)
    objs = [new(core, client, 1, dontneed=i % 2 == 1) for i in range(6)]
    ctx = core.memory.reclaim(ReclaimCtx(2 * P, passes=(Pass.PURGE,)))
    assert ctx.purged == 2 and objs[5].placement == Placement.SYSTEM  # 1 and 3, not 5
    assert list(core.memory.lru) == [objs[0], objs[2], objs[4], objs[5]]


def test_make_room_keeps_the_working_set_so_spills_cannot_ping_pong(core):
    client = client_of(core)
    working = [new(core, client, 6), new(core, client, 6)]  # oldest: first choice but for keep
    other = new(core, client, 4)
    with pytest.raises(Pending) as waiting:
        core.memory.make_room(4 * P, keep=working)
    assert [j.obj for j in waiting.value.jobs] == [other]
    run_jobs(core, waiting.value)
    core.memory.make_room(4 * P, keep=working)  # fits now
    with pytest.raises(OutOfMemory, match="cannot free 4096 bytes under the system budget"):
        core.memory.make_room(5 * P, keep=working)
    assert all(o.placement == Placement.SYSTEM for o in working)


def test_execbuffer_restores_do_not_spill_each_other(core):
    """The livelock: restoring one member of a working set must not spill another."""
    client = client_of(core)
    a, b = new(core, client, 6), new(core, client, 6)
    for obj in (a, b):
        run_jobs(core, Pending([core.memory.plan_spill(obj)]))
    filler = new(core, client, 8)
    for obj in (a, b):  # as gem_execbuffer does, for each object of the set
        until_done(core, lambda obj=obj: core.memory.ensure_system(obj, keep=[a, b]))
    assert a.placement == b.placement == Placement.SYSTEM and filler.placement == Placement.SPILLED


def test_fd_limit_purges_then_spills_then_fails_naming_the_limit():
    core = make_core(1 << 30, max_open=3)
    client = client_of(core)
    idle, junk, pinned = new(core, client, 1), new(core, client, 1, dontneed=True), new(core, client, 1)
    core.pin(client, pinned)
    core.memory.make_fd_room()  # the DONTNEED object goes at once
    assert junk.placement == Placement.PURGED and core.backing.open_count == 2
    new(core, client, 1)
    with pytest.raises(Pending) as waiting:
        core.memory.make_fd_room()
    assert [j.obj for j in waiting.value.jobs] == [idle]
    run_jobs(core, waiting.value)
    assert core.backing.open_count == 2
    core.memory.make_fd_room(wait=False)  # nothing needed: no change
    new(core, client, 1)
    last = core.objects[max(core.objects)]
    with pytest.raises(OutOfMemory, match="no fd left for object pages: 3 object memfds open, at the limit of 3"):
        core.memory.make_fd_room(keep=[last, *core.memory.lru])
    core.memory.make_fd_room(keep=list(core.memory.lru), wait=False)  # mid-plan: never fails


def test_reclaim_waits_for_the_fence_after_which_busy_objects_free_enough():
    core = make_core(8 * P, paused=True)
    client = client_of(core)
    busy = new(core, client, 6)
    core.gpu.make_resident([busy])  # a copy in, held: its system pages are spare only once it ran
    with pytest.raises(Pending) as waiting:
        core.memory.make_room(4 * P)
    assert waiting.value.fence == busy.last_fence and not waiting.value.jobs
    assert busy.backing is not None and core.memory.resident == 6 * P  # nothing changed for the wait
    backend = core.gpu.backend
    assert isinstance(backend, FakeGpu)
    backend.release()
    core.memory.make_room(4 * P)  # the spare copy goes
    assert busy.backing is None and core.memory.resident == 0


def test_suspend_evicts_everything_then_spills_under_the_budget():
    core = make_core(8 * P)
    client = client_of(core)
    objs = [new(core, client, 4) for _ in range(3)]
    for obj in objs:
        core.gpu.make_resident([obj])
        core.memory.drop_spare(obj)  # only the VRAM copy is left: suspend must copy it back
    core.gpu.lru.discard(objs[0])
    core.pin(client, objs[0])  # pinned objects are saved too
    until_done(core, core.gpu.suspend)
    assert core.gpu.suspended and core.gpu.vram_bytes == 0
    assert core.memory.totals.evicted == 3 and core.memory.resident <= core.memory.budget
    assert sorted(o.placement.label for o in objs).count("spilled") >= 1


def test_check_capacity_names_what_is_short():
    core = make_core(4 * P)
    client = client_of(core)
    core.pin(client, new(core, client, 6))  # over the budget, and nothing can be spilled
    with pytest.raises(OutOfMemory, match="3 pages|would have to be spilled but only 4096 can be"):
        core.memory.check_capacity(P)
    backing = core.backing
    assert isinstance(backing, FakeBackingStore)
    backing.spill_capacity = 0
    with pytest.raises(NoSpace, match="12288 to spill but 0 free for spill storage"):
        core.memory.check_capacity(P)


def test_a_spill_storage_without_room_is_a_failed_spill_then_enomem():
    core = make_core(4 * P)
    backing = core.backing
    assert isinstance(backing, FakeBackingStore)
    backing.spill_capacity = P
    client = client_of(core)
    obj = new(core, client, 4)
    with pytest.raises(OutOfMemory, match="spilling failed: .*spill storage is full"):
        core.memory.make_room(2 * P)
    assert obj.placement == Placement.SYSTEM and not core.memory.failed  # tried again next time


def test_units_count_objects_for_fds(core):
    client = client_of(core)
    for _ in range(3):
        new(core, client, 2, dontneed=True)
    ctx = core.memory.reclaim(ReclaimCtx(2, Unit.FDS))
    assert ctx.purged == 2 and ctx.purged_bytes == 4 * P and core.backing.open_count == 1


KINDS = ["idle", "dontneed", "pinned", "vram", "dontneed vram"]


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.tuples(st.integers(1, 6), st.sampled_from(KINDS)), min_size=1, max_size=8),
       need=st.integers(0, 24), keep_first=st.booleans())
def test_make_room_fits_after_its_waits_or_fails_changing_nothing(sizes, need, keep_first):
    core = make_core(16 * P)
    client = client_of(core)
    objs = []
    for pages, what in sizes:
        if core.memory.resident + pages * P > 16 * P:
            break
        obj = new(core, client, pages, dontneed=what.startswith("dontneed"))
        if what == "pinned":
            core.pin(client, obj)
        elif what.endswith("vram"):
            core.gpu.make_resident([obj])
        objs.append(obj)
    keep = objs[:1] if keep_first else []
    before = [(o.placement, o.resident) for o in objs]
    try:
        until_done(core, lambda: core.memory.make_room(need * P, keep=keep))
    except OutOfMemory:
        assert [(o.placement, o.resident) for o in objs] == before
        return
    assert core.memory.resident + core.memory.reserved + need * P <= core.memory.budget
    assert all(o.placement != Placement.SPILLED for o in keep)


class Owner:
    """Memory's narrow view of the object layer, faked: no Core at all."""

    def __init__(self, store: FakeBackingStore) -> None:
        self.store = store
        self.charged = 0

    def get(self, obj: BufferObject) -> None:
        obj.refcount += 1

    def put(self, obj: BufferObject) -> None:
        obj.refcount -= 1

    def release_backing(self, obj: BufferObject) -> None:
        self.store.release(obj.backing)
        obj.backing = None

    def charge_resident(self, obj: BufferObject, delta: int) -> None:
        self.charged += delta


def test_memory_and_its_engine_run_without_a_core():
    store = FakeBackingStore()
    owner = Owner(store)
    released: list[BufferObject] = []
    memory = Memory(4 * P, store, FakeGpu(), owner, released.append)
    objs = []
    for i in range(3):
        obj = BufferObject(i + 1, 2 * P, Kind.NORMAL, creator=1, creator_uid=1000)
        obj.backing = store.create(obj.size)
        store.write(obj.backing, 0, b"\x01" * obj.size)
        obj.transition(Event.POPULATE)
        memory.track(obj)
        objs.append(obj)
    objs[1].madvise = DONTNEED
    assert memory.resident == owner.charged == 6 * P
    with pytest.raises(Pending) as waiting:
        memory.make_room(2 * P)  # 4 pages to free: the DONTNEED one, then a spill of the oldest
    assert objs[1].placement == Placement.PURGED and released == [objs[1]]
    assert [j.obj for j in waiting.value.jobs] == [objs[0]]
    run_jobs_of(memory, waiting.value)
    memory.make_room(2 * P)
    assert objs[0].placement == Placement.SPILLED and memory.totals.stats()["spilled_total"] == 1


def run_jobs_of(memory: Memory, pending: Pending) -> None:
    for job in pending.jobs:
        job.run()
        memory.finish(job)
