"""The device (execbuffer, VRAM placement, device commands, suspend): VRAM eviction,
suspend, and command submission rates, embedded and through the daemon.

    python bench/bench_device.py [--quick] [--runs N] [--warmup N] [--json [PATH]] [--wait-idle S]

Every manager here has `vram=1G`, `system_budget=8G` (nothing spills: 1 GiB in VRAM plus at most
2 GiB of system pages per manager) and `hang_timeout=60`. One embedded Manager and one daemon
live for the whole run; each round runs every figure once per mode plus the baselines, in
rotating order (bench/_harness.py `interleaved`), after `--warmup` rounds that also touch
device memory for the first time (the simulated VRAM is an anonymous shared mapping: its
first use pays page faults, later rounds reuse those pages). GB/s = 10**9 bytes/s; 1 GiB =
16 objects of 64 MiB.

1. eviction. Untimed: 16 x 64 MiB objects (A) are created and each is written whole by the
   device (execbuffer of one Fill of the whole object, then a wait): VRAM holds 1 GiB, all of
   it dirty (the device wrote it and the objects never had system pages). Then 16 more
   objects (B) are created. Timed: one execbuffer per B object (a 4 KiB Fill at offset 0,
   which makes the whole B object resident), each of which must evict the least recently
   used A object; then wait_fence on the last fence, then a 1-byte pread of the last byte of
   every A object (the evicted data has landed in system memory and is right). So the timed
   interval holds, on the one device timeline: 16 copies out of 64 MiB of VRAM into new
   system pages (1 GiB: the bytes counted in GB/s), the 16 move-ins of the B objects, the 16
   small Fills, and 16 + 17 requests. Two variants of B:
   - fresh: the B objects were never written, so a move-in is a device-side clear of its
     64 MiB of VRAM (memset, no data copied in);
   - with data: each B object was written with pwrite (64 MiB, untimed) before the timed part,
     so each move-in copies 64 MiB from its system pages into VRAM: 2 GiB copied in all,
     GB/s still counts the 1 GiB evicted.
   The "submit" row is the part until the 16th execbuffer returned (eviction is queued on the
   device timeline, never waited for by execbuffer). Each round checks `stats()`:
   evicted_total must grow by 16, and every A object reads back its fill byte (3 bytes each
   after the timed part).
2. suspend: 16 x 64 MiB objects written whole by the device (untimed, as in 1); timed:
   `suspend()`, which returns once every VRAM object is saved to system memory (1 GiB of
   copies out into new pages). Then, untimed: resume, check 3 bytes of every object and all
   64 MiB of one object (a different one each round), and one execbuffer on the resumed device.
3. command rates: 10,000 execbuffers of one 4 KiB Fill each on one 4 KiB object, then a wait
   for the last fence (sample = the whole run, so submissions/s = commands/s); and 100
   execbuffers of 100 such Fills each (10,000 commands). The same 10,000 single-Fill
   execbuffers again while another client of the same manager holds 10,000 idle, never
   populated objects (the request path is expected not to depend on how many objects exist).
   Per-call latency of the single-Fill execbuffer is listed too. References in the same
   rounds: 10,000 `busy(h)` calls (the control round trip of that mode: the floor for any
   request), and the work itself (10,000 numpy fills of 4 KiB in this process).
4. latency while evicting (the target: one client moving 1 GiB, eviction included, must not stall
   others; target p99 <= 10 ms): client B (another client of the same manager, in a thread of
   this process) loops on busy(h) and a 4 KiB pread of a small object of its own while client A
   runs the eviction of 1 (fresh variant, untimed setup as in 1). B's latencies during A's
   eviction are pooled over the rounds; the same loop in the 0.5 s before A starts is the
   reference. In embedded mode B shares this process (and its GIL) with A and the device.

Targets: 1. and 2. (both variants of eviction, and suspend, in each mode) at least 0.5 of
memcpy's GB/s (issue 15); 3. single-Fill execbuffers through the daemon at least 30,000
submissions/s (issue 15); 4. p99 <= 10 ms. The other rows are informational.

Baselines (same rounds): memcpy = np.copyto between two warm (pre-faulted) 64 MiB buffers,
16 times (1 GiB); a copy into *new* pages = 16 x (memfd_create + ftruncate + mmap + np.copyto
64 MiB), a mapped copy into fresh pages; and os.pwrite of 64 MiB into a new memfd (new pages
allocated by the write path, no page faults), which is what an eviction's copy out does when
the evicted object gets a new memfd (the device writes it with pwritev, for objects of 1 MiB or
more). A memfd freed by an object of the same uid and size is recycled instead when the
manager's pool holds one (zeroed, its pages there, and the manager's mapping of it with its
page tables filled: the device copies through that mapping); the notes give, per round, how
many of the 16 evicted objects (and, with data, the 16 B objects) got a recycled memfd: the
warm-up round finds the pool empty, later rounds find the memfds the previous round freed.
In embedded mode the device ops of the eviction and suspend rounds are timed on the device
thread (`ugem.gpu.sim.run_op` is wrapped in this process while those rounds run; src/ is
untouched) and listed in the notes.
"""

