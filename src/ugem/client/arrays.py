"""`ugem.empty()` and `ugem.zeros()`: a numpy array in a new object, in one call (SPEC §1).

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
from .buffer import shape_dims, view_dtype
from .default import default_device
from .device import Device

__all__ = ["empty", "zeros"]


def empty(shape: int | Sequence[int], dtype: npt.DTypeLike = np.float64, *,
          device: Device | None = None) -> npt.NDArray[Any]:
    """A new array of `shape` and `dtype` in a new object of `device` (else the default
    Device). Its contents read as zero (every new object does); `zeros` promises it."""
    dims, dt = shape_dims(shape), view_dtype(dtype)
    nbytes = math.prod(dims) * dt.itemsize
    if nbytes > MAX_OBJECT_SIZE:
        raise TooBig(f"an array of shape {dims} and dtype {dt} needs {nbytes} bytes, more than an object "
                     f"may hold ({MAX_OBJECT_SIZE})")
    if device is None:
        dev = default_device()
    elif isinstance(device, Device):
        dev = device
    else:
        raise InvalidArgument(f"device must be a ugem.Device or None, got {device!r}")
    view = dev._new_mapping(max(nbytes, PAGE_SIZE))  # one round trip, no handle to close
    return np.frombuffer(view, dtype=dt, count=math.prod(dims)).reshape(dims)


def zeros(shape: int | Sequence[int], dtype: npt.DTypeLike = np.float64, *,
          device: Device | None = None) -> npt.NDArray[Any]:
    """As `empty`, guaranteed zero: a new object reads as zero, so nothing is written and no
    page is touched until the array is."""
    return empty(shape, dtype, device=device)
