"""Bulk copies of the XFER path (client/device.py): between the caller's memory and the
private file description the manager handed over, at most 1 GiB per syscall (the kernel
moves at most ~2 GiB at once). Nothing here talks to the manager.

Rules:
- a read of MAPPED_MIN bytes or more (1.5x the CPU's last-level cache) into the caller's
  buffer copies from a read-only mapping of the description where it may
  (backing/mapping.py `read_mapped`: twice preadv's speed at that size), else with preadv;
- writes go through pwritev: into pages not there yet it allocates them without zeroing
  them first, where a mapping would fault each one in zeroed.
"""

from __future__ import annotations

import os
from typing import Any

from ..backing.mapping import MAPPED_MIN, read_mapped
from ..errors import IOFailure
from ..fd import OwnedFd

__all__ = ["pread_all", "preadv_all", "pwritev_all"]

_STEP = 1 << 30


def preadv_all(fd: OwnedFd, into: Any, offset: int) -> None:
    view = memoryview(into).cast("B")
    if len(view) >= MAPPED_MIN and read_mapped(fd.fd, view, offset):
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

