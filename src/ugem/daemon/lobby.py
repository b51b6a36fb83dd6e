"""Lobby: the connections that have not completed HELLO, per uid, oldest first (SPEC §5).

A flood of connections from one uid must never keep another uid from connecting and
being served. Connections are counted per uid from accept (`Core.uids`, greeted or not);
the lobby holds those still waiting for HELLO and answers the server's three questions:
- `turns_away(uid, privileged)`: a uid already holding `uid_max_clients` + `HELLO_SLACK`
  connections has the next one closed at accept (up to the slack more are kept, so that
  HELLO can tell them EDQUOT);
- `evictees(count)`: which waiting connections to drop when fds run short: oldest first,
  each time from the uid holding the most connections (counting the ones already picked);
- `overdue(now, limit)`: waiting connections accepted more than `limit` seconds ago.
The lobby never closes anything itself: the server drops what it names, and tells the
lobby (`leave`) when a connection completes HELLO or goes.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..core.core import Core
    from .connection import Connection

__all__ = ["HELLO_SLACK", "Lobby"]

HELLO_SLACK = 16  # connections a uid may open past uid_max_clients, to be refused at HELLO


class Lobby:
    def __init__(self, core: Core) -> None:
        self.core = core
        self._waiting: dict[int, dict[Connection, None]] = {}  # uid -> its connections, oldest first

    def __bool__(self) -> bool:
        return bool(self._waiting)

    def turns_away(self, uid: int, privileged: bool) -> bool:
        limit = self.core.uid_max_clients(privileged)
        usage = self.core.uids.get(uid)
        return limit is not None and usage is not None and usage.connections >= limit + HELLO_SLACK

    def enter(self, conn: Connection) -> None:
        self._waiting.setdefault(conn.client.creds.uid, {})[conn] = None

    def leave(self, conn: Connection) -> None:
        uid = conn.client.creds.uid
        waiting = self._waiting.get(uid)
        if waiting is not None:
            waiting.pop(conn, None)
            if not waiting:
                del self._waiting[uid]

    def evictees(self, count: int) -> list[Connection]:
        candidates = {uid: list(itertools.islice(waiting, count)) for uid, waiting in self._waiting.items()}
        held = {uid: self.core.uids[uid].connections for uid in candidates}
        chosen: list[Connection] = []
        while candidates and len(chosen) < count:
            uid = max(candidates, key=held.__getitem__)
            chosen.append(candidates[uid].pop(0))
            held[uid] -= 1
            if not candidates[uid]:
                del candidates[uid]
        return chosen

    def overdue(self, now: float, limit: float) -> list[Connection]:
        return [conn for waiting in self._waiting.values()
                for conn in itertools.takewhile(lambda c: now - c.accepted > limit, waiting)]
