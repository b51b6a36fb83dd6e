"""Bulk copies of the XFER path (client/device.py): between the caller's memory and the
private file description the manager handed over, at most 1 GiB per syscall (the kernel
moves at most ~2 GiB at once). Nothing here talks to the manager.
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import IOFailure
from ..fd import OwnedFd

__all__ = ["pread_all", "preadv_all", "pwritev_all"]

_STEP = 1 << 30


def preadv_all(fd: OwnedFd, into: Any, offset: int) -> None:
    view = memoryview(into).cast("B")
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
