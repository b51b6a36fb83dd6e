"""Shared harness for the bench/ scripts (the performance targets of docs/REFERENCE.md). Not a test
module: run the scripts directly.

What it gives every script:

- `parse_args(description, runs=..., n=...)`: the common command line
  (`--quick`, `--runs N`, `--n N`, `--warmup N`, `--json [PATH]`);
- `interleaved(runners, runs=..., n=..., warmup=...)`: runs every runner once per round, in
  rotating order, so that a baseline and the code under test see the same machine state
  (frequency, other load) in the same run; returns one `Series` of samples per label;
- `Series`: samples in nanoseconds (one per operation, or one per bulk transfer) with
  median / p99 (linear interpolation, as numpy's default) and GB/s for bulk figures;
- `Row` / `Report`: one figure per row (median, p99, ratio against the baseline measured in
  the same run, target, pass/fail), printed as a table or dumped as JSON.

Timing is `time.perf_counter_ns()`; nothing is pinned to a CPU; the garbage collector is
left on (the code under test runs with it on too) but collected before every round.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "Report",
    "Results",
    "Row",
    "Series",
    "Target",
    "interleaved",
    "monitored",
    "parse_args",
    "percentile",
    "print_summary",
    "emit",
]

clock = time.perf_counter_ns
MiB = 1 << 20

# A runner takes the number of operations to do and returns {label: [ns per sample, ...]}.
Runner = Callable[[int], dict[str, list[int]]]


# -- statistics ----------------------------------------------------------------------------


def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks."""
    data = sorted(values)
    if not data:
        return float("nan")
    if len(data) == 1:
        return float(data[0])
    pos = (len(data) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


@dataclass
class Series:
    """Samples of one figure, in ns; `nbytes` is set for bulk figures (bytes per sample)."""

    label: str
    samples: list[int] = field(default_factory=list)
    run_medians: list[float] = field(default_factory=list)
    nbytes: int = 0
    error: str = ""  # set when the operation failed: the figure could not be measured

    @property
    def median_ns(self) -> float:
        return percentile(self.samples, 50)

    @property
    def p99_ns(self) -> float:
        return percentile(self.samples, 99)

    @property
    def median_us(self) -> float:
        return self.median_ns / 1e3

    @property
    def p99_us(self) -> float:
        return self.p99_ns / 1e3

    def gbps(self, ns: float) -> float:
        return self.nbytes / ns if ns > 0 else float("nan")  # bytes/ns == GB/s (10**9 B/s)

    @property
    def median_gbps(self) -> float:
        return self.gbps(self.median_ns)

    @property
    def p99_gbps(self) -> float:
        """Throughput of the p99 (slow-tail) sample."""
        return self.gbps(self.p99_ns)


class Results(dict[str, Series]):
    """Series by label; a label whose runner failed maps to a Series carrying the error."""

    def __init__(self) -> None:
        super().__init__()
        self.errors: dict[str, str] = {}

    def __missing__(self, label: str) -> Series:
        why = "; ".join(f"{k}: {v}" for k, v in self.errors.items()) or "not measured"
        return Series(label, error=why)


def interleaved(runners: dict[str, Runner], *, runs: int, n: int, warmup: int,
                nbytes: dict[str, int] | None = None) -> Results:
    """Warm every runner up with `warmup` operations, then `runs` rounds of `n` operations
    each, rotating the order of runners every round. Returns one Series per label.

    A runner that raises is dropped (its error is kept, the other runners go on): the
    labels it produces come back as Series with `error` set."""
    results = Results()
    produced: dict[str, set[str]] = {name: set() for name in runners}
    live = dict(runners)

    def attempt(name: str, count: int) -> dict[str, list[int]] | None:
        try:
            return live[name](count)
        except Exception as exc:  # report, keep measuring the rest
            results.errors[name] = f"{type(exc).__name__}: {exc}"
            del live[name]
            return None

    for name in list(live):
        if warmup > 0:
            attempt(name, warmup)
    for r in range(runs):
        names = list(live)
        if not names:
            break
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            gc.collect()
            got = attempt(name, n)
            if got is None:
                continue
            for label, samples in got.items():
                produced[name].add(label)
                s = results.setdefault(label, Series(label, nbytes=(nbytes or {}).get(label, 0)))
                s.samples.extend(samples)
                s.run_medians.append(percentile(samples, 50))
    for name, why in results.errors.items():
        for label in produced[name] | {name}:
            results[label] = Series(label, error=why, nbytes=(nbytes or {}).get(label, 0))
    return results


def time_each(op: Callable[[], Any], n: int) -> list[int]:
    """n calls of op, each timed on its own."""
    samples = [0] * n
    c = clock
    for i in range(n):
        t0 = c()
        op()
        samples[i] = c() - t0
    return samples


# -- results -------------------------------------------------------------------------------


@dataclass
class Target:
    """`value op limit` on the ratio, the median or the p99 (`on`); op is "<=" or ">="."""

    op: str
    limit: float
    on: str = "ratio"  # "ratio", "median" or "p99"
    text: str = ""

    def check(self, row: Row) -> bool | None:
        value = {"ratio": row.ratio, "median": row.median, "p99": row.p99}[self.on]
        if value is None or value != value:
            return None
        return value <= self.limit if self.op == "<=" else value >= self.limit

    def describe(self, unit: str) -> str:
        if self.text:
            return self.text
        if self.on == "ratio":
            return f"ratio {self.op} {self.limit:g}"
        return f"{self.on} {self.op} {self.limit:g} {unit}"


@dataclass
class Row:
    bench: str
    figure: str
    mode: str
    unit: str  # "us" (latency, lower is better) or "GB/s" (throughput, higher is better)
    median: float
    p99: float
    samples: int
    baseline: str | None = None
    ratio: float | None = None
    ratio_note: str = ""
    target: str | None = None
    passed: bool | None = None
    run_medians: list[float] = field(default_factory=list)
    error: str = ""
    headline: bool = False  # no target, but listed in the summary (informational)

    @classmethod
    def latency(cls, bench: str, figure: str, mode: str, s: Series, *, baseline: Series | None = None,
                baseline_scale: float = 1.0, target: Target | None = None, ratio_note: str = "") -> Row:
        row = cls(bench, figure, mode, "us", s.median_us, s.p99_us, len(s.samples),
                  run_medians=[m / 1e3 for m in s.run_medians], error=s.error)
        if baseline is not None and not s.error and not baseline.error:
            row.baseline = baseline.label if baseline_scale == 1 else f"{baseline_scale:g} x {baseline.label}"
            row.ratio = s.median_ns / (baseline.median_ns * baseline_scale)
            row.ratio_note = ratio_note
        row._apply(target)
        return row

    @classmethod
    def throughput(cls, bench: str, figure: str, mode: str, s: Series, *, baseline: Series | None = None,
                   target: Target | None = None, ratio_note: str = "") -> Row:
        row = cls(bench, figure, mode, "GB/s", s.median_gbps, s.p99_gbps, len(s.samples),
                  run_medians=[s.gbps(m) for m in s.run_medians], error=s.error)
        if baseline is not None and not s.error and not baseline.error:
            row.baseline = baseline.label
            row.ratio = s.median_gbps / baseline.median_gbps
            row.ratio_note = ratio_note
        row._apply(target)
        return row

    @classmethod
    def rate(cls, bench: str, figure: str, mode: str, s: Series, ops: int, unit: str, *,
             baseline: Series | None = None, baseline_ops: int | None = None, target: Target | None = None,
             ratio_note: str = "") -> Row:
        """A rate: `ops` operations per sample, per second (higher is better; the ratio is this
        rate / the baseline's, whose samples hold `baseline_ops` operations, default `ops`);
        p99 column = the rate of the slowest-1% sample."""
        def per_s(ns: float) -> float:
            return ops / ns * 1e9 if ns > 0 else float("nan")
        row = cls(bench, figure, mode, unit, per_s(s.median_ns), per_s(s.p99_ns), len(s.samples),
                  run_medians=[per_s(m) for m in s.run_medians], error=s.error)
        if baseline is not None and not s.error and not baseline.error:
            row.baseline = baseline.label
            row.ratio = per_s(s.median_ns) / ((baseline_ops or ops) / baseline.median_ns * 1e9)
            row.ratio_note = ratio_note
        row._apply(target)
        return row

    @classmethod
    def skipped(cls, bench: str, figure: str, unit: str, why: str) -> Row:
        """A figure that was not measured, with the reason (e.g. an optional peer is missing)."""
        return cls(bench, figure, "skipped", unit, float("nan"), float("nan"), 0, ratio_note=why)

    def _apply(self, target: Target | None) -> None:
        if target is not None:
            self.target = target.describe(self.unit)
            self.passed = False if self.error else target.check(self)


@dataclass
class Report:
    bench: str
    title: str
    params: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[Row]:
        return [r for r in self.rows if r.passed is False]

    def to_json(self) -> dict[str, Any]:
        return {"bench": self.bench, "title": self.title, "params": self.params, "environment": environment(),
                "rows": [asdict(r) for r in self.rows], "notes": self.notes}

    def print_table(self, out: Any = None) -> None:
        out = out or sys.stdout
        p = ", ".join(f"{k}={v}" for k, v in self.params.items())
        print(f"\n== {self.title} ({p})", file=out)
        headers = ("figure", "mode", "median", "p99", "unit", "baseline", "ratio", "target", "result")
        table = []
        for r in self.rows:
            table.append((r.figure, r.mode, _num(r.median), _num(r.p99), r.unit, r.baseline or "",
                          "" if r.ratio is None else f"{r.ratio:.3f}", r.target or "",
                          "ERROR" if r.error else ("" if r.target is None else _verdict(r.passed))))
        _print_table(headers, table, out)
        for r in self.rows:
            if r.error:
                print(f"  ERROR {r.figure.strip()} ({r.mode}): {r.error}", file=out)
        for note in self.notes:
            print(f"  note: {note}", file=out)


def _num(x: float) -> str:
    if x != x:
        return "-"
    if x >= 100:
        return f"{x:.1f}"
    if x >= 10:
        return f"{x:.2f}"
    return f"{x:.3f}"


def _verdict(passed: bool | None) -> str:
    return "PASS" if passed else ("FAIL" if passed is False else "n/a")


def _print_table(headers: tuple[str, ...], rows: list[tuple[str, ...]], out: Any) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    right = {2, 3, 6}

    def fmt(cells: tuple[str, ...]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in pairs)
    print("  " + fmt(headers).rstrip(), file=out)
    print("  " + "  ".join("-" * w for w in widths), file=out)
    for r in rows:
        print("  " + fmt(r).rstrip(), file=out)


def print_summary(reports: list[Report], out: Any = None) -> None:
    """One line per targeted figure: target, measured, pass/fail."""
    out = out or sys.stdout
    env = environment()
    print(f"\n== summary (performance targets); code {env['source']}, Python {env['python']}, {env['cpus']} CPUs, "
          f"kernel {env['kernel']}", file=out)
    headers = ("bench", "figure", "mode", "target", "measured", "result")
    table = []
    for rep in reports:
        for r in rep.rows:
            if r.target is None:
                continue
            if r.error:
                measured = f"not measured: {r.error[:70]}"
            elif r.ratio is not None and r.target.startswith("ratio"):
                measured = f"ratio {r.ratio:.3f} (median {_num(r.median)} {r.unit})"
            elif r.target.startswith("p99"):
                measured = f"p99 {_num(r.p99)} {r.unit} (median {_num(r.median)} {r.unit})"
            else:
                measured = f"median {_num(r.median)} {r.unit}"
            table.append((rep.bench, r.figure, r.mode, r.target, measured, _verdict(r.passed)))
    widths = [max(len(h), *(len(t[i]) for t in table)) if table else len(h) for i, h in enumerate(headers)]
    print("  " + "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip(), file=out)
    print("  " + "  ".join("-" * w for w in widths), file=out)
    for t in table:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(t, widths, strict=True)).rstrip(), file=out)
    total = sum(1 for t in table)
    failed = sum(1 for t in table if t[-1] != "PASS")
    print(f"  {total - failed}/{total} targets met", file=out)
    info = [(rep.bench, r) for rep in reports for r in rep.rows if r.headline and r.target is None]
    if info:
        print("\n  figures without a target (informational):", file=out)
        rows = []
        for bench, r in info:
            measured = (f"not measured: {r.error[:70]}" if r.error else f"median {_num(r.median)} {r.unit}"
                        + ("" if r.ratio is None else f", ratio {r.ratio:.3f} vs {r.baseline}"))
            rows.append((bench, r.figure.strip(), r.mode, measured))
        widths = [max(len(t[i]) for t in rows) for i in range(4)]
        for t in rows:
            print("  " + "  ".join(c.ljust(w) for c, w in zip(t, widths, strict=True)).rstrip(), file=out)


