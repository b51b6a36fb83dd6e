"""Where a daemon round trip spends its time, next to the bare round trip (bench_roundtrip.py).

    python bench/profile_roundtrip.py [--quick] [--no-cprofile]

1. end to end, with an instrumented daemon (bench/_instrumented_daemon.py: timers wrapped
   around the daemon's own functions at start-up, src/ untouched) and an instrumented echo
   server: round-trip medians and each server's busy time per request (select() returning
   to the next select() call);
2. client CPU without I/O: Device.info / create / close_handle over a fake socket that
   answers at once, and the same for the bare client; then the pieces of the call path;
3. daemon CPU without I/O: Server._on_event for one request over a fake socket, and its
   pieces; the echo server's handler the same way;
4. the real socket syscalls each side makes per request, timed on a socketpair;
5. cProfile: the client (real daemon) and the daemon (run under cProfile), top functions;
6. single hot expressions, each timed next to a cheaper equivalent.
Medians in microseconds. Sections 2-4 measure CPU time of this thread (time.thread_time_ns,
user + system), so other load on the machine does not inflate them; each piece is timed in a
batch loop (per-call = batch / count, median of 7 batches), so tiny pieces include ~0.03-0.05 us
of loop/call overhead. Section 1 and the round trips are wall-clock.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import cProfile
import json
import os
import pstats
import selectors
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _echo_server  # noqa: E402
import _harness as H  # noqa: E402
import bench_roundtrip as RT  # noqa: E402
from ugem.client.device import Device, ObjectInfo  # noqa: E402
from ugem.client.transport import SocketTransport  # noqa: E402
from ugem.config import Config  # noqa: E402
from ugem.core.client import Credentials  # noqa: E402
from ugem.core.requests import BY_OP, dispatch  # noqa: E402
from ugem.daemon import connection as dconn  # noqa: E402
from ugem.daemon.server import Server, ServerOptions  # noqa: E402
from ugem.wire import structs as s  # noqa: E402
from ugem.wire.frames import HEADER, MAX_FDS, FrameParser, Kind, Op, encode_header  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ANC = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)


CPU_CLOCK = time.thread_time_ns  # CPU time of this thread (user + system): immune to being preempted


def per_call_us(fn: Callable[[], Any], count: int, batches: int = 7) -> float:
    """Median over batches of (batch CPU time / count), in us."""
    results = []
    for _ in range(batches):
        t0 = CPU_CLOCK()
        for _ in range(count):
            fn()
        results.append((CPU_CLOCK() - t0) / count / 1e3)
    return H.percentile(results, 50)


def _clock_overhead() -> float:
    samples = []
    for _ in range(2000):
        t0 = CPU_CLOCK()
        samples.append(CPU_CLOCK() - t0)
    return H.percentile(samples, 50)


def paired_us(timed: Callable[[], Any], untimed: Callable[[], Any], count: int) -> float:
    """Median CPU time of `timed` timed on its own (clock overhead subtracted), `untimed` run
    after each (to restore state)."""
    samples = []
    c = CPU_CLOCK
    for _ in range(count):
        t0 = c()
        timed()
        samples.append(c() - t0)
        untimed()
    return max(0.0, H.percentile(samples, 50) - _OVERHEAD[0]) / 1e3


_OVERHEAD = [0.0]


def table(title: str, rows: list[tuple[str, ...]], headers: tuple[str, ...]) -> None:
    print(f"\n== {title}")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def fmt(cells: tuple[str, ...]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        return "  ".join(c.ljust(w) if i == 0 or headers[i] in _LEFT else c.rjust(w) for i, (c, w) in pairs)

    print("  " + fmt(headers))
    print("  " + "  ".join("-" * w for w in widths))
    for r in rows:
        print("  " + fmt(r))


_LEFT = {"per request", "alternative is"}


def us(x: float) -> str:
    return f"{x:.2f}"


# -- 1. end to end with instrumented servers ---------------------------------------------------


@contextlib.contextmanager
def instrumented_daemon(directory: str, stats_path: str, prof_path: str | None = None
                        ) -> Iterator[tuple[str, int]]:
    path = os.path.join(directory, "ugem.sock")
    cmd = [sys.executable, os.path.join(HERE, "_instrumented_daemon.py"), stats_path]
    if prof_path:
        cmd += ["--cprofile", prof_path]
    cmd += ["serve", "--socket", path, "--spill-dir", os.path.join(directory, "spill"), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith(b"ugem: listening on"):
            raise RuntimeError(f"instrumented daemon did not start: {line!r}")
        yield path, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


@contextlib.contextmanager
def instrumented_echo(directory: str, stats_path: str) -> Iterator[tuple[str, int]]:
    path = os.path.join(directory, "echo.sock")
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "_echo_server.py"), path, stats_path],
                            stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != b"ready":
            raise RuntimeError("echo server did not start")
        yield path, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def end_to_end(runs: int, n: int, placement: str) -> dict[str, float]:
    affinity = os.sched_getaffinity(0)
    with tempfile.TemporaryDirectory(prefix="ugem-prof-") as d:
        dstats, estats = os.path.join(d, "daemon.json"), os.path.join(d, "echo.json")
        with instrumented_echo(d, estats) as (epath, epid), instrumented_daemon(d, dstats) as (dpath, dpid):
            RT.place(placement, 0, [epid, dpid])
            bare = RT.BareClient(epath)
            dev = Device(_connect_transport(dpath))
            try:
                h = dev.create(4096)
                lean = LeanInfo(dev, h)
                series = H.interleaved({
                    "bare": RT.each("bare", bare.roundtrip),
                    "info": RT.each("info", lambda: dev.info(h)),
                    "lean": RT.each("lean", lean.roundtrip),
                    "cc": RT.create_close("daemon", dev),
                }, runs=runs, n=n, warmup=200)
            finally:
                lean.close()
                dev.close()
                bare.close()
                os.sched_setaffinity(0, affinity)
        with open(dstats) as f:
            daemon_stats = json.load(f)
        with open(estats) as f:
            echo_stats = json.load(f)
    med = lambda xs: H.percentile(xs, 50) / 1e3  # noqa: E731
    out = {
        "rtt bare": series["bare"].median_us,
        "rtt info": series["info"].median_us,
        "rtt create": series["daemon create"].median_us,
        "rtt close": series["daemon close_handle"].median_us,
        "rtt lean": series["lean"].median_us,
        "busy bare": med(echo_stats["busy_ns"]),
    }
    for op, key in (("GEM_INFO", "info"), ("GEM_CREATE", "create"), ("GEM_CLOSE", "close")):
        for part in ("busy", "busy_per_request", "on_readable", "serve", "dispatch", "flush"):
            xs = daemon_stats.get(part, {}).get(op, [])
            out[f"{part} {key}"] = med(xs) if xs else float("nan")
        rq = daemon_stats.get("requests_per_wakeup", {}).get(op, [])
        out[f"rpw {key}"] = sum(rq) / len(rq) if rq else float("nan")
    rows = [("bare round trip (echo server)", us(out["rtt bare"]), us(out["busy bare"]), "1.00", us(out["busy bare"]),
             "", "", "", "")]
    for key in ("info", "create", "close"):
        rows.append((f"daemon {key}", us(out[f"rtt {key}"]), us(out[f"busy {key}"]), f"{out[f'rpw {key}']:.2f}",
                     us(out[f"busy_per_request {key}"]), us(out[f"on_readable {key}"]),
                     us(out[f"serve {key}"]), us(out[f"dispatch {key}"]), us(out[f"flush {key}"])))
    rows.append(("lean client GEM_INFO (see LeanInfo)", us(out["rtt lean"]), "", "", "", "", "", "", ""))
    table(f"1. end to end, placement {placement} (instrumented servers; medians, us)", rows,
          ("", "round trip", "busy/wake-up", "req/wake-up", "busy/request", "on_readable", "_serve", "dispatch",
           "flush"))
    print("  busy = select() returned -> next select() call (all of the server's work in one wake-up);")
    print("  the daemon's GEM_INFO columns cover both Device.info and the lean client's requests;")
    print("  req/wake-up = mean requests served per wake-up (>1: the client's next request arrived while")
    print("  the daemon was still in its read loop)")
    return out


class LeanInfo:
    """GEM_INFO through the real daemon with a minimal client: one send of header+payload, one
    recv_into of the 16+32-byte reply, no structs. Shows what the client side could cost."""

    def __init__(self, dev: Device, handle: int) -> None:
        self.t = dev._transport
        self.sock = self.t._sock  # type: ignore[union-attr]
        self.handle = handle
        self.reply = bytearray(HEADER.size + s.InfoReply._codec.size)
        self.view = memoryview(self.reply)
        self.pack = struct.Struct("<IHBBIiII").pack

    def roundtrip(self) -> tuple[int, ...]:
        t = self.t
        t._seq = seq = (t._seq + 1) & 0xFFFFFFFF  # type: ignore[union-attr]
        self.sock.send(self.pack(8, Op.GEM_INFO, 0, 0, seq, 0, self.handle, 0))
        got, view = 0, self.view
        while got < len(view):
            got += self.sock.recv_into(view[got:])
        if HEADER.unpack_from(self.reply)[4] != seq:
            raise RuntimeError("lean client out of sequence")
        return s.InfoReply._codec.unpack_from(self.reply, HEADER.size)

    def close(self) -> None:
        self.view.release()


def _connect_transport(path: str) -> SocketTransport:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.connect(path)
    return SocketTransport(sock)


# -- 2. client CPU with a fake socket --------------------------------------------------------


class FakeClientSock:
    """Answers every request at once with a canned reply payload (no syscalls)."""

    def __init__(self, replies: dict[int, bytes]) -> None:
        self.replies = replies
        self.header = b""
        self.payload = b""

    def sendmsg(self, buffers: list[Any], *args: Any) -> int:
        length, op, _n, _k, seq, _st = HEADER.unpack(buffers[0])
        self.payload = self.replies[op]
        self.header = HEADER.pack(len(self.payload), op, 0, Kind.REPLY, seq, 0)
        return sum(memoryview(b).nbytes for b in buffers)

    def recvmsg(self, n: int, *args: Any) -> tuple[bytes, list[Any], int, Any]:
        data, self.header = self.header[:n], self.header[n:]
        return data, [], 0, None

    def recv_into(self, view: memoryview, *args: Any) -> int:
        n = len(self.payload)
        view[:n] = self.payload
        return n


class FakeBareSock:
    def __init__(self) -> None:
        self.reply = b""

    def sendall(self, data: bytes, *args: Any) -> None:
        length, op, _n, _k, seq, _st = HEADER.unpack_from(data)
        self.reply = HEADER.pack(8, op, 0, 1, seq, 0) + b"\0" * 8

    def recv_into(self, view: memoryview, *args: Any) -> int:
        n = len(self.reply)
        view[:n] = self.reply
        return n


def client_cpu(count: int) -> dict[str, float]:
    info_payload = s.encode(s.InfoReply(size=4096, placement=0))[0][0]
    replies = {Op.GEM_INFO: info_payload, Op.GEM_CREATE: s.encode(s.CreateReply(handle=1, size=4096))[0][0],
               Op.GEM_CLOSE: b""}
    fake = FakeClientSock(replies)
    t = object.__new__(SocketTransport)
    t._sock = fake  # type: ignore[assignment]
    t._lock = threading.Lock()
    t._seq = 0
    t.client_id = 1
    dev = Device(t)
    bare = object.__new__(RT.BareClient)
    bare.sock = FakeBareSock()  # type: ignore[assignment]
    bare.seq = 0
    bare.reply = bytearray(24)
    bare.view = memoryview(bare.reply)
    bare.payload = b"\x01" * 8
    req = s.InfoReq(handle=1)
    pieces, fds = s.encode(req)
    lock = threading.Lock()

    def import_stmt() -> None:
        from ugem.core.requests import BY_OP  # noqa: F401  (as SocketTransport.call does every call)

    def locked() -> None:
        with lock:
            pass

    def send() -> None:
        t._seq += 1
        t._send(Op.GEM_INFO, pieces, fds)

    def send_receive() -> None:
        send()
        t._receive(Op.GEM_INFO)

    r = s.InfoReply(size=4096)

    def objectinfo() -> None:
        ObjectInfo(size=r.size, placement="none", madvise="willneed", name=r.name, tiling=r.tiling,
                   stride=r.stride, caching=r.caching, busy=bool(r.flags & s.INFO_BUSY),
                   pinned=bool(r.flags & s.INFO_PINNED), userptr=bool(r.flags & s.INFO_USERPTR),
                   readonly=bool(r.flags & s.INFO_READONLY))

    out = {
        "bare roundtrip": per_call_us(bare.roundtrip, count),
        "Device.info": per_call_us(lambda: dev.info(1), count),
        "Device.create": per_call_us(lambda: dev.create(4096), count),
        "Device.close_handle": per_call_us(lambda: dev.close_handle(1), count),
        "transport.call(INFO)": per_call_us(lambda: t.call(Op.GEM_INFO, req), count),
        "  from ..core.requests import BY_OP": per_call_us(import_stmt, count),
        "  s.InfoReq(handle=h)": per_call_us(lambda: s.InfoReq(handle=1), count),
        "  s.encode(InfoReq)": per_call_us(lambda: s.encode(req), count),
        "  threading.Lock with": per_call_us(locked, count),
        "  _send (fake sendmsg)": per_call_us(send, count),
        "  _receive (fake recvmsg+recv_into)": per_call_us(send_receive, count) - per_call_us(send, count),
        "  s.decode(InfoReply)": per_call_us(lambda: s.decode(s.InfoReply, info_payload, []), count),
        "  encode_header": per_call_us(lambda: encode_header(8, 3, 0, 0, 1), count),
        "ObjectInfo(...) build": per_call_us(objectinfo, count),
    }
    table("2. client CPU time per call, fake socket (no syscalls; us)", [(k, us(v)) for k, v in out.items()],
          ("", "us/call"))
    return out


# -- 3. daemon CPU with a fake socket --------------------------------------------------------


class FakeServerSock:
    """Delivers one canned request frame per on_readable pass, then EAGAIN; swallows replies.
    fileno() is a real socket's, so the selector can register it."""

    def __init__(self, real: socket.socket, frame: bytes) -> None:
        self.real = real
        self.frame = frame
        self.pending = b""

    def arm(self) -> None:
        self.pending = self.frame

    def fileno(self) -> int:
        return self.real.fileno()

    def recvmsg(self, n: int, *args: Any) -> tuple[bytes, list[Any], int, Any]:
        if not self.pending:
            raise BlockingIOError(11, "Resource temporarily unavailable")
        data, self.pending = self.pending[:n], self.pending[n:]
        return data, [], 0, None

    def sendmsg(self, buffers: list[Any], *args: Any) -> int:
        return sum(memoryview(b).nbytes for b in buffers)

    def close(self) -> None:
        pass


