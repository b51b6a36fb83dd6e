"""Request handlers for the GPU timeline: execbuffer, busy/wait, suspend/resume.

Same rules as gem.py: one signature ``handler(core, client, req) -> reply``, checks in the
kernel's order, work done through library code (core/gpu.py). A handler that must wait
(for the GPU timeline, a memory job, or a resume) raises Pending and is re-run from the
start once the wait is over; nothing it checked is assumed to still hold. How the CPU and
the GPU see an object (domains, tiling, caching) is gem_domain.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ..cmd import Command, Copy, Fill, SemaphoreWait
from ..constants import PAGE_SIZE, page_align
from ..errors import (
    Busy,
    InvalidArgument,
    IOFailure,
    NoSpace,
    NoSuchObject,
    PermissionDenied,
    TimerExpired,
)
from ..gpu import commands
from ..gpu.base import Execute
from ..wire import structs as s
from ..wire import structs_exec as sx
from ..wire.commands import decode_commands
from .client import Client
from .core import Core
from .jobs import Pending
from .object import BufferObject, Kind
from .states import Placement

if TYPE_CHECKING:
    from .call import Call

__all__ = ["check_fits", "gem_busy", "gem_execbuffer", "gem_wait", "resume", "suspend", "wait_fence"]


def gem_execbuffer(core: Core, client: Client, req: sx.ExecbufferReq) -> sx.FenceReply:
    cmds = decode_commands(bytes(req.data))
    if not cmds:
        raise InvalidArgument("execbuffer needs at least one command")
    seq = _resident(core, client, cmds)
    if seq:
        return sx.FenceReply(fence=seq)
    entries: dict[int, BufferObject] = {}
    for cmd in cmds:  # ENOENT, over the whole list
        for handle in commands.handles(cmd):
            if handle not in entries:
                entries[handle] = core.lookup(client, handle)
    for cmd in cmds:  # EINVAL (validate only reads the objects: no snapshot needed)
        commands.validate(cmd, entries.__getitem__)
    objs = list(dict.fromkeys(entries.values()))  # each object once (two handles may name it)
    for obj in objs:  # EFAULT
        core.check_pages(obj)
    written = {h for cmd in cmds for h in commands.writes(cmd)}
    for handle in written:  # EACCES
        if handle in client.readonly or entries[handle].readonly:
            raise PermissionDenied(f"command writes to read-only handle {handle}")
    gpu = core.gpu
    check_fits(core, objs)  # ENOSPC: the working set can never fit
    if gpu.suspended:
        if core.hold_while_suspended:
            raise Pending(resume=True)
        raise Busy("the device is suspended")
    for obj in objs:  # spilled objects come back first (Pending), never at each other's expense
        core.memory.ensure_system(obj, keep=objs)
    added = _pages_written_in_place(core, cmds, entries)
    if added:  # the device writes host pages of in-place objects: room under the budget first
        core.memory.make_room(sum(added.values()), keep=set(objs))
    gpu.make_resident(objs)
    surfaces = {h: gpu.surface(o) for h, o in entries.items()}
    seq = gpu.submit(Execute(cmds, surfaces))
    written_objs = {id(entries[h]) for h in written}
    for obj in objs:  # pages the work writes (or reads into being) in place: measured once it ran
        if obj.placement != Placement.VRAM:
            core.memory.expect(obj, obj.resident + added.get(obj, 0), seq)
    for cmd in cmds:
        if isinstance(cmd, SemaphoreWait):
            entries[cmd.obj].sem_fence = seq
    for obj in objs:
        obj.last_fence = obj.last_exec = seq
        if id(obj) in written_objs:
            obj.write_fence = seq
            obj.vram_dirty = obj.placement == Placement.VRAM
            if not obj.vram_dirty:  # used in place: the work writes its system pages
                obj.host_fence = seq
    return sx.FenceReply(fence=seq)


def _resident(core: Core, client: Client, cmds: list[Command]) -> int:
    """The common case of a stream of small submissions, Fills and Copies on objects all in
    VRAM already, writable where written: what the general path does for it (every check
    passes, nothing to restore, place or count; the same LRU moves, submission and
    fences), without the general bookkeeping. Returns the fence, or 0 if `cmds` is not
    such a case (nothing was done: the general path takes it, and finds any error)."""
    gpu = core.gpu
    if gpu.suspended:
        return 0
    handles = client.handles
    entries: dict[int, BufferObject] = {}
    written: list[int] = []  # each command's dst
    for cmd in cmds:
        if isinstance(cmd, Fill):
            named: tuple[int, ...] = (cmd.dst,)
        elif isinstance(cmd, Copy):
            named = (cmd.src, cmd.dst)
        else:
            return 0
        written.append(cmd.dst)
        for handle in named:
            if handle not in entries:
                obj = handles.get(handle)
                if obj is None or obj.placement != Placement.VRAM or obj.job is not None or gpu.in_place(obj):
                    return 0
                entries[handle] = obj
    size = _size_of(entries)
    for cmd in cmds:
        if not commands.plainly_valid(cmd, size):
            return 0
    readonly = client.readonly
    for handle in written:
        if handle in readonly or entries[handle].readonly:
            return 0
    touch, lru = core.memory.touch, gpu.lru
    surfaces = {}
    for handle, obj in entries.items():
        touch(obj)
        if not obj.pinned_by:
            lru.move_tail(obj)
        surfaces[handle] = gpu.surface(obj)
    seq = gpu.submit(Execute(cmds, surfaces))
    for obj in entries.values():
        obj.last_fence = obj.last_exec = seq
    for handle in written:
        obj = entries[handle]
        obj.write_fence = seq
        obj.vram_dirty = True
    return seq


def _size_of(entries: dict[int, BufferObject]) -> Callable[[int], int]:
    return lambda handle: entries[handle].size


def _pages_written_in_place(core: Core, cmds: list[Command],
                            entries: dict[int, BufferObject]) -> dict[BufferObject, int]:
    """Bytes of new host pages the commands write into NORMAL objects used in place (CACHED
    or pinned in system memory): each written range's missing pages (a Blit: the object)."""
    ranges: dict[BufferObject, list[tuple[int, int]]] = {}
    for cmd in cmds:
        for handle in commands.writes(cmd):
            obj = entries[handle]
            if obj.kind != Kind.NORMAL or not core.gpu.in_place(obj):
                continue
            if isinstance(cmd, Fill):
                span = (cmd.offset, cmd.length)
            elif isinstance(cmd, Copy):
                span = (cmd.dst_offset, cmd.length)
            else:
                span = (0, obj.size)
            ranges.setdefault(obj, []).append(span)
    added = {}
    for obj, spans in ranges.items():
        if obj.backing is None:  # no pages yet: every page the ranges touch
            need = min(sum(page_align(o + n) - (o - o % PAGE_SIZE) for o, n in spans), obj.size)
        else:
            need = min(sum(core.backing.missing_bytes(obj.backing, o, n) for o, n in spans), obj.size)
        if need > 0:
            added[obj] = need
    return added


