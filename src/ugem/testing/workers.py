"""Worker functions for tests that pass ugem memory to other processes (pickling by
reference). They live in an importable module so that spawn and forkserver children find
them by name (a test module loaded with --import-mode=importlib cannot be imported there).
"""

from __future__ import annotations

import os
import pickle
import threading
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["fd_count", "hold_until_killed", "on_pipe", "on_queue", "receive_many", "resend", "touch", "touch_into"]

MARK_IN, MARK_OUT = 5, 42  # the sender writes MARK_IN at [1, 1]; the worker MARK_OUT at [0, 0]


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def touch(a: npt.NDArray[Any]) -> dict[str, Any]:
    """Check what the sender wrote, write back through the array; describe it."""
    seen = int(a[1, 1])
    if a.flags.writeable:
        a[0, 0] = MARK_OUT
    return {"seen": seen, "shape": a.shape, "strides": a.strides, "dtype": a.dtype.str,
            "writeable": bool(a.flags.writeable), "type": type(a).__name__}


def touch_into(a: npt.NDArray[Any], result: Connection) -> None:
    result.send(touch(a))


def on_queue(q: Any, result: Connection) -> None:
    result.send(touch(q.get()))


def on_pipe(conn: Connection, result: Connection) -> None:
    result.send(touch(conn.recv()))


def receive_many(conn: Connection, n: int) -> None:
    """Receive `n` arrays (acking each) and keep them all; report the fd counts."""
    import ugem

    ugem.default_device()  # its connection (or manager) is not what is measured
    before = fd_count()
    kept = []
    for _ in range(n):
        kept.append(conn.recv())
        conn.send(None)
    assert all(int(a[0]) == i % 256 for i, a in enumerate(kept))
    conn.send((before, fd_count()))


def resend(a: npt.NDArray[Any]) -> str:
    """Try to pickle a received array onward; the error message, or "" if it could."""
    try:
        ForkingPickler.dumps(a)
    except pickle.PicklingError as exc:
        return str(exc)
    return ""


def hold_until_killed(conn: Connection) -> None:
    """Receive an array, write through it, say so, and wait to be SIGKILLed."""
    a = conn.recv()
    a[0] = MARK_OUT
    conn.send(np.asarray(a).size)
    threading.Event().wait()
