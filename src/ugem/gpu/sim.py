"""SimGpu: the simulated GPU (SPEC §3 "vram", "device commands"), a `GpuBackend`.

Device memory is one anonymous shared mapping of `vram_size` bytes. The kernel backs it
lazily (a 1 GiB device costs nothing until its pages are touched) and MAP_NORESERVE keeps
the heuristic overcommit check from charging all of it up front.

The timeline is one worker thread that runs ops strictly in submission order:
- `submit()` validates the op (a range outside device memory, a short or read-only host
  buffer is a core bug and raises ValueError at the call site), then takes the next seqno and
  queues the op under one lock, so queue order is seqno order. It never waits for the device.
  A short command list (`_quick`: at most 16 Fills and Copies writing 64 KiB in all) submitted
  while every earlier op has completed runs at once on the submitter's thread, still under
  that lock and so still in seqno order: handing it to the worker would cost a thread wakeup
  and GIL hand-offs per submission (execbuffer of small Fills through the daemon spent more
  time there than in its own request). Its notify callback is then called on that thread.
  When all its surfaces are in device memory and every command passes the plain checks
  (`commands.plainly_valid`), it runs straight on one array over device memory (`_direct`:
  a slice fill or copy per command, no views or targets to build); else as any other op.
- CopyIn / CopyOut copy between a host buffer and a slice of device memory (gpu/copies.py:
  a large one in parts on copy threads that the op joins before it completes),
  leaving the host's holes unread (CopyIn clears them in device memory) and unwritten where
  device memory holds a page of zeros (CopyOut checks each such page first). A copy that
  carries the host memory's `file` goes through it with preadv / pwritev (no page faults);
  the worker closes that file once the op has run or failed, submit() if it refuses the op.
  Execute gives
  each handle a `Target`: VRAM surfaces become memoryview slices of device memory, host
  surfaces (CACHED, userptr, pinned in system memory) are used in place. Its commands run
  one by one through `commands.execute`.
- Hang detection: an Execute still running `hang_timeout` seconds after it started is
  cancelled: the `cancelled` callback handed to `commands.execute` turns True (a running
  SemaphoreWait or Blit raises `Hung`) and no further command of it starts. Its seqno completes with
  EIO and the timeline goes on. Writes its earlier commands made stay, as on hardware.
- Any other exception inside an op is logged with its traceback and completes that seqno
  with EIO too: the worker never dies.
- Completion: the completed seqno is raised under a Condition (waiters wake), then the
  notify callback runs on the worker thread, outside the lock; its exceptions are logged.
  Failed seqnos stay in a set forever, so `error()` answers for any completed seqno with
  memory O(failures).

close() stops accepting work and lets the worker finish what is queued: copies and commands
still run, so data queued for eviction lands, but every SemaphoreWait that is not already
satisfied, running or queued, is cancelled at once as hung (EIO). A wait for a CPU write that
will never come must not hold shutdown for `hang_timeout` per op. Then the thread is joined
and device memory unmapped. close() is idempotent and must not be called from the notify
callback (the worker cannot join itself).

Rules: every memoryview taken on device memory or on a host buffer is released before the op
completes (and the frames of a failed command are cleared, so a traceback cannot pin one),
so the core may unmap a host buffer once its seqno completed and close() can unmap device
memory; the worker drops its reference to the op when done.
Must not: touch the core, block in submit(), let an exception escape the worker.
"""

from __future__ import annotations

import errno
import logging
import mmap
import platform
import queue
import threading
import time
import traceback
from collections.abc import Callable
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ..cmd import Copy, Fill, SemaphoreWait
from .base import CopyIn, CopyOut, Execute, GpuBackend, GpuOp, Holes, Surface, discard
from .commands import Hung, Target, execute, plainly_valid
from .copies import copy, host_view

__all__ = ["SimGpu", "check_op", "run_op"]

log = logging.getLogger("ugem.device")  # the name users filter logs on (and the thread's, ugem-device): kept

