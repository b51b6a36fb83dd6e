"""Taking an object's memory straight from the daemon process (the receiver's side of
GEM_CLAIM_MAPPED, core/shares.py): a share claimed with no round trip.

Rules:
- the daemon process is the peer of the Device's socket as the kernel saw it connect
  (SO_PEERCRED: its pid in this process's pid namespace, and its uid); a process whose
  effective uid is neither that uid nor root does not try (the kernel would refuse);
- `take(number, key)` copies the daemon's fd `number` with pidfd_getfd (pidfd.py) and
  returns it only if it is the memfd `key` (st_dev, st_ino) names; any other fd is closed
  at once untouched (a copy of a description, never an open: no side effect on anything
  the number may name now), and None is returned, as for a number that is gone (EBADF);
- when the kernel refuses (EPERM: Yama, a non-dumpable daemon, another uid; ENOSYS; the
  daemon gone), the Device stops trying: every later claim takes the round trip;
- one pidfd per Device, opened on first use, closed with the Device.

Python has `os.pidfd_open` but no pidfd_getfd: `pidfd_getfd` calls it through libc's
syscall(2); the new fd is close-on-exec (the kernel sets it).
"""

from __future__ import annotations

import ctypes
import errno
import os

from ..fd import OwnedFd
from .registry import fd_key

__all__ = ["DaemonFds", "pidfd_getfd"]

_NR_PIDFD_GETFD = 438  # the same number on every architecture (the unified syscall table)
_syscall = ctypes.CDLL(None, use_errno=True).syscall
_syscall.restype = ctypes.c_long
_syscall.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_int, ctypes.c_uint]


def pidfd_getfd(pidfd: int, target_fd: int) -> OwnedFd:
    """A copy (same open file description) of fd `target_fd` of the process `pidfd` names."""
    fd = _syscall(_NR_PIDFD_GETFD, pidfd, target_fd, 0)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"pidfd_getfd of fd {target_fd}: {os.strerror(err)}")
    return OwnedFd(fd)


class DaemonFds:
    def __init__(self, peer: tuple[int, int] | None) -> None:
        self._pidfd: OwnedFd | None = None
        euid = os.geteuid()
        self._peer = peer if peer is not None and euid in (0, peer[1]) else None

    @property
    def usable(self) -> bool:
        return self._peer is not None

    def take(self, number: int, key: tuple[int, int]) -> OwnedFd | None:
        """The daemon's fd `number` if it is the memfd `key`, else None."""
        if self._peer is None or number < 0:
            return None
        try:
            if self._pidfd is None:
                self._pidfd = OwnedFd(os.pidfd_open(self._peer[0]))
            fd = pidfd_getfd(self._pidfd.fd, number)
        except OSError as exc:
            if exc.errno != errno.EBADF:  # not allowed, or not possible: never again
                self.close()
                self._peer = None
            return None
        try:
            same = fd_key(fd.fd) == key
        except BaseException:
            fd.close()
            raise
        if same:
            return fd
        fd.close()
        return None

    def close(self) -> None:
        if self._pidfd is not None:
            self._pidfd.close()
            self._pidfd = None
