"""`--metrics ADDR`: Prometheus text exposition over HTTP at /metrics, served by the loop.

The figures are the daemon's `stats()` (read at scrape time through `figures`, never the
core's internals) and its RequestTally (tally.py); `prometheus-client` formats them.
Rules:
- ADDR is `HOST:PORT` (`[::1]:9464` for IPv6; port 0 picks a free one, logged as event
  `metrics_listening`) or, if it contains a `/`, a Unix socket path (replaced if stale,
  refused if live, removed at exit, with the mode of `--socket-mode`). An address that
  does not parse or cannot be bound is bad configuration: InvalidArgument naming
  `--metrics` and the value;
- the endpoint is served by the daemon's own loop (registered in its Poller), so a scrape
  reads the figures on the thread that owns the core: nothing races, nothing is locked.
  A scrape connection is non-blocking: its request (at most `MAX_REQUEST` bytes, one
  read per wake-up) and its response are moved when the socket is ready; one idle for
  `SCRAPE_TIMEOUT_S` is closed. HTTP/1.1 with `Connection: close`: one response each;
- scrapes cannot eat the daemon's fds: past `MAX_SCRAPES` open at once a new one is closed
  at accept, and an accept that fails (out of fds) pauses the endpoint until the next
  `drop_idle` (about a second) instead of spinning on a listener that stays readable;
- GET (or HEAD) /metrics answers 200 with the text format the Accept header asks for
  (OpenMetrics or Prometheus text, as prometheus-client negotiates); another path 404,
  another method 405.
Names follow Prometheus (`ugem_..._bytes`, `..._total`); `COLLECTED` lists them.
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from ..config import BadSetting
from ..errors import InvalidArgument
from .listener import Listener, SocketInUse
from .logs import event
from .poller import READ, WRITE, Poller
from .tally import BUCKETS, SECONDS, RequestTally, op_name

__all__ = ["COLLECTED", "MetricsEndpoint", "StatsCollector"]

log = logging.getLogger("ugem.daemon")
MAX_REQUEST = 16384
MAX_SCRAPES = 8
SCRAPE_TIMEOUT_S = 10.0
_ADDR_TEXT = "HOST:PORT (e.g. 127.0.0.1:9464) or a Unix socket path (containing a /)"

GAUGES = (  # stats() key, metric name, help
    ("objects", "ugem_objects", "Live buffer objects"),
    ("handles", "ugem_handles", "Handles held by all clients"),
    ("names", "ugem_names", "Flink names"),
    ("clients", "ugem_clients", "Connected clients"),
    ("resident_bytes", "ugem_resident_bytes", "System memory pages held by objects"),
    ("spilled_bytes", "ugem_spilled_bytes", "Bytes of objects spilled to disk"),
    ("vram_bytes", "ugem_vram_bytes", "Bytes of objects in device memory"),
    ("pinned_bytes", "ugem_pinned_bytes", "Bytes of pinned objects"),
    ("purgeable_bytes", "ugem_purgeable_bytes", "Resident bytes of DONTNEED objects"),
    ("memfds", "ugem_memfds", "Object memfds open"),
    ("memfd_limit", "ugem_memfd_limit", "Object memfds the fd limit allows"),
    ("pooled_bytes", "ugem_pooled_bytes", "Pages of freed objects' memfds kept for reuse"),
    ("pooled_memfds", "ugem_pooled_memfds", "Freed objects' memfds kept for reuse"),
    ("system_budget", "ugem_system_budget_bytes", "Resident memory budget"),
    ("vram_size", "ugem_vram_size_bytes", "Device memory size"),
    ("suspended", "ugem_suspended", "1 while the device is suspended"),
)
COUNTERS = (
    ("purged_total", "ugem_purged", "Objects purged"),
    ("spilled_total", "ugem_spilled", "Objects spilled to disk"),
    ("restored_total", "ugem_restored", "Objects restored from disk"),
    ("evicted_total", "ugem_evicted", "Objects evicted from device memory"),
    ("bytes_moved_total", "ugem_bytes_moved", "Bytes copied between device memory, system memory and disk"),
    ("recycled_total", "ugem_recycled", "Freed objects' memfds handed out again"),
)
COLLECTED = ([name for _, name, _ in GAUGES] + [name + "_total" for _, name, _ in COUNTERS]
             + ["ugem_requests_total", "ugem_errors_total", "ugem_request_duration_seconds"])


class StatsCollector(Collector):
    def __init__(self, figures: Callable[[], Mapping[str, Any]], tally: RequestTally) -> None:
        self.figures = figures
        self.tally = tally

    def collect(self) -> Iterator[Metric]:
        figures = self.figures()
        for key, name, text in GAUGES:
            yield GaugeMetricFamily(name, text, value=float(figures[key]))
        for key, name, text in COUNTERS:
            yield CounterMetricFamily(name, text, value=figures[key])
        yield from self._requests()

    def _requests(self) -> Iterator[Metric]:
        tally = self.tally
        requests = CounterMetricFamily("ugem_requests", "Requests answered, by op", labels=["op"])
        latency = HistogramMetricFamily("ugem_request_duration_seconds", "Seconds from a request's arrival to "
                                        "its reply (waits included), by op", labels=["op"])
        for op, row in sorted(tally.ops.items()):
            cumulative, buckets = 0.0, []
            for bound, n in zip((*map(str, BUCKETS), "+Inf"), row[:SECONDS], strict=True):
                cumulative += n
                buckets.append((bound, cumulative))
            requests.add_metric([op_name(op)], cumulative)
            latency.add_metric([op_name(op)], buckets, sum_value=row[SECONDS])
        errors = CounterMetricFamily("ugem_errors_total", "Requests answered with an error, by op and errno",
                                     labels=["op", "errno"])
        for (op, code), n in sorted(tally.errors.items()):
            errors.add_metric([op_name(op), _errno_name(code)], n)
        yield requests
        yield errors
        yield latency


def _errno_name(code: int) -> str:
    return errno.errorcode.get(code, str(code))


def _bind_tcp(text: str) -> socket.socket:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise InvalidArgument(f"--metrics: {text!r} is not {_ADDR_TEXT}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]") or None, int(port),
                                                             type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise InvalidArgument(f"--metrics: {text!r} cannot be used: {exc.strerror}") from None
    sock = socket.socket(family, kind | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(16)
    except OSError as exc:
        sock.close()
        raise InvalidArgument(f"--metrics: {text!r} cannot be used: {exc.strerror or exc}") from None
    return sock


class MetricsEndpoint:
    """The listening socket of `--metrics` and its scrape connections."""

    def __init__(self, text: str, socket_mode: int = 0o600) -> None:
        self.unix: Listener | None = None
        if "/" in text:
            try:
                self.unix = Listener(text, is_default=False, mode=socket_mode)
            except (BadSetting, SocketInUse) as exc:
                problem = exc.problem if isinstance(exc, BadSetting) else "is in use by another process"
                raise InvalidArgument(f"--metrics: {text!r} {problem}") from None
            assert self.unix.sock is not None
            self.sock = self.unix.sock
            self.address = text
        else:
            self.sock = _bind_tcp(text)
            host, port = self.sock.getsockname()[:2]
            self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._scrapes: dict[_Scrape, None] = {}
        self._poller: Poller | None = None
        self._paused = False  # the listener is out of the poller after a failed accept
        self._registry = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self._registry)  # process_open_fds, process_max_fds, memory, CPU

    def start(self, poller: Poller, collector: Collector) -> None:
        self._poller = poller
        self._registry.register(collector)
        poller.register(self.sock.fileno(), READ, self._accept)
        event(log, logging.INFO, "metrics_listening", "metrics: serving /metrics at %s", self.address,
              address=self.address)

    def _accept(self, events: int) -> None:
        assert self._poller is not None
        while True:
            try:
                sock, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of fds: pause until drop_idle; the scraper retries
                log.warning("metrics: accept failed, pausing the endpoint for a second: %s", exc)
                self._poller.unregister(self.sock.fileno())
                self._paused = True
                return
            if len(self._scrapes) >= MAX_SCRAPES:
                sock.close()
                continue
            sock.setblocking(False)
            scrape = _Scrape(sock, self)
            self._scrapes[scrape] = None
            self._poller.register(sock.fileno(), READ, scrape.on_event)

    def render(self, accept: str) -> tuple[bytes, str]:
        encoder, content_type = choose_encoder(accept)
        return encoder(self._registry), content_type

    def want_write(self, scrape: _Scrape) -> None:
        assert self._poller is not None
        self._poller.modify(scrape.sock.fileno(), WRITE, scrape.on_event)

    def finish(self, scrape: _Scrape) -> None:
        if scrape in self._scrapes:
            del self._scrapes[scrape]
            assert self._poller is not None
            self._poller.unregister(scrape.sock.fileno())
            scrape.sock.close()

    def drop_idle(self, now: float) -> None:
        for scrape in [s for s in self._scrapes if now - s.since > SCRAPE_TIMEOUT_S]:
            self.finish(scrape)
        if self._paused and self._poller is not None:
            self._paused = False
            self._poller.register(self.sock.fileno(), READ, self._accept)

    def close(self) -> None:
        for scrape in list(self._scrapes):
            self.finish(scrape)
        if self._poller is not None:
            if not self._paused:
                self._poller.unregister(self.sock.fileno())
            self._poller = None
        if self.unix is not None:
            self.unix.close()
        else:
            self.sock.close()


class _Scrape:
    """One HTTP request and its response."""

    def __init__(self, sock: socket.socket, endpoint: MetricsEndpoint) -> None:
        self.sock = sock
        self.endpoint = endpoint
        self.request = bytearray()
        self.response: memoryview | None = None
        self.since = time.monotonic()

    def on_event(self, events: int) -> None:
        try:
            if self.response is None:
                self._read()
            if self.response is not None:
                self._write()
        except OSError:  # the scraper went away
            self.endpoint.finish(self)

    def _read(self) -> None:
        try:
            data = self.sock.recv(MAX_REQUEST)
        except BlockingIOError:
            return
        if not data:
            self.endpoint.finish(self)
            return
        self.request += data
        if b"\r\n\r\n" in self.request or len(self.request) >= MAX_REQUEST:
            self.response = memoryview(self._respond())
            self.endpoint.want_write(self)

    def _respond(self) -> bytes:
        head, _, _ = bytes(self.request).partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        headers = dict(line.partition(":")[::2] for line in lines[1:])
        accept = next((v.strip() for k, v in headers.items() if k.strip().lower() == "accept"), "")
        if len(parts) != 3 or b"\r\n\r\n" not in self.request:
            return _http(400, "Bad Request", b"bad request\n")
        method, target = parts[0], parts[1].partition("?")[0]
        if method not in ("GET", "HEAD"):
            return _http(405, "Method Not Allowed", b"only GET and HEAD\n")
        if target != "/metrics":
            return _http(404, "Not Found", b"ugem serves /metrics\n")
        body, content_type = self.endpoint.render(accept)
        return _http(200, "OK", body, content_type, head_only=method == "HEAD")

    def _write(self) -> None:
        assert self.response is not None
        try:
            sent = self.sock.send(self.response)
        except BlockingIOError:
            return
        self.response = self.response[sent:]
        if not self.response:
            self.endpoint.finish(self)


def _http(status: int, reason: str, body: bytes, content_type: str = "text/plain; charset=utf-8",
          head_only: bool = False) -> bytes:
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n").encode()
    return head if head_only else head + body
