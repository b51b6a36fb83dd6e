"""Bulk data: 64 MiB pread_into/pwrite vs os.preadv/os.pwrite on a plain memfd.

    python bench/bench_bulk.py [--quick] [--runs N] [--size MIB] [--json [PATH]]

Baseline, measured in the same run: a plain memfd (`os.memfd_create` + `ftruncate`) and the
same 64 MiB user buffer (pre-faulted). Each sample is one whole 64 MiB transfer; `--runs`
samples per figure, rounds interleaved with the baseline. GB/s = 10**9 bytes/s.

- warm pwrite / pread_into: the object's pages already exist (written once before);
- cold pwrite: the first write into a fresh object (create + pwrite) vs the first write into
  a fresh memfd (memfd_create + ftruncate + pwrite); closing happens outside the timing;
- cold pread_into (no target): reading a never-written object (zeros: not
  populated) vs preadv of a fresh, never-written memfd.

Targets: ugem/baseline >= 0.85 embedded, >= 0.70 through the daemon.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import _harness as H  # noqa: E402
import ugem  # noqa: E402
from ugem.testing.daemon import run_daemon  # noqa: E402

BENCH = "bulk"
DEFAULTS = dict(runs=7, n=1, warmup=1, quick_runs=3, quick_n=1, quick_warmup=1)
TARGETS = {"embedded": 0.85, "daemon": 0.70}


def _full_pwrite(fd: int, buf: memoryview, offset: int = 0) -> None:
    done = 0
    while done < len(buf):
        done += os.pwrite(fd, buf[done:], offset + done)


def _full_preadv(fd: int, buf: memoryview, offset: int = 0) -> None:
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n <= 0:
            raise OSError("short read")
        done += n


def memfd(size: int) -> int:
    fd = os.memfd_create("bench", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _one(label: str, op: Callable[[], None], *, setup: Callable[[], Any] | None = None,
         teardown: Callable[[Any], None] | None = None) -> dict[str, H.Runner]:
    """A runner timing `op` once per sample; `setup`/`teardown` run untimed around it, and
    `op` then receives what `setup` returned."""
    def run(n: int) -> dict[str, list[int]]:
        c = H.clock
        samples = []
        for _ in range(n):
            state = setup() if setup is not None else None
            try:
                t0 = c()
                op(state) if setup is not None else op()  # type: ignore[call-arg]
                samples.append(c() - t0)
            finally:
                if teardown is not None:
                    teardown(state)
        return {label: samples}
    return {label: run}


def baseline_runners(size: int, buf: memoryview, stack: contextlib.ExitStack) -> dict[str, H.Runner]:
    warm_fd = memfd(size)
    stack.callback(os.close, warm_fd)
    _full_pwrite(warm_fd, buf)
    cold_fds: list[int] = []

    def cold_write() -> None:
        fd = os.memfd_create("bench", os.MFD_CLOEXEC)
        cold_fds.append(fd)
        os.ftruncate(fd, size)
        _full_pwrite(fd, buf)

    def close_cold(_: Any = None) -> None:
        while cold_fds:
            os.close(cold_fds.pop())

    stack.callback(close_cold)
    runners: dict[str, H.Runner] = {}
    runners |= _one("memfd pwrite warm", lambda: _full_pwrite(warm_fd, buf))
    runners |= _one("memfd preadv warm", lambda: _full_preadv(warm_fd, buf))
    runners |= _one("memfd pwrite cold", lambda _: cold_write(), setup=lambda: None, teardown=close_cold)
    runners |= _one("memfd preadv cold", lambda fd: _full_preadv(fd, buf), setup=lambda: memfd(size),
                    teardown=os.close)
    return runners


def ugem_runners(mode: str, dev: ugem.Device, size: int, buf: memoryview) -> dict[str, H.Runner]:
    h = dev.create(size)
    dev.pwrite(h, 0, buf)  # pages exist from here on
    fresh: list[int] = []

    def cold_write() -> None:
        fresh.append(dev.create(size))
        dev.pwrite(fresh[-1], 0, buf)

    def close_fresh(_: Any = None) -> None:
        while fresh:
            dev.close_handle(fresh.pop())

    def chunked_read() -> None:
        for off in range(0, size, H.MiB):
            dev.pread_into(h, off, buf[off:off + H.MiB])

    runners: dict[str, H.Runner] = {}
    runners |= _one(f"{mode} pwrite warm", lambda: dev.pwrite(h, 0, buf))
    runners |= _one(f"{mode} pread_into warm", lambda: dev.pread_into(h, 0, buf))
    runners |= _one(f"{mode} pwrite cold", lambda _: cold_write(), setup=lambda: None, teardown=close_fresh)
    runners |= _one(f"{mode} pread_into cold", lambda fh: dev.pread_into(fh, 0, buf), setup=lambda: dev.create(size),
                    teardown=dev.close_handle)
    runners |= _one(f"{mode} pread_into warm, 1 MiB calls", chunked_read)
    return runners


def run(opts: H.Options, size_mib: int = 64) -> H.Report:
    size = size_mib * H.MiB
    report = H.Report(BENCH, f"bulk {size_mib} MiB pread_into/pwrite",
                      {"runs": opts.runs, "size": f"{size_mib} MiB", "warmup": opts.warmup})
    array = np.empty(size, dtype=np.uint8)
    array[:] = np.arange(size, dtype=np.uint64).astype(np.uint8)  # pre-faulted, non-zero
    buf = memoryview(array).cast("B")
    labels = ["pwrite warm", "pread_into warm", "pwrite cold", "pread_into cold"]
    base_of = {"pwrite warm": "memfd pwrite warm", "pread_into warm": "memfd preadv warm",
               "pwrite cold": "memfd pwrite cold", "pread_into cold": "memfd preadv cold"}
    with contextlib.ExitStack() as stack:
        runners = baseline_runners(size, buf, stack)
        emb = ugem.embedded()
        stack.callback(emb.close)
        runners.update(ugem_runners("embedded", emb, size, buf))
        daemon = stack.enter_context(run_daemon())
        dev = daemon.connect()
        stack.callback(dev.close)
        runners.update(ugem_runners("daemon", dev, size, buf))
        nbytes = {label: size for label in runners}
        series = H.interleaved(runners, runs=opts.runs, n=1, warmup=opts.warmup, nbytes=nbytes)
    buf.release()

    for label in labels:
        base = series[base_of[label]]
        report.rows.append(H.Row.throughput(BENCH, base_of[label].replace("memfd ", "os.") + " (memfd)", "baseline",
                                            base))
        for mode in ("embedded", "daemon"):
            target = H.Target(">=", TARGETS[mode]) if label != "pread_into cold" else None
            report.rows.append(H.Row.throughput(BENCH, label, mode, series[f"{mode} {label}"], baseline=base,
                                                target=target))
        if label == "pread_into warm":
            for mode in ("embedded", "daemon"):
                report.rows.append(H.Row.throughput(BENCH, "pread_into warm, 1 MiB calls", mode,
                                                    series[f"{mode} pread_into warm, 1 MiB calls"], baseline=base))
    report.notes.append("ratio = median GB/s / median GB/s of the memfd baseline in the same run; "
                        f"p99 column = GB/s of the slowest-1% sample (with {opts.runs} samples: about the slowest)")
    report.notes.append("cold pwrite includes create (memfd_create+ftruncate for the baseline); "
                        "cold pread_into reads a never-written object (info only, no target); "
                        f"'1 MiB calls' = the same {size_mib} MiB read as {size_mib} pread_into calls (info only)")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    H.add_common(parser)
    parser.add_argument("--size", type=int, default=64, help="transfer size in MiB (default 64)")
    ns = parser.parse_args(argv)
    opts = H.options(ns, **DEFAULTS)
    return H.emit([H.monitored(lambda o: run(o, ns.size), opts)], opts)


if __name__ == "__main__":
    sys.exit(main())
