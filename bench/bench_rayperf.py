"""The object-store rows of Ray's `ray microbenchmark` (ray_perf.py), ugem and Ray in one run.

    python bench/bench_rayperf.py [--quick] [--runs N] [--n N] [--warmup N] [--json [PATH]]
                                  [--size MiB] [--ray-python PYTHON | --no-ray]

The rows keep the names, shapes and sizes of Ray's `python/ray/_private/ray_perf.py`:

- single client get calls (Plasma Store): get a small object that is already stored;
- single client put calls (Plasma Store): put a small object (every reference dropped at once);
- multi client put calls (Plasma Store): 10 tasks of 100 small puts each, on as many worker
  processes as the machine has CPUs (Ray's default `num_cpus`); one sample = 1,000 puts;
- single client put gigabytes: put an 800 MiB int64 array (`--size`), reference dropped at once;
- multi client put gigabytes: 10 tasks of 10 puts of a new 80 MiB `np.zeros` array each
  (size / 10); one sample = 8 GiB;
- and the issue's own: put of the 800 MiB array vs `np.copyto` of it into a preallocated,
  already touched array (one copy at memory speed), target >= 0.8.

ugem, as a user writes it:
- put = `out = ugem.array(value, device=dev)`, as `ray.put(value)`: a copy of the value in
  ugem memory (object and mapping in one request, no handle; one copy). The array is the
  object: dropping it (at once, as ray_perf drops each ObjectRef) lets its mapping linger
  until the client's next request, so the next put of the same size (1 MiB or more) reuses
  that object in place, its mapping ready, once the manager says nothing else holds it (one
  request), and otherwise releases it: a put's time includes that drop. Informational rows
  (no target): the same value put in two steps, `out = ugem.empty(value.shape, value.dtype);
  np.copyto(out, value)` (a new object every time, whose pages the copy faults in: the put
  of sessions before 2026-12-03), and through the handle layer's object, `buf = dev.new(8);
  buf.write(value)` (two requests, no mapping; the dropped Buffer's handle is closed with
  the next request);
- get = `ref.array(np.int64, 1, writable=False)` of a Buffer holding the value (made once
  with `dev.new` + `write`): a numpy view of its mapping, zero-copy, the view dropped at once.
  The first get maps it (one request); a dropped view's mapping lingers until the Device's
  next request, so each later get of the loop takes it back with no request (as ray.get of
  an object already in the store is served from the client's mapping of the store);
- the small value is an int64 array of one item (Ray's is the Python int 0, as in ray_perf);
  the 800 MiB array holds `np.arange` data (ray_perf's is `np.zeros`, never written, whose
  pages are all the one zero page: a copy from it reads no memory), the same array on both
  sides; the multi-client puts copy from new `np.zeros` arrays, as ray_perf's do.
Embedded (an in-process manager) and daemon (a client of `ugem serve`, started for the bench)
for the single-client rows; the multi-client rows need processes sharing one store, so they
run against the daemon only, each worker process its own client (`multiprocessing.Pool`, fork,
10 tasks with chunksize 1 as Ray runs 10 tasks).

Ray: one session in its own process (bench/_ray.py), `ray.init(include_dashboard=False,
log_to_driver=False)` with Ray's default object store and `num_cpus`, started before every
round and kept to the end; the bench waits (30 s, 10 with --quick) for its start-up work to
settle. Its rows are warm (after the warm-up calls, as ray_perf's timeit warms up); the time
of Ray's very first call of each kind is given in a note. Rounds interleave ugem's runners
and Ray's (`H.interleaved`). Without a Python that can import ray, the Ray rows are listed as
skipped with the reason and the ugem rows carry no target.

Rates: calls/s (a sample of 100 calls, or one multi-client call of 1,000 puts) and GB/s
(10**9 bytes/s). ratio = ugem rate / Ray rate: higher is better for ugem; the target is
ugem ahead (ratio >= 1) on every row. The copyto rows: ratio = put GB/s / np.copyto GB/s.
A diagnostic row shows `np.copyto` into a new memfd's mapping (memfd_create + ftruncate +
mmap + copy; the unmap and close untimed, as for ugem's put alone): what copying into pages
that do not exist yet costs on this machine.
"""

from __future__ import annotations

import argparse
import contextlib
import mmap
import multiprocessing
import multiprocessing.pool
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import _harness as H  # noqa: E402
import ugem  # noqa: E402
from _ray import RAY_ENABLE, SERVE, RayPeer, add_ray_options, ray_python, ray_version  # noqa: E402
from ugem import parts  # noqa: E402
from ugem.testing.daemon import run_daemon  # noqa: E402

