"""Fixtures for the integration tests (real `ugem serve` processes, real sockets).

Test modules are imported with --import-mode=importlib and cannot import a sibling helper
module, so the helpers reach them through fixtures:

- `daemon`: a fresh `ugem serve` (run_daemon) for one test, run with ResourceWarnings
  shown, so an OwnedFd the daemon leaves to the garbage collector appears in its log;
- `default_daemon`: that daemon as the default one of this process and of its children
  (`$UGEM_SOCKET`; `default_device()` made anew before and after); `sender`: the pickling
  tests' two modes (that, or embedded);
- `kit`: polling with deadlines (`wait_until`, `wait_fd_count`), `assert_healthy(daemon,
  baseline)` (alive, serves a fresh client, fd count back at `baseline`, no leak warning
  in its log), and factories for `RawClient` (speaks the wire protocol by hand, from
  ugem.wire.frames / ugem.wire.structs, so a test can send frames no well-behaved client
  would) and `FdTracer` (proves the daemon closed an fd it was sent), `Tenant` (a function
  run in a child forked as another uid, for the per-uid rules: the interpreter may not be
  executable by that uid, so it is forked, never exec'd) and `open_dir` (a directory any
  uid can reach, for a socket other users connect to). Everything a factory opens is
  closed at teardown (ResourceWarning is an error in this suite).
"""

from __future__ import annotations

import array
import os
import select
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from ugem.testing import NOBODY, DaemonProcess, Tenant, run_daemon
from ugem.testing.data import SAFETY_S, wait_until
from ugem.wire import structs as s
from ugem.wire.frames import HEADER, FrameKind, Op, encode_header

_ANC = socket.CMSG_SPACE(64 * array.array("i").itemsize)




def fd_targets(pid: int) -> list[str]:
    """What each open fd of `pid` points at (for failure messages)."""
    out = []
    for name in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
        try:
            out.append(f"{name}->{os.readlink(f'/proc/{pid}/fd/{name}')}")
        except FileNotFoundError:
            pass
    return out


def wait_fd_count(daemon: DaemonProcess, expected: int, timeout: float = SAFETY_S) -> None:
    """The daemon's fd count settles at `expected` (clients are released asynchronously)."""
    try:
        wait_until(lambda: daemon.fd_count() == expected, timeout, what=f"daemon fd count == {expected}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; daemon fds: {fd_targets(daemon.pid)}") from None


WARNINGS_ENV = {"PYTHONWARNINGS": "always::ResourceWarning"}  # an OwnedFd left to the GC says so on stderr


def assert_no_leak_warnings(daemon: DaemonProcess) -> None:
    log = daemon.stderr_text()
    assert "ResourceWarning" not in log, f"the daemon left an fd to the garbage collector:\n{log}"


def assert_healthy(daemon: DaemonProcess, baseline: int) -> None:
    """The daemon runs, serves a fresh client correctly, holds exactly `baseline` fds, and
    has not left an fd for the garbage collector to close."""
    assert daemon.proc.poll() is None, f"daemon died: {daemon.stderr_text()}"
    wait_fd_count(daemon, baseline)
    with daemon.connect() as dev:
        h = dev.create(4096)
        dev.pwrite(h, 10, b"alive")
        assert dev.pread(h, 8, 9) == b"\0\0alive\0\0"
        dev.close_handle(h)
        stats = dev.stats()
        assert stats["objects"] == 0, stats
        assert stats["clients"] == 1, stats
    wait_fd_count(daemon, baseline)
    assert_no_leak_warnings(daemon)