# Python's mmap module does not export MAP_NORESERVE everywhere; 0x4000 is its value on the
# common Linux ABIs (x86, arm, riscv). Elsewhere we go without (only the accounting differs).
_NORESERVE: int = getattr(mmap, "MAP_NORESERVE", 0x4000 if platform.machine() in
                          {"x86_64", "i386", "i686", "aarch64", "armv7l", "riscv64"} else 0)


# --- validation (caller's thread) and the body of one timeline step (worker's thread) ---

def _host_bytes(buffer: Any, *, writable: bool) -> int:
    """Size in bytes of a host buffer; ValueError if it cannot be written and must be."""
    with memoryview(buffer) as view:
        if writable and view.readonly:
            raise ValueError("host buffer is read-only")
        if not view.c_contiguous:
            raise ValueError("host buffer is not contiguous")
        return view.nbytes


def _check_range(offset: int, length: int, vram_size: int) -> None:
    if offset < 0 or length < 0 or offset + length > vram_size:
        raise ValueError(f"range [{offset}, +{length}) outside device memory of {vram_size} bytes")


def _check_surface(handle: int, surface: Surface, vram_size: int) -> None:
    if (surface.vram is None) == (surface.host is None):
        raise ValueError(f"surface of handle {handle}: exactly one of vram / host must be set")
    if surface.vram is not None:
        _check_range(surface.vram, surface.size, vram_size)
    # Not required writable: a read-only userptr may be a source (a write to it fails the op).
    elif _host_bytes(surface.host, writable=False) < surface.size:
        raise ValueError(f"surface of handle {handle}: host buffer shorter than {surface.size} bytes")


def _check_holes(holes: Holes, length: int) -> None:
    end = 0
    for offset, size in holes:
        if offset < end or size <= 0 or offset + size > length:
            raise ValueError(f"holes {holes!r} are not sorted, disjoint, nonempty ranges inside {length} bytes")
        end = offset + size


def check_op(op: GpuOp, vram_size: int) -> None:
    """Raise ValueError (TypeError for a non-op) if `op` could not run on this device."""
    if isinstance(op, CopyIn | CopyOut):
        _check_range(op.vram, op.length, vram_size)
        _check_holes(op.holes, op.length)
        if isinstance(op, CopyIn) and op.host is None:
            return  # clears the range
        if _host_bytes(op.host, writable=isinstance(op, CopyOut)) < op.length:
            raise ValueError(f"host buffer shorter than {op.length} bytes")
    elif isinstance(op, Execute):
        for handle, surface in op.surfaces.items():
            _check_surface(handle, surface, vram_size)
    else:
        raise TypeError(f"not a device op: {op!r}")


def _target(views: ExitStack, memory: memoryview, surface: Surface) -> Target:
    if surface.vram is not None:
        buf = views.enter_context(memory[surface.vram:surface.vram + surface.size])
    else:
        buf = views.enter_context(host_view(surface.host, surface.size))
    return Target(buf=buf, tiling=surface.tiling, stride=surface.stride)


def _never() -> bool:
    return False


def _execute(memory: memoryview, op: Execute, deadline: float | None, abandon_waits: Callable[[], bool]) -> None:
    def expired() -> bool:
        return deadline is not None and time.monotonic() >= deadline

    def wait_cancelled() -> bool:
        return abandon_waits() or expired()

    with ExitStack() as views:
        targets = {handle: _target(views, memory, s) for handle, s in op.surfaces.items()}
        try:
            for command in op.commands:
                if expired():
                    raise Hung(f"command list still running at its deadline, before {command!r}")
                cancelled = wait_cancelled if isinstance(command, SemaphoreWait) else expired
                execute(command, targets, cancelled=cancelled)
        except BaseException as exc:
            # The frames of commands.execute hold numpy arrays over our views, and those keep
            # the underlying buffer exported even after the views are released: a traceback
            # kept by a log handler would stop the core unmapping a host buffer, and close()
            # unmapping device memory. Clear them (frames in flight are left alone).
            traceback.clear_frames(exc.__traceback__)
            raise
        finally:
            targets.clear()


