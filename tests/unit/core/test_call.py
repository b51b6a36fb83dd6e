"""core/call.py alone: the run-until-done loop both transports use (a Core on fakes, no
Manager, daemon or memfd). The state a request keeps while it waits lives in the Call,
not in the wire struct; `ready` decides when to step again; `after_request` is the one
background-reclaim rule of both modes."""

from __future__ import annotations

import gc
import sys

import pytest

from ugem.cmd import Fill
from ugem.config import Config
from ugem.constants import PAGE_SIZE
from ugem.core.call import Call, after_request
from ugem.core.client import Client, Credentials
from ugem.core.core import Core
from ugem.core.jobs import Pending
from ugem.core.requests import BY_OP
from ugem.errors import TimerExpired
from ugem.testing import FakeGpu
from ugem.testing.fake_backing import FakeBackingStore
from ugem.wire import structs as s
from ugem.wire import structs_exec as sx
from ugem.wire.commands import encode_commands
from ugem.wire.frames import Op

P = PAGE_SIZE


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def setup(budget: int = 16 * P, paused: bool = True) -> tuple[Core, Client, FakeGpu, Clock]:
    gpu, clock = FakeGpu(paused=paused), Clock()
    config = Config.from_kwargs(system_budget=budget, spill_dir="/nonexistent/ugem-unit-spill")
    core = Core(config, FakeBackingStore(), gpu, clock=clock)
    return core, core.client_open(Credentials(1, 1000, 1000), privileged=True), gpu, clock


def run(core: Core, client: Client, op: Op, req: s.Struct) -> s.Struct:
    reply = Call(client, BY_OP[op], req).step(core)
    assert reply is not None
    return reply


def fill(handle: int) -> sx.ExecbufferReq:
    return sx.ExecbufferReq(data=encode_commands([Fill(dst=handle, offset=0, length=8, byte=1)]))


def busy_handle(core: Core, client: Client) -> int:
    handle = run(core, client, Op.GEM_CREATE, s.CreateReq(size=P)).handle
    run(core, client, Op.GEM_EXECBUFFER, fill(handle))
    return int(handle)


def test_a_wait_keeps_its_start_in_the_call_and_steps_again_once_ready():
    core, client, gpu, clock = setup()
    handle = busy_handle(core, client)
    req = sx.WaitReq(handle=handle, timeout_ns=5_000_000_000)
    call = Call(client, BY_OP[Op.GEM_WAIT], req)
    assert call.step(core) is None and call.started == 100.0
    pending = call.pending
    assert isinstance(pending, Pending) and pending.fence and pending.deadline == 105.0
    assert not call.ready(core, clock.now)
    clock.now = 101.0
    assert call.step(core) is None and call.started == 100.0  # the first run's clock, not this one
    assert not hasattr(req, "started")  # the wire struct carries no retry state
    gpu.release()
    assert call.ready(core, clock.now)
    reply = call.step(core)
    assert isinstance(reply, sx.WaitReply) and reply.remaining_ns == 4_000_000_000
    assert call.pending is None


def test_an_abandoned_call_lets_go_of_its_last_runs_frames_at_once():
    """A parked call whose client goes away: its Pending (whose traceback holds the frames
    of the run that raised it, and the objects they use) goes with it, by reference
    counting: the daemon freezes long-lived objects, so a cycle would never be collected."""
    core, client, gpu, clock = setup()
    handle = busy_handle(core, client)
    obj = client.handles[handle]
    before = sys.getrefcount(obj)
    gc.disable()
    try:
        call = Call(client, BY_OP[Op.GEM_WAIT], sx.WaitReq(handle=handle, timeout_ns=-1))
        assert call.step(core) is None
        assert sys.getrefcount(obj) > before  # the handler's frame, held by the Pending
        call.abandon()
        assert call.pending is None and sys.getrefcount(obj) == before
    finally:
        gc.enable()


def test_a_wait_past_its_deadline_is_ready_and_then_times_out():
    core, client, gpu, clock = setup()
    call = Call(client, BY_OP[Op.GEM_WAIT], sx.WaitReq(handle=busy_handle(core, client), timeout_ns=1_000_000))
    assert call.step(core) is None
    clock.now += 1.0
    assert call.ready(core, clock.now)
    with pytest.raises(TimerExpired):
        call.step(core)


def test_a_request_waiting_for_a_resume_is_ready_only_once_resumed():
    core, client, gpu, clock = setup(paused=False)
    core.hold_while_suspended = True
    handle = run(core, client, Op.GEM_CREATE, s.CreateReq(size=P)).handle
    run(core, client, Op.SUSPEND, s.Empty())
    call = Call(client, BY_OP[Op.GEM_EXECBUFFER], fill(handle))
    assert call.step(core) is None and call.pending is not None and call.pending.resume
    assert not call.ready(core, clock.now)
    run(core, client, Op.RESUME, s.Empty())
    assert call.ready(core, clock.now) and isinstance(call.step(core), sx.FenceReply)


def test_embedded_pread_fills_the_callers_buffer_given_to_the_call():
    core, client, gpu, clock = setup(paused=False)
    handle = run(core, client, Op.GEM_CREATE, s.CreateReq(size=P)).handle
    run(core, client, Op.GEM_PWRITE, s.PwriteReq(handle=handle, length=4, data=b"abcd"))
    into = bytearray(4)
    reply = Call(client, BY_OP[Op.GEM_PREAD], s.PreadReq(handle=handle, length=4), into=into).step(core)
    assert isinstance(reply, s.PreadReply) and reply.data is into and into == b"abcd"


def test_after_request_shrinks_over_the_budget_only_with_no_spill_in_flight():
    core, client, gpu, clock = setup(budget=2 * P, paused=False)

    def written() -> object:
        obj = core.object_new(client, 2 * P)
        core.handle_create(client, obj)
        core.populate(obj)
        core.backing.write(obj.backing, 0, b"\x01" * (2 * P))
        core.memory.measure(obj)
        return obj

    first, second = written(), written()  # over the budget, as evictions may leave it
    in_flight = core.memory.plan_spill(second)
    assert in_flight is not None
    assert after_request(core.memory) == []  # a spill in flight is already bringing resident down
    in_flight.run()
    core.memory.finish(in_flight)
    assert after_request(core.memory) == []  # at the budget
    written()
    assert [j.obj for j in after_request(core.memory)] == [first]  # the least recently used
