"""`ugem.connect()`: find the daemon's socket (SPEC §1), connect, handshake."""

from __future__ import annotations

import os
import socket

from ..paths import check_socket_dir, resolve_socket_path
from .device import Device
from .transport import SocketTransport

__all__ = ["connect"]

_HINT = "start a daemon with `ugem serve`"


def connect(path: str | None = None) -> Device:
    """A Device talking to the daemon at `path` (else $UGEM_SOCKET, else the default)."""
    where, is_default = resolve_socket_path(path)
    if is_default:
        try:
            check_socket_dir(os.path.dirname(where))
        except FileNotFoundError:
            raise FileNotFoundError(2, f"no ugem daemon: {os.path.dirname(where)} does not exist; {_HINT}",
                                    where) from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(where)
    except FileNotFoundError:
        sock.close()
        raise FileNotFoundError(2, f"no ugem daemon socket at {where}; {_HINT}", where) from None
    except ConnectionRefusedError:
        sock.close()
        raise ConnectionRefusedError(111, f"no ugem daemon listening on {where}; {_HINT}", where) from None
    except BaseException:
        sock.close()
        raise
    try:
        return Device(SocketTransport(sock))
    except BaseException:
        sock.close()
        raise