BENCH = "rayperf"
DEFAULTS = dict(runs=3, n=20, warmup=3, quick_runs=2, quick_n=6, quick_warmup=1)
BATCH = 100  # small calls per sample
TASKS, PER_TASK = 10, 100  # multi client put calls: 10 tasks x 100 small puts
MULTI_PUTS = 10  # multi client put gigabytes: 10 tasks x 10 puts of size / 10
SMALL = np.array([7], np.int64)
AHEAD = H.Target(">=", 1.0, text="ratio >= 1 (ugem ahead of Ray)")
COPYTO = H.Target(">=", 0.8, text="ratio >= 0.8 of np.copyto")
MODES = ("embedded", "daemon")


# -- what a user writes ------------------------------------------------------------------------


def put(dev: ugem.Device, value: np.ndarray) -> np.ndarray:
    """Put: an array in ugem memory holding a copy of `value` (ugem.array, as ray.put)."""
    return ugem.array(value, device=dev)


def put_empty(dev: ugem.Device, value: np.ndarray) -> np.ndarray:
    """The same in two steps: a new object (ugem.empty), then np.copyto into it."""
    out = ugem.empty(value.shape, value.dtype, device=dev)
    np.copyto(out, value)
    return out


def put_buffer(dev: ugem.Device, value: np.ndarray) -> ugem.Buffer:
    """Put through the handle layer's object: create + pwrite, no mapping."""
    buf = dev.new(value.nbytes)
    buf.write(value)
    return buf


# -- the multi-client workers: each a client of the daemon --------------------------------------

_worker: dict[str, ugem.Device] = {}


def _device(path: str) -> ugem.Device:
    """This worker's client of the daemon at `path`, connected on first use."""
    if path not in _worker:
        _worker[path] = ugem.connect(path)
    return _worker[path]


def connect_task(path: str) -> int:
    _device(path)
    return os.getpid()


def put_small_task(path: str) -> int:
    dev = _device(path)
    for _ in range(PER_TASK):
        put(dev, SMALL)
    return PER_TASK


def put_large_task(path: str, items: int) -> int:
    dev = _device(path)
    for _ in range(MULTI_PUTS):
        put(dev, np.zeros(items, np.int64))
    return MULTI_PUTS


# -- Ray, in its own process ------------------------------------------------------------------

_RAY_SCRIPT = r"""
import json, sys, time
import numpy as np
import ray
tmp = sys.argv[1]
batch, tasks, per_task, large_items, multi_puts, multi_items = (int(x) for x in sys.argv[2:8])
clock = time.perf_counter_ns
ray.init(include_dashboard=False, log_to_driver=False, _temp_dir=tmp)
value = ray.put(0)
large = np.arange(large_items, dtype=np.int64)

@ray.remote
def do_put_small():
    for _ in range(per_task):
        ray.put(0)

@ray.remote
def do_put():
    for _ in range(multi_puts):
        ray.put(np.zeros(multi_items, dtype=np.int64))

def get_small():
    for _ in range(batch):
        ray.get(value)

def put_small():
    for _ in range(batch):
        ray.put(0)

def put_multi_small():
    ray.get([do_put_small.remote() for _ in range(tasks)])

def put_large():
    ray.put(large)

def put_multi():
    ray.get([do_put.remote() for _ in range(tasks)])

ops = {"get_small": get_small, "put_small": put_small, "put_multi_small": put_multi_small,
       "put_large": put_large, "put_multi": put_multi}
if ray.get(value) != 0 or int(ray.get(ray.put(large))[-1]) != large_items - 1:
    raise RuntimeError("ray.get returned other data")


def answer(cmd, n):
    samples = []
    for _ in range(n):
        t0 = clock()
        ops[cmd]()
        samples.append(clock() - t0)
    return {cmd: samples}
""" + SERVE


class RaySide:
    """Ray's runners; keeps the time of Ray's first call of each kind (its cold figure)."""

    def __init__(self, peer: RayPeer) -> None:
        self.peer = peer
        self.first: dict[str, int] = {}

    def runner(self, cmd: str, label: str, timeout: float = 120) -> dict[str, H.Runner]:
        def run(n: int) -> dict[str, list[int]]:
            samples = self.peer.ask(cmd, n, timeout=timeout)[cmd]
            if samples:
                self.first.setdefault(label, samples[0])
            return {label: samples}
        return {label: run}


