"""Control-path latency: daemon round trips vs a bare Python Unix-socket round trip,
and embedded create+close_handle vs a `multiprocessing.shared_memory` segment's life.

    python bench/bench_roundtrip.py [--quick] [--runs N] [--n N] [--json [PATH]] [--placement any|same|split]

Baselines, measured in the same run: `_echo_server.py` in a subprocess (selectors loop) and a
blocking client that sends a 16-byte header + 8-byte payload and reads the 16 + 8 byte reply;
`multiprocessing.shared_memory.SharedMemory(create=True, size=4096)` + `close()` + `unlink()`
in this process (shm_open, ftruncate, mmap, munmap, close, shm_unlink, and the resource
tracker's register/unregister messages): the nearest thing a user would otherwise create and
throw away.
Figures (each operation timed on its own, `--n` per run, `--runs` runs, rounds interleaved):

- daemon `info(h)` on an existing handle: target median <= 1.3 x bare;
- daemon `busy(h)` (only if the Device has it): target median <= 1.3 x bare;
- daemon `create(4096)` + `close_handle` (two round trips): target median <= 1.3 x (2 x bare);
  `create` and `close_handle` alone are listed too;
- the same three (and the bare round trip) again in each CPU placement, pinned for the
  duration of their own runs only: client and servers on one CPU ("same CPU"), and on
  different CPUs ("split CPUs"); each against the bare round trip measured in that
  placement, with the same targets;
- embedded `create(4096)` + `close_handle`: target median <= 0.35 x the shared_memory
  create+close+unlink median (a ratio, not microseconds: both sides move with the machine);
- CPU time per round trip (client thread + server process, from schedstat), no target: what
  the round trip costs in code and syscalls, apart from waiting for the other side to wake.

On a small VM the wall-clock figures depend on where the scheduler puts client and server:
on one CPU a wake-up is a context switch; on two, it is a cross-CPU wake-up (an IPI,
expensive under virtualisation). The first rows pin nothing (the CPU rows say where client
and server ran after each run); the placement rows show each case on its own.
`--placement same|split` pins everything, for the whole run, to one case instead (and then
lists no placement rows).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import socket
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from multiprocessing import shared_memory
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness as H  # noqa: E402
import ugem  # noqa: E402
from ugem.testing.daemon import run_daemon  # noqa: E402

BENCH = "roundtrip"
HEADER = struct.Struct("<IHBBIi")
DEFAULTS = dict(runs=5, n=2000, warmup=300, quick_runs=3, quick_n=300, quick_warmup=50)
SHM = "shared_memory create+close+unlink"  # the embedded create+close_handle baseline's label


# -- the bare baseline ---------------------------------------------------------------------


@dataclasses.dataclass
class EchoServer:
    path: str
    pid: int


@contextlib.contextmanager
def echo_server(directory: str) -> Iterator[EchoServer]:
    path = os.path.join(directory, "echo.sock")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_echo_server.py")
    proc = subprocess.Popen([sys.executable, script, path], stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() != b"ready":
            raise RuntimeError(f"echo server did not start: {line!r}")
        yield EchoServer(path, proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


class BareClient:
    """Blocking request/response over a Unix stream socket: 16+8 bytes out, 16+8 bytes back."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.connect(path)
        self.seq = 0
        self.reply = bytearray(HEADER.size + 8)
        self.view = memoryview(self.reply)
        self.payload = b"\x01" * 8

    def roundtrip(self) -> None:
        self.seq = (self.seq + 1) & 0xFFFFFFFF
        self.sock.sendall(HEADER.pack(8, 3, 0, 0, self.seq, 0) + self.payload)
        got = 0
        view = self.view
        while got < len(view):
            n = self.sock.recv_into(view[got:])
            if n == 0:
                raise ConnectionError("echo server went away")
            got += n
        if HEADER.unpack_from(self.reply)[4] != self.seq:
            raise RuntimeError("echo reply out of sequence")

    def close(self) -> None:
        self.view.release()
        self.sock.close()


# -- runners -------------------------------------------------------------------------------


