"""Races in the spirit of IGT's gem_flink_race, gem_close_race, prime_self_import and prime_mmap.

Real threads share Devices (the transport serialises their requests) and, against a daemon,
real processes (this file run as a script, see `Peer`) join in or are SIGKILLed mid-loop.
Every operation either succeeds with the right result or fails with the errno SPEC §2 gives
for a handle or name that was closed under it (ENOENT; EINVAL for GEM_CLOSE); any other
error, a corrupt content marker, a thread that does not come back, a leaked object, name or
fd fails the test.

Each race runs for UGEM_RACE_SECONDS (default 1.0). The random seed is printed as
`seed=N`; UGEM_RACE_SEED=N replays the same random choices (the interleaving is the
scheduler's). Each test prints its operation counts.
"""

from __future__ import annotations

import collections
import errno
import gc
import itertools
import json
import os
import queue
import random
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import ugem
from ugem import cmd
from ugem.testing import Env, run_daemon
from ugem.testing.data import SAFETY_S, wait_until

DURATION = float(os.environ.get("UGEM_RACE_SECONDS", "1.0"))
PAGE = 4096
ENOENT, EINVAL = errno.ENOENT, errno.EINVAL
MAGIC = b"UGEMRACE"
MARK = struct.Struct("<8sIIQ")  # magic, tag (which pool or creator), serial, object size
FAIL = object()  # what `attempt` returns for an allowed failure
Step = Callable[[random.Random, collections.Counter[str]], None]


# -- content markers ---------------------------------------------------------------------

def mark(tag: int, serial: int, size: int) -> bytes:
    return MARK.pack(MAGIC, tag, serial, size)


def read_mark(data: Any) -> tuple[int, int, int] | None:
    """(tag, serial, size) of a marker; None for zeros (not written yet); corruption fails."""
    raw = bytes(data[:MARK.size])
    if raw == bytes(MARK.size):
        return None
    magic, tag, serial, size = MARK.unpack(raw)
    assert magic == MAGIC, f"corrupt content marker {raw!r}"
    return tag, serial, size


def whole_or_zeros(data: Any) -> bytes:
    """A marker read through a mapping (or another description) while the daemon may be
    writing it: zeros while it is only partly there. A copy into shared memory need not
    store its bytes in order for a reader on another CPU (x86 fast string copies), so a
    reader can see some 8-byte pieces of the 24 written and others still zero: such a read
    counts as not written yet. A piece that is there and wrong (a magic that is not MAGIC)
    is kept, and `read_mark` fails on it."""
    raw = bytes(data[:MARK.size])
    pieces = [raw[i:i + 8] for i in range(0, MARK.size, 8)]
    if pieces[0] not in (MAGIC, bytes(8)):
        return raw  # corrupt, not torn
    return raw if all(p != bytes(8) for p in pieces) else bytes(MARK.size)


