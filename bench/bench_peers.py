"""ugem next to what users would otherwise pick: POSIX shared memory, SharedArray, Ray.

    python bench/bench_peers.py [--quick] [--runs N] [--n N] [--warmup N] [--json [PATH]]
                                [--ray-python PYTHON | --no-ray]

Everything is measured in the same run, on the same machine, with the same size (1 MiB);
the peers' rows come from rounds interleaved with ugem's (`H.interleaved`). Latency in us
per operation; ratio = ugem median / peer median (lower is better for ugem). Targets (issue
15), through the daemon: a 1 MiB object's life (create, mmap, release, close) <= 1.0x the
shared_memory lifecycle below; each way of sharing 1 MiB with a process that maps it (name,
fd imported, fd mapped as it is) <= 1.0x shared_memory by name; the zero-copy get <= 1.0x
`ray.get` (when Ray is measured). The other rows are informational.

1. segment lifecycle, one process: create a 1 MiB segment, attach it a second time, destroy
   both. Peers: `multiprocessing.shared_memory.SharedMemory(create=True, size=1 MiB)`, a
   second `SharedMemory(name=...)`, close both + unlink (the baseline; both objects map the
   segment); `SharedArray.create` + `attach` + `delete` (+ dropping both arrays, which
   unmaps them), when SharedArray is installed (`pip install -e '.[peers]'`). ugem, embedded
   and through a daemon: create + flink + open_name + close both handles (no mapping); create
   + mmap + release of the mapping + close; and like for like with shared_memory: create +
   mmap, open_name + mmap, release both, close both. Nobody touches the pages.
2. share 1 MiB with another process. A long-lived consumer process (this Python, started
   once) waits on a SOCK_SEQPACKET socketpair. Per share, the producer (this process)
   creates a segment, fills 1 MiB through its mapping (a fixed pattern, with a counter in the
   first and last 8 bytes), sends the segment's identifier, the consumer attaches, checks
   both counters, sums the whole 1 MiB as uint64, detaches and replies with the sum; the
   producer checks the sum, then destroys the segment. One sample = all of that. Peers:
   shared_memory (name; the consumer unregisters the segment from its resource tracker, as a
   Python < 3.13 consumer must), SharedArray (name). ugem daemon: flink name + open_name +
   mmap; export fd sent over the socket (SCM_RIGHTS) + import_fd + mmap; export fd mapped by
   the consumer with plain `mmap.mmap` (no manager call on that side).
3. Ray object store (if a Python that can `import ray` is given): one Ray session
   (`ray.init(num_cpus=2, object_store_memory=256 MiB)`) runs in its own process, started after
   sections 1-2 (so that its background processes do not disturb them) and kept to the end; it
   takes commands from this process, so its rounds interleave with ugem's. Share
   as in 2: fill a 1 MiB numpy array, `ray.put`, a long-lived actor gets the array (Ray
   resolves the ObjectRef argument: zero-copy from the object store), checks and sums it,
   returns the sum; `del` of the ref. Next to it, in the same rounds, ugem's flink share.
   put/get of a 1 MiB numpy array, one object per sample: `ray.put` vs ugem daemon `create` +
   `pwrite`; then `ray.get` + `np.copyto` into a buffer vs `pread_into`; then `ray.get` (a
   zero-copy read-only view) vs `mmap` of the object viewed with numpy; then the object is
   freed (untimed; for ugem that close also reports the view's release). A host
   diagnostic in the same rounds: memfd_create + ftruncate + pwrite of 1 MiB (new pages).
   Before these rounds the bench waits (up to 30 s, 10 with --quick) for Ray's start-up work
   to settle.
   Ray is never needed by the test suite or installed by the project: pass `--ray-python PY`
   (or set $UGEM_BENCH_RAY_PYTHON) for a separate venv with `ray` and `numpy`; without them,
   this interpreter is used if it can import ray, else the Ray rows are listed as skipped.

Cleanup: every segment this bench creates is destroyed (a last sweep removes any left in
/dev/shm by a failure), the consumer, the daemon and the Ray session are stopped.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from multiprocessing import resource_tracker, shared_memory

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import _harness as H  # noqa: E402
import ugem  # noqa: E402
from _ray import RAY_ENABLE, SERVE, RayPeer, add_ray_options, ray_python, ray_version  # noqa: E402
from ugem.testing.daemon import run_daemon  # noqa: E402

try:
    import SharedArray as sa  # optional extra: pip install -e '.[peers]'
except ImportError:
    sa = None

BENCH = "peers"
DEFAULTS = dict(runs=20, n=40, warmup=10, quick_runs=3, quick_n=15, quick_warmup=3)
SIZE = H.MiB
MASK = (1 << 64) - 1
SA_PREFIX = f"ugem-bench-peers-{os.getpid()}-"


def pattern() -> np.ndarray:
    return np.random.default_rng(7).integers(0, 256, SIZE, dtype=np.uint8)


def expected_sum(pat: np.ndarray, counter: int) -> int:
    """The uint64 sum (mod 2**64) of `pat` with `counter` in its first and last 8 bytes."""
    middle = int(pat.view(np.uint64)[1:-1].sum(dtype=np.uint64))
    return (middle + 2 * counter) & MASK


def fill(dst: np.ndarray, pat: np.ndarray, counter: int) -> None:
    np.copyto(dst, pat)
    words = dst.view(np.uint64)
    words[0] = words[-1] = counter


def time_n(label: str, op: Callable[[], None]) -> dict[str, H.Runner]:
    def run(n: int) -> dict[str, list[int]]:
        return {label: H.time_each(op, n)}
    return {label: run}


# -- segments made by this process, destroyed even on failure ---------------------------------


class Segments:
    """Names of POSIX shm segments created here and not yet unlinked."""

    def __init__(self) -> None:
        self.live: set[str] = set()

    def sweep(self) -> list[str]:
        left = sorted(self.live)
        for name in left:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join("/dev/shm", name.lstrip("/")))
            with contextlib.suppress(Exception):
                resource_tracker.unregister(name, "shared_memory")
        self.live.clear()
        if os.path.isdir("/dev/shm"):
            for entry in os.listdir("/dev/shm"):
                if entry.startswith(SA_PREFIX):
                    left.append(entry)
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join("/dev/shm", entry))
        return left


# -- 1. segment lifecycle in one process ------------------------------------------------------


def lifecycle_runners(segs: Segments, devs: dict[str, ugem.Device]) -> dict[str, H.Runner]:
    runners: dict[str, H.Runner] = {}

    def shm_cycle() -> None:
        s = shared_memory.SharedMemory(create=True, size=SIZE)
        segs.live.add(s._name)  # type: ignore[attr-defined]
        t = shared_memory.SharedMemory(name=s.name)
        t.close()
        s.close()
        s.unlink()
        segs.live.discard(s._name)  # type: ignore[attr-defined]

    runners |= time_n("life shm", shm_cycle)
    if sa is not None:
        url = f"shm://{SA_PREFIX}life"

        def sa_cycle() -> None:
            a = sa.create(url, SIZE, dtype=np.uint8)
            b = sa.attach(url)
            sa.delete(url)
            del a, b

        runners |= time_n("life SharedArray", sa_cycle)
    for mode, dev in devs.items():
        def names(dev: ugem.Device = dev) -> None:
            h = dev.create(SIZE)
            h2, _ = dev.open_name(dev.flink(h))
            dev.close_handle(h2)
            dev.close_handle(h)

        def mapped(dev: ugem.Device = dev) -> None:
            h = dev.create(SIZE)
            m = dev.mmap(h)
            m.release()
            del m
            dev.close_handle(h)  # sends the unmap first

        def both(dev: ugem.Device = dev) -> None:
            h = dev.create(SIZE)
            m = dev.mmap(h)
            h2, _ = dev.open_name(dev.flink(h))
            m2 = dev.mmap(h2)
            m2.release()
            m.release()
            del m, m2
            dev.close_handle(h2)
            dev.close_handle(h)

        runners |= time_n(f"life {mode} names", names)
        runners |= time_n(f"life {mode} mmap", mapped)
        runners |= time_n(f"life {mode} both", both)
    return runners


# -- 2. sharing with another process ----------------------------------------------------------

_CONSUMER = r"""
import mmap, os, socket, sys
import numpy as np
import ugem
from multiprocessing import resource_tracker, shared_memory
try:
    import SharedArray as sa