class FakeEchoConn:
    def __init__(self, frame: bytes) -> None:
        self.frame = frame

    def recv(self, n: int, *args: Any) -> bytes:
        return self.frame

    def sendall(self, data: bytes) -> None:
        pass


def daemon_cpu(count: int) -> dict[str, float]:
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="ugem-prof-") as d:
        server = Server(Config.from_kwargs(spill_dir=os.path.join(d, "spill")),
                        ServerOptions(os.path.join(d, "x.sock"), False))
        a, b = socket.socketpair()
        try:
            client = server.core.client_open(Credentials(os.getpid(), os.getuid(), os.getgid()), True)
            handle = server.core.handle_create(client, server.core.object_new(client, 4096))
            req_payload = s.encode(s.InfoReq(handle=handle))[0][0]
            frame = HEADER.pack(len(req_payload), Op.GEM_INFO, 0, Kind.REQUEST, 1, 0) + req_payload
            fake = FakeServerSock(a, frame)
            conn = dconn.Connection(fake, server.core, client)  # type: ignore[arg-type]
            conn.greeted = True
            server.sel.register(fake, selectors.EVENT_READ, conn)
            desc = BY_OP[Op.GEM_INFO]
            req = s.decode(s.InfoReq, req_payload, [])
            reply = dispatch(server.core, client, desc, req)
            parser = FrameParser(Kind.REQUEST)
            frame_obj = dconn.Frame(Op.GEM_INFO, Kind.REQUEST, 1, 0, req_payload, [])

            def event() -> None:
                fake.arm()
                server._on_event(conn, selectors.EVENT_READ)

            def readable() -> None:
                fake.arm()
                conn.on_readable()

            def parse() -> None:
                parser.feed(frame[:16], [])
                parser.feed(frame[16:], [])
                parser.next_frame()

            def reply_encode() -> None:
                pieces, fds = s.encode(reply)
                length = sum(memoryview(p).nbytes for p in pieces)
                header = encode_header(length, Op.GEM_INFO, len(fds), Kind.REPLY, 1)
                memoryview(b"".join([header, *pieces]))

            def eagain() -> None:
                try:
                    a.recvmsg(16, ANC)
                except BlockingIOError:
                    pass

            a.setblocking(False)
            echo = FakeEchoConn(frame)
            ebuf = bytearray()
            out = {
                "Server._on_event (1 INFO request)": per_call_us(event, count),
                "  Connection.on_readable": per_call_us(readable, count),
                "    FrameParser.feed x2 + next_frame": per_call_us(parse, count),
                "    Connection._serve": per_call_us(lambda: conn._serve(frame_obj), count),
                "      s.decode(InfoReq)": per_call_us(lambda: s.decode(s.InfoReq, req_payload, []), count),
                "      dispatch (check + gem_info)": per_call_us(lambda: dispatch(server.core, client, desc, req),
                                                                  count),
                "        req.check()": per_call_us(req.check, count),
                "      reply encode + header + join": per_call_us(reply_encode, count),
                "      _close_unclaimed(req)": per_call_us(lambda: dconn._close_unclaimed(req), count),
                "  sel.get_key(sock).events (after the event)": per_call_us(
                    lambda: server.sel.get_key(fake).events, count),
                "  real recvmsg -> EAGAIN (raise + catch)": per_call_us(eagain, count),
                "echo server on_readable (1 request)": per_call_us(lambda: _echo_server.on_readable(echo, ebuf),
                                                                    count),
            }
            server.sel.unregister(fake)
        finally:
            a.close()
            b.close()
            server.sel.close()
            os.close(server._wakeup_r)
            os.close(server._wakeup_w)
    table("3. daemon CPU time per request, fake socket (no syscalls except where noted; us)",
          [(k, us(v)) for k, v in out.items()], ("", "us/call"))
    return out


