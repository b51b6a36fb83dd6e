"""Spill directories of managers that died (SpillStore, spill.py): found and removed when a
manager starts in the same `spill_dir`.

Rules:
- a manager's subdirectory is made as ``.ugem-<pid>-<random>``, locked (flock on its
  ``lock`` file, held for the manager's life), filled, then renamed ``ugem-<pid>-<random>``,
  so none is found unlocked while being made;
- a ``ugem-*`` subdirectory whose lock nobody holds is a dead manager's: removed; one with no
  lock file is not a manager's: left alone;
- a hidden ``.ugem-*`` one (its maker died while making it) goes once the pid in its name is
  gone; a pid that cannot be checked counts as alive.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil

from ..fd import OwnedFd

__all__ = ["alive", "sweep_stale"]


def sweep_stale(spill_dir: str) -> None:
    """Remove subdirectories of managers that died without cleaning up (their lock is free;
    one still being made: its maker is gone)."""
    for entry in os.scandir(spill_dir):
        if entry.name.startswith(".ugem-") and entry.is_dir(follow_symlinks=False) \
                and not alive(entry.name.split("-")[1]):
            shutil.rmtree(entry.path, ignore_errors=True)
        if not (entry.name.startswith("ugem-") and entry.is_dir(follow_symlinks=False)):
            continue
        try:
            lock = OwnedFd(os.open(os.path.join(entry.path, "lock"), os.O_RDWR | os.O_CLOEXEC))
        except FileNotFoundError:
            continue  # not a manager's (theirs are named only once locked)
        with lock:
            try:
                fcntl.flock(lock.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live manager holds it
        with contextlib.suppress(OSError):
            shutil.rmtree(entry.path)


def alive(pid: str) -> bool:
    """Whether the process `pid` (a directory name's part) lives; anything unreadable: yes."""
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError) as exc:
        return not isinstance(exc, ProcessLookupError)
    return True