def attempt(tally: collections.Counter[str], op: str, allowed: set[int] | frozenset[int],
            fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call `fn`; an error with an errno in `allowed` is counted and returns FAIL; any other
    error is a test failure."""
    try:
        result = fn(*args, **kwargs)
    except ugem.UgemError as exc:
        name = errno.errorcode.get(exc.errno, str(exc.errno))
        if exc.errno not in allowed:
            want = sorted(errno.errorcode[e] for e in allowed) or "no error"
            raise AssertionError(f"{op}: {name} ({exc}), expected {want}") from exc
        tally[f"{op} {name}"] += 1
        return FAIL
    tally[f"{op} ok"] += 1
    return result


# -- the race harness --------------------------------------------------------------------

class Race:
    """Threads that each repeat one step until stopped. The first failure stops all; a
    thread that does not come back within `join_timeout` is a hang (stacks in the message)."""

    def __init__(self, seed: int, on_hang: Callable[[], None] | None = None) -> None:
        self.seed = seed
        self.on_hang = on_hang
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.tallies: dict[str, collections.Counter[str]] = {}
        self._steps: list[tuple[str, Step]] = []
        self._threads: list[threading.Thread] = []

    def add(self, name: str, step: Step, count: int = 1) -> None:
        for i in range(count):
            self._steps.append((f"{name}#{i}" if count > 1 else name, step))

    def start(self) -> None:
        for name, step in self._steps:
            rng = random.Random(f"{self.seed}:{name}")
            tally = self.tallies[name] = collections.Counter()
            thread = threading.Thread(target=self._body, args=(name, step, rng, tally), name=f"race {name}",
                                      daemon=True)
            self._threads.append(thread)
            thread.start()

    def _body(self, name: str, step: Step, rng: random.Random, tally: collections.Counter[str]) -> None:
        try:
            while not self.stop.is_set():
                step(rng, tally)
        except BaseException:
            self.errors.append(f"thread {name!r}:\n{traceback.format_exc()}")
            self.stop.set()

    def finish(self, join_timeout: float = 30.0) -> collections.Counter[str]:
        self.stop.set()
        deadline = time.monotonic() + join_timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        stuck = [t for t in self._threads if t.is_alive()]
        if stuck:
            frames = sys._current_frames()
            dump = "\n".join(f"--- {t.name}:\n{''.join(traceback.format_stack(frames[t.ident]))}"
                             for t in stuck if t.ident in frames)
            if self.on_hang is not None:
                self.on_hang()  # e.g. kill the daemon, so that the stuck threads get out
            raise AssertionError(f"{len(stuck)} thread(s) hung for {join_timeout} s:\n{dump}")
        if self.errors:
            more = f"\n(and {len(self.errors) - 1} more failing threads)" if len(self.errors) > 1 else ""
            raise AssertionError(self.errors[0] + more)
        total: collections.Counter[str] = collections.Counter()
        for tally in self.tallies.values():
            total.update(tally)
        return total

    def run(self, duration: float = DURATION) -> collections.Counter[str]:
        self.start()
        self.stop.wait(duration)
        return self.finish()


def report(what: str, total: collections.Counter[str], started: float) -> None:
    ops = sum(total.values())
    print(f"{what}: {ops} operations in {time.monotonic() - started:.2f} s: {dict(sorted(total.items()))}")


# -- steps shared by threads here and by peer processes ----------------------------------

def open_named_step(dev: ugem.Device, max_name: int, bound: int, expect: str,
                    keep: collections.deque[Any] | None = None) -> Step:
    """GEM_OPEN of a guessed name (gem_flink_race flink_name): ENOENT, or a new handle to an
    object whose name is that name, whose size is the size returned, and whose marker is as
    `expect` says ("tag:N": written by creator N; "zero": never written; "any"). At most
    `bound` objects can be named at once and names are lowest-free, so no name above
    `bound` may ever open. With `keep`, a mapping of it is kept there (released later)."""
    def step(rng: random.Random, tally: collections.Counter[str]) -> None:
        name = rng.randint(1, max_name)
        got = attempt(tally, "open_name", {ENOENT}, dev.open_name, name)
        if got is FAIL:
            return
        handle, size = got
        try:
            assert name <= bound, f"name {name} opened, but at most {bound} objects can be named at once"
            marker = read_mark(dev.pread(handle, 0, MARK.size))
            if expect == "zero":
                assert marker is None, f"name {name}: a fresh object reads {marker}"
            elif expect.startswith("tag:"):
                assert marker is not None and marker[0] == int(expect[4:]) and marker[2] == size, \
                    f"name {name} (size {size}) has marker {marker}"
            else:
                assert marker is None or marker[2] == size, f"name {name} (size {size}) has marker {marker}"
            assert dev.info(handle).size == size
            assert dev.flink(handle) == name, "a handle from open_name must flink to the name it was opened by"
            if keep is not None:
                keep.append(dev.mmap(handle))
                tally["mmap of a named object"] += 1
        finally:
            dev.close_handle(handle)  # ours alone: must succeed
    return step


class Pool:
    """Handles of one Device that threads race on (gem_close_race). Entries may be stale:
    closed already, or closed and reused by a newer object of the same pool. Every object
    of the pool has size SIZE and the pool's marker (or zeros, before it is written) in
    its first bytes; threads write only from PAGE on."""

    SIZE = 2 * PAGE

    def __init__(self, dev: ugem.Device, tag: int, fill: int = 8) -> None:
        self.dev = dev
        self.tag = tag
        self.fill = fill
        self.handles: list[int] = []
        self.serial = itertools.count(1)
        self.top = 0  # the highest handle seen

    def _note(self, handle: int) -> None:
        self.top = max(self.top, handle)

    def _pick(self, rng: random.Random) -> int:
        handles = self.handles[:]
        if not handles or rng.random() < 0.05:  # now and then one that may never have existed
            return rng.randint(1, self.top + 2)
        return rng.choice(handles)

    def _check(self, data: Any) -> None:
        marker = read_mark(data)
        assert marker is None or (marker[0] == self.tag and marker[2] == self.SIZE), \
            f"pool {self.tag} object reads marker {marker}"

    def create_step(self, rng: random.Random, tally: collections.Counter[str]) -> None:
        if len(self.handles) >= self.fill:
            time.sleep(0.0002)
            return
        handle = self.dev.create(self.SIZE)
        tally["create ok"] += 1
        self._note(handle)
        # a closer may hit it already (through a stale entry whose number it reused)
        attempt(tally, "pwrite-marker", {ENOENT}, self.dev.pwrite, handle, 0,
                mark(self.tag, next(self.serial), self.SIZE))
        if rng.random() < 0.3:
            attempt(tally, "flink", {ENOENT}, self.dev.flink, handle)
        self.handles.append(handle)

    def close_step(self, rng: random.Random, tally: collections.Counter[str]) -> None:
        if len(self.handles) <= self.fill // 2 and rng.random() < 0.9:
            time.sleep(0.0002)  # keep the pool half full, so that users find live handles too
            return
        handle = self._pick(rng)
        try:
            self.handles.remove(handle)
        except ValueError:
            pass
        attempt(tally, "close", {EINVAL}, self.dev.close_handle, handle)

    def use_step(self, rng: random.Random, tally: collections.Counter[str]) -> None:
        handle = self._pick(rng)
        op = rng.choice(("pread", "pwrite", "info", "exec", "exec", "wait", "busy", "domain", "mmap", "mmap",
                         "export", "export", "flink", "close"))
        dev = self.dev
        if op == "pread":
            data = attempt(tally, op, {ENOENT}, dev.pread, handle, 0, MARK.size)
            if data is not FAIL:
                self._check(data)
        elif op == "pwrite":
            attempt(tally, op, {ENOENT}, dev.pwrite, handle, self.SIZE - 64, rng.randbytes(64))
        elif op == "info":
            info = attempt(tally, op, {ENOENT}, dev.info, handle)
            if info is not FAIL:
                assert info.size == self.SIZE, info
        elif op == "exec":
            fill = cmd.Fill(dst=handle, offset=PAGE, length=PAGE, byte=rng.randrange(256))
            fence = attempt(tally, op, {ENOENT}, dev.execbuffer, [fill])
            if fence is not FAIL:  # the fence outlives the handle: waiting on it always works
                attempt(tally, "wait_fence", set(), dev.wait_fence, fence, 10 * 10**9)
        elif op == "wait":
            attempt(tally, op, {ENOENT}, dev.wait, handle, 10 * 10**9)
        elif op == "busy":
            attempt(tally, op, {ENOENT}, dev.busy, handle)
        elif op == "domain":
            attempt(tally, op, {ENOENT}, dev.set_domain, handle, ugem.DOMAIN_CPU)
        elif op == "mmap":
            view = attempt(tally, op, {ENOENT}, dev.mmap, handle)
            if view is not FAIL:
                assert len(view) == self.SIZE
                self._check(view)
                view[PAGE:PAGE + 8] = b"mapped!!"
                del view
        elif op == "export":
            fd = attempt(tally, op, {ENOENT}, dev.export, handle)
            if fd is not FAIL:
                try:
                    assert os.lseek(fd, 0, os.SEEK_END) == self.SIZE
                    self._check(os.pread(fd, MARK.size, 0))
                    # the same memory: the lowest handle this client holds for it, or (if it
                    # was closed meanwhile) a new object adopted from the fd
                    again = attempt(tally, "import_fd", set(), dev.import_fd, fd)
                    self._note(again)
                    self._check(os.pread(fd, MARK.size, 0))
                    if again != handle:
                        attempt(tally, "close-import", {EINVAL}, dev.close_handle, again)
                finally:
                    os.close(fd)
        elif op == "flink":
            attempt(tally, op, {ENOENT}, dev.flink, handle)
        else:
            try:
                self.handles.remove(handle)
            except ValueError:
                pass
            attempt(tally, op, {EINVAL}, dev.close_handle, handle)

    def add_to(self, race: Race, name: str, users: int, closers: int = 1) -> None:
        race.add(f"{name} create", self.create_step)
        race.add(f"{name} close", self.close_step, closers)
        race.add(f"{name} use", self.use_step, users)


def import_step(dev: ugem.Device, fd: int, marker: bytes, *, anchor: int | None = None,
                exclusive: bool = False) -> Step:
    """PRIME reimport (prime_self_import reimport-vs-gem_close-race): import_fd of a live
    fd always succeeds, and the handle reads the marker unless another thread closed it
    meanwhile. `anchor`: a handle of the object that this client holds throughout, so
    every import must return it (the lowest; handles from 1) and nothing is closed here.
    Otherwise the import is closed again. `exclusive`: no other thread uses this client,
    so nothing can fail and every import returns handle 1."""
    def step(rng: random.Random, tally: collections.Counter[str]) -> None:
        handle = attempt(tally, "import_fd", set(), dev.import_fd, fd)
        if anchor is not None or exclusive:
            want = anchor if anchor is not None else 1
            assert handle == want, f"import_fd returned {handle}, the lowest handle is {want}"
        data = attempt(tally, "pread", set() if anchor is not None or exclusive else {ENOENT},
                       dev.pread, handle, 0, MARK.size)
        if data is not FAIL:
            assert data == marker, f"handle {handle} from import_fd reads {data!r}"
        if anchor is None:
            attempt(tally, "close", set() if exclusive else {EINVAL}, dev.close_handle, handle)
    return step


# -- peers: clients in other processes ---------------------------------------------------

class Peer:
    """A client in another process: this file run as a script with a role. It connects,
    says "go", waits for `start()`, loops until `stop()` (which returns its tally) or
    until `kill()`ed. A failure in it ends it with its traceback on stderr."""

    def __init__(self, role: str, *args: object, pass_fds: tuple[int, ...] = ()) -> None:
        self.role = role
        self.proc = subprocess.Popen([sys.executable, __file__, role, *map(str, args)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0, pass_fds=pass_fds,
                                     start_new_session=True)
        self._done = False
        self._stderr = ""

    def wait_go(self, timeout: float = 30.0) -> None:
        assert self.proc.stdout is not None
        line = b""
        deadline = time.monotonic() + timeout
        while not line.endswith(b"\n"):
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            chunk = os.read(self.proc.stdout.fileno(), 1) if ready else b""
            if not chunk:
                self.kill()
                raise AssertionError(f"peer {self.role} did not start (got {line!r}): {self._stderr}")
            line += chunk
        assert line == b"go\n", line

    def start(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"start\n")

    def assert_running(self) -> None:
        if self.proc.poll() is not None:
            _, err = self.proc.communicate()
            self._done = True
            raise AssertionError(f"peer {self.role} failed (status {self.proc.returncode}):\n{err.decode()}")

    def stop(self, timeout: float = 30.0) -> collections.Counter[str]:
        try:
            out, err = self.proc.communicate(b"stop\n", timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"peer {self.role} hung: {self._stderr}") from None
        self._done = True
        assert self.proc.returncode == 0, f"peer {self.role} failed ({self.proc.returncode}):\n{err.decode()}"
        return collections.Counter({f"peer {k}": v for k, v in json.loads(out.splitlines()[-1]).items()})

    def kill(self) -> None:
        if self._done:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        out, err = self.proc.communicate(timeout=10)
        self._stderr = err.decode(errors="replace")
        self._done = True


@pytest.fixture
def peers() -> Iterator[Callable[..., Peer]]:
    started: list[Peer] = []

    def spawn(role: str, *args: object, pass_fds: tuple[int, ...] = ()) -> Peer:
        peer = Peer(role, *args, pass_fds=pass_fds)
        started.append(peer)
        return peer
    try:
        yield spawn
    finally:
        for peer in started:
            peer.kill()


def _peer_main(argv: list[str]) -> None:
    role, path, seed_text, *args = argv
    seed = int(seed_text)
    devs: list[ugem.Device] = []

    def dev() -> ugem.Device:
        devs.append(ugem.connect(path))
        return devs[-1]
    race = Race(seed)
    keep: collections.deque[Any] = collections.deque(maxlen=4)
    if role == "opener":  # args: max_name bound expect
        race.add("open_name", open_named_step(dev(), int(args[0]), int(args[1]), args[2]), 2)
    elif role == "importer":  # args: fd marker-hex
        race.add("import", import_step(dev(), int(args[0]), bytes.fromhex(args[1]), exclusive=True))
    elif role == "worker":  # args: tag; runs until SIGKILLed
        tag = int(args[0])
        Pool(dev(), tag).add_to(race, "pool a", users=2)
        Pool(dev(), tag + 1).add_to(race, "pool b", users=1)
        race.add("open_name", open_named_step(dev(), 48, 1 << 20, "any", keep=keep))
        exports: collections.deque[tuple[int, int]] = collections.deque()
        exporter = dev()

        def export_and_hold(rng: random.Random, tally: collections.Counter[str]) -> None:
            handle = exporter.create(PAGE)
            exports.append((handle, exporter.export(handle)))  # fd and handle held, up to the kill
            tally["export ok"] += 1
            if len(exports) > 8:
                handle, fd = exports.popleft()
                os.close(fd)
                exporter.close_handle(handle)
            time.sleep(0.001)
        race.add("export", export_and_hold)
    else:
        raise SystemExit(f"unknown role {role}")
    print("go", flush=True)
    if sys.stdin.readline() != "start\n":
        raise SystemExit("no start")
    stopping = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stopping.set()), daemon=True).start()
    race.start()
    while not stopping.wait(0.02) and not race.stop.is_set():
        pass
    total = race.finish()
    keep.clear()
    for d in devs:
        d.close()
    print(json.dumps(total), flush=True)


# -- fixtures and checks -----------------------------------------------------------------

@pytest.fixture
def seed() -> int:
    value = os.environ.get("UGEM_RACE_SEED")
    chosen = int(value) if value else random.SystemRandom().randrange(1 << 32)
    print(f"seed={chosen}")
    return chosen


LEAK_WARNINGS = {"PYTHONWARNINGS": "always::ResourceWarning"}  # an fd the daemon leaves to the GC says so


@pytest.fixture
def race_env(mode: str) -> Iterator[Env]:
    """A manager of this test's own (so fd counts are this test's): embedded, or a daemon."""
    if mode == "embedded":
        with Env.start("embedded") as env:
            yield env
        return
    with run_daemon(env={**os.environ, **LEAK_WARNINGS}) as daemon:
        env = Env("daemon", daemon=daemon)
        try:
            yield env
        finally:
            env.close()


def fd_count(env: Env) -> int:
    """The manager's open fds: the daemon's, or (embedded) this process's."""
    if env.daemon is not None:
        return env.daemon.fd_count()
    return len(os.listdir("/proc/self/fd"))


