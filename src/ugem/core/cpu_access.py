"""CPU access to objects the device holds: the implicit domain hand-over of pread, pwrite,
mmap and export (SPEC §2, §3), and pread/pwrite of objects pinned in VRAM.

- An object in VRAM that is not pinned is brought back to system memory first
  (`Gpu.to_cpu`): readers wait for the device's writes, writers for all its work.
- An object pinned in VRAM stays there: pread copies out of VRAM into the caller's buffer
  (or a bounce memfd for a bulk transfer), pwrite copies into VRAM; both are ordered on
  the device timeline, so later device work and later reads see the bytes in order.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

from ..constants import PAGE_SIZE, page_align
from ..gpu.base import CopyIn, CopyOut
from ..wire import structs as s
from .object import BufferObject
from .states import Placement

if TYPE_CHECKING:
    from .call import Call
    from .client import Client
    from .core import Core

__all__ = ["pinned_in_vram", "pread_vram", "prepare_cpu", "pwrite_vram", "finish_vram_write"]


def pinned_in_vram(obj: BufferObject) -> bool:
    return bool(obj.pinned_by) and obj.placement == Placement.VRAM


def prepare_cpu(core: Core, obj: BufferObject, write: bool) -> None:
    """Spilled -> back; in VRAM -> out; then wait for the device (Pending)."""
    core.memory.ensure_system(obj)
    core.gpu.to_cpu(obj, write)


def _vram_offset(obj: BufferObject, offset: int) -> int:
    return int(obj.vram.start) * PAGE_SIZE + offset


def pread_vram(core: Core, call: Call, obj: BufferObject, req: s.PreadReq) -> s.PreadReply:
    """Read an object pinned in VRAM: a copy out on the timeline, then the reply (the copy
    in flight is kept in `call.bounce` while the request waits for it)."""
    if call.bounce is None:
        if req.flags & s.XFER:
            bounce = core.backing.scratch(page_align(req.offset + req.length))
            view = core.backing.map(bounce)[req.offset:req.offset + req.length]
        else:
            bounce = None
            view = call.into if call.into is not None else bytearray(req.length)
        seq = core.gpu.submit(CopyOut(_vram_offset(obj, req.offset), view, req.length))
        call.bounce = (seq, bounce, view)
    seq, bounce, view = call.bounce
    core.gpu.wait_for(seq)
    call.bounce = None
    if bounce is None:
        return s.PreadReply(data=view)
    with bounce:
        fd = core.backing.open_description(bounce, writable=False)
    return s.PreadReply(xfer_id=core.xfer_add(call.client, obj), fd=fd)


def pwrite_vram(core: Core, client: Client, obj: BufferObject, req: s.PwriteReq) -> s.PwriteReply:
    """Write an object pinned in VRAM: a copy in, queued on the timeline (no wait)."""
    if req.flags & s.XFER:
        bounce = core.backing.scratch(page_align(req.offset + req.length))
        fd = core.backing.open_description(bounce, writable=True)
        ending = partial(finish_vram_write, core, obj, bounce, req.offset, req.length)  # (at XFER_DONE)
        xfer_id = core.xfer_add(client, obj, ending=ending)
        return s.PwriteReply(xfer_id=xfer_id, fd=fd)
    seq = core.gpu.submit(CopyIn(_vram_offset(obj, req.offset), bytes(req.data), req.length))
    obj.last_fence = obj.write_fence = seq
    obj.vram_dirty = True  # the VRAM copy is now the newer one: copied back when it leaves
    return s.PwriteReply()


def finish_vram_write(core: Core, obj: BufferObject, bounce: Any, offset: int, length: int) -> None:
    """XFER_DONE of a pwrite into an object pinned in VRAM: queue the copy in."""
    with bounce:
        if obj.vram is not None:
            view = core.backing.map(bounce)[offset:offset + length]
            seq = core.gpu.submit(CopyIn(_vram_offset(obj, offset), view, length))
            obj.last_fence = obj.write_fence = seq
            obj.vram_dirty = True
