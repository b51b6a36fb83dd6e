"""flat_bytes(): any contiguous buffer-protocol object as a flat byte memoryview, no copy.

Used wherever a caller's buffer meets ugem (pread_into/pwrite, userptr). C-contiguous
buffers are cast; Fortran-ordered ones are flattened in memory order through numpy (still
a view). Anything that cannot be seen as bytes without a copy is EINVAL, never a bare
TypeError: every failure of a ugem call is a UgemError.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import InvalidArgument

__all__ = ["flat_bytes"]


def flat_bytes(buffer: Any, *, writable: bool = False, what: str = "buffer") -> memoryview:
    try:
        view = memoryview(buffer)
    except TypeError:
        raise InvalidArgument(f"{what} must support the buffer protocol, got {type(buffer).__name__}") from None
    if writable and view.readonly:
        raise InvalidArgument(f"{what} is read-only; a writable buffer is needed")
    if not view.contiguous:
        raise InvalidArgument(f"{what} must be contiguous")
    if view.format == "B" and view.ndim == 1:
        return view
    try:
        return view.cast("B")  # only C-contiguous views with a native format cast
    except (TypeError, ValueError):  # e.g. Fortran order: flatten in memory order, no copy
        try:
            return np.asarray(view).ravel(order="K").view(np.uint8).data
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"{what} cannot be viewed as bytes: {exc}") from None
