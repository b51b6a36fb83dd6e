"""Pickling by reference: ugem memory passes between processes without its bytes being copied.

Rules:
- under multiprocessing's pickler (`multiprocessing.reduction.ForkingPickler`: Process
  arguments, Queue, Pipe, Pool, ProcessPoolExecutor; every start method) a `Buffer`, and a
  numpy array whose memory lies in one ugem mapping of this process (this process's
  registry, client/registry.py: `Buffer.array()`, `ugem.empty/zeros`,
  `np.frombuffer(dev.mmap(h))`, and slices, reshapes, transposes and views of them), travel
  as an fd (`multiprocessing.reduction.DupFd`, as multiprocessing sends fds) to the object:
  the array's fd comes from PRIME_MAP_TO_FD on the mapping (no handle needed), the
  Buffer's from `export`. The fd is read-only when the array (or Buffer) is. Exporting
  marks the object exported, as `export` does: never spilled or purged after that;
- the receiver gets an array on the same memory with the same dtype, shape, strides and
  offset, writable iff the source was; a Buffer becomes a Buffer of its
  `default_device()` (import_fd; the Buffer closes its handle when dropped). An array is
  mapped through the receiver's `default_device()` when that is a daemon client (import,
  mmap, close the handle: the mapping keeps the object alive, and the array can travel on
  the same way); when it is embedded, the fd is mapped straight (no Device) and closed, and
  such an array cannot travel onward (pickling it raises `pickle.PicklingError` saying so).
  Either way the receiver keeps no fd per array;
- every other array (not ugem memory, empty, or of object dtype) pickles exactly as numpy
  pickles it; arrays that are ugem memory but whose Device is closed or was made by the
  parent of a forked child raise `pickle.PicklingError` naming why;
- plain `pickle` (not multiprocessing's): arrays are pickled by value as always (no global
  reducer is registered); a daemon client's Buffer travels by flink name and socket path.
  The receiver opens the name through its `default_device()` if that is a client of the same
  socket, else through one connection of its own per socket path, kept for the
  process; the name holds no reference (SPEC: flink), so the sender must keep the object
  alive until the receiver has loaded it; a vanished name raises `NoSuchObject` (ENOENT)
  naming the name and the socket. An embedded manager's Buffer raises
  `pickle.PicklingError` (its object lives only in that process).
"""

from __future__ import annotations

import os
import pickle
import threading
import weakref
from multiprocessing import context, reduction
from typing import Any

import numpy as np
import numpy.typing as npt

from ..backing.mapping import map_shared
from ..errors import NoSuchObject, UgemError
from .buffer import Buffer
from .connect import connect
from .default import default_device
from .device import Device
from .registry import Mapping, find_mapping, forget_mapping, register_mapping

__all__ = ["reduce_buffer_by_name"]

_connections: dict[str, Device] = {}  # plain-pickle receivers: one connection per socket path
_lock = threading.Lock()


def _ugem_mapping(a: npt.NDArray[Any]) -> Mapping | None:
    """The ugem mapping that holds every byte of `a`, if any."""
    if a.size == 0 or a.dtype.hasobject:
        return None
    data = int(a.__array_interface__["data"][0])
    low = data + sum(min(0, (n - 1) * st) for n, st in zip(a.shape, a.strides, strict=True))
    high = data + sum(max(0, (n - 1) * st) for n, st in zip(a.shape, a.strides, strict=True)) + a.itemsize
    return find_mapping(low, high)


def _send_fd(fd: int) -> Any:
    """Wrap `fd` (ours) for multiprocessing and let go of it once that is safe."""
    popen = context.get_spawning_popen()
    wrapped = reduction.DupFd(fd)
    if popen is None:
        os.close(fd)  # the resource sharer keeps its own dup until the receiver takes it
    else:
        weakref.finalize(popen, os.close, fd)  # the child inherits it at launch: keep it until then
    return wrapped


