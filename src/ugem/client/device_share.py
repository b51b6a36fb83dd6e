"""Shares, the client side (a mixin of `Device`): how pickling by reference passes a mapping
to another process through the daemon (core/shares.py has the manager's rules).

- `_share(map_id, ...)`: a one-use reference to part of one of this client's tracked
  mappings, named by (owner client id, token);
- `_claim(owner, token, writable)`: map it in this process (a tracked mapping, entered in
  the registry like any other) and use the share up;
- `_drop_share(owner, token)`: use it up without mapping (this process maps that memory
  already); queued with the releases and sent before the next request, never from here.
"""

from __future__ import annotations

from typing import Any

from ..wire import structs as s
from ..wire import structs_share as ss
from ..wire.frames import Op

__all__ = ["ShareOps"]


class ShareOps:
    _released: Any  # the Device's release queue (client/releases.py)

    def _call(self, op: Op, req: s.Struct) -> Any:
        raise NotImplementedError

    def _map_reply(self, reply: s.MmapReply, writable: bool, what: str) -> memoryview:
        raise NotImplementedError

    def _share(self, map_id: int, offset: int, length: int, writable: bool) -> tuple[int, int]:
        r: ss.ShareReply = self._call(Op.GEM_SHARE, ss.ShareReq(map_id=map_id, flags=s.WRITABLE if writable else 0,
                                                                offset=offset, length=length))
        return int(r.owner), int(r.token)

    def _claim(self, owner: int, token: int, writable: bool) -> memoryview:
        reply: s.MmapReply = self._call(Op.GEM_CLAIM, ss.ClaimReq(owner=owner, token=token,
                                                                 flags=s.WRITABLE if writable else 0))
        return self._map_reply(reply, writable, f"share {token} of client {owner}")

    def _drop_share(self, owner: int, token: int) -> None:
        self._released.append((owner, token))
