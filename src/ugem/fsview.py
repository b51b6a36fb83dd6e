"""`ugem fs MOUNTPOINT`: a read-only FUSE view of a running daemon, for debugging.

Layout (SPEC §4)::

    objects/<id>/info        `key: value` lines: the `ugem ls --json` row, then the GEM_INFO
                             fields it lacks (tiling, stride, caching, busy, userptr)
    objects/<id>/data        the object's bytes (size = object size), read lazily with pread
    names/<name>             -> ../objects/<id>     (flinked objects)
    clients/<id>/<handle>    -> ../../objects/<id>  (every client's handle table)

Rules:

- Read-only, twice over: the mount carries `ro` (the kernel answers EROFS before asking us)
  and every mutating callback still raises EROFS; `open()` for writing is EROFS too.
- The listing (LIST_OBJECTS + LIST_CLIENTS) is one snapshot, reused for `ttl` seconds (0.5),
  so `ls -lR` costs two requests per refresh, not two per file. The kernel keeps entries and
  attributes for as long (`entry_timeout`, `attr_timeout`), so a change shows in about 1 s.
- `data` reads go through a read-only handle from DEBUG_OPEN, taken at open() and closed
  at release(): the view holds handles only while a file is open. Its own client is left out
  of `clients/` for that reason (its handles are artefacts of looking).
- `info` is rendered at open() and kept with the open file, served with direct_io: its
  length may differ from the size getattr() reported (placement changes), so the kernel must
  not cut it at that size. getattr() renders it once per snapshot for a plausible size. The
  `readonly` flag of GEM_INFO describes our handle, not the object, so it is not shown.
- One FUSE thread (`nothreads`): a Device carries one request at a time anyway.
- If the daemon goes away, the view unmounts itself without waiting for someone to look: a
  watcher thread polls a duplicate of the connection's socket for hang-up (POLLRDHUP; it
  never reads, so it cannot race a request), marks the view hung up and makes one request
  to the mount (statvfs); that request, like any operation that meets a gone daemon, fails
  with EIO and asks libfuse to leave its loop (`fuse_exit` from inside a callback, where
  libfuse allows it). The watcher starts once libfuse is serving (`init`) and is stopped
  before `mount()` returns, so it never outlives the loop or the Device.
  Reading a purged object's data fails with EIO too (its info says `placement: purged`).
- mfusepy has no type hints: it is imported only in `mount()`, where `Any` stays; the
  operations class below does not inherit from it (mfusepy only looks methods up by name).

Must not: write to objects, keep handles past release(), or talk to the daemon per entry
of a readdir.
"""

from __future__ import annotations

import contextlib
import ctypes.util
import errno
import logging
import os
import select
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from .client.device import Device
from .errors import BadAddress, DaemonGone, NoSuchObject
from .fd import OwnedFd, pipe

__all__ = ["FsView", "Snapshot", "mount", "render_info"]

log = logging.getLogger("ugem.fs")

TTL = 0.5  # seconds a listing is reused (and the kernel's entry/attribute timeout)
_DIR = stat.S_IFDIR | 0o555
_FILE = stat.S_IFREG | 0o444
_LINK = stat.S_IFLNK | 0o777
_ROOT = ("objects", "names", "clients")
_INFO_KEYS = ("tiling", "stride", "caching", "busy", "userptr")  # GEM_INFO fields the ls row lacks


class FileInfo(Protocol):
    """The fields of libfuse's `struct fuse_file_info` this view uses (raw_fi mode)."""

    flags: int
    fh: int
    direct_io: int


@dataclass(frozen=True)
class Snapshot:
    """One listing of the daemon: objects by id, names, and clients' handle tables."""

    taken: float
    objects: dict[str, dict[str, Any]]  # str(id) -> ls row
    names: dict[str, str]  # str(name) -> str(object id)
    clients: dict[str, dict[str, str]]  # str(client id) -> {str(handle): str(object id)}
    info: dict[str, bytes] = field(default_factory=dict)  # rendered info, filled on demand

    @classmethod
    def take(cls, device: Device, now: float) -> Snapshot:
        rows = device.list_objects()
        objects = {str(r["id"]): r for r in rows}
        names = {str(r["name"]): str(r["id"]) for r in rows if r["name"]}
        own = device.client_id
        clients = {str(c["id"]): {h: str(o) for h, o in c["handles"].items()}
                   for c in device.list_clients() if c["id"] != own}
        return cls(now, objects, names, clients)


