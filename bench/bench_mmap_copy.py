"""numpy copies through ugem mappings vs np.copyto between two plain memfd mappings.

    python bench/bench_mmap_copy.py [--quick] [--runs N] [--size MIB] [--json [PATH]]

Baseline, measured in the same run: two memfds mapped with Python's `mmap.mmap` (MAP_SHARED)
and viewed with `np.frombuffer`. Under test: two ugem objects mapped with `Device.mmap`, in
embedded and daemon mode. Each sample is one `np.copyto(dst, src)` of the whole size.

- warm: both mappings already populated (pages allocated and faulted in): target within 5 %
  (ugem median time <= 1.05 x baseline median time, i.e. GB/s ratio >= 0.952);
- cold (no target): a fresh destination each sample (a new object + mmap, or a new memfd +
  mmap, made outside the timing), so the copy also takes the page faults.
"""

from __future__ import annotations

import argparse
import contextlib
import mmap
import os
import sys
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import _harness as H  # noqa: E402
import ugem  # noqa: E402
from ugem.testing.daemon import run_daemon  # noqa: E402

BENCH = "mmap_copy"
DEFAULTS = dict(runs=20, n=5, warmup=3, quick_runs=5, quick_n=3, quick_warmup=1)
WITHIN = 1 / 1.05


class PlainMapping:
    """A memfd mapped with mmap.mmap, as a uint8 array; close() releases all of it."""

    def __init__(self, size: int) -> None:
        self.fd = os.memfd_create("bench", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self.mm = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self.fd)
            raise
        self.array: np.ndarray | None = np.frombuffer(self.mm, dtype=np.uint8)

    def close(self, _: Any = None) -> None:
        self.array = None
        if self.mm is not None:
            self.mm.close()
            self.mm = None  # type: ignore[assignment]
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class UgemMapping:
    """A ugem object mapped with Device.mmap, as a uint8 array; close() drops array and handle."""

    def __init__(self, dev: ugem.Device, size: int) -> None:
        self.dev = dev
        self.handle = dev.create(size)
        try:
            self.array: np.ndarray | None = np.frombuffer(dev.mmap(self.handle), dtype=np.uint8)
        except BaseException:
            dev.close_handle(self.handle)
            raise

    def close(self, _: Any = None) -> None:
        self.array = None  # last view gone: the mapping is unmapped and reported released
        if self.handle:
            self.dev.close_handle(self.handle)
            self.handle = 0


def _copy_runner(label: str, get: Callable[[], tuple[np.ndarray, np.ndarray]]) -> dict[str, H.Runner]:
    def run(n: int) -> dict[str, list[int]]:
        dst, src = get()
        c = H.clock
        samples = []
        for _ in range(n):
            t0 = c()
            np.copyto(dst, src)
            samples.append(c() - t0)
        return {label: samples}
    return {label: run}


def _cold_runner(label: str, source: Any, fresh: Callable[[], Any]) -> dict[str, H.Runner]:
    def run(n: int) -> dict[str, list[int]]:
        src = source.array
        c = H.clock
        samples = []
        for _ in range(n):
            m = fresh()
            try:
                dst = m.array
                t0 = c()
                np.copyto(dst, src)
                samples.append(c() - t0)
                del dst
            finally:
                m.close()
        return {label: samples}
    return {label: run}


def run(opts: H.Options, size_mib: int = 64) -> H.Report:
    size = size_mib * H.MiB
    report = H.Report(BENCH, f"np.copyto through mappings, {size_mib} MiB",
                      {"runs": opts.runs, "n": opts.n, "size": f"{size_mib} MiB", "warmup": opts.warmup})
    pattern = np.arange(size, dtype=np.uint64).astype(np.uint8)
    with contextlib.ExitStack() as stack:
        maps: dict[str, tuple[Any, Any]] = {}
        a, b = PlainMapping(size), PlainMapping(size)
        stack.callback(b.close)
        stack.callback(a.close)
        maps["memfd"] = (a, b)
        emb = ugem.embedded()
        stack.callback(emb.close)
        daemon = stack.enter_context(run_daemon())
        dev = daemon.connect()
        stack.callback(dev.close)
        for mode, d in (("embedded", emb), ("daemon", dev)):
            x = UgemMapping(d, size)
            stack.callback(x.close)
            y = UgemMapping(d, size)
            stack.callback(y.close)
            maps[mode] = (x, y)
        for src_m, dst_m in maps.values():
            src_m.array[:] = pattern  # populated and faulted in
            dst_m.array[:] = 0
        warm: dict[str, H.Runner] = {}
        for mode, (src_m, dst_m) in maps.items():
            warm |= _copy_runner(f"{mode} warm", lambda s=src_m, d=dst_m: (d.array, s.array))
        cold: dict[str, H.Runner] = {}
        cold |= _cold_runner("memfd cold", maps["memfd"][0], lambda: PlainMapping(size))
        cold |= _cold_runner("embedded cold", maps["embedded"][0], lambda: UgemMapping(emb, size))
        cold |= _cold_runner("daemon cold", maps["daemon"][0], lambda: UgemMapping(dev, size))
        # warm and cold in separate phases: page allocation and freeing in the cold runs
        # would otherwise disturb the warm copies that follow them
        series = H.interleaved(warm, runs=opts.runs, n=opts.n, warmup=opts.warmup,
                               nbytes={label: size for label in warm})
        series.update(H.interleaved(cold, runs=opts.runs, n=1, warmup=opts.warmup,
                                    nbytes={label: size for label in cold}))
        for mode, (_src_m, dst_m) in maps.items():  # the copies really went through
            if not np.array_equal(dst_m.array[:4096], pattern[:4096]):
                report.notes.append(f"WARNING: {mode} destination does not hold the copied data")
    target = H.Target(">=", WITHIN, text="ratio >= 0.952 (time <= 1.05 x)")
    for kind in ("warm", "cold"):
        base = series[f"memfd {kind}"]
        report.rows.append(H.Row.throughput(BENCH, f"np.copyto {kind}", "memfd mmap.mmap (baseline)", base))
        for mode in ("embedded", "daemon"):
            report.rows.append(H.Row.throughput(BENCH, f"np.copyto {kind}", mode, series[f"{mode} {kind}"],
                                                baseline=base, target=target if kind == "warm" else None))
    report.notes.append("ratio = median GB/s / median GB/s of the memfd-mapping baseline in the same run "
                        "(GB/s counts the bytes copied, not read+written)")
    report.notes.append("cold = fresh destination mapping each sample (page faults included); info only")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    H.add_common(parser)
    parser.add_argument("--size", type=int, default=64, help="copy size in MiB (default 64)")
    ns = parser.parse_args(argv)
    opts = H.options(ns, **DEFAULTS)
    return H.emit([H.monitored(lambda o: run(o, ns.size), opts)], opts)


if __name__ == "__main__":
    sys.exit(main())