class FdTracer:
    """A pipe whose write end is given away: the read end sees EOF once every copy is closed.

    Send `tracer.write_fd` (or dups of it) to the daemon, call `release()` to close ours,
    then `assert_closed_everywhere()` proves the daemon closed what it received.
    """

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe2(os.O_CLOEXEC)

    def release(self) -> None:
        if self.write_fd >= 0:
            os.close(self.write_fd)
            self.write_fd = -1

    def closed_everywhere(self, timeout: float = 5.0) -> bool:
        ready, _, _ = select.select([self.read_fd], [], [], timeout)
        return bool(ready) and os.read(self.read_fd, 1) == b""

    def assert_closed_everywhere(self, timeout: float = 5.0) -> None:
        self.release()
        assert self.closed_everywhere(timeout), "the daemon kept a copy of an fd it was sent"

    def close(self) -> None:
        self.release()
        if self.read_fd >= 0:
            os.close(self.read_fd)
            self.read_fd = -1

    def __enter__(self) -> FdTracer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Reply:
    op: int
    kind: int
    seq: int
    status: int
    payload: bytes
    nfds: int = 0  # fds that came with it (closed on arrival)


class RawClient:
    """A hand-driven wire client. Blocking socket with a timeout; closes everything it got."""

    def __init__(self, path: str, timeout: float = SAFETY_S) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self.sock.connect(path)
        except BaseException:
            self.sock.close()
            raise
        self.sock.settimeout(timeout)
        self.seq = 0
        self.client_id = 0  # the daemon's id for this client, once hello() has run

    # -- sending ---------------------------------------------------------------------

    def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        sent = self.sock.sendmsg([data], anc)
        if sent < len(data):
            self.sock.sendall(data[sent:])

    def frame(self, op: int, payload: bytes = b"", *, fds: Sequence[int] = (), nfds: int | None = None,
              kind: int = FrameKind.REQUEST, status: int = 0, length: int | None = None) -> int:
        """Send one frame (header and payload in one sendmsg, fds with it); returns its seq."""
        self.seq += 1
        header = encode_header(len(payload) if length is None else length, op,
                               len(fds) if nfds is None else nfds, kind, self.seq, status)
        self.send(header + payload, fds)
        return self.seq

    def struct_frame(self, op: int, msg: s.Struct, fds: Sequence[int] = ()) -> int:
        pieces, _ = s.encode(msg)
        return self.frame(op, b"".join(bytes(p) for p in pieces), fds=fds)

    def hello(self) -> None:
        seq = self.struct_frame(Op.HELLO, s.HelloReq())
        reply = self.reply()
        assert (reply.op, reply.seq, reply.status) == (Op.HELLO, seq, 0), reply
        self.client_id = s.decode(s.HelloReply, reply.payload, []).client_id

    # -- receiving -------------------------------------------------------------------

    def _recv_exact(self, n: int, fds: list[int]) -> bytes:
        buf = b""
        while len(buf) < n:
            data, anc, flags, _ = self.sock.recvmsg(n - len(buf), _ANC)
            for level, kind, raw in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    ints = array.array("i")
                    ints.frombytes(raw[: len(raw) - len(raw) % ints.itemsize])
                    fds.extend(ints)
            if not data:
                raise ConnectionResetError("daemon closed the connection")
            buf += data
        return buf

    def reply(self) -> Reply:
        fds: list[int] = []
        try:
            head = self._recv_exact(HEADER.size, fds)
            length, op, nfds, kind, seq, status = HEADER.unpack(head)
            payload = self._recv_exact(length, fds)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        for fd in fds:  # tests look at replies, not at the fds in them
            os.close(fd)
        assert nfds == len(fds), (nfds, fds)
        return Reply(op, kind, seq, status, payload, len(fds))

    def call(self, op: int, msg: s.Struct, fds: Sequence[int] = ()) -> Reply:
        seq = self.struct_frame(op, msg, fds)
        reply = self.reply()
        assert (reply.op, reply.seq, reply.kind) == (op, seq, FrameKind.REPLY), reply
        return reply

    def assert_usable(self) -> None:
        """The connection still serves requests: STATS answers with JSON."""
        reply = self.call(Op.STATS, s.Empty())
        assert reply.status == 0 and reply.payload.startswith(b"{"), reply

    def assert_dropped(self, timeout: float = SAFETY_S) -> None:
        """The daemon closes this connection (EOF or reset) without answering."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            return
        except TimeoutError:
            raise AssertionError("the daemon did not drop the connection") from None
        assert data == b"", f"expected the connection to be dropped, got {data!r}"

    def still_connected(self) -> bool:
        """True if the daemon has neither closed this connection nor sent anything."""
        readable, _, _ = select.select([self.sock], [], [], 0)
        return not readable

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Kit:
    """What the `kit` fixture hands a test: the helpers above, and factories that clean up."""

    WARNINGS_ENV = WARNINGS_ENV
    wait_until = staticmethod(wait_until)
    wait_fd_count = staticmethod(wait_fd_count)
    assert_healthy = staticmethod(assert_healthy)
    assert_no_leak_warnings = staticmethod(assert_no_leak_warnings)
    fd_targets = staticmethod(fd_targets)
    RawClient = RawClient
    FdTracer = FdTracer
    NOBODY = NOBODY

    def __init__(self) -> None:
        self._owned: list[RawClient | FdTracer | Tenant] = []
        self._dirs: list[str] = []

    def raw(self, path: str, timeout: float = SAFETY_S) -> RawClient:
        client = RawClient(path, timeout)
        self._owned.append(client)
        return client

    def tracer(self) -> FdTracer:
        tracer = FdTracer()
        self._owned.append(tracer)
        return tracer

    def tenant(self, fn: Callable[..., None], *args: Any, uid: int = NOBODY) -> Tenant:
        """Run `fn(channel, *args)` in a child forked as `uid` (root only: skips otherwise)."""
        if os.getuid() != 0 and uid != os.getuid():
            pytest.skip(f"needs root to act as uid {uid}")
        tenant = Tenant(fn, args, uid)
        self._owned.append(tenant)
        return tenant

    def open_dir(self) -> str:
        """A fresh directory every uid may search (for a socket other users connect to)."""
        directory = tempfile.mkdtemp(prefix="ugem-open-")
        os.chmod(directory, 0o755)
        self._dirs.append(directory)
        return directory

    def close(self) -> None:
        for thing in self._owned:
            thing.close()
        self._owned.clear()
        for directory in self._dirs:
            shutil.rmtree(directory, ignore_errors=True)
        self._dirs.clear()


@pytest.fixture
def kit() -> Iterator[Kit]:
    k = Kit()
    try:
        yield k
    finally:
        k.close()


@pytest.fixture
def daemon() -> Iterator[DaemonProcess]:
    """A fresh daemon whose leaked-fd warnings show up in its log (checked by assert_healthy)."""
    with run_daemon(env={**os.environ, **WARNINGS_ENV}) as d:
        yield d


@pytest.fixture
def default_daemon(daemon: DaemonProcess, monkeypatch: pytest.MonkeyPatch) -> Iterator[DaemonProcess]:
    """`daemon`, the default of this process (`default_device()`) and of the children it starts."""
    from ugem.client.default import reset
    reset()
    monkeypatch.setenv("UGEM_SOCKET", daemon.path)
    try:
        yield daemon
    finally:
        reset()


@pytest.fixture(params=["embedded", "daemon"])
def sender(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
           ) -> Iterator[DaemonProcess | None]:
    """The default device of this process and of its children, for the pickling tests: a
    daemon's client (`default_daemon`), or embedded (nobody listens at $UGEM_SOCKET)."""
    import multiprocessing.forkserver

    from ugem.client.default import reset
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    reset()
    try:
        if request.param == "embedded":
            monkeypatch.setenv("UGEM_SOCKET", str(tmp_path / "nobody-listens.sock"))
            yield None
        else:
            yield request.getfixturevalue("default_daemon")
    finally:
        reset()
        multiprocessing.forkserver._forkserver._stop()  # type: ignore[attr-defined]  # next one: this env