def run_op(
    memory: memoryview, op: GpuOp, *, deadline: float | None = None, abandon_waits: Callable[[], bool] = _never
) -> None:
    """Carry out one checked op against `memory` (device memory as a flat byte view).

    An Execute is cancelled (`Hung`) once `deadline` (time.monotonic()) has passed: no further
    command starts and a running SemaphoreWait or Blit stops. A SemaphoreWait not satisfied
    when `abandon_waits()` is True is cancelled too (close(); the fake device's instant hang).
    """
    if isinstance(op, CopyIn | CopyOut):
        copy(memory, op)
    else:
        _execute(memory, op, deadline, abandon_waits)


_QUICK_BYTES = 64 << 10  # a command list writing at most this much may run on the submitter's thread


def _quick(op: GpuOp) -> bool:
    """A short Execute of Fills and Copies (nothing that waits or runs long): cheaper to run
    at once than to hand to the worker (a thread wakeup and GIL hand-offs per submission)."""
    if not isinstance(op, Execute) or len(op.commands) > 16:
        return False
    total = 0
    for command in op.commands:
        if not isinstance(command, Fill | Copy):
            return False
        total += command.length
    return total <= _QUICK_BYTES


def _direct(device: npt.NDArray[np.uint8], op: GpuOp) -> bool:
    """Run a short Execute (`_quick`) whose surfaces are all in device memory and whose
    commands all pass the plain checks, straight on `device`; False (nothing done) if not one."""
    if not isinstance(op, Execute):
        return False
    surfaces = op.surfaces
    base: dict[int, int] = {}  # handle -> its surface's offset in device memory
    for handle, surface in surfaces.items():
        if surface.vram is None:
            return False
        base[handle] = surface.vram

    def size(handle: int) -> int:  # (a handle without a surface fails the checks)
        surface = surfaces.get(handle)
        return -1 if surface is None else surface.size
    commands = op.commands
    for command in commands:
        if not plainly_valid(command, size):
            return False
    for command in commands:
        if isinstance(command, Fill):
            start = base[command.dst] + command.offset
            device[start:start + command.length].fill(command.byte)
        elif isinstance(command, Copy):  # (np.copyto copies overlapping memory through a temporary: memmove)
            src = base[command.src] + command.src_offset
            dst = base[command.dst] + command.dst_offset
            np.copyto(device[dst:dst + command.length], device[src:src + command.length])
    return True


_STOP = None  # queued by close(): the worker exits after everything queued before it


class TimelineQueries:
    """What every GPU backend answers the same way from its completion state (shared by
    SimGpu and ugem.testing.FakeGpu): completed, error, wait, notify, read_vram."""

    _completed: int
    _failed: set[int]
    _cond: threading.Condition
    _closed: bool
    _notify: Callable[[int], None] | None
    _mem: Any
    _vram_size: int

    def completed(self) -> int:
        return self._completed

    def error(self, seqno: int) -> int | None:
        with self._cond:
            return errno.EIO if seqno in self._failed else None

    def wait(self, seqno: int, timeout: float | None) -> bool:
        # After close() every issued seqno has completed; a never-issued one never will.
        with self._cond:
            self._cond.wait_for(lambda: self._completed >= seqno or self._closed, timeout)
            return self._completed >= seqno

    def set_notify(self, callback: Callable[[int], None] | None) -> None:
        self._notify = callback

    def read_vram(self, offset: int, length: int) -> bytes:
        _check_range(offset, length, self._vram_size)
        if self._closed:
            raise ValueError(f"read_vram() on a closed {type(self).__name__}")
        return bytes(self._mem[offset:offset + length])