# -- 4. real socket syscalls -----------------------------------------------------------------


def syscalls(count: int) -> dict[str, float]:
    _OVERHEAD[0] = _clock_overhead()
    a, b = socket.socketpair()
    try:
        hdr, pay = HEADER.pack(8, 3, 0, 0, 1, 0), b"\1" * 8
        req24 = hdr + pay
        reply48 = b"\0" * 48
        view = memoryview(bytearray(64))
        drain = lambda: b.recv(4096)  # noqa: E731
        out = {
            "client sendmsg([hdr, payload]) 24 B": paired_us(lambda: a.sendmsg([hdr, pay], []), drain, count),
            "client recvmsg(16, ancbuf)": _after_send(a, b, reply48, lambda: a.recvmsg(16, ANC), count),
            "client recv_into(view) 32 B": _recv_into_cost(a, b, view, count),
            "bare client sendall(24 B)": paired_us(lambda: a.sendall(req24), drain, count),
            "bare client recv_into(view) 24 B": _recv_into_cost(a, b, view, count, 24),
            "daemon recvmsg(16)+recvmsg(8)": _two_recvmsg(a, b, req24, count),
            "daemon sendmsg([48 B])": paired_us(lambda: a.sendmsg([memoryview(reply48)], []), drain, count),
            "echo recv(65536) 24 B": _recv_cost(a, b, req24, count),
            "echo sendall(24 B)": paired_us(lambda: a.sendall(req24), drain, count),
        }
    finally:
        a.close()
        b.close()
    table(f"4. socket calls, CPU time one by one on a socketpair (data ready; us; clock overhead "
          f"{_OVERHEAD[0] / 1e3:.2f} us subtracted)",
          [(k, us(v)) for k, v in out.items()], ("", "us/call"))
    return out


