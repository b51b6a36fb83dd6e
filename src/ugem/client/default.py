"""`ugem.default_device()`: this process's shared default client, made on first use.

Rules:
- the first call makes it: `connect()` when a daemon listens at the default socket (found
  as `connect()` finds it: $UGEM_SOCKET, $XDG_RUNTIME_DIR/ugem/ugem.sock,
  /tmp/ugem-<uid>/ugem.sock), else an embedded manager (`embedded()`). It never starts a
  daemon. Only "no daemon there" (FileNotFoundError, ConnectionRefusedError, or DaemonGone:
  it went away during the handshake) falls back to embedded; a socket that is there but
  cannot be used (no permission, an unsafe default directory, a refused handshake) raises,
  since quietly using a manager of its own would split the process's objects from the
  daemon's;
- later calls return the same Device, from any thread (made once, under a lock);
- a Device that was closed (by its user, or by a call that timed out) or whose daemon went
  away is replaced by a new one at the next call (the old one is closed first);
- a forked child never uses its parent's: after a fork the child's next call makes its
  own. The parent's stays referenced in the child (closing it there would do nothing, and
  an embedded manager's copied fds are never left to the garbage collector), and the lock
  is new in the child (another thread may have held the parent's at the fork);
- at interpreter exit the default Device this process made is closed (`atexit`): an
  embedded manager releases everything and removes its spill files, a daemon client
  disconnects cleanly. Arrays and mappings made from it stay valid until the process ends.
`reset()` closes and forgets the current default (for tests; not public API).
"""

from __future__ import annotations

import atexit
import os
import threading

from ..errors import DaemonGone
from ..manager import embedded
from .connect import connect
from .device import Device

__all__ = ["default_device", "reset"]

_lock = threading.Lock()
_device: Device | None = None
_pid = os.getpid()  # the process that made `_device`
_forsaken: list[Device] = []  # in a forked child: the parent's defaults, kept, never used


def default_device() -> Device:
    """This process's shared default Device (see the module rules)."""
    dev = _device
    if dev is not None and _usable(dev):
        return dev
    with _lock:
        return _current()


def _current() -> Device:
    global _device, _pid
    dev = _device
    if dev is not None and _usable(dev):
        return dev
    if dev is not None:
        dev.close()
    _device, _pid = _make(), os.getpid()
    return _device


def _usable(dev: Device) -> bool:
    return not dev.closed and not dev._connection_lost()


def _make() -> Device:
    try:
        return connect()
    except (FileNotFoundError, ConnectionRefusedError, DaemonGone):
        return embedded()


def reset() -> None:
    """Close this process's default Device and forget it (tests use this between cases)."""
    global _device
    with _lock:
        dev, _device = _device, None
        if dev is not None and _pid == os.getpid():
            dev.close()


def _after_fork_in_child() -> None:
    global _device, _lock
    if _device is not None:
        _forsaken.append(_device)
    _device, _lock = None, threading.Lock()


@atexit.register
def _close_at_exit() -> None:
    dev = _device
    if dev is not None and _pid == os.getpid():
        dev.close()


os.register_at_fork(after_in_child=_after_fork_in_child)
