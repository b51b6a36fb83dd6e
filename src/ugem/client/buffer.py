"""Buffer: the object layer over one handle (SPEC §2, last paragraph): convenience only.

`Device.new(size)` returns a Buffer; `Buffer.open_name(dev, name)` and
`Buffer.import_fd(dev, fd)` wrap the other two ways of getting a handle. Every method is
one handle-layer call (or none) with the same errors, in the same order, as that call.

Rules:

- A Buffer holds one handle of one Device. The handle is closed (GEM_CLOSE) when the
  last Buffer wrapping it is closed or dropped: `close()` is idempotent, and a no-op once
  the Device is closed (that released the handle already). After `close()`, or once the
  handle was closed by `Device.close_handle`, every other method raises `BadFd` (EBADF)
  without asking the manager: the client reuses handle numbers, so a Buffer must never
  send a closed number again.
- A Buffer dropped without `close()` has its handle closed soon after: its finalizer only
  queues it with the Device, which sends the close with its next request (several in one
  GEM_CLOSE_BATCH) or drops it at `Device.close()` (which releases everything); never from
  the finalizer, which may run in the middle of another request. Views made from it stay
  valid (the mapping keeps the object alive). `with dev.new(n) as buf:` closes at once.
- `map()`, `array()` and `__dlpack__` are views of ONE shared mapping of the whole
  object, made on first use and shared for as long as any view of it lives. The Buffer
  holds it only weakly: once the last view is gone the mapping lingers until the Device's
  next request (client/linger.py; its release would have waited that long anyway) and a
  view asked for meanwhile takes it back with no request of its own (a get in a loop is
  then no round trip), as it would reuse a live one; then it is released, so an object
  nobody looks at can be spilled again (a mapped object never is, SPEC §3). Views are
  zero-copy in both directions and outlive `close()` and `Device.close()`, as mappings
  outlive GEM_CLOSE. A read-only request reuses a writable mapping through a read-only
  view; a writable request after a read-only mapping maps again (EACCES on a read-only
  handle, as `mmap` does).
- Views see the object's system pages. After device work that wrote the object, call
  `set_domain(DOMAIN_CPU)` before reading through a view; before device work reads what
  was written through a view, `set_domain(DOMAIN_DEVICE)`. pread/pwrite need neither.
- A mapped DONTNEED object can still be purged; its views then read zeros and
  `madvise(WILLNEED)` returns False (SPEC §8). Purged is final: `array()` then fails
  with EFAULT, like `mmap`, once it has to map again (a view taken from the mapping that
  lives or lingers reads zeros, as the views already out do).
- `import_fd` (and `open_name` never) may return a handle this client already holds
  (SPEC §2); two Buffers then share one handle, which stays open until both are closed
  or dropped (the Device counts the Buffers of each handle).
- DLPack: `__dlpack__` exports a 1-D uint8 view of the whole object on the CPU
  (`__dlpack_device__() == (1, 0)`, kDLCPU) through numpy, so `numpy.from_dlpack(buf)`
  and `torch.from_dlpack(buf)` share the object's memory; the capsule keeps the mapping
  alive. For a typed export pass `buf.array(dtype, shape)` to `from_dlpack` instead.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ..address import data_address
from ..constants import DOMAIN_CPU
from ..errors import BadFd, InvalidArgument
from .args import flag, index
from .registry import find_mapping

if TYPE_CHECKING:
    from .device import Device, ObjectInfo

__all__ = ["Buffer", "shape_dims", "view_dtype"]

Shape = int | Sequence[int] | None
KDLCPU = 1


def view_dtype(dtype: npt.DTypeLike) -> np.dtype[Any]:
    """`dtype` as a numpy dtype that can view object memory, else EINVAL naming it."""
    try:
        dt = np.dtype(dtype)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"dtype {dtype!r} is not a numpy dtype: {exc}") from None
    if dt.itemsize == 0 or dt.hasobject:
        raise InvalidArgument(f"dtype {dtype!r} cannot view object memory (it has no size or holds Python "
                              f"objects)")
    return dt


def shape_dims(shape: int | Sequence[int]) -> tuple[int, ...]:
    """`shape` (an int or a sequence of ints, numpy integers too) as a tuple of
    non-negative dimensions, else EINVAL naming it."""
    if isinstance(shape, bool | np.bool_ | str | bytes):
        raise InvalidArgument(f"shape must be an int or a sequence of ints, got {shape!r}")
    if isinstance(shape, int | np.integer):
        dims: tuple[int, ...] = (int(shape),)
    else:
        try:
            dims = tuple(index(d, "") for d in shape)
        except (TypeError, InvalidArgument):
            raise InvalidArgument(f"shape must be an int or a sequence of ints, got {shape!r}") from None
    if any(d < 0 for d in dims):
        raise InvalidArgument(f"shape {shape!r} has a negative dimension")
    return dims


class Buffer:
    """One handle of one Device, with numpy views of its object. See the module rules.

    `Buffer(dev, handle)` adopts a handle obtained from the handle layer (the Buffer then
    closes it); `size` and `readonly`, when the caller knows them, save an `info()` call.
    """

    def __init__(self, device: Device, handle: int, size: int | None = None, *,
                 readonly: bool | None = None) -> None:
        self._closed = True  # until adopted: a half-made Buffer queues nothing when dropped
        self.device = device
        self.handle = index(handle, "handle")
        if not 0 < self.handle < 2**32:
            raise InvalidArgument(f"handle {self.handle} cannot be valid (handles are 1 to 2**32-1)")
        self._size = None if size is None else index(size, "size")
        self._readonly = None if readonly is None else flag(readonly, "readonly")
        self._region: weakref.ref[Any] | None = None  # the shared mapping, while any view lives
        self._region_writable = False
        self._key: tuple[int, int] | None = None  # the identity of the memfd it mapped (to take it back)
        self._wrap = device._releases.adopt(handle)
        self._closed = False

    # -- getting one -----------------------------------------------------------------

    @classmethod
    def open_name(cls, device: Device, name: int) -> Buffer:
        """A new handle to the object with flink name `name` (GEM_OPEN)."""
        handle, size = device.open_name(name)
        return cls(device, handle, size)

    @classmethod
    def import_fd(cls, device: Device, fd: int) -> Buffer:
        """The handle for the object behind `fd` (PRIME import); `fd` stays the caller's."""
        return cls(device, device.import_fd(fd))

    # -- state -----------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed or self._wrap.closed

    def _live(self) -> int:
        if self._closed or self._wrap.closed:
            raise BadFd(f"Buffer (handle {self.handle}) is closed")
        return self.handle

    def info(self) -> ObjectInfo:
        info = self.device.info(self._live())
        self._size, self._readonly = info.size, info.readonly
        return info

    @property
    def size(self) -> int:
        """The object's size in bytes (a whole number of pages); asked once, then cached."""
        if self._size is None:
            self._size = self.info().size
        return self._size

    @property
    def readonly(self) -> bool:
        """Whether this handle is read-only (e.g. imported from a read-only fd)."""
        if self._readonly is None:
            self._readonly = self.info().readonly
        return self._readonly

    # -- bulk data -------------------------------------------------------------------

    def read(self, offset: int = 0, length: int | None = None) -> bytes:
        """pread; `length` defaults to the rest of the object from `offset`."""
        self._live()
        offset = index(offset, "offset")
        if length is None:
            length = self.size - offset
        return self.device.pread(self.handle, offset, length)

    def read_into(self, buffer: Any, offset: int = 0) -> int:
        """pread_into: fill the writable, contiguous `buffer` from `offset`; returns its length."""
        return self.device.pread_into(self._live(), offset, buffer)

    def write(self, data: Any, offset: int = 0) -> None:
        """pwrite any contiguous buffer-protocol object at `offset`."""
        self.device.pwrite(self._live(), offset, data)

    # -- views -----------------------------------------------------------------------

    def _view(self, writable: bool) -> memoryview:
        handle = self._live()
        region = self._region() if self._region is not None else None
        if region is None or getattr(region, "closed", False) or (writable and not self._region_writable):
            again = None if self._key is None or writable and not self._region_writable else \
                self.device._revive(self._key, 0, self.size, self._region_writable)  # (lingering: module rules)
            if again is not None:
                self._region = weakref.ref(again.obj)
                return again if writable or not self._region_writable else again.toreadonly()
            view = self.device._mmap(handle, 0, None, writable, linger=True)
            entry = find_mapping(*_span(view))
            self._region, self._region_writable = weakref.ref(view.obj), writable
            self._key = None if entry is None else entry.key
            return view
        view = memoryview(region)
        return view if writable or not self._region_writable else view.toreadonly()

    def map(self, *, writable: bool = True) -> memoryview:
        """A memoryview of the whole object (the shared mapping; zero-copy)."""
        return self._view(flag(writable, "writable"))

    def array(self, dtype: npt.DTypeLike = np.uint8, shape: Shape = None, *, offset: int = 0,
              writable: bool = True) -> npt.NDArray[Any]:
        """A numpy array over the shared mapping, `offset` bytes into the object (no copy).

        `shape` is an int or a tuple (C order); None gives as many items as fit after
        `offset`. A shape that needs more bytes than the object has, a negative dimension
        or offset, or an itemless dtype raises `InvalidArgument` (EINVAL) before mapping.
        """
        self._live()
        dt = view_dtype(dtype)
        offset = index(offset, "offset")
        writable = flag(writable, "writable")
        size = self.size
        if not 0 <= offset <= size:
            raise InvalidArgument(f"offset {offset} is outside the object ({size} bytes)")
        dims = ((size - offset) // dt.itemsize,) if shape is None else shape_dims(shape)
        count = 1
        for d in dims:
            count *= d
        if offset + count * dt.itemsize > size:
            raise InvalidArgument(f"{count} x {dt} ({count * dt.itemsize} bytes) at offset {offset} "
                                  f"does not fit in the object ({size} bytes)")
        arr = np.frombuffer(self._view(writable), dtype=dt, count=count, offset=offset)
        return arr.reshape(dims)

    def __dlpack__(self, *, stream: Any = None, max_version: tuple[int, int] | None = None,
                   dl_device: tuple[int, int] | None = None, copy: bool | None = None) -> Any:
        """A DLPack capsule of the whole object as 1-D uint8 on the CPU, made by numpy
        (same arguments and errors as `ndarray.__dlpack__`); it keeps the mapping alive."""
        arr = self.array(np.uint8, writable=not self.readonly)
        return arr.__dlpack__(stream=stream, max_version=max_version, dl_device=dl_device, copy=copy)

    def __dlpack_device__(self) -> tuple[int, int]:
        return (KDLCPU, 0)

    # -- sharing ---------------------------------------------------------------------

    def flink(self) -> int:
        """The object's global name (the same every time); it holds no reference."""
        return self.device.flink(self._live())

    def export(self, *, writable: bool = True) -> int:
        """An fd (O_CLOEXEC) to the object's memory, owned by the caller: close it."""
        return self.device.export(self._live(), writable=writable)

    # -- memory management -----------------------------------------------------------

    def madvise(self, advice: int) -> bool:
        """`ugem.WILLNEED` or `ugem.DONTNEED`; returns whether the contents are retained."""
        return self.device.madvise(self._live(), advice)

    def pin(self) -> None:
        self.device.pin(self._live())

    def unpin(self) -> None:
        self.device.unpin(self._live())

    def set_domain(self, read_domains: int = DOMAIN_CPU, write_domain: int = 0) -> None:
        self.device.set_domain(self._live(), read_domains, write_domain)

    def busy(self) -> bool:
        return self.device.busy(self._live())

    def wait(self, timeout_ns: int = -1) -> int:
        """Wait for device work using the object (forever by default); returns time left."""
        return self.device.wait(self._live(), timeout_ns)

    # -- closing ---------------------------------------------------------------------

    def close(self) -> None:
        """Let go of the handle: GEM_CLOSE once no other live Buffer wraps it; views
        already made stay valid."""
        if self._closed:
            return
        self._closed, self._region = True, None
        if not self.device.closed:
            self.device._unwrap(self._wrap)

    def __del__(self) -> None:
        if not self._closed:  # only queue it: the Device sends the close (module rules)
            self.device._released.append(self._wrap)

    def __reduce__(self) -> tuple[Any, ...]:
        """Plain pickle: by flink name and socket path (client/pickling.py has the rules)."""
        from .pickling import reduce_buffer_by_name

        return reduce_buffer_by_name(self)

    def __enter__(self) -> Buffer:
        self._live()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        size = "" if self._size is None else f" size={self._size}"
        state = " closed" if self.closed else ""
        return f"<Buffer handle={self.handle}{size}{state}>"


def _span(view: memoryview) -> tuple[int, int]:
    """The address range a view covers."""
    start = data_address(np.frombuffer(view, dtype=np.uint8))
    return start, start + view.nbytes
