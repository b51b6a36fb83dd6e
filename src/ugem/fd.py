"""OwnedFd: an fd with exactly one owner, closed exactly once (jeepney's FileDescriptor).

Rules:
- every fd ugem creates or receives is wrapped at once; ownership moves only through
  `detach()` (the caller now owns the int) or `close()`;
- after either, the object holds -1, so a second close is a no-op and a use is EBADF;
- an OwnedFd garbage-collected while still open closes the fd and emits ResourceWarning,
  which the test suite turns into an error: a leaked fd fails the run.
Passing fds over a socket (SCM_RIGHTS) is ugem/scm.py's: this module imports no `socket`.
"""

from __future__ import annotations

import os
import warnings

__all__ = ["OwnedFd", "drain", "pipe"]


class OwnedFd:
    __slots__ = ("_fd", "__weakref__")

    def __init__(self, fd: int) -> None:
        if fd < 0:
            raise ValueError(f"not an fd: {fd}")
        self._fd = fd

    @property
    def fd(self) -> int:
        """The raw fd, still owned by this object; -1 once closed or detached."""
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def fileno(self) -> int:
        if self._fd < 0:
            raise OSError(9, "OwnedFd is closed")
        return self._fd

    def detach(self) -> int:
        """Give up ownership: the caller must close the returned fd."""
        fd, self._fd = self._fd, -1
        return fd

    def dup(self) -> OwnedFd:
        return OwnedFd(os.dup(self.fileno()))

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> OwnedFd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if self._fd >= 0:
            warnings.warn(f"OwnedFd {self._fd} was neither closed nor detached", ResourceWarning, stacklevel=2)
            self.close()

    def __repr__(self) -> str:
        return f"OwnedFd({self._fd})"


def pipe(flags: int = os.O_CLOEXEC) -> tuple[OwnedFd, OwnedFd]:
    """A new pipe (`os.pipe2(flags)`): its read end and its write end, each owned."""
    read_end, write_end = os.pipe2(flags)
    return OwnedFd(read_end), OwnedFd(write_end)


def drain(fd: OwnedFd) -> None:
    """Read a non-blocking pipe's read end until it is empty (wake-up bytes)."""
    try:
        while os.read(fd.fileno(), 4096):
            pass
    except BlockingIOError:
        pass
