"""The GPU backend protocol: what the core needs from a GPU, and nothing more (TTM's
ttm_device_funcs in spirit). A CUDA backend implements this without touching the core.

Everything a GPU does happens on its **timeline**, in submission order: each
`submit()` returns a sequence number (seqno), and seqnos complete in order. The core never
waits on the timeline from its request path: it queues copies behind the work that uses
an object (pipelined eviction) and learns of completions through `completed()` and the
notify callback.

Memory the device touches is described by `Surface`s, resolved by the core at submission:
- `Surface(vram=offset, ...)`: a range of device memory the core allocated (drm_mm);
- `Surface(host=buffer, ...)`: host memory used in place (CACHED objects, userptr,
  foreign memory, objects pinned in system memory): a writable buffer-protocol object
  (the simulated device gets a memoryview; a GPU backend would register/pin it).

Ops:
- `CopyIn(vram, host, length, holes, file)`: host -> device memory (making an object
  resident); `host=None` clears the range instead (an object that never had pages). `file`,
  as for CopyOut, is read with preadv instead of loading through `host`;
- `CopyOut(vram, host, length, holes, file)`: device memory -> host (eviction,
  set_domain(CPU), suspend). `file`, if set, is a private file description of the same
  host memory (the object's memfd) that the backend writes with pwritev instead of storing
  through `host`: the write path allocates new pages without faulting a mapping in (about
  1.5-2.4x faster into fresh pages; reading with preadv, ~1.4x). The op owns it: the backend closes it once the op has
  run or failed (`discard`);
- `holes`: `(offset, length)` ranges of the host buffer, sorted and disjoint, where the
  object's memory holds no pages. Holes must stay holes (reading one through a mapping
  would allocate it, uncounted): CopyIn clears those ranges of device memory instead of
  reading them; CopyOut writes into them only the pages that are not all zeros;
- `Execute(commands, surfaces)`: run a command list (ugem.cmd) where each handle in the
  commands maps to its Surface.

A failed op (a hung Execute cancelled after `hang_timeout`) completes with an errno
(EIO) that `error(seqno)` reports; later ops still run ("the device goes on").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ..cmd import Command
from ..fd import OwnedFd

__all__ = ["CopyIn", "CopyOut", "Execute", "GpuBackend", "GpuOp", "Holes", "Surface", "discard"]


@dataclass(frozen=True, slots=True)
class Surface:
    """Where an object's bytes are for the device: exactly one of vram / host is set."""

    size: int
    vram: int | None = None  # byte offset in device memory
    host: Any = None  # writable buffer (memoryview) used in place
    tiling: int = 0
    stride: int = 0


Holes = tuple[tuple[int, int], ...]  # (offset, length) ranges of a host buffer without pages


@dataclass(frozen=True, slots=True)
class CopyIn:
    vram: int
    host: Any  # readable buffer of `length` bytes, or None: fill with zeros
    length: int
    holes: Holes = ()  # not read: cleared in device memory
    file: OwnedFd | None = None  # the host memory's own description, read instead of `host`


@dataclass(frozen=True, slots=True)
class CopyOut:
    vram: int
    host: Any  # writable buffer of `length` bytes
    length: int
    holes: Holes = ()  # only pages that are not all zeros are written there
    file: OwnedFd | None = None  # the host memory's own description, written instead of `host`


@dataclass(frozen=True, slots=True)
class Execute:
    commands: Sequence[Command]
    surfaces: Mapping[int, Surface]  # handle -> surface


GpuOp = CopyIn | CopyOut | Execute


def discard(op: GpuOp) -> None:
    """Close what the op owns (a copy's `file`) once it has run, failed or was refused."""
    if isinstance(op, CopyIn | CopyOut) and op.file is not None:
        op.file.close()


class GpuBackend(Protocol):
    @property
    def vram_size(self) -> int:
        """Bytes of device memory."""

    def submit(self, op: GpuOp) -> int:
        """Queue `op` on the timeline; returns its seqno (increasing from 1). Never blocks."""

    def completed(self) -> int:
        """The highest seqno that has completed (all lower ones have too)."""

    def error(self, seqno: int) -> int | None:
        """The errno a completed op failed with (EIO: cancelled as hung), else None."""

    def wait(self, seqno: int, timeout: float | None) -> bool:
        """Block until `seqno` completes or `timeout` seconds pass; True if it completed."""

    def set_notify(self, callback: Callable[[int], None]) -> None:
        """Call `callback(seqno)` (from the device's thread) after each op completes."""

    def read_vram(self, offset: int, length: int) -> bytes:
        """Debug/test access to device memory (the simulated device only needs to support it)."""

    def close(self) -> None:
        """Finish queued work and release device memory."""
