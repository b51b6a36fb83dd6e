"""The `ugem` command: `serve` runs the daemon; the others talk to a running one.

Subcommands: serve, ls [--json], stat [--json], top (live view), suspend, resume, ops (lists the request table),
fs MOUNTPOINT (a read-only FUSE view; runs in the foreground until unmounted, SIGINT or SIGTERM);
`ugem --version` prints `ugem X.Y.Z`.
Exit codes: 0 success, 1 operation failure, 2 usage error or bad configuration, 3 no daemon / socket
in use / the daemon went away.

`ugem serve` takes its flags as strings and validates them through `Config.parse` (the
same checks as `ugem.Manager(**config)`), so bad configuration is one line on stderr naming
the flag, the value and what is allowed, exit 2, before anything is created: the socket is
bound before the spill directory is made, and each is undone if the other fails.
`serve --detach` validates its flags first (bad ones exit 2 at once), then forks: the
child is the daemon, in a session of its own with stdin and stdout on /dev/null (stderr,
its log, is kept); the parent exits 0 once the daemon listens (passing its banner on), or
with the daemon's status if it fails to start (3: the socket is in use).
`serve --exit-idle SECONDS` shuts the daemon down once no client has been connected that
long (daemon/server.py); `ugem.connect(start=True)` starts daemons with both.

Errors: never a traceback. Every failure is one line on stderr, `ugem: COMMAND: what failed`,
naming the path, value or flag involved: the socket path for anything about reaching the
daemon (missing, refused, no permission, gone mid-request), the mount point for `fs`, the
daemon's own message with its errno name for a refused operation (`... (EACCES)`).
Ctrl-C ends a command with status 130 (`top` and `fs`: 0, it is how one leaves them).
Output cut short by a closed pipe (`ugem stat | head -1`): stdout is pointed at /dev/null and
the command exits 1 without a message, as a failed write is a failure but not news to the
reader who closed the pipe.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
from typing import Any

from . import __version__
from .config import BadSetting, Config, parse_seconds
from .errors import DaemonGone, InvalidArgument, ProtocolError, UgemError

__all__ = ["format_stats", "main"]


_SERVE_KEYS = ("vram", "system_budget", "spill_dir", "client_quota", "client_max_objects", "pin_limit",
               "hang_timeout", "uid_quota", "uid_max_clients")
_LOG_LEVELS = ("debug", "info", "warning", "error")


def _default(key: str) -> str:
    """Config field `key`'s default as `serve --help` shows it (the value lives in config.py)."""
    value: float = Config.__dataclass_fields__[key].default  # type: ignore[assignment]
    units = [(u, n) for u, n in (("G", 1 << 30), ("M", 1 << 20)) if key in ("vram", "pin_limit") and value % n == 0]
    return f"{int(value) // units[0][1]}{units[0][0]}" if units else f"{value:g}"


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _bad_config(message: str) -> int:
    """Bad configuration: one line naming the flag, the value and what is allowed; exit 2."""
    print(f"ugem: {message}".replace("\n", "\\n"), file=sys.stderr)
    return 2


def _serve_options(args: argparse.Namespace) -> tuple[Config, float, float | None, int, str]:
    """The validated flags of `ugem serve`: (config, stall timeout, exit idle, socket mode,
    log level)."""
    config = Config.parse({key: getattr(args, key) for key in _SERVE_KEYS}, name=_flag)
    stall_timeout = 30.0 if args.stall_timeout is None else parse_seconds(args.stall_timeout, "--stall-timeout")
    exit_idle = None if args.exit_idle is None else parse_seconds(args.exit_idle, "--exit-idle")
    try:
        socket_mode = int(args.socket_mode, 8)
    except ValueError:
        socket_mode = -1
    if not 0 <= socket_mode <= 0o777:
        raise InvalidArgument(f"--socket-mode: {args.socket_mode!r} is not an octal file mode from 0 to 0777")
    if args.log_level.lower() not in _LOG_LEVELS:
        raise InvalidArgument(f"--log-level: {args.log_level!r} is not one of {', '.join(_LOG_LEVELS)}")
    return config, stall_timeout, exit_idle, socket_mode, args.log_level.lower()