def environment() -> dict[str, Any]:
    return {"python": platform.python_version(), "implementation": platform.python_implementation(),
            "kernel": platform.release(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "source": source_state()}


def source_state() -> str:
    """The git commit of the code measured, and a digest of uncommitted changes under src/."""
    import hashlib
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        diff = subprocess.run(["git", "diff", "HEAD", "--", "src"], cwd=root, capture_output=True,
                              timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + (f"+dirty:{hashlib.sha1(diff).hexdigest()[:10]}" if diff else "")


# -- other load on the machine ------------------------------------------------------------


def _cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    total = sum(fields[:8])
    return (total - idle) / tick, total / tick


def _own_seconds() -> float:
    """CPU seconds used by this process and its reaped children (daemon, echo server)."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def foreign_load(interval: float) -> float:
    """CPUs' worth of work done by other processes over `interval` seconds."""
    b0, _ = _cpu_seconds()
    o0, t0 = _own_seconds(), time.monotonic()
    time.sleep(interval)
    b1, _ = _cpu_seconds()
    return max(0.0, (b1 - b0) - (_own_seconds() - o0)) / (time.monotonic() - t0)


def wait_idle(timeout: float, threshold: float = 0.15) -> float:
    """Wait (up to `timeout` s) until other processes use < `threshold` CPUs; returns the last figure."""
    deadline = time.monotonic() + timeout
    load = foreign_load(0.5)
    while load >= threshold and time.monotonic() < deadline:
        load = foreign_load(1.0)
    return load


def monitored(fn: Callable[[Options], Report], opts: Options) -> Report:
    """Run one bench; record the CPU load other processes put on the machine meanwhile."""
    before = wait_idle(opts.wait_idle) if opts.wait_idle > 0 else foreign_load(0.3)
    b0, _ = _cpu_seconds()
    o0, t0 = _own_seconds(), time.monotonic()
    report = fn(opts)
    b1, _ = _cpu_seconds()
    elapsed = time.monotonic() - t0
    during = max(0.0, (b1 - b0) - (_own_seconds() - o0)) / elapsed
    report.params["seconds"] = round(elapsed, 1)
    report.params["other_load"] = round(during, 2)
    if during > 0.2 or before > 0.2:
        report.notes.append(f"WARNING: other processes used {during:.2f} CPUs on average during this bench "
                            f"({before:.2f} just before; {os.cpu_count()} CPUs): figures are disturbed")
    return report


# -- command line --------------------------------------------------------------------------


@dataclass
class Options:
    quick: bool
    runs: int
    n: int
    warmup: int
    json: str | None
    extra: argparse.Namespace
    wait_idle: float = 0.0


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a fast, rougher run (fewer repeats)")
    parser.add_argument("--runs", type=int, help="repeated runs (rounds) per figure")
    parser.add_argument("--n", type=int, help="operations per run (latency benches)")
    parser.add_argument("--warmup", type=int, help="warm-up operations per figure before the runs")
    parser.add_argument("--json", nargs="?", const="-", metavar="PATH",
                        help="write the results as JSON to PATH (or to stdout instead of the table)")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="first wait up to SECONDS for other processes to leave the CPUs idle")


def options(ns: argparse.Namespace, *, runs: int, n: int, warmup: int, quick_runs: int, quick_n: int,
            quick_warmup: int) -> Options:
    q = bool(ns.quick)
    return Options(
        quick=q,
        runs=ns.runs or (quick_runs if q else runs),
        n=ns.n or (quick_n if q else n),
        warmup=ns.warmup if ns.warmup is not None else (quick_warmup if q else warmup),
        json=ns.json,
        extra=ns,
        wait_idle=getattr(ns, "wait_idle", 0.0) or 0.0,
    )


def parse_args(description: str, argv: list[str] | None = None,
               add: Callable[[argparse.ArgumentParser], None] | None = None, **defaults: int) -> Options:
    """The common options, and the bench's own (`add`), parsed; its own are in `opts.extra`."""
    parser = argparse.ArgumentParser(description=description)
    add_common(parser)
    if add is not None:
        add(parser)
    return options(parser.parse_args(argv), **defaults)


def emit(reports: list[Report], opts: Options, *, summary: bool = False) -> int:
    """Print tables (and the summary) or JSON; returns the exit status (1 if a target failed)."""
    if opts.json == "-":
        json.dump([r.to_json() for r in reports], sys.stdout, indent=1)
        print()
    else:
        for rep in reports:
            rep.print_table()
        if summary:
            print_summary(reports)
        else:
            env = environment()
            print(f"  (code {env['source']}, Python {env['python']}, {env['cpus']} CPUs)")
        if opts.json:
            with open(opts.json, "w") as f:
                json.dump([r.to_json() for r in reports], f, indent=1)
            print(f"\nJSON written to {opts.json}")
    return 1 if any(rep.failed for rep in reports) else 0
