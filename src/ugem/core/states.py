"""Placement of an object's contents: a state machine written as a table (h11 _state.py).

Rule 1: every change of `BufferObject.placement` goes through `apply()`, which looks the
(state, event) pair up in TRANSITIONS and raises on an illegal one. Nothing else assigns
placement.

States::

    NONE     no pages yet (reads as zeros; no memfd needed)
    SYSTEM   pages in the object's memfd
    VRAM     contents live in device memory (system pages may remain as a clean copy)
    SPILLED  contents in spill storage; no fd held
    PURGED   contents discarded (DONTNEED under pressure); final
    FREED    the object is gone (last reference dropped); final

Events: populate, migrate, evict, spill, restore, purge, free.
"""

from __future__ import annotations

import enum

from ..constants import PLACEMENT_LABELS

__all__ = ["Event", "IllegalTransition", "Placement", "TRANSITIONS", "apply"]


class Placement(enum.IntEnum):
    NONE = 0
    SYSTEM = 1
    VRAM = 2
    SPILLED = 3
    PURGED = 4
    FREED = 5

    @property
    def label(self) -> str:
        return PLACEMENT_LABELS[self.value]


class Event(enum.Enum):
    # hashed by identity (a member is equal only to itself): Enum's own __hash__ is a Python
    # call, 0.1 us per TRANSITIONS lookup on Python 3.11
    __hash__ = object.__hash__

    POPULATE = "populate"
    MIGRATE = "migrate"
    EVICT = "evict"
    SPILL = "spill"
    RESTORE = "restore"
    PURGE = "purge"
    FREE = "free"


P, E = Placement, Event
TRANSITIONS: dict[Placement, dict[Event, Placement]] = {
    P.NONE: {E.POPULATE: P.SYSTEM, E.MIGRATE: P.VRAM, E.PURGE: P.PURGED, E.FREE: P.FREED},
    P.SYSTEM: {E.MIGRATE: P.VRAM, E.SPILL: P.SPILLED, E.PURGE: P.PURGED, E.FREE: P.FREED},
    P.VRAM: {E.EVICT: P.SYSTEM, E.SPILL: P.SPILLED, E.PURGE: P.PURGED, E.FREE: P.FREED},
    P.SPILLED: {E.RESTORE: P.SYSTEM, E.PURGE: P.PURGED, E.FREE: P.FREED},
    P.PURGED: {E.FREE: P.FREED},
    P.FREED: {},
}
del P, E


class IllegalTransition(RuntimeError):
    """A bug: the core tried a transition the table forbids."""


def apply(state: Placement, event: Event) -> Placement:
    """The state after `event`; raises on a transition the table does not allow."""
    try:
        return TRANSITIONS[state][event]
    except KeyError:
        raise IllegalTransition(f"illegal placement transition: {event.value} in state {state.label}") from None