from __future__ import annotations

import collections
import contextlib
import mmap
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import _harness as H  # noqa: E402
import ugem  # noqa: E402
import ugem.gpu.sim as _sim  # noqa: E402
from ugem import parts  # noqa: E402
from ugem.cmd import Fill  # noqa: E402
from ugem.gpu.base import CopyIn, CopyOut  # noqa: E402
from ugem.testing.daemon import run_daemon  # noqa: E402

BENCH = "device"
DEFAULTS = dict(runs=5, n=1, warmup=1, quick_runs=2, quick_n=1, quick_warmup=1)
MiB = H.MiB
OBJ = 64 * MiB
COUNT = 16  # 16 x 64 MiB = 1 GiB = all of VRAM
TOTAL = OBJ * COUNT
SMALL = 4096
SINGLES = 10_000  # execbuffers of one Fill
BATCHES, PER_BATCH = 100, 100  # execbuffers of 100 Fills
CROWD = 10_000  # idle objects held by another client
LATENCY_IDLE = 0.5  # seconds of client B on an idle manager before each eviction episode
LATENCY_MS = 10.0  # target: one client moving 1 GiB (eviction) leaves others' small requests p99 <= 10 ms
HALF_MEMCPY = H.Target(">=", 0.5)  # issue 15: eviction of dirty VRAM and suspend() at >= 50 % of memcpy
SUBMISSIONS = H.Target(">=", 30_000, on="median")  # issue 15: single-Fill execbuffers through the daemon, per second
CONFIG = dict(vram="1G", system_budget="8G", hang_timeout=60)
MODES = ("embedded", "daemon")


# -- device-op timing on the device thread (embedded only) ---------------------------------


