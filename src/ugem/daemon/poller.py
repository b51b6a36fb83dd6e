"""Poller: level-triggered epoll with one tag per fd (what the loop dispatches on).

The `selectors` module does the same job but builds a key object per event and looks it
up through a file-object mapping: about 2 µs per wake-up, a tenth of a small request's
cost. Rules:
- `READ` and `WRITE` are EPOLLIN and EPOLLOUT; the kernel adds hang-ups and errors to
  any registration, and `poll` reports them as they come (the connection's next read or
  write sees the error and the connection is dropped);
- an fd is registered at most once; its tag is replaced by `modify`;
- `poll` returns epoll's (fd, events) pairs; the caller looks each fd's tag up in `tags`
  as it serves them, and skips an fd that is no longer there (unregistered by an earlier one);
- busy polling (ugem/spin.py): while requests come close together, `poll` checks for
  events without sleeping for a moment before it sleeps in epoll. The peer is the client
  behind the first fd of the last events (`client_of(tag)`): the process it may be pinned
  with, and the window: `COPY_SPIN` while it holds an open bulk transfer (it is copying,
  and its XFER_DONE follows), else `DAEMON_SPIN`.
"""

from __future__ import annotations

import select
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..spin import COPY_SPIN, DAEMON_SPIN, BusyPoll

if TYPE_CHECKING:
    from ..core.client import Client

__all__ = ["READ", "WRITE", "Poller"]

READ = select.EPOLLIN
WRITE = select.EPOLLOUT


class Poller:
    def __init__(self, client_of: Callable[[Any], Client | None] = lambda tag: None) -> None:
        self._epoll = select.epoll()
        self.tags: dict[int, Any] = {}  # fd -> its tag (read-only outside this class)
        self._last_fd = -1  # the first fd of the last events
        self._client_of = client_of  # a tag's client (core/client.py), or None
        self._spin = BusyPoll(self._peer)
        self._check = lambda: self._epoll.poll(0)

    def register(self, fd: int, events: int, tag: Any) -> None:
        self._epoll.register(fd, events)
        self.tags[fd] = tag

    def modify(self, fd: int, events: int, tag: Any) -> None:
        self._epoll.modify(fd, events)
        self.tags[fd] = tag

    def unregister(self, fd: int) -> None:
        self._epoll.unregister(fd)
        del self.tags[fd]

    def poll(self, timeout: float) -> list[tuple[int, int]]:
        """The (fd, events) pairs epoll reports; the caller finds each fd's tag in `tags`
        (one that is not there any more was unregistered meanwhile: skip it). `timeout`
        0 checks without waiting; otherwise waits at most that long (busy polling first
        while hot)."""
        if timeout <= 0:
            return self._epoll.poll(0)
        client = self._client_of(self.tags.get(self._last_fd))
        window = COPY_SPIN if client is not None and client.transfers else DAEMON_SPIN
        events = self._spin.check(self._check, window) or self._spin.sleep(self._epoll.poll, timeout)
        if events:
            self._last_fd = events[0][0]
        return events

    def _peer(self) -> int | None:
        client = self._client_of(self.tags.get(self._last_fd))
        return None if client is None else client.creds.pid

    def close(self) -> None:
        self._epoll.close()
        self.tags.clear()