except ImportError:
    sa = None
sock = socket.socket(fileno=int(sys.argv[1]))
size = int(sys.argv[3])
dev = ugem.connect(sys.argv[2])

def check(buf, counter):
    words = np.frombuffer(buf, dtype=np.uint64)
    if int(words[0]) != counter or int(words[-1]) != counter:
        raise ValueError(f"counter {counter} expected, found {int(words[0])} / {int(words[-1])}")
    return int(words.sum(dtype=np.uint64))

def mapped_handle(h, counter):
    m = dev.mmap(h, writable=False)
    total = check(m, counter)
    m.release()
    del m
    dev.close_handle(h)
    return total

while True:
    msg, fds, _, _ = socket.recv_fds(sock, 256, 1)
    if not msg or msg == b"quit":
        break
    try:
        kind, arg, counter = msg.decode().split()
        counter = int(counter)
        if kind == "shm":
            s = shared_memory.SharedMemory(name=arg)
            resource_tracker.unregister(s._name, "shared_memory")  # not ours to unlink (Python < 3.13)
            total = check(s.buf, counter)
            s.close()
        elif kind == "sa":
            a = sa.attach(arg)
            total = check(a, counter)
            del a
        elif kind == "flink":
            h, _ = dev.open_name(int(arg))
            total = mapped_handle(h, counter)
        elif kind == "import":
            h = dev.import_fd(fds[0])
            os.close(fds[0])
            total = mapped_handle(h, counter)
        elif kind == "fdmap":
            region = mmap.mmap(fds[0], size, prot=mmap.PROT_READ)
            os.close(fds[0])
            total = check(region, counter)
            region.close()
        else:
            raise ValueError(f"unknown kind {kind}")
        reply = b"%d" % total
    except Exception as exc:
        for fd in fds:
            os.close(fd)
        reply = f"E {type(exc).__name__}: {exc}".encode()
    sock.send(reply)