def new_race(env: Env, seed: int) -> Race:
    return Race(seed, on_hang=env.daemon.proc.kill if env.daemon is not None else None)


def held_by(dev: ugem.Device) -> int:
    """How many handles `dev` holds, as the manager counts them."""
    rows = [c for c in dev.stats()["per_client"] if c["id"] == dev.client_id]
    assert len(rows) == 1, rows
    return int(rows[0]["objects"])


def close_everything(dev: ugem.Device) -> None:
    """Close every handle `dev` holds (handles are lowest-free, so a scan finds them)."""
    limit = 32
    while held_by(dev):
        assert limit < 1 << 20, f"client {dev.client_id} holds handles that no scan finds"
        for handle in range(1, limit + 1):
            try:
                dev.close_handle(handle)
            except ugem.InvalidArgument:
                pass
        limit *= 4




def assert_settled(env: Env, observer: ugem.Device, baseline: int, names: set[int] | range = range(1, 33)) -> None:
    """Zero objects, no names, only the observer connected, and the fd count back at
    `baseline` (clients are released asynchronously, so both are polled for)."""
    wait_until(lambda: observer.stats()["objects"] == 0, what="zero objects")
    stats = observer.stats()
    assert stats["clients"] == 1 and stats["resident_bytes"] == 0, stats
    for name in sorted(names):
        with pytest.raises(ugem.NoSuchObject):
            observer.open_name(name)
    last: list[int] = []
    try:
        wait_until(lambda: last.append(fd_count(env)) or last[-1] == baseline, what=f"fd count == {baseline}")
    except AssertionError:
        pid = env.daemon.pid if env.daemon is not None else os.getpid()
        targets: collections.Counter[str] = collections.Counter()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                targets[os.readlink(f"/proc/{pid}/fd/{fd}")] += 1
            except FileNotFoundError:
                pass
        raise AssertionError(f"fd count {last[-1]} != baseline {baseline}: {dict(targets)}") from None
    if env.daemon is not None:
        log = env.daemon.stderr_text()
        assert "ResourceWarning" not in log, log
        assert env.daemon.proc.poll() is None, log


