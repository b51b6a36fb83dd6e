"""Server: the listening socket, the epoll loop, signals and shutdown (SPEC §4).

Rules:
- one thread, one epoll loop (`poller.py`) owns the core: no locks in the core;
- signal handlers only record the signal (`signal.set_wakeup_fd` wakes the loop); the loop
  calls `handle_<signame>()` for each (gunicorn's Arbiter);
- the listening socket is a `Listener` (listener.py: PATH.lock, stale sockets, another
  daemon on PATH); the CLI binds it before the Server exists, so a socket that cannot be
  used leaves no spill directory behind; device memory, a spill directory or a preloaded
  file the Server cannot set up is BadSetting naming the key, with whatever it made
  undone (setup.py); the preloaded files' copies start before the loop and run on the
  job workers while it serves, and a copy still running at shutdown is cancelled;
- connections are counted per uid from accept; those that have not completed HELLO wait
  in the `Lobby` (lobby.py), which says which to close at accept (a uid past
  `uid_max_clients` plus a small slack), which to drop for fds, and which are overdue;
- fd room: the kernel hands out the lowest free fd, so an accepted connection numbered
  within `FD_ROOM` of the fd limit, or accept failing with EMFILE/ENFILE, means fds are
  nearly gone. Then up to `FD_ROOM` connections still in the lobby are dropped (oldest
  first, from the uid holding the most connections): a flood of silent connections cannot
  keep another uid from connecting and being served. Only when none can go does accepting
  pause briefly (100 ms) instead of spinning;
- `stall_timeout` seconds after accept, a connection that has not completed HELLO is
  dropped; so is one stalled (no progress) in the middle of a frame for that long;
- once a second the cyclic garbage collector runs over what is new, then everything that
  survived is frozen (`gc.freeze`): a full collection over a million objects stalls
  every client for 0.3 s, a collection over one second's worth does not. Frozen objects
  are still freed by reference counting; only a cycle formed after freezing would stay;
- once a second each connection's lazy channel (lazy.py) is served (`serve_lazy`), and a
  connection `behind` on it is served again after each turn of the loop (polled without
  waiting meanwhile);
- parked requests (connection.py) are stepped again once `Call.ready` (core/call.py);
  after each turn of the loop the background reclaim both modes share (`after_request`)
  starts its jobs on the worker threads, and real memory pressure (pressure.py) shrinks;
- `exit_idle` (`--exit-idle`; None: never): once no connection has been open for that
  long (counted from start, and from the last connection's end), the daemon shuts down
  as on SIGTERM. A last accept before deciding takes a connection still in the backlog;
- on SIGTERM/SIGINT: finish the request in hand, release every client, remove the socket;
- what the operator sees goes through the `Service` (service.py): sd_notify, the metrics
  endpoint (its fds are registered in the poller with their handler as the tag), the
  request tally the connections count into, and the client/cleanup/reclaim log events.
"""

from __future__ import annotations

import collections
import errno
import gc
import logging
import os
import resource
import signal
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..config import Config
from ..core.call import after_request
from ..core.client import Credentials
from ..errors import RemoteProtocolError
from ..fd import drain, pipe
from .connection import Connection
from .listener import Listener
from .lobby import Lobby
from .logs import event
from .poller import READ, WRITE, Poller
from .pressure import PressureWatch
from .service import Service
from .setup import open_core
from .workers import JobRunner

__all__ = ["FD_ROOM", "Server", "ServerOptions"]

log = logging.getLogger("ugem.daemon")
SIGNALS = (signal.SIGTERM, signal.SIGINT)
_monotonic = time.monotonic
FD_ROOM = 16  # fds kept free by dropping connections that have not completed HELLO


@dataclass(frozen=True)
class ServerOptions:
    """The daemon's own options, validated (their defaults: serve_options.DAEMON_DEFAULTS)."""

    socket_path: str
    socket_is_default: bool
    socket_mode: int
    stall_timeout: float
    exit_idle: float | None  # seconds without a connection before shutting down (None: never)


