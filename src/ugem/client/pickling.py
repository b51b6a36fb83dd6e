"""Pickling by reference: ugem memory passes between processes without its bytes being copied.

Rules:
- under multiprocessing's pickler (`multiprocessing.reduction.ForkingPickler`: Process
  arguments, Queue, Pipe, Pool, ProcessPoolExecutor; every start method) a numpy array whose
  memory lies in one ugem mapping of this process (this process's registry,
  client/registry.py: `Buffer.array()`, `ugem.empty/zeros`, `np.frombuffer(dev.mmap(h))`,
  and slices, reshapes, transposes and views of them) travels by reference, without its
  bytes: the receiver gets an array on the same memory with the same dtype, shape, strides
  and offset, writable iff the source was (and its mapping is);
- a daemon client's array travels as a share (core/shares.py: GEM_SHARE on the mapping, held
  back and sent with the Device's next request (client/batch.py), which the receiver does not
  wait for: its claim names the memory, and the manager takes it early; until the share is
  sent, the sender's mapping holds the object; once sent, the share keeps the object alive until it is claimed, even
  if the sender drops the array at once, or closes its Device: the share passes to another
  client of the same process, so the sending process keeps one (its `default_device()` if
  that is a client of the same socket, else one connection of its own per socket path, the
  one receivers use too); it dies with the sending process if nobody claims it) plus the
  daemon's socket path. The receiver claims it through its
  `default_device()` if that is a client of the same socket, else through one connection of
  its own per socket path, kept for the process: where the daemon lets this process copy
  its fds (the daemon's uid, or root) a writable share is claimed with no round trip (it
  takes the daemon's fd of the memory, maps it, and says so without waiting:
  GEM_CLAIM_MAPPED, client/device_share.py); otherwise, and for read-only shares, GEM_CLAIM
  (one round trip, the mapping arrives with the reply); an unreachable daemon is an error
  naming the socket. No fd
  travels: multiprocessing hands fds over through a helper thread and a new authenticated
  connection each, which costs more than a Pool task's whole round trip;
- an embedded manager's array travels as an fd (`multiprocessing.reduction.DupFd`, as
  multiprocessing sends fds) from PRIME_MAP_TO_FD on the mapping; the export marks the
  object exported, as `export` does (never spilled or purged after that). The receiver maps
  it through its `default_device()` when that is a daemon client (import, mmap, close the
  handle: the mapping keeps the object alive, and the array can travel on), else maps the
  fd straight (no Device, so no fd to send onward): such an array travels by the identity
  of its memfd only, and can only arrive in a process that still maps that memory (the
  usual case: a Pool worker returns what it was sent); anywhere else unpickling raises
  `pickle.UnpicklingError` saying why;
- a receiver that maps that memory already (an array sent to a worker and returned: the
  same memfd, found by its identity in the registry) uses its mapping again, and only
  drops the share (queued, sent with its next request): no round trip; one whose mapping
  of it lingers (client/linger.py: received a moment ago, its arrays dead since) takes that
  mapping back, and drops the share as a claim would be sent (when the unpickling ends);
- a `Buffer` travels as an fd from `export` (read-only when the Buffer is) and becomes a
  Buffer of the receiver's `default_device()` (import_fd; it closes its handle when dropped).
  Either way the receiver keeps no fd per array or Buffer;
- every other array (not ugem memory, empty, or of object dtype) pickles exactly as numpy
  pickles it; arrays that are ugem memory but whose Device is closed or was made by the
  parent of a forked child raise `pickle.PicklingError` naming why;
- one reference per mapping per pickle: the first array of one `ForkingPickler.dumps`
  that lies in a mapping (asking a writability) carries the reference (the share, the fd,
  or the memfd identity) in the call that rebuilds it (`_claimed`, `_received`,
  `_returned`: one call per array, where a reference object of its own cost the receiver
  a call more and the pickle a reduction more); every later one of that mapping names
  that first array (`_again`: pickle writes it by its memo) and the distance from it, and
  is rebuilt as a view of what the first array views (numpy's `base`, which the unpickler's
  memo keeps alive to the end). The receiver thus resolves the reference once (one claim, one
  mapping, one fd): a list of 2,000 slices of one array costs one share and one claim, not
  2,000. Each pickle has its own references (a pickle inside a pickle too), so no share is
  named in two pickles;
- the shares one multiprocessing pickle makes, and the claims one unpickling makes, go out
  together (client/batch.py: `ForkingPickler.dumps` and `loads` run as a batch, wrapped
  here where the reducers are registered), as batch requests (GEM_SHARE_BATCH,
  GEM_CLAIM_MAPPED_BATCH): a list of 2,000 arrays costs the daemon a few dozen requests,
  not 2,000; an array sent to a worker and back, none from the sender. What cannot hold
  ugem memory skips the batch: pickling None, a bool, a number, a string or bytes (a Pool
  sends None to its own threads with every task), and loading a pickle shorter than this
  module's name, which every reference names (its functions rebuild what it sent);
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

from ..address import data_address
from ..backing.mapping import map_shared
from ..errors import NoSuchObject, UgemError
from .batch import batch
from .buffer import Buffer
from .connect import connect
from .default import default_device
from .device import Device
from .registry import Mapping, array_mapping, find_by_key, lookup, register_mapping

__all__ = ["reduce_buffer_by_name"]

_connections: dict[str, Device] = {}  # plain-pickle receivers: one connection per socket path
_lock = threading.Lock()


def _send_fd(fd: int) -> Any:
    """Wrap `fd` (ours) for multiprocessing and let go of it once that is safe."""
    popen = context.get_spawning_popen()
    wrapped = reduction.DupFd(fd)
    if popen is None:
        os.close(fd)  # the resource sharer keeps its own dup until the receiver takes it
    else:
        weakref.finalize(popen, os.close, fd)  # the child inherits it at launch: keep it until then
    return wrapped


class _Pickles(threading.local):
    refs: list[dict[Any, Any]]  # per `dumps` running in this thread, innermost last: key -> (the array that
    # carries the reference to that mapping, its data address), and socket paths

    def __init__(self) -> None:
        self.refs = []


_pickles = _Pickles()


def _reduce_array(a: npt.NDArray[Any]) -> tuple[Any, ...]:
    found = array_mapping(a)
    if found is None:
        reduced = a.__reduce_ex__(pickle.DEFAULT_PROTOCOL)  # multiprocessing pickles at this protocol
        assert isinstance(reduced, tuple)
        return reduced
    entry, data = found
    writable = entry.writable and bool(a.flags.writeable)
    stack = _pickles.refs
    refs = stack[-1] if stack else {}
    key = entry.address + writable  # (a mapping starts on a page: the low bit is free)
    dtype = _dtype_names.get(a.dtype)
    if dtype is None:
        dtype = _dtype_name(a.dtype)
    first = refs.get(key)
    if first is not None:  # an array before it in this pickle carries the reference (module rules)
        return _again, (first[0], data - first[1], writable, dtype, a.shape, a.strides)
    refs[key] = (a, data)
    rebuild, ref = _reference(entry, writable, refs)
    return rebuild, (*ref, writable, dtype, a.shape, a.strides, data - entry.address)


def _reference(entry: Mapping, writable: bool, refs: dict[Any, Any]) -> tuple[Any, tuple[Any, ...]]:
    """The reference to the mapping `entry` for the pickle whose references are `refs` (module
    rules): the function that rebuilds an array on it, and that function's first arguments."""
    part = (entry.key, entry.offset, entry.length)
    if entry.device is None:  # mapped straight from a received fd: it can only go back
        return _returned, part
    dev = entry.device()
    if dev is None:
        raise pickle.PicklingError("this ugem array's Device is gone: it cannot be sent by reference")
    path = getattr(dev._transport, "path", "")
    try:
        if path:  # a daemon client: a share, claimed by the receiver through the same daemon
            if path not in refs:  # a client there that lives as long as the process: it inherits the share if `dev`
                refs[path] = _device_for(path)  # closes (once per pickle)
            owner, token = dev._hold_share(entry.map_id, entry.offset, entry.length, writable)
            return _claimed, (path, owner, token, entry.source, *part)
        fd = dev._export_mapping(entry.map_id, writable)
    except UgemError as exc:
        raise pickle.PicklingError(f"cannot send this ugem array by reference: {exc}") from exc
    return _received, (_send_fd(fd), *part)


