"""Scale (a performance target, docs/REFERENCE.md): 1,000,000 live objects across 100 clients in one daemon.

    python bench/bench_scale.py [--quick] [--objects N] [--clients C] [--workers W] [--runs N] [--n N]
                                [--no-embedded] [--gc-log] [--json [PATH]]

Daemon mode: the daemon under test (`run_daemon`, `client_max_objects` raised so that every
client may hold its share) and a reference daemon (same flags). C clients (default 100) are
connections opened by W spawned worker processes (default 4; the daemon is single-threaded and
the machine has 2 CPUs), C to each daemon; those to the daemon under test fill it to N objects
in all (default 1,000,000; `--quick` 100,000) with `create(4096)`, about N/C per client, never
touched (no pages, no memfd); those to the reference stay idle. A probe client per daemon in
this process measures, `--runs` x `--n` samples per figure, rounds interleaved across both
daemons:

- once when the daemon under test holds ~1k objects (the probe's own 1,000 handles; 1,000 of
  them flinked), and again when it holds N (the probe holding N/C of them, the workers the
  rest, 10 % of the workers' objects flinked); the reference's probe holds 1,000 objects (1,000
  names) throughout, so each ratio is against ~1k objects measured in the same rounds (at the
  1k point the ratio shows what the method itself gives: ~1.0); the ratio against the same
  daemon before the fill (measured apart) is in the notes;
- `create`+`close_handle` pairs, and `create` alone (handles kept, closed after each run):
  target median at N <= 2 x at 1k; the daemons' CPU time per operation (notes);
- lookup: `info(h)` on random handles among the probe's own (1k at 1k, N/C at N);
- names: `flink` of a new object (create and close untimed), `open_name` + `close_handle` of
  random names (1k names, vs ~N/10 at N).

Daemon memory per object: VmRSS (and Pss, Private from /proc/PID/smaps_rollup) with the C
clients connected and 0 objects (after a warm-up create/close), and again at N objects (before
the workers' names); (delta) / N; target <= 1024 B/object. Also: memory per name, fill rate
(objects/s, whole fill and first/last tenth, daemon CPU per create), flink rate, teardown (the
workers close their C clients, timed until `stats()["objects"]` is down to the probe's; then the
probe closes and the objects count must reach 0). `--gc-log` lists the daemon's garbage
collections per phase (diagnostics).

Embedded mode (in a spawned child process, so that its RSS is the manager's): `ugem.Manager` with
C `open()` clients, same N, RSS delta per object of that process, create/info/flink latency at
1k vs N against a second Manager holding 1k objects in the same rounds, fill and teardown time.
Informational (the target is on the daemon).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import multiprocessing as mp
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness as H  # noqa: E402
import ugem  # noqa: E402
from ugem.testing.daemon import DaemonProcess, run_daemon  # noqa: E402

BENCH = "scale"
DEFAULTS = dict(runs=5, n=2000, warmup=200, quick_runs=3, quick_n=1000, quick_warmup=100)
OBJECTS = 1_000_000
QUICK_OBJECTS = 100_000
CLIENTS = 100
WORKERS = 4
SMALL = 1000  # objects in the daemon at the "1k" point (the probe's own handles)
NAMES_SMALL = 1000  # of which flinked (the name table at the "1k" point)
NAME_EVERY = 10  # the workers flink every 10th object at N
FILL_STEPS = 10
SIZE = 4096
SEED = 1234


def count_label(n: int) -> str:
    for div, suffix in ((1_000_000, "M"), (1000, "k")):
        if n >= div and n % (div // 10) == 0:
            return f"{n / div:g}{suffix}"
    return str(n)


# -- /proc figures -------------------------------------------------------------------------


def proc_memory(pid: int) -> dict[str, float]:
    """VmRSS, and Pss / Private (clean + dirty) / Anonymous from smaps_rollup, in bytes."""
    out: dict[str, float] = {"rss": float("nan"), "pss": float("nan"), "private": float("nan"),
                             "anon": float("nan")}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                out["rss"] = int(line.split()[1]) * 1024
    try:
        fields: dict[str, int] = {}
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[-1] == "kB":
                    fields[key] = int(parts[0]) * 1024
        out["pss"] = fields.get("Pss", float("nan"))
        out["private"] = fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
        out["anon"] = fields.get("Anonymous", float("nan"))
    except OSError:
        pass
    return out


def process_cpu_ns(pid: int) -> int:
    """CPU time (ns) of every thread of `pid`, from /proc/<pid>/task/*/schedstat."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total


# -- --gc-log: the daemon's garbage collections (diagnostics; src/ untouched) ---------------

GC_HOOK = """\
import gc, os, time
_path = os.environ.get("UGEM_BENCH_GC_LOG")
if _path:
    _f = open(_path, "a", buffering=1)
    _t0 = [0]

    def _ugem_bench_gc(phase, info):
        if phase == "start":
            _t0[0] = time.monotonic_ns()
            return
        end = time.monotonic_ns()
        if info["generation"] > 0 or end - _t0[0] > 200_000:
            _f.write(f"{info['generation']} {_t0[0]} {end - _t0[0]} {info['collected']}\\n")

    gc.callbacks.append(_ugem_bench_gc)
"""


class GcLog:
    """A sitecustomize on the daemon's PYTHONPATH that logs its collections of generation 1 and 2
    (and any longer than 0.2 ms) with CLOCK_MONOTONIC start times; `summary()` per time window."""

    def __init__(self, directory: str) -> None:
        self.dir = os.path.join(directory, "gc-hook")
        os.makedirs(self.dir)
        with open(os.path.join(self.dir, "sitecustomize.py"), "w") as f:
            f.write(GC_HOOK)
        self.path = os.path.join(directory, "gc.log")
        self.windows: list[tuple[str, int, int]] = []

    def env(self) -> dict[str, str]:
        path = os.pathsep.join(p for p in (self.dir, os.environ.get("PYTHONPATH", "")) if p)
        return dict(os.environ, PYTHONPATH=path, UGEM_BENCH_GC_LOG=self.path)

    @contextlib.contextmanager
    def window(self, name: str) -> Any:
        t0 = time.monotonic_ns()
        try:
            yield
        finally:
            self.windows.append((name, t0, time.monotonic_ns()))

    def summary(self) -> list[str]:
        try:
            with open(self.path) as f:
                events = [tuple(int(x) for x in line.split()) for line in f if line.strip()]
        except OSError:
            return ["daemon GC: no log"]
        lines = []
        for name, t0, t1 in self.windows:
            inside = [e for e in events if t0 <= e[1] < t1]
            parts = []
            for gen in (0, 1, 2):
                durs = [e[2] for e in inside if e[0] == gen]
                if durs:
                    label = f"gen{gen} > 0.2 ms" if gen == 0 else f"gen{gen}"
                    parts.append(f"{label} x{len(durs)} (total {sum(durs) / 1e6:.1f} ms, max {max(durs) / 1e6:.2f} ms)")
            lines.append(f"daemon GC during {name} ({(t1 - t0) / 1e9:.1f} s): " + ("; ".join(parts) or "none logged"))
        return lines


# -- worker processes (daemon mode): C/W connections each ------------------------------------


# -- worker processes (daemon mode): C/W connections each ------------------------------------


def _worker(conn: Connection, paths: list[str], nclients: int) -> None:
    """Serve commands from the bench over `conn`: fill, flink, close, exit. `nclients`
    connections to paths[0] (the daemon under test) do the work; as many to every other path
    (the reference daemon) stay idle, so that both daemons serve the same number of clients."""
    devs: list[ugem.Device] = []
    idle: list[ugem.Device] = []
    handles: list[list[int]] = []
    try:
        for _ in range(nclients):
            devs.append(ugem.connect(paths[0]))
            handles.append([])
        idle = [ugem.connect(p) for p in paths[1:] for _ in range(nclients)]
        conn.send(("ready", os.getpid()))
        while True:
            cmd, *args = conn.recv()
            t0 = time.perf_counter()
            if cmd == "fill":
                remaining = list(args[0])
                while any(remaining):  # interleave the connections in chunks of 64
                    for i, dev in enumerate(devs):
                        k = min(64, remaining[i])
                        if k:
                            create, hs = dev.create, handles[i]
                            for _ in range(k):
                                hs.append(create(SIZE))
                            remaining[i] -= k
                conn.send(("ok", time.perf_counter() - t0))
            elif cmd == "flink":
                every = args[0]
                names: list[int] = []
                for dev, hs in zip(devs, handles, strict=True):
                    flink = dev.flink
                    names.extend(flink(h) for h in hs[::every])
                conn.send(("ok", time.perf_counter() - t0, names))
            elif cmd == "close":
                for dev in devs:
                    dev.close()
                handles = [[] for _ in devs]
                conn.send(("ok", time.perf_counter() - t0))
            elif cmd == "exit":
                break
            else:
                raise ValueError(f"unknown command {cmd!r}")
    except Exception as exc:
        with contextlib.suppress(OSError):
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        for dev in devs + idle:
            with contextlib.suppress(Exception):
                dev.close()
        conn.close()


class Workers:
    """W spawned worker processes holding C connections to each daemon in all."""

    def __init__(self, paths: list[str], clients: int, workers: int) -> None:
        ctx = mp.get_context("spawn")
        self.procs: list[Any] = []
        self.conns: list[Connection] = []
        self.split = [clients // workers + (1 if i < clients % workers else 0) for i in range(workers)]
        for k in self.split:
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(child, paths, k), daemon=True)
            p.start()
            child.close()
            self.procs.append(p)
            self.conns.append(parent)
        self.pids = [self._recv(c)[1] for c in self.conns]

    @staticmethod
    def _recv(conn: Connection) -> tuple[Any, ...]:
        msg = conn.recv()
        if msg[0] == "error":
            raise RuntimeError(f"bench worker failed: {msg[1]}")
        return tuple(msg)

    def all(self, *cmds: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        """Send one command to each worker (cmds[i] to worker i, or cmds[0] to all), await every reply."""
        for i, conn in enumerate(self.conns):
            conn.send(cmds[i] if len(cmds) > 1 else cmds[0])
        return [self._recv(conn) for conn in self.conns]

    def stop(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError, ValueError):
                conn.send(("exit",))
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
                p.join(timeout=10)
        for conn in self.conns:
            conn.close()


# -- probes and runners --------------------------------------------------------------------


class ServerCpu:
    """Server-process CPU time over runs of wrapped runners: label -> [ns, ops]."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.totals: dict[str, list[int]] = {}

    def wrap(self, label: str, runner: H.Runner) -> H.Runner:
        pid = self.pid
        if pid is None:
            return runner

        def run(n: int) -> dict[str, list[int]]:
            s0 = process_cpu_ns(pid)
            out = runner(n)
            t = self.totals.setdefault(label, [0, 0])
            t[0] += process_cpu_ns(pid) - s0
            t[1] += n
            return out
        return run

    def per_op_us(self, label: str) -> float:
        ns, ops = self.totals.get(label, [0, 0])
        return ns / ops / 1e3 if ops else float("nan")


@dataclasses.dataclass
class Probe:
    """One measuring client: its device, its own handles (lookups), the names it opens."""

    dev: ugem.Device
    cpu: ServerCpu
    handles: list[int] = dataclasses.field(default_factory=list)
    names: list[int] = dataclasses.field(default_factory=list)

    def grow(self, count: int) -> None:
        create = self.dev.create
        while len(self.handles) < count:
            self.handles.append(create(SIZE))


def create_close(dev: ugem.Device, label: str) -> H.Runner:
    def run(n: int) -> dict[str, list[int]]:
        c = H.clock
        pair = [0] * n
        create, close = dev.create, dev.close_handle
        for i in range(n):
            t0 = c()
            close(create(SIZE))
            pair[i] = c() - t0
        return {label: pair}
    return run


def create_kept(dev: ugem.Device, label: str) -> H.Runner:
    def run(n: int) -> dict[str, list[int]]:
        c = H.clock
        samples = [0] * n
        kept = [0] * n
        create = dev.create
        for i in range(n):
            t0 = c()
            kept[i] = create(SIZE)
            samples[i] = c() - t0
        for h in kept:
            dev.close_handle(h)
        return {label: samples}
    return run


def lookup(dev: ugem.Device, handles: list[int], rng: random.Random, label: str) -> H.Runner:
    def run(n: int) -> dict[str, list[int]]:
        picks = [rng.choice(handles) for _ in range(n)]
        c = H.clock
        samples = [0] * n
        info = dev.info
        for i, h in enumerate(picks):
            t0 = c()
            info(h)
            samples[i] = c() - t0
        return {label: samples}
    return run


def open_names(dev: ugem.Device, names: list[int], rng: random.Random, label: str) -> H.Runner:
    def run(n: int) -> dict[str, list[int]]:
        picks = [rng.choice(names) for _ in range(n)]
        c = H.clock
        pair = [0] * n
        open_name, close = dev.open_name, dev.close_handle
        for i, name in enumerate(picks):
            t0 = c()
            h, _ = open_name(name)
            close(h)
            pair[i] = c() - t0
        return {label: pair}
    return run


def flink_new(dev: ugem.Device, label: str) -> H.Runner:
    """flink of a new object (created before, closed after, untimed: its name goes with it)."""
    def run(n: int) -> dict[str, list[int]]:
        c = H.clock
        samples = [0] * n
        create, flink, close = dev.create, dev.flink, dev.close_handle
        for i in range(n):
            h = create(SIZE)
            t0 = c()
            flink(h)
            samples[i] = c() - t0
            close(h)
        return {label: samples}
    return run


FIGURES = ("create+close", "create (kept)", "info(h)", "flink", "open_name+close")
CPU_FIGURES = ("create+close", "info(h)", "open_name+close")


def measure(probes: dict[str, Probe], opts: H.Options, rng: random.Random) -> H.Results:
    """Every figure of every probe (tag -> probe), rounds interleaved; series labelled "FIGURE TAG"."""
    runners: dict[str, H.Runner] = {}
    for tag, p in probes.items():
        runners[f"create+close {tag}"] = create_close(p.dev, f"create+close {tag}")
        runners[f"create (kept) {tag}"] = create_kept(p.dev, f"create (kept) {tag}")
        runners[f"info(h) {tag}"] = lookup(p.dev, p.handles, rng, f"info(h) {tag}")
        runners[f"flink {tag}"] = flink_new(p.dev, f"flink {tag}")
        if p.names:
            runners[f"open_name+close {tag}"] = open_names(p.dev, p.names, rng, f"open_name+close {tag}")
        for figure in CPU_FIGURES:
            label = f"{figure} {tag}"
            if label in runners:
                runners[label] = p.cpu.wrap(label, runners[label])
    return H.interleaved(runners, runs=opts.runs, n=opts.n, warmup=opts.warmup)


# -- rows ------------------------------------------------------------------------------------


def value_row(figure: str, mode: str, unit: str, value: float, *, samples: int = 1, target: H.Target | None = None,
              headline: bool = False, error: str = "") -> H.Row:
    row = H.Row(BENCH, figure, mode, unit, value, float("nan"), samples, error=error, headline=headline)
    row._apply(target)
    return row


def latency_rows(report: H.Report, mode: str, small: H.Results, large: H.Results, tag1: str, tagn: str,
                 targets: dict[str, H.Target]) -> None:
    """Per figure: @1k (before the fill) and @N, each with the reference measured in the same rounds
    as its baseline; the ratio @N / @1k of the same manager, measured apart, goes to the notes."""
    ref1, refn = f"ref (with {tag1})", f"ref (with {tagn})"
    sequential = []
    for figure in FIGURES:
        if f"{figure} {tag1}" not in small and f"{figure} {tag1}" not in small.errors:
            continue
        s1, r1 = small[f"{figure} {tag1}"], small[f"{figure} {ref1}"]
        sn, rn = large[f"{figure} {tagn}"], large[f"{figure} {refn}"]
        report.rows.append(H.Row.latency(BENCH, f"{figure} {tag1}", mode, s1, baseline=r1))
        report.rows.append(H.Row.latency(BENCH, f"  {figure} {ref1}", mode, r1))
        target = targets.get(figure)
        row = H.Row.latency(BENCH, f"{figure} {tagn}", mode, sn, baseline=rn, target=target)
        row.headline = target is None
        report.rows.append(row)
        report.rows.append(H.Row.latency(BENCH, f"  {figure} {refn}", mode, rn))
        if not s1.error and not sn.error:
            sequential.append(f"{figure} {sn.median_ns / s1.median_ns:.3f} (p99 {sn.p99_ns / s1.p99_ns:.2f})")
    if sequential:
        report.notes.append(f"{mode}: same manager, {tagn} / {tag1} before the fill (measured apart, not "
                            f"interleaved), median (p99): " + ", ".join(sequential))


def cpu_notes(report: H.Report, mode: str, cpu: ServerCpu, ref: ServerCpu, tag1: str, tagn: str) -> None:
    ref1, refn = f"ref (with {tag1})", f"ref (with {tagn})"
    parts = []
    for figure in CPU_FIGURES:
        a, b = cpu.per_op_us(f"{figure} {tag1}"), cpu.per_op_us(f"{figure} {tagn}")
        ra, rb = ref.per_op_us(f"{figure} {ref1}"), ref.per_op_us(f"{figure} {refn}")
        parts.append(f"{figure} {tag1} {a:.1f} (ref {ra:.1f}), {tagn} {b:.1f} (ref {rb:.1f})")
    report.notes.append(f"{mode}: daemon CPU time per operation (schedstat, us): " + "; ".join(parts))
    a, b = cpu.per_op_us(f"create+close {tagn}"), ref.per_op_us(f"create+close {refn}")
    row = value_row(f"daemon CPU per create+close {tagn}", mode, "us CPU", a, headline=True)
    if b == b and b > 0:
        row.baseline, row.ratio = f"ref (with {tagn})", a / b
    report.rows.append(row)


def memory_rows(report: H.Report, mode: str, m0: dict[str, float], m1: dict[str, float], count: int,
                target: H.Target | None) -> None:
    what = "daemon" if mode == "daemon" else "process"
    for key, label in (("rss", "VmRSS"), ("pss", "Pss"), ("private", "Private")):
        per = (m1[key] - m0[key]) / count
        t = target if key == "rss" else None
        report.rows.append(value_row(f"{what} memory per object ({label})", mode, "B/object", per,
                                     target=t, headline=t is None and key == "rss"))
    report.notes.append(
        f"{mode}: {what} memory with 0 objects: VmRSS {m0['rss'] / H.MiB:.1f} MiB, Pss {m0['pss'] / H.MiB:.1f} MiB, "
        f"Private {m0['private'] / H.MiB:.1f} MiB; at {count:,} objects: VmRSS {m1['rss'] / H.MiB:.1f} MiB, "
        f"Pss {m1['pss'] / H.MiB:.1f} MiB, Private {m1['private'] / H.MiB:.1f} MiB")


# -- daemon mode ---------------------------------------------------------------------------

PLACEMENTS = ("same", "split", "any")


@contextlib.contextmanager
def placed(placement: str, servers: list[int]) -> Any:
    """Pin this thread and the servers' main threads for the latency runs: "same" puts them all
    on one CPU (each round trip a context switch on that CPU), "split" the servers on another CPU
    than this thread, "any" pins nothing. Unpinned again afterwards."""
    cpus = sorted(os.sched_getaffinity(0))
    if placement == "any" or len(cpus) < 2:
        yield
        return
    mine, theirs = {cpus[0]}, ({cpus[0]} if placement == "same" else {cpus[1]})
    os.sched_setaffinity(0, mine)
    for pid in servers:
        os.sched_setaffinity(pid, theirs)
    try:
        yield
    finally:
        os.sched_setaffinity(0, set(cpus))
        for pid in servers:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(pid, set(cpus))


def wait_objects(dev: ugem.Device, at_most: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        left = int(dev.stats()["objects"])
        if left <= at_most or time.monotonic() > deadline:
            return left
        time.sleep(0.01)


def fill_counts(total: int, clients: int) -> list[int]:
    return [total // clients + (1 if i < total % clients else 0) for i in range(clients)]


def probe_size(n_objects: int, clients: int) -> int:
    return max(n_objects // clients, SMALL)


@dataclasses.dataclass
class _DaemonRun:
    """What daemon_section measured, phase by phase (memory snapshots m0..m3: 0 objects,
    at N, after the names, after releasing everything)."""

    probe: Probe
    ref: Probe
    m: list[dict[str, float]] = dataclasses.field(default_factory=list)
    small: H.Results | None = None
    large: H.Results | None = None
    objects_small: int = 0
    objects_large: int = 0
    steps: list[tuple[int, float, int]] = dataclasses.field(default_factory=list)  # (objects, s, daemon CPU ns)
    fill_s: float = 0.0
    worker_names: list[int] = dataclasses.field(default_factory=list)
    flink_workers_s: float = 0.0
    closed_s: float = 0.0
    teardown_s: float = 0.0
    left_probe: int = 0
    left: int = 0
    gc_lines: list[str] = dataclasses.field(default_factory=list)


def daemon_section(report: H.Report, opts: H.Options, n_objects: int, clients: int, workers: int,
                   gc_log: bool = False, placement: str = "same") -> None:
    tag1, tagn = f"@{count_label(SMALL)}", f"@{count_label(n_objects)}"
    if n_objects < probe_size(n_objects, clients) + clients:
        raise ValueError(f"--objects {n_objects} is too small for {clients} clients")
    run = _daemon_measure(opts, n_objects, clients, workers, gc_log, placement, (tag1, tagn))
    _daemon_rows(report, run, n_objects, clients, workers, tag1, tagn)
    _daemon_notes(report, run, clients, placement, tag1, tagn)


def _daemon_measure(opts: H.Options, n_objects: int, clients: int, workers: int, gc_log: bool, placement: str,
                    tags: tuple[str, str]) -> _DaemonRun:
    """Two daemons (the one under test, a reference holding ~1k objects), the probes, the
    worker clients; then each phase in turn."""
    tag1, tagn = tags
    rng = random.Random(SEED)
    with contextlib.ExitStack() as stack:
        gcl, daemon, reference = _daemons(stack, n_objects, gc_log)

        def window(name: str) -> contextlib.AbstractContextManager[Any]:
            return gcl.window(name) if gcl is not None else contextlib.nullcontext()

        run = _DaemonRun(Probe(daemon.connect(), ServerCpu(daemon.pid)), Probe(reference.connect(),
                                                                                ServerCpu(reference.pid)))
        probe, ref = run.probe, run.ref
        stack.callback(probe.dev.close)
        stack.callback(ref.dev.close)
        pool = Workers([daemon.path, reference.path], clients, workers)
        stack.callback(pool.stop)
        # warm the create/close path up, then the baseline: C clients connected, 0 objects
        for p in (probe, ref):
            for _ in range(200):
                p.dev.close_handle(p.dev.create(SIZE))
        assert probe.dev.stats()["objects"] == 0
        time.sleep(0.3)
        run.m.append(proc_memory(daemon.pid))

        # -- ~1k objects: the probes' own, each of their first 1,000 handles flinked
        for p in (probe, ref):
            p.grow(SMALL)
        for p in (probe, ref):
            p.names = [p.dev.flink(h) for h in p.handles[:NAMES_SMALL]]
        servers = [daemon.pid, reference.pid]
        with window(f"the {tag1} runs"), placed(placement, servers):
            run.small = measure({tag1: probe, f"ref (with {tag1})": ref}, opts, rng)
        run.objects_small = int(probe.dev.stats()["objects"])

        with window("the fill"):
            _daemon_fill(run, pool, daemon.pid, n_objects, clients)
        time.sleep(0.3)
        run.m.append(proc_memory(daemon.pid))

        # -- names at N: workers flink every NAME_EVERY-th object
        t0 = time.perf_counter()
        with window("the workers' flinks"):
            replies = pool.all(("flink", NAME_EVERY))
        run.flink_workers_s = time.perf_counter() - t0
        run.worker_names = [name for r in replies for name in r[2]]
        probe.names += run.worker_names
        time.sleep(0.3)
        run.m.append(proc_memory(daemon.pid))
        with window(f"the {tagn} runs"), placed(placement, servers):
            run.large = measure({tagn: probe, f"ref (with {tagn})": ref}, opts, rng)

        with window("the teardown"):
            _daemon_teardown(run, pool)
        probe.dev.close()
        check = daemon.connect()
        stack.callback(check.close)
        run.left = wait_objects(check, 0, timeout=120)
        time.sleep(0.3)
        run.m.append(proc_memory(daemon.pid))
        check.close()
        run.gc_lines = gcl.summary() if gcl is not None else []
    return run


def _daemons(stack: contextlib.ExitStack[Any], n_objects: int,
             gc_log: bool) -> tuple[GcLog | None, DaemonProcess, DaemonProcess]:
    """The daemon under test (its collections logged with `gc_log`) and the reference, on
    `stack`, which turns a failure into one naming what the daemons logged."""
    flags = dict(client_max_objects=max(65536, n_objects))
    gcl: GcLog | None = None
    env = None
    if gc_log:
        gcl = GcLog(stack.enter_context(tempfile.TemporaryDirectory(prefix="ugem-bench-gc-")))
        env = gcl.env()
    daemon = stack.enter_context(run_daemon(env=env, **flags))
    reference = stack.enter_context(run_daemon(**flags))  # holds ~1k objects throughout

    def explain(exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if isinstance(exc, Exception):  # say what the daemons logged
            logs = "; ".join(f"{what} stderr ends: {d.stderr_text()[-400:]!r}"
                             for what, d in (("daemon", daemon), ("reference", reference)) if d.stderr_text())
            raise RuntimeError(f"{type(exc).__name__}: {exc}" + (f" ({logs})" if logs else "")) from exc
        return False
    stack.push(explain)
    return gcl, daemon, reference


def _daemon_fill(run: _DaemonRun, pool: Workers, daemon_pid: int, n_objects: int, clients: int) -> None:
    """Fill to N: the probe to N/C, the workers the rest, in FILL_STEPS steps."""
    probe = run.probe
    probe.grow(probe_size(n_objects, clients))
    per_client = fill_counts(n_objects - len(probe.handles), clients)
    fill_t0 = time.perf_counter()
    for step in range(FILL_STEPS):
        counts = [c * (step + 1) // FILL_STEPS - c * step // FILL_STEPS for c in per_client]
        cmds, at = [], 0
        for k in pool.split:
            cmds.append(("fill", counts[at:at + k]))
            at += k
        s0, t0 = process_cpu_ns(daemon_pid), time.perf_counter()
        pool.all(*cmds)
        run.steps.append((sum(counts), time.perf_counter() - t0, process_cpu_ns(daemon_pid) - s0))
    run.fill_s = time.perf_counter() - fill_t0
    run.objects_large = int(probe.dev.stats()["objects"])


def _daemon_teardown(run: _DaemonRun, pool: Workers) -> None:
    """The C worker clients close (their objects go); the probe's are counted."""
    t0 = time.perf_counter()
    pool.all(("close",))
    run.closed_s = time.perf_counter() - t0
    run.left_probe = wait_objects(run.probe.dev, len(run.probe.handles), timeout=600)
    run.teardown_s = time.perf_counter() - t0


def _daemon_rows(report: H.Report, run: _DaemonRun, n_objects: int, clients: int, workers: int, tag1: str,
                 tagn: str) -> None:
    mode, rows, probe = "daemon", report.rows, run.probe
    m0, m1, m2 = run.m[:3]
    assert run.small is not None and run.large is not None
    memory_rows(report, mode, m0, m1, n_objects, H.Target("<=", 1024, on="median"))
    rows.append(value_row("daemon memory per name (VmRSS)", mode, "B/name",
                          (m2["rss"] - m1["rss"]) / len(run.worker_names), headline=True))
    ratio_2 = H.Target("<=", 2.0, text="ratio <= 2 (vs ref @1k)")
    latency_rows(report, mode, run.small, run.large, tag1, tagn, {"create+close": ratio_2, "create (kept)": ratio_2})
    cpu_notes(report, mode, probe.cpu, run.ref.cpu, tag1, tagn)
    steps = run.steps
    filled = sum(s[0] for s in steps)
    rows.append(value_row(f"fill to {count_label(n_objects)}: {clients} clients, {workers} processes", mode,
                          "objects/s", filled / run.fill_s, samples=filled, headline=True))
    first, last = steps[0], steps[-1]
    rows.append(value_row("  fill, first tenth", mode, "objects/s", first[0] / first[1], samples=first[0]))
    rows.append(value_row("  fill, last tenth", mode, "objects/s", last[0] / last[1], samples=last[0]))
    rows.append(value_row("  daemon CPU per create, first tenth", mode, "us CPU", first[2] / first[0] / 1e3))
    rows.append(value_row("  daemon CPU per create, last tenth", mode, "us CPU", last[2] / last[0] / 1e3))
    rows.append(value_row(f"flink {len(run.worker_names):,} objects ({workers} processes)", mode, "names/s",
                          len(run.worker_names) / run.flink_workers_s, samples=len(run.worker_names)))
    per = (n_objects - len(probe.handles)) // clients
    rows.append(value_row(f"teardown: close {clients} clients (~{per:,} objects each)", mode, "s", run.teardown_s,
                          headline=True, error="" if run.left_probe <= len(probe.handles) else
                          f"{run.left_probe - len(probe.handles)} worker objects still live after 600 s"))
    rows.append(value_row("objects left after releasing everything", mode, "objects", run.left,
                          target=H.Target("<=", 0, on="median", text="0 (stats()['objects'])")))


def _daemon_notes(report: H.Report, run: _DaemonRun, clients: int, placement: str, tag1: str, tagn: str) -> None:
    m0, m1, m2, m3 = run.m
    steps, probe = run.steps, run.probe
    filled = sum(s[0] for s in steps)
    report.notes.append(
        {"same": "daemon: latency runs with this thread and both daemons pinned to one CPU (--placement same): "
                 "every round trip is a context switch there, not a cross-CPU wake-up whose cost depends on where "
                 "the scheduler put each side; the fill is not pinned",
         "split": "daemon: latency runs with both daemons pinned to another CPU than this thread (--placement split)",
         "any": "daemon: nothing pinned (--placement any): each daemon's round trips may be same-CPU (~25 us) or "
                "cross-CPU (~55 us) depending on the scheduler, so ratios can swing by 2x"}[placement])
    report.notes.append(
        f"daemon: ref = a second daemon (same flags, the same {clients} clients connected, idle) whose probe holds "
        f"{SMALL:,} objects ({NAMES_SMALL:,} flinked), measured in the same rounds as the daemon under test: the "
        f"ratios (and the target) are against it; a ratio at {tag1} (both at ~1k objects) shows what the method "
        f"itself gives")
    report.notes.append(
        f"daemon: the probe (an extra client in this process) held {SMALL:,} handles at {tag1} "
        f"({run.objects_small:,} objects in the daemon after those runs) and {len(probe.handles):,} at {tagn} "
        f"({run.objects_large:,} objects after the fill; {len(probe.names):,} names open_name picks from at {tagn}, "
        f"{NAMES_SMALL:,} at {tag1}); info(h) picks random handles among the probe's own")
    report.notes.append(
        f"daemon: fill {filled:,} objects by the workers in {run.fill_s:.1f} s; per tenth (objects/s): "
        + ", ".join(f"{s[0] / s[1]:,.0f}" for s in steps)
        + "; daemon CPU per create (us): " + ", ".join(f"{s[2] / s[0] / 1e3:.1f}" for s in steps))
    report.notes.append(
        f"daemon: teardown: the workers' close() calls returned after {run.closed_s:.2f} s, objects released after "
        f"{run.teardown_s:.2f} s; after releasing everything: {run.left} objects, VmRSS {m3['rss'] / H.MiB:.1f} MiB "
        f"({(m3['rss'] - m0['rss']) / H.MiB:+.1f} MiB vs 0 objects at the start)")
    report.notes.append(f"daemon: name table: {len(run.worker_names):,} more names cost "
                        f"{(m2['rss'] - m1['rss']) / H.MiB:.1f} MiB VmRSS")
    report.notes.extend(run.gc_lines)


# -- embedded mode (in a spawned child: its RSS is the manager's) ---------------------------


def _embedded_child(conn: Connection, n_objects: int, clients: int, runs: int, n: int, warmup: int) -> None:
    try:
        opts = H.Options(False, runs, n, warmup, None, argparse.Namespace())
        conn.send(("ok", _embedded(n_objects, clients, opts)))
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def _embedded(n_objects: int, clients: int, opts: H.Options) -> dict[str, Any]:
    rng = random.Random(SEED)
    tag1, tagn = f"@{count_label(SMALL)}", f"@{count_label(n_objects)}"
    probe_large = probe_size(n_objects, clients)
    out: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="ugem-bench-"))
        mgr = stack.enter_context(ugem.Manager(spill_dir=os.path.join(directory, "spill"),
                                               client_max_objects=max(65536, n_objects)))
        ref_mgr = stack.enter_context(ugem.Manager(spill_dir=os.path.join(directory, "ref-spill")))
        devs = [mgr.open() for _ in range(clients)]
        probe, ref = Probe(mgr.open(), ServerCpu(None)), Probe(ref_mgr.open(), ServerCpu(None))
        for p in (probe, ref):
            for _ in range(200):
                p.dev.close_handle(p.dev.create(SIZE))
        gc.collect()
        out["m0"] = proc_memory(os.getpid())
        for p in (probe, ref):
            p.grow(SMALL)
        out["small"] = measure({tag1: probe, f"ref (with {tag1})": ref}, opts, rng)
        probe.grow(probe_large)
        t0 = time.perf_counter()
        for dev, count in zip(devs, fill_counts(n_objects - len(probe.handles), clients), strict=True):
            create = dev.create
            for _ in range(count):  # handles not kept: this process's RSS is the figure
                create(SIZE)
        out["fill_s"] = time.perf_counter() - t0
        out["objects"] = mgr.statistics()["objects"]
        gc.collect()
        out["m1"] = proc_memory(os.getpid())
        out["large"] = measure({tagn: probe, f"ref (with {tagn})": ref}, opts, rng)
        t0 = time.perf_counter()
        for dev in devs:
            dev.close()
        out["teardown_s"] = time.perf_counter() - t0
        probe.dev.close()
        ref.dev.close()
        out["left"] = mgr.statistics()["objects"]
    out["filled"] = n_objects - probe_large
    return out


def embedded_section(report: H.Report, opts: H.Options, n_objects: int, clients: int) -> None:
    mode = "embedded"
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_embedded_child, args=(child, n_objects, clients, opts.runs, opts.n, opts.warmup),
                    daemon=True)
    p.start()
    child.close()
    try:
        msg = parent.recv()
    finally:
        parent.close()
        p.join(timeout=60)
        if p.is_alive():
            p.terminate()
    if msg[0] == "error":
        raise RuntimeError(f"embedded section failed: {msg[1]}")
    out = msg[1]
    tag1, tagn = f"@{count_label(SMALL)}", f"@{count_label(n_objects)}"
    memory_rows(report, mode, out["m0"], out["m1"], n_objects, None)
    latency_rows(report, mode, out["small"], out["large"], tag1, tagn, {})
    rows = report.rows
    rows.append(value_row(f"fill to {count_label(n_objects)}: {clients} clients, one thread", mode, "objects/s",
                          out["filled"] / out["fill_s"], samples=out["filled"], headline=True))
    rows.append(value_row(f"teardown: close {clients} clients", mode, "s", out["teardown_s"], headline=True))
    rows.append(value_row("objects left after releasing everything", mode, "objects", out["left"],
                          target=H.Target("<=", 0, on="median", text="0 (statistics()['objects'])")))
    report.notes.append(f"embedded: in a spawned child process (RSS of that process, which keeps no handles beyond "
                        f"the probe's); ref = a second Manager in it holding {SMALL:,} objects, measured in the same "
                        f"rounds; {out['objects']:,} objects after the fill; no target on the embedded figures "
                        f"(the targets are stated for the daemon)")


# -- main ------------------------------------------------------------------------------------


def run(opts: H.Options) -> H.Report:
    extra = opts.extra
    n_objects = getattr(extra, "objects", None) or (QUICK_OBJECTS if opts.quick else OBJECTS)
    clients = getattr(extra, "clients", None) or CLIENTS
    workers = min(clients, getattr(extra, "workers", None) or WORKERS)
    embedded = not getattr(extra, "no_embedded", False)
    gc_log = bool(getattr(extra, "gc_log", False))
    placement = getattr(extra, "placement", None) or "same"
    report = H.Report(BENCH, f"{n_objects:,} objects across {clients} clients",
                      {"objects": n_objects, "clients": clients, "workers": workers, "runs": opts.runs, "n": opts.n,
                       "warmup": opts.warmup, "placement": placement})
    sections: list[tuple[str, Callable[[], None]]] = [
        ("daemon", lambda: daemon_section(report, opts, n_objects, clients, workers, gc_log, placement))]
    if embedded:
        sections.append(("embedded", lambda: embedded_section(report, opts, n_objects, clients)))
    for name, section in sections:
        t0 = time.monotonic()
        try:
            section()
        except Exception as exc:  # keep the other section's figures
            report.rows.append(value_row(f"({name} section)", name, "", float("nan"), target=H.Target("<=", 0),
                                         error=f"{type(exc).__name__}: {exc}"))
        report.notes.append(f"{name} section took {time.monotonic() - t0:.1f} s")
    report.notes.append("memory per object = (figure at N objects - figure with 0 objects) / N; ratio = median / "
                        "median of the reference measured in the same rounds (target: daemon create at 1M <= 2 x "
                        "at 1k)")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    H.add_common(parser)
    parser.add_argument("--objects", type=int, help=f"objects in all (default {OBJECTS:,}; --quick {QUICK_OBJECTS:,})")
    parser.add_argument("--clients", type=int, help=f"clients holding them (default {CLIENTS})")
    parser.add_argument("--workers", type=int, help=f"processes opening the clients (default {WORKERS})")
    parser.add_argument("--no-embedded", action="store_true", help="skip the embedded-mode section")
    parser.add_argument("--placement", choices=PLACEMENTS, default="same",
                        help="daemon latency runs: this thread and both daemons on one CPU (same, default), the "
                             "daemons on another CPU (split), or nothing pinned (any)")
    parser.add_argument("--gc-log", action="store_true",
                        help="diagnostics: log the daemon's garbage collections (a sitecustomize on its PYTHONPATH) "
                             "and list them per phase in the notes")
    opts = H.options(parser.parse_args(argv), **DEFAULTS)
    return H.emit([H.monitored(run, opts)], opts)


if __name__ == "__main__":
    sys.exit(main())
