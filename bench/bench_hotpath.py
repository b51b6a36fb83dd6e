"""Control-path CPU of each side on its own: the Python code a request costs, no syscall, no peer.

    python bench/bench_hotpath.py [--quick] [--runs N] [--n N] [--json [PATH]]

bench_roundtrip.py's "CPU per ..." rows are the whole round trip on a real socket: syscalls, context
switches and cold caches included, and on a loaded 2-CPU machine they move by several us between runs.
This bench takes the socket away so that a change of 1 us to the hot path shows: each side runs alone,
hot, over a stand-in socket whose calls are C functions that return at once (`send` is `len`, `recv`
and `recvmsg` are `dict.get` of a prepared frame, the bare client's `recv_into` is a BytesIO's), and
the figure is the thread's CPU time (`time.thread_time_ns`) per request, one sample per batch:

- client: `Device.info` / `busy` / `create` / `close_handle` through a `SocketTransport`, from the
  arguments' checks to the decoded result (the transport's sequence number is reset before each
  call so that the one prepared reply always answers it); baseline: bench_roundtrip's `BareClient`
  round trip (pack a header, send, receive, check the sequence number);
- daemon: one `Server._step` per request (the poller stood in by the one ready connection, the
  once-a-second scans out of the way): read, parse, dispatch, handler, reply, tally; baseline:
  `_echo_server.on_readable` (read, parse the header, reply).

The stand-ins cost the same on both sides of a ratio. What this leaves out, on purpose: the
syscalls (the same ones on both sides: the daemon does epoll_wait, recvmsg and send per request, the
echo server epoll_wait, recv and send; the clients send and recv) and what a real round trip adds
to the Python code by running it with caches that the other process just used (on one CPU, each
us here costs about 2 us in bench_roundtrip's CPU rows). No targets: a diagnostic for hot-path work.
"""

from __future__ import annotations

import io
import os
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _echo_server as echo  # noqa: E402
import _harness as H  # noqa: E402
from bench_roundtrip import BareClient  # noqa: E402
from ugem.client.device import Device  # noqa: E402
from ugem.client.transport import SocketTransport  # noqa: E402
from ugem.config import Config  # noqa: E402
from ugem.core.client import Credentials  # noqa: E402
from ugem.daemon import connection  # noqa: E402
from ugem.daemon.connection import Connection  # noqa: E402
from ugem.daemon.poller import READ  # noqa: E402
from ugem.daemon.server import Server, ServerOptions  # noqa: E402
from ugem.wire import structs as s  # noqa: E402
from ugem.wire import structs_exec as sx  # noqa: E402
from ugem.wire.frames import HEADER, MAGIC, MAX_INLINE, MAX_PAYLOAD, PROTOCOL_VERSION, Op  # noqa: E402

BENCH = "hotpath"
DEFAULTS = dict(runs=5, n=20000, warmup=2000, quick_runs=3, quick_n=5000, quick_warmup=500)
BATCH = 100  # requests per sample
CLIENT = ("bare client", "client info", "client busy", "client create", "client close_handle")
DAEMON = ("bare server", "daemon info", "daemon busy", "daemon create or close")
_REQUEST, _REPLY = 0, 1


def frame(op: int, kind: int, seq: int, msg: s.Struct) -> bytes:
    payload = msg._codec.pack(*type(msg)._values(msg))
    return HEADER.pack(len(payload), op, 0, kind, seq, 0) + payload


class StandIn:
    """A socket whose calls return at once: `send`/`sendall` is `len` (all of it sent), `recv`
    answers `frame` for the client's read size, `recvmsg` for the daemon's."""

    send = sendall = len

    def __init__(self) -> None:
        self.answer(b"")

    def answer(self, data: bytes) -> None:
        self.recv = {65536: data}.get  # SocketTransport's first read of a reply
        self.recvmsg = {connection._BURST: (data, [], 0, None)}.get  # Connection's read between frames

    def gettimeout(self) -> None:
        return None

    def fileno(self) -> int:
        return -1  # reads as a closed socket at close(): nothing to release

    def close(self) -> None:
        pass


