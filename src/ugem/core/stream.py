"""Preads of spilled objects served straight from spill storage (GEM_PREAD with XFER|STREAM).

Why (backing/spill_read.py): restoring the object and then copying it out took two copies,
one after the other, the first into fresh pages; read where they lie, its bytes take one
copy, in the client, while the daemon pumps, and the object stays spilled.

Rules:
- only in the daemon (`descriptions_leave`: an embedded client reads in the manager's own
  process, under its lock, and would wait for a pipe nobody pumps) and only when the
  request asks (STREAM): the reply's fd is then a pipe, its data the runs it carries
  (PIECE records), and no transfer is opened (no XFER_DONE);
- only for an object that is SPILLED now, NORMAL memory, with no job in flight and no
  failed restore (that error is the request's): else the pread restores it as before;
- at most STREAMS_PER_UID reads in flight per uid and STREAMS_MAX in all: each holds a
  worker thread (not a mover: daemon/workers.py) while its reader reads, at most
  spill_read.STALL_S when it does not. Past those limits, or for an object in more than
  MAX_RUNS runs (the reply lists them), a pread restores as before: a uid whose readers
  never read slows nobody but itself;
- the pipe carries the object's bytes as they were when the request was served: the
  extent of a spilled object never changes, and one restored, purged or freed meanwhile
  is given back only when the read has ended (SpillStore.read_done, on the core's thread
  when the job is done). A reader that stops early closes its end; the pump then gives up;
- asked with TAKES_FD and STREAM_TAKES (a client that may copy our fds), the client reads the
  runs from our spill files itself (taken as TAKES_FD memory is, each checked against the
  identity the reply gives), in parts on its copy threads: no pipe, no pump, no thread of
  ours, so none of the limits above. The reply opens a transfer instead (STREAMED|TAKEN,
  SPILL_RUN records): the extent's release waits until its XFER_DONE or the client's end.
  Such a client could copy the spill files any time, so this gives it nothing new.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from ..wire import structs as s
from .jobs import Job, JobKind
from .object import BufferObject, Kind
from .states import Placement

if TYPE_CHECKING:
    from .client import Client
    from .core import Core

__all__ = ["MAX_RUNS", "STREAMS_MAX", "STREAMS_PER_UID", "stream_spilled"]

STREAMS_MAX = 4
STREAMS_PER_UID = 2
MAX_RUNS = 4096  # 64 KiB of PIECE records


def stream_spilled(core: Core, client: Client, obj: BufferObject, req: s.PreadReq) -> s.PreadReply | None:
    """The reply of a pread (range checked) served from spill storage, or None: restore."""
    memory, uid = core.memory, client.creds.uid
    if not (core.descriptions_leave and obj.placement == Placement.SPILLED and obj.kind == Kind.NORMAL
            and obj.job is None and obj not in memory.failed):
        return None
    extent = obj.extent
    if req.flags & s.STREAM_TAKES and req.flags & s.TAKES_FD:
        direct = core.backing.spill_read_direct(extent, req.offset, req.offset + req.length, MAX_RUNS)
        if direct is not None:
            xfer_id = core.xfer_add(client, obj, ending=partial(core.backing.spill_read_done, extent), watch=False)
            return s.PreadReply(xfer_id=xfer_id, flags=s.STREAMED | s.TAKEN,
                                data=b"".join(s.SPILL_RUN.pack(fd, 0, dev, ino, at, offset, n)
                                              for fd, dev, ino, at, offset, n in direct))
    if memory.streams.get(uid, 0) >= STREAMS_PER_UID or sum(memory.streams.values()) >= STREAMS_MAX:
        return None
    try:
        read = core.backing.spill_read(extent, req.offset, req.offset + req.length, MAX_RUNS)
    except OSError:  # no fd for a pipe: restore instead
        return None
    if read is None:
        return None
    runs, read_end, work = read

    def done(job: Job) -> None:
        core.backing.spill_read_done(extent)
        left = memory.streams[uid] - 1
        if left:
            memory.streams[uid] = left
        else:
            del memory.streams[uid]

    memory.streams[uid] = memory.streams.get(uid, 0) + 1
    memory.background.append(Job(JobKind.STREAM, obj, work, 0, extent=extent, then=done))
    return s.PreadReply(flags=s.STREAMED, data=b"".join(s.PIECE.pack(at, n) for at, _, _, n in runs), fd=read_end)
