"""fds over a Unix socket (SCM_RIGHTS ancillary data), for the two ends that have sockets:
the client's SocketTransport and the daemon's Connection.

Rules:
- every fd received is wrapped in an `OwnedFd` at once, in wire order (`fds_from_ancillary`);
- `ANC_SPACE` is the ancillary room for the most fds a frame may carry (wire MAX_FDS);
- `rights(fds)` is the ancillary data that sends `fds` with a message; the caller still owns
  them (closing its copies once sendmsg has taken them).
This module is kept apart from ugem/fd.py so that the sans-IO layers, which hold OwnedFds,
never import `socket` (tests/unit/test_layering.py follows imports transitively).
"""

from __future__ import annotations

import array
import socket
from collections.abc import Sequence

from .fd import OwnedFd
from .wire.frames import MAX_FDS

__all__ = ["ANC_SPACE", "fds_from_ancillary", "rights"]

ANC_SPACE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)


def fds_from_ancillary(anc: list[tuple[int, int, bytes]]) -> list[OwnedFd]:
    """Wrap every fd of recvmsg() ancillary data (SCM_RIGHTS) at once, in wire order."""
    fds: list[OwnedFd] = []
    for level, kind, raw in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            ints = array.array("i")
            ints.frombytes(raw[: len(raw) - len(raw) % ints.itemsize])
            fds.extend(OwnedFd(i) for i in ints)
    return fds


def rights(fds: Sequence[OwnedFd]) -> list[tuple[int, int, array.array[int]]]:
    """The ancillary data for sendmsg() that passes `fds` (none: an empty list)."""
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [f.fd for f in fds]))] if fds else []
