"""Where the daemon's socket lives (SPEC §1, §4), shared by `ugem serve` and `ugem.connect`.

Default: $UGEM_SOCKET, else $XDG_RUNTIME_DIR/ugem/ugem.sock, else /tmp/ugem-<uid>/ugem.sock.
For the default locations (not an explicit path or $UGEM_SOCKET) the directory must be
ours, not a symlink, and not writable by group or others; otherwise someone else could
have planted a socket there and would see every request.
"""

from __future__ import annotations

import os
import stat

__all__ = ["check_socket_dir", "default_socket_path", "resolve_socket_path"]


def default_socket_path() -> str:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "ugem", "ugem.sock")
    return os.path.join("/tmp", f"ugem-{os.getuid()}", "ugem.sock")


def resolve_socket_path(path: str | None) -> tuple[str, bool]:
    """(path, is_default): an explicit path or $UGEM_SOCKET is used as given."""
    if path:
        return os.fspath(path), False
    env = os.environ.get("UGEM_SOCKET")
    if env:
        return env, False
    return default_socket_path(), True


def check_socket_dir(directory: str) -> None:
    """Refuse a default socket directory that is not safely ours (PermissionError)."""
    st = os.lstat(directory)
    if stat.S_ISLNK(st.st_mode):
        raise PermissionError(f"socket directory {directory} is a symlink; refusing to use it")
    if not stat.S_ISDIR(st.st_mode):
        raise PermissionError(f"socket directory {directory} is not a directory")
    if st.st_uid != os.getuid():
        raise PermissionError(f"socket directory {directory} is owned by uid {st.st_uid}, not {os.getuid()}")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PermissionError(f"socket directory {directory} is writable by group or others "
                              f"(mode {stat.S_IMODE(st.st_mode):o})")