dev.close()
"""


class Consumer:
    """The long-lived consumer process and the producer's end of its socket."""

    def __init__(self, daemon_path: str) -> None:
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen([sys.executable, "-c", _CONSUMER, str(theirs.fileno()), daemon_path,
                                          str(SIZE)], pass_fds=[theirs.fileno()])
        finally:
            theirs.close()
        self.sock.settimeout(60)

    def ask(self, msg: bytes, fds: list[int] | None = None) -> int:
        if fds:
            socket.send_fds(self.sock, [msg], fds)
        else:
            self.sock.send(msg)
        reply = self.sock.recv(512)
        if not reply:
            raise RuntimeError("the consumer process went away")
        if reply.startswith(b"E "):
            raise RuntimeError(f"consumer: {reply[2:].decode()}")
        return int(reply)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.send(b"quit")
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.sock.close()


class _Shares:
    """One sample of each way to share 1 MiB with the consumer: create, fill through a
    mapping, send, the consumer attaches, checks and sums it, destroy, check its sum."""

    def __init__(self, segs: Segments, dev: ugem.Device, consumer: Consumer, pat: np.ndarray) -> None:
        self.segs, self.dev, self.consumer, self.pat = segs, dev, consumer, pat
        self.counter = 0

    def _next(self) -> int:
        self.counter += 1
        return self.counter

    def _verify(self, got: int, c: int) -> None:
        if got != expected_sum(self.pat, c):
            raise RuntimeError(f"share {c}: the consumer summed {got}, expected {expected_sum(self.pat, c)}")

    def shm(self) -> None:
        c = self._next()
        s = shared_memory.SharedMemory(create=True, size=SIZE)
        self.segs.live.add(s._name)  # type: ignore[attr-defined]
        view = np.frombuffer(s.buf, dtype=np.uint8, count=SIZE)
        fill(view, self.pat, c)
        del view
        got = self.consumer.ask(f"shm {s.name} {c}".encode())
        s.close()
        s.unlink()
        self.segs.live.discard(s._name)  # type: ignore[attr-defined]
        self._verify(got, c)

    def shared_array(self) -> None:
        c = self._next()
        url = f"shm://{SA_PREFIX}{c}"
        a = sa.create(url, SIZE, dtype=np.uint8)
        fill(a, self.pat, c)
        got = self.consumer.ask(f"sa {url} {c}".encode())
        sa.delete(url)
        del a
        self._verify(got, c)

    def ugem(self, how: str) -> None:
        """`how`: flink (by name), import (export + import_fd), fdmap (export, the peer maps it)."""
        c, dev = self._next(), self.dev
        h = dev.create(SIZE)
        m = dev.mmap(h)
        view = np.frombuffer(m, dtype=np.uint8)
        fill(view, self.pat, c)
        del view
        if how == "flink":
            got = self.consumer.ask(f"flink {dev.flink(h)} {c}".encode())
        else:
            fd = dev.export(h, writable=False)
            try:
                got = self.consumer.ask(f"{how} - {c}".encode(), [fd])
            finally:
                os.close(fd)
        m.release()
        del m
        dev.close_handle(h)
        self._verify(got, c)


