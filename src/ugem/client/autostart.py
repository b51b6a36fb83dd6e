"""`connect(start=True)`: start a per-user daemon where none listens (SPEC §1).

Rules:
- the daemon is `ugem serve --detach --exit-idle SECONDS`, run by this interpreter with
  this ugem (its package directory leads PYTHONPATH, so client and daemon match), plus
  `--socket PATH` unless the socket is the default one (then the daemon finds it as
  `connect()` does and makes its directory 0700); its other flags are the defaults.
  `--detach` returns once the daemon listens; the daemon lives on in a session of its own,
  not a child of the caller (nothing to reap; it does not die with the caller);
- SECONDS is $UGEM_EXIT_IDLE, else 60: the daemon exits once it has had no client for
  that long (so a started daemon nobody uses goes away too);
- its stdin and stdout are /dev/null and its log (stderr) is appended to PATH.log next to
  the socket (emptied first once past 1 MiB); its environment is ours without systemd's
  NOTIFY_SOCKET and LISTEN_* (a daemon started for a client is not the service that
  systemd started: it must not report to it);
- exit status 3 means another daemon holds the path (listening, or starting: PATH.lock),
  i.e. someone else is starting it: connecting is retried every 50 ms, and it is started
  again if nobody listens a second later (that starter may have died). So processes
  starting at once end with one daemon, all connected to it;
- a daemon that goes away during the handshake (its idle exit) counts as none listening;
- any other failure to start raises the no-daemon error of the first attempt
  (FileNotFoundError or ConnectionRefusedError) naming the path, the exit status, the
  daemon's own words (the log's new lines) and the log file; nothing listening within
  `START_S` raises TimedOut naming the path and the log. A bad $UGEM_EXIT_IDLE is EINVAL.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from collections.abc import Callable

from ..config import parse_seconds
from ..errors import DaemonGone, TimedOut
from ..paths import check_socket_dir
from .device import Device

__all__ = ["START_S", "connect_or_start"]

START_S = 60.0  # how long a daemon may take to listen (a safety net: starting takes ~1 s)
EXIT_IDLE_S = 60.0  # default --exit-idle of a started daemon
_RETRY_S = 0.05  # between connection attempts while another process starts the daemon
_RESTART_S = 1.0  # start again if nobody listens this long after a start
_LOG_MAX = 1 << 20
_LOG_TAIL = 4000  # characters of the log quoted in an error


def connect_or_start(where: str, is_default: bool, attempt: Callable[[], Device]) -> Device:
    """`attempt()` (a connection to `where`); if no daemon listens there, start one and retry."""
    idle = _exit_idle()
    deadline = time.monotonic() + START_S
    first: OSError | None = None
    next_start = 0.0
    while True:
        try:
            return attempt()
        except (FileNotFoundError, ConnectionRefusedError, DaemonGone) as exc:
            first = first or exc
        now = time.monotonic()
        if now >= deadline:
            log = _log_path(where)
            raise TimedOut(f"no ugem daemon listening on {where} {START_S:g} s after starting one (or another "
                           f"process holds {where}.lock without listening); its log: {log}"
                           f"{_quote(_read_log(log, 0))}")
        if now >= next_start:
            _start(where, is_default, idle, deadline, first)
            next_start = time.monotonic() + _RESTART_S
            continue
        time.sleep(_RETRY_S)


def _exit_idle() -> float:
    value = os.environ.get("UGEM_EXIT_IDLE")
    return EXIT_IDLE_S if value is None else parse_seconds(value, "$UGEM_EXIT_IDLE")


def _log_path(where: str) -> str:
    return where + ".log"


def _start(where: str, is_default: bool, idle: float, deadline: float, first: OSError) -> None:
    """Run `ugem serve --detach`; return once it listens or another daemon holds `where`."""
    if is_default:  # as the daemon would make it, so that the log can go there
        os.makedirs(os.path.dirname(where), mode=0o700, exist_ok=True)
        check_socket_dir(os.path.dirname(where))
    log = _log_path(where)
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise _failed(first, where, f"cannot open its log {log}: {exc.strerror}") from None
    try:
        start = os.fstat(fd).st_size
        if start > _LOG_MAX:
            os.ftruncate(fd, 0)
            start = 0
        argv = [sys.executable, "-P", "-m", "ugem", "serve", "--detach", "--exit-idle", f"{idle:g}"]
        if not is_default:
            argv += ["--socket", where]
        try:
            proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=fd,
                                  env=_environment(), start_new_session=True,
                                  timeout=max(deadline - time.monotonic(), 1.0))
        except subprocess.TimeoutExpired:
            raise TimedOut(f"a ugem daemon started for {where} did not listen within {START_S:g} s; its log: "
                           f"{log}{_quote(_read_log(log, start))}") from None
    finally:
        os.close(fd)
    if proc.returncode in (0, 3):  # listening; or another daemon holds the path (it is starting)
        return
    raise _failed(first, where, f"`ugem serve` exited with status {proc.returncode}"
                                f"{_quote(_read_log(log, start))}; its log: {log}")


_SYSTEMD_VARIABLES = frozenset({"NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"})


def _environment() -> dict[str, str]:
    """Ours, with this ugem's package directory first on PYTHONPATH, without systemd's."""
    env = {k: v for k, v in os.environ.items() if k not in _SYSTEMD_VARIABLES}
    package_dir = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_dir, env.get("PYTHONPATH")) if p)
    return env


def _read_log(path: str, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace").strip()
    except OSError:
        return ""
    return text if len(text) <= _LOG_TAIL else "..." + text[-_LOG_TAIL:]


def _quote(text: str) -> str:
    return f": {text}" if text else ""


def _failed(first: OSError, where: str, why: str) -> OSError:
    message = f"no ugem daemon listening on {where}, and starting one failed: {why}"
    if isinstance(first, FileNotFoundError):
        return FileNotFoundError(errno.ENOENT, message, where)
    return ConnectionRefusedError(errno.ECONNREFUSED, message, where)
