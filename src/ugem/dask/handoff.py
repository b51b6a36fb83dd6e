"""Same-machine hand-off: a worker sends a reference to its ugem object, not the bytes.

Rules:
- `UgemArray` is the numpy array type `UgemBuffer` returns for a stored array: a plain
  `ndarray` subclass viewing the object's shared mapping (zero-copy). Arithmetic on it
  gives plain arrays (`__array_wrap__`); slices and views stay `UgemArray`. Plain pickle
  and cloudpickle send it by value as a plain `ndarray`.
- While any view of such a mapping lives, this process keeps the `Buffer` (one handle)
  of the object it maps (`hold`, and a finalizer on the mapping lets go). So the object's
  flink name stays valid while a value is in use, even after Dask deleted its key: a
  name holds no reference, and this is what keeps one for a transfer in flight.
- Dask serializes a `UgemArray` through the "dask" serializer family (`dask_serialize`),
  which is given the comm's context. When the recipient's address names the same host as
  the sender's, the array lies in one held mapping of a daemon client, and its dtype has
  a plain type string, the message carries only a reference: socket path, flink name, byte
  offset in the object, dtype, shape, strides (a few hundred bytes, whatever the size).
  Otherwise the serializer declines, and Dask's next family ("pickle") sends the bytes as
  a plain `ndarray`, so a receiver on another machine needs no ugem. It declines too when
  making the reference fails (any OSError, so any UgemError: e.g. OutOfMemory, or the
  daemon gone), logged: Dask fails a transfer whose serializer raises anything else, and
  the tasks waiting for that value would never run (`or_bytes`).
- A receiver with a `UgemBuffer` on that socket (a ugem-backed worker) opens the name
  through it, maps it and holds that handle while the view lives; its `UgemBuffer` then
  adopts the object when Dask stores the value (no copy at all). Any other receiver (the
  client, a worker of another daemon) reads the bytes from the daemon (one copy, no
  network) through one connection of its own per socket path and keeps nothing open: a
  handle it held would be closed only with its next request. The sender still holds the key then:
  Dask's `get_data` keeps the value (hence our handle) until the receiver answers "OK",
  which it sends only after deserializing. A vanished name raises `NoSuchObject` (ENOENT).
"""

from __future__ import annotations

import functools
import logging
import threading
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
from distributed.comm.addressing import get_address_host
from distributed.protocol.serialize import dask_deserialize, dask_serialize

from ..address import data_address
from ..client.buffer import Buffer
from ..client.connect import connect
from ..client.device import Device
from ..client.registry import Mapping, mapping_of
from ..errors import NoSuchObject

__all__ = ["UgemArray", "as_ugem_array", "counts", "dumps_reference", "held", "is_held", "loads_reference", "name_of",
           "or_bytes", "register_device", "same_host", "unregister_device"]

logger = logging.getLogger("ugem.dask")
Dumps = Callable[[Any, "dict[str, Any] | None"], tuple[dict[str, Any], list[Any]]]

#: this process's hand-offs so far: values sent as a reference, and received by mapping
#: (a ugem-backed worker) or by one copy from the daemon (any other process)
counts = {"sent": 0, "mapped": 0, "copied": 0}

_lock = threading.Lock()
#: mapping address -> (Buffer keeping the object, its flink name or 0, the mapping). A mapping
#: is unmapped before its finalizer runs, and another thread may map something else at the
#: same address meanwhile: an entry whose mapping is dead is stale, never answered, replaced
_held: dict[int, tuple[Buffer, int, weakref.ref[Any]]] = {}
_held_ids: dict[int, int] = {}  # id(Buffer) -> how many held mappings it keeps
_devices: dict[str, weakref.ref[Device]] = {}  # socket path -> this process's UgemBuffer connection
_connections: dict[str, Device] = {}  # socket path -> a connection of our own, for copies (not a worker)