# -- gem_flink_race ----------------------------------------------------------------------

def test_flink_open_race(race_env: Env, seed: int, peers: Callable[..., Peer]) -> None:
    """flink_name: one thread creates, marks, flinks and closes objects (at most 4 alive)
    while threads of two other clients (and, with a daemon, a client in another process)
    open guessed names: ENOENT, or the named object with the right size and marker."""
    started = time.monotonic()
    env = race_env
    observer = env.open()
    baseline = fd_count(env)
    creator, b, c = env.open(), env.open(), env.open()
    openers = 3 + (2 if env.daemon is not None else 0)
    bound = 4 + openers  # named objects at once: <= 4 of the creator, + 1 held per opener
    names: set[int] = set()
    pool: list[int] = []
    serial = itertools.count(1)

    def create_step(rng: random.Random, tally: collections.Counter[str]) -> None:
        size = rng.choice((1, 2, 3, 5)) * PAGE
        handle = creator.create(size)
        creator.pwrite(handle, 0, mark(1, next(serial), size))
        name = creator.flink(handle)
        assert 1 <= name <= bound, name
        assert creator.flink(handle) == name and creator.info(handle).name == name
        names.add(name)
        pool.append(handle)
        tally["create+pwrite+flink ok"] += 1
        if len(pool) > 3:
            creator.close_handle(pool.pop(rng.randrange(len(pool))))
            tally["close ok"] += 1

    peer = None
    if env.daemon is not None:
        peer = peers("opener", env.daemon.path, seed, bound + 2, bound, "tag:1")
        peer.wait_go()
    race = new_race(env, seed)
    race.add("creator", create_step)
    race.add("open b", open_named_step(b, bound + 2, bound, "tag:1"), 2)
    race.add("open c", open_named_step(c, bound + 2, bound, "tag:1"))
    if peer is not None:
        peer.start()
    total = race.run()
    if peer is not None:
        total.update(peer.stop())
    assert total["open_name ok"] + total["peer open_name ok"] > 0 and total["open_name ENOENT"] > 0, total
    assert held_by(b) == held_by(c) == 0
    for handle in pool:
        creator.close_handle(handle)
    assert observer.stats()["objects"] == 0
    for dev in (creator, b, c):
        dev.close()
    assert_settled(env, observer, baseline, names | set(range(1, bound + 3)))
    report("flink/open race", total, started)


