"""Bulk copies of the XFER path (client/device.py): between the caller's memory and the
private file description the manager handed over, at most 1 GiB per syscall (the kernel
moves at most ~2 GiB at once). Nothing here talks to the manager.

Rules:
- a read of MAPPED_MIN bytes or more (1.5x the CPU's last-level cache) into the caller's
  buffer copies from a read-only mapping of the description where it may
  (backing/mapping.py `read_mapped`: twice preadv's speed at that size), else with preadv;
- writes go through pwritev: into pages not there yet it allocates them without zeroing
  them first, where a mapping would fault each one in zeroed;
- a read of 8 MiB or more runs in parts on several threads at once, through a mapping or with
  preadv (ugem/parts.py: 1.2-1.4x one thread's speed through a mapping on the dev VM, 1.5-2x
  with preadv on the 480 MiB-L3 VM); writes do not (pwritev into one shmem
  file holds its inode lock: parts on threads measured no faster);
- a STREAMED|TAKEN pread reads its runs from the daemon's spill files the same way
  (`read_runs`: preadv in parts), in order, and zeroes the rest;
- a STREAMED pread (a spilled object read straight from spill storage, core/stream.py)
  reads the pipe in order into the runs the reply lists and zeroes the rest; a pipe that
  ends early is EIO (the daemon gave up or went away).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from ..backing.mapping import MAPPED_MIN, read_mapped
from ..errors import IOFailure
from ..fd import OwnedFd
from ..parts import preadv_into
from ..wire.structs import PIECE

__all__ = ["pread_all", "preadv_all", "pwritev_all", "read_runs", "read_streamed"]

_STEP = 1 << 30


def preadv_all(fd: OwnedFd, into: Any, offset: int) -> None:
    view = memoryview(into).cast("B")
    if len(view) >= MAPPED_MIN and read_mapped(fd.fd, view, offset):
        return
    short = preadv_into(fd.fd, view, offset)
    if short:
        raise IOFailure(f"short read from object memory at offset {offset + short[0][0]}")


def pread_all(fd: OwnedFd, length: int, offset: int) -> bytes:
    data = os.pread(fd.fd, length, offset) if length < _STEP else b""
    if len(data) == length:
        return data
    buf = bytearray(length)
    preadv_all(fd, buf, offset)
    return bytes(buf)


def pwritev_all(fd: OwnedFd, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwritev(fd.fd, [view[done:done + _STEP]], offset + done)



def read_streamed(fd: OwnedFd, pieces: bytes, into: Any, offset: int) -> None:
    """Fill `into` (the range from `offset`) from a STREAMED reply's pipe (module rules)."""
    def read(part: memoryview, at: int, _: object) -> None:
        done = 0
        while done < len(part):
            n = os.readv(fd.fd, [part[done:]])
            if n <= 0:
                raise IOFailure(f"the daemon's stream of object memory ended {len(part) - done} bytes early at "
                                f"offset {at + done}")
            done += n
    _fill_runs(into, offset, ((start, length, None) for start, length in PIECE.iter_unpack(pieces)), read)


def read_runs(files: dict[int, OwnedFd], runs: list[tuple[int, ...]], into: Any, offset: int) -> None:
    """Fill `into` (the range from `offset`) from a STREAMED|TAKEN reply's SPILL_RUN records
    (server_fd, 0, dev, ino, file offset, object offset, length), read from `files` (the
    daemon's spill files by its fd number) in parts, and zero the rest (module rules)."""
    def read(part: memoryview, at: int, where: tuple[int, int]) -> None:
        if preadv_into(files[where[0]].fd, part, where[1]):
            raise IOFailure(f"spill storage ended early in bytes {at}-{at + len(part)}")
    _fill_runs(into, offset, ((start, n, (fd, at)) for fd, _, _, _, at, start, n in runs), read)


def _fill_runs(into: Any, offset: int, runs: Iterable[tuple[int, int, Any]],
               read: Callable[[memoryview, int, Any], None]) -> None:
    """`read(part, object offset, how)` each run (object offset, length, how), in order and
    within the range of `into` that starts at `offset`; zero the holes between and after."""
    view = memoryview(into).cast("B")
    at = 0  # where in `view` the next run or hole starts
    for start, length, how in runs:
        start -= offset
        if not at <= start <= start + length <= len(view):
            raise IOFailure(f"a streamed read listed bytes {start + offset}-{start + offset + length} outside "
                            f"the range asked for")
        _zero(view[at:start])
        read(view[start:start + length], start + offset, how)
        at = start + length
    _zero(view[at:])


def _zero(view: memoryview) -> None:
    if len(view):
        np.frombuffer(view, dtype=np.uint8).fill(0)