def share_runners(segs: Segments, dev: ugem.Device, consumer: Consumer, pat: np.ndarray,
                  *, kinds: tuple[str, ...], suffix: str = "") -> dict[str, H.Runner]:
    shares = _Shares(segs, dev, consumer, pat)
    makers: dict[str, Callable[[], None]] = {"shm": shares.shm, "flink": functools.partial(shares.ugem, "flink"),
                                             "import": functools.partial(shares.ugem, "import"),
                                             "fdmap": functools.partial(shares.ugem, "fdmap")}
    if sa is not None:
        makers["sa"] = shares.shared_array
    return {k: v for kind in kinds if kind in makers
            for k, v in time_n(f"share {kind}{suffix}", makers[kind]).items()}


# -- 3. Ray, in its own process ---------------------------------------------------------------

_RAY_SCRIPT = r"""
import json, sys, time
import numpy as np
import ray
size, tmp = int(sys.argv[1]), sys.argv[2]
clock = time.perf_counter_ns
MASK = (1 << 64) - 1
ray.init(num_cpus=2, object_store_memory=256 << 20, include_dashboard=False, log_to_driver=False, _temp_dir=tmp)

@ray.remote
class Consumer:
    def consume(self, arr, counter):
        words = arr.view(np.uint64)
        if int(words[0]) != counter or int(words[-1]) != counter:
            raise ValueError(f"counter {counter} expected, found {int(words[0])} / {int(words[-1])}")
        return int(words.sum(dtype=np.uint64))

pat = np.random.default_rng(7).integers(0, 256, size, dtype=np.uint8)
middle = int(pat.view(np.uint64)[1:-1].sum(dtype=np.uint64))
src = np.empty(size, dtype=np.uint8)
out = np.empty(size, dtype=np.uint8)
consumer = Consumer.remote()
counter = 0

def fill(c):
    np.copyto(src, pat)
    words = src.view(np.uint64)
    words[0] = words[-1] = c

def share(n):
    global counter
    samples = []
    for _ in range(n):
        counter += 1
        t0 = clock()
        fill(counter)
        ref = ray.put(src)
        got = ray.get(consumer.consume.remote(ref, counter))
        del ref
        samples.append(clock() - t0)
        if got != (middle + 2 * counter) & MASK:
            raise RuntimeError(f"share {counter}: actor summed {got}")
    return {"ray share": samples}

def putget(n):
    fill(12345)
    put, get, copy = [], [], []
    for _ in range(n):
        t0 = clock()
        ref = ray.put(src)
        put.append(clock() - t0)
        out.fill(0)
        t0 = clock()
        np.copyto(out, ray.get(ref))
        copy.append(clock() - t0)
        if int(out.view(np.uint64)[0]) != 12345:
            raise RuntimeError("ray.get + copy returned other data")
        t0 = clock()
        view = ray.get(ref)
        get.append(clock() - t0)
        if int(view.view(np.uint64)[-1]) != 12345:
            raise RuntimeError("ray.get returned other data")
        del view, ref
    return {"ray put": put, "ray get": get, "ray get+copy": copy}

share(3)
putget(3)


def answer(cmd, n):
    return {"share": share, "putget": putget}[cmd](n)
""" + SERVE


