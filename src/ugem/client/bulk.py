"""Bulk copies of the XFER path (client/device.py): between the caller's memory and the
private file description the manager handed over, at most 1 GiB per syscall (the kernel
moves at most ~2 GiB at once). Nothing here talks to the manager.

Rules:
- a read of MAPPED_MIN bytes or more into the caller's buffer copies from a read-only
  mapping of the description (made, copied from, unmapped at once; it holds no fd): the
  kernel's preadv copies page by page at about half the speed of one memcpy from a mapping
  (1.9 vs 3.2-4.4 GB/s on the dev VM, 1 to 64 MiB). Only where the memory is sealed against
  shrinking (F_SEAL_SHRINK, which every ugem memfd is): a mapping of memory that someone
  truncates meanwhile would fault (SIGBUS) where preadv returns short. Anything else, a
  read past the end, or a mapping that cannot be made, reads with preadv;
- writes go through pwritev: into pages not there yet it allocates them without zeroing
  them first, where a mapping would fault each one in zeroed.
"""

from __future__ import annotations

import fcntl
import os
from typing import Any

from ..backing.mapping import map_shared
from ..constants import PAGE_SIZE
from ..errors import IOFailure
from ..fd import OwnedFd

__all__ = ["MAPPED_MIN", "pread_all", "preadv_all", "pwritev_all"]

_STEP = 1 << 30
MAPPED_MIN = 256 << 10


def preadv_all(fd: OwnedFd, into: Any, offset: int) -> None:
    view = memoryview(into).cast("B")
    if len(view) >= MAPPED_MIN and _read_mapped(fd.fd, view, offset):
        return
    done = 0
    while done < len(view):
        n = os.preadv(fd.fd, [view[done:done + _STEP]], offset + done)
        if n <= 0:
            raise IOFailure(f"short read from object memory at offset {offset + done}")
        done += n


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


def _read_mapped(fd: int, view: memoryview, offset: int) -> bool:
    """Copy into `view` from `fd` at `offset` through a mapping (module rules); False, with
    nothing copied, where that may not or cannot be done."""
    try:
        if not fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK:
            return False
        start = offset - offset % PAGE_SIZE
        if offset + len(view) > os.fstat(fd).st_size:  # (a mapping would fault there: preadv says short)
            return False
        region = map_shared(fd, start, offset - start + len(view), False)
    except (OSError, ValueError, OverflowError):
        return False
    try:
        source = memoryview(region)
        try:
            view[:] = source[offset - start:]
        finally:
            source.release()
    finally:
        region.close()
    return True
