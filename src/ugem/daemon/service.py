"""Service: what the daemon tells its operator, around the server (SPEC §4 service conventions).

It owns the sd_notify channel (systemd.py), the metrics endpoint (metrics.py, optional)
and the request tally (tally.py), and reads the core only through `statistics()` and
its counters. It logs each client's arrival and end (`connected`, `disconnected`). The
server calls it at four more points:
- `start(core, poller)` once the loop begins: READY=1 with a first STATUS, and the
  metrics endpoint starts serving;
- `tick(now)` about once a second: STATUS=... is sent when the figures it shows changed
  (so at most once a second), a `reclaim` log line sums up what was purged, spilled,
  restored and evicted since the last one (at most one line every `SUMMARY_S` seconds),
  and idle scrapes and quiet quota refusals are dealt with;
- `stopping()` as shutdown begins: STOPPING=1, a last `reclaim` summary, and the count
  of quota refusals still held back;
- `close()` at the end: the endpoint and the notify socket are closed.
A client that ends holding handles, mappings or transfers is logged as `client_cleanup`
(with `exited`: whether its process had died, i.e. crash cleanup) before the core
releases them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from ..errors import InvalidArgument
from .logs import LOG_FORMATS, event
from .systemd import Notifier
from .tally import RequestTally

if TYPE_CHECKING:
    from ..core.client import Client
    from ..core.core import Core
    from .metrics import MetricsEndpoint
    from .poller import Poller

__all__ = ["SUMMARY_S", "Service", "check_service_flags", "open_service", "status_line"]

log = logging.getLogger("ugem.daemon")
SUMMARY_S = 5.0
_PF_EXITING = 0x4  # include/linux/sched.h
_RECLAIM = ("purged_total", "spilled_total", "restored_total", "evicted_total", "bytes_moved_total")


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def process_exited(pid: int) -> bool:
    """Whether process `pid` has exited or is exiting (a client that crashed, or ended
    without closing what it held). The kernel closes a dying process's sockets after it
    marks it exiting (PF_EXITING in /proc/PID/stat) and before it becomes a zombie, so the
    daemon sees the hang-up while one of the three shows."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return True  # gone (or never visible in our pid namespace: pid 0)
    fields = stat[stat.rindex(b")") + 2:].split()  # after "pid (comm) "
    return fields[0] in (b"Z", b"X") or bool(int(fields[6]) & _PF_EXITING)


def status_line(objects: int, clients: int, resident: int) -> str:
    """What `systemctl status` shows as the daemon's status."""
    return f"{objects} objects, {clients} clients, {_size(resident)} resident"