def putget_runner(dev: ugem.Device, pat: np.ndarray) -> dict[str, H.Runner]:
    src = np.empty(SIZE, dtype=np.uint8)
    fill(src, pat, 12345)  # what the Ray side puts too
    out = np.empty(SIZE, dtype=np.uint8)

    def run(n: int) -> dict[str, list[int]]:
        c = H.clock
        put, view_s, copy = [], [], []
        for _ in range(n):
            t0 = c()
            h = dev.create(SIZE)
            try:
                dev.pwrite(h, 0, src)
                put.append(c() - t0)
                out.fill(0)
                t0 = c()
                dev.pread_into(h, 0, out)
                copy.append(c() - t0)
                if int(out.view(np.uint64)[0]) != 12345:
                    raise RuntimeError("pread_into returned other data")
                t0 = c()
                view = np.frombuffer(dev.mmap(h, writable=False), dtype=np.uint8)
                view_s.append(c() - t0)
                if int(view.view(np.uint64)[-1]) != 12345:
                    raise RuntimeError("the mapping shows other data")
                del view
            finally:
                dev.close_handle(h)  # sends the view's release first
        return {"ugem put": put, "ugem get view": view_s, "ugem get copy": copy}
    return {"ugem putget": run}


def array_put_runner(dev: ugem.Device, pat: np.ndarray) -> dict[str, H.Runner]:
    """`ugem.array(value)` (the array dropped at once, as a ray ref is): from the second put on,
    the object of the one before, reused in place."""
    src = np.empty(SIZE, dtype=np.uint8)
    fill(src, pat, 12345)

    def run(n: int) -> dict[str, list[int]]:
        c = H.clock
        put = []
        for _ in range(n):
            t0 = c()
            a = ugem.array(src, device=dev)
            put.append(c() - t0)
            if int(a[-8:].view(np.uint64)[0]) != 12345:
                raise RuntimeError("ugem.array holds other data")
            del a
        return {"ugem array put": put}
    return {"ugem array put": run}


def fresh_pages_runner() -> dict[str, H.Runner]:
    """Host diagnostic: what 1 MiB of new shared pages costs (memfd_create + ftruncate + pwrite)."""
    src = np.ones(SIZE, dtype=np.uint8)

    def run(n: int) -> dict[str, list[int]]:
        c = H.clock
        samples = []
        for _ in range(n):
            t0 = c()
            fd = os.memfd_create("bench", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, SIZE)
                if os.pwrite(fd, src, 0) != SIZE:
                    raise OSError("short pwrite")
                samples.append(c() - t0)
            finally:
                os.close(fd)
        return {"fresh pages": samples}
    return {"fresh pages": run}


def ray_runners(peer: RayPeer) -> dict[str, H.Runner]:
    return {"ray share": lambda n: peer.ask("share", n), "ray putget": lambda n: peer.ask("putget", n)}


# -- the report -------------------------------------------------------------------------------


def _sa_version() -> str:
    if sa is None:
        return "absent"
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("SharedArray")
    except PackageNotFoundError:
        return "installed"


def skipped_row(figure: str, why: str) -> H.Row:
    return H.Row.skipped(BENCH, figure, "us", why)


AT_MOST_PEER = H.Target("<=", 1.0)  # issue 15: the daemon's lifecycle, share and zero-copy get against the peer


