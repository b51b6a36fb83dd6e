"""Fork safety: a connection (or an embedded client) belongs to the process that made it.

Devices register with `track_for_fork`; in a forked child, `os.register_at_fork` swaps each one's
transport for a `ForkedTransport` whose every call is EBADF telling to connect again. The
child closes its copy of the socket fd (a plain close, never shutdown: the parent's
connection is untouched) and never sends, reads or waits on it; finalizers there (mapping
and Buffer release) only queue, and nothing is ever flushed. No cost per call.

Before the fork, in the parent: the child inherits this process's mappings, which the
manager does not know of, so it must never recycle the memory behind them for another
object (core/recycle.py). Each Device that ever mapped (`track_mappings`) and maps
something now (or is making a mapping, or has mappings lingering: client/linger.py, which
the call's queue releases first) tells its manager so with MAPPINGS_FORKED, waiting
for the reply, so that it is served before any later release of those mappings, even if
the parent dies right after the fork (client/device_share.py `_before_fork`). A fork then
waits for a call another thread has in flight on that Device. A process that maps
nothing pays nothing.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Sequence
from typing import Any, Protocol

from ..errors import BadFd
from ..fd import OwnedFd
from ..wire import structs as s
from ..wire.frames import XFER_ABOVE, Op
from .registry import mapping_devices

__all__ = ["ForkedTransport", "track_for_fork", "track_mappings"]


class ForkedTransport:
    """A Device's transport in a forked child of the process that made it: every call is
    EBADF, at once; closing does nothing (the parent's connection is not the child's)."""

    lost = False
    inline_limit = XFER_ABOVE

    def __init__(self, embedded: bool, client_id: int, parent_pid: int) -> None:
        self.embedded = embedded
        self.client_id = client_id
        self._message = (f"this Device was made by process {parent_pid} and cannot be used in its forked child "
                         f"(process {os.getpid()}): connect again in the child (ugem.connect(), or ugem.embedded() "
                         f"for a manager of its own)")

    def call(self, op: Op, req: s.Struct, notes: Sequence[tuple[Op, s.Struct]] = (), **local: Any) -> Any:
        for name in req.FDS:  # a request's fds are the transport's to close, as in the others
            fd = getattr(req, name)
            if isinstance(fd, OwnedFd):
                fd.close()
        raise BadFd(self._message)

    def post(self, frames: Sequence[tuple[Op, s.Struct]]) -> None:
        raise BadFd(self._message)

    post_lazy = post  # (no lazy channel: client/lazy.py)

    def close(self) -> None:
        pass

    def forsake(self) -> None:
        pass


class _ForkAware(Protocol):
    def _after_fork_in_child(self) -> None: ...


_TRACKED: weakref.WeakSet[_ForkAware] = weakref.WeakSet()


def track_for_fork(obj: _ForkAware) -> None:
    """Call `obj._after_fork_in_child()` in every forked child while `obj` lives."""
    _TRACKED.add(obj)


def _after_fork_in_child() -> None:
    for obj in list(_TRACKED):
        obj._after_fork_in_child()


class _Mapper(Protocol):
    def _before_fork(self, mapping: set[int]) -> None: ...


_MAPPERS: weakref.WeakSet[_Mapper] = weakref.WeakSet()


def track_mappings(device: _Mapper) -> None:
    """Call `device._before_fork(ids of the Devices mapping something)` before every fork while it lives."""
    _MAPPERS.add(device)


def _before_fork() -> None:
    if _MAPPERS:
        mapping = mapping_devices()
        for device in list(_MAPPERS):
            device._before_fork(mapping)


os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


