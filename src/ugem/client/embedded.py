"""EmbeddedTransport: a Device's requests run by the Manager in this process.

`call()` runs the request through the Manager (`Manager._call`: the same table, `Call`
and `dispatch()` the daemon uses, under the Manager's lock); the handler consumes the fds
inside the request struct. Releases (`notes`) and posted frames run first/alone, and their
failures (ids already gone) are nobody's to see, as over a socket (client/transport.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..errors import UgemError
from ..wire import structs as s
from ..wire.frames import XFER_ABOVE, Op

if TYPE_CHECKING:
    from ..core.client import Client
    from ..manager import Manager

__all__ = ["EmbeddedTransport"]


class EmbeddedTransport:
    embedded = True
    lost = False  # no daemon to lose
    inline_limit = XFER_ABOVE  # a larger pread takes the XFER path (its result allocated once accepted)

    def __init__(self, manager: Manager, client: Client) -> None:
        self.manager = manager
        self.client = client
        self.client_id = client.id

    def call(self, op: Op, req: s.Struct, notes: Sequence[tuple[Op, s.Struct]] = (), **local: Any) -> Any:
        """`local`: the caller's own memory for the request (pread `into`, userptr `buffer`)."""
        for note_op, note in notes:  # releases: their failures (ids already gone) are nobody's
            try:
                self.manager._call(self.client, note_op, note)
            except UgemError:
                pass
        return self.manager._call(self.client, op, req, **local)

    def post(self, frames: Sequence[tuple[Op, s.Struct]]) -> None:
        """As over a socket: the failures are nobody's here (shares report theirs to their claimer)."""
        for op, req in frames:
            try:
                self.manager._call(self.client, op, req)
            except UgemError:
                pass

    post_lazy = post  # (no lazy channel: client/lazy.py)

    def close(self) -> None:
        self.manager._release(self.client)

    def forsake(self) -> None:
        """In a forked child: let go without touching the manager (its Manager is dead
        there too, manager.py)."""
