"""Poller: level-triggered epoll with one tag per fd (what the loop dispatches on).

The `selectors` module does the same job but builds a key object per event and looks it
up through a file-object mapping: about 2 µs per wake-up, a tenth of a small request's
cost. Rules:
- `READ` and `WRITE` are EPOLLIN and EPOLLOUT; the kernel adds hang-ups and errors to
  any registration, and `poll` reports them as they come (the connection's next read or
  write sees the error and the connection is dropped);
- an fd is registered at most once; its tag is replaced by `modify`;
- `poll` returns epoll's (fd, events) pairs; the caller looks each fd's tag up in `tags`
  as it serves them, and skips an fd that is no longer there (unregistered by an earlier one).
"""

from __future__ import annotations

import select
from typing import Any

__all__ = ["READ", "WRITE", "Poller"]

READ = select.EPOLLIN
WRITE = select.EPOLLOUT


class Poller:
    def __init__(self) -> None:
        self._epoll = select.epoll()
        self.tags: dict[int, Any] = {}  # fd -> its tag (read-only outside this class)

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
        (one that is not there any more was unregistered meanwhile: skip it)."""
        return self._epoll.poll(timeout)

    def close(self) -> None:
        self._epoll.close()
        self.tags.clear()