# -- ugem's runners ---------------------------------------------------------------------------


def timed(label: str, op: Callable[[], object], check: Callable[[], None], batch: int = 1) -> dict[str, H.Runner]:
    """One sample = `batch` calls of `op`; `check` runs after each round, untimed."""
    def run(n: int) -> dict[str, list[int]]:
        c = H.clock
        samples = []
        for _ in range(n):
            t0 = c()
            for _ in range(batch):
                op()
            samples.append(c() - t0)
        check()
        return {label: samples}
    return {label: run}


def expect(got: Any, want: int, what: str) -> None:
    if int(got) != want:
        raise RuntimeError(f"{what}: read {int(got)}, expected {want}")


def small_runners(devs: dict[str, ugem.Device], refs: dict[str, ugem.Buffer]) -> dict[str, H.Runner]:
    runners: dict[str, H.Runner] = {}
    for mode, dev in devs.items():
        ref = refs[mode]

        def get(ref: ugem.Buffer = ref) -> np.ndarray:
            return ref.array(np.int64, 1, writable=False)

        def put_small(dev: ugem.Device = dev) -> np.ndarray:
            return put(dev, SMALL)

        def put_buf(dev: ugem.Device = dev) -> ugem.Buffer:
            return put_buffer(dev, SMALL)

        runners |= timed(f"get {mode}", get, lambda get=get: expect(get()[0], 7, "get"), BATCH)
        runners |= timed(f"put {mode}", put_small, lambda f=put_small: expect(f()[0], 7, "put"), BATCH)
        runners |= timed(f"put buffer {mode}", put_buf,
                         lambda f=put_buf: expect(np.frombuffer(f().read(0, 8), np.int64)[0], 7, "put buffer"),
                         BATCH)
    return runners


def large_runners(devs: dict[str, ugem.Device], src: np.ndarray, dst: np.ndarray) -> dict[str, H.Runner]:
    """np.copyto into a preallocated array; into a new memfd (diagnostic); ugem's put, timed
    without and with dropping the array (which unmaps and frees the object)."""
    last = int(src[-1])

    def copyto() -> None:
        np.copyto(dst, src)

    def fresh_memfd(n: int) -> dict[str, list[int]]:
        """memfd_create + ftruncate + mmap + np.copyto; the unmap and close (which free the
        pages) untimed, as ugem's put alone leaves them out."""
        c = H.clock
        samples = []
        for _ in range(n):
            t0 = c()
            fd = os.memfd_create("bench-rayperf", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, src.nbytes)
                with mmap.mmap(fd, src.nbytes) as region:
                    view = np.frombuffer(region, src.dtype)
                    np.copyto(view, src)
                    samples.append(c() - t0)
                    expect(view[-1], last, "np.copyto into a memfd")
                    del view
            finally:
                os.close(fd)
        return {"fresh memfd": samples}

    runners = timed("copyto", copyto, lambda: expect(dst[-1], last, "np.copyto"))
    runners["fresh memfd"] = fresh_memfd
    for mode, dev in devs.items():
        for how, putter in (("put", put), ("empty put", put_empty)):
            def run(n: int, mode: str = mode, dev: ugem.Device = dev, how: str = how,
                    putter: Any = putter) -> dict[str, list[int]]:
                c = H.clock
                alone, dropped = [], []
                for _ in range(n):
                    t0 = c()
                    out = putter(dev, src)
                    t1 = c()
                    got = int(out[-1])
                    t2 = c()
                    del out
                    t3 = c()
                    alone.append(t1 - t0)
                    dropped.append(t1 - t0 + t3 - t2)
                    expect(got, last, f"{how} ({mode})")
                return {f"large {how} {mode}": alone, f"large {how}+drop {mode}": dropped}
            runners[f"large {how} {mode}"] = run
    return runners


def multi_runners(pool: multiprocessing.pool.Pool, path: str, items: int) -> dict[str, H.Runner]:
    def small() -> None:
        if sum(pool.map(put_small_task, [path] * TASKS, chunksize=1)) != TASKS * PER_TASK:
            raise RuntimeError("a worker did not put all its objects")

    def large() -> None:
        if sum(pool.starmap(put_large_task, [(path, items)] * TASKS, chunksize=1)) != TASKS * MULTI_PUTS:
            raise RuntimeError("a worker did not put all its arrays")

    return timed("multi small daemon", small, lambda: None) | timed("multi large daemon", large, lambda: None)


