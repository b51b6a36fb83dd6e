"""Control-path latency (SPEC §7): daemon round trips vs a bare Python Unix-socket round trip,
and embedded create+close_handle.

    python bench/bench_roundtrip.py [--quick] [--runs N] [--n N] [--json [PATH]]

Baseline, measured in the same run: `_echo_server.py` in a subprocess (selectors loop) and a
blocking client that sends a 16-byte header + 8-byte payload and reads the 16 + 8 byte reply.
Figures (each operation timed on its own, `--n` per run, `--runs` runs, rounds interleaved):

- daemon `info(h)` on an existing handle: target median <= 1.5 x bare;
- daemon `busy(h)` (only if the Device has it): target median <= 1.5 x bare;
- daemon `create(4096)` + `close_handle` (two round trips): target median <= 1.5 x (2 x bare);
  `create` and `close_handle` alone are listed too;
- embedded `create(4096)` + `close_handle`: target median <= 15 us.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness as H  # noqa: E402
import ugem  # noqa: E402
from ugem.testing.daemon import run_daemon  # noqa: E402

BENCH = "roundtrip"
HEADER = struct.Struct("<IHBBIi")
DEFAULTS = dict(runs=5, n=2000, warmup=300, quick_runs=3, quick_n=300, quick_warmup=50)


# -- the bare baseline ---------------------------------------------------------------------


@contextlib.contextmanager
def echo_server(directory: str) -> Iterator[str]:
    path = os.path.join(directory, "echo.sock")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_echo_server.py")
    proc = subprocess.Popen([sys.executable, script, path], stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() != b"ready":
            raise RuntimeError(f"echo server did not start: {line!r}")
        yield path
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


def run(opts: H.Options) -> H.Report:
    report = H.Report(BENCH, "control round trips", {"runs": opts.runs, "n": opts.n, "warmup": opts.warmup})
    with contextlib.ExitStack() as stack:
        directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="ugem-bench-"))
        echo_path = stack.enter_context(echo_server(directory))
        daemon = stack.enter_context(run_daemon())
        bare = BareClient(echo_path)
        stack.callback(bare.close)
        dev = daemon.connect()
        stack.callback(dev.close)
        emb = ugem.embedded()
        stack.callback(emb.close)

        h_d = dev.create(4096)
        h_e = emb.create(4096)
        runners: dict[str, H.Runner] = {
            "bare": each("bare round trip", bare.roundtrip),
            "daemon info": each("daemon info", lambda: dev.info(h_d)),
            "daemon create/close": create_close("daemon", dev),
            "embedded create/close": create_close("embedded", emb),
            "embedded info": each("embedded info", lambda: emb.info(h_e)),
        }
        has_busy = hasattr(dev, "busy")
        if has_busy:
            runners["daemon busy"] = each("daemon busy", lambda: dev.busy(h_d))
        series = H.interleaved(runners, runs=opts.runs, n=opts.n, warmup=opts.warmup)

    bare_s = series["bare round trip"]
    ratio_15 = H.Target("<=", 1.5)
    rows = report.rows
    rows.append(H.Row.latency(BENCH, "bare round trip (16+8 B)", "baseline", bare_s))
    rows.append(H.Row.latency(BENCH, "info(h)", "daemon", series["daemon info"], baseline=bare_s, target=ratio_15))
    if has_busy:
        rows.append(H.Row.latency(BENCH, "busy(h)", "daemon", series["daemon busy"], baseline=bare_s,
                                  target=ratio_15))
    rows.append(H.Row.latency(BENCH, "create+close_handle", "daemon", series["daemon create+close"],
                              baseline=bare_s, baseline_scale=2.0,
                              target=H.Target("<=", 1.5, text="ratio <= 1.5 (vs 2 round trips)")))
    rows.append(H.Row.latency(BENCH, "  create", "daemon", series["daemon create"], baseline=bare_s))
    rows.append(H.Row.latency(BENCH, "  close_handle", "daemon", series["daemon close_handle"], baseline=bare_s))
    rows.append(H.Row.latency(BENCH, "create+close_handle", "embedded", series["embedded create+close"],
                              target=H.Target("<=", 15.0, on="median")))
    rows.append(H.Row.latency(BENCH, "  create", "embedded", series["embedded create"]))
    rows.append(H.Row.latency(BENCH, "  close_handle", "embedded", series["embedded close_handle"]))
    rows.append(H.Row.latency(BENCH, "info(h)", "embedded", series["embedded info"]))
    if not has_busy:
        report.notes.append("Device has no busy(); the control round trip is measured with info(h)")
    report.notes.append("ratio = median / median of the bare round trip measured in the same run "
                        "(create+close_handle: / 2 bare round trips)")
    return report


def main(argv: list[str] | None = None) -> int:
    opts = H.parse_args(__doc__.splitlines()[0], argv, **DEFAULTS)
    return H.emit([H.monitored(run, opts)], opts)


if __name__ == "__main__":
    sys.exit(main())
