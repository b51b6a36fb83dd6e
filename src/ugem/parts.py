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
  are C-contiguous with the same dtype and shape.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from .constants import PAGE_SIZE

__all__ = ["COPY_THREADS", "SPLIT_MIN", "copyto", "in_parts"]

SPLIT_MIN = 8 << 20  # bytes: below this a thread costs more than it saves
COPY_THREADS = min(4, len(os.sched_getaffinity(0)))


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
