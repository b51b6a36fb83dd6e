"""Listener: the daemon's listening socket at PATH and the PATH.lock held with it (SPEC §4).

Rules:
- the default socket's directory is created 0700 and refused unless it is safely ours
  (`paths.check_socket_dir`); an explicit path's directory must exist;
- `PATH.lock` (flock, held for the daemon's life) makes probing and replacing atomic, so
  of daemons started at once exactly one gets the path;
- a live socket at PATH means another daemon: SocketInUse, and PATH is left alone; a
  stale socket file is replaced;
- any other failure (the directory cannot be made or is unsafe, no permission, a path
  too long for AF_UNIX) is bad configuration: BadSetting naming the path, with nothing
  left behind (no socket, no lock file);
- `close()` removes the socket and the lock file only if they are still ours;
- `Listener.activated()` is the socket a service manager passed (systemd.py: socket
  activation) instead: no lock, no directory, and `close()` leaves its file alone (it is
  the manager's, which keeps listening on it for the next start).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import stat

from ..config import BadSetting
from ..fd import OwnedFd
from ..paths import check_socket_dir
from .systemd import inherited_socket, socket_name

__all__ = ["Listener", "SocketInUse"]

log = logging.getLogger("ugem.daemon")


class SocketInUse(RuntimeError):
    """Another daemon is listening on the socket path."""


class Listener:
    def __init__(self, path: str, is_default: bool, mode: int = 0o600) -> None:
        self.path = path
        self._lock_file: OwnedFd | None = None  # PATH.lock, flocked while we listen
        self._lock_path = path + ".lock"
        self.sock: socket.socket | None = None
        self._inode: int | None = None  # of the socket file we made (None: not ours to remove)
        try:
            self._prepare_directory(is_default)
            self._lock()
            self._bind(mode)
        except OSError as exc:
            self.close()
            detail = exc.strerror or str(exc)
            if exc.filename and exc.filename != path:
                detail += f": {exc.filename}"
            raise BadSetting("socket", path, f"cannot be used: {detail}") from None
        except BaseException:
            self.close()
            raise

    @classmethod
    def activated(cls) -> Listener | None:
        """The listening socket passed by socket activation, or None (InvalidArgument if
        what was passed is not a listening Unix stream socket)."""
        sock = inherited_socket()
        if sock is None:
            return None
        self = cls.__new__(cls)
        self.path, self.sock, self._inode = socket_name(sock), sock, None
        self._lock_file, self._lock_path = None, ""
        return self

    def fileno(self) -> int:
        assert self.sock is not None
        return self.sock.fileno()

    def accept(self) -> tuple[socket.socket, object]:
        assert self.sock is not None
        return self.sock.accept()

    def _prepare_directory(self, is_default: bool) -> None:
        directory = os.path.dirname(self.path) or "."
        if is_default:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            check_socket_dir(directory)
        elif not stat.S_ISDIR(os.stat(directory).st_mode):  # stat says why: ENOENT, EACCES
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), directory)

    def _bind(self, mode: int) -> None:
        path = self.path
        if os.path.lexists(path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                probe.connect(path)
            except (ConnectionRefusedError, FileNotFoundError):
                log.info("replacing stale socket %s", path)
                os.unlink(path)
            else:
                raise SocketInUse(f"another ugem daemon is listening on {path}")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o777 & ~mode)
        try:
            sock.bind(path)
        except BaseException:
            sock.close()
            raise
        finally:
            os.umask(old_umask)
        self.sock = sock
        self._inode = os.stat(path).st_ino
        os.chmod(path, mode)
        sock.listen(128)
        sock.setblocking(False)

    def _lock(self) -> None:
        """Take PATH.lock. Without it two daemons finding one stale socket could both
        replace it, the second unlinking the first one's fresh socket."""
        lock_path = self._lock_path
        for _attempt in range(3):
            fd = OwnedFd(os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
            try:
                fcntl.flock(fd.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fd.close()
                raise SocketInUse(f"another ugem daemon holds {lock_path}: it is listening on "
                                  f"{self.path} or starting") from None
            try:  # race: the previous holder may have unlinked the file we locked
                current = os.stat(lock_path)
            except FileNotFoundError:
                current = None
            mine = os.fstat(fd.fd)
            if current is not None and (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
                self._lock_file = fd
                return
            fd.close()
        raise SocketInUse(f"could not take {lock_path}: it keeps being replaced")

    def close(self) -> None:
        """Close the socket, remove the socket file and the lock file if still ours; idempotent."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            with contextlib.suppress(FileNotFoundError):
                if self._inode is not None and os.stat(self.path).st_ino == self._inode:
                    os.unlink(self.path)
        if self._lock_file is not None:
            with contextlib.suppress(FileNotFoundError):  # remove the lock file only if it is still ours
                current = os.stat(self._lock_path)
                mine = os.fstat(self._lock_file.fd)
                if (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
                    os.unlink(self._lock_path)
            self._lock_file.close()
            self._lock_file = None
