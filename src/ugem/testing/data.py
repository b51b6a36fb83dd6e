"""Small data helpers shared by the test suites: reproducible random contents, an object
written with them, and the expected bytes after a device Fill."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..cmd import Fill

__all__ = ["fill", "filled", "random_bytes", "write_new"]


def random_bytes(seed: int, size: int) -> bytes:
    return np.random.default_rng(seed).bytes(size)


def write_new(dev: Any, size: int, seed: int) -> tuple[int, bytes]:
    """Create an object of `size` bytes, write seeded random bytes; (handle, data)."""
    handle = dev.create(size)
    data = random_bytes(seed, size)
    dev.pwrite(handle, 0, data)
    return handle, data


def fill(handle: int, offset: int = 0, length: int = 16, byte: int = 0x5A) -> Fill:
    return Fill(dst=handle, offset=offset, length=length, byte=byte)


def filled(data: bytes, offset: int, length: int, byte: int) -> bytes:
    """`data` as it reads after Fill(offset, length, byte)."""
    return data[:offset] + bytes([byte]) * length + data[offset + length:]
