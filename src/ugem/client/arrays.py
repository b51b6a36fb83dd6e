"""`ugem.empty()`, `ugem.zeros()` and `ugem.array()`: a numpy array in a new object, in one call.

Rules:
- the object is made on `device`, else on `default_device()`, with room for the whole
  array (rounded up to a page, as every object), and the array is a writable zero-copy
  view of its shared mapping, C order;
- object and mapping come in one request (GEM_CREATE_MAPPED, one round trip) and no handle
  is made (so making arrays in a loop does not grow the handle table): the mapping the
  array views keeps the object alive for as long as the array (or any view of it) lives;
- a new object reads as zero and no page is touched until written, so `zeros` costs
  exactly what `empty` does; they differ only in what they promise;
- an array of no items (a dimension of 0) still gets an object of one page (objects are
  never empty), so it behaves like any other: same device, same errors;
- `array(value)` puts a copy of `value` (anything `numpy.asarray` takes, not of object dtype)
  into ugem memory, as `ray.put` puts a value into Ray's store: C order, the same shape and
  dtype (or `dtype`). Since every byte is written, it may reuse in place the object of an
  array this Device made that died a moment ago (1 MiB or more, the same size in pages,
  nothing else holding or seeing it: client/device_share.py `_reused_mapping`), whose
  mapping is ready, page tables and all; the rest of its last page is zeroed. So a loop of
  `a = ugem.array(x)` copies at the speed of a copy into memory already in use; a copy of
  8 MiB or more runs in parts on several threads at once (ugem/parts.py), as Ray's put does;
- a bad shape, dtype or device raises `InvalidArgument` (EINVAL) naming it, before any
  object is made; more bytes than an object may hold (2**46) is `TooBig` (E2BIG) naming the shape.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from ..constants import MAX_OBJECT_SIZE, PAGE_SIZE
from ..errors import InvalidArgument, TooBig
from ..parts import copyto
from .buffer import shape_dims, view_dtype
from .default import default_device
from .device import Device

__all__ = ["array", "empty", "zeros"]


def empty(shape: int | Sequence[int], dtype: npt.DTypeLike = np.float64, *,
          device: Device | None = None) -> npt.NDArray[Any]:
    """A new array of `shape` and `dtype` in a new object of `device` (else the default
    Device). Its contents read as zero (every new object does); `zeros` promises it."""
    dims, dt = shape_dims(shape), view_dtype(dtype)
    dev, nbytes = _device(device), _nbytes(dims, dt)
    view = dev._new_mapping(max(nbytes, PAGE_SIZE))  # one round trip, no handle to close
    return np.frombuffer(view, dtype=dt, count=math.prod(dims)).reshape(dims)


def array(value: Any, dtype: npt.DTypeLike | None = None, *, device: Device | None = None) -> npt.NDArray[Any]:
    """A new array in ugem memory holding a copy of `value` (module rules), on `device` (else
    the default Device)."""
    dev = _device(device)
    try:
        src = np.asarray(value, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"ugem.array cannot make an array of {type(value).__name__} "
                              f"(dtype {dtype!r}): {exc}") from None
    if src.dtype.hasobject:
        raise InvalidArgument(f"ugem.array cannot hold an array of object dtype (a {type(value).__name__}): "
                              f"its items are references into this process's heap")
    dt = view_dtype(src.dtype)
    nbytes = _nbytes(src.shape, dt)
    size = -(-max(nbytes, PAGE_SIZE) // PAGE_SIZE) * PAGE_SIZE
    view = dev._reused_mapping(size)
    if view is not None:
        np.frombuffer(view, dtype=np.uint8)[nbytes:] = 0  # (the rest of the last page: old bytes)
    else:
        view = dev._new_mapping(size)
    out = np.frombuffer(view, dtype=dt, count=src.size).reshape(src.shape)
    copyto(out, src)  # a big one in parts on several threads, as Ray's put
    return out


def _device(device: Device | None) -> Device:
    if device is None:
        return default_device()
    if isinstance(device, Device):
        return device
    raise InvalidArgument(f"device must be a ugem.Device or None, got {device!r}")


def _nbytes(dims: Sequence[int], dt: np.dtype[Any]) -> int:
    nbytes = math.prod(dims) * dt.itemsize
    if nbytes > MAX_OBJECT_SIZE:
        raise TooBig(f"an array of shape {tuple(dims)} and dtype {dt} needs {nbytes} bytes, more than an object "
                     f"may hold ({MAX_OBJECT_SIZE})")
    return nbytes


def zeros(shape: int | Sequence[int], dtype: npt.DTypeLike = np.float64, *,
          device: Device | None = None) -> npt.NDArray[Any]:
    """As `empty`, guaranteed zero: a new object reads as zero, so nothing is written and no
    page is touched until the array is."""
    return empty(shape, dtype, device=device)
