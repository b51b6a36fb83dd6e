"""Soak: one small daemon, several client processes doing random work, SIGKILLs and garbage.

One daemon with a small budget and small VRAM (so objects are spilled, restored, evicted
and purged all the time) serves WORKERS client processes. Each worker (this file run as a
script) does random operations with a per-process seed and checks every byte it reads
against its own model: create, pwrite, pread, mmap + write + read back (following the
domain protocol), madvise DONTNEED/WILLNEED (a DONTNEED object reads either correct or
EFAULT, a purged one only EFAULT: never wrong data, never zeros), pin/unpin, execbuffer
Fill/Copy, close, and sharing: frozen objects published by flink name (open_name'd and
verified by the other workers) and sent as read-only export fds over a Unix datagram
"mailbox" to another worker, which imports and verifies them (also after the exporter was
killed: the daemon adopts its memfd again). An ENOMEM must change nothing. At the end each
worker verifies all its objects once more. A failed check ends the worker with its seed,
the failing object's history and every other object's (in stats-<slot>-<gen>.json).

Bugs the soak found have regression tests below (test_bug_*, all fixed: a pwrite into an
object pinned in VRAM was lost, a DONTNEED object in VRAM purged by the budget broke VRAM
accounting, CPU writes did not wait for queued device reads). The workers still step
around those cases (they were written while the bugs were open); the regression tests
cover them.

Meanwhile the parent SIGKILLs random workers and restarts them with new seeds, and opens
garbage connections (random bytes, half frames, connect-and-close, stalled headers).
Afterwards: every client gone -> no objects, no names, nothing resident or spilled, the
spill directory holds only the daemon's lock and spill file (all space punched back), the
daemon holds the fds it started with, and it exits 0 on SIGTERM (run_daemon checks).

UGEM_SOAK_SECONDS sets the duration (default 10 s; the test is marked slow above 30 s).
Seeds, operation counts, kills and garbage connections are printed (pytest -s) and are in
every assertion message; UGEM_SOAK_SEED fixes the parent's choices and the worker seeds
(the interleaving of the processes still varies from run to run).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import mmap
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import pytest

import ugem
from ugem.cmd import Copy, Fill
from ugem.testing import DaemonProcess, run_daemon
from ugem.testing.data import SAFETY_S
from ugem.wire import structs as s
from ugem.wire.frames import FrameKind, Op, encode_header

SOAK_SECONDS = float(os.environ.get("UGEM_SOAK_SECONDS") or 10)
SOAK_SEED = int(os.environ.get("UGEM_SOAK_SEED") or random.SystemRandom().randrange(2**32))
WORKERS = 6
DAEMON_FLAGS = dict(system_budget="16M", vram="8M", pin_limit="1M")
FAILED_EXIT = 3  # a worker's check failed (the report is in its stats-<slot>-<gen>.json)

PAGE = 4096
MAGIC = b"UGEMSOAK"
HEADER = struct.Struct("<8sIII")  # magic, slot, generation, serial: what a shared object is
SIZES = [PAGE, 2 * PAGE, 3 * PAGE, 16 * PAGE, 64 * PAGE, 256 * PAGE, 256 * PAGE]  # up to 1 MiB (XFER > 128 KiB)
MAX_OBJECTS, MAX_BYTES, MAX_FROZEN = 16, 12 << 20, 2  # 6 workers x 12 MiB: past the 16 MiB budget


# ====================================================================== the worker

class VerificationFailure(AssertionError):
    pass


@dataclass
class Obj:
    handle: int
    data: bytearray  # the model: what the object must read as
    state: str = "willneed"  # "dontneed": correct or EFAULT; "purged": EFAULT only
    pinned: bool = False
    pinned_in_vram: bool = False  # CPU writes avoided meanwhile: test_bug_pwrite_to_object_pinned_in_vram_is_lost
    frozen: tuple[int, int, int] | None = None  # (slot, gen, serial): shared, never written again
    cpu_dirty: bool = False  # written through a mapping since the last hand-over to the device
    view: memoryview | None = None  # a long-lived mapping
    log: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=30))  # for failures

    @property
    def size(self) -> int:
        return len(self.data)


def frozen_contents(slot: int, gen: int, serial: int, size: int) -> bytes:
    body = random.Random(f"{slot}:{gen}:{serial}").randbytes(size - HEADER.size)
    return HEADER.pack(MAGIC, slot, gen, serial) + body


class Worker:
    def __init__(self, path: str, slot: int, gen: int, seed: int, stop_at: float, workdir: str) -> None:
        self.slot, self.gen, self.seed, self.stop_at, self.workdir = slot, gen, seed, stop_at, workdir
        self.rng = random.Random(seed)
        self.dev = ugem.connect(path)
        self.objs: dict[int, Obj] = {}
        self.ops: collections.Counter[str] = collections.Counter()
        self.history: collections.deque[str] = collections.deque(maxlen=40)
        self.serial = 0
        self.names_dir = os.path.join(workdir, "names")
        self.published: dict[int, str] = {}  # handle -> its record file
        self.mailbox = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        box = os.path.join(workdir, f"mbox-{slot}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(box)
        self.mailbox.bind(box)
        self.mailbox.setblocking(False)

    # -- checks -------------------------------------------------------------------------

    def fail(self, message: str, obj: Obj | None = None) -> None:
        if obj is not None:
            info: Any
            try:
                info = self.dev.info(obj.handle)
            except ugem.UgemError as exc:
                info = exc
            message += f"\n  object now: {info}\n  its history: {list(obj.log)}"
            for other in self.objs.values():
                if other is not obj:
                    message += f"\n  handle {other.handle} ({other.state}, pinned {other.pinned}): {list(other.log)}"
        raise VerificationFailure(message)

    def note(self, obj: Obj, event: str) -> None:
        obj.log.append(event)
        self.history.append(f"h{obj.handle}: {event}")

    def expect_errno(self, exc: ugem.UgemError, allowed: set[int], what: str) -> int:
        if exc.errno not in allowed:
            self.fail(f"{what}: unexpected errno {exc.errno} ({errno.errorcode.get(exc.errno or 0)}): {exc}")
        self.ops[f"errno {errno.errorcode.get(exc.errno or 0)}"] += 1
        return exc.errno or 0

    def compare(self, obj: Obj, offset: int, got: bytes | memoryview, what: str) -> None:
        want = obj.data[offset:offset + len(got)]
        if got != want:
            bad = next(i for i in range(len(got)) if got[i] != want[i])
            zeros = not any(got)
            self.fail(f"{what}: handle {obj.handle} (state {obj.state}, pinned {obj.pinned}, frozen {obj.frozen}) "
                      f"byte {offset + bad} of {obj.size} reads {bytes(got[bad:bad + 8]).hex()} instead of "
                      f"{bytes(want[bad:bad + 8]).hex()}{' (all zeros)' if zeros else ''} (read [{offset}, "
                      f"{offset + len(got)}))", obj)
        self.ops["verified bytes"] += len(got)

    def purged(self, obj: Obj, what: str) -> None:
        """The manager said EFAULT: only a DONTNEED (or purged) object may say so."""
        if obj.state == "willneed":
            self.fail(f"{what}: EFAULT for handle {obj.handle}, which was never DONTNEED")
        if obj.view is not None:
            self.fail("a mapped object was DONTNEED")
        obj.state = "purged"
        self.ops["purged seen"] += 1

    # -- operations ---------------------------------------------------------------------

    def pick(self, *, writable: bool = False, live: bool = False, cpu: bool = False) -> Obj | None:
        """A random object; `writable`: not frozen; `live`: WILLNEED; `cpu`: the CPU may write it."""
        cands = [o for o in self.objs.values() if not (writable and o.frozen) and not (live and o.state != "willneed")
                 and not (cpu and o.pinned_in_vram)]
        return self.rng.choice(cands) if cands else None

    def op_create(self) -> None:
        if len(self.objs) >= MAX_OBJECTS or sum(o.size for o in self.objs.values()) >= MAX_BYTES:
            return self.op_close()
        size = self.rng.choice(SIZES)
        handle = self.dev.create(size - self.rng.randrange(PAGE))  # rounded up to a page
        assert handle not in self.objs
        obj = self.objs[handle] = Obj(handle, bytearray(size))
        self.note(obj, f"create {size}")
        if self.rng.random() < 0.7:  # populate it all: resident memory goes past the budget
            data = self.rng.randbytes(size)
            try:
                self.dev.pwrite(handle, 0, data)
            except ugem.UgemError as exc:
                self.expect_errno(exc, {errno.ENOMEM}, "pwrite of a new object")
                return
            obj.data[:] = data
            self.note(obj, "pwrite all")
        if self.dev.info(handle).size != size:
            self.fail(f"create: size {self.dev.info(handle).size}, expected {size}")

    def op_close(self) -> None:
        obj = self.pick()
        if obj is None:
            return
        if obj.handle in self.published:  # the record goes before the name can be reused
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.published.pop(obj.handle))
        if obj.view is not None:
            obj.view.release()
            obj.view = None
        self.dev.close_handle(obj.handle)
        del self.objs[obj.handle]

    def before_cpu_write(self, obj: Obj) -> None:
        """An object pinned in system memory is used by the device in place, and ugem's pwrite
        and set_domain(CPU, CPU) do not wait for device work that still reads it (unlike the
        kernel: test_bug_cpu_write_does_not_wait_for_device_reads), so
        wait here, as a client of a coherent buffer must."""
        if obj.pinned and not obj.pinned_in_vram and obj.state != "purged":
            self.dev.wait(obj.handle, -1)

    def op_pwrite(self) -> None:
        obj = self.pick(writable=True, cpu=True)
        if obj is None:
            return
        offset = self.rng.randrange(obj.size)
        length = self.rng.randint(1, obj.size - offset)
        data = self.rng.randbytes(length)
        self.before_cpu_write(obj)
        try:
            self.dev.pwrite(obj.handle, offset, data)
        except ugem.UgemError as exc:
            code = self.expect_errno(exc, {errno.EFAULT, errno.ENOMEM}, "pwrite")
            if code == errno.EFAULT:
                self.purged(obj, "pwrite")
            elif obj.state == "purged":
                self.fail(f"pwrite of purged handle {obj.handle}: {exc}")
            self.note(obj, f"pwrite [{offset}, {offset + length}) -> {errno.errorcode[code]}")
            return  # ENOMEM changes nothing
        if obj.state == "purged":
            self.fail(f"pwrite of purged handle {obj.handle} succeeded")
        obj.data[offset:offset + length] = data
        self.note(obj, f"pwrite [{offset}, {offset + length})")

    def read_check(self, obj: Obj, offset: int, length: int, what: str) -> None:
        try:
            got = self.dev.pread(obj.handle, offset, length)
        except ugem.UgemError as exc:
            if self.expect_errno(exc, {errno.EFAULT, errno.ENOMEM}, what) == errno.EFAULT:
                self.purged(obj, what)
            elif obj.state == "purged":
                self.fail(f"{what} of purged handle {obj.handle}: {exc}")
            return
        if obj.state == "purged":
            self.fail(f"{what} of purged handle {obj.handle} returned data")
        self.compare(obj, offset, got, what)

    def op_pread(self) -> None:
        obj = self.pick()
        if obj is None:
            return
        offset = self.rng.randrange(obj.size)
        self.read_check(obj, offset, self.rng.randint(1, obj.size - offset), "pread")

    def op_mmap(self) -> None:
        """Map (or reuse the long-lived mapping), write through it under the domain protocol,
        and read back both through the mapping and with pread."""
        obj = self.pick(writable=True, live=True, cpu=True)
        if obj is None:
            return
        self.before_cpu_write(obj)
        try:
            self.dev.set_domain(obj.handle, ugem.DOMAIN_CPU, ugem.DOMAIN_CPU)
            view = obj.view if obj.view is not None else self.dev.mmap(obj.handle)
        except ugem.UgemError as exc:
            code = self.expect_errno(exc, {errno.ENOMEM, errno.EBUSY}, "mmap")
            if code == errno.EBUSY and not obj.pinned:
                self.fail(f"mmap/set_domain EBUSY for unpinned handle {obj.handle}")
            return
        self.compare(obj, 0, view, "mapping before the write")
        offset = self.rng.randrange(obj.size)
        data = self.rng.randbytes(self.rng.randint(1, min(obj.size - offset, 3 * PAGE)))
        view[offset:offset + len(data)] = data
        obj.data[offset:offset + len(data)] = data
        obj.cpu_dirty = True
        self.note(obj, f"mapping write [{offset}, {offset + len(data)}) (long-lived: {obj.view is not None})")
        self.read_check(obj, offset, len(data), "pread after a mapping write")
        self.compare(obj, 0, view, "mapping after the write")
        if obj.view is None and obj.size <= 64 * PAGE and not any(o.view for o in self.objs.values()):
            obj.view = view  # keep one mapping for a while (mapped objects are never spilled)
        elif view is not obj.view:
            view.release()
        if obj.view is not None and self.rng.random() < 0.3:
            obj.view.release()
            obj.view = None

    def op_madvise(self) -> None:
        marked = [o for o in self.objs.values() if o.state == "dontneed"]
        obj = self.rng.choice(marked) if marked and self.rng.random() < 0.5 else self.pick(writable=True)
        if obj is None or obj.view is not None:  # a mapped purged object would read zeros (SPEC §8)
            return
        advice = ugem.DONTNEED if obj.state == "willneed" else ugem.WILLNEED
        if advice == ugem.DONTNEED and obj.state == "willneed":
            # not while it is in VRAM: test_bug_dontneed_object_in_vram_purged_by_the_budget_breaks_vram
            try:
                self.dev.set_domain(obj.handle, ugem.DOMAIN_CPU)
            except ugem.UgemError as exc:
                self.expect_errno(exc, {errno.EBUSY, errno.ENOMEM}, "set_domain(CPU) before DONTNEED")
                return
            if obj.pinned:
                return  # it could go back to VRAM pinned (a pin keeps it where it is)
        retained = self.dev.madvise(obj.handle, advice)
        if obj.state == "purged" and retained:
            self.fail(f"madvise says purged handle {obj.handle} is retained")
        if not retained:  # (DONTNEED purges at once an object without resident pages)
            obj.state = "purged"
            self.ops["purged seen"] += 1
            info = self.dev.info(obj.handle)
            if info.madvise != "purged":
                self.fail(f"retained=False but info says {info}")
        else:
            obj.state = "dontneed" if advice == ugem.DONTNEED else "willneed"
        self.note(obj, f"madvise {advice} -> retained {retained}")

    def op_to_device(self) -> None:
        """Hand an object to the device (into VRAM): VRAM fills up and evicts."""
        obj = self.pick(live=True)
        if obj is None:
            return
        try:
            self.dev.set_domain(obj.handle, ugem.DOMAIN_DEVICE)
        except ugem.UgemError as exc:
            self.expect_errno(exc, {errno.ENOMEM}, "set_domain(DEVICE)")
            return
        obj.cpu_dirty = False
        self.note(obj, "set_domain(DEVICE) (to_device)")

    def op_pin(self) -> None:
        obj = self.pick()
        if obj is None or obj.size > 64 * PAGE:
            return
        if obj.pinned:
            self.dev.unpin(obj.handle)
            obj.pinned = obj.pinned_in_vram = False
            self.note(obj, "unpin")
            return
        try:
            self.dev.pin(obj.handle)
        except ugem.UgemError as exc:
            code = self.expect_errno(exc, {errno.EFAULT, errno.EDQUOT, errno.ENOMEM}, "pin")
            if code == errno.EFAULT:
                self.purged(obj, "pin")
            return
        if obj.state == "purged":
            self.fail(f"pin of purged handle {obj.handle} succeeded")
        obj.pinned = True
        obj.pinned_in_vram = self.dev.info(obj.handle).placement == "vram"
        self.note(obj, f"pin (in VRAM: {obj.pinned_in_vram})")

    def handed_to_device(self, objs: list[Obj]) -> bool:
        for obj in objs:
            if obj.cpu_dirty:
                try:
                    self.dev.set_domain(obj.handle, ugem.DOMAIN_DEVICE)
                except ugem.UgemError as exc:
                    self.expect_errno(exc, {errno.ENOMEM}, "set_domain(DEVICE)")
                    return False
                obj.cpu_dirty = False
                self.note(obj, "set_domain(DEVICE)")
        return True

    def op_execbuffer(self) -> None:
        dst = self.pick(writable=True, live=True)
        if dst is None:
            return
        src = self.pick(live=True) if self.rng.random() < 0.6 else None
        cmds: list[Any] = []
        if src is None:
            offset = self.rng.randrange(dst.size)
            length = self.rng.randint(1, dst.size - offset)
            byte = self.rng.randrange(256)
            cmds.append(Fill(dst=dst.handle, offset=offset, length=length, byte=byte))
            apply = [lambda: dst.data.__setitem__(slice(offset, offset + length), bytes([byte]) * length)]
        else:
            length = self.rng.randint(1, min(src.size, dst.size))
            so, do = self.rng.randrange(src.size - length + 1), self.rng.randrange(dst.size - length + 1)
            cmds.append(Copy(src=src.handle, src_offset=so, dst=dst.handle, dst_offset=do, length=length))
            apply = [lambda: dst.data.__setitem__(slice(do, do + length), bytes(src.data[so:so + length]))]
        if not self.handed_to_device([dst] + ([src] if src else [])):
            return
        try:
            fence = self.dev.execbuffer(cmds)
        except ugem.UgemError as exc:
            self.expect_errno(exc, {errno.ENOMEM}, f"execbuffer {cmds}")
            return
        for fn in apply:
            fn()
        self.note(dst, f"execbuffer {cmds[0]} fence {fence}")
        if src is not None and src is not dst:
            self.note(src, f"execbuffer (source) {cmds[0]} fence {fence}")
        if self.rng.random() < 0.3:
            self.dev.wait_fence(fence, -1)
        if self.rng.random() < 0.5:
            self.read_check(dst, 0, dst.size, "pread after execbuffer")

    def op_publish(self) -> None:
        """A frozen object: written once with its identity header, flinked, published, and
        sometimes sent (read-only export fd) to another worker's mailbox."""
        frozen = [o for o in self.objs.values() if o.frozen]
        if len(frozen) < MAX_FROZEN and len(self.objs) < MAX_OBJECTS:
            self.serial += 1
            size = self.rng.choice(SIZES[:4])
            handle = self.dev.create(size)
            ident = (self.slot, self.gen, self.serial)
            obj = Obj(handle, bytearray(frozen_contents(*ident, size)), frozen=ident)
            try:
                self.dev.pwrite(handle, 0, obj.data)
            except ugem.UgemError as exc:
                self.expect_errno(exc, {errno.ENOMEM}, "pwrite of a frozen object")
                self.dev.close_handle(handle)
                return
            self.objs[handle] = obj
            name = self.dev.flink(handle)
            record = os.path.join(self.names_dir, f"{name}.{self.slot}.{self.gen}.json")
            with open(record + ".tmp", "w") as f:
                json.dump({"name": name, "size": size, "ident": ident}, f)
            os.rename(record + ".tmp", record)
            self.published[handle] = record
            return
        obj = self.rng.choice(frozen) if frozen else None
        if obj is None:
            return
        try:
            fd = self.dev.export(obj.handle, writable=False)
        except ugem.UgemError as exc:
            self.expect_errno(exc, {errno.EBUSY, errno.ENOMEM}, "export")
            if exc.errno == errno.EBUSY and not obj.pinned:
                self.fail(f"export EBUSY for unpinned handle {obj.handle}")
            return
        try:
            if self.dev.import_fd(fd) != obj.handle:  # self-import gives the original handle back
                self.fail(f"self-import of an export of handle {obj.handle} gave another handle")
            peer = self.rng.choice([i for i in range(WORKERS) if i != self.slot])
            message = json.dumps({"size": obj.size, "ident": obj.frozen}).encode()
            with contextlib.suppress(OSError):  # peer not there (yet) or its queue full
                self.mailbox.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))], 0,
                                     os.path.join(self.workdir, f"mbox-{peer}"))  # (send_fds drops the address)
                self.ops["fds sent"] += 1
        finally:
            os.close(fd)

    def verify_shared(self, handle: int, size: int, ident: tuple[int, int, int], what: str) -> bool:
        """Check a shared object against its identity; False if it is another one (a stale name)."""
        head = self.dev.pread(handle, 0, HEADER.size)
        magic, *got = HEADER.unpack(head)
        if magic != MAGIC:
            self.fail(f"{what}: shared object {ident} has no identity header: {head.hex()}")
        if tuple(got) != tuple(ident):
            return False
        want = frozen_contents(*ident, size)
        got_all = self.dev.pread(handle, 0, size)
        if got_all != want:
            bad = next(i for i in range(size) if got_all[i] != want[i])
            self.fail(f"{what}: shared object {ident} byte {bad} reads {got_all[bad:bad + 8].hex()} "
                      f"instead of {want[bad:bad + 8].hex()}")
        self.ops["verified bytes"] += size
        return True

    def op_open_name(self) -> None:
        try:
            records = [r for r in os.listdir(self.names_dir) if r.endswith(".json")]
        except FileNotFoundError:
            return
        if not records:
            return
        path = os.path.join(self.names_dir, self.rng.choice(records))
        try:
            with open(path) as f:
                rec = json.load(f)
        except (FileNotFoundError, ValueError):
            return
        try:
            handle, size = self.dev.open_name(rec["name"])
        except ugem.UgemError as exc:
            self.expect_errno(exc, {errno.ENOENT}, "open_name")  # its owner closed it or was killed
            return
        try:
            if size == rec["size"] and self.verify_shared(handle, size, rec["ident"], f"open_name {rec['name']}"):
                self.ops["shared verified"] += 1
                dst = self.pick(writable=True, live=True)
                if dst is not None and self.rng.random() < 0.5 and self.handed_to_device([dst]):
                    length = min(size, dst.size)
                    self.dev.execbuffer([Copy(src=handle, src_offset=0, dst=dst.handle, dst_offset=0, length=length)])
                    dst.data[:length] = frozen_contents(*rec["ident"], size)[:length]
                    self.note(dst, f"Copy [0, {length}) from shared {rec['ident']}")
            else:  # another object: the name was reused after its owner went; the record must be stale
                self.ops["stale names"] += 1
        finally:
            self.dev.close_handle(handle)

    def op_mailbox(self) -> None:
        while True:
            try:
                message, fds, _, _ = socket.recv_fds(self.mailbox, 4096, 4)
            except (BlockingIOError, InterruptedError):
                return
            try:
                rec = json.loads(message)
                for fd in fds:
                    handle = self.dev.import_fd(fd)
                    try:
                        info = self.dev.info(handle)
                        if info.size != rec["size"] or not info.readonly:
                            self.fail(f"import of a read-only export: {info}, sent {rec}")
                        if not self.verify_shared(handle, rec["size"], rec["ident"], "import_fd"):
                            self.fail(f"an imported fd holds another object than its sender's {rec['ident']}")
                        with mmap.mmap(fd, rec["size"], prot=mmap.PROT_READ) as m:
                            if m[:] != frozen_contents(*rec["ident"], rec["size"]):
                                self.fail(f"mapping an imported fd of {rec['ident']} shows other bytes")
                        self.ops["fds imported"] += 1
                    finally:
                        self.dev.close_handle(handle)
            finally:
                for fd in fds:
                    os.close(fd)

    def op_info(self) -> None:
        obj = self.pick()
        if obj is None:
            return
        info = self.dev.info(obj.handle)
        if info.size != obj.size or info.pinned != obj.pinned:
            self.fail(f"info {info} disagrees with the model (size {obj.size}, pinned {obj.pinned})")
        if obj.state == "purged" and info.madvise != "purged":
            self.fail(f"purged handle {obj.handle} has info {info}")
        if obj.state == "willneed" and (info.madvise != "willneed" or info.placement == "purged"):
            self.fail(f"WILLNEED handle {obj.handle} has info {info}")

    OPS = {"create": 10, "pwrite": 20, "pread": 20, "mmap": 8, "madvise": 5, "pin": 6, "execbuffer": 16,
           "close": 6, "publish": 4, "open_name": 5, "info": 4, "to_device": 8}

    def run(self) -> None:
        names, weights = zip(*self.OPS.items(), strict=True)
        last_report = 0.0
        while time.time() < self.stop_at:
            name = self.rng.choices(names, weights)[0]
            self.history.append(name)
            getattr(self, f"op_{name}")()
            self.op_mailbox()
            self.ops[name] += 1
            if time.monotonic() - last_report > 0.5:
                self.report()
                last_report = time.monotonic()
        self.history.append("final check")
        for obj in list(self.objs.values()):  # every byte of every object, one last time
            self.read_check(obj, 0, obj.size, "final check")
            if obj.view is not None:
                if obj.pinned:  # pinned in VRAM the CPU domain is EBUSY
                    self.dev.unpin(obj.handle)
                    obj.pinned = obj.pinned_in_vram = False
                self.dev.set_domain(obj.handle, ugem.DOMAIN_CPU)
                self.compare(obj, 0, obj.view, "final check of the mapping")
        self.ops["final checks"] += 1
        self.close()

    def close(self) -> None:
        for record in self.published.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(record)
        for obj in self.objs.values():
            if obj.view is not None:
                obj.view.release()
        self.dev.close()
        self.mailbox.close()
        self.report()

    def report(self, failure: str | None = None) -> None:
        path = os.path.join(self.workdir, f"stats-{self.slot}-{self.gen}.json")
        with open(path + ".tmp", "w") as f:
            json.dump({"slot": self.slot, "gen": self.gen, "seed": self.seed, "ops": self.ops,
                       "failure": failure, "history": list(self.history)}, f)
        os.rename(path + ".tmp", path)


