"""backing/mapping.py `populate`: page tables filled in one call, other threads running meanwhile."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

from ugem.backing.mapping import map_placed, populate

MiB = 1 << 20
SIZE = 256 * MiB


def _longest_stall(call: Callable[[], None]) -> tuple[float, float]:
    """(the call's duration, the longest time another thread, spinning on the clock, went
    without running during it)."""
    stamps: list[float] = []
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            stamps.append(time.perf_counter())

    spinner = threading.Thread(target=spin)
    spinner.start()
    try:
        while not stamps:  # the spinner runs
            time.sleep(0.001)
        start = time.perf_counter()
        call()
        end = time.perf_counter()
    finally:
        stop.set()
        spinner.join()
    inside = [start] + [t for t in stamps if start <= t <= end] + [end]
    return end - start, max(b - a for a, b in zip(inside, inside[1:], strict=False))


def test_populate_write_allocates_every_page_in_one_call() -> None:
    fd = os.memfd_create("populate-test", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 8 * MiB)
        region, address = map_placed(fd, 0, 8 * MiB, True)
        populate(address, 8 * MiB, True)
        region.close()
        assert os.fstat(fd).st_blocks * 512 == 8 * MiB
    finally:
        os.close(fd)


def test_other_threads_run_while_pages_are_populated() -> None:
    # mmap.madvise holds the GIL for the whole call: the spinning thread would stall throughout.
    # Up to three tries, so that one descheduling of the spinner by a busy machine does not fail it.
    seen = []
    for _ in range(3):
        fd = os.memfd_create("populate-test", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, SIZE)
            region, address = map_placed(fd, 0, SIZE, True)
            try:
                took, stall = _longest_stall(lambda: populate(address, SIZE, True))  # noqa: B023
            finally:
                region.close()
        finally:
            os.close(fd)
        seen.append((round(took * 1e3, 1), round(stall * 1e3, 1)))
        if stall < took / 2:
            return
    raise AssertionError(f"another thread stalled for most of each call: (call ms, longest stall ms) {seen}")
