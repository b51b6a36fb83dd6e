"""Arrays to a `multiprocessing.Pool` worker and back: ugem by reference vs by value vs shared_memory vs torch.

    python bench/bench_pool.py [--quick] [--runs N] [--n N] [--warmup N] [--json [PATH]]
                               [--start-method fork|spawn|forkserver]

One sample = one round trip through `pool.apply`: the parent sends an array (filled once, the
same bytes for every method), the worker writes one element (a value new each time) and
returns the array, the parent checks that element. Sizes: 1 MiB, 64 MiB, 1 GiB (not with
--quick; skipped with a note when MemAvailable is short), 2,000 arrays of 4 KiB in one
call (a list; the worker writes one element of each), and the same as 2,000 rows of one
8,000 KiB array (views: ugem's rows of one `ugem.empty`, which travel as one reference; one
shared_memory segment, attached once by the worker, which makes a view of each row; by value,
rows of one numpy array; not torch). Methods, each with its own persistent
one-worker pool (started once, warmed up first; the rounds of all methods interleave). Every
method takes --n samples per round of one array, but by value at 64 MiB (a quarter: each
copies 128 MiB) and 1 GiB (one: each copies 2 GiB); every method --n/6 of the 2,000 arrays (each way):

- ugem: arrays from `ugem.empty(...)` on a client of a daemon started for the bench
  (`$UGEM_SOCKET` names it, so that `default_device()` in the workers is a client of it);
  multiprocessing's pickler sends them by reference (an fd, the worker maps it through its
  daemon client; the array it returns comes back the same way);
- by value: plain numpy arrays, pickled as multiprocessing pickles them (protocol 5 buffers
  in the pickle stream): the bytes are copied both ways;
- shared_memory by name: the array lives in a `multiprocessing.shared_memory.SharedMemory`
  created once; the parent sends its name, shape and dtype, the worker attaches, writes,
  closes and returns the name; the parent checks its own view, and unlinks at the end;
- torch.multiprocessing (only if torch imports, else listed as skipped): CPU tensors made with
  `torch.empty(n, dtype=torch.uint8).share_memory_()` sent through a pool made from
  `torch.multiprocessing.get_context(<start method>)`: torch's reducers send each tensor's storage
  by shared-memory reference with its default sharing strategy (`file_descriptor` on Linux: one fd
  per storage, handed over through `multiprocessing.resource_sharer`); the returned tensor is the
  parent's own storage again, and the parent checks the element in both.

Targets (issue 12): ugem >= 10x faster than by value at 64 MiB (ratio <= 0.1); ugem within
1.2x of shared_memory at every size and for the 2,000 arrays (ratio <= 1.2; the rows of one
array are a diagnostic, with no target); after receiving the 2,000 arrays (all held
at once) the worker holds at most 16 more fds than before (shared_memory's and torch's counts
reported too). The ugem rows also carry their ratio to by value and to torch (no target).

torch's 2,000 tensors first make one round trip in a probe whose task unpickles them itself (the
same bytes the Pool would send) and pickles them back itself: a worker that runs out of fds
(RLIMIT_NOFILE) either way then reports it, where in the Pool's own (un)pickling it would end the
worker and lose the task (a hang). The probe gives torch's fd count; if it fails, torch's 2,000-tensor
round trip is listed as not measured, with the reason.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import multiprocessing.pool
import os
import resource
import sys
from collections.abc import Callable
from multiprocessing import resource_tracker, shared_memory
from multiprocessing.reduction import ForkingPickler
from types import ModuleType
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import _harness as H  # noqa: E402
import ugem  # noqa: E402
from ugem.client.default import reset  # noqa: E402
from ugem.testing.daemon import run_daemon  # noqa: E402

BENCH = "pool"
DEFAULTS = dict(runs=10, n=20, warmup=3, quick_runs=3, quick_n=6, quick_warmup=1)
SIZES = {"1 MiB": H.MiB, "64 MiB": 64 * H.MiB, "1 GiB": 1024 * H.MiB}
MANY, SMALL = 2000, 4096
VIEWS = "views"  # MANY rows of SMALL bytes of one array
LISTS = ("many", VIEWS)  # labels whose trip sends a list of MANY arrays
FD_SLACK = 16  # target: a receiver holds at most this many more fds
SPEED_VS_VALUE = 0.1  # ugem / by value at 64 MiB
WITHIN_SHM = 1.2  # ugem / shared_memory, every size
METHODS = ("ugem", "by value", "shared_memory")  # always measured
TORCH = "torch.multiprocessing"  # measured when torch imports
SAME_MEMORY = ("ugem", TORCH)  # the parent checks the worker's write in its own array too


# -- worker side (module-level: spawn and forkserver workers import them by name) ------------


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def warm() -> int:
    """Make the worker's default device (a ugem daemon client) before anything is measured."""
    ugem.default_device()
    return os.getpid()


