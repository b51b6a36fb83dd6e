"""The `ugem` command: `serve` runs the daemon; the others talk to a running one (SPEC §4).

Subcommands: serve, ls [--json], stat [--json], top (live view), suspend, resume, ops (lists the request table),
fs MOUNTPOINT (a read-only FUSE view; runs in the foreground until unmounted, SIGINT or SIGTERM);
`ugem --version` prints `ugem X.Y.Z`.
Exit codes: 0 success, 1 operation failure, 2 usage error or bad configuration, 3 no daemon / socket in use.
`ugem serve` takes its flags as strings and validates them through `Config.parse` (the
same checks as `ugem.Manager(**config)`), so bad configuration is one line on stderr naming
the flag, the value and what is allowed, exit 2, before anything is created: the socket is
bound before the spill directory is made, and each is undone if the other fails.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from . import __version__
from .config import BadSetting, Config, parse_seconds
from .errors import InvalidArgument, UgemError

__all__ = ["main"]


_SERVE_KEYS = ("vram", "system_budget", "spill_dir", "client_quota", "client_max_objects", "pin_limit",
               "hang_timeout", "uid_quota", "uid_max_clients")
_LOG_LEVELS = ("debug", "info", "warning", "error")


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _bad_config(message: str) -> int:
    """Bad configuration: one line naming the flag, the value and what is allowed; exit 2."""
    print(f"ugem: {message}".replace("\n", "\\n"), file=sys.stderr)
    return 2


def _serve_options(args: argparse.Namespace) -> tuple[Config, float, int, str]:
    """The validated flags of `ugem serve`: (config, stall timeout, socket mode, log level)."""
    config = Config.parse({key: getattr(args, key) for key in _SERVE_KEYS}, name=_flag)
    stall_timeout = 30.0 if args.stall_timeout is None else parse_seconds(args.stall_timeout, "--stall-timeout")
    try:
        socket_mode = int(args.socket_mode, 8)
    except ValueError:
        socket_mode = -1
    if not 0 <= socket_mode <= 0o777:
        raise InvalidArgument(f"--socket-mode: {args.socket_mode!r} is not an octal file mode from 0 to 0777")
    if args.log_level.lower() not in _LOG_LEVELS:
        raise InvalidArgument(f"--log-level: {args.log_level!r} is not one of {', '.join(_LOG_LEVELS)}")
    return config, stall_timeout, socket_mode, args.log_level.lower()


def _serve(args: argparse.Namespace) -> int:
    from .daemon.listener import Listener, SocketInUse
    from .daemon.server import Server, ServerOptions, raise_fd_limit
    from .paths import resolve_socket_path

    try:
        config, stall_timeout, socket_mode, log_level = _serve_options(args)
    except InvalidArgument as exc:
        return _bad_config(str(exc.strerror))
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
        server = Server(config, ServerOptions(path, is_default, socket_mode, stall_timeout), listener)
    except BadSetting as exc:
        listener.close()
        return _bad_config(exc.describe(_flag))
    server.install_signals()  # before the banner: whoever reads it may send SIGTERM at once
    print(f"ugem: listening on {path}", flush=True)
    server.serve_forever()
    return 0


def _connect(args: argparse.Namespace) -> Any:
    from .client.connect import connect

    return connect(args.socket)


def _ls(args: argparse.Namespace) -> int:
    with _connect(args) as dev:
        rows = dev.list_objects()
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'ID':>8} {'SIZE':>12} {'PLACEMENT':<9} {'MADVISE':<8} {'NAME':>6} {'HANDLES':>7} {'OWNER':>8}")
    for r in rows:
        print(f"{r['id']:>8} {r['size']:>12} {r['placement']:<9} {r['madvise']:<8} {r['name']:>6} "
              f"{r['handles']:>7} {r['owner_pid']:>8}")
    return 0


def _stat(args: argparse.Namespace) -> int:
    with _connect(args) as dev:
        figures = dev.stats()
    if args.json:
        print(json.dumps(figures, indent=1))
        return 0
    for key, value in figures.items():
        if key != "per_client":
            print(f"{key:<20} {value}")
    print(f"{'per_client':<20} id pid uid objects bytes pinned_bytes")
    for c in figures["per_client"]:
        print(f"{'':<20} {c['id']} {c['pid']} {c['uid']} {c['objects']} {c['bytes']} {c['pinned_bytes']}")
    return 0


def _top(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .errors import DaemonGone
    from .top import run

    try:
        with _connect(args) as dev:
            return run(dev, args.interval, args.once, Console())
    except KeyboardInterrupt:  # Ctrl-C is how one leaves top, wherever it lands
        return 0
    except DaemonGone as exc:
        print(f"ugem: {exc}", file=sys.stderr)
        return 3


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError("the interval must be a positive number of seconds")
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


def _fs(args: argparse.Namespace) -> int:
    from .errors import DaemonGone
    from .fsview import mount

    logging.basicConfig(level="WARNING", stream=sys.stderr, format="%(message)s")
    with _connect(args) as dev:
        try:
            mount(dev, args.mountpoint, debug=args.debug)
        except DaemonGone as exc:  # the view unmounted itself
            print(f"ugem: {exc}", file=sys.stderr)
            return 3
        except ImportError:
            print("ugem: `ugem fs` needs mfusepy: pip install 'ugem[fs]'", file=sys.stderr)
            return 1
        except OSError as exc:  # libfuse not found (mfusepy raises this at import)
            print(f"ugem: cannot load libfuse ({exc}); install it (Debian: apt-get install fuse3)", file=sys.stderr)
            return 1
        except RuntimeError:  # libfuse said why on stderr (no such mountpoint, no /dev/fuse, ...)
            print(f"ugem: could not mount {args.mountpoint}", file=sys.stderr)
            return 1
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
    serve.add_argument("--vram", metavar="SIZE", help="device memory (default 1G, at most 64T)")
    serve.add_argument("--system-budget", metavar="SIZE", help="resident memory budget "
                       "(default: half of physical memory)")
    serve.add_argument("--spill-dir", metavar="DIR", help="spill directory (default $XDG_CACHE_HOME/ugem/spill, "
                                                          "else ~/.cache/ugem/spill)")
    serve.add_argument("--client-quota", metavar="SIZE", help="bytes one client may create, or 'unlimited' "
                                                              "(the default)")
    serve.add_argument("--client-max-objects", metavar="N", help="handles one client may hold (default 65536)")
    serve.add_argument("--pin-limit", metavar="SIZE", help="bytes one client may pin (default 64M)")
    serve.add_argument("--hang-timeout", metavar="SECONDS", help="seconds before device work counts as hung "
                                                                 "(default 10)")
    serve.add_argument("--stall-timeout", metavar="SECONDS", help="drop a connection that has not completed its "
                       "handshake, or has sent part of a frame, for this long (default 30)")
    serve.add_argument("--uid-quota", metavar="SIZE", help="bytes all clients of one uid may create plus pin, or "
                       "'unlimited' (default: half the system budget; root and the daemon's uid: unlimited)")
    serve.add_argument("--uid-max-clients", metavar="N", help="connections of one uid, or 'unlimited' (default "
                       "256; root and the daemon's uid: unlimited)")
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
        return int(args.func(args))
    except UgemError as exc:
        print(f"ugem: {exc.strerror}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ConnectionRefusedError, PermissionError) as exc:
        # no daemon, or an unsafe default socket directory (SPEC §1): a message, not a traceback
        print(f"ugem: {exc.strerror or exc}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
