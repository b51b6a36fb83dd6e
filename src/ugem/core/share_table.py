"""The manager's table of shares (core/shares.py has the requests): who holds each one, and
what happens to them when their client goes away.

Rules:
- a share lives in its sending client's `shares` (token -> Share) and holds its object as
  a tracked mapping does (`hold` when made, `let_go` when used up or dropped): a reference,
  and a count in `obj.maps`, so the object is never spilled while a share of it is in
  flight (a receiver may map its memfd before its claim is read: core/shares.py);
- when that client goes away with shares nobody claimed, they pass to another client of the
  same process (same pid and uid), its *heir*, if there is one: a process that closed the
  Device it sent from still holds what it sent, as it would an fd in flight, until it ends.
  They keep their name (owner id, token) and are found in `orphans`. With no heir they are
  dropped, and their objects' memfds are never recycled (a receiver may have mapped one
  already, untracked: core/recycle.py); an heir going away passes them on the same way;
- `find`, `take` and `drop_client` are the only ways in and out: nothing else touches
  `orphans` or a client's `shares`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from .client import Client
from .object import BufferObject

__all__ = ["Share", "ShareTable"]


@dataclass(slots=True)
class Share:
    obj: BufferObject
    offset: int
    length: int
    writable: bool
    uid: int  # the sender's: who may claim it (that uid, or root)


class Watcher(Protocol):
    def watch(self, obj: BufferObject) -> None: ...


class ShareTable:
    def __init__(self, clients: dict[int, Client], get: Callable[[BufferObject], None],
                 put: Callable[[BufferObject], None], memory: Watcher) -> None:
        self._clients = clients
        self._get = get
        self._put = put
        self._memory = memory
        self.orphans: dict[tuple[int, int], tuple[Share, int]] = {}  # (owner, token) -> (share, heir id)
        self._inherited: dict[int, set[tuple[int, int]]] = {}  # heir id -> the orphans it holds

    def hold(self, obj: BufferObject) -> None:
        """A new share of `obj` holds it as a mapping would."""
        self._get(obj)
        obj.maps += 1
        self._memory.watch(obj)

    def let_go(self, obj: BufferObject) -> None:
        """A share of `obj` was used up or dropped (nothing was written through it: no
        measuring; Memory.refresh unwatches it once nothing else keeps it volatile)."""
        obj.maps -= 1
        self._put(obj)

    def find(self, owner_id: int, token: int) -> Share | None:
        owner = self._clients.get(owner_id)
        if owner is not None:
            return owner.shares.get(token)
        orphan = self.orphans.get((owner_id, token))
        return None if orphan is None else orphan[0]

    def take(self, owner_id: int, token: int) -> Share | None:
        """Remove a share (claimed or dropped); the caller puts its reference."""
        owner = self._clients.get(owner_id)
        if owner is not None:
            return owner.shares.pop(token, None)
        orphan = self.orphans.pop((owner_id, token), None)
        if orphan is None:
            return None
        self._inherited[orphan[1]].discard((owner_id, token))
        return orphan[0]

    def drop_client(self, client: Client) -> None:
        """`client` is going away: its shares, and those it inherited, pass to its heir or die."""
        keys = [(client.id, token) for token in client.shares]
        held = [*zip(keys, client.shares.values(), strict=True),
                *((key, self.orphans.pop(key)[0]) for key in self._inherited.pop(client.id, ()))]
        client.shares = {}
        if not held:
            return
        heir = next((c for c in self._clients.values() if c is not client and not c.closed
                     and c.creds.pid == client.creds.pid and c.creds.uid == client.creds.uid), None)
        for key, share in held:
            if heir is None:
                share.obj.escaped = True  # a receiver may map it already, untracked (core/recycle.py)
                self.let_go(share.obj)
            else:
                self.orphans[key] = (share, heir.id)
                self._inherited.setdefault(heir.id, set()).add(key)
