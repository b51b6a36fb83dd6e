"""Shared mappings that hold no fd (SPEC §2 mmap; §7: 2,000 mappings, still <= 16 fds).

`mmap.mmap(fd)` keeps a dup of the fd for the life of the mapping, so it is not the tool.
Instead: reserve the address range with an anonymous `mmap.mmap` (which owns the range and
will munmap it when it dies, holding no fd), then place the object's pages over it with
libc mmap(MAP_FIXED|MAP_SHARED) from the description the manager handed over, and close
that description at once. The kernel keeps the memory alive through the mapping itself.

The returned mmap object supports weak references, so the client library attaches a
finalizer that reports the mapping released once the last view of it is gone.

`read_mapped(fd, view, offset)`: a large read (MAPPED_MIN bytes or more: the client's XFER
reads, the manager's own) copies from a read-only mapping of the memory made, copied from
and unmapped at once. Past the last-level cache the kernel's preadv copies at about half
the speed of one memcpy from a mapping (glibc's memcpy then streams, the kernel's copy does
not): on the dev VM (32 MiB L3) preadv 2.0-2.2 GB/s vs 4.2-4.4 at 48 and 64 MiB, while below
it preadv wins (5.4-15 vs 4.7-7.3 GB/s at 1-32 MiB). So MAPPED_MIN is 1.5x the last-level
cache (sysfs; 32 MiB if unknown), at least 16 MiB. Only where the memory is sealed against
shrinking (F_SEAL_SHRINK, which every ugem memfd is): a mapping of memory that someone
truncates meanwhile would fault (SIGBUS) where preadv returns short. Anything else, a read
past the end, or a mapping that cannot be made: False, nothing copied (the caller reads
with preadv).
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os

import numpy as np

from ..address import data_address
from ..parts import copyto

__all__ = ["MAPPED_MIN", "map_placed", "map_shared", "populate", "read_mapped"]

_PAGE = mmap.PAGESIZE


def _last_level_cache(default: int = 32 << 20) -> int:
    """Bytes of the largest CPU cache cpu0 reports (sysfs), else `default`."""
    best = 0
    try:
        with os.scandir("/sys/devices/system/cpu/cpu0/cache") as entries:
            for entry in entries:
                if entry.name.startswith("index"):
                    with open(os.path.join(entry.path, "size")) as f:
                        text = f.read().strip()
                    unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
                    best = max(best, int(text.rstrip("KMG")) * unit)
    except (OSError, ValueError):
        return default
    return best or default


MAPPED_MIN = max(16 << 20, _last_level_cache() * 3 // 2)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_MAP_FIXED = 0x10
_MAP_FAILED = ctypes.c_void_p(-1).value
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_MADV_POPULATE_READ, _MADV_POPULATE_WRITE = 22, 23


def map_shared(fd: int, offset: int, length: int, writable: bool) -> mmap.mmap:
    """Map [offset, offset+length) of `fd` shared; the caller may close `fd` right after."""
    return map_placed(fd, offset, length, writable)[0]


def map_placed(fd: int, offset: int, length: int, writable: bool) -> tuple[mmap.mmap, int]:
    """`map_shared`, and the address the mapping starts at."""
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    region = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, prot=prot)
    try:
        address = data_address(np.frombuffer(region, dtype=np.uint8))
        got = _libc.mmap(address, length, prot, mmap.MAP_SHARED | _MAP_FIXED, fd, offset)
        if got == _MAP_FAILED or got != address:
            err = ctypes.get_errno()
            raise OSError(err, f"mmap of fd {fd} failed: {os.strerror(err)}")
    except BaseException:
        region.close()
        raise
    return region, address


def populate(address: int, length: int, write: bool) -> None:
    """Fill the page tables of [address, address + length) in one call (MADV_POPULATE_WRITE,
    or _READ), through libc, which lets other threads run meanwhile: mmap.madvise holds the
    GIL for the whole call (340 ms for 512 MiB on the dev VM), which would stall a daemon's
    request loop or a client's other threads. A kernel before 5.14 refuses; the copy that
    follows then faults them in."""
    _libc.madvise(address, length, _MADV_POPULATE_WRITE if write else _MADV_POPULATE_READ)


def _copy(view: memoryview, region: mmap.mmap, skip: int) -> None:
    """`view` <- `region[skip:]`. numpy copies with the GIL released (a memoryview slice
    assignment holds it throughout); a big copy in parts on several threads, which also fill
    the page tables of their parts at once (parts.py). The arrays die on return, so that
    the region can be closed."""
    copyto(np.frombuffer(view, dtype=np.uint8), np.frombuffer(region, dtype=np.uint8)[skip:])


def read_mapped(fd: int, view: memoryview, offset: int) -> bool:
    """Copy into `view` (bytes) from `fd` at `offset` through a mapping (module rules);
    False, with nothing copied, where that may not or cannot be done."""
    try:
        if not fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK:
            return False
        if offset + len(view) > os.fstat(fd).st_size:  # (a mapping would fault there: preadv says short)
            return False
        start = offset - offset % _PAGE
        region = map_shared(fd, start, offset - start + len(view), False)
    except (OSError, ValueError, OverflowError):
        return False
    try:
        _copy(view, region, offset - start)
    finally:
        region.close()
    return True
