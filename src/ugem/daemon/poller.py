"""Poller: level-triggered epoll with one tag per fd (what the loop dispatches on).

The `selectors` module does the same job but builds a key object per event and looks it
up through a file-object mapping: about 2 µs per wake-up, a tenth of a small request's
cost. Rules:
- `READ` and `WRITE` are EPOLLIN and EPOLLOUT; the kernel adds hang-ups and errors to
  any registration, and `poll` reports them as they come (the connection's next read or
  write sees the error and the connection is dropped);
- an fd is registered at most once; its tag is replaced by `modify`;
- `poll` returns (tag, events) pairs for the fds still registered when it returns.
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
        self._tags: dict[int, Any] = {}

    def register(self, fd: int, events: int, tag: Any) -> None:
        self._epoll.register(fd, events)
        self._tags[fd] = tag

    def modify(self, fd: int, events: int, tag: Any) -> None:
        self._epoll.modify(fd, events)
        self._tags[fd] = tag

    def unregister(self, fd: int) -> None:
        self._epoll.unregister(fd)
        del self._tags[fd]

    def poll(self, timeout: float) -> list[tuple[Any, int]]:
        tags = self._tags
        ready = []
        for fd, events in self._epoll.poll(timeout):  # a loop, not a comprehension: one frame less
            if fd in tags:
                ready.append((tags[fd], events))
        return ready

    def close(self) -> None:
        self._epoll.close()
        self._tags.clear()
