"""Arrays to a `multiprocessing.Pool` worker and back: ugem by reference vs by value vs shared_memory.

    python bench/bench_pool.py [--quick] [--runs N] [--n N] [--warmup N] [--json [PATH]]
                               [--start-method fork|spawn|forkserver]

One sample = one round trip through `pool.apply`: the parent sends an array (filled once, the
same bytes for every method), the worker writes one element (a value new each time) and
returns the array, the parent checks that element. Sizes: 1 MiB, 64 MiB, 1 GiB (not with
--quick; skipped with a note when MemAvailable is short), and 2,000 arrays of 4 KiB in one
call (a list; the worker writes one element of each). Methods, each with its own persistent
one-worker pool (started once, warmed up first; the rounds of all methods interleave):

- ugem: arrays from `ugem.empty(...)` on a client of a daemon started for the bench
  (`$UGEM_SOCKET` names it, so that `default_device()` in the workers is a client of it);
  multiprocessing's pickler sends them by reference (an fd, the worker maps it through its
  daemon client; the array it returns comes back the same way);
- by value: plain numpy arrays, pickled as multiprocessing pickles them (protocol 5 buffers
  in the pickle stream): the bytes are copied both ways;
- shared_memory by name: the array lives in a `multiprocessing.shared_memory.SharedMemory`
  created once; the parent sends its name, shape and dtype, the worker attaches, writes,
  closes and returns the name; the parent checks its own view, and unlinks at the end;
- torch.multiprocessing: only if torch imports (else listed as skipped).

Targets (issue 12): ugem >= 10x faster than by value at 64 MiB (ratio <= 0.1); ugem within
1.2x of shared_memory at every size (ratio <= 1.2); after receiving the 2,000 arrays (all held
at once) the worker holds at most 16 more fds than before (shared_memory's count reported too).
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import multiprocessing.pool
import os
import sys
from collections.abc import Callable
from multiprocessing import resource_tracker, shared_memory
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
FD_SLACK = 16  # SPEC: a receiver holds at most this many more fds
SPEED_VS_VALUE = 0.1  # ugem / by value at 64 MiB
WITHIN_SHM = 1.2  # ugem / shared_memory, every size
METHODS = ("ugem", "by value", "shared_memory")


# -- worker side (module-level: spawn and forkserver workers import them by name) ------------


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def warm() -> int:
    """Make the worker's default device (a ugem daemon client) before anything is measured."""
    ugem.default_device()
    return os.getpid()


def touch(a: np.ndarray, value: int) -> np.ndarray:
    a[0] = value
    return a


def touch_many(arrays: list[np.ndarray], value: int, count: bool) -> tuple[list[np.ndarray], int]:
    for a in arrays:
        a[0] = value
    return arrays, (fd_count() if count else -1)


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


# -- parent side -------------------------------------------------------------------------------


class Data:
    """The arrays of every method, filled once with the same bytes; shared_memory unlinked at close."""

    def __init__(self, sizes: dict[str, int]) -> None:
        self.segs: list[shared_memory.SharedMemory] = []
        self.arrays: dict[tuple[str, str], Any] = {}
        self.shm_names: dict[str, list[str]] = {}  # by size label: the segments' names
        for label, size in sizes.items():
            pattern = np.arange(size, dtype=np.uint64).astype(np.uint8) if size <= 64 * H.MiB else None
            for method in METHODS:
                a = self._new(method, size)
                if pattern is None:
                    a[:] = 7  # 1 GiB: touch every page without a 1 GiB pattern array
                else:
                    np.copyto(a, pattern)
                self.arrays[(method, label)] = a
            self.shm_names[label] = [self.segs[-1].name]
        for method in METHODS:
            many = [self._new(method, SMALL) for _ in range(MANY)]
            for i, a in enumerate(many):
                a[:] = i % 256
            self.arrays[(method, "many")] = many
        self.shm_names["many"] = [seg.name for seg in self.segs[-MANY:]]

    def _new(self, method: str, size: int) -> np.ndarray:
        if method == "ugem":
            return ugem.empty(size, np.uint8)
        if method == "by value":
            return np.empty(size, np.uint8)
        seg = shared_memory.SharedMemory(create=True, size=size)
        self.segs.append(seg)
        a: np.ndarray = np.ndarray((size,), np.uint8, buffer=seg.buf)
        return a

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
    many = key[1] == "many"
    if method == "shared_memory":
        names = data.shm_names[key[1]]
        views = a if many else [a]

        def shm() -> None:
            v = counter.next()
            if many:
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
        if method == "ugem" and any(int(x[0]) != v for x in (a if many else [a])):
            raise AssertionError("ugem: the worker's write is not seen in the sender's array")
    return trip


def timed(label: str, op: Callable[[], None]) -> H.Runner:
    def run(n: int) -> dict[str, list[int]]:
        return {label: H.time_each(op, n)}
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