def each(label: str, op: Any) -> H.Runner:
    return lambda n: {label: H.time_each(op, n)}


def create_close(prefix: str, dev: ugem.Device) -> H.Runner:
    def run(n: int) -> dict[str, list[int]]:
        c = H.clock
        create, close, pair = [0] * n, [0] * n, [0] * n
        dev_create, dev_close = dev.create, dev.close_handle
        for i in range(n):
            t0 = c()
            h = dev_create(4096)
            t1 = c()
            dev_close(h)
            t2 = c()
            create[i], close[i], pair[i] = t1 - t0, t2 - t1, t2 - t0
        return {f"{prefix} create": create, f"{prefix} close_handle": close, f"{prefix} create+close": pair}
    return run


def shm_lifecycle(label: str) -> H.Runner:
    """The embedded create+close_handle baseline: a 4 KiB shared_memory segment created, closed
    and unlinked, each timed on its own."""
    def life() -> None:
        seg = shared_memory.SharedMemory(create=True, size=4096)
        seg.close()
        seg.unlink()
    return each(label, life)


# -- CPU time per round trip (independent of how fast idle CPUs wake up) ----------------------


def _schedstat_ns(path: str) -> int:
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def process_cpu_ns(pid: int) -> int:
    """CPU time (ns) of every thread of `pid`, from /proc/<pid>/task/*/schedstat."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for tid in tasks:
        total += _schedstat_ns(f"/proc/{pid}/task/{tid}/schedstat")
    return total


def last_cpu(path: str) -> int:
    """The CPU a task last ran on (field 39 of /proc/.../stat), -1 if unknown."""
    try:
        with open(path) as f:
            return int(f.read().rsplit(")", 1)[1].split()[36])
    except (OSError, ValueError, IndexError):
        return -1


class CpuMeter:
    """Wraps runners: adds up this thread's and a server process's CPU time over their runs,
    and notes after each run whether client and server last ran on the same CPU."""

    def __init__(self) -> None:
        self.totals: dict[str, list[int]] = {}  # label -> [client ns, server ns, ops]
        self.placement: dict[str, list[str]] = {}  # label -> "same"/"split" per run

    def wrap(self, label: str, runner: H.Runner, server_pid: int | None) -> H.Runner:
        def run(n: int) -> dict[str, list[int]]:
            c0 = _schedstat_ns("/proc/thread-self/schedstat")
            s0 = process_cpu_ns(server_pid) if server_pid else 0
            out = runner(n)
            c1 = _schedstat_ns("/proc/thread-self/schedstat")
            s1 = process_cpu_ns(server_pid) if server_pid else 0
            t = self.totals.setdefault(label, [0, 0, 0])
            t[0] += c1 - c0
            t[1] += s1 - s0
            t[2] += n
            if server_pid:
                mine, theirs = last_cpu("/proc/thread-self/stat"), last_cpu(f"/proc/{server_pid}/stat")
                self.placement.setdefault(label, []).append("same" if mine == theirs else "split")
            return out
        return run

    def row(self, label: str, figure: str, mode: str, base: str | None = None, ops_per_sample: int = 1
            ) -> H.Row:
        client, server, ops = self.totals.get(label, [0, 0, 0])
        per = (client + server) / max(1, ops) / ops_per_sample / 1e3
        row = H.Row(BENCH, figure, mode, "us CPU", per, float("nan"), ops)
        placed = self.placement.get(label, [])
        each = max(1, ops) * ops_per_sample * 1e3
        row.ratio_note = (f"client {client / each:.2f} + server {server / each:.2f} us; "
                          f"client and server on the same CPU after {placed.count('same')} of {len(placed)} runs")
        if base is not None:
            bc, bs, bops = self.totals.get(base, [0, 0, 0])
            base_per = (bc + bs) / max(1, bops) / 1e3
            if base_per > 0:
                row.baseline = "bare CPU"
                row.ratio = per / base_per
        return row


PLACEMENTS = ("any", "same", "split")


PLACED = {"same": "same CPU", "split": "split CPUs"}  # placement -> what its rows are called


def place(placement: str, me: int, servers: list[int]) -> None:
    """Pin this thread and the servers (`--placement`, or one placement row's runs)."""
    if placement == "any":
        return
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2 and placement == "split":
        raise SystemExit("--placement split needs 2 CPUs")
    os.sched_setaffinity(me, {cpus[0]})
    for pid in servers:
        os.sched_setaffinity(pid, {cpus[0]} if placement == "same" else {cpus[1]})


def pinned(placement: str, runner: H.Runner, servers: list[int], cpus: set[int]) -> H.Runner:
    """`runner` with this thread and the servers pinned to `placement` for its own runs
    (then back on `cpus`); its labels get the placement's name."""
    def run(n: int) -> dict[str, list[int]]:
        place(placement, 0, servers)
        try:
            out = runner(n)
        finally:
            for pid in (0, *servers):
                os.sched_setaffinity(pid, cpus)
        return {f"{label}, {PLACED[placement]}": samples for label, samples in out.items()}
    return run


def run(opts: H.Options) -> H.Report:
    placement = getattr(opts.extra, "placement", "any") or "any"
    params: dict[str, object] = {"runs": opts.runs, "n": opts.n, "warmup": opts.warmup}
    if placement != "any":
        params["placement"] = placement
    report = H.Report(BENCH, "control round trips", params)
    series, cpu, has_busy = _measure(opts, placement)
    _report_rows(report, series, cpu, has_busy)
    return report


def _measure(opts: H.Options, placement: str) -> tuple[H.Results, CpuMeter, bool]:
    """The interleaved rounds: bare, daemon and embedded round trips; (series, CPU meter,
    whether the Device has busy())."""
    original_affinity = os.sched_getaffinity(0)
    with contextlib.ExitStack() as stack:
        directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="ugem-bench-"))
        echo = stack.enter_context(echo_server(directory))
        daemon = stack.enter_context(run_daemon())
        bare = BareClient(echo.path)
        stack.callback(bare.close)
        dev = daemon.connect()
        stack.callback(dev.close)
        emb = ugem.embedded()
        stack.callback(emb.close)
        stack.callback(os.sched_setaffinity, 0, original_affinity)
        place(placement, 0, [echo.pid, daemon.pid])

        h_d = dev.create(4096)
        h_e = emb.create(4096)
        runners: dict[str, H.Runner] = {
            "bare": each("bare round trip", bare.roundtrip),
            "daemon info": each("daemon info", lambda: dev.info(h_d)),
            "daemon create/close": create_close("daemon", dev),
            "embedded create/close": create_close("embedded", emb),
            "shared_memory": shm_lifecycle(SHM),
            "embedded info": each("embedded info", lambda: emb.info(h_e)),
        }
        has_busy = hasattr(dev, "busy")
        if has_busy:
            runners["daemon busy"] = each("daemon busy", lambda: dev.busy(h_d))
        if placement == "any" and len(original_affinity) >= 2:  # each placement's rows, pinned for their runs
            servers = [echo.pid, daemon.pid]
            for where in PLACED:
                for name in ("bare", "daemon info", "daemon create/close", "daemon busy"):
                    if name in runners:
                        runners[f"{name}, {PLACED[where]}"] = pinned(where, runners[name], servers,
                                                                     original_affinity)
        cpu = CpuMeter()
        echo_pid = echo.pid
        for name, label, pid in (("bare", "bare", echo_pid), ("daemon info", "info", daemon.pid),
                                 ("daemon create/close", "create/close", daemon.pid)):
            for suffix in ("", *(f", {where}" for where in PLACED.values())):
                if name + suffix in runners:
                    runners[name + suffix] = cpu.wrap(label + suffix, runners[name + suffix], pid)
        series = H.interleaved(runners, runs=opts.runs, n=opts.n, warmup=opts.warmup)
    return series, cpu, has_busy