def warm_torch() -> int:
    """Register torch's reducers in the worker (a spawned worker has not imported torch yet)."""
    import torch.multiprocessing  # noqa: F401
    return os.getpid()


def fd_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def touch(a: np.ndarray, value: int) -> np.ndarray:
    a[0] = value
    return a


def touch_many(arrays: list[np.ndarray], value: int, count: bool) -> tuple[list[np.ndarray], int]:
    for a in arrays:
        a[0] = value
    return arrays, (fd_count() if count else -1)


def touch_many_pickled(payload: bytes, value: int) -> tuple[bytes, int, str]:
    """touch_many(count=True) on arrays this task unpickles itself from the bytes the Pool would send, and
    pickles back itself as the Pool would: running out of fds on either way is reported (with the fd count
    if it was taken) instead of ending the worker, as it does when the Pool unpickles a task or fails to
    pickle a result of unprintable arrays (the task is lost: the caller waits forever)."""
    try:
        arrays = ForkingPickler.loads(payload)
    except (OSError, RuntimeError) as exc:  # EMFILE: multiprocessing says "received 0 items of ancdata"
        return b"", -1, f"receiving them: {type(exc).__name__}: {exc}"
    got, fds = touch_many(arrays, value, True)
    try:
        return bytes(ForkingPickler.dumps(got)), fds, ""
    except OSError as exc:  # EMFILE: each tensor's fd is dup'ed for multiprocessing.resource_sharer
        return b"", fds, f"sending them back: {type(exc).__name__}: {exc}"


def touch_shm(name: str, shape: tuple[int, ...], dtype: str, value: int) -> str:
    seg = shared_memory.SharedMemory(name=name)
    a: np.ndarray = np.ndarray(shape, dtype, buffer=seg.buf)
    a[0] = value
    del a
    seg.close()
    return name


def touch_shm_many(names: list[str], shape: tuple[int, ...], dtype: str, value: int, count: bool
                   ) -> tuple[list[str], int]:
    """Attach all (the receiver holds them all at once, as it holds received arrays), write, close."""
    segs = [shared_memory.SharedMemory(name=name) for name in names]
    for seg in segs:
        seg.buf[0] = value
    fds = fd_count() if count else -1
    for seg in segs:
        seg.close()
    return names, fds


def touch_shm_rows(name: str, rows: int, size: int, value: int) -> str:
    """Attach one segment, make a view of each of its `rows` rows (as a receiver of that many arrays
    would hold them), write each, close."""
    seg = shared_memory.SharedMemory(name=name)
    views = [np.ndarray((size,), np.uint8, buffer=seg.buf, offset=i * size) for i in range(rows)]
    for a in views:
        a[0] = value
    del views, a
    seg.close()
    return name


# -- parent side -------------------------------------------------------------------------------


