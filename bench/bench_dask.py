"""Dask on ugem: ugem-backed workers (UgemBuffer) vs Dask's default SpillBuffer, side by side.

    python bench/bench_dask.py [--quick] [--runs N] [--json [PATH]] [--size MiB]

Two workloads, each on a fresh `LocalCluster` of 2 worker processes (1 thread each) per
method, methods alternating run by run (same machine, same data, same run):

- transfer-heavy: a (n, n) float64 array made in row blocks spread over both workers
  (persisted, untimed), then rechunked to column blocks (task-based rechunk, so results move
  between workers through Dask's get_data) and persisted: the timed part. The budget is 8x
  the array here (ugem: the daemon's; default: SpillBuffer targets), so nothing spills, but
  at most 3/4 of the machine's MemAvailable when the bench starts (printed and in the
  report's parameters; a smaller one may spill)
  (at 4x, a SpillBuffer target of 2x the array per worker, the default spilled now and
  then: one worker holds its half of the input, a merged block of half the array and
  pieces);
- spill-heavy: a working set of twice the memory budget: `map_blocks` over 32 blocks,
  persisted, then summed. ugem: one daemon with `--system-budget B` for both workers;
  default: each worker's SpillBuffer with target B/2 (the same total), spilling to disk.

Dask's process-memory thresholds (spill, pause, terminate) are off for both methods, so
only the budgets above decide what is spilled. Figures per run: wall time; bytes the
workers sent each other over TCP (what `comm.write` reported to get_data); peak memory of
the node (the processes' resident memory other than shared memory, workers and daemon,
plus the daemon's resident object bytes for ugem, so pages a worker maps are counted once;
sampled every 50 ms); for ugem, the time after the wall until the worker's writer thread
had copied the last results into their objects (Dask reports a task done once its result
is in the worker's data mapping, which for ugem may still be copying it); bytes spilled
(default: SpillBuffer's disk writes; ugem: the daemon's bytes_moved_total, which counts
spilling and restoring); CPU time of the workers and the daemon (user + system, from
/proc: less disturbed than the wall by other load on the machine); event-loop blocked
time (a ticker on each worker's event loop every 10 ms; the sum of its lateness beyond
50 ms) and Dask's "Event loop was unresponsive" warnings (Dask's default limit, 3 s); all
of them over the timed part only.

Diagnostics for the transfer-heavy workload (no target), run after each pair of cluster runs:
the same rechunk of the same array on Dask's threaded scheduler in the bench's own process
(2 threads, results in its heap, no worker processes, no daemon, nothing sent), as is (the
floor of any store) and with each result that owns its memory copied into a fresh memfd on
the thread that made it, closed when Dask drops the result (the floor of a store that keeps
results in shared memory, as UgemBuffer does: each result placed there once), each with its
ratio to the default.

Targets (issue 13): transfer-heavy >= 2x faster (ratio <= 0.5) with >= 90 % fewer bytes over
TCP; spill-heavy no slower (ratio <= 1.0) with no unresponsive-event-loop warnings.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import tempfile
import threading
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness as H  # noqa: E402

BENCH = "dask"
DEFAULTS = dict(runs=3, n=1, warmup=0, quick_runs=1, quick_n=1, quick_warmup=0)
METHODS = ("ugem", "default")
FLOOR = "threads, one process"  # the transfer-heavy floors (floor_run)
FLOOR_SHARED = "threads, results into shared memory"
TRANSFER_SPEEDUP, TCP_CUT, SPILL_SLOWDOWN = 0.5, 0.1, 1.0
_CONFIG = {"distributed.worker.memory.spill": False, "distributed.worker.memory.pause": False,
           "distributed.worker.memory.terminate": False, "distributed.worker.memory.target": False,
           "array.rechunk.method": "tasks"}


# -- on the workers (run through client.run) --------------------------------------------------


async def _start_probes(dask_worker: Any) -> None:
    """A ticker measuring event-loop lateness, and a counter of 'unresponsive' warnings."""

    class Count(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "unresponsive" in record.getMessage():
                dask_worker._bench_warnings += 1

    dask_worker._bench_blocked, dask_worker._bench_warnings = 0.0, 0
    logging.getLogger("distributed.core").addHandler(Count())

    async def tick() -> None:
        while True:
            t0 = time.monotonic()
            await asyncio.sleep(0.01)
            late = time.monotonic() - t0 - 0.01
            if late > 0.05:
                dask_worker._bench_blocked += late

    dask_worker._bench_ticker = asyncio.ensure_future(tick())


async def _flush(dask_worker: Any) -> None:
    """UgemBuffer's flush() (SpillBuffer has none), on a thread: not on the event loop, which
    the probes watch (a sync function given to client.run runs on it)."""
    flush = getattr(dask_worker.data, "flush", None)
    if flush is not None:
        await asyncio.get_running_loop().run_in_executor(None, flush)


def _reset_probes(dask_worker: Any) -> None:
    dask_worker._bench_blocked, dask_worker._bench_warnings = 0.0, 0
    dask_worker.transfer_outgoing_log.clear()


def _probe(dask_worker: Any) -> dict[str, float]:
    sent = sum(e.get("compressed") or 0 for e in dask_worker.transfer_outgoing_log)
    metrics = getattr(dask_worker.data, "cumulative_metrics", {})
    return {"tcp": float(sent), "blocked": dask_worker._bench_blocked, "warnings": dask_worker._bench_warnings,
            "disk": float(metrics.get(("disk-write", "bytes"), 0.0))}


# -- one run ------------------------------------------------------------------------------------


class Peak:
    """Sample the node's memory for the data every 50 ms in a thread."""

    def __init__(self, pids: list[int], dev: Any) -> None:
        self.pids, self.dev, self.peak = pids, dev, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            total = sum(_private(p) for p in self.pids)
            if self.dev is not None:
                total += int(self.dev.stats()["resident_bytes"])
            self.peak = max(self.peak, total)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def _private(pid: int) -> int:
    """Resident memory of `pid` other than shared memory (ugem's objects are counted once,
    from the daemon's resident_bytes, not again in every worker that maps them)."""
    fields = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name in ("VmRSS", "RssShmem"):
                    fields[name] = int(value.split()[0]) * 1024
    except OSError:
        return 0
    return fields.get("VmRSS", 0) - fields.get("RssShmem", 0)


