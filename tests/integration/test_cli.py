"""The `ugem` command (SPEC §1 socket location, §4 the daemon and its subcommands).

`ugem serve` announces exactly `ugem: listening on PATH`, exits 0 on SIGTERM/SIGINT and
removes its socket; a second daemon on a live socket refuses to start; a stale socket
is replaced; the default socket lives in $XDG_RUNTIME_DIR/ugem (created 0700, refused
when unsafe); `ugem ls --json` / `ugem stat --json` print machine-readable rows; the
daemon raises its fd soft limit to the hard limit.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import select
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import ugem
from ugem import cli
from ugem.cli import format_stats
from ugem.testing import DaemonProcess, Tenant, run_daemon
from ugem.wire.frames import FrameKind, Op, encode_header

UGEM = [sys.executable, "-m", "ugem"]
LS_KEYS = {"id", "size", "placement", "madvise", "name", "handles", "owner_pid", "pinned", "mapped", "label"}
STAT_KEYS = {"objects", "clients", "resident_bytes", "vram_bytes", "spilled_bytes", "pinned_bytes",
             "purgeable_bytes", "purged_total", "evicted_total", "spilled_total", "bytes_moved_total", "per_client"}
PER_CLIENT_KEYS = {"id", "pid", "uid", "objects", "bytes", "resident_bytes", "pinned_bytes"}


def ugem_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*UGEM, *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture
def runtime_dir() -> Iterator[str]:
    """A short private directory to serve as $XDG_RUNTIME_DIR (AF_UNIX paths are short)."""
    with tempfile.TemporaryDirectory(prefix="ugem-xdg-") as directory:
        os.chmod(directory, 0o700)
        yield directory


@pytest.fixture
def xdg_env(runtime_dir: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """$XDG_RUNTIME_DIR set (here and for children), $UGEM_SOCKET unset."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", runtime_dir)
    monkeypatch.delenv("UGEM_SOCKET", raising=False)
    return dict(os.environ)


def _stop(daemon: DaemonProcess, sig: signal.Signals) -> int:
    daemon.proc.send_signal(sig)
    return daemon.proc.wait(timeout=20)


# -- serve: banner, signals -------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda v: v.name)
def test_banner_and_clean_exit_on_signal(sig: signal.Signals) -> None:
    with run_daemon() as daemon:
        assert daemon.banner == f"ugem: listening on {daemon.path}\n".encode()
        assert stat.S_ISSOCK(os.stat(daemon.path).st_mode)
        assert stat.S_IMODE(os.stat(daemon.path).st_mode) == 0o600
        dev = daemon.connect()
        h = dev.create(1 << 20)
        dev.pwrite(h, 0, b"x" * (1 << 20))
        m = dev.mmap(h)
        assert _stop(daemon, sig) == 0, daemon.stderr_text()
        assert not os.path.lexists(daemon.path), "the socket was not removed"
        assert daemon.proc.stdout is not None and daemon.proc.stdout.read() == b"", "more than the banner on stdout"
        spill = os.path.join(daemon.directory, "spill")
        assert not os.path.exists(spill) or os.listdir(spill) == [], os.listdir(spill)
        with pytest.raises(ugem.DaemonGone):
            dev.info(h)
        assert bytes(m[:3]) == b"xxx"  # mappings outlive the daemon
        del m
        dev.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda v: v.name)
def test_signal_right_after_banner_still_exits_cleanly(sig: signal.Signals) -> None:
    """Whoever reads the banner may signal at once: the handlers must already be in place."""
    for _ in range(12):
        with run_daemon() as daemon:
            status = _stop(daemon, sig)
            assert status == 0, f"status {status}; stderr: {daemon.stderr_text()}"
            assert not os.path.lexists(daemon.path)


def test_sigterm_with_stalled_and_deaf_clients(kit: Any) -> None:
    """Clients that stall mid-frame or never read do not keep the daemon from stopping."""
    with run_daemon() as daemon:
        stalled = kit.raw(daemon.path)
        stalled.hello()
        stalled.send(encode_header(16, Op.GEM_CREATE, 0, FrameKind.REQUEST, 2)[:9])
        deaf = kit.raw(daemon.path)
        deaf.hello()
        deaf.sock.setblocking(False)
        try:
            while True:
                deaf.sock.send(encode_header(0, Op.STATS, 0, FrameKind.REQUEST, 3) * 512)
        except BlockingIOError:
            pass  # both directions are full now
        with daemon.connect() as dev:
            dev.mmap(dev.create(4096))
            assert _stop(daemon, signal.SIGTERM) == 0, daemon.stderr_text()
        assert not os.path.lexists(daemon.path)
        stalled.assert_dropped()