def _ugem_row(figure: str, mode: str, s: H.Series, base: H.Series | None, note: str,
              target: H.Target | None = None) -> H.Row:
    row = H.Row.latency(BENCH, figure, mode, s, baseline=base, ratio_note=note, target=target)
    row.headline = target is None
    return row


def run(opts: H.Options) -> H.Report:
    ns = opts.extra
    report = H.Report(BENCH, "ugem vs shared_memory, SharedArray, Ray: 1 MiB segments",
                      {"runs": opts.runs, "n": opts.n, "warmup": opts.warmup, "size": "1 MiB"})
    python = ray_python(ns)
    no_ray = bool(getattr(ns, "no_ray", False))
    rayv = None if no_ray else ray_version(python)
    report.params["SharedArray"] = _sa_version()
    report.params["ray"] = rayv or "absent"
    life, share, third, ray_started, ray_error = _measure(opts, report, python, rayv)
    for res, label, shown in ((life, "life shm", "shared_memory"), (share, "share shm", "shared_memory"),
                              (third, "ray share", "ray share"), (third, "ray put", "ray.put"),
                              (third, "ray get", "ray.get"), (third, "ray get+copy", "ray.get+copy")):
        if label in res:
            res[label].label = shown  # the baseline column names the peer

    sa_why = "SharedArray not installed: pip install -e '.[peers]'"
    _lifecycle_rows(report.rows, life, sa_why)
    _share_rows(report.rows, share, sa_why)
    ray_why = ("Ray not measured: --no-ray" if no_ray else
               f"Ray not measured: {ray_error}" if ray_error else
               f"Ray not measured: {python} cannot import ray; {RAY_ENABLE}")
    _ray_rows(report, third, ray_started, ray_why)
    _notes(report, life, share, third, python, sa_why, ray_why)
    return report


def _measure(opts: H.Options, report: H.Report, python: str,
             rayv: str | None) -> tuple[H.Results, H.Results, H.Results, bool, str]:
    """Sections 1-2 (lifecycle, share), then section 3 with Ray's session up (if it starts):
    (lifecycle, share and section 3 series, whether Ray ran, why it did not start)."""
    pat = pattern()
    segs = Segments()
    workdir = tempfile.mkdtemp(prefix="ugem-bench-peers-")
    ray_error = ""
    try:
        with contextlib.ExitStack() as stack:
            emb = ugem.embedded()
            stack.callback(emb.close)
            daemon = stack.enter_context(run_daemon())
            dev = daemon.connect()
            stack.callback(dev.close)
            life = H.interleaved(lifecycle_runners(segs, {"embedded": emb, "daemon": dev}), runs=opts.runs,
                                 n=opts.n, warmup=opts.warmup)
            consumer = Consumer(daemon.path)
            stack.callback(consumer.close)
            share = H.interleaved(share_runners(segs, dev, consumer, pat,
                                                kinds=("shm", "sa", "flink", "import", "fdmap")),
                                  runs=opts.runs, n=opts.n, warmup=opts.warmup)
            # Ray's session (and its background processes) is alive only for this part, so
            # that it does not disturb the figures above; ugem is measured again in its rounds.
            peer: RayPeer | None = None
            if rayv is not None:
                try:
                    peer = RayPeer(python, workdir, _RAY_SCRIPT, [str(SIZE), os.path.join(workdir, "ray")])
                    stack.callback(peer.close)
                except Exception as exc:  # optional peer: never fails the bench
                    ray_error = f"{type(exc).__name__}: {str(exc)[:300]}"
            if peer is not None:  # let its start-up work (workers, agents) finish first
                settled = H.wait_idle(10 if opts.quick else 30)
                report.notes.append(f"after Ray's start, other processes (Ray's included) used {settled:.2f} CPUs "
                                    "when section 3 began")
            runners = share_runners(segs, dev, consumer, pat, kinds=("flink",), suffix=" with ray")
            runners |= putget_runner(dev, pat)
            runners |= array_put_runner(dev, pat)
            runners |= fresh_pages_runner()
            if peer is not None:
                runners |= ray_runners(peer)
            t0, cpu0 = H.clock(), peer.cpu_seconds() if peer is not None else 0.0
            third = H.interleaved(runners, runs=opts.runs, n=opts.n, warmup=opts.warmup)
            if peer is not None:
                cpu = peer.cpu_seconds()
                report.notes.append(f"Ray's processes (its session) used {cpu:.1f} CPU-s in all, {cpu - cpu0:.1f} "
                                    f"during section 3 ({(cpu - cpu0) / ((H.clock() - t0) / 1e9):.2f} CPUs on "
                                    "average, its measured work included); what of it is not reaped through the "
                                    "driver (workers, agents) counts in other_load")
            ray_started = peer is not None
            if peer is not None:
                report.params["ray"] = peer.version
    finally:
        left = segs.sweep()
        shutil.rmtree(workdir, ignore_errors=True)
    if left:
        report.notes.append(f"WARNING: segments left behind by a failure were removed: {', '.join(left)}")

    return life, share, third, ray_started, ray_error