def per_op(label: str, body: Callable[[int], None]) -> H.Runner:
    """A runner whose samples are CPU ns per request, one sample per BATCH requests."""
    def run(n: int) -> dict[str, list[int]]:
        samples = []
        for _ in range(max(1, n // BATCH)):
            t0 = time.thread_time_ns()
            body(BATCH)
            samples.append((time.thread_time_ns() - t0) // BATCH)
        return {label: samples}
    return run


def client_runners() -> tuple[list[H.Runner], Callable[[], None]]:
    bare = object.__new__(BareClient)  # its round trip over a stand-in (BareClient.__init__ connects)
    reply = HEADER.pack(8, 3, 0, _REPLY, 1, 0) + bytes(8)
    stream = io.BytesIO()
    bare.sock = StandIn()
    bare.sock.recv_into = stream.readinto
    bare.seq, bare.reply, bare.payload = 0, bytearray(HEADER.size + 8), b"\x01" * 8
    bare.view = memoryview(bare.reply)

    def bare_body(n: int) -> None:
        stream.seek(0)
        stream.write(reply * n)
        stream.seek(0)
        for _ in range(n):
            bare.seq = 0
            bare.roundtrip()

    sock = StandIn()
    sock.answer(frame(Op.HELLO, _REPLY, 1, s.HelloReply(version=PROTOCOL_VERSION, client_id=1,
                                                       server_pid=os.getpid(), max_payload=MAX_PAYLOAD,
                                                       max_inline=MAX_INLINE)))
    transport = SocketTransport(sock)
    dev = Device(transport)

    def call(label: str, op: Op, reply: s.Struct, fn: Callable[[], Any]) -> H.Runner:
        data = frame(op, _REPLY, 1, reply)

        def body(n: int) -> None:
            sock.answer(data)
            for _ in range(n):
                transport._seq = 0  # the prepared reply answers sequence number 1
                fn()
        return per_op(label, body)
    runners = [
        per_op("bare client", bare_body),
        call("client info", Op.GEM_INFO, s.InfoReply(size=4096), lambda: dev.info(1)),
        call("client busy", Op.GEM_BUSY, sx.BusyReply(), lambda: dev.busy(1)),
        call("client create", Op.GEM_CREATE, s.CreateReply(handle=1, size=4096), lambda: dev.create(4096)),
        call("client close_handle", Op.GEM_CLOSE, s.Empty(), lambda: dev.close_handle(1)),
    ]
    return runners, dev.close


def daemon_runners() -> tuple[list[H.Runner], Callable[[], None]]:
    bare_sock = StandIn()
    bare_sock.recv = {65536: HEADER.pack(8, 3, 0, _REQUEST, 1, 0) + b"\x01" * 8}.get
    buf = bytearray()

    def bare_body(n: int) -> None:
        for _ in range(n):
            echo.on_readable(bare_sock, buf)

    server = Server(Config.from_kwargs(), ServerOptions("", False, 0o600, 30.0, None))
    core = server.core
    client = core.client_open(Credentials(os.getpid(), os.getuid(), os.getgid()), privileged=True, admit=False)
    sock = StandIn()
    conn = Connection(sock, core, client)
    sock.answer(frame(Op.HELLO, _REQUEST, 1, s.HelloReq(magic=MAGIC, version=PROTOCOL_VERSION)))
    conn.on_readable()
    poller = server.sel
    server.sel = type("OneReady", (), {"poll": staticmethod({1.0: [(conn, READ)]}.get)})()
    server._last_stall_check = float("inf")  # the once-a-second scans: not per request
    handle = core.handle_create(client, core.object_new(client, 4096))
    step = server._step

    def serve(*requests: bytes) -> Callable[[int], None]:
        def body(n: int) -> None:
            for _ in range(n):
                for data in requests:
                    sock.answer(data)
                    step()
        return body
    create = frame(Op.GEM_CREATE, _REQUEST, 2, s.CreateReq(size=4096))
    serve(create)(1)
    created = max(client.handles)  # what each create below makes, and the close after it drops
    close = frame(Op.GEM_CLOSE, _REQUEST, 3, s.CloseReq(handle=created))
    serve(close)(1)
    runners = [
        per_op("bare server", bare_body),
        per_op("daemon info", serve(frame(Op.GEM_INFO, _REQUEST, 4, s.InfoReq(handle=handle)))),
        per_op("daemon busy", serve(frame(Op.GEM_BUSY, _REQUEST, 5, s.HandleReq(handle=handle)))),
        per_op("daemon create or close", lambda n: serve(create, close)(max(1, n // 2))),
    ]

    def done() -> None:
        server.sel = poller
        conn.close()
        server.shutdown()
    return runners, done


def run(opts: H.Options) -> H.Report:
    report = H.Report(BENCH, "control-path CPU per request, each side alone (no syscalls)",
                      {"runs": opts.runs, "n": opts.n, "warmup": opts.warmup, "batch": BATCH})
    client, client_done = client_runners()
    daemon, daemon_done = daemon_runners()
    try:
        series = H.interleaved({str(i): r for i, r in enumerate(client + daemon)}, runs=opts.runs, n=opts.n,
                               warmup=opts.warmup)
    finally:
        client_done()
        daemon_done()
    for side, labels in (("client", CLIENT), ("server", DAEMON)):
        base = series[f"bare {side}"]
        for label in labels:
            bare = label == f"bare {side}"
            row = H.Row.latency(BENCH, label, "baseline" if bare else "ugem", series[label],
                                baseline=None if bare else base)
            row.unit = "us CPU"
            report.rows.append(row)
    fastest = ", ".join(f"{label} {min(series[label].samples) / 1e3:.2f}" for label in (*CLIENT, *DAEMON)
                        if series[label].samples)
    report.notes.append(f"fastest sample, us CPU (the least disturbed by other load): {fastest}")
    report.notes.append("us CPU = this thread's CPU time per request (median and p99 of samples of "
                        f"{BATCH} requests); ratio = median / the bare side's median")
    report.notes.append("stand-in sockets: no syscall and no peer; daemon requests go through Server._step, "
                        "the poller stood in by the one ready connection")
    return report


def main(argv: list[str] | None = None) -> int:
    opts = H.parse_args(__doc__.splitlines()[0], argv, **DEFAULTS)
    return H.emit([H.monitored(run, opts)], opts)


if __name__ == "__main__":
    sys.exit(main())