def _after_send(a: socket.socket, b: socket.socket, data: bytes, op: Callable[[], Any], count: int) -> float:
    """Median cost of `op` (a read on `a`) with `data` ready in `a`; leftovers drained untimed."""
    a.setblocking(True)
    samples = []
    for _ in range(count):
        b.sendall(data)
        t0 = CPU_CLOCK()
        op()
        samples.append(CPU_CLOCK() - t0 - _OVERHEAD[0])
        a.setblocking(False)
        try:
            while a.recv(4096):
                pass
        except BlockingIOError:
            pass
        a.setblocking(True)
    return H.percentile(samples, 50) / 1e3


def _recv_into_cost(a: socket.socket, b: socket.socket, view: memoryview, count: int, size: int = 32) -> float:
    data = b"\0" * size
    samples = []
    for _ in range(count):
        b.sendall(data)
        t0 = CPU_CLOCK()
        a.recv_into(view[:size])
        samples.append(CPU_CLOCK() - t0 - _OVERHEAD[0])
    return H.percentile(samples, 50) / 1e3


def _recv_cost(a: socket.socket, b: socket.socket, data: bytes, count: int) -> float:
    samples = []
    for _ in range(count):
        b.sendall(data)
        t0 = CPU_CLOCK()
        a.recv(65536)
        samples.append(CPU_CLOCK() - t0 - _OVERHEAD[0])
    return H.percentile(samples, 50) / 1e3