def test_socket_mode_flag() -> None:
    with run_daemon(socket_mode="0660") as daemon:
        assert stat.S_IMODE(os.stat(daemon.path).st_mode) == 0o660


# -- one daemon per socket ---------------------------------------------------------------------

def test_second_daemon_on_live_socket_is_refused() -> None:
    with run_daemon() as first, first.connect() as dev:
        h = dev.create(4096)
        dev.pwrite(h, 0, b"first")
        inode = os.stat(first.path).st_ino
        second = ugem_cli("serve", "--socket", first.path, "--spill-dir", os.path.join(first.directory, "s2"))
        assert second.returncode != 0
        assert "listening" not in second.stdout
        assert first.path in second.stderr, second.stderr
        assert os.stat(first.path).st_ino == inode, "the second daemon replaced the live socket"
        assert first.proc.poll() is None
        assert dev.pread(h, 0, 5) == b"first"
        with first.connect() as other:
            assert other.stats()["objects"] == 1


def test_stale_socket_is_replaced() -> None:
    with run_daemon() as dead:
        dead.proc.kill()
        dead.proc.wait(timeout=10)
        assert stat.S_ISSOCK(os.lstat(dead.path).st_mode), "SIGKILL leaves the socket file behind"
        with pytest.raises(ConnectionRefusedError) as exc:
            ugem.connect(dead.path)
        assert dead.path in str(exc.value) and "ugem serve" in str(exc.value)
        with run_daemon(socket=dead.path) as fresh, fresh.connect() as dev:
            assert dev.create(4096) == 1
            assert dev.stats()["clients"] == 1


def test_daemon_removes_only_its_own_socket() -> None:
    with run_daemon() as first:
        assert os.path.lexists(first.path + ".lock")
        with pytest.raises(RuntimeError, match="another ugem daemon"):  # the lock keeps the path
            with run_daemon(socket=first.path):
                pass
        for leftover in (first.path, first.path + ".lock"):  # someone cleans up by hand
            os.unlink(leftover)
        with run_daemon(socket=first.path) as second:
            assert _stop(first, signal.SIGTERM) == 0
            assert os.path.lexists(second.path), "the first daemon removed the second one's socket"
            assert os.path.lexists(second.path + ".lock"), "the first daemon removed the second one's lock"
            with second.connect() as dev:
                assert dev.stats()["clients"] == 1
        assert not os.path.lexists(second.path) and not os.path.lexists(second.path + ".lock")


def test_daemons_started_at_once_on_a_stale_socket() -> None:
    """Of daemons racing for one stale socket exactly one wins; the others exit nonzero.
    (Without PATH.lock two could both replace the stale socket; the window is narrow, so
    this is a smoke test: a standalone loop hit it in about 1 of 30 rounds of 3 daemons.)
    Each daemon ends in one of two states, listening (its banner) or exited: the test waits
    for all of them to get there, however long a loaded machine takes (the deadline is
    only a safety net), so a second winner cannot be missed."""
    with tempfile.TemporaryDirectory(prefix="ugem-race-") as directory:
        path = os.path.join(directory, "ugem.sock")
        for _round in range(3):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
                stale.bind(path)
            procs = [subprocess.Popen([*UGEM, "serve", "--socket", path, "--spill-dir", f"{directory}/spill{k}"],
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) for k in range(6)]
            try:
                winners = _listening_once_all_settle(procs, safety=120.0)
                assert len(winners) == 1, [p.returncode for p in procs]
                losers = [p for p in procs if p not in winners]
                assert all(p.returncode not in (None, 0) for p in losers), [p.returncode for p in losers]
                with ugem.connect(path) as dev:
                    assert dev.stats()["clients"] == 1
            finally:
                for p in procs:
                    if p.poll() is None:
                        p.send_signal(signal.SIGTERM)
                    p.communicate(timeout=60)
            assert winners[0].returncode == 0
            assert not os.path.lexists(path)


