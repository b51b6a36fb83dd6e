"""Errors: every failure of an operation is a `UgemError` carrying a positive errno.

The family, as a tree::

    OSError
     +-- UgemError                      any failed ugem operation (.errno set)
          +-- InvalidArgument   EINVAL  bad value, unknown handle for GEM_CLOSE, bad range
          +-- NoSuchObject      ENOENT  unknown handle, name or fence
          +-- TooBig            E2BIG   object larger than 2**46 bytes
          +-- QuotaExceeded     EDQUOT  client or uid quota, object, pin or uid client limit reached
          +-- BadFd             EBADF   not an open fd; call on a closed Device/Manager
          +-- PermissionDenied  EACCES  uid rule, read-only handle, unprivileged request
          +-- BadAddress        EFAULT  object was purged
          +-- OutOfMemory       ENOMEM  no room for pages even after reclaim
          +-- NoSpace           ENOSPC  the working set can never fit
          +-- Busy              EBUSY   pinned in VRAM, suspended (embedded)
          +-- NoDevice          ENODEV  operation not possible on this kind of object
          +-- NoSuchDeviceOrAddress ENXIO  proxy object (userptr, foreign import)
          +-- TimerExpired      ETIME   wait deadline passed with the work still running
          +-- TimedOut          ETIMEDOUT  no reply from the daemon within connect(timeout=)
          +-- IOFailure         EIO     work was cancelled as hung
          +-- Shutdown          ESHUTDOWN  the daemon is stopping
          +-- NotSupported      EOPNOTSUPP
          +-- TryAgain          EAGAIN  a share not read by the daemon yet (claims retry)
     +-- ProtocolError                   the wire was violated (never an operation error)
          +-- RemoteProtocolError        the peer sent a bad frame: drop the connection
     +-- DaemonGone (ConnectionError)    the daemon went away; the cause is in __cause__

Rules: the errno -> class map is derived from the classes (`ERRNO_TO_ERROR`), never
kept by hand; exceptions are translated in one place on each side of the wire
(`error_from_errno` here for replies; in the daemon, daemon/connection.py turns a
UgemError into an error reply with its errno and message).
"""

from __future__ import annotations

import errno as _errno

__all__ = [
    "ERRNO_TO_ERROR",
    "BadAddress",
    "BadFd",
    "Busy",
    "DaemonGone",
    "IOFailure",
    "InvalidArgument",
    "NoDevice",
    "NoSpace",
    "NoSuchDeviceOrAddress",
    "NoSuchObject",
    "NotSupported",
    "OutOfMemory",
    "PermissionDenied",
    "ProtocolError",
    "QuotaExceeded",
    "RemoteProtocolError",
    "Shutdown",
    "TimedOut",
    "TimerExpired",
    "TooBig",
    "TryAgain",
    "UgemError",
    "error_from_errno",
]


class UgemError(OSError):
    """A failed operation. `.errno` is the kernel errno ugem matches."""

    code: int = _errno.EIO

    def __init__(self, message: str = "", code: int | None = None) -> None:
        num = self.code if code is None else code
        super().__init__(num, message or _errno.errorcode.get(num, str(num)))

    def __reduce__(self) -> tuple[object, ...]:
        # OSError pickles as cls(errno, strerror), which is not this signature: an error
        # raised in a multiprocessing worker must come back as itself
        return (type(self), (self.strerror, self.errno), self.__dict__ or None)


class InvalidArgument(UgemError):
    code = _errno.EINVAL


class NoSuchObject(UgemError):
    code = _errno.ENOENT


class TooBig(UgemError):
    code = _errno.E2BIG


class QuotaExceeded(UgemError):
    code = _errno.EDQUOT


class BadFd(UgemError):
    code = _errno.EBADF


class PermissionDenied(UgemError):
    code = _errno.EACCES


class BadAddress(UgemError):
    code = _errno.EFAULT


class OutOfMemory(UgemError):
    code = _errno.ENOMEM


class NoSpace(UgemError):
    code = _errno.ENOSPC


class Busy(UgemError):
    code = _errno.EBUSY


class NoDevice(UgemError):
    code = _errno.ENODEV


class NoSuchDeviceOrAddress(UgemError):
    code = _errno.ENXIO


class TimerExpired(UgemError):
    """wait/wait_fence: the deadline passed and the work is still running (kernel ETIME)."""

    code = _errno.ETIME


class TimedOut(UgemError):
    """A call got no reply from the daemon within the `timeout` given to `connect()`;
    the Device is closed (raised by the client, never sent by a daemon)."""

    code = _errno.ETIMEDOUT


class IOFailure(UgemError):
    code = _errno.EIO


class Shutdown(UgemError):
    code = _errno.ESHUTDOWN


class NotSupported(UgemError):
    code = _errno.EOPNOTSUPP


class TryAgain(UgemError):
    code = _errno.EAGAIN


ERRNO_TO_ERROR: dict[int, type[UgemError]] = {
    cls.code: cls for cls in UgemError.__subclasses__()
}


def error_from_errno(code: int, message: str = "") -> UgemError:
    """Rebuild the exception for a positive errno received from the manager."""
    cls = ERRNO_TO_ERROR.get(code)
    if cls is None:
        return UgemError(message, code)
    return cls(message)


class ProtocolError(Exception):
    """The wire protocol was violated."""


class RemoteProtocolError(ProtocolError):
    """The peer sent a malformed frame; the only remedy is to drop the connection."""


class DaemonGone(ConnectionError):
    """The daemon closed the connection or died; the cause is in ``__cause__``."""