def worker_main(argv: list[str]) -> int:
    path, slot, gen, seed, stop_at, workdir = argv[0], int(argv[1]), int(argv[2]), int(argv[3]), float(argv[4]), argv[5]
    worker = Worker(path, slot, gen, seed, stop_at, workdir)
    try:
        worker.run()
    except BaseException as exc:  # a verification failure, or anything unexpected: report it with the seed
        worker.report(failure=f"worker {slot}.{gen} seed {seed}: {type(exc).__name__}: {exc}\n"
                              f"{traceback.format_exc()}")
        return FAILED_EXIT
    return 0


# ====================================================================== bugs found by the soak

@pytest.mark.parametrize("size", [8192, 1 << 20], ids=["inline", "xfer"])
def test_bug_pwrite_to_object_pinned_in_vram_is_lost(size: int) -> None:
    with run_daemon(vram="16M", system_budget="64M") as daemon, daemon.connect() as dev:
        handle = dev.create(size)
        dev.pwrite(handle, 0, b"A" * size)
        dev.set_domain(handle, ugem.DOMAIN_DEVICE)
        dev.pin(handle)
        assert dev.info(handle).placement == "vram"
        dev.pwrite(handle, 100, b"B" * (size // 2))
        assert dev.pread(handle, 98, 4) == b"AABB"  # still pinned: read from VRAM
        dev.unpin(handle)
        assert dev.pread(handle, 98, 4) == b"AABB", "the write made while pinned in VRAM was lost"


@pytest.mark.parametrize("writer", ["pwrite", "set_domain+mapping"])
@pytest.mark.parametrize("in_place", ["pinned", "cached"])
def test_bug_cpu_write_does_not_wait_for_device_reads(in_place: str, writer: str) -> None:
    with run_daemon(vram="256M", system_budget="512M") as daemon, daemon.connect() as dev:
        src = dev.create(8192)
        dev.pwrite(src, 0, b"O" * 8192)
        if in_place == "pinned":
            dev.pin(src)
        else:
            dev.set_caching(src, ugem.CACHING_CACHED)
        view = dev.mmap(src) if writer != "pwrite" else None
        dst, busy = dev.create(8192), dev.create(128 << 20)
        dev.execbuffer([Fill(dst=busy, offset=0, length=128 << 20, byte=1)])  # keeps the device busy a while
        dev.execbuffer([Copy(src=src, src_offset=0, dst=dst, dst_offset=0, length=8192)])  # reads `src` later
        if view is None:
            dev.pwrite(src, 0, b"N" * 8192)  # the kernel waits for all fences first
        else:
            dev.set_domain(src, ugem.DOMAIN_CPU, ugem.DOMAIN_CPU)  # likewise
            view[:8192] = b"N" * 8192
            view.release()
        assert dev.pread(dst, 0, 4) == b"OOOO", "the copy queued before the CPU write saw the CPU write"


def test_bug_dontneed_object_in_vram_purged_by_the_budget_breaks_vram() -> None:
    mib = 1 << 20
    with run_daemon(system_budget="8M", vram="8M") as daemon, daemon.connect() as dev, daemon.connect() as other:
        x = dev.create(4 * mib)
        dev.pwrite(x, 0, b"x" * (4 * mib))
        dev.set_domain(x, ugem.DOMAIN_DEVICE)  # in VRAM, its system pages still there
        assert dev.madvise(x, ugem.DONTNEED)
        y = dev.create(6 * mib)
        dev.pwrite(y, 0, b"y" * (6 * mib))  # past the budget: x's pages are purged first
        z = other.create(6 * mib)  # needs x's VRAM: evicting x drops it
        other.wait_fence(other.execbuffer([Fill(dst=z, offset=0, length=16, byte=1)]), -1)
        assert dev.info(x).placement == "purged"
        assert other.pread(z, 0, 2) == b"\x01\x01"
        assert "Traceback" not in daemon.stderr_text(), daemon.stderr_text()[-3000:]


# ====================================================================== the parent

def _garbage(path: str, rng: random.Random) -> str:
    """One abusive connection; returns what it was."""
    kind = rng.choice(["random", "half-frame", "connect-close", "hello-garbage", "stalled-header", "bad-header"])
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(2)
    hello = encode_header(12, Op.HELLO, 0, FrameKind.REQUEST, 1) + bytes(s.encode(s.HelloReq())[0][0])
    try:
        sock.connect(path)
        if kind == "random":
            sock.sendall(rng.randbytes(rng.randint(1, 5000)))
        elif kind == "half-frame":
            frame = encode_header(24 + 64, Op.GEM_PWRITE, 0, FrameKind.REQUEST, 2) + rng.randbytes(24 + 64)
            sock.sendall(hello + frame[:rng.randint(1, len(frame) - 1)])
        elif kind == "hello-garbage":
            sock.sendall(hello)
            sock.recv(64)
            sock.sendall(rng.randbytes(rng.randint(1, 200)))
        elif kind == "stalled-header":
            sock.sendall(hello[:rng.randint(1, 15)])
            time.sleep(rng.random() * 0.05)
        elif kind == "bad-header":
            sock.sendall(hello)
            sock.recv(64)
            sock.sendall(encode_header(2**32 - 1, Op.GEM_CREATE, 0, FrameKind.REQUEST, 3))
    except OSError:
        pass  # dropped while we were at it: fine
    finally:
        sock.close()
    return kind


@dataclass
class Soak:
    daemon: DaemonProcess
    workdir: str
    stop_at: float
    rng: random.Random
    # slot -> (process, generation, seed)
    procs: dict[int, tuple[subprocess.Popen[bytes], int, int]] = field(default_factory=dict)
    seeds: list[str] = field(default_factory=list)
    kills: int = 0
    garbage: collections.Counter[str] = field(default_factory=collections.Counter)

    def start(self, slot: int, gen: int) -> None:
        seed = self.rng.randrange(2**32)
        self.seeds.append(f"{slot}.{gen}={seed}")
        proc = subprocess.Popen([sys.executable, __file__, self.daemon.path, str(slot), str(gen), str(seed),
                                 repr(self.stop_at), self.workdir],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.procs[slot] = (proc, gen, seed)

    def failures(self) -> list[str]:
        out = []
        for name in sorted(os.listdir(self.workdir)):
            if name.startswith("stats-") and name.endswith(".json"):
                with open(os.path.join(self.workdir, name)) as f:
                    rec = json.load(f)
                if rec["failure"]:
                    out.append(rec["failure"] + f"\n  last operations: {rec['history'][-15:]}")
        return out

    def totals(self) -> collections.Counter[str]:
        total: collections.Counter[str] = collections.Counter()
        for name in os.listdir(self.workdir):
            if name.startswith("stats-") and name.endswith(".json"):
                with open(os.path.join(self.workdir, name)) as f:
                    total.update(json.load(f)["ops"])
        return total

    def summary(self) -> str:
        return (f"soak seed {SOAK_SEED} (UGEM_SOAK_SEED), {SOAK_SECONDS:g} s, {WORKERS} workers; worker seeds "
                f"{' '.join(self.seeds)}; kills {self.kills}; garbage connections {sum(self.garbage.values())} "
                f"{dict(self.garbage)}; operations {dict(sorted(self.totals().items()))}")

    def reap(self, slot: int, timeout: float) -> tuple[int, str]:
        proc, _, _ = self.procs.pop(slot)
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
            return -999, err.decode(errors="replace")
        return proc.returncode, err.decode(errors="replace")


def _check_spill_dir(spill_dir: str) -> list[str]:
    """The daemon's private subdirectory with only its lock and spill files, all space given back."""
    problems = []
    entries = os.listdir(spill_dir)
    if len(entries) != 1 or not entries[0].startswith("ugem-"):
        return [f"spill dir holds {entries}"]
    private = os.path.join(spill_dir, entries[0])
    files = sorted(os.listdir(private))
    if files != ["lock", "spill-0", "spill-1"]:
        problems.append(f"{private} holds {files}")
    for name in files:
        st = os.stat(os.path.join(private, name))
        if st.st_blocks:
            problems.append(f"{name} still holds {st.st_blocks * 512} bytes on disk (size {st.st_size})")
    return problems


def _slow_if_long(fn: Any) -> Any:
    """Only a long soak (CI sets UGEM_SOAK_SECONDS) is `slow`; the 10 s default runs with the suite."""
    return pytest.mark.slow(fn) if SOAK_SECONDS > 30 else fn


@_slow_if_long
def test_soak() -> None:
    rng = random.Random(SOAK_SEED)
    with tempfile.TemporaryDirectory(prefix="ugem-soak-") as tmp:
        spill_dir = os.path.join(tmp, "spill")
        workdir = os.path.join(tmp, "work")
        os.makedirs(os.path.join(workdir, "names"))
        with run_daemon(spill_dir=spill_dir, **DAEMON_FLAGS) as daemon, daemon.connect() as monitor:
            start_fds = daemon.fd_count()
            soak = Soak(daemon, workdir, time.time() + SOAK_SECONDS + 1.0, rng)  # +1 s: workers start up
            worst = 0.0
            peaks = dict.fromkeys(["objects", "clients", "resident_bytes", "vram_bytes", "spilled_bytes", "memfds"], 0)
            try:
                for slot in range(WORKERS):
                    soak.start(slot, 0)
                while time.time() < soak.stop_at - 0.3:
                    time.sleep(rng.uniform(0.02, 0.15))
                    for slot, (proc, gen, seed) in list(soak.procs.items()):  # a worker that stopped by itself
                        if proc.poll() is not None:
                            code, err = soak.reap(slot, 5)
                            raise AssertionError(f"worker {slot}.{gen} (seed {seed}) exited {code} early:\n"
                                                 f"{soak.failures()}\n{err[-3000:]}\n{soak.summary()}\n"
                                                 f"daemon log:\n{daemon.stderr_text()[-6000:]}")
                    roll = rng.random()
                    if roll < 0.12:  # SIGKILL one, start its successor
                        slot = rng.randrange(WORKERS)
                        proc, gen, _ = soak.procs[slot]
                        proc.send_signal(signal.SIGKILL)
                        soak.reap(slot, 10)
                        soak.kills += 1
                        for name in os.listdir(os.path.join(workdir, "names")):  # its records are stale now
                            if name.endswith(f".{slot}.{gen}.json"):
                                with contextlib.suppress(FileNotFoundError):
                                    os.unlink(os.path.join(workdir, "names", name))
                        soak.start(slot, gen + 1)
                    elif roll < 0.5:
                        soak.garbage[_garbage(daemon.path, rng)] += 1
                    t0 = time.perf_counter()
                    stats = monitor.stats()
                    worst = max(worst, time.perf_counter() - t0)
                    for key in peaks:
                        peaks[key] = max(peaks[key], stats[key])
                assert daemon.proc.poll() is None, f"daemon died:\n{daemon.stderr_text()[-4000:]}\n{soak.summary()}"
                results = {slot: (soak.procs[slot][1], soak.procs[slot][2], *soak.reap(slot, 60))
                           for slot in list(soak.procs)}
            finally:
                for slot in list(soak.procs):
                    soak.procs[slot][0].kill()
                    soak.reap(slot, 10)
            events = {k: v for k, v in monitor.stats().items() if k.endswith("_total")}
            summary = (soak.summary() + f"; daemon events {events}; peaks {peaks}; "
                       f"worst monitor round trip {worst * 1000:.0f} ms")
            print(f"\n{summary}")
            failures = soak.failures()
            assert not failures, "\n\n".join(failures) + f"\n\n{summary}\ndaemon log:\n{daemon.stderr_text()[-6000:]}"
            bad = {slot: r for slot, r in results.items() if r[2] != 0}
            assert not bad, "".join(f"\nworker {slot}.{gen} (seed {seed}) exited {code}:\n{err[-3000:]}"
                                    for slot, (gen, seed, code, err) in bad.items()) + f"\n{summary}"
            assert soak.totals()["final checks"] == WORKERS, summary

            deadline = time.monotonic() + SAFETY_S  # every worker released: nothing left anywhere
            while True:
                stats = monitor.stats()
                listed = monitor.list_objects()
                state = {k: stats[k] for k in ("objects", "clients", "resident_bytes", "spilled_bytes", "vram_bytes",
                                               "pinned_bytes", "memfds")}
                clean = (stats["objects"] == 0 and stats["clients"] == 1 and not listed and stats["resident_bytes"] == 0
                         and stats["spilled_bytes"] == 0 and daemon.fd_count() == start_fds)
                if clean or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert clean, (f"after the soak: {state}, objects {listed[:10]}, fds {daemon.fd_count()} "
                           f"(start {start_fds}): {os.listdir(f'/proc/{daemon.pid}/fd')}\n{summary}")
            for name in range(1, 65):
                with pytest.raises(ugem.UgemError) as exc:
                    monitor.open_name(name)
                assert exc.value.errno == errno.ENOENT, (name, summary)
            problems = _check_spill_dir(spill_dir)
            assert not problems, f"{problems}\n{summary}"
            assert "Traceback" not in daemon.stderr_text(), daemon.stderr_text()[-4000:] + f"\n{summary}"
        assert not os.path.exists(spill_dir) or not os.listdir(spill_dir), \
            f"the daemon left {os.listdir(spill_dir)} in its spill dir\n{summary}"


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
