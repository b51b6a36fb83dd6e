"""Busy polling: check for the other side's next message for a moment before sleeping.

Used by both ends of a daemon connection: the daemon's loop before it sleeps in epoll
(daemon/poller.py) and the client before it sleeps reading a reply (client/transport.py).
Why: putting a thread to sleep and waking it costs each side of a round trip about 20 us
of CPU on a virtual machine (measured: a bare Unix-socket echo between two processes on
two vCPUs, 25 us of CPU per side and 50-80 us per round trip when both sleep; 12 us per
side and 13 us per round trip when both check first), more than serving a small request.
The daemon's windows are longer than a client's: `DAEMON_SPIN`, and `COPY_SPIN` while
the client it last served holds an open bulk transfer. A client's next request often
follows work of its own: a bulk pwrite or pread moves its bytes between the daemon's reply
and the client's XFER_DONE (~100-250 us per MiB here), a released view is unmapped before
the next call. With 100 us daemon windows such gaps came up empty, which also made the next
wait cold, so the requests after them woke a sleeping daemon too: a loop of create,
pwrite, pread_into, mmap and close of 1 MiB objects took 2-3x as long (scratch `get5.py`,
per step: pread_into 690, mmap 325, close 293 us, against 423-462, 136-151 and 113-129 us
now; longer client windows changed nothing there, scratch `get6.py`). Only waits on a
copying client get 400 us: 400 us on every wait cost a client calling every 0.5 ms 0.44 of
a CPU of daemon time, against 0.17 with 100 us and 0.12 with these (scratch `idlecpu.py`).

Rules:
- only while hot: the last wait was caught by its window, or slept and ended within
  `HOT` (a sleep's wake-up alone can take tens of microseconds here, so a peer that
  answers within a window may still be slept on for longer than `SPIN`). A window that
  ends with nothing makes the next wait cold (it sleeps at once): a slow or idle peer
  costs at most one empty window in two waits (a window W in two gaps longer than W:
  under half a CPU), and none once its waits exceed `HOT`;
- a window is at most `SPIN` seconds of checks (the daemon's: `DAEMON_SPIN`, or
  `COPY_SPIN` on a client with an open transfer), the CPU yielded (sched_yield) between
  them, so that whatever else is runnable on this CPU runs first;
- shared CPU: a yield that took longer than `SHARED` means another thread ran on this
  CPU (perhaps the very peer we wait for): the window ends after one more check;
- pinned together: when this thread and the peer process (`peer()`: its pid, or None)
  may each run on one CPU only, the same one, no window opens. Checking would only take
  turns with the peer, and a yield need not give it the CPU (the scheduler may pick the
  yielder again). The peer and both affinities are read again every `REFRESH` seconds;
- never with a socket timeout armed (Python waits in poll before each read of a timed
  socket): the caller sleeps as before.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["COPY_SPIN", "DAEMON_SPIN", "HOT", "REFRESH", "SHARED", "SPIN", "BusyPoll", "pinned_together"]

SPIN = 100e-6  # a client's window: seconds of checks before sleeping, while hot
DAEMON_SPIN = 200e-6  # the daemon's
COPY_SPIN = 400e-6  # the daemon's while the client it last served holds an open bulk transfer
HOT = 250e-6  # a sleep that ended within this long makes the end hot
SHARED = 10e-6  # a yield longer than this: another thread ran on this CPU
REFRESH = 0.1  # seconds between readings of the two CPU affinities

_clock = time.monotonic
_yield = os.sched_yield
T = TypeVar("T")


def pinned_together(peer: int | None) -> bool:
    """Whether this thread and process `peer` may run on one CPU only, the same one."""
    if peer is None:
        return False
    mine = os.sched_getaffinity(0)
    if len(mine) != 1:
        return False
    try:
        return os.sched_getaffinity(peer) == mine
    except OSError:  # gone, or not ours to ask
        return False


class BusyPoll:
    """One end's state: whether it is hot, who its peer is and whether it is pinned with it."""

    __slots__ = ("hot", "_missed", "_began", "_peer", "_apart", "_asked")

    def __init__(self, peer: Callable[[], int | None]) -> None:
        self.hot = False
        self._missed = False  # the window of the wait in hand came up empty
        self._began = 0.0  # when the wait in hand began (its window, if any, included)
        self._peer = peer
        self._apart = True
        self._asked = -REFRESH

    def check(self, probe: Callable[[], T | None], window: float = SPIN) -> T | None:
        """`probe()`'s first true result within `window` seconds; None (call `sleep` now)
        if the end is not hot, is pinned with its peer, or nothing came."""
        self._began = now = _clock()
        if not self.hot:
            return None
        if now - self._asked >= REFRESH:
            self._asked = now
            self._apart = not pinned_together(self._peer())
        if not self._apart:
            return None
        end = now + window
        while True:
            if got := probe():
                return got
            if now >= end:
                self._missed = True
                return None
            _yield()
            later = _clock()
            if later - now > SHARED:
                return probe() or None
            now = later

    def sleep(self, wait: Callable[[Any], T], arg: Any) -> T:
        """`wait(arg)`, the sleeping call, right after a `check` that found nothing. Hot
        after it if it ended within `HOT` of the wait's start, unless its window came up
        empty: then the next wait is cold."""
        got = wait(arg)
        if self._missed:
            self._missed = self.hot = False
        else:
            self.hot = _clock() - self._began < HOT
        return got