def check_fits(core: Core, objs: list[BufferObject]) -> None:
    gpu = core.gpu
    need = sum(o.size for o in objs if not gpu.in_place(o))
    if need + gpu.vram_bytes <= gpu.backend.vram_size:  # pinned objects are a part of vram_bytes
        return
    members = {id(o) for o in objs}
    pinned = sum(n.size * PAGE_SIZE for n in gpu.space  # objects in VRAM only, not every object
                 if n.owner is not None and n.owner.pinned_by and id(n.owner) not in members)
    if need + pinned > gpu.backend.vram_size:
        raise NoSpace(f"working set of {need} bytes (+{pinned} pinned) exceeds {gpu.backend.vram_size} "
                      f"bytes of device memory")


def gem_busy(core: Core, client: Client, req: s.HandleReq) -> sx.BusyReply:
    obj = core.lookup(client, req.handle)
    return sx.BusyReply(1 if core.gpu.busy(obj) else 0)  # (LAYOUT: busy, pad)


def _wait(core: Core, fence: int, exec_fence: int, timeout_ns: int, started: float) -> sx.WaitReply:
    """Kernel timeout semantics: <0 forever (returned unchanged), 0 polls, >0 time left."""
    elapsed_ns = int((core.clock() - started) * 1e9)
    if fence <= core.gpu.completed():
        if exec_fence and core.gpu.backend.error(exec_fence):
            raise IOFailure(f"the work (fence {exec_fence}) was cancelled as hung")
        return sx.WaitReply(remaining_ns=timeout_ns if timeout_ns <= 0 else max(0, timeout_ns - elapsed_ns))
    if timeout_ns == 0 or (timeout_ns > 0 and elapsed_ns >= timeout_ns):
        raise TimerExpired(f"fence {fence} still pending after {max(timeout_ns, 0)} ns")
    deadline = None if timeout_ns < 0 else started + timeout_ns / 1e9
    raise Pending(fence=fence, deadline=deadline)


def gem_wait(core: Core, call: Call, req: sx.WaitReq) -> sx.WaitReply:
    obj = core.lookup(call.client, req.handle)
    if call.started is None:
        call.started = core.clock()
    return _wait(core, obj.last_fence, obj.last_exec, req.timeout_ns, call.started)


def wait_fence(core: Core, call: Call, req: sx.WaitFenceReq) -> sx.WaitReply:
    if req.fence <= 0 or req.fence > core.gpu.last_seq:
        raise NoSuchObject(f"fence {req.fence} was never issued")
    if call.started is None:
        call.started = core.clock()
    return _wait(core, req.fence, req.fence, req.timeout_ns, call.started)


def suspend(core: Core, client: Client, req: s.Empty) -> s.Empty:
    """Suspend and resume take effect in the order they arrive. A suspend waits (for
    device work, copies, spills) and runs again each time; `client.suspending` holds the
    request with the resume count it began under, so a resume that arrived while it
    waited wins: the suspend then returns without suspending again (device running)."""
    gpu = core.gpu
    began = client.suspending
    if began is not None and began[0] is req and began[1] != gpu.resumes:
        client.suspending = None
        return s.Empty()
    client.suspending = (req, gpu.resumes if began is None or began[0] is not req else began[1])
    try:
        gpu.suspend()
    except Pending:
        raise  # the same suspend runs again once the wait is over
    except BaseException:
        client.suspending = None
        raise
    client.suspending = None
    return s.Empty()


def resume(core: Core, client: Client, req: s.Empty) -> s.Empty:
    core.gpu.resume()
    return s.Empty()
