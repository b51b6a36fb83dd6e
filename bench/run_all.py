"""Run every bench/ script and print one summary table: target, measured, pass/fail.

    python bench/run_all.py [--quick] [--json [PATH]] [--only NAME ...]
    python -m bench [same options]          (from the repository root)

Each bench runs with its own defaults (`--quick` for a fast, rougher pass); their tables are
printed as they finish, then the summary. Exit status 1 if any target is missed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness as H  # noqa: E402
import bench_bulk  # noqa: E402
import bench_dask  # noqa: E402
import bench_device  # noqa: E402
import bench_memory  # noqa: E402
import bench_mmap_copy  # noqa: E402
import bench_peers  # noqa: E402
import bench_pool  # noqa: E402
import bench_rayperf  # noqa: E402
import bench_roundtrip  # noqa: E402
import bench_scale  # noqa: E402

BENCHES = {
    "roundtrip": (bench_roundtrip.run, bench_roundtrip.DEFAULTS),
    "bulk": (bench_bulk.run, bench_bulk.DEFAULTS),
    "mmap_copy": (bench_mmap_copy.run, bench_mmap_copy.DEFAULTS),
    "memory": (bench_memory.run, bench_memory.DEFAULTS),
    "device": (bench_device.run, bench_device.DEFAULTS),
    "scale": (bench_scale.run, bench_scale.DEFAULTS),
    "peers": (bench_peers.run, bench_peers.DEFAULTS),
    "pool": (bench_pool.run, bench_pool.DEFAULTS),
    "dask": (bench_dask.run, bench_dask.DEFAULTS),
    "rayperf": (bench_rayperf.run, bench_rayperf.DEFAULTS),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a fast, rougher run of every bench")
    parser.add_argument("--json", nargs="?", const="-", metavar="PATH",
                        help="write all results as JSON to PATH (or to stdout instead of the tables)")
    parser.add_argument("--only", nargs="+", choices=list(BENCHES), help="run only these benches")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="before each bench, wait up to SECONDS for other processes to leave the CPUs idle")
    parser.add_argument("--render", metavar="DIR",
                        help="after the run, write DIR/results.json, one PNG per bench into DIR (tools/render.py) "
                             "and the markdown page")
    parser.add_argument("--markdown", metavar="PATH",
                        help="with --render: where the markdown goes (default docs/PERFORMANCE.md)")
    return parser


def _run_benches(ns: argparse.Namespace, quiet: bool) -> list[H.Report]:
    """Each bench of `ns.only` (default: all) in turn, its table printed as it finishes."""
    reports: list[H.Report] = []
    for name in ns.only or list(BENCHES):
        fn, defaults = BENCHES[name]
        opts = H.options(argparse.Namespace(quick=ns.quick, runs=None, n=None, warmup=None, json=ns.json,
                                            wait_idle=ns.wait_idle), **defaults)
        t0 = time.monotonic()
        try:
            report = H.monitored(fn, opts)
        except Exception as exc:  # one broken bench must not hide the others' figures
            report = H.Report(name, name, {})
            report.notes.append(f"bench failed to run: {type(exc).__name__}: {exc}")
            report.rows.append(H.Row(name, "(whole bench)", "-", "", float("nan"), float("nan"), 0,
                                     target="runs", passed=False, error=f"{type(exc).__name__}: {exc}"))
        report.params.setdefault("seconds", round(time.monotonic() - t0, 1))
        reports.append(report)
        if not quiet:
            report.print_table()
            sys.stdout.flush()
    return reports


def _render(ns: argparse.Namespace, reports: list[H.Report], argv: list[str] | None, quiet: bool) -> bool:
    """results.json (with the command and the machine's memory), PNGs and the markdown page
    (tools/render.py); False if the plots were skipped (matplotlib missing)."""
    import json
    import shlex

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
    import render

    out = sys.stderr if quiet else sys.stdout
    command = " ".join(["python bench/run_all.py", shlex.join(sys.argv[1:] if argv is None else argv)])
    data = render.annotate([r.to_json() for r in reports], command.strip())
    os.makedirs(ns.render, exist_ok=True)
    results = os.path.join(ns.render, "results.json")
    with open(results, "w") as f:
        json.dump(data, f, indent=1)
    print(f"\nJSON written to {results}", file=out)
    return bool(render.render(data, out_dir=ns.render, markdown=ns.markdown or render.DEFAULT_MARKDOWN,
                              results_path=results, log=lambda msg: print(msg, file=out)))


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    ns = parser.parse_args(argv)
    if ns.markdown and not ns.render:
        parser.error("--markdown needs --render DIR")
    quiet = ns.json == "-"
    reports = _run_benches(ns, quiet)
    opts = H.Options(quick=ns.quick, runs=0, n=0, warmup=0, json=ns.json, extra=ns)
    if quiet:
        status = H.emit(reports, opts)
    else:
        H.print_summary(reports)
        if ns.json:
            import json

            with open(ns.json, "w") as f:
                json.dump([r.to_json() for r in reports], f, indent=1)
            print(f"\nJSON written to {ns.json}")
        status = 1 if any(r.failed for r in reports) else 0
    if ns.render and not _render(ns, reports, argv, quiet):
        status = status or 2  # plots skipped (matplotlib missing); the markdown was written
    return status


if __name__ == "__main__":
    sys.exit(main())