# -- the run ----------------------------------------------------------------------------------


def run(opts: H.Options) -> H.Report:
    ns = opts.extra
    size_mib = int(getattr(ns, "size", None) or 800)
    items = size_mib * H.MiB // 8
    workers = os.cpu_count() or 1
    report = H.Report(BENCH, "Ray-shaped microbenchmark (ray_perf.py's object-store rows): ugem vs Ray",
                      {"runs": opts.runs, "n": opts.n, "warmup": opts.warmup, "batch": BATCH,
                       "large": f"{size_mib} MiB", "workers": workers})
    python = ray_python(ns)
    no_ray = bool(getattr(ns, "no_ray", False))
    rayv = None if no_ray else ray_version(python)
    report.params["ray"] = rayv or "absent"
    res, ray_side, ray_error = _measure(opts, report, python, rayv, items, workers)
    why = ("Ray not measured: --no-ray" if no_ray else f"Ray not measured: {ray_error}" if ray_error else
           f"Ray not measured: {python} cannot import ray; {RAY_ENABLE}")
    _rows(report, res, ray_side is not None, why, items * 8)
    _notes(report, res, ray_side, python, why, items * 8)
    return report


def _measure(opts: H.Options, report: H.Report, python: str, rayv: str | None, items: int,
             workers: int) -> tuple[dict[str, H.Results], RaySide | None, str]:
    """Every section's rounds: (series by section, Ray's side if it ran, why Ray did not start)."""
    res: dict[str, H.Results] = {}
    ray_error = ""
    ray_side: RaySide | None = None
    multi_items = items // MULTI_PUTS
    with contextlib.ExitStack() as stack:
        workdir = tempfile.mkdtemp(prefix="ugem-bench-rayperf-")
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        daemon = stack.enter_context(run_daemon())
        # the pool first: its workers fork before this process holds anything else
        pool = multiprocessing.get_context("fork").Pool(workers)
        stack.callback(_stop_pool, pool)
        pool.map(connect_task, [daemon.path] * workers, chunksize=1)
        devs: dict[str, ugem.Device] = {"embedded": ugem.embedded(), "daemon": daemon.connect()}
        for dev in devs.values():
            stack.callback(dev.close)
        refs = {mode: put_buffer(dev, SMALL) for mode, dev in devs.items()}
        if rayv is not None:
            try:
                peer = RayPeer(python, workdir, _RAY_SCRIPT, [os.path.join(workdir, "ray"), str(BATCH), str(TASKS),
                                                             str(PER_TASK), str(items), str(MULTI_PUTS),
                                                             str(multi_items)])
                stack.callback(peer.close)
                ray_side = RaySide(peer)
            except Exception as exc:  # optional peer: never fails the bench
                ray_error = f"{type(exc).__name__}: {str(exc)[:300]}"
        if ray_side is not None:  # let its start-up work (workers, agents) finish first
            settled = H.wait_idle(10 if opts.quick else 30)
            report.params["ray"] = ray_side.peer.version
            report.notes.append(f"after Ray's start, other processes (Ray's included) used {settled:.2f} CPUs "
                                "when the rounds began")
            cpu0, t0 = ray_side.peer.cpu_seconds(), H.clock()

        def ray(cmd: str, label: str, timeout: float = 120) -> dict[str, H.Runner]:
            return ray_side.runner(cmd, label, timeout) if ray_side is not None else {}

        big = 1 if opts.warmup > 0 else 0
        res["small"] = H.interleaved(small_runners(devs, refs) | ray("get_small", "ray get")
                                     | ray("put_small", "ray put"), runs=opts.runs, n=opts.n, warmup=opts.warmup)
        res["multi small"] = H.interleaved(multi_runners(pool, daemon.path, multi_items)
                                           | ray("put_multi_small", "ray multi small"),
                                           runs=opts.runs, n=max(1, opts.n // 4), warmup=big)
        large_nbytes = {label: items * 8 for label in ("copyto", "fresh memfd", "ray large")}
        large_nbytes |= {f"large {how}{drop} {m}": items * 8 for how in ("put", "empty put") for drop in ("", "+drop")
                         for m in MODES}
        src = np.arange(items, dtype=np.int64)
        dst = np.empty_like(src)
        res["large"] = H.interleaved(large_runners(devs, src, dst) | ray("put_large", "ray large"),
                                     runs=opts.runs, n=1, warmup=big, nbytes=large_nbytes)
        del src, dst
        multi = dict(multi_runners(pool, daemon.path, multi_items))
        multi.pop("multi small daemon")
        res["multi large"] = H.interleaved(multi | ray("put_multi", "ray multi large", timeout=600),
                                           runs=opts.runs, n=1, warmup=big,
                                           nbytes={"multi large daemon": TASKS * MULTI_PUTS * multi_items * 8,
                                                   "ray multi large": TASKS * MULTI_PUTS * multi_items * 8})
        if ray_side is not None:
            cpu = ray_side.peer.cpu_seconds()
            report.notes.append(f"Ray's processes (its session) used {cpu:.1f} CPU-s in all, {cpu - cpu0:.1f} "
                                f"during the rounds ({(cpu - cpu0) / ((H.clock() - t0) / 1e9):.2f} CPUs on "
                                "average, its measured work included); what of it is not reaped through the "
                                "driver (workers, agents) counts in other_load")
        for ref in refs.values():
            ref.close()
    return res, ray_side, ray_error


def _stop_pool(pool: multiprocessing.pool.Pool) -> None:
    pool.close()
    pool.join()


# -- the report -------------------------------------------------------------------------------


def _rows(report: H.Report, res: dict[str, H.Results], ray_ran: bool, why: str, nbytes: int) -> None:
    rows = report.rows
    ray_mode = f"ray {report.params['ray']} (baseline)"
    target = AHEAD if ray_ran else None

    def pair(section: str, name: str, ray_label: str, ray_fig: str, ugem: list[tuple[str, str, str]],
             ops: int, unit: str) -> None:
        base = res[section][ray_label] if ray_ran else None
        if base is not None:
            base.label = "Ray"
            rows.append(_row(f"{name}: {ray_fig}", ray_mode, base, ops, unit, None, None, headline=False))
        else:
            rows.append(H.Row.skipped(BENCH, f"{name}: {ray_fig}", unit, why))
        for label, mode, fig in ugem:
            rows.append(_row(f"{name}: {fig}", mode, res[section][label], ops, unit, base, target))

    small_fig = "ugem.array(int64 array of 1), array dropped"
    pair("small", "single client get calls (Plasma Store)", "ray get", "ray.get(ref of 0)",
         [(f"get {m}", m, "Buffer.array(int64, 1, writable=False), dropped") for m in MODES], BATCH, "calls/s")
    pair("small", "single client put calls (Plasma Store)", "ray put", "ray.put(0), ref dropped",
         [(f"put {m}", m, small_fig) for m in MODES], BATCH, "calls/s")
    for m in MODES:
        base = res["small"]["ray put"] if ray_ran else None
        rows.append(_row("single client put calls (Plasma Store): dev.new(8) + write, Buffer dropped", m,
                         res["small"][f"put buffer {m}"], BATCH, "calls/s", base, None))
    pair("multi small", "multi client put calls (Plasma Store)", "ray multi small",
         f"{TASKS} tasks x {PER_TASK} ray.put(0)",
         [("multi small daemon", "daemon", f"{TASKS} Pool tasks x {PER_TASK} puts ({small_fig})")],
         TASKS * PER_TASK, "calls/s")
    size = f"{nbytes // H.MiB} MiB"
    pair("large", "single client put gigabytes", "ray large", f"ray.put({size} int64), ref dropped",
         [(f"large put+drop {m}", m, f"ugem.array({size} int64), array dropped") for m in MODES], 0, "GB/s")
    for m in MODES:
        base = res["large"]["ray large"] if ray_ran else None
        rows.append(_row(f"single client put gigabytes: ugem.empty + np.copyto {size}, array dropped", m,
                         res["large"][f"large empty put+drop {m}"], 0, "GB/s", base, None))
    each = f"{nbytes // MULTI_PUTS // H.MiB} MiB"
    pair("multi large", "multi client put gigabytes", "ray multi large",
         f"{TASKS} tasks x {MULTI_PUTS} ray.put(np.zeros {each})",
         [("multi large daemon", "daemon", f"{TASKS} Pool tasks x {MULTI_PUTS} ugem.array(np.zeros {each})")],
         0, "GB/s")
    copy = res["large"]["copyto"]
    copy.label = "np.copyto"
    fig = f"put {size} vs np.copyto"
    rows.append(H.Row.throughput(BENCH, f"{fig}: np.copyto into a preallocated array", "baseline", copy))
    for m in MODES:
        rows.append(H.Row.throughput(BENCH, f"{fig}: ugem.array (put alone)", m,
                                     res["large"][f"large put {m}"], baseline=copy, target=COPYTO))
    for m in MODES:
        rows.append(H.Row.throughput(BENCH, f"{fig}: ugem.empty + np.copyto (put alone, no target)", m,
                                     res["large"][f"large empty put {m}"], baseline=copy))
    rows.append(H.Row.throughput(BENCH, f"{fig}: memfd_create + mmap + np.copyto (diagnostic)", "host",
                                 res["large"]["fresh memfd"], baseline=copy))


def _row(figure: str, mode: str, s: H.Series, ops: int, unit: str, base: H.Series | None,
         target: H.Target | None, *, headline: bool = True) -> H.Row:
    """A calls/s row (`ops` calls per sample) or, with ops 0, a GB/s row; ratio = rate / base's."""
    if ops:
        row = H.Row.rate(BENCH, figure, mode, s, ops, unit, baseline=base, target=target)
    else:
        row = H.Row.throughput(BENCH, figure, mode, s, baseline=base, target=target)
    row.headline = headline and target is None  # informational: in run_all's summary without a target
    return row


def _notes(report: H.Report, res: dict[str, H.Results], ray_side: RaySide | None, python: str, why: str,
           nbytes: int) -> None:
    notes = report.notes
    if ray_side is None:
        notes.append(f"Ray rows skipped: {why}; the ugem rows carry no target without them")
    else:
        notes.append(f"Ray {report.params['ray']} ran in its own process ({python}): one session "
                     "(ray.init(include_dashboard=False, log_to_driver=False), default object store and num_cpus), "
                     "started before the rounds and kept to the end; its rows are warm")
        first = {"ray get": f"get x{BATCH}", "ray put": f"put x{BATCH}", "ray multi small": "multi client put call",
                 "ray large": f"put {nbytes // H.MiB} MiB", "ray multi large": "multi client put gigabytes call"}
        shown = [f"{what} {ray_side.first[label] / 1e6:.1f} ms" for label, what in first.items()
                 if label in ray_side.first]
        notes.append("Ray's first call of each kind (cold, in the warm-up; not in the rows): " + ", ".join(shown))
        ray_large, copy = res["large"]["ray large"], res["large"]["copyto"]
        if not ray_large.error and not copy.error:
            notes.append(f"Ray's put of {nbytes // H.MiB} MiB ran at {ray_large.median_gbps / copy.median_gbps:.2f} "
                         "x np.copyto into a preallocated array (same rounds)")
    notes.append(f"ugem.array copies a value of {parts.SPLIT_MIN // H.MiB} MiB or more in parts on "
                 f"{parts.COPY_THREADS} thread(s) at once (ugem/parts.py), as Ray's put copies a large object "
                 "on several threads; np.copyto is one thread")
    notes.append("ratio = ugem rate / Ray rate (higher is better for ugem; target: ugem ahead, >= 1); copyto rows: "
                 "ratio = put GB/s / np.copyto GB/s (target >= 0.8)")
    notes.append("put = ugem.array(value) (as ray.put: a copy in ugem memory; one request: a new object and its "
                 "mapping, no handle, or, for 1 MiB or more, the object of the array this client dropped a moment ago "
                 "reused in place once the manager says nothing else holds it), the array dropped at once as "
                 "ray_perf drops each ref (its unmap and free are in the time); the 'ugem.empty + np.copyto' rows "
                 "(no target) make a new object every time and fault its pages in; get = "
                 "Buffer.array of a stored object (the view dropped at once; its mapping lingers until the next "
                 "request, and the next get takes it back with no request); small value = an "
                 "int64 array of one item (Ray: the int 0, as in ray_perf); the put gigabytes source holds np.arange "
                 "data on both sides (ray_perf's is np.zeros, never written)")
    notes.append(f"multi client: {report.params['workers']} worker processes (a fork Pool, each a client of the "
                 f"daemon) vs Ray's {report.params['workers']} CPUs of workers; {TASKS} tasks per call "
                 "(chunksize 1), as Ray runs 10 tasks; embedded mode has no multi-client rows (one process's manager)")


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=int, metavar="MiB", help="the large array (default 800, as ray_perf's)")
    add_ray_options(parser)


def main(argv: list[str] | None = None) -> int:
    opts = H.parse_args(__doc__.splitlines()[0], argv, _options, **DEFAULTS)
    return H.emit([H.monitored(run, opts)], opts)


if __name__ == "__main__":
    sys.exit(main())
