"""systemd's two service protocols, written once: socket activation and sd_notify.

Both are tiny and documented (sd_listen_fds(3), sd_notify(3)); a library for them
(systemd-python) needs libsystemd's headers and a C compiler to install, so they are
written here. Rules:
- socket activation: when `LISTEN_PID` is our pid and `LISTEN_FDS` >= 1, the fds from 3
  on were passed to us. One fd is the daemon's socket; with several, the one named
  `ugem` in `LISTEN_FDNAMES` (a unit's `FileDescriptorName=ugem`). It must be a listening
  `AF_UNIX` `SOCK_STREAM` socket, else the configuration is bad (InvalidArgument naming the
  fd and what it is). The variables are removed from the environment in every case, so
  that no child inherits them (sd_listen_fds with unset_environment);
- sd_notify: `NOTIFY_SOCKET` names an `AF_UNIX` datagram socket (a path, or `@name` in the
  abstract namespace); each message is `KEY=VALUE` lines in one datagram. The variable is
  removed from the environment and the socket is kept. Sending never blocks the daemon and
  never fails it: a failed send is logged (once) and dropped. Without `NOTIFY_SOCKET`
  every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
from collections.abc import MutableMapping

from ..errors import InvalidArgument

__all__ = ["LISTEN_FDS_START", "Notifier", "inherited_socket", "socket_name"]

log = logging.getLogger("ugem.daemon")
LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START
FD_NAME = "ugem"  # the name that picks our socket among several passed fds


def inherited_socket(environ: MutableMapping[str, str] = os.environ) -> socket.socket | None:
    """The listening socket a service manager passed to this process, or None."""
    pid, count, names = (environ.pop(key, None) for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"))
    if pid is None or count is None or pid.strip() != str(os.getpid()):
        return None  # not activated, or the variables were meant for another process
    if not count.isdigit():
        raise InvalidArgument(f"LISTEN_FDS: {count!r} is not a count of passed fds")
    if int(count) == 0:
        return None
    fd = LISTEN_FDS_START
    if int(count) > 1:
        labels = (names or "").split(":")
        if FD_NAME not in labels:
            raise InvalidArgument(f"LISTEN_FDS: {count} fds were passed and none is named {FD_NAME!r} in "
                                  f"LISTEN_FDNAMES ({names!r}); pass one socket, or name it with "
                                  f"FileDescriptorName={FD_NAME}")
        fd += labels.index(FD_NAME)
    return _listening_unix_socket(fd)


def _listening_unix_socket(fd: int) -> socket.socket:
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        raise InvalidArgument(f"LISTEN_FDS: fd {fd} cannot be used: {exc.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise InvalidArgument(f"LISTEN_FDS: fd {fd} is not a listening Unix stream socket: it is not a socket")
    sock = socket.socket(fileno=fd)
    listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM or not listening:
        what = f"{sock.family.name} {sock.type.name}{'' if listening else ', not listening'}"
        sock.detach()  # the fd stays the service manager's business; we exit
        raise InvalidArgument(f"LISTEN_FDS: fd {fd} is not a listening Unix stream socket: it is {what}")
    os.set_inheritable(fd, False)
    sock.setblocking(False)
    return sock


def socket_name(sock: socket.socket) -> str:
    """How to show a Unix socket's address: its path, `@name` if abstract."""
    name = sock.getsockname()
    if isinstance(name, bytes):  # abstract namespace: a leading NUL
        return "@" + name[1:].decode(errors="replace")
    return name or "(unnamed socket)"


class Notifier:
    """sd_notify: `send("READY=1")`, `send("STATUS=...")`; does nothing without NOTIFY_SOCKET."""

    def __init__(self, environ: MutableMapping[str, str] | None = os.environ) -> None:
        address = environ.pop("NOTIFY_SOCKET", None) if environ is not None else None
        self._sock: socket.socket | None = None
        self._address = ""
        self._failed = False
        if not address:
            return
        if address.startswith("@"):
            self._address = "\0" + address[1:]
        elif address.startswith("/"):
            self._address = address
        else:
            log.warning("NOTIFY_SOCKET %r is not a Unix socket address; not notifying", address)
            return
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *lines: str) -> None:
        if self._sock is None:
            return
        try:
            self._sock.sendto("\n".join(lines).encode(), self._address)
        except OSError as exc:  # full queue, no listener: the daemon goes on
            if not self._failed:
                self._failed = True
                log.warning("sd_notify to %r failed (%s); later failures are not logged",
                            self._address.replace("\0", "@"), exc.strerror or exc)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