_BYTE = np.dtype(np.uint8)
_dtype_names: dict[np.dtype[Any], np.dtype[Any] | str] = {}


def _dtype_name(dt: np.dtype[Any]) -> np.dtype[Any] | str:
    """What a pickle carries of a dtype: its string (`dt.str`, one small string to pickle
    and parse) where that names exactly it, else the dtype itself."""
    name = _dtype_names.get(dt)
    if name is None:
        plain = dt.fields is None and dt.subdtype is None and dt.metadata is None and np.dtype(dt.str) == dt
        name = _dtype_names[dt] = dt.str if plain else dt
    return name


def _map_fd(fd: int, key: tuple[int, int], offset: int, length: int, writable: bool) -> memoryview:
    dev = default_device()
    if dev._live().embedded:
        region = map_shared(fd, offset, length, writable)
        register_mapping(region, None, 0, offset, writable, key)
        return memoryview(region)
    handle, held = dev._import_fd(fd)
    try:
        return dev.mmap(handle, offset=offset, length=length, writable=writable)
    finally:
        if not held:
            dev.close_handle(handle)


def _array(view: Any, writable: bool, dtype: np.dtype[Any] | str, shape: tuple[int, ...],
           strides: tuple[int, ...], start: int) -> npt.NDArray[Any]:
    """The received array on `view` (`_claimed` and `_again`, run once per array, do the same
    inline: a call less each)."""
    a: npt.NDArray[Any] = np.ndarray(shape, dtype, view, start, strides)  # (positional: keywords cost 0.3 us)
    if not writable and a.flags.writeable:  # received read-only, mapped writable here already
        a.flags.writeable = False
    return a


