"""This process's registry of live ugem mappings, by address range.

Pickling by reference (client/pickling.py) finds whether an array's memory is ugem memory
from its data pointer. Every mapping a Device makes is entered here (address range -> the
Device, weakly, its map_id, the object offset the mapping starts at, its length, whether it
is writable) and removed by the finalizer that releases it. A mapping received in a process
whose default device is embedded is mapped straight from its fd (no Device, no map_id): it
is entered with `device=None`, which pickling reports as unable to travel onward.

Entries are inherited by a forked child, as the mappings are; their Device is then the
parent's, which the child cannot use (transport.py), and pickling says so.
"""

from __future__ import annotations

import bisect
import mmap
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .device import Device

__all__ = ["Mapping", "find_mapping", "forget_mapping", "register_mapping"]


@dataclass(frozen=True, slots=True)
class Mapping:
    address: int
    length: int
    device: weakref.ref[Device] | None  # None: mapped from a received fd, no Device
    map_id: int
    offset: int  # where in the object the mapping starts
    writable: bool


_starts: list[int] = []  # sorted start addresses
_by_start: dict[int, Mapping] = {}


def register_mapping(region: mmap.mmap, device: Device | None, map_id: int, offset: int, writable: bool) -> int:
    """Enter a live mapping; returns its address (the key to forget it by)."""
    address = int(np.frombuffer(region, dtype=np.uint8).__array_interface__["data"][0])
    entry = Mapping(address, len(region), None if device is None else weakref.ref(device), map_id, offset, writable)
    if address not in _by_start:
        bisect.insort(_starts, address)
    _by_start[address] = entry
    return address


def forget_mapping(address: int) -> None:
    if _by_start.pop(address, None) is not None:
        del _starts[bisect.bisect_left(_starts, address)]


def find_mapping(low: int, high: int) -> Mapping | None:
    """The live mapping that holds every byte of [low, high), if any."""
    i = bisect.bisect_right(_starts, low) - 1
    if i < 0:
        return None
    entry = _by_start[_starts[i]]
    return entry if high <= entry.address + entry.length else None