TARGET = 1.3  # daemon round trip / bare round trip (issue 15)
EMBEDDED_TARGET = 0.35  # embedded create+close_handle / shared_memory create+close+unlink (issue 15)


def _report_rows(report: H.Report, series: H.Results, cpu: CpuMeter, has_busy: bool) -> None:
    rows = report.rows
    _daemon_rows(rows, series, has_busy, "")
    shm = series[SHM]
    rows.append(H.Row.latency(BENCH, SHM + " (4 KiB)", "baseline", shm))
    rows.append(H.Row.latency(BENCH, "create+close_handle", "embedded", series["embedded create+close"],
                              baseline=shm, target=H.Target("<=", EMBEDDED_TARGET)))
    rows.append(H.Row.latency(BENCH, "  create", "embedded", series["embedded create"]))
    rows.append(H.Row.latency(BENCH, "  close_handle", "embedded", series["embedded close_handle"]))
    rows.append(H.Row.latency(BENCH, "info(h)", "embedded", series["embedded info"]))
    placed = [f", {where}" for where in PLACED.values() if f"bare round trip, {where}" in series]
    for suffix in placed:
        _daemon_rows(rows, series, has_busy, suffix)
    for suffix in ("", *placed):
        rows.append(cpu.row("bare" + suffix, "CPU per bare round trip" + suffix, "baseline"))
        rows.append(cpu.row("info" + suffix, "CPU per info(h)" + suffix, "daemon", base="bare" + suffix))
        rows.append(cpu.row("create/close" + suffix, "CPU per create or close" + suffix, "daemon",
                            base="bare" + suffix, ops_per_sample=2))
    if not has_busy:
        report.notes.append("Device has no busy(); the control round trip is measured with info(h)")
    report.notes.append("ratio = median / median of the bare round trip measured in the same run and placement "
                        "(daemon create+close_handle: / 2 bare round trips); embedded create+close_handle: / median "
                        f"of the {SHM} of a 4 KiB segment, in the same rounds")
    if placed:
        report.notes.append("rows ending 'same CPU' / 'split CPUs': client and servers pinned to one CPU / to "
                            "different CPUs during those rows' runs only; the other rows pin nothing")
    for r in rows:
        if r.unit == "us CPU":
            report.notes.append(f"{r.figure} ({r.mode}): {r.ratio_note}")
    report.notes.append("us CPU = client thread + server process CPU time per round trip (schedstat), "
                        "wall-clock aside: the part of the round trip Python code and syscalls cost; the rest of "
                        "the wall-clock figure is waiting for the other side to be woken and scheduled")