def _received(wrapped: Any, key: tuple[int, int], offset: int, length: int, writable: bool,
              *layout: Any) -> npt.NDArray[Any]:
    """An array on the mapping an embedded sender passed as an fd (`layout`: its dtype, shape,
    strides and start in the mapping)."""
    fd = wrapped.detach()
    try:
        found = find_by_key(key, offset, length, writable)
        view = found[0] if found is not None else _map_fd(fd, key, offset, length, writable)
    finally:
        os.close(fd)
    return _array(view, writable, *layout)


def _returned(key: tuple[int, int], offset: int, length: int, writable: bool, *layout: Any) -> npt.NDArray[Any]:
    """An array on a mapping this process must map already (module rules: embedded receivers)."""
    found = find_by_key(key, offset, length, writable)
    if found is None:
        raise pickle.UnpicklingError(
            "this ugem array was received by a process whose default device is embedded, which maps it with no "
            "Device: it can only be sent back to a process that still maps its memory (the sender's, while it "
            "holds the array), and this one does not; run a ugem daemon so that arrays can travel anywhere")
    return _array(found[0], writable, *layout)


def _again(first: npt.NDArray[Any], delta: int, writable: bool, dtype: np.dtype[Any] | str,
           shape: tuple[int, ...], strides: tuple[int, ...]) -> npt.NDArray[Any]:
    """Another array on the mapping of `first`, an array this unpickling made before (module
    rules), whose first element lies `delta` bytes from `first`'s: a view of what `first` is
    a view of (numpy's `base`: the mapping, or an array over it), which numpy bounds checks."""
    base: Any = first.base
    if base.__class__ is not np.ndarray:  # (the mmap itself, where `first` was made on a memoryview of it)
        base = np.frombuffer(base, _BYTE)
    a: npt.NDArray[Any] = np.ndarray(shape, dtype, base, data_address(first) + delta - data_address(base), strides)
    if not writable and a.flags.writeable:  # received read-only, mapped writable here already
        a.flags.writeable = False
    return a


def _claimed(path: str, owner: int, token: int, source: int, key: tuple[int, int], offset: int, length: int,
             writable: bool, dtype: np.dtype[Any] | str, shape: tuple[int, ...], strides: tuple[int, ...],
             start: int) -> npt.NDArray[Any]:
    """An array on the mapping a daemon client shared: this process's own, a lingering one, or
    a claimed one."""
    found = lookup(key, offset, length, writable)
    view = None
    if found is not None:
        view, entry = found
        mapper = entry.device() if entry.device is not None else None
        if mapper is None or getattr(mapper._transport, "path", None) != path:  # (None: closed)
            mapper = None
        if view is not None:  # mapped here already (e.g. the array comes back): use the share up unmapped
            (mapper or _device_for(path))._drop_share(owner, token)
        elif mapper is not None:  # mapped here a moment ago (client/linger.py): take it back
            view = mapper._revive_entry(entry, offset, length, (owner, token))
    if view is None:
        dev = _device_for(path)
        view = dev._revive(key, offset, length, writable, (owner, token))  # (another mapping of it lingers)
        if view is None and writable:
            view = dev._claim_mapped(owner, token, key, source, offset, length)
        if view is None:
            view = dev._claim(owner, token, writable, (key, offset, length))
    a: npt.NDArray[Any] = np.ndarray(shape, dtype, view, start, strides)  # (positional: keywords cost 0.3 us)
    if not writable and a.flags.writeable:  # received read-only, mapped writable here already
        a.flags.writeable = False
    return a


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
        if mine is None or mine.closed or mine._connection_lost() or mine._forked:
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


_plain_dumps = reduction.ForkingPickler.dumps.__func__  # type: ignore[attr-defined]
_plain_loads = reduction.ForkingPickler.loads


_NO_MEMORY = frozenset({type(None), bool, int, float, complex, str, bytes})  # objects that hold no array
_SHORTEST = len(__name__)  # a pickle that calls back into this module names it (`_loads`)


def _dumps(cls: type, obj: Any, protocol: int | None = None) -> memoryview:
    if type(obj) in _NO_MEMORY:  # (a Pool sends None with every task it ends: no batch for those)
        return _plain_dumps(cls, obj, protocol)  # type: ignore[no-any-return]
    stack = _pickles.refs
    stack.append({})  # this pickle's references (module rules)
    try:
        with batch():  # the shares it makes are held back (sent late: client/batch.py)
            result: memoryview = _plain_dumps(cls, obj, protocol)
            return result
    finally:
        stack.pop()


def _loads(data: Any, *args: Any, **kwargs: Any) -> Any:
    if len(data) < _SHORTEST:  # it names no reference (module rules)
        return _plain_loads(data, *args, **kwargs)
    with batch():  # the claims it posts go out together
        return _plain_loads(data, *args, **kwargs)


reduction.ForkingPickler.register(np.ndarray, _reduce_array)
reduction.ForkingPickler.register(Buffer, _reduce_buffer)
setattr(reduction.ForkingPickler, "dumps", classmethod(_dumps))  # noqa: B010  (the class multiprocessing uses)
setattr(reduction.ForkingPickler, "loads", staticmethod(_loads))  # noqa: B010