class DeviceOpTimer:
    """Wraps `ugem.gpu.sim.run_op` (looked up by the worker at every op) while active;
    accumulates seconds and bytes per kind of op."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.count: dict[str, int] = collections.defaultdict(int)
        self.bytes: dict[str, int] = collections.defaultdict(int)
        self.rounds: dict[str, list[dict[str, float]]] = collections.defaultdict(list)

    @contextlib.contextmanager
    def active(self, label: str) -> Iterator[None]:
        original = _sim.run_op
        seconds, count, nbytes = self.seconds, self.count, self.bytes
        seconds.clear()
        count.clear()
        nbytes.clear()

        def run_op(memory: Any, op: Any, **kwargs: Any) -> None:
            t0 = time.perf_counter()
            try:
                original(memory, op, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                if isinstance(op, CopyOut):
                    kind, size = "copy out", op.length
                elif isinstance(op, CopyIn):
                    kind, size = ("clear" if op.host is None else "copy in"), op.length
                else:
                    kind, size = "execute", 0
                seconds[kind] += dt
                count[kind] += 1
                nbytes[kind] += size

        _sim.run_op = run_op
        try:
            yield
        finally:
            _sim.run_op = original
            self.rounds[label].append({k: seconds[k] for k in seconds} | {f"{k} bytes": nbytes[k] for k in nbytes})

    def describe(self, label: str) -> str:
        rounds = self.rounds.get(label, [])[1:] or self.rounds.get(label, [])  # warm-up left out if possible
        if not rounds:
            return "no rounds"
        kinds = sorted({k for r in rounds for k in r if not k.endswith(" bytes")})
        parts = []
        for k in kinds:
            secs = [r.get(k, 0.0) for r in rounds]
            nb = [r.get(f"{k} bytes", 0) for r in rounds]
            med = H.percentile(secs, 50)
            rate = f" ({H.percentile([b / s / 1e9 for b, s in zip(nb, secs, strict=True) if s], 50):.2f} GB/s)" \
                if any(nb) else ""
            parts.append(f"{k} {med * 1e3:.0f} ms{rate}")
        return ", ".join(parts) + f" (median of {len(rounds)} rounds)"


# -- helpers --------------------------------------------------------------------------------


def fill_byte(round_no: int, i: int) -> int:
    return (round_no * 17 + i * 7) % 251 + 1  # never 0: a lost copy out reads as zeros


def fill_vram(dev: ugem.Device, round_no: int, vacate: tuple[int, ...] = ()) -> list[int]:
    """16 x 64 MiB objects written whole by the device; returns their handles (untimed).
    `vacate`: small objects of this client that the command figures left in VRAM are moved
    out first (set_domain CPU), else one of them would split VRAM and cost a 64 MiB eviction."""
    for h in vacate:
        dev.set_domain(h, ugem.DOMAIN_CPU)
    if dev.stats()["vram_bytes"]:
        raise AssertionError(f"VRAM not empty before filling: {dev.stats()['vram_bytes']} bytes")
    handles = [dev.create(OBJ) for _ in range(COUNT)]
    fence = 0
    for i, h in enumerate(handles):
        fence = dev.execbuffer([Fill(dst=h, offset=0, length=OBJ, byte=fill_byte(round_no, i))])
    dev.wait_fence(fence, -1)
    vram = dev.stats()["vram_bytes"]
    if vram != TOTAL:
        raise AssertionError(f"VRAM holds {vram} bytes after filling, expected {TOTAL}")
    return handles


def check_objects(dev: ugem.Device, handles: list[int], round_no: int, whole: int | None = None) -> None:
    for i, h in enumerate(handles):
        want = fill_byte(round_no, i)
        got = [dev.pread(h, off, 1)[0] for off in (0, OBJ // 2 + 12345, OBJ - 1)]
        if got != [want] * 3:
            raise AssertionError(f"object {i} (handle {h}) reads {got}, expected {want}")
    if whole is not None:
        buf = np.empty(OBJ, dtype=np.uint8)
        dev.pread_into(handles[whole], 0, buf)
        bad = int(np.count_nonzero(buf != fill_byte(round_no, whole)))
        if bad:
            raise AssertionError(f"object {whole}: {bad} of {OBJ} bytes wrong after resume")


def close_all(dev: ugem.Device, handles: list[int]) -> None:
    for h in handles:
        dev.close_handle(h)
    handles.clear()


def pattern(size: int) -> np.ndarray:
    a = (np.arange(size // 8, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(1)).view(np.uint8)
    return a


# -- ugem runners ---------------------------------------------------------------------------


class ModeRunners:
    """The figures of one mode (a Manager's clients, or daemon connections)."""

    def __init__(self, mode: str, dev: ugem.Device, open_client: Callable[[], ugem.Device],
                 timer: DeviceOpTimer | None, data: np.ndarray) -> None:
        self.mode = mode
        self.dev = dev
        self.open_client = open_client
        self.timer = timer
        self.data = data
        self.round = {"evict": 0, "suspend": 0, "cmds": 0}
        self.facts: dict[str, list[Any]] = collections.defaultdict(list)
        self.small = dev.create(SMALL)
        self.other: ugem.Device | None = None  # client B of the latency figure
        self.other_small = 0

    def _timed_device(self, label: str) -> contextlib.AbstractContextManager[None]:
        return self.timer.active(label) if self.timer is not None else contextlib.nullcontext()

    # 1. eviction
    def evict(self, n: int) -> dict[str, list[int]]:
        out: dict[str, list[int]] = collections.defaultdict(list)
        for _ in range(n):
            for variant in ("fresh", "with data"):
                total, submit = self._evict_once(variant)
                out[f"{self.mode} evict {variant}"].append(total)
                out[f"{self.mode} evict {variant}, submit"].append(submit)
        return out

    def _evict_once(self, variant: str) -> tuple[int, int]:
        dev, r = self.dev, self.round["evict"]
        self.round["evict"] += 1
        a = fill_vram(dev, r, (self.small,))
        b = [dev.create(OBJ) for _ in range(COUNT)]
        before_all = dev.stats()
        try:
            if variant == "with data":
                for h in b:
                    dev.pwrite(h, 0, self.data)
            before = dev.stats()
            c = H.clock
            with self._timed_device(f"evict {variant}"):
                t0 = c()
                fence = 0
                for i, h in enumerate(b):
                    fence = dev.execbuffer([Fill(dst=h, offset=0, length=SMALL, byte=200 + i % 50)])
                t1 = c()
                dev.wait_fence(fence, -1)
                for i, h in enumerate(a):
                    if dev.pread(h, OBJ - 1, 1)[0] != fill_byte(r, i):
                        raise AssertionError(f"evicted object {i} lost its data")
                t2 = c()
            after = dev.stats()
            evicted = after["evicted_total"] - before["evicted_total"]
            moved = after["bytes_moved_total"] - before["bytes_moved_total"]
            if evicted != COUNT:
                raise AssertionError(f"{evicted} objects evicted, expected {COUNT}")
            recycled = after["recycled_total"] - before_all["recycled_total"]
            self.facts[f"evict {variant}: evicted objects / MiB moved / recycled memfds"].append(
                f"{evicted}/{moved // MiB}/{recycled}")
            check_objects(dev, a, r)
            return t2 - t0, t1 - t0
        finally:
            close_all(dev, a)
            close_all(dev, b)

    # 2. suspend
    def suspend(self, n: int) -> dict[str, list[int]]:
        samples = []
        for _ in range(n):
            dev, r = self.dev, self.round["suspend"]
            self.round["suspend"] += 1
            objs = fill_vram(dev, r, (self.small,))
            try:
                before = dev.stats()
                with self._timed_device("suspend"):
                    t0 = H.clock()
                    dev.suspend()
                    samples.append(H.clock() - t0)
                after = dev.stats()
                dev.resume()
                if after["vram_bytes"] != 0:
                    raise AssertionError(f"{after['vram_bytes']} bytes still in VRAM after suspend")
                self.facts["suspend: evicted objects / MiB moved / spilled objects / recycled memfds"].append(
                    f"{after['evicted_total'] - before['evicted_total']}/"
                    f"{(after['bytes_moved_total'] - before['bytes_moved_total']) // MiB}/"
                    f"{after['spilled_total'] - before['spilled_total']}/"
                    f"{after['recycled_total'] - before['recycled_total']}")
                check_objects(dev, objs, r, whole=r % COUNT)
                dev.wait_fence(dev.execbuffer([Fill(dst=self.small, offset=0, length=SMALL, byte=1)]), -1)
            finally:
                close_all(dev, objs)
        return {f"{self.mode} suspend": samples}

    # 3. command rates
    def commands(self, n: int) -> dict[str, list[int]]:
        out: dict[str, list[int]] = collections.defaultdict(list)
        dev, h, c = self.dev, self.small, H.clock
        batch = [Fill(dst=h, offset=0, length=SMALL, byte=j % 256) for j in range(PER_BATCH)]
        for _ in range(n):
            r = self.round["cmds"]
            self.round["cmds"] += 1
            # single Fills, per-call latencies kept
            calls = [0] * SINGLES
            t0 = c()
            fence = 0
            for i in range(SINGLES):
                ti = c()
                fence = dev.execbuffer([Fill(dst=h, offset=0, length=SMALL, byte=(r + i) % 256)])
                calls[i] = c() - ti
            t1 = c()
            dev.wait_fence(fence, -1)
            t2 = c()
            out[f"{self.mode} single"].append(t2 - t0)
            out[f"{self.mode} single, per call"].extend(calls)
            self.facts["single: wait after the last submission (ms)"].append(round((t2 - t1) / 1e6, 2))
            if dev.pread(h, 0, 1)[0] != (r + SINGLES - 1) % 256:
                raise AssertionError("the last Fill did not land")
            # batched
            t0 = c()
            for _ in range(BATCHES):
                fence = dev.execbuffer(batch)
            t1 = c()
            dev.wait_fence(fence, -1)
            t2 = c()
            out[f"{self.mode} batched"].append(t2 - t0)
            self.facts["batched: wait after the last submission (ms)"].append(round((t2 - t1) / 1e6, 2))
            # control round trip reference
            t0 = c()
            for _ in range(SINGLES):
                dev.busy(h)
            out[f"{self.mode} busy"].append(c() - t0)
        return out

    def crowded(self, n: int) -> dict[str, list[int]]:
        """Single-Fill execbuffers while another client holds CROWD idle objects."""
        out: list[int] = []
        dev, h, c = self.dev, self.small, H.clock
        for _ in range(n):
            other = self.open_client()
            try:
                for _ in range(CROWD):
                    other.create(SMALL)
                t0 = c()
                fence = 0
                for i in range(SINGLES):
                    fence = dev.execbuffer([Fill(dst=h, offset=0, length=SMALL, byte=i % 256)])
                dev.wait_fence(fence, -1)
                out.append(c() - t0)
            finally:
                other.close()
        return {f"{self.mode} single, crowded": out}

    # 4. another client's latency while this one evicts 1 GiB
    def latency(self, n: int) -> dict[str, list[int]]:
        out: dict[str, list[int]] = collections.defaultdict(list)
        if self.other is None:
            self.other = self.open_client()
            self.other_small = self.other.create(SMALL)
            self.other.pwrite(self.other_small, 0, b"\x01" * SMALL)
        other, hb, dev = self.other, self.other_small, self.dev
        for _ in range(n):
            r = self.round["evict"]
            self.round["evict"] += 1
            a = fill_vram(dev, r, (self.small,))
            b = [dev.create(OBJ) for _ in range(COUNT)]
            stop = threading.Event()
            record: list[tuple[int, int, int]] = []

            def loop(stop: threading.Event = stop, record: list[tuple[int, int, int]] = record) -> None:
                c = H.clock
                while not stop.is_set():
                    t0 = c()
                    other.busy(hb)
                    t1 = c()
                    other.pread(hb, 0, SMALL)
                    record.append((t0, t1 - t0, c() - t1))

            thread = threading.Thread(target=loop, name="client-B")
            try:
                thread.start()
                time.sleep(LATENCY_IDLE)
                t0 = H.clock()
                fence = 0
                for i, h in enumerate(b):
                    fence = dev.execbuffer([Fill(dst=h, offset=0, length=SMALL, byte=200 + i % 50)])
                dev.wait_fence(fence, -1)
                for i, h in enumerate(a):
                    if dev.pread(h, OBJ - 1, 1)[0] != fill_byte(r, i):
                        raise AssertionError(f"evicted object {i} lost its data")
                t1 = H.clock()
            finally:
                stop.set()
                thread.join()
                close_all(dev, a)
                close_all(dev, b)
            for start, busy_ns, pread_ns in record:
                when = "idle" if start < t0 else ("during eviction" if start < t1 else None)
                if when:
                    out[f"{self.mode} B busy, {when}"].append(busy_ns)
                    out[f"{self.mode} B pread, {when}"].append(pread_ns)
            self.facts["latency episode: eviction seconds / B pairs during it"].append(
                f"{(t1 - t0) / 1e9:.2f}/{sum(1 for x in record if t0 <= x[0] < t1)}")
        return out

    def runners(self) -> dict[str, H.Runner]:
        return {f"{self.mode} evict": self.evict, f"{self.mode} suspend": self.suspend,
                f"{self.mode} commands": self.commands, f"{self.mode} crowded": self.crowded,
                f"{self.mode} latency": self.latency}


# -- baselines ------------------------------------------------------------------------------


def baseline_runners(src: np.ndarray) -> dict[str, H.Runner]:
    dst = np.empty_like(src)
    np.copyto(dst, src)  # pre-faulted: warm
    view = memoryview(src)

    def memcpy(n: int) -> dict[str, list[int]]:
        samples = []
        for _ in range(n):
            t0 = H.clock()
            for _ in range(COUNT):
                np.copyto(dst, src)
            samples.append(H.clock() - t0)
        return {"memcpy": samples}

    def new_pages(n: int) -> dict[str, list[int]]:
        """What an eviction's copy out does: a new memfd, mapped, written through the mapping."""
        copy, write = [], []
        for _ in range(n):
            keep: list[Any] = []
            t0 = H.clock()
            for _ in range(COUNT):
                fd = os.memfd_create("bench-device", os.MFD_CLOEXEC)
                os.ftruncate(fd, OBJ)
                m = mmap.mmap(fd, OBJ)
                os.close(fd)
                np.copyto(np.frombuffer(m, dtype=np.uint8), src)
                keep.append(m)
            copy.append(H.clock() - t0)
            for m in keep:
                m.close()
            keep.clear()
            t0 = H.clock()
            for _ in range(COUNT):
                fd = os.memfd_create("bench-device", os.MFD_CLOEXEC)
                os.ftruncate(fd, OBJ)
                done = 0
                while done < OBJ:
                    done += os.pwrite(fd, view[done:], done)
                keep.append(fd)
            write.append(H.clock() - t0)
            for fd in keep:
                os.close(fd)
        return {"new pages copy": copy, "new pages pwrite": write}

    def fills(n: int) -> dict[str, list[int]]:
        target = np.zeros(SMALL, dtype=np.uint8)
        samples = []
        for _ in range(n):
            t0 = H.clock()
            for i in range(SINGLES):
                target[0:SMALL].fill(i % 256)
            samples.append(H.clock() - t0)
        return {"numpy fill": samples}

    return {"memcpy": memcpy, "new pages": new_pages, "numpy fill": fills}


# -- report ---------------------------------------------------------------------------------


def rate_row(figure: str, mode: str, s: H.Series, ops: int, unit: str, *, baseline: H.Series | None = None,
             baseline_ops: int | None = None, ratio_note: str = "", in_summary: bool = False,
             target: H.Target | None = None) -> H.Row:
    """A rate (operations/s, higher is better); p99 column = rate of the slowest-1% sample."""
    row = H.Row.rate(BENCH, figure, mode, s, ops, unit, baseline=baseline, baseline_ops=baseline_ops,
                     ratio_note=ratio_note, target=target)
    row.headline = in_summary
    return row


def run(opts: H.Options) -> H.Report:
    report = H.Report(BENCH, "device: VRAM eviction, suspend, command rates",
                      {"runs": opts.runs, "warmup": opts.warmup, "vram": CONFIG["vram"],
                       "system_budget": CONFIG["system_budget"], "objects": f"{COUNT} x {OBJ // MiB} MiB"})
    timer = DeviceOpTimer()
    series, modes, end_stats = _measure(opts, timer)
    _copy_rows(report.rows, series)
    _rate_rows(report.rows, series)
    _latency_rows(report, series)
    _notes(report.notes, timer, modes, end_stats)
    return report


def _measure(opts: H.Options, timer: DeviceOpTimer) -> tuple[H.Results, dict[str, ModeRunners],
                                                              dict[str, dict[str, Any]]]:
    """The interleaved rounds of both modes and the baselines; (series, the modes' runners,
    each mode's stats() at the end)."""
    workdir = tempfile.mkdtemp(prefix="ugem-bench-device-")
    data = pattern(OBJ)  # pre-faulted source of the pwrites and of the baselines
    modes: dict[str, ModeRunners] = {}
    try:
        with contextlib.ExitStack() as stack:
            manager = ugem.Manager(spill_dir=os.path.join(workdir, "spill"), **CONFIG)
            stack.callback(manager.close)
            emb = manager.open()
            modes["embedded"] = ModeRunners("embedded", emb, manager.open, timer, data)
            daemon = stack.enter_context(run_daemon(spill_dir=os.path.join(workdir, "daemon-spill"), **CONFIG))
            dev = daemon.connect()
            stack.callback(dev.close)
            modes["daemon"] = ModeRunners("daemon", dev, daemon.connect, None, data)
            runners = baseline_runners(data)
            for m in modes.values():
                runners.update(m.runners())
            nbytes = {"memcpy": TOTAL, "new pages copy": TOTAL, "new pages pwrite": TOTAL}
            for mode in MODES:
                for label in ("evict fresh", "evict with data", "suspend"):
                    nbytes[f"{mode} {label}"] = TOTAL
            series = H.interleaved(runners, runs=opts.runs, n=1, warmup=opts.warmup, nbytes=nbytes)
            end_stats = {mode: m.dev.stats() for mode, m in modes.items()}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return series, modes, end_stats


def _copy_rows(rows: list[H.Row], series: H.Results) -> None:
    """The baselines, 1. eviction and 2. suspend."""
    memcpy, new_copy, new_write = series["memcpy"], series["new pages copy"], series["new pages pwrite"]
    rows.append(H.Row.throughput(BENCH, "memcpy: np.copyto 16 x 64 MiB, warm buffers", "baseline", memcpy))
    rows.append(H.Row.throughput(BENCH, "copy into new pages: 16 x (memfd + mmap + np.copyto 64 MiB)", "baseline",
                                 new_copy, baseline=memcpy))
    rows.append(H.Row.throughput(BENCH, "os.pwrite 64 MiB into a new memfd, x 16 (diagnostic)", "baseline",
                                 new_write, baseline=memcpy))
    # 1. eviction
    for variant, what in (("fresh", "new objects fresh"), ("with data", "new objects with data")):
        for mode in MODES:
            s = series[f"{mode} evict {variant}"]
            rows.append(H.Row.throughput(BENCH, f"evict 1 GiB dirty VRAM, {what}", mode, s, baseline=memcpy,
                                         target=HALF_MEMCPY))
            rows.append(H.Row.throughput(BENCH, "  same, vs copy into new pages", mode, s, baseline=new_copy))
            sub = series[f"{mode} evict {variant}, submit"]
            rows.append(H.Row.latency(BENCH, "  16 execbuffers returned (submit part)", mode, sub))
    # 2. suspend
    for mode in MODES:
        s = series[f"{mode} suspend"]
        rows.append(H.Row.throughput(BENCH, "suspend() with 1 GiB dirty VRAM", mode, s, baseline=memcpy,
                                     target=HALF_MEMCPY))
        rows.append(H.Row.throughput(BENCH, "  same, vs copy into new pages", mode, s, baseline=new_copy))


def _rate_rows(rows: list[H.Row], series: H.Results) -> None:
    """3. command rates."""
    fills = series["numpy fill"]
    rows.append(rate_row("numpy fill 4 KiB in this process (the work itself)", "baseline", fills, SINGLES, "cmd/s"))
    for mode in MODES:
        busy = series[f"{mode} busy"]
        rows.append(rate_row("busy(h) round trips (reference)", mode, busy, SINGLES, "req/s"))
        single = series[f"{mode} single"]
        rows.append(rate_row("execbuffer 1 x Fill 4 KiB, 10,000 + wait", mode, single, SINGLES, "subm/s",
                             baseline=busy, in_summary=mode != "daemon",
                             target=SUBMISSIONS if mode == "daemon" else None))
        rows.append(H.Row.latency(BENCH, "  execbuffer call, 1 Fill", mode, series[f"{mode} single, per call"]))
        rows.append(rate_row("  same, 10,000 idle objects in another client", mode, series[f"{mode} single, crowded"],
                             SINGLES, "subm/s", baseline=single))
        batched = series[f"{mode} batched"]
        rows.append(rate_row("execbuffer 100 x Fill 4 KiB, 100 + wait", mode, batched, BATCHES, "subm/s"))
        rows.append(rate_row("execbuffer 100 x Fill 4 KiB, in commands/s", mode, batched, BATCHES * PER_BATCH, "cmd/s",
                             baseline=single, in_summary=True))


def _latency_rows(report: H.Report, series: H.Results) -> None:
    """4. another client's latency while one evicts, and the tails in the notes."""
    rows = report.rows
    for mode in MODES:
        for req in ("busy", "pread"):
            what = "busy(h)" if req == "busy" else "pread 4 KiB"
            idle = series[f"{mode} B {req}, idle"]
            rows.append(H.Row.latency(BENCH, f"client B {what}, idle", mode, idle))
            rows.append(H.Row.latency(BENCH, f"client B {what}, while A evicts 1 GiB", mode,
                                      series[f"{mode} B {req}, during eviction"], baseline=idle,
                                      target=H.Target("<=", LATENCY_MS * 1e3, on="p99",
                                                      text=f"p99 <= {LATENCY_MS:g} ms")))
    for mode in MODES:
        calls = series[f"{mode} single, per call"].samples
        if calls:
            report.notes.append(f"{mode} execbuffer call (1 Fill): mean {sum(calls) / len(calls) / 1e3:.1f} us, "
                                f"p99.9 {H.percentile(calls, 99.9) / 1e3:.1f} us, max {max(calls) / 1e3:.1f} us, "
                                f"{sum(1 for x in calls if x > 1e6)} of {len(calls)} over 1 ms")
        for req in ("busy", "pread"):
            v = series[f"{mode} B {req}, during eviction"].samples
            if v:
                report.notes.append(f"{mode} client B {req} during eviction: n={len(v)}, max {max(v) / 1e6:.1f} ms, "
                                    f"{sum(1 for x in v if x > LATENCY_MS * 1e6)} over {LATENCY_MS:g} ms")


def _notes(notes: list[str], timer: DeviceOpTimer, modes: dict[str, ModeRunners],
           end_stats: dict[str, dict[str, Any]]) -> None:
    notes.append(
        "evict timed interval = 16 execbuffers (each queues: copy out of one 64 MiB A object into new system "
        "pages, the move-in of one B object, a 4 KiB Fill) + wait_fence(last) + 1-byte pread of each A object; "
        "fresh: move-in = device-side clear of 64 MiB (memset); with data: move-in = 64 MiB copy from the "
        "object's system pages (B pwritten untimed before), so 2 GiB cross the device timeline. "
        "GB/s = 1 GiB evicted / interval")
    notes.append("suspend timed interval = the suspend() call: waits for device work, then 16 copies out of "
                 "64 MiB into new system pages; GB/s = 1 GiB / interval")
    notes.append("ratio for evict/suspend = GB/s / baseline GB/s (same rounds); command rates: ratio of "
                 "'execbuffer 1 x Fill' = its rate / busy() rate; 'crowded' and 'commands/s' rows = their "
                 "rate / the single-Fill rate; p99 column of a rate or GB/s row = the slowest-1% sample")
    notes.append("memcpy baseline copies between the same two warm buffers: no page is allocated; an "
                 "eviction writes into new pages (a new memfd per evicted object, written with pwritev) "
                 "unless it gets a recycled memfd (pages there, copied through the manager's mapping), so "
                 "the 'new pages' baselines (pwrite into a new memfd above all) are the like-for-like ones "
                 "for a cold pool")
    notes.append(f"the device moves each data range of {parts.SPLIT_MIN // MiB} MiB or more in parts on "
                 f"{parts.COPY_THREADS} copy thread(s) at once (ugem/parts.py); the memcpy baseline is "
                 "one np.copyto on one thread")
    for label in ("evict fresh", "evict with data", "suspend"):
        notes.append(f"embedded device thread, {label}, per round: {timer.describe(label)}")
    for mode, m in modes.items():
        for key, values in m.facts.items():
            notes.append(f"{mode} {key}, per round (warm-up first): {', '.join(str(v) for v in values)}")
        st = end_stats[mode]
        notes.append(f"{mode} stats at the end: evicted_total {st['evicted_total']}, spilled_total "
                     f"{st['spilled_total']}, bytes_moved_total {st['bytes_moved_total'] / MiB:.0f} MiB, "
                     f"vram_bytes {st['vram_bytes']}, resident_bytes {st['resident_bytes']}")


def main(argv: list[str] | None = None) -> int:
    opts = H.parse_args(__doc__.splitlines()[0], argv, **DEFAULTS)
    return H.emit([H.monitored(run, opts)], opts)


if __name__ == "__main__":
    sys.exit(main())
