"""Batches: the shares and claims pickling posts go out together, and shares go out late.

Pickling a list of 2,000 arrays posts 2,000 shares, and unpickling it 2,000 claims; one
write and one request each would cost the daemon 4,000 wake-ups and dispatches. While
multiprocessing's pickler runs (`batch()` around `ForkingPickler.dumps` and `loads`,
client/pickling.py), a Device holds its posted shares and claims back (client/releases.py)
and sends them, as a few batch requests (GEM_SHARE_BATCH, GEM_CLAIM_MAPPED_BATCH:
core/shares.py), with its next request, or (shares) once HOLD_BACK shares are held, or
(claims) when the outermost batch ends, whichever is first.

Rules:
- shares are not sent when a batch ends: a receiver claims them by the memory they name
  before they arrive (early claims, core/shares.py), and until a share is sent its
  mapping's release, queued behind it, is not sent either, so the sender's mapping holds
  the object. A pickle sent to a worker and returned thus costs the daemon nothing on the
  way; the held shares go with the Device's next request, the HOLD_BACK-th held share, or
  `Device.close()`, which sends them first (a sender may close its Device right after
  sending, as with an fd in flight);
- claims are sent when the outermost batch ends, all of them, on their own (`loads` returns
  only once the claims of the arrays it made are on their way; what else is queued waits):
  a claim sent late would leave the sender's share held, once sent, for as long as the
  sender lives should the receiver end meanwhile. Holding them all to the end costs only
  when a receiver is killed in the middle of unpickling: that pickle's shares stay held
  (as those of the arrays it had not reached would anyway);
- held-back requests keep their order, and go before anything queued after them;
- batches are per thread; nesting counts (a pickle inside a pickle ends with the outer);
- the cyclic garbage collector is paused while any thread is in a batch (a count for the
  process: the first outermost batch to begin turns it off if it was on, the last to end
  turns it on again). Unpickling 2,000 arrays makes tens of thousands of tracked objects
  that live until the message is loaded (pickle's memo holds them), and the collections
  they set off (one every 700 allocations, a larger one every ten of those, a full one
  every few messages) took 13-20 ms of a Pool worker's 2,000-array round trip and 6-9 ms
  of its parent's; paused, the next collection after the message finds what is left
  (1-4 ms). A thread that turns the collector off while another one is in a batch finds it
  on again when that batch ends; a child forked meanwhile counts only its forking thread's.
"""

from __future__ import annotations

import gc
import os
import threading
from typing import Any

__all__ = ["HOLD_BACK", "batch", "hold_back"]

HOLD_BACK = 256  # shares a Device holds back at most (within SHARE_LAG)


class _State(threading.local):
    depth = 0

    def __init__(self) -> None:  # (run in each thread that uses it)
        self.devices: dict[int, Any] = {}  # id -> Device that held something back


_state = _State()
_gc_lock = threading.Lock()
_gc_paused = 0  # threads in a batch (module rules)
_gc_was_on = False


def hold_back(device: Any) -> bool:
    """Whether `device` should hold a posted request back (a batch is open in this thread)."""
    state = _state
    if not state.depth:
        return False
    state.devices[id(device)] = device
    return True


class _Batch:
    """`with batch():` (a class, not a generator: pickling enters one per message, and a
    generator-based context costs several times more)."""

    __slots__ = ()

    def __enter__(self) -> None:
        state = _state
        if not state.depth:
            _pause_gc()
        state.depth += 1

    def __exit__(self, *exc: object) -> None:
        state = _state
        state.depth -= 1
        if not state.depth:
            try:
                if state.devices:
                    devices, state.devices = state.devices, {}
                    for device in devices.values():
                        if not device.closed:
                            device._send_claims()
            finally:
                _resume_gc()


def _pause_gc() -> None:
    global _gc_paused, _gc_was_on
    with _gc_lock:
        if not _gc_paused:
            _gc_was_on = gc.isenabled()
            gc.disable()
        _gc_paused += 1


def _resume_gc() -> None:
    global _gc_paused
    with _gc_lock:
        _gc_paused -= 1
        if not _gc_paused and _gc_was_on:
            gc.enable()


def _after_fork_in_child() -> None:
    """Only the forking thread goes on in a child: the batches of the others never end there."""
    global _gc_lock, _gc_paused
    _gc_lock = threading.Lock()
    _gc_paused = 1 if _state.depth else 0
    if not _gc_paused and _gc_was_on:
        gc.enable()


os.register_at_fork(after_in_child=_after_fork_in_child)


_BATCH = _Batch()


def batch() -> _Batch:
    """A batch for the thread that enters it (module rules); nesting counts."""
    return _BATCH
