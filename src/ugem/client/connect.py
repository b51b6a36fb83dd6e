"""`ugem.connect()`: find the daemon's socket (SPEC §1), connect, handshake.

Every failure to reach the daemon names the path tried: no socket (FileNotFoundError), no
listener (ConnectionRefusedError), no permission (PermissionError), or no answer within
`timeout` (TimedOut). With `start=True` a daemon is started where none listens
(autostart.py has the rules).
"""

from __future__ import annotations

import math
import os
import socket
import time

from ..errors import InvalidArgument, TimedOut
from ..paths import check_socket_dir, resolve_socket_path
from .args import flag
from .autostart import connect_or_start
from .device import Device
from .transport import SocketTransport

__all__ = ["connect"]

_HINT = "start a daemon with `ugem serve`"


def connect(path: str | None = None, *, timeout: float | None = None, start: bool = False) -> Device:
    """A Device talking to the daemon at `path` (else $UGEM_SOCKET, else the default).

    `timeout` (seconds): connecting, the handshake, and every later call that gets no
    reply within it (plus the call's own timeout for wait/wait_fence) raise `TimedOut`
    (ETIMEDOUT) and close the Device; None waits as long as the daemon takes.
    `start=True`: if no daemon listens there, start one (`ugem serve --detach`, which
    exits once it has had no client for a while) and connect to it.
    """
    timeout = _check_timeout(timeout)
    where, is_default = resolve_socket_path(path)
    if flag(start, "start"):
        return connect_or_start(where, is_default, lambda: _connect_to(where, is_default, timeout))
    return _connect_to(where, is_default, timeout)


def _connect_to(where: str, is_default: bool, timeout: float | None) -> Device:
    if is_default:
        try:
            check_socket_dir(os.path.dirname(where))
        except FileNotFoundError:
            raise FileNotFoundError(2, f"no ugem daemon: {os.path.dirname(where)} does not exist; {_HINT}",
                                    where) from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        _connect(sock, where, timeout)
    except FileNotFoundError:
        sock.close()
        raise FileNotFoundError(2, f"no ugem daemon socket at {where}; {_HINT}", where) from None
    except ConnectionRefusedError:
        sock.close()
        raise ConnectionRefusedError(111, f"no ugem daemon listening on {where}; {_HINT}", where) from None
    except PermissionError:
        sock.close()
        raise PermissionError(13, f"permission denied connecting to the ugem daemon socket at {where} (uid "
                                  f"{os.getuid()} may not open it or its directory); connect to a daemon of "
                                  f"your own, or ask its owner for access (`ugem serve --socket-mode`)",
                              where) from None
    except BaseException:
        sock.close()
        raise
    try:
        return Device(SocketTransport(sock, timeout=timeout, path=where))
    except BaseException:
        sock.close()
        raise


def _check_timeout(timeout: object) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise InvalidArgument(f"timeout must be a number of seconds or None, got {timeout!r}")
    if not 0 < timeout < math.inf:
        raise InvalidArgument(f"timeout must be a positive, finite number of seconds or None, got {timeout!r}")
    return float(timeout)


def _connect(sock: socket.socket, where: str, timeout: float | None) -> None:
    """connect(2), within `timeout` if one is given. A Unix socket does not wait for room
    in a full listen backlog once it has a timeout (EAGAIN at once), so retry until then."""
    if timeout is None:
        sock.connect(where)
        return
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock.connect(where)
            return
        except BlockingIOError:  # the backlog is full: the daemon is not accepting
            if time.monotonic() >= deadline:
                raise TimedOut(f"the ugem daemon at {where} did not accept the connection within "
                               f"{timeout:g} s") from None
            time.sleep(min(0.01, timeout / 10))