def _detach() -> int | None:
    """`serve --detach`: fork. The child goes on to be the daemon (None), in a session of its
    own with stdin on /dev/null and stdout on a pipe to the parent, which returns once the
    daemon has let go of that pipe: 0 after passing its banner on (it listens), else the
    daemon's exit status (it failed to start; its reason is on stderr, which both share)."""
    sys.stdout.flush()
    sys.stderr.flush()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(write_fd, 1)
        os.close(devnull)
        os.close(write_fd)
        return None
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        banner = pipe.read()  # until the daemon lets go of its stdout: after its banner, or at exit
    if banner.startswith(b"ugem: listening on "):
        sys.stdout.write(banner.decode(errors="replace"))
        return 0
    status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    return status if status > 0 else 1


def _let_go_of_stdout() -> None:
    """The detached daemon after its banner: stdout to /dev/null (the parent sees EOF)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _serve(args: argparse.Namespace) -> int:
    from .daemon.listener import Listener, SocketInUse
    from .daemon.server import Server, ServerOptions, raise_fd_limit
    from .paths import resolve_socket_path

    try:
        config, stall_timeout, exit_idle, socket_mode, log_level = _serve_options(args)
    except InvalidArgument as exc:
        return _bad_config(str(exc.strerror))
    if args.detach:
        status = _detach()
        if status is not None:  # the parent: the daemon listens, or failed to start
            return status
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s ugem[%(process)d] %(levelname)s %(message)s")
    path, is_default = resolve_socket_path(args.socket)
    socket_flag = "--socket" if args.socket else "$UGEM_SOCKET" if not is_default else "--socket (default)"
    raise_fd_limit()
    try:  # bound first: a socket that cannot be used leaves no spill directory behind
        listener = Listener(path, is_default, socket_mode)
    except SocketInUse as exc:
        print(f"ugem: {exc}", file=sys.stderr)
        return 3
    except BadSetting as exc:
        return _bad_config(exc.describe(lambda _key: socket_flag))
    try:
        server = Server(config, ServerOptions(path, is_default, socket_mode, stall_timeout, exit_idle), listener)
    except BadSetting as exc:
        listener.close()
        return _bad_config(exc.describe(_flag))
    server.install_signals()  # before the banner: whoever reads it may send SIGTERM at once
    print(f"ugem: listening on {path}", flush=True)
    if args.detach:
        _let_go_of_stdout()
    server.serve_forever()
    return 0


class _Failed(Exception):
    """A CLI failure: `message` for stderr (after `ugem: COMMAND: `) and the exit status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _socket_path(args: argparse.Namespace) -> str:
    from .paths import resolve_socket_path

    return resolve_socket_path(getattr(args, "socket", None))[0]


def _connect(args: argparse.Namespace) -> Any:
    from .client.connect import connect

    try:
        return connect(args.socket)
    except (FileNotFoundError, ConnectionRefusedError, PermissionError, UgemError, DaemonGone):
        raise  # their messages name the path (and say what to do); main() reports them
    except OSError as exc:
        why = exc.strerror or str(exc)
        raise _Failed(f"cannot connect to the ugem daemon socket at {_socket_path(args)}: {why}", 3) from exc


def _ls(args: argparse.Namespace) -> int:
    with _connect(args) as dev:
        rows = dev.list_objects()
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'ID':>8} {'SIZE':>12} {'PLACEMENT':<9} {'MADVISE':<8} {'NAME':>6} {'HANDLES':>7} {'PINNED':<6} "
          f"{'MAPPED':>6} {'OWNER':>8}")
    for r in rows:
        print(f"{r['id']:>8} {r['size']:>12} {r['placement']:<9} {r['madvise']:<8} {r['name'] or '-':>6} "
              f"{r['handles']:>7} {'yes' if r['pinned'] else 'no':<6} {r['mapped']:>6} {r['owner_pid'] or '-':>8}")
    return 0


def _is_bytes(key: str) -> bool:
    """Whether a stats() figure is a byte count (the rest are counts, booleans or limits in units)."""
    return key == "bytes" or key.endswith(("_bytes", "_size", "_budget")) or key.startswith("bytes_")


def _figure(key: str, value: Any) -> str:
    from .top import human

    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int) and _is_bytes(key):
        return human(value) if value < 1024 else f"{human(value)} ({value})"
    return str(value)


_CLIENT_COLUMNS = (("ID", "id"), ("PID", "pid"), ("UID", "uid"), ("OBJECTS", "objects"),
                   ("RESIDENT", "resident_bytes"), ("SIZE", "bytes"), ("PINNED", "pinned_bytes"))