def sizes_for(opts: H.Options, notes: list[str]) -> dict[str, int]:
    sizes = dict(SIZES)
    if opts.quick:
        del sizes["1 GiB"]
        notes.append("1 GiB skipped: --quick")
        return sizes
    with open("/proc/meminfo") as f:
        avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    need = 8 * SIZES["1 GiB"]  # three copies of the data, plus by value's pickles and copies on both sides
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


def run(opts: H.Options) -> H.Report:
    method = getattr(opts.extra, "start_method", None) or "fork"
    report = H.Report(BENCH, "an array to a Pool worker and back: ugem by reference vs by value vs shared_memory",
                      {"runs": opts.runs, "n": opts.n, "warmup": opts.warmup, "start_method": method})
    sizes = sizes_for(opts, report.notes)
    keys = [*sizes, "many"]
    results, fds = _measure(opts, method, sizes, keys)
    _report_rows(report, results, fds, keys)
    return report


def _measure(opts: H.Options, method: str, sizes: dict[str, int],
             keys: list[str]) -> tuple[dict[str, H.Results], dict[str, int]]:
    """The interleaved rounds per size (`keys`), then the fds a worker adds holding MANY arrays."""
    ctx = multiprocessing.get_context(method)
    saved = os.environ.get("UGEM_SOCKET")
    with run_daemon() as daemon:
        os.environ["UGEM_SOCKET"] = daemon.path
        reset()  # this process's default device: a client of this daemon
        pools: dict[str, multiprocessing.pool.Pool] = {}
        data: Data | None = None
        try:
            resource_tracker.ensure_running()  # forked workers share it (else each starts its own, whose
            # cleanup at the worker's exit unlinks the segments the worker attached: warnings, lost segments)
            for m in METHODS:  # before the data: forked workers inherit none of it
                pools[m] = ctx.Pool(1)
                pools[m].apply(warm)
            data = Data(sizes)
            counter = Counter()
            results: dict[str, H.Results] = {}
            for label in keys:
                size = sizes.get(label, 0)
                n = opts.n if size <= H.MiB else (max(1, opts.n // 4) if size <= 64 * H.MiB else 1)
                if label == "many":
                    n = max(1, opts.n // 6)
                runners: dict[str, H.Runner] = {}
                for m in METHODS:
                    runners[m] = timed(m, one_trip(pools[m], m, data, (m, label), counter))
                warmup = opts.warmup if size <= 64 * H.MiB else min(1, opts.warmup)
                results[label] = H.interleaved(runners, runs=opts.runs, n=n, warmup=warmup)
            fds = {m: fds_added(pools[m], m, data) for m in ("ugem", "shared_memory")}
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
    return results, fds


def _report_rows(report: H.Report, results: dict[str, H.Results], fds: dict[str, int], keys: list[str]) -> None:
    for label in keys:
        res = results[label]
        fig = f"{label} round trip" if label != "many" else f"{MANY} x {SMALL // 1024} KiB in one call"
        report.rows.append(seconds_row(fig, "by value (baseline)", res["by value"]))
        report.rows.append(seconds_row(fig, "shared_memory (baseline)", res["shared_memory"]))
        if label == "64 MiB":
            report.rows.append(seconds_row(fig, "ugem", res["ugem"], res["by value"],
                                           H.Target("<=", SPEED_VS_VALUE, text="ratio <= 0.1 (>= 10x faster)")))
        report.rows.append(seconds_row(fig, "ugem", res["ugem"], res["shared_memory"],
                                       H.Target("<=", WITHIN_SHM, text="ratio <= 1.2")))
        if label != "64 MiB":
            report.rows.append(seconds_row(fig, "ugem", res["ugem"], res["by value"]))
    fd_fig = f"worker fds added holding {MANY} received arrays"
    fd_row = H.Row(BENCH, fd_fig, "ugem", "fds", float(fds["ugem"]), float(fds["ugem"]), 1)
    fd_row._apply(H.Target("<=", FD_SLACK, on="median", text=f"<= {FD_SLACK} fds"))
    report.rows.append(fd_row)
    report.rows.append(H.Row(BENCH, fd_fig, "shared_memory", "fds", float(fds["shared_memory"]),
                             float(fds["shared_memory"]), 1))
    try:
        import torch  # noqa: F401
        torch_why = "torch imports, but this bench does not measure torch.multiprocessing yet"
    except ImportError as exc:
        torch_why = f"torch is not installed ({exc})"
    report.rows.append(H.Row(BENCH, "torch.multiprocessing (all sizes)", "skipped", "s", float("nan"),
                             float("nan"), 0, ratio_note=torch_why))
    report.notes.append(f"torch.multiprocessing skipped: {torch_why}")
    report.notes.append("one sample = pool.apply of one round trip: send, the worker writes one element (new value "
                        "each time), returns the array (shared_memory: attaches by name, writes, closes, returns the "
                        "name), the parent checks the element; data made and filled once per method (untimed); one "
                        "persistent one-worker pool per method, warmed up; rounds of the three methods interleaved")
    report.notes.append("ratio = ugem median / baseline median in the same run (lower is better for ugem); the ugem "
                        "rows compare against shared_memory (target <= 1.2) and by value (target <= 0.1 at 64 MiB)")
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