class Data:
    """The arrays of every method, filled once with the same bytes; shared_memory unlinked at close."""

    def __init__(self, sizes: dict[str, int], methods: tuple[str, ...]) -> None:
        self.segs: list[shared_memory.SharedMemory] = []
        self.arrays: dict[tuple[str, str], Any] = {}
        self.shm_names: dict[str, list[str]] = {}  # by size label: the segments' names
        for label, size in sizes.items():
            pattern = np.arange(size, dtype=np.uint64).astype(np.uint8) if size <= 64 * H.MiB else None
            for method in methods:
                a, view = self._new(method, size)
                if pattern is None:
                    view[:] = 7  # 1 GiB: touch every page without a 1 GiB pattern array
                else:
                    np.copyto(view, pattern)
                self.arrays[(method, label)] = a
            self.shm_names[label] = [self.segs[-1].name]
        for method in methods:
            many = [self._new(method, SMALL) for _ in range(MANY)]
            for i, (_, view) in enumerate(many):
                view[:] = i % 256
            self.arrays[(method, "many")] = [a for a, _ in many]
        self.shm_names["many"] = [seg.name for seg in self.segs[-MANY:]]
        for method in methods:
            if method != TORCH:  # (torch: not measured)
                _, block = self._new(method, MANY * SMALL)
                rows = block.reshape(MANY, SMALL)
                rows[:] = (np.arange(MANY) % 256).astype(np.uint8)[:, None]
                self.arrays[(method, VIEWS)] = list(rows)
        self.shm_names[VIEWS] = [self.segs[-1].name]

    def _new(self, method: str, size: int) -> tuple[Any, np.ndarray]:
        """What is sent (an array; torch: a shared-memory tensor) and a numpy view of its bytes."""
        if method == TORCH:
            import torch
            t = torch.empty(size, dtype=torch.uint8).share_memory_()
            return t, t.numpy()
        if method == "ugem":
            a = ugem.empty(size, np.uint8)
        elif method == "by value":
            a = np.empty(size, np.uint8)
        else:
            seg = shared_memory.SharedMemory(create=True, size=size)
            self.segs.append(seg)
            a = np.ndarray((size,), np.uint8, buffer=seg.buf)
        return a, a

    def close(self) -> None:
        self.arrays.clear()
        gc.collect()
        for seg in self.segs:
            try:
                seg.close()
            finally:
                seg.unlink()
        self.segs.clear()


class Counter:
    def __init__(self) -> None:
        self.value = 0

    def next(self) -> int:
        self.value = self.value % 250 + 1
        return self.value


def one_trip(pool: multiprocessing.pool.Pool, method: str, data: Data, key: tuple[str, str],
             counter: Counter) -> Callable[[], None]:
    a = data.arrays[key]
    many = key[1] in LISTS
    if method == "shared_memory":
        names = data.shm_names[key[1]]
        views = a if many else [a]

        def shm() -> None:
            v = counter.next()
            if key[1] == VIEWS:
                pool.apply(touch_shm_rows, (names[0], MANY, SMALL, v))
            elif many:
                pool.apply(touch_shm_many, (names, (SMALL,), "uint8", v, False))
            else:
                pool.apply(touch_shm, (names[0], a.shape, a.dtype.str, v))
            if any(int(x[0]) != v for x in views):
                raise AssertionError(f"shared_memory: the worker's write of {v} is not seen")
        return shm

    def trip() -> None:
        v = counter.next()
        if many:
            got, _ = pool.apply(touch_many, (a, v, False))
        else:
            got = [pool.apply(touch, (a, v))]
        if len(got) != (MANY if many else 1) or any(int(x[0]) != v for x in got):
            raise AssertionError(f"{method}: the returned array does not carry the worker's write of {v}")
        if method in SAME_MEMORY and any(int(x[0]) != v for x in (a if many else [a])):
            raise AssertionError(f"{method}: the worker's write is not seen in the sender's array")
    return trip


def timed(label: str, op: Callable[[], None], cap: int = 0) -> H.Runner:
    """A runner of `op`: the samples a round (or warm-up) asks for, at most `cap` if given."""
    def run(n: int) -> dict[str, list[int]]:
        return {label: H.time_each(op, min(n, cap) if cap else n)}
    return run


def fds_added(pool: multiprocessing.pool.Pool, method: str, data: Data) -> int:
    """How many more fds the worker holds while it holds the 2,000 received arrays."""
    gc.collect()
    before = pool.apply(fd_count)
    if method == "shared_memory":
        _, after = pool.apply(touch_shm_many, (data.shm_names["many"], (SMALL,), "uint8", 1, True))
    else:
        _, after = pool.apply(touch_many, (data.arrays[(method, "many")], 1, True))
    return int(after) - int(before)


