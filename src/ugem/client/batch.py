"""Batches: the shares and claims one pickling call posts go out together.

Pickling a list of 2,000 arrays posts 2,000 shares, and unpickling it 2,000 claims; one
write each wakes the daemon 2,000 times. While multiprocessing's pickler runs (`batch()`
around `ForkingPickler.dumps` and `loads`, client/pickling.py), a Device holds its posted
requests back in its release queue (client/releases.py) and sends them with its next
request, or once HOLD_BACK are queued, or when the outermost batch ends, whichever is first.

Rules:
- a batch ends with every held-back request sent: `dumps` returns only once the shares its
  pickle names are on their way to the daemon, ahead of the pickle itself (a receiver may
  claim them through the daemon as soon as it has the pickle); `loads` likewise for claims;
- held-back requests keep their order, and go before anything queued after them;
- batches are per thread; nesting counts (a pickle inside a pickle ends with the outer).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["HOLD_BACK", "batch", "hold_back"]

HOLD_BACK = 32  # posted requests a Device holds back at most (half of SHARE_AHEAD)


class _State(threading.local):
    depth = 0
    devices: dict[int, Any] | None = None  # id -> Device that held something back


_state = _State()


def hold_back(device: Any) -> bool:
    """Whether `device` should hold a posted request back (a batch is open in this thread)."""
    if not _state.depth:
        return False
    if _state.devices is None:
        _state.devices = {}
    _state.devices[id(device)] = device
    return True


@contextmanager
def batch() -> Iterator[None]:
    _state.depth += 1
    try:
        yield
    finally:
        _state.depth -= 1
        if not _state.depth and _state.devices:
            devices, _state.devices = _state.devices, None
            for device in devices.values():
                if not device.closed:
                    device._post(None)