def test_flink_close_race(race_env: Env, seed: int, peers: Callable[..., Peer]) -> None:
    """flink_close: threads of one client create objects (aiming at handle 1), flink(1)
    and close(1), while other clients open the names; flink is ok or ENOENT, close ok or
    EINVAL, and nothing leaks: once they stop, the client holds nothing and no object or
    name is left, with every client still open."""
    started = time.monotonic()
    env = race_env
    observer = env.open()
    baseline = fd_count(env)
    a, b = env.open(), env.open()
    openers = 2 + (2 if env.daemon is not None else 0)
    bound = 1 + openers  # named: a's handle 1, + what the openers hold
    names: set[int] = set()

    def flink_close(rng: random.Random, tally: collections.Counter[str]) -> None:
        handle = a.create(PAGE)
        if handle != 1:
            a.close_handle(handle)  # only handle 1 is shared between the threads
        name = attempt(tally, "flink(1)", {ENOENT}, a.flink, 1)
        if name is not FAIL:
            assert 1 <= name <= bound, name
            names.add(name)
        attempt(tally, "close(1)", {EINVAL}, a.close_handle, 1)

    peer = None
    if env.daemon is not None:
        peer = peers("opener", env.daemon.path, seed, bound + 2, bound, "zero")
        peer.wait_go()
    race = new_race(env, seed)
    race.add("flink-close", flink_close, 3)
    race.add("open b", open_named_step(b, bound + 2, bound, "zero"), 2)
    if peer is not None:
        peer.start()
    total = race.run()
    if peer is not None:
        total.update(peer.stop())
    assert total["flink(1) ok"] > 0 and total["close(1) ok"] > 0, total
    # every creation of handle 1 is followed by its thread's close(1): nothing is left
    assert held_by(a) == 0 and held_by(b) == 0
    stats = observer.stats()
    assert stats["objects"] == 0, stats
    for name in sorted(names | set(range(1, bound + 3))):
        with pytest.raises(ugem.NoSuchObject):
            b.open_name(name)
    a.close()
    b.close()
    assert_settled(env, observer, baseline, names)
    report("flink/close race", total, started)


# -- gem_close_race ----------------------------------------------------------------------