def torch_fds_added(pool: multiprocessing.pool.Pool, data: Data) -> tuple[int, str]:
    """torch's probe (module docstring): the fds its worker adds holding the 2,000 tensors (-1: not measured),
    and why the round trip failed ("" if it did not)."""
    gc.collect()
    before = pool.apply(fd_count)
    tensors = data.arrays[(TORCH, "many")]
    payload = bytes(ForkingPickler.dumps(tensors))  # what Pool.apply would send: torch's reducers, fds by dup
    back, after, why = pool.apply(touch_many_pickled, (payload, 1))
    added = int(after) - int(before) if after >= 0 else -1
    if why:
        return added, f"the worker ran out of fds {why} (RLIMIT_NOFILE {pool.apply(fd_limit)}, {MANY} tensors)"
    got = ForkingPickler.loads(back)  # fetches the worker's dups: else they stay open in the worker
    if len(got) != MANY or any(int(t[0]) != 1 for t in tensors):
        raise AssertionError(f"{TORCH}: the worker's writes are not seen in the sender's tensors")
    return added, ""


def torch_mp_or_why() -> tuple[ModuleType | None, str]:
    """torch.multiprocessing (importing it registers torch's reducers with multiprocessing), or why not."""
    try:
        import torch.multiprocessing as torch_mp
    except (ImportError, OSError) as exc:
        return None, f"torch does not import ({type(exc).__name__}: {exc})"
    return torch_mp, ""


def sizes_for(opts: H.Options, notes: list[str], methods: int) -> dict[str, int]:
    sizes = dict(SIZES)
    if opts.quick:
        del sizes["1 GiB"]
        notes.append("1 GiB skipped: --quick")
        return sizes
    with open("/proc/meminfo") as f:
        avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    need = (methods + 5) * SIZES["1 GiB"]  # a copy of the data per method, plus by value's pickles and copies
    if avail < need:
        del sizes["1 GiB"]
        notes.append(f"1 GiB skipped: MemAvailable {avail / 2**30:.1f} GiB < {need / 2**30:.0f} GiB needed")
    return sizes


def seconds_row(figure: str, mode: str, s: H.Series, base: H.Series | None = None,
                target: H.Target | None = None) -> H.Row:
    row = H.Row.latency(BENCH, figure, mode, s, baseline=base)
    row.median, row.p99, row.unit = row.median / 1e6, row.p99 / 1e6, "s"
    row.run_medians = [m / 1e6 for m in row.run_medians]
    row._apply(target)  # after the unit is right
    return row


class Measured:
    """Series per size label and method; fds the workers add holding MANY arrays; torch's probe outcome."""

    def __init__(self) -> None:
        self.results: dict[str, H.Results] = {}
        self.fds: dict[str, int] = {}
        self.torch_fd_error = ""
        self.torch_fd_limit = -1


def run(opts: H.Options) -> H.Report:
    start = getattr(opts.extra, "start_method", None) or "fork"
    torch_mp, torch_why = torch_mp_or_why()
    report = H.Report(BENCH, "an array to a Pool worker and back: ugem by reference vs by value vs shared_memory "
                      "vs torch.multiprocessing",
                      {"runs": opts.runs, "n": opts.n, "warmup": opts.warmup, "start_method": start})
    sizes = sizes_for(opts, report.notes, len(METHODS) + (torch_mp is not None))
    keys = [*sizes, "many", VIEWS]
    measured = _measure(opts, start, sizes, keys, torch_mp)
    _time_rows(report, measured.results, keys, torch_mp is not None)
    _fd_rows(report, measured, torch_why)
    _notes(report, measured, start, torch_mp)
    return report


def _start_pools(pools: dict[str, multiprocessing.pool.Pool], start: str, torch_mp: ModuleType | None) -> None:
    """One persistent one-worker pool per method, warmed up; put in `pools` as each starts (the caller closes)."""
    ctx = multiprocessing.get_context(start)
    for m in METHODS:
        pools[m] = ctx.Pool(1)
        pools[m].apply(warm)
    if torch_mp is not None:
        pools[TORCH] = torch_mp.get_context(start).Pool(1)
        pools[TORCH].apply(warm_torch)


