"""The request table (drm_ioctls[]) and the one dispatcher both transports use.

Every operation is one `RequestDesc` row: op number, handler, request and reply structs,
permission flags. The daemon decodes frames into the request struct of the row, the
embedded transport builds the struct directly; both run it through `dispatch()`, so both
modes check exactly the same things: from a `Call` (call.py: the loop that re-runs it after
`Pending`, whose `step` calls `dispatch()`), or, in the daemon, a request of a row that is
not `takes_call` and carries no fds straight, made into a Call only if it must wait.
Handlers take ``(core, client, req)``; the few that keep state across re-runs or use the
embedded caller's own buffers (`takes_call`) take ``(core, call, req)`` and find the client
in ``call.client``. `ugem ops` and the daemon's decoder (`BY_OP`) read this table, and
tests/unit/test_exports.py checks it has one row per `Op`; nobody keeps a second list.

Permission checks live only in `check_permission()`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import PermissionDenied
from ..wire import structs as s
from ..wire import structs_domain as sd
from ..wire import structs_exec as sx
from ..wire import structs_share as ss
from ..wire.frames import Op
from ..wire.structs_preload import LookupReq
from . import gem, shares
from . import gem_domain as gd
from . import gem_exec as gx
from .client import Client
from .core import Core
from .gem_userptr import gem_userptr
from .preload import lookup
from .recycle import gem_reuse, mappings_forked

if TYPE_CHECKING:
    from .call import Call

__all__ = ["REQUESTS", "BY_OP", "Perm", "RequestDesc", "check_permission", "dispatch"]


class Perm(enum.Flag):
    NONE = 0
    PRIVILEGED = enum.auto()  # root or the manager's own uid (suspend, resume, listing all objects)


@dataclass(frozen=True, slots=True)
class RequestDesc:
    op: Op
    handler: Callable[[Core, Any, Any], s.Struct]  # (core, client, req); (core, call, req) if takes_call
    req: type[s.Struct]
    reply: type[s.Struct]
    perm: Perm = Perm.NONE
    doc: str = ""
    takes_call: bool = False


REQUESTS: tuple[RequestDesc, ...] = (
    RequestDesc(Op.GEM_CREATE, gem.gem_create, s.CreateReq, s.CreateReply, doc="new object, page-rounded"),
    RequestDesc(Op.GEM_CREATE_MAPPED, gem.gem_create_mapped, s.CreateReq, s.MmapReply,
                doc="new object mapped whole, no handle"),
    RequestDesc(Op.GEM_CLOSE, gem.gem_close, s.CloseReq, s.Empty, doc="drop a handle"),
    RequestDesc(Op.GEM_CLOSE_BATCH, gem.gem_close_batch, s.CloseBatchReq, s.Empty, doc="drop several handles"),
    RequestDesc(Op.GEM_INFO, gem.gem_info, s.InfoReq, s.InfoReply, doc="size, placement, advice, name"),
    RequestDesc(Op.GEM_PREAD, gem.gem_pread, s.PreadReq, s.PreadReply, doc="read bytes (inline or XFER)",
                takes_call=True),
    RequestDesc(Op.GEM_PWRITE, gem.gem_pwrite, s.PwriteReq, s.PwriteReply, doc="write bytes (inline or XFER)"),
    RequestDesc(Op.XFER_DONE, gem.xfer_done, s.XferDoneReq, s.Empty, doc="end a bulk transfer"),
    RequestDesc(Op.GEM_MMAP, gem.gem_mmap, s.MmapReq, s.MmapReply, doc="a tracked shared mapping"),
    RequestDesc(Op.GEM_MUNMAP, gem.gem_munmap, s.MunmapReq, s.Empty, doc="release tracked mappings"),
    RequestDesc(Op.GEM_FLINK, gem.gem_flink, s.FlinkReq, s.FlinkReply, doc="global name for an object"),
    RequestDesc(Op.GEM_OPEN, gem.gem_open, s.OpenReq, s.OpenReply, doc="new handle from a name"),
    RequestDesc(Op.PRIME_HANDLE_TO_FD, gem.prime_handle_to_fd, s.ExportReq, s.ExportReply, doc="export an fd"),
    RequestDesc(Op.PRIME_MAP_TO_FD, gem.prime_map_to_fd, s.MapExportReq, s.ExportReply,
                doc="export the object behind a tracked mapping"),
    RequestDesc(Op.GEM_SHARE, shares.gem_share, ss.ShareReq, s.Empty,
                doc="a one-use reference to a tracked mapping, for another process"),
    RequestDesc(Op.GEM_CLAIM, shares.gem_claim, ss.ClaimReq, s.MmapReply, doc="map a share and use it up"),
    RequestDesc(Op.GEM_DROP_SHARES, shares.gem_drop_shares, ss.DropSharesReq, s.Empty, doc="use shares up"),
    RequestDesc(Op.GEM_CLAIM_MAPPED, shares.gem_claim_mapped, ss.ClaimMappedReq, s.Empty,
                doc="track a share's memory the caller mapped itself"),
    RequestDesc(Op.GEM_SHARE_BATCH, shares.gem_share_batch, ss.ShareBatchReq, s.Empty, doc="several GEM_SHAREs"),
    RequestDesc(Op.GEM_CLAIM_MAPPED_BATCH, shares.gem_claim_mapped_batch, ss.ClaimMappedBatchReq, s.Empty,
                doc="several GEM_CLAIM_MAPPEDs", takes_call=True),
    RequestDesc(Op.PRIME_FD_TO_HANDLE, gem.prime_fd_to_handle, s.ImportReq, s.ImportReply, doc="import an fd"),
    RequestDesc(Op.GEM_MADVISE, gem.gem_madvise, s.MadviseReq, s.MadviseReply, doc="WILLNEED/DONTNEED; retained"),
    RequestDesc(Op.GEM_PIN, gem.gem_pin, s.HandleReq, s.Empty, doc="populate and keep in place"),
    RequestDesc(Op.GEM_UNPIN, gem.gem_unpin, s.HandleReq, s.Empty, doc="end this client's pin"),
    RequestDesc(Op.GEM_EXECBUFFER, gx.gem_execbuffer, sx.ExecbufferReq, sx.FenceReply, doc="submit device commands"),
    RequestDesc(Op.GEM_BUSY, gx.gem_busy, s.HandleReq, sx.BusyReply, doc="device work pending?"),
    RequestDesc(Op.GEM_WAIT, gx.gem_wait, sx.WaitReq, sx.WaitReply, doc="wait for an object's work",
                takes_call=True),
    RequestDesc(Op.WAIT_FENCE, gx.wait_fence, sx.WaitFenceReq, sx.WaitReply, doc="wait for a fence", takes_call=True),
    RequestDesc(Op.GEM_SET_DOMAIN, gd.gem_set_domain, sd.SetDomainReq, s.Empty, doc="hand over to CPU or device"),
    RequestDesc(Op.GEM_SET_TILING, gd.gem_set_tiling, sd.TilingReq, sd.TilingReply, doc="X/Y tiling and stride"),
    RequestDesc(Op.GEM_GET_TILING, gd.gem_get_tiling, s.HandleReq, sd.TilingReply, doc="tiling and stride"),
    RequestDesc(Op.GEM_SET_CACHING, gd.gem_set_caching, sd.CachingReq, s.Empty, doc="NONE/CACHED/DISPLAY"),
    RequestDesc(Op.GEM_GET_CACHING, gd.gem_get_caching, s.HandleReq, sd.CachingReply, doc="caching level"),
    RequestDesc(Op.SUSPEND, gx.suspend, s.Empty, s.Empty, Perm.PRIVILEGED, doc="save device memory, hold work"),
    RequestDesc(Op.RESUME, gx.resume, s.Empty, s.Empty, Perm.PRIVILEGED, doc="run device work again"),
    RequestDesc(Op.GEM_USERPTR, gem_userptr, s.UserptrReq, s.OpenReply, doc="wrap existing memory",
                takes_call=True),
    RequestDesc(Op.STATS, gem.stats, s.Empty, s.JsonReply, doc="manager-wide figures"),
    RequestDesc(Op.LIST_OBJECTS, gem.list_objects, s.Empty, s.JsonReply, Perm.PRIVILEGED, doc="every object"),
    RequestDesc(Op.LIST_CLIENTS, gem.list_clients, s.Empty, s.JsonReply, Perm.PRIVILEGED, doc="clients and handles"),
    RequestDesc(Op.DEBUG_OPEN, gem.debug_open, s.HandleReq, s.OpenReply, Perm.PRIVILEGED,
                doc="read-only handle by object id"),
    RequestDesc(Op.LOOKUP, lookup, LookupReq, s.FlinkReply, doc="name of a preloaded object, by label"),
    RequestDesc(Op.MAPPINGS_FORKED, mappings_forked, s.Empty, s.Empty,
                doc="the caller forks: never recycle the memory it maps"),
    RequestDesc(Op.GEM_REUSE, gem_reuse, s.ReuseReq, s.Empty,
                doc="may a mapping's object take new contents in place?"),
)

BY_OP: dict[int, RequestDesc] = {desc.op: desc for desc in REQUESTS}


def check_permission(perm: Perm, client: Client) -> None:
    # PRIVILEGED is only for root or the manager's own uid, decided at connect time
    if perm is not Perm.NONE and Perm.PRIVILEGED in perm and not client.privileged:
        raise PermissionDenied(f"this request needs a privileged client (root or the manager's uid); "
                               f"client {client.id} has uid {client.creds.uid}")


_ANYONE = Perm.NONE  # (a member looked up once: each `Perm.NONE` costs 0.1 us on Python 3.11)


def dispatch(core: Core, client: Client, desc: RequestDesc, req: s.Struct, call: Call | None = None) -> s.Struct:
    """Run one request of `client` once (its row `desc`, its struct `req`). Raises UgemError
    for operation failures, Pending to wait. `call` is the request's Call (call.py), which a
    `takes_call` row needs; a call of any other row may come without one (the daemon makes
    it only if the request must wait: its handler keeps nothing across runs)."""
    if desc.perm is not _ANYONE:
        check_permission(desc.perm, client)
    checked = req._checked
    if checked is not None and checked(req) != req._clean:  # (check()'s own test, without its call)
        req.check()
    return desc.handler(core, call if desc.takes_call else client, req)