class PlainResults(np.ndarray):
    """An ndarray subclass whose results (ufuncs, reductions) are plain ndarrays and that
    pickles by value as a plain ndarray: the base of `UgemArray` and `PendingArray`."""

    def __array_wrap__(self, obj: Any, context: Any = None, return_scalar: bool = False) -> Any:
        result = np.asarray(obj)
        return result[()] if return_scalar else result

    def __reduce_ex__(self, protocol: Any) -> Any:  # by value, as a plain ndarray
        return np.asarray(self).__reduce_ex__(protocol)

    def __reduce__(self) -> Any:
        return np.asarray(self).__reduce__()


class UgemArray(PlainResults):
    """A numpy array on a ugem object's mapping, as `UgemBuffer` returns it (module rules)."""


def _let_go(address: int, region: weakref.ref[Any]) -> None:
    with _lock:  # dropping the Buffer queues its handle's close (client/buffer.py)
        found = _held.get(address)
        if found is not None and found[2] is region:  # not a later mapping's at that address
            _forget(address, found[0])


def _forget(address: int, buf: Buffer) -> None:
    del _held[address]
    count = _held_ids.pop(id(buf)) - 1
    if count:
        _held_ids[id(buf)] = count


def _live(address: int) -> tuple[Buffer, int, weakref.ref[Any]] | None:
    """The held entry at `address`, unless it is stale (see `_held`); under `_lock`."""
    found = _held.get(address)
    return found if found is not None and found[2]() is not None else None


def as_ugem_array(buf: Buffer, view: memoryview, dtype: np.dtype[Any], shape: tuple[int, ...],
                  strides: tuple[int, ...], offset: int, name: int = 0) -> UgemArray:
    """A `UgemArray` over `view` (a mapping of `buf`'s object); `buf` is held while it lives.
    `name`: the object's flink name if known (else asked when first needed)."""
    arr = np.ndarray.__new__(UgemArray, shape, dtype, buffer=view, offset=offset, strides=strides)
    region = view.obj
    address = data_address(np.frombuffer(view, dtype=np.uint8))
    with _lock:
        found = _held.get(address)
        if found is None or found[2]() is not region:
            if found is not None:  # stale: that mapping is gone, its finalizer not run yet
                _forget(address, found[0])
            ref = weakref.ref(region)
            _held[address] = (buf, name, ref)
            _held_ids[id(buf)] = _held_ids.get(id(buf), 0) + 1
            weakref.finalize(region, _let_go, address, ref)
    return arr


def is_held(buf: Buffer) -> bool:
    """Whether a view of a mapping of `buf` is in use (so its handle must stay open)."""
    with _lock:
        return id(buf) in _held_ids


def held(a: npt.NDArray[Any]) -> tuple[Buffer, Mapping] | None:
    """The held Buffer whose object `a`'s memory lies in, with that mapping, if any."""
    entry = mapping_of(a)
    if entry is None:
        return None
    with _lock:
        found = _live(entry.address)
    return None if found is None else (found[0], entry)


def name_of(entry: Mapping) -> int:
    """The flink name of the held object mapped at `entry` (asked once, then remembered)."""
    found = _name_of(entry.address)
    if found is None:
        raise KeyError(entry.address)
    return found[1]


def _name_of(address: int) -> tuple[Buffer, int] | None:
    """The held Buffer at `address` and its flink name (asked once, then remembered)."""
    with _lock:
        found = _live(address)
    if found is None:
        return None
    buf, name, ref = found
    if name == 0:
        name = buf.flink()
        with _lock:
            if _held.get(address) is found:
                _held[address] = (buf, name, ref)
    return buf, name


def register_device(path: str, device: Device) -> None:
    with _lock:
        _devices[path] = weakref.ref(device)


def unregister_device(path: str, device: Device) -> None:
    with _lock:
        ref = _devices.get(path)
        if ref is not None and ref() in (None, device):
            del _devices[path]


def _worker_device(path: str) -> Device | None:
    """This process's live `UgemBuffer` connection to the daemon at `path`, if any."""
    with _lock:
        ref = _devices.get(path)
    dev = None if ref is None else ref()
    return dev if dev is not None and not dev.closed and not dev._connection_lost() else None