def _two_recvmsg(a: socket.socket, b: socket.socket, data: bytes, count: int) -> float:
    samples = []
    for _ in range(count):
        b.sendall(data)
        t0 = CPU_CLOCK()
        a.recvmsg(16, ANC)
        a.recvmsg(8, ANC)
        samples.append(CPU_CLOCK() - t0 - _OVERHEAD[0])
    return H.percentile(samples, 50) / 1e3


# -- 6. hot spots, each next to a cheaper equivalent -----------------------------------------


def hot_spots(count: int) -> None:
    """Single expressions found hot by sections 2, 3 and 5, timed next to what would do the same."""
    import collections

    from ugem.core.requests import Perm

    flags = 0
    ctrunc = int(socket.MSG_CTRUNC)
    info_payload = s.encode(s.InfoReply(size=4096))[0][0]
    codec = s.InfoReply._codec
    req = s.InfoReq(handle=1)
    desc = BY_OP[Op.GEM_INFO]
    reply_types = {op: d.reply for op, d in BY_OP.items()}
    info_nt = collections.namedtuple("info_nt", [f for f, _ in s.InfoReply.LAYOUT])  # type: ignore[misc]
    r = s.InfoReply(size=4096)

    def import_stmt() -> None:
        from ugem.core.requests import BY_OP  # noqa: F401

    def objectinfo() -> None:
        ObjectInfo(size=r.size, placement="none", madvise="willneed", name=r.name, tiling=r.tiling,
                   stride=r.stride, caching=r.caching, busy=False, pinned=False, userptr=False, readonly=False)

    a, b = socket.socketpair()
    a.setblocking(False)

    def eagain() -> None:
        try:
            a.recvmsg(16, ANC)
        except BlockingIOError:
            pass

    rows = []
    for what, per_req, now, alt, alt_text in (
        ("flags & socket.MSG_CTRUNC (IntFlag)", "client 1, daemon 2", lambda: flags & socket.MSG_CTRUNC,
         lambda: flags & ctrunc, "flags & int constant"),
        ("from ..core.requests import BY_OP in call()", "client 1", import_stmt,
         lambda: reply_types[Op.GEM_INFO], "module-level dict lookup"),
        ("s.decode(InfoReply, payload, [])", "client 1 (daemon: decode req)",
         lambda: s.decode(s.InfoReply, info_payload, []),
         lambda: s.InfoReply(*codec.unpack(info_payload)), "positional cls(*codec.unpack())"),
        ("s.encode(InfoReq)", "client 1 (daemon: encode reply)", lambda: s.encode(req),
         lambda: s.InfoReq._codec.pack(req.handle, req.pad), "codec.pack(fields...)"),
        ("ObjectInfo(...) frozen dataclass", "client 1 (info only)", objectinfo, lambda: info_nt(*range(9)),
         "a namedtuple of 9 (for scale)"),
        ("Perm.PRIVILEGED in desc.perm", "daemon 1", lambda: Perm.PRIVILEGED in desc.perm,
         lambda: desc.perm is Perm.NONE, "precomputed bool / identity test"),
        ("req.check() (generic LAYOUT loop)", "daemon 1", req.check, lambda: req.pad != 0,
         "per-struct precomputed test"),
        ("recvmsg -> EAGAIN (extra read after each frame)", "daemon 1", eagain, lambda: None,
         "return to select(): epoll is level-triggered"),
    ):
        t_now, t_alt = per_call_us(now, count), per_call_us(alt, count)
        rows.append((what, per_req, us(t_now), us(t_alt), alt_text))
    a.close()
    b.close()
    table("6. hot spots next to a cheaper equivalent (CPU us per call)", rows,
          ("expression", "per request", "now", "alternative", "alternative is"))


