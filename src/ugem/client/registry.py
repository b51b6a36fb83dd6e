"""This process's registry of live ugem mappings, by address range.

Pickling by reference (client/pickling.py) finds whether an array's memory is ugem memory
from its data pointer. Every mapping a Device makes is entered here (address range -> the
Device, weakly, its map_id, the object offset the mapping starts at, its length, whether it
is writable, the identity of the memfd it maps, and the mapping itself, weakly) and removed
when the mapping dies (a callback of that weak reference, which also queues its release).
A process that receives memory it already maps (an array sent to a worker and returned)
finds that mapping by the memfd's identity (`find_by_key`) and uses it again instead of
mapping the object once more: a live mapping pins its memfd, so the identity cannot
meanwhile name another object. A mapping received in a process whose default device is
embedded is mapped straight from its fd (no Device, no map_id): it is entered with
`device=None`, which pickling reports as unable to travel onward.

A mapping that may linger (client/linger.py: one a claim made) is viewed through an array
over it (its exporter) rather than directly: the registry watches the exporter, so the
mapping outlives its last view. While it lingers its entry stays where it is, with a dead
exporter: nothing finds it by address or by key (`find_mapping` and `find_by_key` return
live mappings only), its Linger finds it by key (`starts_of`), and taking it back makes a
new exporter and watch in the same place (`rewatch`); releasing it forgets the entry
(`forget`). (Removing the entry when the last view dies and entering it anew when the memory
comes back cost a worker sent the same 2,000 arrays with every task a third of its part.)

Entries are inherited by a forked child, as the mappings are; their Device is then the
parent's, which the child cannot use (transport.py), and pickling says so. Nothing in the
child can find such an entry by key, so the first `lookup` that meets one takes it off the
key's list (its entry stays, for `find_mapping`): a Pool worker forked from a process that
maps the arrays it is sent would otherwise step over the parent's entry of each, every time.
"""

from __future__ import annotations

import bisect
import mmap
import os
import weakref
from collections import deque
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import numpy.typing as npt

from ..address import data_address

if TYPE_CHECKING:
    from .device import Device
    from .linger import Linger

__all__ = ["Lingering", "Mapping", "array_mapping", "fd_key", "find_by_key", "find_mapping", "forget", "lookup",
           "mapping_devices", "mapping_of", "register_mapping", "rewatch", "starts_of"]


class Mapping(NamedTuple):  # immutable, and made in a quarter of a microsecond (a frozen dataclass: 2 us)
    address: int
    length: int
    device: weakref.ref[Device] | None  # None: mapped from a received fd, no Device
    map_id: int
    offset: int  # where in the object the mapping starts
    writable: bool
    key: tuple[int, int]  # the memfd's (st_dev, st_ino)
    source: int = -1  # the daemon's own fd of that memfd (client/daemon_fds.py), -1: none known
    made: bool = False  # the whole, writable mapping of an object its Device made (GEM_CREATE_MAPPED: reusable)


_BYTE = np.dtype(np.uint8)  # (passed positionally: a keyword costs more than the call)
_starts: list[int] = []  # sorted start addresses
_by_start: dict[int, _Watch] = {}  # start address -> the watch of what views of the mapping there are made from,
# which carries its entry (one store changes both: a callback may run between two); dead: lingering
_by_key: dict[tuple[int, int], list[int]] = {}  # memfd identity -> start addresses
_callbacks: dict[int, weakref.ref[Any]] = {}  # id -> the weak reference of each mapping, until it fires


def fd_key(fd: int) -> tuple[int, int]:
    """The identity of the memfd `fd` refers to."""
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


class _Watch(weakref.ref):  # type: ignore[type-arg]
    """The weak reference that watches a mapping (or its exporter) and carries what its
    callback (`_gone`) needs: one object per mapping where a closure takes eight (the
    function, its tuple of six cells, the cells), which the cyclic collector then walks
    (2,000 arrays received make 14,000 fewer of them). Once it fired, a mapping that lingers
    is this very object (`Lingering`: its `entry` and the mapping, `region`), so that a
    view's death allocates nothing."""

    __slots__ = ("address", "map_id", "released", "linger", "region", "entry")

    address: int
    map_id: int
    released: deque[Any] | None
    linger: Linger | None
    region: mmap.mmap | None  # the mapping itself, when it may linger (the callback must not hold what it watches)
    entry: Mapping


