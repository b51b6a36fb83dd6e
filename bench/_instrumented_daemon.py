"""`ugem serve` with timers, for profile_roundtrip.py. Nothing under src/ is changed: the
timers are wrapped around the daemon's own functions at start-up, in this process only.

    python bench/_instrumented_daemon.py STATS_PATH [--cprofile PROF_PATH] serve --socket ... [flags]

Records, per op name, and writes as JSON to STATS_PATH when the daemon stops (SIGTERM):
- busy: per wake-up with events, from `select()` returning to the next `select()` call
  (the daemon's whole user+syscall time for the request(s) served in that wake-up);
  requests_per_wakeup: how many requests that wake-up served (a client that sends its next
  request while the daemon is still in its read loop gets served in the same wake-up);
  busy_per_request: busy / requests of that wake-up;
- on_readable: per Connection.on_readable call (the read loop: recvmsg x3, parse, _serve);
- serve: per request, Connection._serve (decode + dispatch + reply encode + send);
- dispatch: per request, core.requests.dispatch (permission, check(), handler);
- flush: per reply, Connection.flush (the sendmsg).
Each wrapper adds ~0.1-0.2 us of its own. With --cprofile, the daemon also runs under
cProfile (stats dumped to PROF_PATH; the timers are then meaningless).
"""

from __future__ import annotations

import cProfile
import functools
import json
import sys
import time
from collections import defaultdict
from typing import Any

clock = time.perf_counter_ns
STATS: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
LAST_OP = ["?"]
SERVED = [0]  # requests served since the last select() call


def _op_name(op: int) -> str:
    from ugem.wire.frames import Op

    try:
        return Op(op).name
    except ValueError:
        return str(op)


def timed(key: str, fn: Any, op_of: Any = None) -> Any:
    table = STATS[key]

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if op_of is not None:
            LAST_OP[0] = op_of(args)
            SERVED[0] += 1
        t0 = clock()
        try:
            return fn(*args, **kwargs)
        finally:
            table[LAST_OP[0]].append(clock() - t0)
    return wrapper


class TimedSelector:
    """Proxy for the server's selector: measures the busy time between select() calls."""

    def __init__(self, sel: Any) -> None:
        self._sel = sel
        self._returned = 0
        self._had_events = False

    def select(self, timeout: float | None = None) -> Any:
        now = clock()
        if self._had_events:
            served = SERVED[0]
            STATS["busy"][LAST_OP[0]].append(now - self._returned)
            STATS["requests_per_wakeup"][LAST_OP[0]].append(served)
            if served:
                STATS["busy_per_request"][LAST_OP[0]].append((now - self._returned) // served)
        SERVED[0] = 0
        events = self._sel.select(timeout)
        self._returned = clock()
        self._had_events = bool(events)
        return events

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sel, name)


def install() -> None:
    from ugem.daemon import connection, server

    connection.dispatch = timed("dispatch", connection.dispatch)
    connection.Connection._serve = timed("serve", connection.Connection._serve,
                                         op_of=lambda a: _op_name(a[1].op))
    connection.Connection.flush = timed("flush", connection.Connection.flush)
    connection.Connection.on_readable = timed("on_readable", connection.Connection.on_readable)
    original_init = server.Server.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self.sel = TimedSelector(self.sel)

    server.Server.__init__ = init


def main() -> int:
    argv = sys.argv[1:]
    stats_path = argv.pop(0)
    prof_path = None
    if argv and argv[0] == "--cprofile":
        argv.pop(0)
        prof_path = argv.pop(0)
    install()
    from ugem.cli import main as ugem_main

    profiler = cProfile.Profile() if prof_path else None
    try:
        if profiler is not None:
            profiler.enable()
        return ugem_main(argv)
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(prof_path)
        with open(stats_path, "w") as f:
            json.dump(STATS, f)


if __name__ == "__main__":
    sys.exit(main())