def format_stats(figures: dict[str, Any]) -> str:
    """`ugem stat` as text: one `key  value` line per figure (sizes in binary units with the
    exact byte count in parentheses, booleans as yes/no, counts plain), then the clients as
    a table sorted by id, its size columns in binary units."""
    from .top import human

    scalars = {k: v for k, v in figures.items() if k != "per_client"}
    width = max(map(len, scalars), default=0) + 2
    lines = [f"{key:<{width}}{_figure(key, value)}" for key, value in scalars.items()]
    clients = sorted(figures.get("per_client", ()), key=lambda c: int(c["id"]))
    lines.append(f"per_client ({len(clients)})")
    table = [[name for name, _ in _CLIENT_COLUMNS]]
    table += [[human(int(c.get(key, 0))) if _is_bytes(key) else str(c.get(key, ""))
               for _, key in _CLIENT_COLUMNS] for c in clients]
    widths = [max(len(row[i]) for row in table) for i in range(len(_CLIENT_COLUMNS))]
    lines += ["  " + "  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in table]
    return "\n".join(lines)


def _stat(args: argparse.Namespace) -> int:
    with _connect(args) as dev:
        figures = dev.stats()
    print(json.dumps(figures, indent=1) if args.json else format_stats(figures))
    return 0


def _top(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .top import run

    try:
        with _connect(args) as dev:
            return run(dev, args.interval, args.once, Console())
    except KeyboardInterrupt:  # Ctrl-C is how one leaves top, wherever it lands
        return 0


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: the interval must be a positive number of seconds")
    return value


def _suspend(args: argparse.Namespace) -> int:
    with _connect(args) as dev:
        dev.suspend()
    print("ugem: device suspended")
    return 0


def _resume(args: argparse.Namespace) -> int:
    with _connect(args) as dev:
        dev.resume()
    print("ugem: device resumed")
    return 0


def _check_mountpoint(path: str) -> None:
    """`ugem fs` mounts only on an existing empty directory (libfuse 3 would mount over files)."""
    try:
        entries = os.listdir(path)
    except OSError as exc:
        raise _Failed(f"could not mount {path}: {exc.strerror}", 1) from exc
    if entries:
        raise _Failed(f"could not mount {path}: the directory is not empty (the mount point must be an "
                      f"existing empty directory)", 1)


def _fs(args: argparse.Namespace) -> int:
    from .fsview import mount

    _check_mountpoint(args.mountpoint)
    logging.basicConfig(level="WARNING", stream=sys.stderr, format="%(message)s")
    with _connect(args) as dev:
        try:
            mount(dev, args.mountpoint, debug=args.debug)
        except DaemonGone as exc:  # the view unmounted itself
            raise _Failed(f"the ugem daemon at {_socket_path(args)} went away; {args.mountpoint} was unmounted",
                          3) from exc
        except ImportError as exc:
            raise _Failed("needs mfusepy: pip install 'ugem[fs]'", 1) from exc
        except OSError as exc:  # libfuse not found (mfusepy raises this at import)
            raise _Failed(f"cannot load libfuse ({exc}); install it (Debian: apt-get install fuse3)", 1) from exc
        except RuntimeError as exc:  # libfuse said why on stderr (no /dev/fuse, no permission, ...)
            raise _Failed(f"could not mount {args.mountpoint} (libfuse's reason is above)", 1) from exc
    return 0


def _ops(args: argparse.Namespace) -> int:
    from .core.requests import REQUESTS

    for desc in REQUESTS:
        perm = "" if not desc.perm.value else f" [{str(desc.perm.name).lower()}]"
        print(f"{desc.op.value:>3} {desc.op.name:<20} {desc.doc}{perm}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ugem", description="GEM/TTM buffer-object manager in user space")
    parser.add_argument("--version", action="version", version=f"ugem {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the daemon",
                           description="Run the daemon. SIZE is bytes or a number with K, M, G or T (512M, "
                                       "1.5G); sizes, counts and SECONDS must be positive. Bad configuration "
                                       "exits 2 with one line naming the flag.")
    serve.add_argument("--socket", metavar="PATH", help="socket path (default: $UGEM_SOCKET, "
                                                        "$XDG_RUNTIME_DIR/ugem/ugem.sock, /tmp/ugem-<uid>/ugem.sock)")
    serve.add_argument("--vram", metavar="SIZE", help=f"device memory (default {_default('vram')}, at most 64T)")
    serve.add_argument("--system-budget", metavar="SIZE", help="resident memory budget "
                       "(default: half of physical memory)")
    serve.add_argument("--spill-dir", metavar="DIR", help="spill directory (default $XDG_CACHE_HOME/ugem/spill, "
                                                          "else ~/.cache/ugem/spill)")
    serve.add_argument("--client-quota", metavar="SIZE", help="bytes one client may create, or 'unlimited' "
                                                              "(the default)")
    serve.add_argument("--client-max-objects", metavar="N", help="handles one client may hold (default "
                       f"{_default('client_max_objects')})")
    serve.add_argument("--pin-limit", metavar="SIZE", help="bytes one client may pin (default "
                       f"{_default('pin_limit')})")
    serve.add_argument("--hang-timeout", metavar="SECONDS", help="seconds before device work counts as hung "
                       f"(default {_default('hang_timeout')})")
    serve.add_argument("--stall-timeout", metavar="SECONDS", help="drop a connection that has not completed its "
                       "handshake, or has sent part of a frame, for this long (default 30)")
    serve.add_argument("--exit-idle", metavar="SECONDS", help="exit (as on SIGTERM) once no client has been "
                       "connected for this long, counted from start (default: never)")
    serve.add_argument("--detach", action="store_true", help="run in the background: return once the daemon "
                       "listens (exit 0, its banner printed) or with its exit status if it fails to start; it "
                       "keeps stderr, so point that at a log file")
    serve.add_argument("--uid-quota", metavar="SIZE", help="bytes all clients of one uid may create plus pin, or "
                       "'unlimited' (default: half the system budget; root and the daemon's uid: unlimited)")
    serve.add_argument("--uid-max-clients", metavar="N", help="connections of one uid, or 'unlimited' (default "
                       f"{_default('uid_max_clients')}; root and the daemon's uid: unlimited)")
    serve.add_argument("--socket-mode", metavar="OCTAL", default="0600", help="socket file mode, octal from 0 to "
                                                                               "0777 (default 0600)")
    serve.add_argument("--log-level", metavar="LEVEL", default="info",
                       help=f"one of {', '.join(_LOG_LEVELS)} (default info)")
    serve.set_defaults(func=_serve)
    for name, func, text in (("ls", _ls, "list objects"), ("stat", _stat, "manager-wide figures")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--socket", help="daemon socket")
        cmd.add_argument("--json", action="store_true", help="machine-readable output")
        cmd.set_defaults(func=func)
    top = sub.add_parser("top", help="live view of regions and clients")
    top.add_argument("--socket", help="daemon socket")
    top.add_argument("--interval", type=_interval, default=1.0, help="seconds between refreshes (default 1)")
    top.add_argument("--once", action="store_true", help="print one frame and exit")
    top.set_defaults(func=_top)
    for name, func, text in (("suspend", _suspend, "save device memory and hold device work (privileged)"),
                             ("resume", _resume, "run device work again (privileged)")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--socket", help="daemon socket")
        cmd.set_defaults(func=func)
    fs = sub.add_parser("fs", help="mount a read-only FUSE view of the daemon's objects (privileged)",
                        description="Mount objects/<id>/{info,data}, names/<name> and clients/<id>/<handle> "
                                    "read-only on MOUNTPOINT. Runs in the foreground until the view is "
                                    "unmounted (fusermount3 -u MOUNTPOINT), or SIGINT/SIGTERM.")
    fs.add_argument("mountpoint", metavar="MOUNTPOINT", help="an existing empty directory")
    fs.add_argument("--socket", help="daemon socket")
    fs.add_argument("--foreground", action="store_true", help="stay in the foreground (always the case; "
                                                              "accepted for habit)")
    fs.add_argument("--debug", action="store_true", help="log every FUSE request (libfuse -d)")
    fs.set_defaults(func=_fs)
    ops = sub.add_parser("ops", help="list the request table")
    ops.set_defaults(func=_ops)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status = int(args.func(args))
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return status
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush stays quiet
        return 1
    except KeyboardInterrupt:
        return 130
    except _Failed as exc:
        return _fail(args, str(exc), exc.status)
    except UgemError as exc:  # the manager refused: its message names what, the errno says why
        code = errno.errorcode.get(exc.errno, str(exc.errno)) if exc.errno else "?"
        return _fail(args, f"{exc.strerror} ({code})", 1)
    except DaemonGone as exc:
        return _fail(args, f"the ugem daemon at {_socket_path(args)} went away ({exc})", 3)
    except ProtocolError as exc:
        return _fail(args, f"the ugem daemon at {_socket_path(args)} broke the protocol: {exc}", 3)
    except (FileNotFoundError, ConnectionRefusedError, PermissionError) as exc:
        # no daemon, or an unsafe default socket directory (SPEC §1): the message names the path
        return _fail(args, str(exc.strerror or exc), 3)


def _fail(args: argparse.Namespace, message: str, status: int) -> int:
    print(f"ugem: {args.command}: {message}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
