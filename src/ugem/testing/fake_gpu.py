"""FakeGpu: a deterministic `GpuBackend` for core tests (no worker thread, no timing).

Ops run synchronously inside `submit()` (and the notify callback is called before submit
returns) unless the fake is `paused`; then they are held, in order, until `release()`
runs them. So a test can keep an object "busy", look at what the core does meanwhile, and
finish the work at a moment of its choosing. Ops do the same thing as on the simulated GPU
(`ugem.gpu.sim.run_op`, the real command semantics), on lazily backed device memory.

Deterministic hangs, no clock: a SemaphoreWait whose value is not already in memory when its
op runs is cancelled at once as hung (EIO) -- write the value, then `release()`, to have it
pass. `fail(seqno)` makes a not yet completed op (or a future one) complete with EIO without
running, as a hang would; `failures` maps each failed seqno to the reason. `history` records
`(seqno, kind)` of every op submitted, kind being "copy_in", "copy_out" or "execute" (no
buffers are kept, so host memory is never pinned).

Rules: seqnos complete in order; held ops are run by `release()`, never by `wait()` (with
the fake paused, `wait()` returns at its timeout unless another thread releases; tests
on one thread poll with timeout 0). A notify callback may submit again (re-entrant lock);
its exceptions propagate to the caller of submit()/release() -- a fake should fail loudly.
Must not: sleep, start threads, or keep references to host buffers after an op ran.
"""

from __future__ import annotations

import mmap
import threading
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..gpu.base import CopyIn, CopyOut, GpuBackend, GpuOp, discard
from ..gpu.sim import TimelineQueries, check_op, run_op

__all__ = ["FakeGpu"]

_KIND = {CopyIn: "copy_in", CopyOut: "copy_out"}


def _always() -> bool:
    return True


class FakeGpu(TimelineQueries):
    """A GpuBackend that runs ops on submit, or holds them while `paused`."""

    def __init__(self, vram_size: int = 1 << 24, *, paused: bool = False) -> None:
        if vram_size <= 0:
            raise ValueError("vram_size must be positive")
        self._vram_size = vram_size
        self._mem = mmap.mmap(-1, vram_size)  # anonymous, zero-filled, backed lazily
        self._memory = memoryview(self._mem)
        self.paused = paused
        self.history: list[tuple[int, str]] = []
        self.failures: dict[int, str] = {}  # seqno -> why it completed with EIO
        self._held: deque[tuple[int, GpuOp]] = deque()
        self._issued = 0
        self._completed = 0
        self._failed: set[int] = set()
        self._doomed: set[int] = set()  # seqnos to fail instead of running
        self._notify: Callable[[int], None] | None = None
        self._cond = threading.Condition(threading.RLock())  # re-entrant: notify may submit
        self._closed = False

    # --- test controls ---

    @property
    def held(self) -> int:
        """Number of ops submitted but not yet run."""
        return len(self._held)

    def release(self, count: int | None = None) -> int:
        """Run up to `count` held ops (all, if None) in order; returns how many ran."""
        ran = 0
        with self._cond:
            while self._held and (count is None or ran < count):
                self._run_next()
                ran += 1
        return ran

    def fail(self, seqno: int) -> None:
        """Complete `seqno` (held, or not yet submitted) with EIO instead of running it."""
        with self._cond:
            if seqno <= self._completed:
                raise ValueError(f"seqno {seqno} has already completed")
            self._doomed.add(seqno)

    # --- GpuBackend ---

    @property
    def vram_size(self) -> int:
        return self._vram_size

    def submit(self, op: GpuOp) -> int:
        try:
            check_op(op, self._vram_size)
        except BaseException:
            discard(op)
            raise
        with self._cond:
            if self._closed:
                discard(op)
                raise RuntimeError("submit() on a closed FakeGpu")
            self._issued += 1
            seqno = self._issued
            self.history.append((seqno, _KIND.get(type(op), "execute")))
            self._held.append((seqno, op))
            while self._held and not self.paused:
                self._run_next()
            return seqno

    def close(self) -> None:
        """Run whatever is held (even if paused), then release device memory. Idempotent."""
        with self._cond:
            if self._closed:
                return
            self.release()
            self._closed = True
            self._cond.notify_all()
            self._memory.release()
            self._mem.close()

    def __enter__(self) -> FakeGpu:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # --- running ---

    def _run_next(self) -> None:
        """Run the oldest held op and complete it (caller holds the lock)."""
        seqno, op = self._held.popleft()
        if seqno in self._doomed:
            self._doomed.discard(seqno)
            self.failures[seqno] = "fail()"
        else:
            try:
                run_op(self._memory, op, abandon_waits=_always)
            except Exception as exc:  # Hung, or a bug (InvalidArgument...): EIO, as on SimGpu
                self.failures[seqno] = f"{type(exc).__name__}: {exc}"
        discard(op)
        del op
        if seqno in self.failures:
            self._failed.add(seqno)
        self._completed = seqno
        self._cond.notify_all()
        if self._notify is not None:
            self._notify(seqno)


if TYPE_CHECKING:
    def _conforms(gpu: FakeGpu) -> GpuBackend:  # mypy: FakeGpu satisfies the protocol
        return gpu