class SimGpu(TimelineQueries):
    """The simulated GPU: lazily backed device memory and a one-thread timeline."""

    def __init__(self, vram_size: int = 1 << 30, hang_timeout: float = 10.0) -> None:
        if vram_size <= 0 or hang_timeout <= 0:
            raise ValueError("vram_size and hang_timeout must be positive")
        self._vram_size = vram_size
        self._hang_timeout = hang_timeout
        self._mem = mmap.mmap(-1, vram_size, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS | _NORESERVE)
        self._memory = memoryview(self._mem)  # the worker's view; released by close()
        self._device: Any = np.frombuffer(self._memory, np.uint8)  # `_direct`'s; dropped by close()
        self._queue: queue.SimpleQueue[tuple[int, GpuOp] | None] = queue.SimpleQueue()
        self._submit_lock = threading.Lock()  # seqno order == queue order
        self._issued = 0
        self._closing = False  # read by the worker (abandon_waits) without a lock: a plain bool flip
        self._close_lock = threading.Lock()
        self._closed = False
        self._cond = threading.Condition()  # guards _completed and _failed; wakes waiters
        self._completed = 0
        self._failed: set[int] = set()
        self._notify: Callable[[int], None] | None = None
        self._thread = threading.Thread(target=self._run, name="ugem-device", daemon=True)
        self._thread.start()

    # --- GpuBackend ---

    @property
    def vram_size(self) -> int:
        return self._vram_size

    @property
    def hang_timeout(self) -> float:
        return self._hang_timeout

    def submit(self, op: GpuOp) -> int:
        try:
            check_op(op, self._vram_size)
        except BaseException:
            discard(op)
            raise
        with self._submit_lock:
            if self._closing:
                discard(op)
                raise RuntimeError("submit() on a closed SimGpu")
            self._issued += 1
            seqno = self._issued
            if not (self._completed == seqno - 1 and _quick(op)):
                self._queue.put((seqno, op))  # SimpleQueue.put never blocks
                return seqno
            # idle timeline: run it here, in order
            self._mark(seqno, False if _direct(self._device, op) else self._run_one(seqno, op))
        self._call_notify(seqno)  # outside the lock: the callback may submit
        return seqno

    def close(self) -> None:
        if threading.current_thread() is self._thread:
            raise RuntimeError("SimGpu.close() called from its own worker (notify callback)")
        with self._close_lock:
            if self._closed:
                return
            with self._submit_lock:
                self._closing = True  # from now on pending SemaphoreWaits are cancelled
                self._queue.put(_STOP)
            self._thread.join()
            with self._cond:
                self._closed = True
                self._cond.notify_all()
            self._unmap()

    def __enter__(self) -> SimGpu:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- the timeline (worker thread) ---

    def _run(self) -> None:
        while (item := self._queue.get()) is not _STOP:
            seqno, op = item
            failed = self._run_one(seqno, op)
            discard(op)
            del item, op  # the core may release host buffers once the seqno completes
            self._complete(seqno, failed)

    def _run_one(self, seqno: int, op: GpuOp) -> bool:
        """Run one op; True if it failed (hung or raised)."""
        deadline = time.monotonic() + self._hang_timeout
        try:
            run_op(self._memory, op, deadline=deadline, abandon_waits=self._is_closing)
        except Hung as exc:
            reason = "device closing" if self._closing else f"still running after {self._hang_timeout:g} s"
            log.warning("seqno %d cancelled as hung (%s): %s", seqno, reason, exc)
            return True
        except Exception as exc:
            log.error("seqno %d failed, completing it with EIO", seqno, exc_info=exc)
            return True
        return False

    def _is_closing(self) -> bool:
        return self._closing

    def _complete(self, seqno: int, failed: bool) -> None:
        self._mark(seqno, failed)
        self._call_notify(seqno)

    def _mark(self, seqno: int, failed: bool) -> None:
        with self._cond:
            if failed:
                self._failed.add(seqno)
            self._completed = seqno
            self._cond.notify_all()

    def _call_notify(self, seqno: int) -> None:
        callback = self._notify
        if callback is not None:
            try:
                callback(seqno)
            except Exception:
                log.exception("device notify callback failed for seqno %d", seqno)

    def _unmap(self) -> None:
        try:
            self._device = None
            self._memory.release()
            self._mem.close()
        except BufferError:
            # Someone still holds a view of device memory (a bug elsewhere): the mapping goes
            # away when the last view does; do not turn a clean shutdown into a crash.
            log.warning("device memory still has views at close; leaving it to the garbage collector")


if TYPE_CHECKING:
    def _conforms(gpu: SimGpu) -> GpuBackend:  # mypy: SimGpu satisfies the protocol
        return gpu
