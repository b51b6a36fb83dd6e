"""One value of a `UgemBuffer` in its object: how it is written there and read back (buffer.py
has the rules; this is their mechanics).

- `store(value, writer_device, device)`: a numpy array is written raw (a C- or
  Fortran-contiguous array as is, any other made C-contiguous first; dtype, shape and
  strides kept in the `Stored` record), any other value as the bytes of Dask's own
  serialization (uncompressed). The bytes go into a new object made through the writer's
  connection and handed over to the worker's connection by name (writer.py);
- they are written straight into the daemon's own fd of the object's memory
  (`Device.write_taken`), or where this process may not copy it, through a mapping of
  the object; never by a bulk pwrite, which hands this process a description of the
  object's memfd, after which the daemon never recycles it (core/recycle.py). So a freed
  object's memfd backs the next object of its size, with its pages already there
  (backing/recycle.py): writing one runs about twice as fast as writing new pages. A
  mapping's page tables are filled first in one call (MADV_POPULATE_WRITE: faster than
  faulting them in), and it is unmapped before the writer's handle is closed, so its
  release goes with that close;
- `pending_source(a, ...)`: the pending value an array a task returned lies in (a view of
  it), which the array then shares the object of (buffer.py);
- `load(stored)`: an array is a zero-copy `UgemArray` on the object's mapping; any other
  value is deserialized from the mapping. Except a value `store` wrote of STREAM_MIN bytes
  or more whose object the daemon has spilled: it is read into a new heap buffer (one
  copy, straight from spill storage: client/bulk.py) and the object stays spilled, where
  mapping it would bring it back into the budget first, spilling some other value to make
  room (in a spill-heavy run, half of what moved). The array over that copy is a
  `UgemArray` all the same, holding the object (a worker on this host it is sent to maps
  the object itself); writes to it are its own (Dask never writes into a stored value).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard

import numpy as np
from distributed.protocol.serialize import deserialize_bytes, serialize_bytelist

from ..address import data_address
from ..client.buffer import Buffer
from ..client.device import Device
from ..client.device_share import populate_write
from ..constants import PAGE_SIZE
from .handoff import as_ugem_array

__all__ = ["STREAM_MIN", "Stored", "extent", "load", "pending_source", "raw", "store"]


@dataclass(slots=True)
class Stored:
    """One key's object: an array (dtype, shape, strides, byte offset) or serialized bytes."""

    buf: Buffer
    dtype: np.dtype[Any] | None  # None: the object holds `length` bytes of Dask serialization
    shape: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    offset: int = 0
    length: int = 0
    token: object = None  # the pending value's token (its Event) when the writer stored it


def _write(buf: Buffer, frames: list[Any]) -> None:
    """Write `frames` one after the other from offset 0 (module rules); the rest of a new
    object reads as zeros already."""
    if buf.device.write_taken(buf.handle, frames):
        return
    view = buf.map()
    populate_write(view)
    target = np.frombuffer(view, np.uint8)
    position = 0
    for frame in frames:
        source = np.frombuffer(memoryview(frame).cast("B"), np.uint8)
        target[position:position + source.size] = source
        position += source.size
    del target, view  # the last views of the region: unmapped now, its release queued


def raw(value: object) -> TypeGuard[np.ndarray[Any, Any]]:
    """Whether `value` is stored as raw array bytes (else through Dask's serialization)."""
    return isinstance(value, np.ndarray) and not value.dtype.hasobject and value.size > 0


def extent(a: np.ndarray[Any, Any]) -> tuple[int, int]:
    """The addresses [low, high) of the bytes `a` views (any strides)."""
    start = data_address(a)
    if a.size == 0:
        return start, start
    low = sum(min(0, (n - 1) * st) for n, st in zip(a.shape, a.strides, strict=True))
    high = sum(max(0, (n - 1) * st) for n, st in zip(a.shape, a.strides, strict=True)) + a.itemsize
    return start + low, start + high


def pending_source(a: np.ndarray[Any, Any], pending: Mapping[Hashable, object],
                   done: Mapping[Hashable, object]) -> tuple[Hashable, object, int] | None:
    """(key, token, byte offset) of the pending value (`pending`, their tokens `done`) whose
    memory `a` lies in, if that value is stored byte for byte as it lies (C- or
    Fortran-contiguous)."""
    if a.base is None:  # owns its memory: in no other value's
        return None
    low, high = extent(a)
    for key, value in pending.items():
        if raw(value) and (value.flags.c_contiguous or value.flags.f_contiguous):
            start = data_address(value)
            if start <= low and high <= start + value.nbytes and key in done:
                return key, done[key], data_address(a) - start
    return None


def store(value: object, writer_device: Device, device: Device) -> Stored:
    """Copy `value` into a new object; the record's handle is one of `device`."""
    dtype: np.dtype[Any] | None = None
    shape: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    if raw(value):
        a = value if value.flags.c_contiguous or value.flags.f_contiguous else np.ascontiguousarray(value)
        dtype, shape, strides = a.dtype, a.shape, a.strides
        frames: list[Any] = [(a if a.flags.c_contiguous else a.T).reshape(-1).view(np.uint8)]  # same bytes
    else:
        frames = serialize_bytelist(value, compression=False, on_error="raise")
    length = sum(memoryview(f).nbytes for f in frames)
    own = writer_device.new(max(length, PAGE_SIZE))
    try:
        _write(own, frames)
        buf = Buffer.open_name(device, own.flink())
    finally:
        own.close()
    return Stored(buf, dtype, shape, strides, length=length)


STREAM_MIN = 1 << 20


def load(stored: Stored) -> object:
    if stored.length >= STREAM_MIN and stored.buf.info().placement == "spilled":  # (module rules)
        copy = np.empty(stored.length, dtype=np.uint8)
        stored.buf.device.pread_into(stored.buf.handle, 0, copy)
        view = memoryview(copy.data)
    else:
        view = stored.buf.map()
    if stored.dtype is not None:
        return as_ugem_array(stored.buf, view, stored.dtype, stored.shape, stored.strides, stored.offset)
    return deserialize_bytes(view[:stored.length])
