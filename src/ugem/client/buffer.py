"""Buffer: a convenience wrapper around one handle (adds no semantics of its own).

`Device.new(size)` returns one. `Buffer.array(dtype, shape)` is a zero-copy numpy view of a
shared mapping; `close()` (or leaving a `with` block) closes the handle, while arrays
already made stay valid, exactly as mappings outlive GEM_CLOSE.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .device import Device, ObjectInfo

__all__ = ["Buffer"]


class Buffer:
    def __init__(self, device: Device, handle: int) -> None:
        self.device = device
        self.handle = handle
        self._closed = False

    @property
    def size(self) -> int:
        return self.info().size

    def info(self) -> ObjectInfo:
        return self.device.info(self.handle)

    def read(self, offset: int = 0, length: int | None = None) -> bytes:
        if length is None:
            length = self.size - offset
        return self.device.pread(self.handle, offset, length)

    def write(self, data: Any, offset: int = 0) -> None:
        self.device.pwrite(self.handle, offset, data)

    def map(self, *, writable: bool = True) -> memoryview:
        return self.device.mmap(self.handle, writable=writable)

    def array(self, dtype: Any = np.uint8, shape: Any = None, *, writable: bool = True) -> np.ndarray:
        """A numpy array over a shared mapping of the whole object (no copy)."""
        dtype = np.dtype(dtype)
        view = self.map(writable=writable)
        count = -1 if shape is None else int(np.prod(shape))
        arr = np.frombuffer(view, dtype=dtype, count=count)
        return arr if shape is None else arr.reshape(shape)

    def flink(self) -> int:
        return self.device.flink(self.handle)

    def export(self, *, writable: bool = True) -> int:
        return self.device.export(self.handle, writable=writable)

    def close(self) -> None:
        if not self._closed and not self.device.closed:
            self._closed = True
            self.device.close_handle(self.handle)

    def __enter__(self) -> Buffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Buffer handle={self.handle}>"
