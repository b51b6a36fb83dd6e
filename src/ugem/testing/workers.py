"""Worker functions for tests that pass ugem memory to other processes (pickling by
reference). They live in an importable module so that spawn and forkserver children find
them by name (a test module loaded with --import-mode=importlib cannot be imported there).
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import pickle
import threading
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["claimed_how", "fd_count", "hold_until_killed", "load_and_count_posts", "load_in_threads",
           "load_plain_twice", "map_id_of", "on_pipe", "on_queue", "receive_many", "receive_twice_until_killed",
           "count_channel_writes", "load_nested", "receive_views", "resend", "then", "touch",
           "touch_into"]

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


def claimed_how(a: npt.NDArray[Any]) -> dict[str, Any]:
    """How the received array was mapped: with no round trip (a map id this process chose,
    GEM_CLAIM_MAPPED) or through the daemon; and what it holds at [0]."""
    from ..client.registry import mapping_of
    from ..wire.structs_share import CHOSEN_MAP_IDS
    entry = mapping_of(a)
    assert entry is not None
    return {"no_round_trip": entry.map_id >= CHOSEN_MAP_IDS, "seen": int(a.flat[0])}


def load_and_count_posts(data: bytes) -> int:
    """Unpickle many arrays (claimed with no round trip where allowed); how many writes
    their claims took (on the connection or its lazy channel), checking each array's first
    element."""
    from ..client.default import default_device
    transport = default_device()._transport
    assert transport is not None
    writes: list[int] = []
    real_post, real_lazy = transport.post, transport.post_lazy
    lazy = [False]  # inside post_lazy (which may post on the connection instead)

    def post(frames: Any) -> None:
        if not lazy[0]:
            writes.append(len(frames))
        real_post(frames)

    def post_lazy(frames: Any) -> None:
        writes.append(len(frames))
        lazy[0] = True
        try:
            real_lazy(frames)
        finally:
            lazy[0] = False

    transport.post, transport.post_lazy = post, post_lazy  # type: ignore[method-assign]
    try:
        arrays = ForkingPickler.loads(data)
    finally:
        transport.post, transport.post_lazy = real_post, real_lazy  # type: ignore[method-assign]
    assert [int(a[0]) for a in arrays] == [i % 256 for i in range(len(arrays))]
    return len(writes)


def mark_and_return(a: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """Write MARK_OUT at [0] and send the received array itself back."""
    a.flat[0] = MARK_OUT
    return a


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
    """Pickle a received array onward and load it in a process that does not map it (a fresh
    spawned child, through a Pipe); the error message, or "" if it arrived."""
    ctx = multiprocessing.get_context("spawn")
    mine, theirs = ctx.Pipe()
    proc = ctx.Process(target=_load_one, args=(theirs,))
    proc.start()
    try:
        mine.send(a)
        return str(mine.recv())
    finally:
        proc.join()


def resend_into(a: npt.NDArray[Any], result: Connection) -> None:
    result.send(resend(a))


def _load_one(conn: Connection) -> None:
    try:
        conn.recv()
    except pickle.UnpicklingError as exc:
        conn.send(str(exc))
    else:
        conn.send("")


def hold_until_killed(conn: Connection) -> None:
    """Receive an array, write through it, say so, and wait to be SIGKILLed."""
    a = conn.recv()
    a[0] = MARK_OUT
    conn.send(np.asarray(a).size)
    threading.Event().wait()


def load_when_told(conn: Connection) -> None:
    """Receive an array, but load it only after the sender says "go"; send back its sum."""
    raw = conn.recv_bytes()
    assert conn.recv() == "go"
    a = ForkingPickler.loads(raw)
    conn.send(int(a.sum()))


def hold_and_sum(conn: Connection) -> None:
    """Receive an array and hold it; send back its sum now and at each request until "stop"."""
    a = conn.recv()
    conn.send(int(a.sum()))
    while conn.recv() != "stop":
        conn.send(int(a.sum()))


def load_bytes(conn: Connection, data: bytes) -> None:
    """Load a pickled array; send back the error text, or "" if it loaded."""
    try:
        ForkingPickler.loads(data)
    except Exception as exc:  # the message is what the test checks
        conn.send(f"{type(exc).__name__}: {exc}")
    else:
        conn.send("")


def map_id_of(a: npt.NDArray[Any]) -> int:
    """Mark [0] with MARK_OUT; the id of the mapping the received array lies in."""
    from ..client.registry import mapping_of
    entry = mapping_of(a)
    assert entry is not None
    a.flat[0] = MARK_OUT
    return entry.map_id


def map_ids_of(arrays: list[npt.NDArray[Any]]) -> list[int]:
    """`map_id_of` of each."""
    return [map_id_of(a) for a in arrays]


def then(what: str) -> int:
    """After a task whose arrays died: "request" makes a request (it sends what is queued);
    "fork" forks a child that exits at once, with the number of memfd mappings it inherited
    (as its status), returned."""
    from ..client.default import default_device
    gc.collect()
    if what == "request":
        default_device().stats()
        return 0
    pid = os.fork()
    if pid == 0:
        with open("/proc/self/maps") as maps:
            os._exit(min(255, sum("/memfd:" in line for line in maps)))
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def load_plain_twice(first: bytes, second: bytes) -> tuple[int, int]:
    """Load two multiprocessing pickles of the same memory with plain `pickle.loads` (outside
    multiprocessing's batches: each claim, or drop, is sent at once), dropping the first array
    before loading the second; both mapping ids."""
    ids = [map_id_of(pickle.loads(data)) for data in (first, second)]  # (each array dies at once)
    return ids[0], ids[1]


def load_in_threads(pickles: list[list[bytes]]) -> tuple[list[str], int]:
    """One thread per list: unpickle each of its multiprocessing pickles (lists of arrays), check
    [5] == MARK_IN, write 1 at [10 + thread number], drop them. What went wrong, and how many
    distinct mappings the arrays lay in (memory received again takes a lingering one back)."""
    from ..client.default import default_device
    from ..client.registry import mapping_of
    errors: list[str] = []
    ids: set[int] = set()

    def run(number: int, blobs: list[bytes]) -> None:
        try:
            for blob in blobs:
                for a in ForkingPickler.loads(blob):
                    entry = mapping_of(a)
                    if entry is None or int(a[5]) != MARK_IN:
                        errors.append(f"thread {number}: {entry}, [5] = {int(a[5])}")
                    else:
                        ids.add(entry.map_id)
                    a[10 + number] = 1
        except Exception as exc:  # reported to the test
            errors.append(f"thread {number}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=run, args=(i, blobs)) for i, blobs in enumerate(pickles)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    gc.collect()
    default_device().stats()  # a request: what lingers is released
    return errors, len(ids)


def receive_twice_until_killed(conn: Connection) -> None:
    """Receive an array, drop it, receive it again; send both mapping ids; wait to be SIGKILLed."""
    first = map_id_of(conn.recv())  # (the array dies here)
    conn.send((first, map_id_of(conn.recv())))
    threading.Event().wait()


def receive_views(data: bytes) -> tuple[list[int], list[bool], int, int]:
    """Unpickle a multiprocessing pickle of a list of arrays (views of ugem memory); write -[0]
    at [1] of each writable one. What each holds at [0], whether each is writable, how many
    distinct mappings they lie in, and how many claims and drops this process sent for them
    (records of GEM_CLAIM_MAPPED_BATCH posts, GEM_CLAIM calls, queued share drops)."""
    from ..client.default import default_device
    from ..client.registry import mapping_of
    from ..wire.frames import Op
    from ..wire.structs_share import CLAIM_BATCH_RECORD
    dev = default_device()
    transport = dev._transport
    assert transport is not None
    sent = 0
    real_post, real_lazy, real_call = transport.post, transport.post_lazy, transport.call

    def count(frames: Any) -> None:
        nonlocal sent
        sent += sum(len(req.records) // CLAIM_BATCH_RECORD.size for op, req in frames
                    if op == Op.GEM_CLAIM_MAPPED_BATCH)

    def post(frames: Any) -> None:
        count(frames)
        real_post(frames)

    def post_lazy(frames: Any) -> None:
        count(frames)
        transport.post = real_post  # type: ignore[method-assign]  # (a lazy post may go on the connection)
        try:
            real_lazy(frames)
        finally:
            transport.post = post  # type: ignore[method-assign]

    def call(op: Any, req: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal sent
        sent += op == Op.GEM_CLAIM
        return real_call(op, req, *args, **kwargs)

    queued = len(dev._released)
    transport.post, transport.post_lazy, transport.call = post, post_lazy, call  # type: ignore[method-assign]
    try:
        arrays = ForkingPickler.loads(data)
    finally:
        transport.post, transport.post_lazy, transport.call = real_post, real_lazy, real_call  # type: ignore
    drops = sum(isinstance(item, tuple) for item in list(dev._released)[queued:])
    maps = set()
    for a in arrays:
        entry = mapping_of(a)
        assert entry is not None
        maps.add(entry.address)
        if a.flags.writeable:
            a[1] = -a[0]
    return [int(a[0]) for a in arrays], [bool(a.flags.writeable) for a in arrays], len(maps), sent + drops


def load_copies(data: bytes) -> list[tuple[Any, bool]]:
    """Unpickle a multiprocessing pickle of a list of arrays: a plain copy of each, and whether it is writable."""
    return [(np.array(a), bool(a.flags.writeable)) for a in ForkingPickler.loads(data)]


def load_nested(data: bytes) -> list[Any]:
    """Unpickle a multiprocessing pickle of arrays and lists of arrays; what each holds at [0]."""
    def first(x: Any) -> Any:
        return [first(y) for y in x] if isinstance(x, list) else int(x[0])
    return [first(x) for x in ForkingPickler.loads(data)]


_counts: dict[str, int] = {}


def count_channel_writes(start: bool) -> dict[str, int]:
    """In a Pool worker: with `start`, count from now the posts this process's default device
    sends on its lazy channel and its other writes to the daemon; without, stop and return
    the counts."""
    from ..client.default import default_device
    transport: Any = default_device()._transport
    if not start:
        for name in ("post", "post_lazy", "call"):
            delattr(transport, name)  # (the instance attributes set below: the methods again)
        return dict(_counts)
    _counts.update(lazy=0, connection=0)
    real_lazy, real_post, real_call = transport.post_lazy, transport.post, transport.call

    def post_lazy(frames: Any) -> None:
        _counts["lazy"] += 1
        transport.post = real_post  # (a lazy post that does not fit goes on the connection: counted as lazy)
        try:
            real_lazy(frames)
        finally:
            transport.post = post

    def post(*args: Any, **kwargs: Any) -> Any:
        _counts["connection"] += 1
        return real_post(*args, **kwargs)

    def call(*args: Any, **kwargs: Any) -> Any:
        _counts["connection"] += 1
        return real_call(*args, **kwargs)

    transport.post_lazy, transport.post, transport.call = post_lazy, post, call
    return {}