# -- 5. cProfile -----------------------------------------------------------------------------


def profiles(n: int, top: int) -> None:
    with tempfile.TemporaryDirectory(prefix="ugem-prof-") as d:
        dprof = os.path.join(d, "daemon.prof")
        with instrumented_daemon(d, os.path.join(d, "stats.json"), dprof) as (path, _pid):
            dev = Device(_connect_transport(path))
            try:
                h = dev.create(4096)
                for _ in range(200):
                    dev.info(h)
                prof = cProfile.Profile()
                prof.enable()
                for _ in range(n):
                    dev.info(h)
                prof.disable()
            finally:
                dev.close()
        _print_profile(f"5a. cProfile, client: {n} x Device.info through the daemon", prof, n, top)
        _print_profile(f"5b. cProfile, daemon (whole run incl. start-up; {n + 200} INFO requests)",
                       pstats.Stats(dprof), n + 200, top)


def _print_profile(title: str, prof: Any, n: int, top: int) -> None:
    stats = prof if isinstance(prof, pstats.Stats) else pstats.Stats(prof)
    print(f"\n== {title}; top {top} by own time (us per request, under the profiler)")
    rows = []
    for (filename, line, func), (_cc, nc, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append((tt, ct, nc, f"{_short(filename)}:{line}({func})"))
    rows.sort(reverse=True)
    print(f"  {'own us/req':>10} {'cum us/req':>10} {'calls/req':>9}  function")
    for tt, ct, nc, name in rows[:top]:
        print(f"  {tt / n * 1e6:>10.2f} {ct / n * 1e6:>10.2f} {nc / n:>9.2f}  {name}")


def _short(filename: str) -> str:
    for marker in ("/src/ugem/", "/lib/python3"):
        if marker in filename:
            return filename.split(marker, 1)[1] if marker == "/src/ugem/" else "py:" + os.path.basename(filename)
    return filename


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-cprofile", action="store_true")
    parser.add_argument("--placement", choices=RT.PLACEMENTS, nargs="+", default=["same", "split"],
                        help="end-to-end sections with client and servers pinned to the same CPU, to different "
                             "CPUs, or not pinned (any); default: same and split (diagnostics)")
    ns = parser.parse_args(argv)
    runs, n, count = (3, 500, 3000) if ns.quick else (5, 2000, 20000)
    e2e_by = {pl: end_to_end(runs, n, pl) for pl in ns.placement}
    cc = client_cpu(count)
    dc = daemon_cpu(count)
    sc = syscalls(min(count, 5000))
    hot_spots(count)
    # the decomposition
    client_sys_ugem = sc["client sendmsg([hdr, payload]) 24 B"] + sc["client recvmsg(16, ancbuf)"] + \
        sc["client recv_into(view) 32 B"]
    client_sys_bare = sc["bare client sendall(24 B)"] + sc["bare client recv_into(view) 24 B"]
    server_sys_ugem = sc["daemon recvmsg(16)+recvmsg(8)"] + sc["daemon sendmsg([48 B])"]
    server_sys_bare = sc["echo recv(65536) 24 B"] + sc["echo sendall(24 B)"]
    server_cpu_ugem = dc["Server._on_event (1 INFO request)"]
    server_cpu_bare = dc["echo server on_readable (1 request)"]
    for placement, e2e in e2e_by.items():
        rows = []
        for label, rtt, ccpu, csys, scpu, ssys, busy in (
            ("bare", e2e["rtt bare"], cc["bare roundtrip"], client_sys_bare, server_cpu_bare, server_sys_bare,
             e2e["busy bare"]),
            ("daemon info", e2e["rtt info"], cc["Device.info"], client_sys_ugem, server_cpu_ugem, server_sys_ugem,
             e2e["busy_per_request info"]),
        ):
            rest = rtt - ccpu - csys - scpu - ssys
            rows.append((label, us(rtt), us(ccpu), us(csys), us(scpu), us(ssys), us(rest), us(busy)))
        table(f"decomposition of the round trip, placement {placement} (medians, us)", rows,
              ("", "round trip", "client CPU", "client syscalls", "server CPU", "server syscalls", "rest",
               "server busy (measured)"))
    print("  client/server CPU = fake-socket figures, hot caches (sections 2, 3; the daemon's includes its extra")
    print("  recvmsg->EAGAIN); syscalls = section 4 (data ready, nobody to wake); rest = round trip minus those:")
    print("  waking or switching to the other side, epoll, and the cost of cold caches in the real exchange.")
    print("  server busy (measured) = section 1. With both on one CPU the daemon's sendmsg wakes the client,")
    print("  which preempts the daemon: busy and flush then include the client's turn (req/wake-up > 1).")
    if not ns.no_cprofile:
        profiles(3000 if ns.quick else 20000, 25)
    return 0


if __name__ == "__main__":
    sys.exit(main())