def _daemon_rows(rows: list[H.Row], series: H.Results, has_busy: bool, suffix: str) -> None:
    """The bare round trip and the daemon's, unpinned (suffix "") or in one placement."""
    bare_s = series["bare round trip" + suffix]
    ratio = H.Target("<=", TARGET)
    rows.append(H.Row.latency(BENCH, "bare round trip (16+8 B)" + suffix, "baseline", bare_s))
    rows.append(H.Row.latency(BENCH, "info(h)" + suffix, "daemon", series["daemon info" + suffix], baseline=bare_s,
                              target=ratio))
    if has_busy:
        rows.append(H.Row.latency(BENCH, "busy(h)" + suffix, "daemon", series["daemon busy" + suffix],
                                  baseline=bare_s, target=ratio))
    rows.append(H.Row.latency(BENCH, "create+close_handle" + suffix, "daemon", series["daemon create+close" + suffix],
                              baseline=bare_s, baseline_scale=2.0,
                              target=H.Target("<=", TARGET, text=f"ratio <= {TARGET:g} (vs 2 round trips)")))
    rows.append(H.Row.latency(BENCH, "  create" + suffix, "daemon", series["daemon create" + suffix],
                              baseline=bare_s))
    rows.append(H.Row.latency(BENCH, "  close_handle" + suffix, "daemon", series["daemon close_handle" + suffix],
                              baseline=bare_s))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    H.add_common(parser)
    parser.add_argument("--placement", choices=PLACEMENTS, default="any",
                        help="pin client and servers to the same CPU or to different CPUs for the whole run "
                             "(default any: nothing pinned, and each placement's rows pinned for their own runs)")
    opts = H.options(parser.parse_args(argv), **DEFAULTS)
    return H.emit([H.monitored(run, opts)], opts)


if __name__ == "__main__":
    sys.exit(main())