def _listening_once_all_settle(procs: list[subprocess.Popen[bytes]], safety: float) -> list[subprocess.Popen[bytes]]:
    """Wait until each daemon has printed its banner or exited; the ones listening."""
    banners = {p: b"" for p in procs}
    listening: list[subprocess.Popen[bytes]] = []
    deadline = time.monotonic() + safety
    while True:
        unsettled = [p for p in procs if p not in listening and p.poll() is None]
        if not unsettled:
            return listening
        assert time.monotonic() < deadline, f"daemons still starting after {safety} s (safety net)"
        ready, _, _ = select.select([p.stdout for p in unsettled], [], [], 0.1)  # EOF or a line wakes it
        for p in unsettled:
            if p.stdout in ready:
                chunk = os.read(p.stdout.fileno(), 4096)
                banners[p] += chunk
                if b"\n" in banners[p]:
                    assert banners[p].startswith(b"ugem: listening on "), banners[p]
                    listening.append(p)
                elif not chunk:
                    p.wait(timeout=safety)  # stdout closed: it is exiting


# -- default socket location -------------------------------------------------------------------

def test_default_socket_in_xdg_runtime_dir(runtime_dir: str, xdg_env: dict[str, str]) -> None:
    expected = os.path.join(runtime_dir, "ugem", "ugem.sock")
    with run_daemon(default_socket=True, env=xdg_env) as daemon:
        assert daemon.path == expected
        assert daemon.banner == f"ugem: listening on {expected}\n".encode()
        st = os.lstat(os.path.dirname(expected))
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
        with ugem.connect() as dev:  # found without a path
            assert dev.create(4096) == 1
            assert dev.stats()["per_client"][0]["pid"] == os.getpid()
        listing = ugem_cli("stat", "--json", env=xdg_env)
        assert listing.returncode == 0, listing.stderr
        assert json.loads(listing.stdout)["clients"] == 1


@pytest.mark.parametrize("unsafe", ["mode-0777", "mode-0770", "symlink", "other-owner"])
def test_unsafe_default_socket_dir_is_refused(runtime_dir: str, xdg_env: dict[str, str], unsafe: str) -> None:
    directory = os.path.join(runtime_dir, "ugem")
    if unsafe == "symlink":
        os.mkdir(os.path.join(runtime_dir, "elsewhere"), 0o700)
        os.symlink(os.path.join(runtime_dir, "elsewhere"), directory)
    else:
        os.mkdir(directory)
        os.chmod(directory, {"mode-0777": 0o777, "mode-0770": 0o770}.get(unsafe, 0o700))
    if unsafe == "other-owner":
        if os.getuid() != 0:
            pytest.skip("needs root to give the directory away")
        os.chown(directory, 65534, 65534)
    with pytest.raises(PermissionError) as exc:
        ugem.connect()
    assert directory in str(exc.value)
    daemon = ugem_cli("serve", "--spill-dir", os.path.join(runtime_dir, "spill"), env=xdg_env)
    assert daemon.returncode != 0
    assert "listening" not in daemon.stdout
    assert directory in daemon.stderr, daemon.stderr
    assert not os.path.lexists(os.path.join(directory, "ugem.sock"))
    listing = ugem_cli("ls", env=xdg_env)  # the client commands refuse it too, with a message
    assert listing.returncode != 0 and directory in listing.stderr
    assert "Traceback" not in listing.stderr, listing.stderr


