"""Big copies in parts on several threads at once, as Ray's object store copies a large put
and a GPU's copy engines split a transfer: one core's memcpy does not saturate memory
(the dev VM: 8 GB/s on one thread, 11 on two).

Rules:
- `in_parts(move, length)` calls `move(start, end)` over [0, length) in page-aligned parts,
  one per copy thread (COPY_THREADS: the CPUs this process may run on, at most 4), when
  `length` is at least SPLIT_MIN; else once, on the caller's thread. np.copyto, preadv and
  pwritev release the GIL, so the parts run at once;
- the parts' threads are made for the call and joined before it returns (nothing outlives
  it, and a forked child inherits no pool); the caller's thread runs the first part (and any
  part whose thread cannot be started), and the first error of any part is raised once
  every part has stopped;
- `copyto(dst, src)` is numpy's `copyto(dst, src, casting="no")`, in parts where both arrays
  are C-contiguous with the same dtype and shape;
- `preadv_into(fd, view, offset)` reads with preadv, at most 1 GiB per call, in parts: one
  thread's preadv out of shmem runs at 4.7-5.2 GB/s from 64 MiB up on the 480 MiB-L3 VM,
  parts on two threads at 7.8-9.6 (16 MiB: 7.9 -> 11.8); it returns the bytes each part
  read before its file ended early, so the caller decides what a short read means.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from .constants import PAGE_SIZE

__all__ = ["COPY_THREADS", "SPLIT_MIN", "copyto", "in_parts", "preadv_into"]

SPLIT_MIN = 8 << 20  # bytes: below this a thread costs more than it saves
COPY_THREADS = min(4, len(os.sched_getaffinity(0)))
_MAX_IO = 1 << 30  # one preadv moves at most this much (the kernel caps near 2 GiB)


def in_parts(move: Callable[[int, int], None], length: int) -> None:
    """`move(start, end)` over [0, length), in parts on the copy threads if it is big."""
    threads_n = COPY_THREADS
    if length < SPLIT_MIN or threads_n < 2:
        move(0, length)
        return
    step = -(-length // threads_n // PAGE_SIZE) * PAGE_SIZE
    errors: list[BaseException] = []

    def part(start: int) -> None:
        try:
            move(start, min(start + step, length))
        except BaseException as exc:  # raised on the caller's thread once every part stopped
            errors.append(exc)

    threads = []
    for start in range(step, length, step):
        thread = threading.Thread(target=part, args=(start,), name="ugem-copy", daemon=True)
        try:
            thread.start()
        except RuntimeError:  # no thread to be had (a limit on threads): this part on ours
            part(start)
            continue
        threads.append(thread)
    part(0)
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def copyto(dst: np.ndarray[Any, Any], src: np.ndarray[Any, Any]) -> None:
    """np.copyto(dst, src, casting="no"), in parts when both are contiguous alike."""
    if (dst.nbytes >= SPLIT_MIN and dst.dtype == src.dtype and dst.shape == src.shape
            and dst.flags.c_contiguous and src.flags.c_contiguous):
        to, of = dst.reshape(-1).view(np.uint8), src.reshape(-1).view(np.uint8)
        in_parts(lambda a, b: np.copyto(to[a:b], of[a:b]), to.nbytes)
    else:
        np.copyto(dst, src, casting="no")


def preadv_into(fd: int, view: memoryview, offset: int) -> list[tuple[int, int]]:
    """Read `len(view)` bytes of `fd` from `offset` into `view` (flat bytes), in parts if it is
    big; returns the (start, end) ranges of `view` left unread because the file ended first
    (none after a whole read), for the caller to fail or zero."""
    short: list[tuple[int, int]] = []

    def move(start: int, end: int) -> None:
        done = start
        while done < end:
            n = os.preadv(fd, [view[done:min(end, done + _MAX_IO)]], offset + done)
            if n <= 0:
                short.append((done, end))
                return
            done += n

    in_parts(move, len(view))
    return sorted(short)