def _lifecycle_rows(rows: list[H.Row], life: H.Results, sa_why: str) -> None:
    """1. create + attach + destroy in one process."""
    base = life["life shm"]
    fig = "lifecycle 1 MiB"
    rows.append(H.Row.latency(BENCH, f"{fig}: SharedMemory create, attach, close x2, unlink",
                              "shared_memory (baseline)", base))
    if sa is not None:
        rows.append(H.Row.latency(BENCH, f"{fig}: SharedArray create, attach, delete", "SharedArray",
                                  life["life SharedArray"], baseline=base))
    else:
        rows.append(skipped_row(f"{fig}: SharedArray create, attach, delete", sa_why))
    for mode in ("embedded", "daemon"):
        rows.append(_ugem_row(f"{fig}: create, flink, open_name, close x2", mode,
                              life[f"life {mode} names"], base, "no mapping on the ugem side"))
        rows.append(_ugem_row(f"{fig}: create, mmap, release, close", mode,
                              life[f"life {mode} mmap"], base, "", AT_MOST_PEER if mode == "daemon" else None))
        rows.append(_ugem_row(f"{fig}: create+mmap, open_name+mmap, release x2, close x2", mode,
                              life[f"life {mode} both"], base, "like for like: two mappings, as shm"))


def _share_rows(rows: list[H.Row], share: H.Results, sa_why: str) -> None:
    """2. sharing with another process."""
    fig = "share 1 MiB"
    base = share["share shm"]
    rows.append(H.Row.latency(BENCH, f"{fig}: SharedMemory name", "shared_memory (baseline)", base))
    if sa is not None:
        rows.append(H.Row.latency(BENCH, f"{fig}: SharedArray name", "SharedArray", share["share sa"],
                                  baseline=base))
    else:
        rows.append(skipped_row(f"{fig}: SharedArray name", sa_why))
    rows.append(_ugem_row(f"{fig}: flink, open_name + mmap", "daemon", share["share flink"], base, "", AT_MOST_PEER))
    rows.append(_ugem_row(f"{fig}: export fd, import_fd + mmap", "daemon", share["share import"], base, "",
                          AT_MOST_PEER))
    rows.append(_ugem_row(f"{fig}: export fd, peer mmaps the fd", "daemon", share["share fdmap"], base, "",
                          AT_MOST_PEER))


