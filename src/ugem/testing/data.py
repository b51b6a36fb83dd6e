"""Small helpers shared by the test suites: reproducible random contents, an object written
with them, the expected bytes after a device Fill, and polling with a deadline."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from ..cmd import Fill

__all__ = ["PROMPT_S", "SAFETY_S", "fill", "filled", "random_bytes", "wait_until", "write_new"]

T = TypeVar("T")

# Time bounds in tests. The suite must pass on a loaded 2-CPU machine (CI, or two suites at
# once), where a process can wait hundreds of milliseconds for a CPU, so:
SAFETY_S = 60.0  # a safety net for a wait that ends on an event: reached only if it never comes
PROMPT_S = 2.0  # "answered without waiting behind anyone": far above a busy machine's scheduling
#                 delays, far below what being blocked costs (a stalled peer is dropped after 30 s)


def wait_until(predicate: Callable[[], T], timeout: float = SAFETY_S, interval: float = 0.01,
               what: str = "condition") -> T:
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds, or
    SAFETY_S if that is longer (a deadline is a safety net here, never what a test checks)."""
    timeout = max(timeout, SAFETY_S)
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what} (last value {value!r})")
        time.sleep(interval)


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