def _rounds(opts: H.Options, pools: dict[str, multiprocessing.pool.Pool], data: Data, label: str, size: int,
            counter: Counter, skip: dict[str, str]) -> H.Results:
    """The interleaved rounds of every method (but those in `skip`: method -> why) for one size label."""
    by_value = opts.n if size <= H.MiB else (max(1, opts.n // 4) if size <= 64 * H.MiB else 1)
    n = max(1, opts.n // 6) if label in LISTS else opts.n  # (by reference a trip costs the same at every size)
    runners: dict[str, H.Runner] = {}
    for m in pools:
        if m not in skip:
            cap = by_value if m == "by value" and label not in LISTS else 0
            runners[m] = timed(m, one_trip(pools[m], m, data, (m, label), counter), cap)
    warmup = opts.warmup if size <= 64 * H.MiB else min(1, opts.warmup)
    results = H.interleaved(runners, runs=opts.runs, n=n, warmup=warmup)
    for m, why in skip.items():
        results[m] = H.Series(m, error=why)
    return results


def _measure(opts: H.Options, start: str, sizes: dict[str, int], keys: list[str],
             torch_mp: ModuleType | None) -> Measured:
    """torch's fd probe (before its rounds: it tells whether its worker can hold MANY tensors), the interleaved
    rounds per size (`keys`), then the fds the other workers add holding MANY arrays."""
    saved = os.environ.get("UGEM_SOCKET")
    with run_daemon() as daemon:
        os.environ["UGEM_SOCKET"] = daemon.path
        reset()  # this process's default device: a client of this daemon
        pools: dict[str, multiprocessing.pool.Pool] = {}
        data: Data | None = None
        try:
            resource_tracker.ensure_running()  # forked workers share it (else each starts its own, whose
            # cleanup at the worker's exit unlinks the segments the worker attached: warnings, lost segments)
            _start_pools(pools, start, torch_mp)  # before the data: forked workers inherit none of it
            data = Data(sizes, tuple(pools))
            out = Measured()
            if TORCH in pools:
                out.torch_fd_limit = pools[TORCH].apply(fd_limit)
                out.fds[TORCH], out.torch_fd_error = torch_fds_added(pools[TORCH], data)
            counter = Counter()
            for label in keys:
                skip = {TORCH: out.torch_fd_error} if label == "many" and out.torch_fd_error else {}
                if label == VIEWS and TORCH in pools:
                    skip = {TORCH: "not measured: rows of one tensor"}
                out.results[label] = _rounds(opts, pools, data, label, sizes.get(label, 0), counter, skip)
            for m in ("ugem", "shared_memory"):
                out.fds[m] = fds_added(pools[m], m, data)
            return out
        finally:
            for p in pools.values():
                p.close()
                p.join()
            if data is not None:
                data.close()
            reset()
            if saved is None:
                os.environ.pop("UGEM_SOCKET", None)
            else:
                os.environ["UGEM_SOCKET"] = saved


def _time_rows(report: H.Report, results: dict[str, H.Results], keys: list[str], torch: bool) -> None:
    for label in keys:
        res = results[label]
        fig = {"many": f"{MANY} x {SMALL // 1024} KiB in one call",
               VIEWS: f"{MANY} x {SMALL // 1024} KiB rows of one array in one call"}.get(label, f"{label} round trip")
        report.rows.append(seconds_row(fig, "by value (baseline)", res["by value"]))
        report.rows.append(seconds_row(fig, "shared_memory (baseline)", res["shared_memory"]))
        if torch and label != VIEWS:  # (torch: not measured there)
            report.rows.append(seconds_row(fig, f"{TORCH} (baseline)", res[TORCH]))
        if label == "64 MiB":
            report.rows.append(seconds_row(fig, "ugem", res["ugem"], res["by value"],
                                           H.Target("<=", SPEED_VS_VALUE, text="ratio <= 0.1 (>= 10x faster)")))
        report.rows.append(seconds_row(fig, "ugem", res["ugem"], res["shared_memory"],
                                       None if label == VIEWS else H.Target("<=", WITHIN_SHM, text="ratio <= 1.2")))
        if label != "64 MiB":
            report.rows.append(seconds_row(fig, "ugem", res["ugem"], res["by value"]))
        if torch and label != VIEWS and not res[TORCH].error:
            report.rows.append(seconds_row(fig, "ugem", res["ugem"], res[TORCH]))


def _fd_rows(report: H.Report, measured: Measured, torch_why: str) -> None:
    fds = measured.fds
    fd_fig = f"worker fds added holding {MANY} received arrays"
    fd_row = H.Row(BENCH, fd_fig, "ugem", "fds", float(fds["ugem"]), float(fds["ugem"]), 1)
    fd_row._apply(H.Target("<=", FD_SLACK, on="median", text=f"<= {FD_SLACK} fds"))
    report.rows.append(fd_row)
    report.rows.append(H.Row(BENCH, fd_fig, "shared_memory", "fds", float(fds["shared_memory"]),
                             float(fds["shared_memory"]), 1))
    if torch_why:
        report.rows.append(H.Row(BENCH, f"{TORCH} (all sizes)", "skipped", "s", float("nan"),
                                 float("nan"), 0, ratio_note=torch_why))
        report.notes.append(f"{TORCH} skipped: {torch_why}")
    elif fds[TORCH] < 0:
        report.rows.append(H.Row(BENCH, fd_fig, TORCH, "fds", float("nan"), float("nan"), 0,
                                 error=measured.torch_fd_error))
    else:
        report.rows.append(H.Row(BENCH, fd_fig, TORCH, "fds", float(fds[TORCH]), float(fds[TORCH]), 1))


def _notes(report: H.Report, measured: Measured, start: str, torch_mp: ModuleType | None) -> None:
    if torch_mp is not None:
        import torch
        report.notes.append(
            f"{TORCH}: torch {torch.__version__}, sharing strategy {torch_mp.get_sharing_strategy()!r}, pool from "
            f"torch.multiprocessing.get_context({start!r}); each tensor's fd is handed over through "
            "multiprocessing.resource_sharer (a connection per tensor, each way); worker RLIMIT_NOFILE soft limit "
            f"{measured.torch_fd_limit}; its fd count comes from a first round trip of the {MANY} tensors whose task "
            "unpickles and pickles them itself (so that running out of fds is reported, not a lost task)")
    report.notes.append("one sample = pool.apply of one round trip: send, the worker writes one element (new value "
                        "each time), returns the array (shared_memory: attaches by name, writes, closes, returns the "
                        "name), the parent checks the element (ugem, torch: in its own array too); data made and "
                        "filled once per method (untimed); one persistent one-worker pool per method, warmed up; "
                        "rounds of all methods interleaved; by value takes fewer samples at 64 MiB and 1 GiB")
    report.notes.append("ratio = ugem median / baseline median in the same run (lower is better for ugem); the ugem "
                        "rows compare against shared_memory (target <= 1.2), by value (target <= 0.1 at 64 MiB) "
                        "and torch.multiprocessing (no target)")
    report.notes.append(f"{MANY} x {SMALL // 1024} KiB rows of one array (a diagnostic, no target): ugem sends "
                        "the rows of one ugem.empty, which travel as one reference (one share, one claim); "
                        "shared_memory sends one name, and its worker attaches once and makes a view of each row "
                        "(nothing pickled either way but the name: what is left of ugem's time is pickling 2,000 "
                        "arrays each way)")
    report.notes.append(f"fds: worker's /proc/self/fd count while it holds the {MANY} received arrays (shared_memory: "
                        "all segments attached at once) minus its count just before that call")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    H.add_common(parser)
    parser.add_argument("--start-method", choices=["fork", "spawn", "forkserver"], default="fork",
                        help="multiprocessing start method of the pools (default fork)")
    ns = parser.parse_args(argv)
    opts = H.options(ns, **DEFAULTS)
    return H.emit([H.monitored(run, opts)], opts)


if __name__ == "__main__":
    sys.exit(main())
