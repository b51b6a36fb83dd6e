"""Where spill, restore and purge spend their time (diagnostics for bench_memory.py).

    python bench/profile_memory.py [--rounds N] [--spill-root DIR]

Runs bench_memory's spill/restore and purge cycles (64 MiB objects, 256 MiB budget) against a
daemon whose memory functions are wrapped with timers at start-up, in the daemon process only
(src/ is untouched; `--serve` below is that daemon). Client and daemon stamp events with the
same clock (CLOCK_MONOTONIC), so each client request (from sending it to the daemon's XFER
reply) is broken down into the daemon's pieces inside it:

  dispatch (raises Pending)  ->  queue (submit -> worker starts)  ->  copy (Job.run)  ->
  wake-up (worker done -> loop applies)  ->  finish (Memory.finish: close memfd / punch)  ->
  dispatch again (create memfd, open a description)  ->  rest (round trip, reply, client)

Also printed: the raw copies measured alone in this process on the same files (copy_segments
as ugem does it, and alternatives: sendfile, a bounce buffer, fadvise WILLNEED first), and
fresh-page allocation speed (memfd fallocate), since on a VM whose free memory is handed
back to the host (virtio-balloon free page reporting) first touches are slow and vary.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import mmap
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

clock = time.perf_counter_ns  # CLOCK_MONOTONIC on Linux: comparable across processes
MiB = 1 << 20


# -- the instrumented daemon (runs in its own process) ---------------------------------------

EVENTS: list[tuple[str, int, int, str]] = []  # (name, start, end, detail)


def _wrap(owner: Any, attr: str, name: str, detail: Callable[..., str] | None = None) -> None:
    fn = getattr(owner, attr, None)
    if fn is None:
        print(f"profile_memory: {owner.__name__}.{attr} not found, not timed", file=sys.stderr)
        return

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = clock()
        try:
            return fn(*args, **kwargs)
        finally:
            EVENTS.append((name, t0, clock(), detail(*args) if detail else ""))
    setattr(owner, attr, wrapper)


def install() -> None:
    from ugem.backing import memfd
    from ugem.core import jobs, memory
    from ugem.daemon import connection, server, workers

    original_run = connection.Connection._run

    @functools.wraps(original_run)
    def run(self: Any, frame: Any, call: Any) -> Any:
        t0 = clock()
        try:
            return original_run(self, frame, call)
        finally:
            EVENTS.append(("dispatch", t0, clock(), call.desc.op.name + (" (pending)" if self.parked else "")))
    connection.Connection._run = run
    _wrap(jobs.Job, "run", "copy", lambda job: job.kind.value)
    _wrap(workers.JobRunner, "submit", "submit", lambda runner, job: job.kind.value)
    _wrap(workers.JobRunner, "_work", "work", lambda runner, job: job.kind.value)
    _wrap(server.Server, "_jobs_done", "jobs_done")
    _wrap(memory.Memory, "finish", "finish", lambda mem, job: job.kind.value)
    _wrap(memory.Memory, "make_room", "make_room")
    _wrap(memory.Memory, "purge", "purge")
    _wrap(memfd.MemfdStore, "create", "memfd create")
    _wrap(memfd.MemfdStore, "release", "memfd close")
    _wrap(memfd.MemfdStore, "purge", "purge punch (memfd)")
    _wrap(memfd.MemfdStore, "spill_release", "spill punch (spill file)")
    _wrap(memfd.MemfdStore, "spill_out", "spill_out")
    _wrap(memfd.MemfdStore, "spill_in", "spill_in")
    _wrap(memfd.MemfdStore, "open_description", "open_description")


def serve_main(argv: list[str]) -> int:
    events_path = argv.pop(0)
    install()
    from ugem.cli import main as ugem_main

    try:
        return ugem_main(argv)
    finally:
        with open(events_path, "w") as f:
            json.dump(EVENTS, f)


@contextlib.contextmanager
def instrumented_daemon(directory: str, events_path: str, budget: int) -> Iterator[str]:
    path = os.path.join(directory, "ugem.sock")
    cmd = [sys.executable, os.path.abspath(__file__), "--serve", events_path, "serve", "--socket", path,
           "--spill-dir", os.path.join(directory, "spill"), "--system-budget", str(budget), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith(b"ugem: listening on"):
            raise RuntimeError(f"instrumented daemon did not start: {line!r}")
        yield path
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


# -- the client side --------------------------------------------------------------------------


class StampedCycles:
    """bench_memory.Cycles, with every timed client request recorded as (label, t0, t_reply)."""

    def __init__(self, dev: Any, spill_dir: str) -> None:
        import bench_memory as B

        self.B = B
        self.marks = B.ReplyMarks()
        self.marks.install()
        self.cycles = B.Cycles(dev, spill_dir, self.marks)
        self.requests: list[tuple[str, int, int]] = []
        original = self.cycles.dev
        outer = self

        class Recorder:
            """Wraps the Device: pwrite/pread_into record (label, t0, t_reply)."""

            label = ""

            def __getattr__(self, name: str) -> Any:
                return getattr(original, name)

            def pwrite(self, h: int, off: int, data: Any) -> None:
                t0 = clock()
                original.pwrite(h, off, data)
                outer.requests.append((self.label or "pwrite", t0, outer.marks.t or 0))

            def pread_into(self, h: int, off: int, buf: Any) -> int:
                t0 = clock()
                n = original.pread_into(h, off, buf)
                outer.requests.append((self.label or "pread_into", t0, outer.marks.t or 0))
                return int(n)
        self.recorder = Recorder()
        self.cycles.dev = self.recorder

    def close(self) -> None:
        self.marks.uninstall()


def run_cycles(dev: Any, spill_dir: str, rounds: int) -> list[tuple[str, int, int]]:
    import bench_memory as B

    sc = StampedCycles(dev, spill_dir)
    c, rec = sc.cycles, sc.recorder
    try:
        for _ in range(rounds):
            # spill + restore, labelled group by group (same steps as Cycles.ugem_spill_restore)
            handles = []
            rec.label = "pwrite, no pressure"
            for _ in range(B.FILL):
                h = dev.create(B.OBJ)
                rec.pwrite(h, 0, c.src_view)
                sc.marks.t = None
                handles.append(h)
            rec.label = "spill (pwrite until reply)"
            for _ in range(B.PRESSED):
                h = dev.create(B.OBJ)
                rec.pwrite(h, 0, c.src_view)
                sc.marks.t = None
                handles.append(h)
            spilled = handles[:B.PRESSED]
            for h in handles[B.PRESSED:]:
                dev.close_handle(h)
            path = B.spill_file(spill_dir)
            for label, group in (("warm", spilled[:B.WARM]), ("cold", spilled[B.WARM:])):
                if label == "cold":
                    B.drop_cache(path)
                rec.label = f"restore {label} (pread_into until reply)"
                for h in group:
                    rec.pread_into(h, 0, c.out_view)
                    sc.marks.t = None
                    dev.close_handle(h)
            # purge
            handles = []
            rec.label = "pwrite, no pressure"
            for _ in range(B.FILL):
                h = dev.create(B.OBJ)
                rec.pwrite(h, 0, c.src_view)
                sc.marks.t = None
                dev.madvise(h, 1)
                handles.append(h)
            rec.label = "purge (pwrite until reply)"
            for _ in range(B.PRESSED):
                h = dev.create(B.OBJ)
                rec.pwrite(h, 0, c.src_view)
                sc.marks.t = None
                dev.madvise(h, 1)
                handles.append(h)
            for h in handles:
                dev.close_handle(h)
    finally:
        sc.close()
    return sc.requests


def breakdown(requests: list[tuple[str, int, int]], events: list[list[Any]]) -> None:
    """Per request label: median ms of each daemon piece inside the request."""
    events.sort(key=lambda e: e[1])
    pieces: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for label, t0, t1 in requests:
        if not t1:
            continue
        inside = [e for e in events if e[1] >= t0 and e[2] <= t1]
        acc: dict[str, float] = defaultdict(float)
        for name, s, e, detail in inside:
            acc[f"{name}{(' ' + detail) if detail else ''}"] += (e - s) / 1e6
        # derived gaps: submit -> copy start (queue), copy end -> jobs_done start (wake-up)
        subs = [e for e in inside if e[0] == "submit"]
        copies = [e for e in inside if e[0] == "copy"]
        dones = [e for e in inside if e[0] == "jobs_done"]
        if subs and copies:
            acc["gap: submit -> copy starts"] = (copies[0][1] - subs[0][2]) / 1e6
        if copies and dones:
            after = [d for d in dones if d[1] >= copies[-1][2]]
            if after:
                acc["gap: copy ends -> loop applies it"] = (after[0][1] - copies[-1][2]) / 1e6
        disp = [e for e in inside if e[0] == "dispatch"]
        if disp:
            acc["gap: last dispatch ends -> client has reply"] = (t1 - disp[-1][2]) / 1e6
            acc["gap: client sends -> first dispatch starts"] = (disp[0][1] - t0) / 1e6
        acc["TOTAL until reply"] = (t1 - t0) / 1e6
        for k, v in acc.items():
            pieces[label][k].append(v)
    for label, table in pieces.items():
        n = len(table["TOTAL until reply"])
        total = statistics.median(table["TOTAL until reply"])
        print(f"\n-- {label}: {n} requests, median {total:.1f} ms until reply "
              f"({64 * MiB / total / 1e6:.2f} GB/s for 64 MiB)")
        order = sorted(table, key=lambda k: (k == "TOTAL until reply", k.startswith("gap"), k))
        for k in order:
            v = table[k]
            print(f"   {k:48s} median {statistics.median(v):8.2f} ms   (in {len(v)}/{n} requests; "
                  f"min {min(v):.2f}, max {max(v):.2f})")


# -- raw copies in this process ----------------------------------------------------------------


def raw_copies(directory: str, runs: int) -> None:
    import numpy as np

    from ugem.backing.spill import copy_segments

    S, CH = 64 * MiB, 8 * MiB
    src = (np.arange(S // 8, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(1)).view(np.uint8)
    user = np.ones(S, dtype=np.uint8)
    bounce = np.ones(CH, dtype=np.uint8)

    def memfd(fill: bool = False) -> int:
        fd = os.memfd_create("p", os.MFD_CLOEXEC)
        os.ftruncate(fd, S)
        if fill:
            os.pwrite(fd, src, 0)
        return fd

    path = os.path.join(directory, "rawcopy")

    def newfile() -> int:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)

    def dropfile(fd: int) -> None:
        os.close(fd)
        os.unlink(path)

    def sendfile_all(out: int, inp: int, off: int) -> None:
        os.lseek(out, 0, os.SEEK_SET)
        done = 0
        while done < S:
            done += os.sendfile(out, inp, off + done, S - done)

    def bounce_copy(inp: int, out: int) -> None:
        v = memoryview(bounce)
        for o in range(0, S, CH):
            os.pwrite(out, v[:os.preadv(inp, [v], o)], o)

    def cold(fd: int) -> None:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def willneed_copy(inp: int, out: int) -> None:
        os.posix_fadvise(inp, 0, S, os.POSIX_FADV_WILLNEED)
        copy_segments(inp, out, 0, 0, S)

    def madv_seq_copy(inp: int, out: int) -> None:
        with mmap.mmap(inp, S, prot=mmap.PROT_READ) as m, memoryview(m) as v:
            m.madvise(mmap.MADV_SEQUENTIAL)
            for o in range(0, S, CH):
                with v[o:o + CH] as c:
                    os.pwrite(out, c, o)

    def two_threads(inp: int, out: int) -> None:
        half = S // 2
        other = os.open(f"/proc/self/fd/{out}", os.O_RDWR | os.O_CLOEXEC)  # sendfile uses the file position
        try:
            t = threading.Thread(target=copy_segments, args=(inp, other, half, half, half))
            t.start()
            copy_segments(inp, out, 0, 0, half)
            t.join()
        finally:
            os.close(other)

    def file_read(fd: int) -> None:
        v = memoryview(user)
        for o in range(0, S, CH):
            os.preadv(fd, [v[o:o + CH]], o)

    results: dict[str, list[float]] = defaultdict(list)

    def timed(name: str, fn: Callable[[], None]) -> None:
        t0 = time.perf_counter()
        fn()
        results[name].append(time.perf_counter() - t0)

    def prewarm() -> None:
        """Write and delete a 128 MiB file: the page cache allocated next is just-freed memory."""
        scratch = path + ".scratch"
        fd = os.open(scratch, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        for o in range(0, 2 * S, CH):
            os.pwrite(fd, memoryview(src)[:CH], o)
        os.close(fd)
        os.unlink(scratch)

    def map_populate_copy(inp: int, out: int) -> None:
        flags = mmap.MAP_SHARED | mmap.MAP_POPULATE
        with mmap.mmap(inp, S, flags=flags, prot=mmap.PROT_READ) as m, memoryview(m) as v:
            done = 0
            while done < S:
                done += os.pwrite(out, v[done:], done)

    def anon_write(out: int) -> None:
        for o in range(0, S, CH):
            os.pwrite(out, memoryview(src)[o:o + CH], o)

    def once() -> None:
        m = memfd(fill=True)
        spills: dict[str, Callable[[int], None]] = {
            "spill: copy_segments (ugem: sendfile per segment)": lambda f: copy_segments(m, f, 0, 0, S),
            "spill: mmap MAP_POPULATE + pwrite": lambda f: map_populate_copy(m, f),
            "spill: sendfile(file, memfd)": lambda f: sendfile_all(f, m, 0),
            "spill: bounce 8 MiB preadv+pwrite": lambda f: bounce_copy(m, f),
            "BASE file pwrite 8 MiB from anon buffer": anon_write,
        }
        for name, how in spills.items():
            prewarm()
            f = newfile()
            timed(name + " [prewarmed page cache]", functools.partial(how, f))
            dropfile(f)
        os.close(m)
        f = newfile()
        os.pwrite(f, src, 0)
        restores: dict[str, Callable[[int], None]] = {
            "restore: copy_segments (ugem: sendfile per segment)": lambda d: copy_segments(f, d, 0, 0, S),
            "restore: mmap MAP_POPULATE + pwrite": lambda d: map_populate_copy(f, d),
            "restore: sendfile(memfd, file)": lambda d: sendfile_all(d, f, 0),
            "restore: bounce 8 MiB": lambda d: bounce_copy(f, d),
            "restore: fadvise WILLNEED + copy_segments": lambda d: willneed_copy(f, d),
            "restore: mmap MADV_SEQUENTIAL + pwrite": lambda d: madv_seq_copy(f, d),
            "restore: copy_segments in 2 threads": lambda d: two_threads(f, d),
        }
        for state in ("warm", "cold"):
            for name, how in restores.items():
                if state == "cold":
                    cold(f)
                dst = memfd()
                timed(f"{name} [{state}]", functools.partial(how, dst))
                os.close(dst)
            if state == "cold":
                cold(f)
            timed(f"BASE file read 8 MiB preadv [{state}]", lambda: file_read(f))
            # the client's copy after a restore: memfd -> user buffer
            full = memfd(fill=True)
            timed(f"client copy: preadv memfd -> user [{state}]",
                  functools.partial(os.preadv, full, [memoryview(user)], 0))
            os.close(full)
        dropfile(f)
        fresh = memfd()
        timed("fresh pages: memfd fallocate 64 MiB", lambda: os.posix_fallocate(fresh, 0, S))
        os.close(fresh)
        fresh = memfd()
        timed("fresh pages: memfd pwrite 64 MiB", lambda: os.pwrite(fresh, src, 0))
        os.close(fresh)

    for _ in range(runs):
        once()
    print(f"\n-- raw copies of 64 MiB in this process ({runs} runs; median GB/s, best GB/s)")
    for name, v in results.items():
        print(f"   {name:60s} {S / statistics.median(v) / 1e9:6.2f}  {S / min(v) / 1e9:6.2f}")


def perf_spill(spill_root: str | None, rounds: int) -> None:
    """`perf record -g` of a plain daemon during prewarmed spill steps; prints the hot paths."""
    import shutil as _shutil

    import _harness as H
    import bench_memory as B
    from ugem.testing.daemon import run_daemon

    if _shutil.which("perf") is None:
        print("\n-- perf: not installed, skipped")
        return
    with tempfile.TemporaryDirectory(prefix="ugem-profile-perf-", dir=spill_root) as d:
        spill_dir = os.path.join(d, "spill")
        data = os.path.join(d, "perf.data")
        with run_daemon(system_budget=str(B.BUDGET), spill_dir=spill_dir) as daemon:
            dev = daemon.connect()
            marks = B.ReplyMarks()
            marks.install()
            try:
                cycles = B.Cycles(dev, spill_dir, marks)
                cycles.spill_prewarmed(1)  # warm-up
                perf = subprocess.Popen(["perf", "record", "-q", "-g", "-p", str(daemon.pid), "-o", data])
                time.sleep(0.5)
                got = cycles.spill_prewarmed(rounds)
                perf.terminate()
                perf.wait()
            finally:
                marks.uninstall()
                dev.close()
        for key, v in got.items():
            print(f"\n-- perf: {key}: median {B.OBJ / H.percentile(v, 50):.2f} GB/s over {len(v)} steps")
        report = subprocess.run(["perf", "report", "-i", data, "--children", "--stdio", "-g", "none",
                                 "--percent-limit", "2"], capture_output=True, text=True).stdout
        print("-- perf: daemon, inclusive time (children), >= 2 %:")
        for line in report.splitlines():
            if line.strip() and not line.startswith("#"):
                print("   " + line.rstrip()[:150])


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        return serve_main(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--spill-root", default=None)
    parser.add_argument("--raw-runs", type=int, default=5)
    parser.add_argument("--perf", action="store_true",
                        help="also perf-record a plain daemon during prewarmed spill steps")
    ns = parser.parse_args()
    import _harness as H
    import ugem

    load = H.foreign_load(0.5)
    print(f"other load before: {load:.2f} CPUs")
    with tempfile.TemporaryDirectory(prefix="ugem-profile-memory-", dir=ns.spill_root) as d:
        events_path = os.path.join(d, "events.json")
        with instrumented_daemon(d, events_path, 256 * MiB) as path:
            dev = ugem.connect(path)
            run_cycles(dev, os.path.join(d, "spill"), 1)  # warm-up
            requests = run_cycles(dev, os.path.join(d, "spill"), ns.rounds)
            dev.close()
        with open(events_path) as f:
            events = json.load(f)
        breakdown(requests, events)
        raw_copies(d, ns.raw_runs)
    if ns.perf:
        perf_spill(ns.spill_root, 2)
    print(f"\nother load after: {H.foreign_load(0.5):.2f} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