def test_close_race(race_env: Env, seed: int) -> None:
    """Threads close handles while others pread, pwrite, info, execbuffer (Fill) and wait,
    set_domain, mmap, export (and re-import), flink them: one Device shared by six threads,
    two more Devices with three each. Only ENOENT (EINVAL for close) may come back; markers
    read are the pool's own; afterwards nothing is left and the fd count is back."""
    started = time.monotonic()
    env = race_env
    observer = env.open()
    baseline = fd_count(env)
    devs = [env.open() for _ in range(3)]
    race = new_race(env, seed)
    Pool(devs[0], 10).add_to(race, "shared", users=4)
    Pool(devs[1], 20).add_to(race, "second", users=1)
    Pool(devs[2], 30).add_to(race, "third", users=1)
    total = race.run(DURATION * 1.5)
    for op in ("exec ok", "mmap ok", "export ok", "pread ok", "close ok", "close EINVAL", "pread ENOENT"):
        assert total[op] > 0, (op, total)
    for dev in devs:
        close_everything(dev)
    for dev in devs:
        dev.close()
    assert_settled(env, observer, baseline)
    report("close race", total, started)


def test_close_race_with_sigkilled_processes(seed: int, peers: Callable[..., Peer]) -> None:
    """gem_close_race process-exit: three processes (four clients each: two racing pools
    as above, one opening and mapping others' names, one holding exports) are SIGKILLed at
    random moments while clients here keep racing and opening their names. The daemon keeps
    serving; afterwards no object, name or client of theirs is left and its fd count is
    back where it started, with no fd left to its garbage collector."""
    started = time.monotonic()
    with run_daemon(env={**os.environ, **LEAK_WARNINGS}) as daemon:
        env = Env("daemon", daemon=daemon)
        try:
            observer = env.open()
            baseline = fd_count(env)
            workers = [peers("worker", daemon.path, seed, 100 * (i + 1)) for i in range(3)]
            for worker in workers:
                worker.wait_go()
            mine, opener = env.open(), env.open()
            race = new_race(env, seed)
            Pool(mine, 1).add_to(race, "survivor", users=2)
            race.add("open theirs", open_named_step(opener, 48, 1 << 20, "any"))
            rng = random.Random(f"{seed}:kills")
            kill_at = sorted(rng.uniform(0.3, 1.5) * DURATION for _ in workers)
            for worker in workers:
                worker.start()
            race.start()
            t0 = time.monotonic()
            clients_at_first_kill = 0
            for worker, when in zip(workers, kill_at, strict=True):
                time.sleep(max(0.0, t0 + when - time.monotonic()))
                clients_at_first_kill = clients_at_first_kill or observer.stats()["clients"]
                worker.assert_running()  # no failure in it so far
                worker.kill()
            time.sleep(0.2 * DURATION)  # the survivors go on after the last kill
            total = race.finish()
            assert clients_at_first_kill == 3 + 3 * 4, clients_at_first_kill  # 4 connections per worker
            assert total["open_name ok"] > 0, total
            close_everything(mine)
            mine.close()
            opener.close()
            assert_settled(env, observer, baseline, range(1, 49))
            observer.close()
        finally:
            env.close()
    report("close race with SIGKILLed processes", total, started)


# -- prime_self_import -------------------------------------------------------------------

def test_self_import_race(race_env: Env, seed: int, peers: Callable[..., Peer]) -> None:
    """prime_self_import. Phase 1: clients A and B hold anchor handle 1 of one object;
    threads re-import its fd, open and close duplicates by name, export duplicates and
    import those: every import returns 1, the lowest handle. Phase 2 (reimport-vs-
    gem_close-race): no anchors; threads import and close, others close at random, a
    writer checks its pwrites land in the fd's memory, a sampler sees never more than one
    object for it, and (daemon) a client in another process imports it too. After all
    closes the manager counts 0 objects while the memfd lives on through the fd."""
    started = time.monotonic()
    env = race_env
    observer = env.open()
    baseline = fd_count(env)
    a, b = env.open(), env.open()
    size = 2 * PAGE
    marker = mark(7, 1, size)
    anchor = a.create(size)
    assert anchor == 1
    a.pwrite(anchor, 0, marker)
    name = a.flink(anchor)
    fd = a.export(anchor)
    assert b.import_fd(fd) == 1
    total: collections.Counter[str] = collections.Counter()

    def duplicate(dev: ugem.Device) -> Step:
        def step(rng: random.Random, tally: collections.Counter[str]) -> None:
            dup, dup_size = attempt(tally, "open_name", set(), dev.open_name, name)
            assert dup > 1 and dup_size == size
            assert dev.import_fd(fd) == 1, "import must return the lowest handle (the anchor)"
            exported = attempt(tally, "export dup", {ENOENT}, dev.export, dup)
            if exported is not FAIL:
                try:
                    assert a.import_fd(exported) == 1 and b.import_fd(exported) == 1
                finally:
                    os.close(exported)
            attempt(tally, "close dup", {EINVAL}, dev.close_handle, dup)
        return step

    def closer(dev: ugem.Device) -> Step:
        def step(rng: random.Random, tally: collections.Counter[str]) -> None:
            attempt(tally, "close 2..6", {EINVAL}, dev.close_handle, rng.randint(2, 6))
        return step

    race = new_race(env, seed)
    race.add("reimport a", import_step(a, fd, marker, anchor=1), 2)
    race.add("reimport b", import_step(b, fd, marker, anchor=1))
    race.add("duplicate a", duplicate(a))
    race.add("duplicate b", duplicate(b))
    race.add("close a", closer(a))
    race.add("close b", closer(b))
    total.update(race.run(DURATION * 0.8))
    for dev in (a, b):  # the anchors only
        for handle in range(2, 8):
            try:
                dev.close_handle(handle)
            except ugem.InvalidArgument:
                pass
        assert held_by(dev) == 1
    assert observer.stats()["objects"] == 1

    # phase 2: no anchors
    a.close_handle(1)
    b.close_handle(1)
    assert observer.stats()["objects"] == 0
    assert os.pread(fd, MARK.size, 0) == marker  # the memfd lives on through the fd
    peer = None
    if env.daemon is not None:
        peer = peers("importer", env.daemon.path, seed, fd, marker.hex(), pass_fds=(fd,))
        peer.wait_go()
    written = itertools.count(1)

    def writer(rng: random.Random, tally: collections.Counter[str]) -> None:
        handle = attempt(tally, "import_fd", set(), a.import_fd, fd)
        value = struct.pack("<Q", next(written))
        if attempt(tally, "pwrite", {ENOENT}, a.pwrite, handle, PAGE, value) is not FAIL:
            assert os.pread(fd, 8, PAGE) == value, "a pwrite through an import must land in the fd's memory"
        attempt(tally, "close", {EINVAL}, a.close_handle, handle)

    def sampler(rng: random.Random, tally: collections.Counter[str]) -> None:
        objects = observer.stats()["objects"]
        assert objects <= 1, f"{objects} objects for one memfd"
        tally[f"sampled {objects} objects"] += 1

    race = new_race(env, seed)
    race.add("reimport-close a", import_step(a, fd, marker), 2)
    race.add("reimport-close b", import_step(b, fd, marker))
    race.add("close a", lambda rng, tally: attempt(tally, "close 1..4", {EINVAL}, a.close_handle, rng.randint(1, 4)))
    race.add("writer a", writer)
    race.add("sampler", sampler)
    if peer is not None:
        peer.start()
    total.update(race.run(DURATION))
    if peer is not None:
        total.update(peer.stop())
    assert total["sampled 0 objects"] + total["sampled 1 objects"] > 0, total
    close_everything(a)
    close_everything(b)
    assert observer.stats()["objects"] == 0
    assert os.pread(fd, MARK.size, 0) == marker

    # quiescent: the fd is adopted again, and import returns the lowest existing handle
    first = a.import_fd(fd)
    assert observer.stats()["objects"] == 1 and a.pread(first, 0, MARK.size) == marker
    second, _ = a.open_name(a.flink(first))
    assert first < second and a.import_fd(fd) == first
    a.close_handle(first)
    assert a.import_fd(fd) == second
    a.close_handle(second)
    assert observer.stats()["objects"] == 0
    os.close(fd)
    a.close()
    b.close()
    assert_settled(env, observer, baseline, {name})
    report("self-import race", total, started)