def same_host(context: dict[str, Any] | None) -> bool:
    if not context:
        return False
    try:
        sender, recipient = context["sender"]["address"], context["recipient"]["address"]
        return bool(get_address_host(sender) == get_address_host(recipient))
    except (KeyError, TypeError, ValueError):
        return False


def or_bytes(dumps: Dumps) -> Dumps:
    """`dumps`, declining (NotImplementedError: Dask sends the bytes) where it fails with an
    OSError (module rules)."""

    @functools.wraps(dumps)
    def wrapper(x: Any, context: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[Any]]:
        try:
            return dumps(x, context)
        except OSError as exc:
            logger.warning("ugem.dask: sending the bytes of a %s value: no reference to its object (%s)",
                           type(x).__name__, exc)
            raise NotImplementedError(f"no same-host ugem reference ({exc}): send the bytes") from exc

    return wrapper


@or_bytes
def dumps_reference(x: UgemArray, context: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[Any]]:
    entry = mapping_of(x) if same_host(context) and np.dtype(x.dtype.str) == x.dtype else None
    found = None if entry is None else _name_of(entry.address)
    if entry is None or found is None:
        raise NotImplementedError("not a same-host ugem reference: send the bytes")
    buf, name = found
    transport = buf.device._transport
    path = getattr(transport, "path", "")
    if transport is None or transport.embedded or not path:
        raise NotImplementedError("an embedded manager's object cannot be opened by another process")
    data = data_address(x)
    ref = {"socket": path, "name": name, "offset": entry.offset + data - entry.address, "dtype": x.dtype.str,
           "shape": list(x.shape), "strides": list(x.strides), "writeable": bool(x.flags.writeable)}
    counts["sent"] += 1
    return {"ugem": ref}, []


def loads_reference(header: dict[str, Any], frames: list[Any]) -> npt.NDArray[Any]:
    ref = header["ugem"]
    dtype, shape, strides = np.dtype(ref["dtype"]), tuple(ref["shape"]), tuple(ref["strides"])
    dev = _worker_device(ref["socket"])
    if dev is None:
        counts["copied"] += 1
        return _copy(ref["socket"], ref["name"], dtype, shape, strides, ref["offset"])
    buf = _open(dev, ref["socket"], ref["name"])
    arr = as_ugem_array(buf, buf.map(), dtype, shape, strides, ref["offset"], ref["name"])
    counts["mapped"] += 1
    if not ref["writeable"]:
        arr.flags.writeable = False
    return arr


def _open(dev: Device, path: str, name: int) -> Buffer:
    try:
        return Buffer.open_name(dev, name)
    except NoSuchObject:
        raise NoSuchObject(f"the ugem object sent by reference (name {name} at the ugem daemon {path}) is gone: "
                           f"its sender let go of it before this process opened it") from None


def _copy(path: str, name: int, dtype: np.dtype[Any], shape: tuple[int, ...], strides: tuple[int, ...],
          offset: int) -> npt.NDArray[Any]:
    """Not a ugem-backed worker (e.g. the client): read the bytes from the daemon (one
    copy, no network) and keep nothing open, so no handle waits for a later request."""
    with _lock:
        dev = _connections.get(path)
        if dev is None or dev.closed or dev._connection_lost() or dev._forked:
            dev = _connections[path] = connect(path)
    low = sum(min(0, (n - 1) * st) for n, st in zip(shape, strides, strict=True))
    high = sum(max(0, (n - 1) * st) for n, st in zip(shape, strides, strict=True)) + dtype.itemsize
    raw = np.empty(high - low, np.uint8)
    buf = _open(dev, path, name)
    try:
        buf.read_into(raw, offset + low)
    finally:
        buf.close()
    return np.ndarray(shape, dtype, buffer=raw, offset=-low, strides=strides)


_register: Any = dask_serialize.register  # untyped in distributed
_register(UgemArray)(dumps_reference)
_register = dask_deserialize.register
_register(UgemArray)(loads_reference)
