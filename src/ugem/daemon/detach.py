"""`ugem serve --detach`: the fork that puts the daemon in the background.

The parent returns once the daemon has let go of the pipe on its stdout: 0 after passing
the daemon's banner on (it listens), else the daemon's exit status (it failed to start;
its reason is on stderr, which both share). The child goes on to be the daemon.
"""

from __future__ import annotations

import os
import sys

__all__ = ["detach", "let_go_of_stdout"]


def detach() -> int | None:
    """`serve --detach`: fork. The child goes on to be the daemon (None), in a session of its
    own with stdin on /dev/null and stdout on a pipe to the parent, which returns once the
    daemon has let go of that pipe: 0 after passing its banner on (it listens), else the
    daemon's exit status (it failed to start; its reason is on stderr, which both share)."""
    sys.stdout.flush()
    sys.stderr.flush()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(write_fd, 1)
        os.close(devnull)
        os.close(write_fd)
        return None
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        banner = pipe.read()  # until the daemon lets go of its stdout: after its banner, or at exit
    if banner.startswith(b"ugem: listening on "):
        sys.stdout.write(banner.decode(errors="replace"))
        return 0
    status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    return status if status > 0 else 1


def let_go_of_stdout() -> None:
    """The detached daemon after its banner: stdout to /dev/null (the parent sees EOF)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