def _cpu(pids: list[int]) -> float:
    """CPU seconds (user + system) the processes `pids` used so far."""
    ticks = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def one_run(method: str, workload: str, size: int, budget: int, spill_dir: str) -> dict[str, float]:
    import dask
    import dask.array as da
    import numpy as np
    from distributed import Client, LocalCluster, wait
    from distributed.spill import SpillBuffer

    from ugem.dask import UgemBuffer
    from ugem.testing import run_daemon

    daemon_ctx = run_daemon(system_budget=budget) if method == "ugem" else None
    daemon = daemon_ctx.__enter__() if daemon_ctx is not None else None
    try:
        if daemon is not None:
            data: Any = (UgemBuffer, {"socket": daemon.path})
        else:
            data = (SpillBuffer, {"spill_directory": spill_dir, "target": budget // 2})
        dev = daemon.connect() if daemon is not None else None
        with dask.config.set(_CONFIG), LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                                     dashboard_address=":0", data=data, memory_limit="64G",
                                                     silence_logs=logging.ERROR) as cluster, Client(cluster) as c:
            c.run(_start_probes)
            pids = list(c.run(os.getpid).values()) + ([daemon.pid] if daemon is not None else [])
            if workload == "transfer":
                n = int((size // 8) ** 0.5)
                x = da.random.default_rng(0).random((n, n), chunks=(n // 8, n)).persist()
                wait(x)
                c.run(_flush)  # the untimed setup is over once every block is in its object
                c.run(_reset_probes)
                peak = Peak(pids, dev)
                cpu0, t0 = _cpu(pids), time.perf_counter()
                y = x.rechunk((n, n // 8)).persist()
                wait(y)
                wall, cpu = time.perf_counter() - t0, _cpu(pids) - cpu0
                check = float(y[:, -1].sum().compute()) - float(x[:, -1].sum().compute())
            else:
                blocks = 32
                per = size // blocks // 8
                x = da.arange(per * blocks, chunks=per, dtype=np.float64)
                c.run(_reset_probes)
                peak = Peak(pids, dev)
                cpu0, t0 = _cpu(pids), time.perf_counter()
                y = x.map_blocks(lambda b: b * 2.0).persist()
                wait(y)
                total = float(y.sum().compute())
                wall, cpu = time.perf_counter() - t0, _cpu(pids) - cpu0
                count = per * blocks
                check = total - (count - 1) * count
            t1 = time.perf_counter()
            c.run(_flush)  # ugem: the last results copied into their objects; default: nothing to wait for
            settle = time.perf_counter() - t1 if method == "ugem" else 0.0
            node_peak = peak.stop()
            probes = list(c.run(_probe).values())
            stats = dev.stats() if dev is not None else {}
            moved = float(stats.get("bytes_moved_total", 0.0))
            recycled = float(stats.get("recycled_total", 0.0))  # freed objects' memfds handed out again
            del x, y
        if dev is not None:
            dev.close()
    finally:
        if daemon_ctx is not None:
            daemon_ctx.__exit__(None, None, None)
    if abs(check) > 1e-6 * max(1.0, abs(check)):
        raise AssertionError(f"{method} {workload}: wrong result (off by {check})")
    return {"wall": wall, "cpu": cpu, "settle": settle, "tcp": sum(p["tcp"] for p in probes), "peak": float(node_peak),
            "spilled": moved if method == "ugem" else sum(p["disk"] for p in probes),
            "blocked": sum(p["blocked"] for p in probes), "warnings": sum(p["warnings"] for p in probes),
            "recycled": recycled}


def floor_run(size: int, shared: bool) -> dict[str, float]:
    """The transfer-heavy rechunk with nothing to transfer: the same array and rechunk on
    Dask's threaded scheduler in this process (2 threads, results in this heap, no worker
    processes, no network). With `shared`, each result that owns its memory is also copied,
    on the thread that computed it, into a fresh memfd (closed when Dask drops the result):
    what any store that keeps results in shared memory must do at least once per result,
    with no process, daemon or protocol around it."""
    import weakref

    import dask
    import dask.array as da
    import numpy as np

    placed = [0.0]

    def place(item: Any) -> Any:  # the local scheduler's `dumps`, called on each result where it was computed
        if shared and isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], np.ndarray) \
                and item[0].flags.owndata and item[0].nbytes:
            data = memoryview(np.ascontiguousarray(item[0])).cast("B")
            fd = os.memfd_create("bench-dask-floor", os.MFD_CLOEXEC)
            weakref.finalize(item[0], os.close, fd)
            os.ftruncate(fd, len(data))
            done = 0
            while done < len(data):
                done += os.pwrite(fd, data[done:done + H.MiB * 8], done)
            placed[0] += len(data)
        return item

    n = int((size // 8) ** 0.5)
    with dask.config.set(_CONFIG, scheduler="threads", num_workers=2):
        x = da.random.default_rng(0).random((n, n), chunks=(n // 8, n)).persist()
        cpu0, t0 = time.process_time(), time.perf_counter()
        y = x.rechunk((n, n // 8)).persist(dumps=place)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        check = float(y[:, -1].sum().compute()) - float(x[:, -1].sum().compute())
    del x, y
    if abs(check) > 1e-6 * max(1.0, abs(check)):
        raise AssertionError(f"threaded floor: wrong result (off by {check})")
    return {"wall": wall, "cpu": cpu, "placed": placed[0]}


# -- the report -----------------------------------------------------------------------------------


def _mem_available() -> int:
    """MemAvailable of /proc/meminfo, in bytes."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def _median(values: list[float]) -> float:
    return H.percentile(values, 50)


def run(opts: H.Options) -> H.Report:
    size_mib = getattr(opts.extra, "size", None) or (256 if opts.quick else 1024)
    size = size_mib * H.MiB
    budget = size // 2  # the spill-heavy working set is twice this
    roomy = min(8 * size, _mem_available() * 3 // 4)  # transfer-heavy: no spilling, within the machine
    print(f"bench_dask: transfer-heavy budget {roomy // H.MiB} MiB (8x the array: {8 * size_mib} MiB, at most 3/4 of "
          f"MemAvailable); spill-heavy budget {budget // H.MiB} MiB", file=sys.stderr)
    report = H.Report(BENCH, "Dask workers: UgemBuffer vs the default SpillBuffer (2 worker processes)",
                      {"runs": opts.runs, "array_MiB": size_mib, "budget_MiB": budget // H.MiB,
                       "transfer_budget_MiB": roomy // H.MiB})
    got: dict[tuple[str, str], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-dask-") as spill_dir:
        for workload in ("transfer", "spill"):
            for r in range(opts.runs):
                for method in (METHODS if r % 2 == 0 else METHODS[::-1]):
                    room = budget if workload == "spill" else roomy
                    got.setdefault((workload, method), []).append(one_run(method, workload, size, room, spill_dir))
                if workload == "transfer":
                    for floor, shared in ((FLOOR, False), (FLOOR_SHARED, True)):
                        got.setdefault((workload, floor), []).append(floor_run(size, shared))
    for workload, title in (("transfer", f"rechunk {size_mib} MiB rows->columns"),
                            ("spill", f"map_blocks {size_mib} MiB, budget {budget // H.MiB} MiB")):
        figures = {m: {k: _median([run_[k] for run_ in got[(workload, m)]]) for k in got[(workload, m)][0]}
                   for m in METHODS}
        u, d = figures["ugem"], figures["default"]
        walls = {m: H.Series(m, [int(run_["wall"] * 1e9) for run_ in got[(workload, m)]]) for m in METHODS}
        base = _seconds(H.Row.latency(BENCH, f"{title}: wall", "default (baseline)", walls["default"]))
        report.rows.append(base)
        target = H.Target("<=", TRANSFER_SPEEDUP if workload == "transfer" else SPILL_SLOWDOWN,
                          text="ratio <= 0.5 (>= 2x faster)" if workload == "transfer" else "ratio <= 1.0")
        report.rows.append(_seconds(H.Row.latency(BENCH, f"{title}: wall", "ugem", walls["ugem"],
                                                  baseline=walls["default"], target=target)))
        if workload == "transfer":  # diagnostics: what a store could reach at best (no target)
            for floor in (FLOOR, FLOOR_SHARED):
                runs = got[(workload, floor)]
                walls[floor] = H.Series(floor, [int(run_["wall"] * 1e9) for run_ in runs])
                report.rows.append(_seconds(H.Row.latency(BENCH, f"{title}: wall, no transfers", floor, walls[floor],
                                                          baseline=walls["default"])))
                cpus = [run_["cpu"] for run_ in runs]
                report.rows.append(H.Row(BENCH, f"{title}: CPU time, no transfers", floor, "s", _median(cpus),
                                         _median(cpus), len(cpus)))
            placed = _median([run_["placed"] for run_ in got[(workload, FLOOR_SHARED)]]) / H.MiB
            report.rows.append(H.Row(BENCH, f"{title}: results placed in shared memory, no transfers", FLOOR_SHARED,
                                     "MiB", placed, placed, len(got[(workload, FLOOR_SHARED)])))
        for key, unit, label in (("cpu", "s", "CPU time of workers and daemon"),
                                 ("settle", "s", "results still being copied after the wall"),
                                 ("tcp", "MiB", "bytes over TCP between workers"), ("peak", "MiB", "node peak memory"),
                                 ("spilled", "MiB", "bytes spilled"), ("blocked", "s", "event loop blocked"),
                                 ("warnings", "count", "unresponsive-loop warnings"),
                                 ("recycled", "count", "freed objects' memfds reused (daemon)")):
            scale = H.MiB if unit == "MiB" else 1
            for m in METHODS if key != "recycled" else ("ugem",):
                row = H.Row(BENCH, f"{title}: {label}", m, unit, figures[m][key] / scale, figures[m][key] / scale,
                            len(got[(workload, m)]))
                if m == "ugem" and key == "tcp" and workload == "transfer" and d["tcp"] > 0:
                    row.baseline, row.ratio = "default", u["tcp"] / d["tcp"]
                    row._apply(H.Target("<=", TCP_CUT, text="ratio <= 0.1 (>= 90 % fewer)"))
                if m == "ugem" and key == "warnings" and workload == "spill":
                    row._apply(H.Target("<=", 0, on="median", text="no warnings"))
                report.rows.append(row)
    report.notes.append("ratio = ugem / default in the same run (lower is better for ugem); one cluster per run and "
                        "method, methods alternating; medians over runs")
    report.notes.append("bytes over TCP: the sum of what comm.write reported for get_data replies (worker to "
                        "worker); node peak memory: the processes' resident memory but shared memory (workers, "
                        "daemon) + the daemon's resident object bytes (ugem), sampled every 50 ms; transfer-heavy "
                        f"runs get a budget of 8x the array (nothing spills), at most 3/4 of MemAvailable: "
                        f"{roomy // H.MiB} MiB")
    report.notes.append("bytes spilled: default = SpillBuffer disk writes; ugem = daemon bytes_moved_total (spill and "
                        "restore both counted)")
    report.notes.append(f"'{FLOOR}' and '{FLOOR_SHARED}' (diagnostics, no target): the same rechunk of the same "
                        "array on Dask's threaded scheduler in the bench's own process (2 threads, results in its "
                        "heap; the second also copies each result that owns its memory into a fresh memfd on the "
                        "thread that made it, closed when Dask drops the result): no worker processes, no daemon, "
                        "nothing sent; run after each pair of cluster runs. The first is the floor of any store; "
                        "the second that of a store keeping results in shared memory, as UgemBuffer does")
    return report


def _seconds(row: H.Row) -> H.Row:
    """A latency row (us) in seconds."""
    row.unit, row.median, row.p99 = "s", row.median / 1e6, row.p99 / 1e6
    row.run_medians = [m / 1e6 for m in row.run_medians]
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    H.add_common(parser)
    parser.add_argument("--size", type=int, help="array size in MiB (default 1024; 256 with --quick)")
    ns = parser.parse_args(argv)
    opts = H.options(ns, **DEFAULTS)
    return H.emit([H.monitored(run, opts)], opts)


if __name__ == "__main__":
    sys.exit(main())