class Service:
    def __init__(self, notifier: Notifier | None = None, metrics: MetricsEndpoint | None = None) -> None:
        self.notifier = notifier if notifier is not None else Notifier(None)
        self.metrics = metrics
        self.tally = RequestTally()
        self._core: Core | None = None
        self._status = ""
        self._reclaimed: dict[str, int] = {}
        self._last_summary = float("-inf")

    def _figures(self) -> Mapping[str, Any]:
        assert self._core is not None
        return self._core.statistics()

    def start(self, core: Core, poller: Poller) -> None:
        self._core = core
        self._reclaimed = {key: core.memory.totals.stats()[key] for key in _RECLAIM}
        if self.metrics is not None:
            from .metrics import StatsCollector  # imported already: the endpoint was bound

            self.metrics.start(poller, StatsCollector(self._figures, self.tally))
        self._status = self._status_now()
        self.notifier.send("READY=1", "STATUS=" + self._status)

    def _status_now(self) -> str:
        core = self._core
        assert core is not None
        return status_line(len(core.objects), len(core.clients), core.memory.resident)

    def tick(self, now: float) -> None:
        if self._core is None:
            return
        if self.notifier.enabled:
            status = self._status_now()
            if status != self._status:
                self._status = status
                self.notifier.send("STATUS=" + status)
        if now - self._last_summary >= SUMMARY_S:
            self._summarize(now)
        if self.metrics is not None:
            self.metrics.drop_idle(now)
        self.tally.expired(now)

    def _summarize(self, now: float) -> None:
        assert self._core is not None
        counters = self._core.memory.totals.stats()
        moved: dict[str, Any] = {key.removesuffix("_total"): counters[key] - self._reclaimed[key] for key in _RECLAIM}
        if not (moved["purged"] or moved["spilled"] or moved["restored"] or moved["evicted"]):
            return  # bytes moved alone is device traffic, not reclaim
        self._reclaimed = {key: counters[key] for key in _RECLAIM}
        self._last_summary = now
        event(log, logging.INFO, "reclaim", "reclaim: %d purged, %d spilled, %d restored, %d evicted, %s moved",
              moved["purged"], moved["spilled"], moved["restored"], moved["evicted"], _size(moved["bytes_moved"]),
              **moved)

    def connected(self, client: Client) -> None:
        creds = client.creds
        event(log, logging.INFO, "client_connect", "client %d connected: pid %d uid %d", client.id, creds.pid,
              creds.uid, client=client.id, pid=creds.pid, uid=creds.uid)

    def disconnected(self, client: Client, reason: str) -> None:
        """Log a client's end, before its holdings are released: one that went away holding
        handles, mappings or transfers (it crashed, or never closed them) is cleaned up
        (`client_cleanup`); at shutdown the daemon releases everyone, which is no news."""
        creds = client.creds
        ids: dict[str, Any] = {"client": client.id, "pid": creds.pid, "uid": creds.uid}
        if (client.handles or client.mappings or client.transfers) and reason != "shutdown":
            exited = process_exited(creds.pid)
            event(log, logging.INFO, "client_cleanup", "client %d (pid %d) %s holding %d handles, %d mappings "
                  "(%d pinned bytes): releasing them", client.id, creds.pid,
                  "exited" if exited else "closed its connection", len(client.handles), len(client.mappings),
                  client.pinned_bytes, **ids, exited=exited, handles=len(client.handles),
                  mappings=len(client.mappings), transfers=len(client.transfers), pinned_bytes=client.pinned_bytes)
        event(log, logging.INFO, "client_disconnect", "client %d disconnected (%s)", client.id, reason, **ids,
              reason=reason)

    def stopping(self) -> None:
        self.notifier.send("STOPPING=1", "STATUS=shutting down")
        self.tally.expired(float("inf"))  # quota refusals held back
        if self._core is not None:
            self._summarize(float("inf"))  # what happened since the last summary

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        self.notifier.close()


def check_service_flags(log_format: str, metrics: str | None,
                        name: Callable[[str], str] = lambda dest: "--" + dest.replace("_", "-")) -> None:
    """`--log-format`, and the form of `--metrics` (bound later by `open_service`); `name`
    names a setting in errors (a flag, or a config file key)."""
    if log_format not in LOG_FORMATS:
        raise InvalidArgument(f"{name('log_format')}: {log_format!r} is not one of {', '.join(LOG_FORMATS)}")
    if metrics is not None and "/" not in metrics and not metrics.rpartition(":")[2].isdigit():
        raise InvalidArgument(f"{name('metrics')}: {metrics!r} is not HOST:PORT (e.g. 127.0.0.1:9464) or a Unix socket "
                              f"path (containing a /)")


def open_service(metrics: str | None, socket_mode: int) -> Service:
    """sd_notify (if NOTIFY_SOCKET is set) and the `--metrics` endpoint (InvalidArgument,
    naming the flag, if it cannot be bound)."""
    if metrics is None:
        return Service(Notifier())
    from .metrics import MetricsEndpoint  # prometheus-client is imported only when metrics are served

    return Service(Notifier(), MetricsEndpoint(metrics, socket_mode))