def _reduce_array(a: npt.NDArray[Any]) -> tuple[Any, ...]:
    entry = _ugem_mapping(a)
    if entry is None:
        reduced = a.__reduce_ex__(pickle.DEFAULT_PROTOCOL)  # multiprocessing pickles at this protocol
        assert isinstance(reduced, tuple)
        return reduced
    if entry.device is None:
        raise pickle.PicklingError("this ugem array was received by a process whose default device is embedded, "
                                   "which maps it with no Device: it cannot travel onward (send the original, or "
                                   "run a ugem daemon so that receivers map through it)")
    dev = entry.device()
    if dev is None:
        raise pickle.PicklingError("this ugem array's Device is gone: it cannot be sent by reference")
    writable = bool(a.flags.writeable) and entry.writable
    try:
        fd = dev._export_mapping(entry.map_id, writable)
    except UgemError as exc:
        raise pickle.PicklingError(f"cannot send this ugem array by reference: {exc}") from exc
    data = int(a.__array_interface__["data"][0])
    return _rebuild_array, (_send_fd(fd), entry.offset, entry.length, writable, a.dtype, a.shape, a.strides,
                            data - entry.address)


def _map_received(fd: int, offset: int, length: int, writable: bool) -> memoryview:
    dev = default_device()
    if dev._live().embedded:
        region = map_shared(fd, offset, length, writable)
        address = register_mapping(region, None, 0, offset, writable)
        weakref.finalize(region, forget_mapping, address)
        return memoryview(region)
    handle, held = dev._import_fd(fd)
    try:
        return dev.mmap(handle, offset=offset, length=length, writable=writable)
    finally:
        if not held:
            dev.close_handle(handle)


def _rebuild_array(wrapped: Any, offset: int, length: int, writable: bool, dtype: np.dtype[Any],
                   shape: tuple[int, ...], strides: tuple[int, ...], start: int) -> npt.NDArray[Any]:
    fd = wrapped.detach()
    try:
        view = _map_received(fd, offset, length, writable)
    finally:
        os.close(fd)
    return np.ndarray(shape, dtype, buffer=view, offset=start, strides=strides)


def _reduce_buffer(buf: Buffer) -> tuple[Any, ...]:
    try:
        readonly = buf.readonly
        fd = buf.export(writable=not readonly)
    except UgemError as exc:
        raise pickle.PicklingError(f"cannot send Buffer of handle {buf.handle} by reference: {exc}") from exc
    return _rebuild_buffer, (_send_fd(fd),)


def _rebuild_buffer(wrapped: Any) -> Buffer:
    fd = wrapped.detach()
    try:
        return Buffer.import_fd(default_device(), fd)
    finally:
        os.close(fd)


def reduce_buffer_by_name(buf: Buffer) -> tuple[Any, ...]:
    """Plain pickle of a Buffer: by flink name and socket path (daemon clients only)."""
    transport = buf.device._transport
    path = getattr(transport, "path", "")
    if transport is None or transport.embedded or not path:
        raise pickle.PicklingError(
            f"Buffer of handle {buf.handle} cannot be pickled with plain pickle: its manager is embedded in this "
            f"process (or its Device is closed), so no other process can open it by name; send it through "
            f"multiprocessing (which passes an fd), or use a daemon (ugem.connect())")
    try:
        name, size, readonly = buf.flink(), buf.size, buf.readonly
    except UgemError as exc:
        raise pickle.PicklingError(f"cannot pickle Buffer of handle {buf.handle} by name: {exc}") from exc
    return _open_by_name, (path, name, size, readonly)


def _device_for(path: str) -> Device:
    dev = default_device()
    if getattr(dev._transport, "path", None) == path:
        return dev
    with _lock:
        mine = _connections.get(path)
        if mine is None or mine.closed or mine._connection_lost() or mine._pid != os.getpid():
            mine = _connections[path] = connect(path)
        return mine


def _open_by_name(path: str, name: int, size: int, readonly: bool) -> Buffer:
    dev = _device_for(path)
    try:
        handle, size = dev.open_name(name)
    except NoSuchObject:
        raise NoSuchObject(f"the pickled Buffer's object (name {name} at the ugem daemon {path}) is gone: "
                           f"its sender closed it before this process loaded it") from None
    return Buffer(dev, handle, size, readonly=readonly)


reduction.ForkingPickler.register(np.ndarray, _reduce_array)
reduction.ForkingPickler.register(Buffer, _reduce_buffer)
