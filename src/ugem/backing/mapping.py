"""Shared mappings that hold no fd (SPEC §2 mmap; §7: 2,000 mappings, still <= 16 fds).

`mmap.mmap(fd)` keeps a dup of the fd for the life of the mapping, so it is not the tool.
Instead: reserve the address range with an anonymous `mmap.mmap` (which owns the range and
will munmap it when it dies, holding no fd), then place the object's pages over it with
libc mmap(MAP_FIXED|MAP_SHARED) from the description the manager handed over, and close
that description at once. The kernel keeps the memory alive through the mapping itself.

The returned mmap object supports weak references, so the client library attaches a
finalizer that reports the mapping released once the last view of it is gone.
"""

from __future__ import annotations

import ctypes
import mmap
import os

import numpy as np

__all__ = ["map_placed", "map_shared"]

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_MAP_FIXED = 0x10
_MAP_FAILED = ctypes.c_void_p(-1).value


def map_shared(fd: int, offset: int, length: int, writable: bool) -> mmap.mmap:
    """Map [offset, offset+length) of `fd` shared; the caller may close `fd` right after."""
    return map_placed(fd, offset, length, writable)[0]


def map_placed(fd: int, offset: int, length: int, writable: bool) -> tuple[mmap.mmap, int]:
    """`map_shared`, and the address the mapping starts at."""
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    region = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, prot=prot)
    try:
        address = ctypes.addressof(ctypes.c_char.from_buffer(region)) if writable else \
            np.frombuffer(region, dtype=np.uint8).__array_interface__["data"][0]  # (from_buffer needs a writable one)
        got = _libc.mmap(address, length, prot, mmap.MAP_SHARED | _MAP_FIXED, fd, offset)
        if got == _MAP_FAILED or got != address:
            err = ctypes.get_errno()
            raise OSError(err, f"mmap of fd {fd} failed: {os.strerror(err)}")
    except BaseException:
        region.close()
        raise
    return region, address