def _ray_rows(report: H.Report, third: H.Results, ray_started: bool, ray_why: str) -> None:
    """3. Ray next to ugem in the same rounds (or listed as skipped)."""
    fig = "share 1 MiB"
    pairs = [(f"{fig}: ray.put, actor gets it, del ref", "ray share",
              f"{fig}: flink, open_name + mmap ({'rounds with Ray' if ray_started else 'again'})",
              "share flink with ray"),
             ("put 1 MiB ndarray: ray.put", "ray put", "put 1 MiB ndarray: create + pwrite", "ugem put"),
             ("get 1 MiB ndarray: ray.get (zero-copy view)", "ray get",
              "get 1 MiB ndarray: mmap + np.frombuffer (zero-copy view)", "ugem get view"),
             ("get 1 MiB ndarray: ray.get + np.copyto out", "ray get+copy",
              "get 1 MiB ndarray: pread_into", "ugem get copy")]
    for ray_fig, ray_label, ugem_fig, ugem_label in pairs:
        target = AT_MOST_PEER if ugem_label == "ugem get view" else None
        if ray_started:
            ray_s = third[ray_label]
            report.rows.append(H.Row.latency(BENCH, ray_fig, f"ray {report.params['ray']} (baseline)", ray_s))
            report.rows.append(_ugem_row(ugem_fig, "daemon", third[ugem_label], ray_s, "", target))
        else:
            report.rows.append(skipped_row(ray_fig, ray_why))
            report.rows.append(_ugem_row(ugem_fig, "daemon", third[ugem_label], None, ""))

    report.rows.append(_ugem_row("put 1 MiB ndarray: ugem.array, array dropped", "daemon", third["ugem array put"],
                                 third["ray put"] if ray_started else None, ""))
    report.rows.append(H.Row.latency(BENCH, "new pages: memfd_create + ftruncate + pwrite 1 MiB (diagnostic)", "host",
                                     third["fresh pages"]))


def _notes(report: H.Report, life: H.Results, share: H.Results, third: H.Results, python: str, sa_why: str,
           ray_why: str) -> None:
    measured = not third.get("ray share", H.Series("", error="-")).error
    if sa is not None:
        pairs_sa = [("lifecycle, create+flink+open_name+close x2", life, "life SharedArray", "names"),
                    ("lifecycle, like for like", life, "life SharedArray", "both")]
        shown = []
        for what, res, peer_label, kind in pairs_sa:
            p = res[peer_label]
            for mode in ("embedded", "daemon"):
                s = res[f"life {mode} {kind}"]
                if not s.error and not p.error:
                    shown.append(f"{what} ({mode}) {s.median_ns / p.median_ns:.2f}")
        p = share["share sa"]
        for kind in ("flink", "import", "fdmap"):
            s = share[f"share {kind}"]
            if not s.error and not p.error:
                shown.append(f"share {kind} {s.median_ns / p.median_ns:.2f}")
        report.notes.append("ugem / SharedArray (medians): " + ", ".join(shown))
    else:
        report.notes.append(f"SharedArray rows skipped: {sa_why}")
    if not measured:
        report.notes.append(f"Ray rows skipped: {ray_why}")
    else:
        report.notes.append(f"Ray {report.params['ray']} ran in its own process ({python}): one session, started after "
                            "sections 1-2 and kept to the end (its background processes stay up meanwhile); the ugem "
                            "rows next to it come from the same rounds")
    report.notes.append("ratio = ugem median / baseline median in the same run (lower is better for ugem); "
                        "ugem's lifecycle rows without a mapping do less than the shared_memory baseline, which "
                        "maps the segment twice (the 'like for like' row maps it twice too)")
    report.notes.append("lifecycle = create + attach + destroy in one process; share = with another process, one "
                        "sample = create + fill 1 MiB through a mapping + send id + consumer attach, check, uint64 "
                        "sum, detach + reply + producer destroy; the consumer is one long-lived process")
    report.notes.append("put 1 MiB ndarray: ugem.array reuses in place the object of the array dropped just before "
                        "(ugem.array: 1 MiB or more, the same size, nothing else holding it); create + pwrite "
                        "makes a new object each time")
    report.notes.append("ugem daemon put (create + pwrite) writes into a new object each time, so its pages are "
                        "allocated per put (the 'new pages' row: what that costs on this machine, in the same "
                        "rounds); Ray's object store reuses its preallocated shared memory. Each put/get sample is one "
                        "object: put, get + copy, get view, then freed (untimed)")


def main(argv: list[str] | None = None) -> int:
    opts = H.parse_args(__doc__.splitlines()[0], argv, add_ray_options, **DEFAULTS)
    return H.emit([H.monitored(run, opts)], opts)


if __name__ == "__main__":
    sys.exit(main())
