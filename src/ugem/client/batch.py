"""Batches: the shares and claims pickling posts go out together, and shares go out late.

Pickling a list of 2,000 arrays posts 2,000 shares, and unpickling it 2,000 claims; one
write each wakes the daemon 2,000 times. While multiprocessing's pickler runs (`batch()`
around `ForkingPickler.dumps` and `loads`, client/pickling.py), a Device holds its posted
requests back in its release queue (client/releases.py) and sends them with its next
request, or once HOLD_BACK are queued, or when the outermost batch ends if it holds a
claim, whichever is first.

Rules:
- shares are not sent when a batch ends: a receiver claims them by the memory they name
  before they arrive (early claims, core/shares.py), and until a share is sent its
  mapping's release, queued behind it, is not sent either, so the sender's mapping holds
  the object. A pickle sent to a worker and returned thus costs the daemon nothing on the
  way; the held shares go with the Device's next request, the HOLD_BACK-th queued item, or
  `Device.close()`, which sends them first (a sender may close its Device right after
  sending, as with an fd in flight);
- claims are sent when the outermost batch ends, on their own (`loads` returns only once
  the claims of the arrays it made are on their way; what else is queued waits): a claim
  sent late would leave the sender's share held, once sent, for as long as the sender
  lives should the receiver end meanwhile;
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
                    device._send_claims()
