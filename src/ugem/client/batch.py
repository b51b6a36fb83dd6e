"""Batches: the shares and claims pickling posts go out together, and shares go out late.

Pickling a list of 2,000 arrays posts 2,000 shares, and unpickling it 2,000 claims; one
write and one request each would cost the daemon 4,000 wake-ups and dispatches. While
multiprocessing's pickler runs (`batch()` around `ForkingPickler.dumps` and `loads`,
client/pickling.py), a Device holds its posted shares and claims back (client/releases.py)
and sends them, as a few batch requests (GEM_SHARE_BATCH, GEM_CLAIM_MAPPED_BATCH:
core/shares.py), with its next request, or (shares) once HOLD_BACK items are queued, or
(claims) when the outermost batch ends, whichever is first.

Rules:
- shares are not sent when a batch ends: a receiver claims them by the memory they name
  before they arrive (early claims, core/shares.py), and until a share is sent its
  mapping's release, queued behind it, is not sent either, so the sender's mapping holds
  the object. A pickle sent to a worker and returned thus costs the daemon nothing on the
  way; the held shares go with the Device's next request, the HOLD_BACK-th queued item, or
  `Device.close()`, which sends them first (a sender may close its Device right after
  sending, as with an fd in flight);
- claims are sent when the outermost batch ends, all of them, on their own (`loads` returns
  only once the claims of the arrays it made are on their way; what else is queued waits):
  a claim sent late would leave the sender's share held, once sent, for as long as the
  sender lives should the receiver end meanwhile. Holding them all to the end costs only
  when a receiver is killed in the middle of unpickling: that pickle's shares stay held
  (as those of the arrays it had not reached would anyway);
- held-back requests keep their order, and go before anything queued after them;
- batches are per thread; nesting counts (a pickle inside a pickle ends with the outer).
"""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["HOLD_BACK", "batch", "hold_back"]

HOLD_BACK = 256  # queued items (held shares, releases) a Device holds back at most (within SHARE_LAG)


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


class _Batch:
    """`with batch():` (a class, not a generator: pickling enters one per message, and a
    generator-based context costs several times more)."""

    __slots__ = ()

    def __enter__(self) -> None:
        _state.depth += 1

    def __exit__(self, *exc: object) -> None:
        state = _state
        state.depth -= 1
        if not state.depth and state.devices:
            devices, state.devices = state.devices, None
            for device in devices.values():
                if not device.closed:
                    device._send_claims()


_BATCH = _Batch()


def batch() -> _Batch:
    """A batch for the thread that enters it (module rules); nesting counts."""
    return _BATCH