def test_export_close_race(race_env: Env, seed: int) -> None:
    """prime_self_import export-vs-gem_close-race: threads of one client create objects
    (aiming at handle 1), export(1) and close(1); a thread of another client imports the
    exported fds (the object while it lives, else its memory adopted again). export is ok
    or ENOENT, close(1) ok or EINVAL, the other closes always work; nothing leaks."""
    started = time.monotonic()
    env = race_env
    observer = env.open()
    baseline = fd_count(env)
    c, d = env.open(), env.open()
    handoff: queue.Queue[int] = queue.Queue(maxsize=16)

    def export_close(rng: random.Random, tally: collections.Counter[str]) -> None:
        handle = c.create(PAGE)
        if handle != 1:
            c.close_handle(handle)
        fd = attempt(tally, "export(1)", {ENOENT}, c.export, 1)
        attempt(tally, "close(1)", {EINVAL}, c.close_handle, 1)
        if fd is FAIL:
            return
        try:
            assert os.lseek(fd, 0, os.SEEK_END) == PAGE
            assert os.pread(fd, 16, 0) == bytes(16)
            copy = os.dup(fd)
            try:
                handoff.put_nowait(copy)
            except queue.Full:
                os.close(copy)
        finally:
            os.close(fd)

    def import_other(rng: random.Random, tally: collections.Counter[str]) -> None:
        try:
            fd = handoff.get(timeout=0.01)
        except queue.Empty:
            return
        try:
            handle = attempt(tally, "import_fd in d", set(), d.import_fd, fd)
            assert handle == 1, "d holds nothing else"
            assert d.pread(handle, 0, 16) == bytes(16)
            d.close_handle(handle)
        finally:
            os.close(fd)

    race = new_race(env, seed)
    race.add("export-close", export_close, 3)
    race.add("import in d", import_other)
    total = race.run()
    while not handoff.empty():
        os.close(handoff.get_nowait())
    assert total["export(1) ok"] > 0 and total["export(1) ENOENT"] > 0 and total["import_fd in d ok"] > 0, total
    assert held_by(c) == 0 and held_by(d) == 0
    assert observer.stats()["objects"] == 0
    c.close()
    d.close()
    assert_settled(env, observer, baseline)
    report("export/close race", total, started)


# -- prime_mmap / gem_mmap close races ---------------------------------------------------

class MappingLeak(AssertionError):
    """An object outlived the release of its last mapping (or died while mapped)."""