Lingering = _Watch  # a mapping whose last view died (client/linger.py): `entry` (which stays: module rules), `region`


def _gone(ref: _Watch) -> None:
    del _callbacks[id(ref)]
    linger, released = ref.linger, ref.released
    ref.linger = ref.released = None  # (a lingering one is kept by its Linger: no cycle through it)
    if ref.region is not None and linger is not None and released is not None and linger.room(len(ref.region)):
        if not linger.arrived:
            released.append(None)  # the next send releases it (client/linger.py)
        linger.arrived.append(ref)  # its entry stays (module rules): this watch, dead, in `_by_start`
        return
    ref.region = None
    if _by_start.get(ref.address) is ref:  # (not if a new mapping took its address first)
        _remove(ref.entry)
    if released is not None:
        released.append(ref.map_id)


def _watch(watched: Any, entry: Mapping, released: deque[Any] | None, linger: Linger | None,
           region: mmap.mmap | None) -> _Watch:
    ref = _Watch(watched, _gone)
    ref.address, ref.map_id, ref.released, ref.linger, ref.region, ref.entry = \
        entry.address, entry.map_id, released, linger, region, entry
    _callbacks[id(ref)] = ref
    _by_start[entry.address] = ref  # (a new mapping's, or a lingering one's taken back: the same entry)
    return ref


def register_mapping(region: mmap.mmap, device: Device | None, map_id: int, offset: int, writable: bool,
                     key: tuple[int, int], source: int = -1, address: int = 0,
                     released: deque[Any] | None = None, linger: Linger | None = None, made: bool = False) -> Any:
    """Enter a live mapping (at `address`, if the caller knows it); returns what to make its
    views from (`region`, or with `linger` its exporter). When that dies its entry is
    forgotten and its id queued in `released` (a Device's release queue, client/releases.py),
    if given, or with `linger` (if it has room) the mapping handed to it, and a marker queued:
    a weak reference's callback (`_gone`), which does only that (it may run at any moment).
    The reference is kept in `_callbacks` until it fires, not only in `_by_start`: a new mapping
    may take the address (and the entry's place) between the munmap and the callback (another
    thread runs meanwhile), and the release must still be queued; the callback forgets its
    own entry only. (A `weakref.finalize` costs 5x more.)"""
    if not address:
        address = data_address(np.frombuffer(region, _BYTE))
    entry = Mapping(address, len(region), None if device is None else weakref.ref(device), map_id, offset, writable,
                    key, source, made)
    old = _by_start.get(address)
    watched: Any = region if linger is None else np.frombuffer(region, _BYTE)
    _watch(watched, entry, released, linger, None if linger is None else region)  # (entered before it is listed)
    i = bisect.bisect_left(_starts, address)
    if i == len(_starts) or _starts[i] != address:  # (not there, or its old entry's callback just took it out)
        _starts.insert(i, address)
    if old is not None:  # its region is gone, its callback not run yet (or just run)
        _unkey(old.entry)
    _by_key.setdefault(key, []).append(address)
    return watched


def rewatch(item: Lingering, released: deque[Any], linger: Linger) -> Any:
    """Take a lingering mapping back (its Linger, `linger`, gave it up: client/linger.py): what
    to make its views from, a new exporter watched as the first was (`register_mapping` with
    `released` and `linger`); its entry stays as it is."""
    region = item.region
    assert region is not None
    watched = np.frombuffer(region, _BYTE)
    _watch(watched, item.entry, released, linger, region)
    return watched


def forget(entry: Mapping) -> None:
    """A lingering mapping is released (client/linger.py): forget its entry."""
    ref = _by_start.get(entry.address)
    if ref is not None and ref.entry is entry:
        _remove(entry)


