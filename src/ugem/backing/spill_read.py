"""Reading a spilled object's bytes straight from spill storage, without bringing it back.

A pread of a spilled object used to restore it first: a copy from the spill files into a
fresh memfd (whose new pages cost the kernel an allocation and a zeroing each), then the
client's copy out of that memfd, one after the other. Read where they lie instead, the
bytes take one copy: spill file (page cache) -> pipe (splice moves page references, no
copy) -> the client's buffer (its read of the pipe, the one copy), the two ends running at
once. The object stays spilled, and takes no memory under the budget.

Rules:
- the runs of a read are what of [start, end) the extent holds, in order of object offset:
  (object offset, spill file, file offset, length), cut from the copy plan of the spill
  (spill.py `read_plan`); the rest of the range reads as zeros (holes were never copied out);
- `pump(files, runs, pipe)` (a worker thread) splices those runs into the pipe, whose
  write end it owns and closes when done, failed or given up: the reader sees the end of
  the pipe early then, and fails the read. It works on its own dups of the spill files (a
  close() meanwhile fails it with EBADF, never reads another file), and gives up when the
  reader closed its end (EPIPE) or has not taken a byte for STALL_S seconds: a reader that
  never reads holds a thread that long, and never an object;
- an extent being read must keep its ranges and its data: SpillStore holds its release
  (`readers`) until the last reading ends, and the core does not punch it meanwhile.
"""

from __future__ import annotations

import errno
import os
import select

from ..fd import OwnedFd

__all__ = ["STALL_S", "Run", "pump"]

STALL_S = 30.0
Run = tuple[int, int, int, int]  # (object offset, spill file index, file offset, length)


def pump(store_files: list[OwnedFd], runs: list[Run], pipe: OwnedFd) -> int:
    """Splice `runs` from the store's spill files into `pipe` (its write end, closed here);
    returns the bytes sent. OSError if it gave up (module rules)."""
    sent = 0
    files: list[OwnedFd] = []
    try:
        files += [f.dup() for f in store_files]  # a close() meanwhile cannot hand its number to another file
        os.set_blocking(pipe.fd, False)
        for _, i, at, length in runs:
            done = 0
            while done < length:
                try:
                    n = os.splice(files[i].fd, pipe.fd, length - done, offset_src=at + done)
                except BlockingIOError:  # the pipe is full: wait for the reader
                    ready = select.poll()
                    ready.register(pipe.fd, select.POLLOUT)
                    if not ready.poll(STALL_S * 1000):
                        raise OSError(errno.ETIMEDOUT, f"the reader took no byte for {STALL_S:g} s") from None
                    continue
                if n <= 0:
                    raise OSError(errno.EIO, f"spill storage ended {length - done} bytes early")
                done += n
            sent += length
        return sent
    finally:
        pipe.close()
        for f in files:
            f.close()