def test_map_close_race(race_env: Env, seed: int) -> None:
    """A creator makes, marks, flinks and closes objects one at a time (always handle 1)
    while threads of its client mmap and export that handle and a thread of another
    client opens the name, maps it and closes its handle at once. Each mmap either fails
    with ENOENT or maps an object that shows its marker (the one expected or, the handle
    having been reused, a newer one) and stays valid after every handle is gone. The
    manager counts exactly the objects still mapped, and zero once they are released."""
    started = time.monotonic()
    env = race_env
    observer = env.open()
    baseline = fd_count(env)
    a, b = env.open(), env.open()
    size = 2 * PAGE
    serial = itertools.count(1)
    current: list[tuple[int, int, int]] = [(0, 0, 0)]  # handle, serial, name of the newest object
    kept: dict[str, collections.deque[tuple[int, memoryview]]] = {}

    def create_step(rng: random.Random, tally: collections.Counter[str]) -> None:
        number = next(serial)
        handle = a.create(size)
        a.pwrite(handle, 0, mark(3, number, size))
        current[0] = (handle, number, a.flink(handle))
        time.sleep(rng.choice((0, 0.0002, 0.001)))
        a.close_handle(handle)  # only this thread closes in a: it must work
        tally["create+flink+close ok"] += 1
        time.sleep(rng.choice((0, 0.0002, 0.001)))  # handle 1 closed: maps now fail with ENOENT

    def settle_marker(read: Callable[[], Any], expected: int) -> int:
        """The serial of the object read; a reused handle may show its object before the
        creator marked it, or while the daemon writes the marker, so wait for a whole marker
        (bounded)."""
        deadline = time.monotonic() + SAFETY_S
        while (marker := read_mark(whole_or_zeros(read()))) is None:
            assert time.monotonic() < deadline, \
                f"a mapped object never got a whole marker: {bytes(read()[:MARK.size])!r}"
            time.sleep(0.0002)
        tag, number, marked_size = marker
        assert tag == 3 and marked_size == size and number >= expected, (marker, expected)
        return number

    def keep(name: str, tally: collections.Counter[str], number: int, view: memoryview) -> None:
        view[PAGE:PAGE + 8] = struct.pack("<Q", number)
        deque = kept.setdefault(name, collections.deque())
        deque.append((number, view))
        if len(deque) > 3:  # older mappings: still valid after every handle closed, then released
            old_number, old = deque.popleft()
            assert read_mark(old) == (3, old_number, size) and old[PAGE:PAGE + 8] == struct.pack("<Q", old_number)
        tally["mapped"] += 1

    def mapper(name: str) -> Step:
        def step(rng: random.Random, tally: collections.Counter[str]) -> None:
            handle, expected, _ = current[0]
            view = attempt(tally, "mmap", {ENOENT}, a.mmap, handle)
            if view is not FAIL:
                number = settle_marker(lambda: view, expected)
                tally["mmap: expected object" if number == expected else "mmap: handle reused"] += 1
                keep(name, tally, number, view)
        return step

    def by_name(rng: random.Random, tally: collections.Counter[str]) -> None:
        _, expected, name = current[0]
        got = attempt(tally, "open_name", {ENOENT}, b.open_name, name)
        if got is FAIL:
            return
        handle, got_size = got
        assert got_size == size
        view = b.mmap(handle)  # it holds the handle: the map must work
        b.close_handle(handle)
        keep("b", tally, settle_marker(lambda: view, expected), view)

    def exporter(rng: random.Random, tally: collections.Counter[str]) -> None:
        handle, expected, _ = current[0]
        fd = attempt(tally, "export", {ENOENT}, a.export, handle)
        if fd is not FAIL:
            try:
                settle_marker(lambda: os.pread(fd, MARK.size, 0), expected)
            finally:
                os.close(fd)
        time.sleep(0.0005)

    race = new_race(env, seed)
    race.add("creator", create_step)
    race.add("map a", mapper("a1"))
    race.add("map a", mapper("a2"))
    race.add("map by name", by_name)
    race.add("export", exporter)
    total = race.run(DURATION * 1.2)
    assert total["mmap ok"] > 0 and total["mmap ENOENT"] > 0 and total["open_name ok"] > 0, total
    assert held_by(a) == 0 and held_by(b) == 0
    gc.collect()
    for dev in (a, b):
        dev.stats()  # sends the releases of dropped mappings
    alive = {number for deque in kept.values() for number, _ in deque}
    assert alive
    objects = observer.stats()["objects"]
    if objects != len(alive):
        raise MappingLeak(f"{objects} objects, but {len(alive)} distinct objects are still mapped and no handle is "
                          f"open")
    assert all(read_mark(view) == (3, number, size) for deque in kept.values() for number, view in deque)
    kept.clear()  # the last references: every mapping is released
    gc.collect()
    for dev in (a, b):
        dev.stats()
    objects = observer.stats()["objects"]
    if objects:
        raise MappingLeak(f"{objects} objects remain after every mapping was released")
    a.close()
    b.close()
    assert_settled(env, observer, baseline)
    report("map/close race", total, started)


def test_mapping_released_after_a_flush(race_env: Env) -> None:
    """The minimal reproducer of what test_map_close_race finds, no thread needed: map two
    objects, close both handles, release one mapping (its release is sent with the next
    request), then the other: the second object must go too."""
    dev = race_env.open()
    first, second = dev.create(PAGE), dev.create(PAGE)
    first_view, second_view = dev.mmap(first), dev.mmap(second)
    dev.close_handle(first)
    dev.close_handle(second)
    del second_view
    assert dev.stats()["objects"] == 1  # the release of second_view went out before this
    del first_view
    objects = dev.stats()["objects"]
    if objects:
        raise MappingLeak(f"{objects} object(s) left after both mappings were released")


if __name__ == "__main__":
    _peer_main(sys.argv[1:])