def _text(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def render_info(device: Device, row: dict[str, Any]) -> bytes:
    """The text of `objects/<id>/info`: the ls row, then GEM_INFO through a fresh handle
    (closed again at once). An object no handle holds (kept by a mapping or an export)
    cannot be opened: it gets the ls row alone. Booleans read `true`/`false`; a row value
    that is None (`label` of an object not preloaded) is left out."""
    lines = [f"{key}: {_text(value)}" for key, value in row.items() if value is not None]
    try:
        handle = device.debug_open(int(row["id"]))
    except NoSuchObject:
        handle = 0
    if handle:
        try:
            info = device.info(handle)
        finally:
            device.close_handle(handle)
        for key in _INFO_KEYS:
            lines.append(f"{key}: {_text(getattr(info, key))}")
    return ("\n".join(lines) + "\n").encode()


@dataclass
class _Open:
    object_id: str
    handle: int = 0  # data: the DEBUG_OPEN handle, closed on release
    size: int = 0
    text: bytes = b""  # info: rendered at open


def _erofs(*_args: object) -> int:
    raise OSError(errno.EROFS, os.strerror(errno.EROFS))


class FsView:
    """The mfusepy operations object (raw_fi mode: open/read/release get the fuse_file_info)."""

    use_ns = True  # times in nanoseconds (mfusepy warns otherwise)

    def __init__(self, device: Device, *, ttl: float = TTL, on_daemon_gone: Callable[[], None] = lambda: None,
                 on_mounted: Callable[[], None] = lambda: None, clock: Callable[[], float] = time.monotonic) -> None:
        self._device = device
        self._ttl = ttl
        self._on_daemon_gone = on_daemon_gone
        self._on_mounted = on_mounted
        self._clock = clock
        self._snap: Snapshot | None = None
        self.mounted = False  # set once libfuse has mounted and started serving
        self.hung_up = False  # the watcher saw the daemon close the connection
        self.daemon_gone = False
        self._open: dict[int, _Open] = {}
        self._next_fh = 1
        self._stat_base = {"st_uid": os.getuid(), "st_gid": os.getgid(), "st_nlink": 1,
                           **dict.fromkeys(("st_atime", "st_mtime", "st_ctime"), time.time_ns())}

    # -- talking to the daemon ------------------------------------------------------------

    @contextlib.contextmanager
    def _daemon(self) -> Iterator[Device]:
        try:
            if self.hung_up:
                raise DaemonGone("the daemon closed the connection")
            yield self._device
        except DaemonGone as exc:
            log.info("ugem fs: the daemon went away (%s); unmounting", exc)  # the caller says so
            self.daemon_gone = True
            self._on_daemon_gone()
            raise OSError(errno.EIO, "the ugem daemon went away") from exc

    def snapshot(self) -> Snapshot:
        now = self._clock()
        if self._snap is None or now - self._snap.taken >= self._ttl:
            with self._daemon() as dev:
                self._snap = Snapshot.take(dev, now)
        return self._snap

    def _info_text(self, snap: Snapshot, oid: str) -> bytes:
        if oid not in snap.info:
            with self._daemon() as dev:
                snap.info[oid] = render_info(dev, snap.objects[oid])
        return snap.info[oid]

    # -- the tree ---------------------------------------------------------------------------

    def _entries(self, parts: list[str], snap: Snapshot) -> list[str] | None:
        """The names in directory `parts`, or None if `parts` is not a directory."""
        if not parts:
            return list(_ROOT)
        top, rest = parts[0], parts[1:]
        tables: dict[str, dict[str, Any]] = {"objects": snap.objects, "names": snap.names, "clients": snap.clients}
        if top not in tables:
            return None
        if not rest:
            return sorted(tables[top], key=int)
        if len(rest) == 1 and top == "objects" and rest[0] in snap.objects:
            return ["info", "data"]
        if len(rest) == 1 and top == "clients" and rest[0] in snap.clients:
            return sorted(snap.clients[rest[0]], key=int)
        return None

    def _link(self, parts: list[str], snap: Snapshot) -> str | None:
        if len(parts) == 2 and parts[0] == "names" and parts[1] in snap.names:
            return f"../objects/{snap.names[parts[1]]}"
        if len(parts) == 3 and parts[0] == "clients" and parts[2] in snap.clients.get(parts[1], {}):
            return f"../../objects/{snap.clients[parts[1]][parts[2]]}"
        return None

    @staticmethod
    def _file(parts: list[str], snap: Snapshot) -> str | None:
        """The object id of `objects/<id>/{info,data}`, else None."""
        if len(parts) == 3 and parts[0] == "objects" and parts[1] in snap.objects and parts[2] in ("info", "data"):
            return parts[1]
        return None

    @staticmethod
    def _split(path: str) -> list[str]:
        return [p for p in path.split("/") if p]

    # -- FUSE operations ------------------------------------------------------------------

    def getattr(self, path: str, fh: object = None) -> dict[str, Any]:
        parts, snap = self._split(path), self.snapshot()
        if self._entries(parts, snap) is not None:
            return {**self._stat_base, "st_mode": _DIR, "st_nlink": 2}
        target = self._link(parts, snap)
        if target is not None:
            return {**self._stat_base, "st_mode": _LINK, "st_size": len(target)}
        oid = self._file(parts, snap)
        if oid is None:
            raise OSError(errno.ENOENT, path)
        size = int(snap.objects[oid]["size"]) if parts[2] == "data" else len(self._info_text(snap, oid))
        return {**self._stat_base, "st_mode": _FILE, "st_size": size}

    def readdir(self, path: str, fh: int) -> list[str]:
        entries = self._entries(self._split(path), self.snapshot())
        if entries is None:
            raise OSError(errno.ENOTDIR, path)
        return [".", "..", *entries]

    def readlink(self, path: str) -> str:
        target = self._link(self._split(path), self.snapshot())
        if target is None:
            raise OSError(errno.EINVAL, path)
        return target

    def open(self, path: str, fi: FileInfo) -> int:
        if fi.flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise OSError(errno.EROFS, path)
        parts, snap = self._split(path), self.snapshot()
        oid = self._file(parts, snap)
        if oid is None:
            raise OSError(errno.EISDIR if self._entries(parts, snap) is not None else errno.ENOENT, path)
        with self._daemon() as dev:
            if parts[2] == "info":
                opened = _Open(oid, text=render_info(dev, snap.objects[oid]))
                fi.direct_io = 1
            else:
                opened = _Open(oid, handle=dev.debug_open(int(oid)), size=int(snap.objects[oid]["size"]))
        fi.fh, self._next_fh = self._next_fh, self._next_fh + 1
        self._open[fi.fh] = opened
        return 0

    def read(self, path: str, size: int, offset: int, fi: FileInfo) -> bytes:
        opened = self._open.get(fi.fh)
        if opened is None:
            raise OSError(errno.EBADF, path)
        if not opened.handle:
            return opened.text[offset:offset + size]
        length = max(0, min(size, opened.size - offset))
        if length == 0:
            return b""
        with self._daemon() as dev:
            try:
                return dev.pread(opened.handle, offset, length)
            except BadAddress as exc:  # purged: EFAULT would read as "bad buffer" to the reader
                raise OSError(errno.EIO, f"object {opened.object_id} was purged") from exc

    def release(self, path: str, fi: FileInfo) -> int:
        opened = self._open.pop(fi.fh, None)
        if opened is not None and opened.handle:
            with self._daemon() as dev:
                dev.close_handle(opened.handle)
        return 0

    def statfs(self, path: str) -> dict[str, int]:
        """Figures for statvfs(); the watcher's wake-up call once the daemon hung up (EIO)."""
        with self._daemon():
            return {"f_bsize": 4096, "f_frsize": 4096, "f_namemax": 255}

    def init(self, path: str) -> None:
        self.mounted = True
        self._on_mounted()

    def destroy(self, path: str) -> None:
        """Unmounting: close whatever the kernel did not release (the Device closes anyway)."""
        for fh in list(self._open):
            opened = self._open.pop(fh)
            if opened.handle:
                with contextlib.suppress(OSError):
                    self._device.close_handle(opened.handle)

    # Everything that would change the tree or a file: EROFS (the `ro` mount stops most
    # of these in the kernel first; these make the rule hold without it too).
    write = truncate = create = mknod = mkdir = unlink = rmdir = symlink = rename = link = _erofs
    chmod = chown = utimens = setxattr = removexattr = fallocate = _erofs


def _use_libfuse3() -> None:
    """mfusepy picks libfuse 2 when both are installed; prefer libfuse 3 (fusermount3)."""
    if not os.environ.get("FUSE_LIBRARY_PATH"):
        found = ctypes.util.find_library("fuse3")
        if found:
            os.environ["FUSE_LIBRARY_PATH"] = found


class _HangupWatch:
    """Waits for the daemon to hang up the connection behind `fd` (a duplicate, owned here),
    then marks `view` hung up and wakes the FUSE loop with a statvfs of `mountpoint`."""

    def __init__(self, fd: int, view: FsView, mountpoint: str) -> None:
        self._fd = OwnedFd(fd)
        self._view = view
        self._mountpoint = mountpoint
        self._stop_r, self._stop_w = pipe()
        self._thread = threading.Thread(target=self._run, name="ugem-fs-hangup", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._fd.fd, select.POLLRDHUP)  # POLLHUP and POLLERR are always reported
        poller.register(self._stop_r.fd, select.POLLIN)
        ready = {fd for fd, _ in poller.poll()}
        if self._stop_r.fd in ready:
            return
        self._view.hung_up = True
        # the statfs request fails on the hung-up view, which asks libfuse to exit; if the
        # loop ended meanwhile, this lands on the bare directory or fails with ENOTCONN
        with contextlib.suppress(OSError):
            os.statvfs(self._mountpoint)

    def close(self) -> None:
        """Stop the watcher (if it started) and close its fds."""
        os.write(self._stop_w.fd, b"x")
        if self._thread.is_alive():
            self._thread.join()
        for fd in (self._fd, self._stop_r, self._stop_w):
            fd.close()


def mount(device: Device, mountpoint: str, *, ttl: float = TTL, debug: bool = False) -> None:
    """Mount the view on `mountpoint` and serve it until unmounted (fusermount3 -u, SIGINT,
    SIGTERM, or the daemon going away: then DaemonGone once unmounted). Raises OSError
    when libfuse is missing, RuntimeError when mounting fails (libfuse said why on stderr)."""
    _use_libfuse3()
    import mfusepy  # untyped; Any stays inside this function

    def exit_loop() -> None:
        mfusepy.fuse_exit()

    fd = device.hangup_fd()
    watch: _HangupWatch | None = None

    def start_watching() -> None:
        if watch is not None:
            watch.start()

    view = FsView(device, ttl=ttl, on_daemon_gone=exit_loop, on_mounted=start_watching)
    if fd is not None:
        watch = _HangupWatch(fd, view, mountpoint)
    try:
        mfusepy.FUSE(view, mountpoint, raw_fi=True, foreground=True, nothreads=True, debug=debug, ro=True,
                     default_permissions=True, fsname="ugem", subtype="ugem",
                     attr_timeout=ttl, entry_timeout=ttl, negative_timeout=0)
    except RuntimeError:
        # libfuse's loop reports the signal that ended it (SIGINT, SIGTERM) as a failure:
        # once mounted, that is the normal way out, and libfuse has unmounted already.
        if not view.mounted:
            raise
    finally:
        if watch is not None:
            watch.close()
    if view.daemon_gone:
        raise DaemonGone("the ugem daemon went away; the view was unmounted")