def test_explicit_socket_is_used_as_given(runtime_dir: str, xdg_env: dict[str, str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    insecure = os.path.join(runtime_dir, "ugem")
    os.mkdir(insecure)
    os.chmod(insecure, 0o777)
    path = os.path.join(insecure, "explicit.sock")
    with run_daemon(socket=path) as daemon:
        with ugem.connect(daemon.path) as dev:
            assert dev.stats()["clients"] == 1
        monkeypatch.setenv("UGEM_SOCKET", daemon.path)
        with ugem.connect() as dev:
            assert dev.stats()["clients"] == 1


# -- no daemon -----------------------------------------------------------------------------------

def test_connect_without_daemon_names_path_and_remedy(runtime_dir: str, xdg_env: dict[str, str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    default = os.path.join(runtime_dir, "ugem", "ugem.sock")
    cases: list[tuple[str | None, str, type[OSError]]] = [(None, default, FileNotFoundError)]
    explicit = os.path.join(runtime_dir, "nowhere.sock")
    cases.append((explicit, explicit, FileNotFoundError))
    for path, shown, kind in cases:
        with pytest.raises(kind) as exc:
            ugem.connect(path)
        assert shown in str(exc.value) and "ugem serve" in str(exc.value), str(exc.value)
    os.mkdir(os.path.dirname(default), 0o700)  # the directory exists, the socket does not
    with pytest.raises(FileNotFoundError) as exc:
        ugem.connect()
    assert default in str(exc.value) and "ugem serve" in str(exc.value)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with stale:
        stale.bind(default)  # a socket file nobody listens on
    with pytest.raises(ConnectionRefusedError) as refused:
        ugem.connect()
    assert default in str(refused.value) and "ugem serve" in str(refused.value)
    monkeypatch.setenv("UGEM_SOCKET", explicit)
    with pytest.raises(FileNotFoundError) as exc:
        ugem.connect()
    assert explicit in str(exc.value)
    for command in ("ls", "stat"):
        result = ugem_cli(command, "--json", env=dict(os.environ))
        assert result.returncode == 3 and result.stdout == ""
        assert result.stderr.startswith(f"ugem: {command}: ") and "ugem serve" in result.stderr, result.stderr
        assert explicit in result.stderr and len(result.stderr.splitlines()) == 1, result.stderr


# -- errors: one line naming what was involved, never a traceback ---------------------------------

CLIENT_COMMANDS = (("ls",), ("stat",), ("top", "--once"), ("suspend",), ("resume",))


def _one_line(result: subprocess.CompletedProcess[str], *names: str) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    for name in names:
        assert name in result.stderr, (name, result.stderr)
    return result.stderr


def test_socket_path_errors_name_the_path() -> None:
    with tempfile.TemporaryDirectory(prefix="ugem-cli-") as directory:
        not_a_dir = os.path.join(directory, "file")
        open(not_a_dir, "w").close()
        cases = {os.path.join(not_a_dir, "ugem.sock"): "Not a directory",
                 os.path.join(directory, "x" * 120 + ".sock"): "too long"}
        for path, why in cases.items():
            for command in CLIENT_COMMANDS:
                result = ugem_cli(*command, "--socket", path)
                assert result.returncode == 3 and result.stdout == ""
                assert _one_line(result, path, why).startswith(f"ugem: {command[0]}: cannot connect to")


@contextlib.contextmanager
def _hanging_up_daemon(directory: str, connections: int) -> Iterator[str]:
    """A socket whose 'daemon' reads the HELLO of each of `connections` clients and hangs up."""
    path = os.path.join(directory, "gone.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        server.listen(connections)

        def serve() -> None:
            for _ in range(connections):
                conn, _addr = server.accept()
                with conn:
                    conn.recv(4096)

        worker = threading.Thread(target=serve, daemon=True)
        worker.start()
        yield path
        worker.join(timeout=60)


def test_a_daemon_going_away_is_one_line_naming_the_socket() -> None:
    with tempfile.TemporaryDirectory(prefix="ugem-cli-") as directory, \
            _hanging_up_daemon(directory, len(CLIENT_COMMANDS)) as path:
        for command in CLIENT_COMMANDS:
            result = ugem_cli(*command, "--socket", path)
            assert result.returncode == 3 and result.stdout == ""
            assert _one_line(result, path, "went away").startswith(f"ugem: {command[0]}: ")


def _cli_main(channel: Any, *args: str) -> None:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main(list(args))
    channel.send((status, out.getvalue(), err.getvalue()))


def _cli_as(uid: int, *args: str) -> tuple[int, str, str]:
    """`ugem ARGS` as `uid`, in a forked child running main() (the interpreter lives under a
    directory other users cannot read, so it cannot be exec'd as them)."""
    child = Tenant(_cli_main, args, uid)
    try:
        result: tuple[int, str, str] = child.recv()
        assert child.join() == 0
        return result
    finally:
        child.close()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run the CLI as another user")
def test_other_users_errors_name_the_socket_or_the_refusal() -> None:
    with tempfile.TemporaryDirectory(prefix="ugem-cli-") as directory:
        os.chmod(directory, 0o755)
        for mode, expected, status in (("0600", "permission denied", 3), ("0666", "privileged", 1)):
            path = os.path.join(directory, f"ugem-{mode}.sock")
            with run_daemon(socket=path, socket_mode=mode):
                for command in ("ls", "stat", "suspend"):
                    if command == "stat" and mode == "0666":
                        continue  # anyone who can connect may read the figures
                    code, stdout, stderr = _cli_as(65534, command, "--socket", path)
                    assert (code, stdout) == (status, ""), (command, mode, code, stdout, stderr)
                    assert "Traceback" not in stderr and len(stderr.splitlines()) == 1, stderr
                    assert stderr.startswith(f"ugem: {command}: ") and expected in stderr.lower(), stderr
                    # no access to the socket: its path; refused by the daemon: why, and the errno
                    assert path in stderr if mode == "0600" else stderr.endswith("(EACCES)\n"), stderr


@pytest.mark.parametrize("command", [("ls",), ("ls", "--json"), ("stat",), ("stat", "--json"), ("top", "--once"),
                                     ("ops",)], ids=" ".join)
def test_a_closed_stdout_ends_quietly(command: tuple[str, ...]) -> None:
    with run_daemon() as daemon, daemon.connect() as dev:
        for _ in range(3):
            dev.create(4096)
        read_end, write_end = os.pipe()
        os.close(read_end)  # nobody reads: the first write fails with EPIPE
        try:
            args = [*command] if command == ("ops",) else [*command, "--socket", daemon.path]
            result = subprocess.run([*UGEM, *args], stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=30)
        finally:
            os.close(write_end)
        assert (result.returncode, result.stderr) == (1, ""), result.stderr
        piped = subprocess.run(f"{' '.join(UGEM)} stat --socket {daemon.path} | head -1", shell=True,
                               capture_output=True, text=True, timeout=30)
        assert piped.returncode == 0 and piped.stderr == "" and piped.stdout.startswith("objects"), piped


# -- ls, stat ------------------------------------------------------------------------------------

def test_ls_json() -> None:
    with run_daemon() as daemon, daemon.connect() as dev, daemon.connect() as other:
        untouched = dev.create(100)
        written = dev.create(3 * 4096 + 1)
        dev.pwrite(written, 5000, b"w")
        named = dev.create(1 << 20)
        name = dev.flink(named)
        other.open_name(name)
        result = ugem_cli("ls", "--json", "--socket", daemon.path)
        assert result.returncode == 0, result.stderr
        rows = json.loads(result.stdout)
        assert isinstance(rows, list) and len(rows) == 3
        for row in rows:
            assert set(row) == LS_KEYS, row
            assert all(isinstance(row[k], int) for k in ("id", "size", "name", "handles", "owner_pid"))
        by_size = {row["size"]: row for row in rows}
        assert set(by_size) == {4096, 4 * 4096, 1 << 20}
        assert by_size[4096] | {"id": 0} == dict(id=0, size=4096, placement="none", madvise="willneed", name=0,
                                                 handles=1, owner_pid=os.getpid(), pinned=False, mapped=0,
                                                 label=None)
        assert by_size[4 * 4096]["placement"] == "system"
        assert by_size[1 << 20]["name"] == name and by_size[1 << 20]["handles"] == 2
        assert len({row["id"] for row in rows}) == 3
        dev.close_handle(untouched)
        env = dict(os.environ, UGEM_SOCKET=daemon.path)
        plain = ugem_cli("ls", env=env)
        assert plain.returncode == 0, plain.stderr
        assert len(plain.stdout.strip().splitlines()) == 1 + 2  # header and two objects


def test_ls_table_marks_no_name_and_shows_pinned_and_mapped() -> None:
    with run_daemon() as daemon, daemon.connect() as dev:
        plain = dev.create(4096)
        pinned = dev.create(2 * 4096)
        dev.pin(pinned)
        mapped = dev.create(3 * 4096)
        views = [dev.mmap(mapped), dev.mmap(mapped)]
        name = dev.flink(mapped)
        ids = {row["size"]: row["id"] for row in dev.list_objects()}
        rows = {r["id"]: r for r in json.loads(ugem_cli("ls", "--json", "--socket", daemon.path).stdout)}
        assert (rows[ids[4096]]["pinned"], rows[ids[4096]]["mapped"]) == (False, 0)
        assert (rows[ids[2 * 4096]]["pinned"], rows[ids[2 * 4096]]["mapped"]) == (True, 0)
        assert (rows[ids[3 * 4096]]["pinned"], rows[ids[3 * 4096]]["mapped"]) == (False, 2)
        table = ugem_cli("ls", "--socket", daemon.path)
        assert table.returncode == 0, table.stderr
        header, *lines = table.stdout.splitlines()
        assert header.split() == ["ID", "SIZE", "PLACEMENT", "MADVISE", "NAME", "HANDLES", "PINNED", "MAPPED",
                                  "OWNER", "LABEL"]
        by_id = {line.split()[0]: line.split() for line in lines}
        pid = str(os.getpid())
        assert by_id[str(ids[4096])][1:] == ["4096", "none", "willneed", "-", "1", "no", "0", pid, "-"]
        assert by_id[str(ids[2 * 4096])][1:] == ["8192", "system", "willneed", "-", "1", "yes", "0", pid, "-"]
        assert by_id[str(ids[3 * 4096])][1:] == ["12288", "system", "willneed", str(name), "1", "no", "2", pid, "-"]
        assert all(len(line) == len(header) for line in lines), table.stdout  # columns line up
        del views
        dev.close_handle(plain)


def test_stat_json() -> None:
    with run_daemon() as daemon, daemon.connect() as dev:
        handles = [dev.create(8192) for _ in range(3)]
        dev.pwrite(handles[0], 0, b"s" * 8192)
        result = ugem_cli("stat", "--json", "--socket", daemon.path)
        assert result.returncode == 0, result.stderr
        figures = json.loads(result.stdout)
        assert set(figures) >= STAT_KEYS, STAT_KEYS - set(figures)
        assert set(figures) == set(dev.stats()), "`ugem stat --json` must show the stats() figures"
        assert figures["objects"] == 3
        assert figures["clients"] == 2  # this test's client and `ugem stat` itself
        assert figures["resident_bytes"] == 8192
        for client in figures["per_client"]:
            assert set(client) >= PER_CLIENT_KEYS, client
        mine = [c for c in figures["per_client"] if c["pid"] == os.getpid()]
        assert len(mine) == 1 and mine[0]["objects"] == 3 and mine[0]["bytes"] == 3 * 8192
        plain = ugem_cli("stat", "--socket", daemon.path)
        assert plain.returncode == 0 and "resident_bytes" in plain.stdout, plain.stderr


def test_stat_text_is_readable() -> None:
    with run_daemon(system_budget="3M", vram="1G") as daemon, daemon.connect() as dev:
        h = dev.create(3 << 20)
        dev.pwrite(h, 0, b"r" * (3 << 19))  # 1.5 MiB
        dev.create(100)
        result = ugem_cli("stat", "--socket", daemon.path)
        exact = json.loads(ugem_cli("stat", "--json", "--socket", daemon.path).stdout)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    lines = result.stdout.splitlines()
    figures = {line.split()[0]: line.split(None, 1)[1] for line in lines[:lines.index("per_client (2)")]}
    assert figures["resident_bytes"] == "1.5 MiB (1572864)"
    assert figures["system_budget"] == "3.0 MiB (3145728)" and figures["vram_size"] == "1.0 GiB (1073741824)"
    assert figures["spilled_bytes"] == "0 B" and figures["bytes_moved_total"] == "0 B"
    assert figures["objects"] == "2" and figures["clients"] == "2" and figures["purged_total"] == "0"
    width = max(map(len, figures)) + 2  # the values start in one column
    assert all(line[:width].rstrip() == key and line[width:] == value
               for (key, value), line in zip(figures.items(), lines, strict=False))
    # --json stays exact: plain integers
    assert exact["resident_bytes"] == 3 << 19 and exact["system_budget"] == 3 << 20
    table = lines[lines.index("per_client (2)") + 1:]
    assert table[0].split() == ["ID", "PID", "UID", "OBJECTS", "RESIDENT", "SIZE", "PINNED"]
    mine = next(row.split() for row in table[1:] if row.split()[1] == str(os.getpid()))
    assert mine[3:] == ["2", "1.5", "MiB", "3.0", "MiB", "0", "B"]
    assert len({len(row) for row in table}) == 1, table  # right-aligned columns, one width


def test_stat_text_shows_suspended_and_unknown_figures() -> None:
    figures = {"objects": 1, "suspended": True, "memfd_limit": 17500, "vram_bytes": 512, "per_client": []}
    assert format_stats(figures).splitlines() == [
        "objects      1", "suspended    yes", "memfd_limit  17500", "vram_bytes   512 B", "per_client (0)",
        "  ID  PID  UID  OBJECTS  RESIDENT  SIZE  PINNED"]
    assert "suspended    no" in format_stats({**figures, "suspended": False})


# -- resources -----------------------------------------------------------------------------------

def _fd_limits(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return int(soft), int(hard)
    raise AssertionError("no 'Max open files' in /proc/PID/limits")


def test_daemon_raises_fd_soft_limit_to_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 256:
        pytest.skip(f"hard fd limit {hard} leaves nothing to raise")
    with contextlib.ExitStack() as stack:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # the daemon inherits a low soft limit
        try:
            daemon = stack.enter_context(run_daemon())
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert _fd_limits(daemon.pid) == (hard, hard)