def starts_of(key: tuple[int, int]) -> list[int] | tuple[()]:
    """The addresses of the entries of mappings of the memfd `key`, live or lingering."""
    return _by_key.get(key, ())


def _remove(entry: Mapping) -> None:
    address = entry.address
    _unkey(entry)  # (unlisted before it goes)
    del _starts[bisect.bisect_left(_starts, address)]
    del _by_start[address]


def _unkey(entry: Mapping) -> None:
    starts = _by_key.get(entry.key)
    if starts is None or entry.address not in starts:  # a forked parent's, unlisted already (`lookup`)
        return
    starts.remove(entry.address)
    if not starts:
        del _by_key[entry.key]


def find_by_key(key: tuple[int, int], offset: int, length: int, writable: bool) -> tuple[Any, Mapping] | None:
    """A view (a memoryview, or a uint8 array) of bytes [offset, offset + length) of the memfd
    `key` through a live mapping of this process (writable if asked), and that mapping's entry,
    if there is one whose Device is open and this process's (not a forked parent's: such an
    array could not travel on)."""
    found = lookup(key, offset, length, writable)
    return None if found is None or found[0] is None else (found[0], found[1])


def lookup(key: tuple[int, int], offset: int, length: int, writable: bool) -> tuple[Any, Mapping] | None:
    """`find_by_key`, else (None, the entry of a lingering mapping of those bytes: client/linger.py)
    if there is one, else None."""
    lingering = None
    for address in _by_key.get(key, ()):
        ref = _by_start[address]
        entry = ref.entry
        if entry.device is not None:  # only a mapping that can travel on: its Device lives, in this process
            dev = entry.device()
            if dev is None or dev._transport is None:  # (gone, or closed: `closed` without its call)
                continue
            if dev._forked:  # a forked parent's: never one here, so no longer listed by key (module rules)
                _unkey(entry)
                return lookup(key, offset, length, writable)
        if entry.offset <= offset and offset + length <= entry.offset + entry.length \
                and (entry.writable or not writable):
            region = ref()
            if region is not None:
                start = offset - entry.offset
                if region.__class__ is np.ndarray:  # an exporter: a slice of it, an array (which the cyclic
                    return region[start:start + length], entry  # collector does not track, as it does a memoryview)
                return memoryview(region)[start:start + length], entry
            if lingering is None:
                lingering = entry
    return None if lingering is None else (None, lingering)


def mapping_devices() -> set[int]:
    """The ids of the Devices with a live mapping in this process."""
    found = set()
    for ref in list(_by_start.values()):
        entry = ref.entry
        device = entry.device() if entry.device is not None else None
        if device is not None:
            found.add(id(device))
    return found


def mapping_of(a: npt.NDArray[Any]) -> Mapping | None:
    """The live mapping that holds every byte of array `a` (any strides), if any."""
    found = array_mapping(a)
    return None if found is None else found[0]


def array_mapping(a: npt.NDArray[Any]) -> tuple[Mapping, int] | None:
    """`mapping_of(a)` and the address of `a`'s first element (pickling needs both)."""
    if a.size == 0 or a.dtype.hasobject:
        return None
    data = data_address(a)
    if a.flags.c_contiguous:  # the common case: no strides to walk
        entry = find_mapping(data, data + a.nbytes)
    else:
        low = data + sum(min(0, (n - 1) * st) for n, st in zip(a.shape, a.strides, strict=True))
        high = data + sum(max(0, (n - 1) * st) for n, st in zip(a.shape, a.strides, strict=True)) + a.itemsize
        entry = find_mapping(low, high)
    return None if entry is None else (entry, data)


def find_mapping(low: int, high: int) -> Mapping | None:
    """The live mapping that holds every byte of [low, high), if any (a lingering one holds no
    view's bytes)."""
    i = bisect.bisect_right(_starts, low) - 1
    if i < 0:
        return None
    address = _starts[i]
    ref = _by_start[address]
    entry = ref.entry
    return entry if high <= address + entry.length and ref() is not None else None
