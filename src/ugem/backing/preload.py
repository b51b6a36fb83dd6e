"""Reading a file into a preloaded object's memfd (SPEC §4 `--object LABEL=PATH`).

Rules:
- `open_source` runs on the core's thread at start: it opens the file (OSError if it is
  missing, unreadable, not a regular file or empty) and measures its data, the bytes not
  in holes (SEEK_DATA/SEEK_HOLE), which is what the copy will add to resident memory;
- `load_file` is the copy, on a worker thread (a LOAD job, core/preload.py): only the data
  segments are copied, with splice at explicit offsets (page cache to page cache,
  `spill.copy_ranges`), so holes stay holes; it writes through a description of the
  memfd of its own and closes both fds when it is done, whatever happens;
- it copies in chunks of `CHUNK` bytes, checking `stop()` between them (the manager is
  closing: the copy ends with ECANCELED) and logging progress: a line at the start, one
  at each tenth of the data for files of `PROGRESS_FROM` bytes of data or more, one at
  the end (or the error, at ERROR level).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Callable

from ..fd import OwnedFd
from .spill import copy_ranges, data_segments

__all__ = ["CHUNK", "PROGRESS_FROM", "load_file", "open_source"]

log = logging.getLogger("ugem.preload")
CHUNK = 64 << 20
PROGRESS_FROM = 256 << 20


def open_source(path: str) -> tuple[OwnedFd, int, int]:
    """(the file open read-only, its size, its bytes of data)."""
    source = OwnedFd(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
    try:
        st = os.fstat(source.fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
            raise OSError(errno.EINVAL, f"{path} is not a non-empty regular file")
        data = sum(length for _, length in data_segments(source.fd, 0, st.st_size))
    except BaseException:
        source.close()
        raise
    return source, st.st_size, data


def load_file(source: OwnedFd, dest: OwnedFd, label: str, size: int, stop: Callable[[], bool]) -> int:
    """Copy the data of source[0:size] to the same offsets of `dest`; returns bytes copied."""
    try:
        if stop():
            raise OSError(errno.ECANCELED, "the manager closed before the copy began")
        segments = data_segments(source.fd, 0, size)
        total = sum(length for _, length in segments)
        log.info("preloading %r: %d bytes, %d of them data", label, size, total)
        started, moved, reported = time.monotonic(), 0, 0
        for offset, length in segments:
            for start in range(offset, offset + length, CHUNK):
                if stop():
                    raise OSError(errno.ECANCELED, "the manager closed before the copy was done")
                moved += copy_ranges(source.fd, dest.fd, [(start, start, min(CHUNK, offset + length - start))])
                tenth = moved * 10 // total
                if total >= PROGRESS_FROM and tenth > reported and moved < total:
                    reported = tenth
                    log.info("preloading %r: %d%% (%d of %d bytes)", label, tenth * 10, moved, total)
        now = os.fstat(source.fd).st_size
        if now < size:  # what was read past the new end came from holes, not from the file
            raise OSError(errno.EIO, f"the file shrank from {size} to {now} bytes while it was being read")
        log.info("preloaded %r: %d bytes of data in %.1f s", label, moved, time.monotonic() - started)
        return moved
    except OSError as exc:
        if exc.errno != errno.ECANCELED:  # cancelled: the manager is closing, or failed to start
            log.error("preloading %r failed: %s", label, exc)
        raise
    finally:
        source.close()
        dest.close()