class Server:
    def __init__(self, config: Config, options: ServerOptions, listener: Listener | None = None,
                 service: Service | None = None) -> None:
        self.config = config
        self.options = options
        self.service = service if service is not None else Service()
        self.gpu, self.core = open_core(config)
        self.core.hold_while_suspended = self.core.shares_may_lag = self.core.descriptions_leave = True  # (core.py)
        self.sel = Poller(lambda tag: tag.client if tag.__class__ is Connection else None)
        self.listener: Listener | None = None
        self.connections: dict[int, Connection] = {}
        self.lobby = Lobby(self.core)  # connections that have not completed HELLO
        self.fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self._stop = self._signals_installed = False
        self._accept_paused_until = 0.0
        self._last_stall_check = 0.0
        self._idle_since: float | None = time.monotonic()  # no connection open since then
        self._wakeup_r, self._wakeup_w = pipe(os.O_NONBLOCK | os.O_CLOEXEC)  # signals -> loop
        self.runner = JobRunner()
        self.core.backing.close_later(self.runner.call_soon)  # expired pooled memfds: freed off the loop
        for job in self.core.memory.take_background():  # preloaded objects load while we serve
            self.runner.submit(job)
        self.sel.register(self.runner.fileno(), READ, "jobs")
        self.parked: set[Connection] = set()  # requests waiting for jobs, fences, deadlines or resume
        self.behind: set[Connection] = set()  # connections with lazy frames left for their next turn (lazy.py)
        self._gpu_r, self._gpu_w = pipe(os.O_NONBLOCK | os.O_CLOEXEC)  # GPU thread -> loop
        self.sel.register(self._gpu_r.fd, READ, "gpu")
        self.gpu.set_notify(self._gpu_notify)
        self.pressure = PressureWatch()
        if listener is not None:
            self._listen(listener)

    # -- setup -----------------------------------------------------------------------

    def bind(self) -> None:
        """Bind the socket of `options` (SocketInUse, BadSetting) and listen on it."""
        options = self.options
        self._listen(Listener(options.socket_path, options.socket_is_default, options.socket_mode))

    def _listen(self, listener: Listener) -> None:
        self.listener = listener
        self.sel.register(listener.fileno(), READ, "listener")

    def install_signals(self) -> None:
        """Route SIGTERM/SIGINT into the loop; idempotent. Call before announcing the
        socket: a signal sent right after `ugem: listening on` must still shut down cleanly."""
        if self._signals_installed:
            return
        self._signals_installed = True
        signal.set_wakeup_fd(self._wakeup_w.fd, warn_on_full_buffer=False)
        for sig in SIGNALS:
            signal.signal(sig, self._on_signal)
        self.sel.register(self._wakeup_r.fd, READ, "wakeup")

    def _on_signal(self, signum: int, frame: object) -> None:
        pass  # only wakes the loop; the byte in the wakeup pipe says which signal

    # -- the loop --------------------------------------------------------------------

    def serve_forever(self) -> None:
        self.install_signals()
        self.service.start(self.core, self.sel)
        try:
            while not self._stop:
                self._step()
        finally:
            self.shutdown()

    def _step(self) -> None:
        now = _monotonic()
        if self._accept_paused_until and now >= self._accept_paused_until and self.listener is not None:
            self._accept_paused_until = 0.0
            self.sel.register(self.listener.fileno(), READ, "listener")
        timeout = 0.0 if self.behind else self._timeout(now) if self.parked else 1.0
        exit_idle = self.options.exit_idle
        if exit_idle is not None and self._idle_since is not None:
            timeout = min(timeout, max(0.0, self._idle_since + exit_idle - now))
        for fd, _events in self.sel.poll(timeout):
            tag = self.sel.tags.get(fd)  # (None: unregistered while an fd before it was served)
            if tag.__class__ is Connection:
                if not tag.closed:
                    self._guard(tag, tag.on_writable if tag.outbox else tag.on_readable)
            elif tag == "listener":
                self._accept()
            elif tag == "wakeup":
                self._read_signals()
            elif tag == "jobs":
                self._jobs_done()
            elif tag == "gpu":
                drain(self._gpu_r)
            elif tag is not None:  # the service's own fds (metrics endpoint) carry their handler as the tag
                tag(_events)
        if self.parked:
            self._wake(_monotonic())
        if self.behind:  # their lazy frames' next turn (lazy.py)
            behind, self.behind = self.behind, set()
            for conn in behind:
                if not conn.closed:
                    self._guard(conn, conn.serve_lazy)
        for job in after_request(self.core.memory):  # the background reclaim both modes share
            self.runner.submit(job)
        if exit_idle is not None and self._idle_since is not None:
            self._check_idle(exit_idle)
        if now - self._last_stall_check >= 1.0:  # scans over all clients, at most once a second
            self._last_stall_check = now
            self._drop_stalled(now)
            for conn in [c for c in self.connections.values() if c.lazy is not None]:
                self._guard(conn, conn.serve_lazy)  # (lazy.py)
            self._check_pressure()
            self.service.tick(now)
            gc.collect()  # only the objects not frozen yet: about one second's worth
            gc.freeze()

    def _check_idle(self, limit: float) -> None:
        """Shut down once no connection has been open for `limit` seconds."""
        assert self._idle_since is not None
        if time.monotonic() - self._idle_since < limit:
            return
        if self.listener is not None and not self._accept_paused_until:
            self._accept()  # a connection waiting in the backlog is a client: stay
        if not self.connections:
            event(log, logging.INFO, "shutdown", "no client for %g s (--exit-idle): shutting down", limit)
            self._stop = True

    def _read_signals(self) -> None:
        try:
            data = os.read(self._wakeup_r.fd, 64)
        except BlockingIOError:
            return
        for signum in data:
            name = signal.Signals(signum).name.lower()
            handler = getattr(self, f"handle_{name}", None)
            if handler is not None:
                handler()

    def handle_sigterm(self) -> None:
        event(log, logging.INFO, "shutdown", "SIGTERM: shutting down", signal="SIGTERM")
        self._stop = True

    def handle_sigint(self) -> None:
        event(log, logging.INFO, "shutdown", "SIGINT: shutting down", signal="SIGINT")
        self._stop = True

    def _accept(self) -> None:
        assert self.listener is not None
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE) and self._make_fd_room(f"accept: {exc.strerror}"):
                    continue
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("accept: %s; pausing new connections for 100 ms", exc)
                    self.sel.unregister(self.listener.fileno())
                    self._accept_paused_until = time.monotonic() + 0.1
                    return
                raise
            self._admit(sock)
            if sock.fileno() >= self.fd_limit - FD_ROOM:
                self._make_fd_room(f"fd {sock.fileno()} of {self.fd_limit}")

    def _admit(self, sock: socket.socket) -> None:
        """Register a new connection, or close it at once if its uid holds too many."""
        pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                             struct.calcsize("3i")))
        privileged = uid == 0 or uid == os.getuid()
        if self.lobby.turns_away(uid, privileged):
            log.debug("uid %d holds too many connections: closing one more from pid %d", uid, pid)
            sock.close()
            return
        sock.setblocking(False)
        client = self.core.client_open(Credentials(pid, uid, gid), privileged, admit=False)
        conn = Connection(sock, self.core, client, self.service.tally)
        self.connections[sock.fileno()] = conn
        self._idle_since = None
        self.lobby.enter(conn)
        self.sel.register(sock.fileno(), READ, conn)
        self.service.connected(client)

    def _make_fd_room(self, why: str) -> int:
        """Drop up to FD_ROOM connections from the lobby; how many went."""
        dropped = self.lobby.evictees(FD_ROOM)
        for conn in dropped:
            self._drop(conn, "fd_room")
        if dropped:
            uids = collections.Counter(conn.client.creds.uid for conn in dropped)
            log.warning("short of fds (%s): dropped %d connections that had not sent HELLO (%s)", why, len(dropped),
                        ", ".join(f"uid {uid}: {n}" for uid, n in uids.items()))
        return len(dropped)

    def _guard(self, conn: Connection, step: Callable[[], None]) -> None:
        """Run one step of a connection; drop it (only it) on a protocol or socket error."""
        greeted = conn.greeted
        try:
            step()
        except RemoteProtocolError as exc:
            client = conn.client
            event(log, logging.WARNING, "protocol_violation", "client %d (pid %d): protocol violation, dropping: %s",
                  client.id, client.creds.pid, exc, client=client.id, pid=client.creds.pid, uid=client.creds.uid)
            self._drop(conn, "protocol_violation")
            return
        except OSError as exc:
            if not isinstance(exc, ConnectionError):
                log.warning("client %d: socket error, dropping: %s", conn.client.id, exc)
            self._drop(conn, "refused" if isinstance(exc, ConnectionRefusedError) else
                       "closed" if isinstance(exc, ConnectionError) else "socket_error")
            return
        if not greeted and conn.greeted:
            self.lobby.leave(conn)
        if conn.behind:
            self.behind.add(conn)
        parked = conn.parked  # (no local may hold the Pending: its traceback holds this frame)
        if parked is not None and parked[1].pending is not None:  # must wait: start its jobs, stop reading it
            for job in parked[1].pending.jobs:
                self.runner.submit(job)
            self.parked.add(conn)
        if conn.events != READ or conn.outbox or conn.parked:  # else nothing changes
            self._sync_events(conn)

    def _sync_events(self, conn: Connection) -> None:
        wanted = WRITE if conn.outbox else (0 if conn.parked else READ)
        if wanted == conn.events:
            return
        if conn.events == 0:
            self.sel.register(conn.sock.fileno(), wanted, conn)
        elif wanted == 0:
            self.sel.unregister(conn.sock.fileno())
        else:
            self.sel.modify(conn.sock.fileno(), wanted, conn)
        conn.events = wanted

    def _jobs_done(self) -> None:
        for job in self.runner.completed():
            self.core.memory.finish(job)

    def _gpu_notify(self, seqno: int) -> None:
        """Called on the device's thread after each op: wake the loop if a parked request
        may be waiting for it (cheap, never raises)."""
        if not self.parked:
            return
        try:
            os.write(self._gpu_w.fd, b"d")
        except BlockingIOError:
            pass  # a wakeup is already waiting

    def _wake(self, now: float) -> None:
        """Re-run parked requests whose wait is over (any of them may park again)."""
        for conn in list(self.parked):
            if conn.closed or conn.parked is None:
                self.parked.discard(conn)
            elif conn.parked[1].ready(self.core, now):
                self.parked.discard(conn)
                self._guard(conn, conn.resume)

    def _timeout(self, now: float) -> float:
        deadlines = [c.pending.deadline for c in self.parked if c.pending and c.pending.deadline is not None]
        return max(0.0, min([1.0, *(d - now for d in deadlines)]))

    def _check_pressure(self) -> None:
        target = self.pressure.check(self.core.memory.held)
        if target is not None:
            jobs = self.core.memory.shrink(target)
            event(log, logging.INFO, "memory_pressure", "memory pressure: shrinking to %d bytes (%d spills)", target,
                  len(jobs), target=target, spills=len(jobs))
            for job in jobs:
                self.runner.submit(job)

    def _drop(self, conn: Connection, reason: str) -> None:
        """Close a connection and release its client; `reason` is logged (client_disconnect)."""
        self.connections.pop(conn.sock.fileno(), None)
        if not self.connections:
            self._idle_since = time.monotonic()
        if not conn.greeted:
            self.lobby.leave(conn)
        if conn.events:
            self.sel.unregister(conn.sock.fileno())
            conn.events = 0
        self.service.disconnected(conn.client, reason)
        conn.close()

    def _drop_stalled(self, now: float) -> None:
        limit = self.options.stall_timeout
        late = self.lobby.overdue(now, limit)
        for conn in late:
            self._drop(conn, "no_hello")
        if late:
            uids = collections.Counter(conn.client.creds.uid for conn in late)
            log.warning("dropped %d connections that sent no HELLO within %g s (%s)", len(late), limit,
                        ", ".join(f"uid {uid}: {n}" for uid, n in uids.items()))
        for conn in list(self.connections.values()):
            since = conn.stalled_since
            if since is not None and now - since > limit:
                log.warning("client %d stalled mid-frame for %.0f s, dropping", conn.client.id, now - since)
                self._drop(conn, "stalled")
        for conn in list(self.parked):  # not read while parked: notice a client that went away
            if conn.peer_closed():
                self.parked.discard(conn)
                self._drop(conn, "closed")

    # -- teardown --------------------------------------------------------------------

    def shutdown(self) -> None:
        self.service.stopping()
        for conn in list(self.parked):  # held work fails: the daemon is going away
            conn.fail_parked(errno.ESHUTDOWN, "the ugem daemon is shutting down")
            self._guard(conn, conn.flush)
        self.parked.clear()
        self.core.preloads.cancel()  # a file still loading stops at its next chunk
        for job in self.runner.shutdown():  # no copy may outlive the fds it uses
            self.core.memory.finish(job)
        self.gpu.set_notify(None)
        self.gpu.close()
        for conn in list(self.connections.values()):
            self._drop(conn, "shutdown")
        if self.listener is not None:
            if not self._accept_paused_until:
                self.sel.unregister(self.listener.fileno())
            self.listener.close()
            self.listener = None
        self.core.preloads.release()
        self.core.backing.close()
        self.service.close()
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        self.sel.close()
        for fd in (self._wakeup_r, self._wakeup_w, self._gpu_r, self._gpu_w):
            fd.close()
