"""The handle layer (SPEC §1-3) against a pure Python model, across 3 clients of one manager.

Model
-----
Per client: handle -> object id (handles lowest-free from 1) and the set of its read-only
handles. Manager-wide: name -> object id (names lowest-free from 1). Per object (``ObjModel``):
its bytes, name, advice, whether it is known purged, pinned by which clients, exported,
populated (has pages), in VRAM (the device's copy is the one that counts), and how many
tracked mappings hold it. Per mapping: client, object, offset, length, writable, and the
``memoryview`` itself.

Lifetimes: an object lives while any handle (in any client) or tracked mapping holds it;
its name disappears with its last handle. Releasing a mapping (``memoryview.release()``;
the client library reports it before that client's next request) drops its reference. A
client that disconnects loses its handles, pins and name references; its mappings stay
valid (closing never unmaps) but are no longer tracked ("orphans": their object dies
unless held elsewhere).

Purge is nondeterministic under the small ``system_budget`` used here: an object that is
DONTNEED and neither pinned nor exported may be purged after any request ("maybe purged").
The model accepts "purged" as an outcome of every observation of such an object (pread,
mmap, pin, export, execbuffer, set_domain: EFAULT; madvise: retained False) and from then
on requires it (purged is final). Contents of objects that are not purged must always
match. Reading a purged object's mapping gives zeros unless someone wrote through a mapping
while it might have been purged. DONTNEED of a never-populated, unpinned, unexported object
purges it at once (retained False). ENOMEM is accepted from requests that may need pages
(pwrite, pread/mmap/export of a spilled object, pin, execbuffer) and changes nothing.

The device: VRAM is small too, so submissions evict each other's objects (which objects is
the manager's choice: an object that may have been evicted is settled from
``list_objects()`` after the step) and fail with ENOSPC when the working set plus what is
pinned in VRAM cannot fit. Pinned objects stay where they are: pinned in VRAM, mmap, export
and set_domain(CPU) are EBUSY; pinned in system memory, the device uses them in place.
Device commands work on the object's VRAM copy, so before touching a mapping of an object
the device may hold, the machine calls ``set_domain(DOMAIN_CPU)`` through any handle (when
it cannot, its contents are not checked); pread and pwrite synchronise by themselves.
Every execbuffer is followed by ``wait_fence``.

Rules: create, close_handle, pwrite, pread, flink, open_name, export + import_fd (writable or
read-only; the fd is closed at once), madvise (WILLNEED, DONTNEED, bogus advice), pin, unpin,
execbuffer (Fill and Copy, overlapping too, with unknown handles, bad ranges, bad bytes and
empty lists mixed in), mmap (writable and read-only, whole and partial, bad offsets/lengths),
write through / read through / release a mapping, touch an orphaned mapping, disconnect.
Handles are picked mostly among existing ones (1 in 8 is bogus), a quarter of the time among
objects that are mapped or in VRAM, where most interactions are.

Invariants after every step: ``stats()`` objects, per-client handle counts, pinned bytes
(manager-wide and per client); ``list_clients()`` handle tables match the model's exactly
(through a consistent bijection of object ids); ``list_objects()`` size, name, handle count,
advice and placement of every object a handle reaches, the number of objects only mappings
hold, and the set of live names.

Both modes run: embedded (a fresh ``ugem.Manager`` per example) and daemon (one
``run_daemon()`` per test function, shared by its examples; each example waits for the
previous example's clients to be gone, so it starts from an empty manager).

Bugs the machine found are reduced to explicit tests at the end of this file (all fixed
since; kept as regression tests). For a bug that stands, add its reduction there marked
``xfail(strict=True)`` and, if the machine keeps tripping over it, a class flag that steps
around that bug only, so that the machine keeps looking for others.

No rule has a precondition: which rules may run must not depend on the manager's answers
(a mapping exists only if its mmap succeeded, and ENOMEM or a purge depends on timing), or
Hypothesis, replaying an example whose answers came out otherwise, stops with
FlakyStrategyDefinition ("a flaky precondition"; seen once in a full run on a loaded
machine). The mapping rules do nothing when there is no mapping.

Seeds: Hypothesis draws a fresh seed per run; a failure prints the shrunk step sequence
and a ``@reproduce_failure`` blob (``print_blob=True``). Replay a whole run with
``pytest --hypothesis-seed=<n>``. ``UGEM_MODEL_EXAMPLES=<n>`` runs n examples per mode
(``UGEM_MODEL_STEPS=<n>`` steps per example) for a longer hunt (Hypothesis keeps data about
every example: expect a few hundred MB per thousand examples).
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

import ugem
from ugem import cmd
from ugem.testing import run_daemon

PAGE = ugem.PAGE_SIZE
NCLIENTS = 3
BUDGET = 4 * PAGE  # tiny: spills, purges under pressure and ENOMEM really happen
PIN_LIMIT = 4 * PAGE  # per client: two 3-page pins exceed it
VRAM = 6 * PAGE  # small: device work evicts, pinned objects crowd it out (ENOSPC)
CONFIG = {"system_budget": BUDGET, "pin_limit": PIN_LIMIT, "vram": VRAM}

EFAULT, EINVAL, ENOENT, ENOMEM = errno.EFAULT, errno.EINVAL, errno.ENOENT, errno.ENOMEM
EACCES, EBUSY, EDQUOT, ENOSPC = errno.EACCES, errno.EBUSY, errno.EDQUOT, errno.ENOSPC

clients = st.integers(min_value=0, max_value=NCLIENTS - 1)
picks = st.integers(min_value=0, max_value=1000)
sizes = st.integers(min_value=1, max_value=3 * PAGE)
small = st.integers(min_value=0, max_value=96)
offsets = st.one_of(small, st.integers(min_value=0, max_value=3 * PAGE + 8), st.sampled_from([-1]))
lengths = st.one_of(small, st.integers(min_value=0, max_value=3 * PAGE + 8), st.sampled_from([-1]))
payloads = st.one_of(st.binary(min_size=0, max_size=64),  # or runs of one byte, up to a whole object
                    st.builds(lambda b, n: bytes([b]) * n, st.integers(0, 255), st.integers(1, 3 * PAGE)))
bogus_flags = st.sampled_from([False] * 7 + [True])  # 1 in 8 picks is bogus (shrinks to a real handle)
rare_bogus = st.sampled_from([False] * 11 + [True])
advices = st.sampled_from([ugem.WILLNEED, ugem.DONTNEED, ugem.WILLNEED, ugem.DONTNEED, 2])
# mmap ranges: mostly whole pages inside the object ("fit"), sometimes raw values (unaligned,
# negative, zero, too long)
map_fit = st.sampled_from([True] * 5 + [False])
# A command's range: mostly a valid one drawn relative to the object ("fit": offset = pick % size,
# length = 1 + pick % room), sometimes raw numbers (often out of range, zero or negative).
RAW_OFFSETS, RAW_LENGTHS = (-1, 0, 1, PAGE, 3 * PAGE), (0, 1, PAGE, 3 * PAGE + 1)
cmd_ranges = st.tuples(st.sampled_from([True] * 9 + [False]), picks, picks)
cmd_bytes = st.sampled_from([0xAB, 0, 0xFF, 7, 0x5A, 1, 0x80, 0xFE, 42, 256])
# (is_copy, src pick, dst pick, src bogus, dst bogus, src range, dst range, byte)
cmd_specs = st.tuples(st.booleans(), picks, picks, rare_bogus, rare_bogus, cmd_ranges, cmd_ranges, cmd_bytes)


def round_up(size: int) -> int:
    return -(-size // PAGE) * PAGE


def lowest_free(used: Any) -> int:
    n = 1
    while n in used:
        n += 1
    return n


def expect_errno(code: int, fn: Callable[..., Any], *args: Any, **kw: Any) -> None:
    with pytest.raises(ugem.UgemError) as info:
        fn(*args, **kw)
    assert info.value.errno == code, f"{fn.__name__}{args}: errno {info.value.errno}, expected {code}"


def attempt(fn: Callable[..., Any], *args: Any, **kw: Any) -> tuple[Any, int]:
    """(result, 0) or (None, errno)."""
    try:
        return fn(*args, **kw), 0
    except ugem.UgemError as exc:
        return None, exc.errno


def check_outcome(err: int, allowed: set[int], what: str) -> None:
    names = sorted(errno.errorcode.get(e, "ok") if e else "ok" for e in allowed)
    assert err in allowed, f"{what}: got {errno.errorcode.get(err, err) if err else 'success'}, allowed {names}"


def wait_stats(dev: ugem.Device, clients_expected: int, objects_expected: int | None = None,
               timeout: float = 10.0) -> dict[str, Any]:
    """Daemon disconnects are processed asynchronously: poll until the sweep is done."""
    deadline = time.monotonic() + timeout
    while True:
        st_ = dev.stats()
        if st_["clients"] == clients_expected and (objects_expected is None or st_["objects"] == objects_expected):
            return st_
        if time.monotonic() > deadline:
            return st_
        time.sleep(0.005)


class ObjModel:
    __slots__ = ("data", "dontneed", "exported", "garbage", "maps", "name", "pinned_by", "populated", "purged",
                 "unsure", "vram")

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)
        self.name = 0
        self.dontneed = False
        self.purged = False  # known purged (final)
        self.unsure = False  # was purgeable since it was last seen unpurged
        self.exported = False  # never purged from then on
        self.pinned_by: set[int] = set()  # client slots
        self.populated = False  # placement is no longer "none"
        # the device's copy counts (placement vram); None: unknown (another submission may have
        # evicted it, or an ENOMEM struck after it left), settled from list_objects after the step
        self.vram: bool | None = False
        self.maps = 0  # tracked mappings
        self.garbage = False  # written through a mapping while it might have been purged

    @property
    def size(self) -> int:
        return len(self.data)

    def purgeable(self) -> bool:
        return self.dontneed and not self.pinned_by and not self.exported and not self.purged

    def maybe_purged(self) -> bool:
        return not self.purged and (self.unsure or self.purgeable())

    def seen_unpurged(self) -> None:
        self.unsure = False


@dataclass(eq=False)
class MapModel:
    c: int
    oid: int
    offset: int
    length: int
    writable: bool
    view: memoryview


class HandleModel(RuleBasedStateMachine):
    # set by the factory: opens a fresh client (and, embedded, owns a fresh manager)
    start: Callable[[], Callable[[], ugem.Device]]
    stop: Callable[[], None]
    daemon_mode: bool = False

    def __init__(self) -> None:
        super().__init__()
        self.devs: list[ugem.Device] = []
        self.handles: list[dict[int, int]] = [{} for _ in range(NCLIENTS)]
        self.readonly: list[set[int]] = [set() for _ in range(NCLIENTS)]
        self.names: dict[int, int] = {}
        self.objs: dict[int, ObjModel] = {}
        self.maps: list[MapModel] = []
        self.orphans: list[MapModel] = []  # mappings whose client went away (still valid memory)
        self.next_id = 1

    # -- setup / teardown -------------------------------------------------------------

    @initialize(initial=st.lists(sizes, max_size=2 * NCLIENTS))
    def open_clients(self, initial: list[int]) -> None:
        self.open_client = type(self).start()
        for _ in range(NCLIENTS):
            self.devs.append(self.open_client())
        st_ = wait_stats(self.devs[0], NCLIENTS, 0)
        assert st_["clients"] == NCLIENTS and st_["objects"] == 0, st_
        for i, size in enumerate(initial):  # a few objects to work on from the first step
            self.create(i % NCLIENTS, size)

    def teardown(self) -> None:
        for dev in self.devs:
            dev.close()
        type(self).stop()

    # -- model helpers ----------------------------------------------------------------

    def pick(self, c: int, pick: int, bogus: bool) -> tuple[int, int]:
        """A client and one of its handles (client `c`, or the next one holding any), or,
        if `bogus` or nobody holds one, client `c` and a handle it does not hold."""
        return (c, self.pick_handle(c, pick, True)) if bogus else self.pick_real(c, pick)

    def pick_real(self, c: int, pick: int) -> tuple[int, int]:
        if pick % 4 >= 2:  # focus on where the interesting interactions are: mapped objects (3), or
            # objects the device holds (2), where mappings, domains, evictions and purges meet
            def wanted(o: ObjModel) -> bool:
                return bool(o.maps) if pick % 4 == 3 else bool(o.vram)

            focus = [(k, h) for k in range(NCLIENTS) for h, o in sorted(self.handles[k].items())
                     if wanted(self.objs[o])]
            if focus:
                return focus[pick // 4 % len(focus)]
        for k in range(NCLIENTS):
            if self.handles[(c + k) % NCLIENTS]:
                c = (c + k) % NCLIENTS
                break
        return c, self.pick_handle(c, pick, False)

    def pick_handle(self, c: int, pick: int, bogus: bool) -> int:
        hs = sorted(self.handles[c])
        if hs and not bogus:
            return hs[pick % len(hs)]
        return [0, lowest_free(self.handles[c]), max(hs, default=0) + 1 + pick][pick % 3]

    def holders(self, oid: int) -> int:
        return sum(1 for hs in self.handles for o in hs.values() if o == oid)

    def any_handle(self, oid: int) -> tuple[int, int] | None:
        for c, hs in enumerate(self.handles):
            for h, o in sorted(hs.items()):
                if o == oid:
                    return c, h
        return None

    def drop_if_dead(self, oid: int) -> None:
        obj = self.objs[oid]
        if self.holders(oid) == 0:
            if obj.name:
                del self.names[obj.name]
                obj.name = 0
            if obj.maps == 0:
                del self.objs[oid]

    def new_handle(self, c: int, oid: int, readonly: bool = False) -> int:
        h = lowest_free(self.handles[c])
        self.handles[c][h] = oid
        if readonly:
            self.readonly[c].add(h)
        return h

    def drop_handle(self, c: int, h: int) -> None:
        oid = self.handles[c].pop(h)
        self.readonly[c].discard(h)
        if oid not in self.handles[c].values():  # this client's last handle: its pin ends
            self.objs[oid].pinned_by.discard(c)
        self.drop_if_dead(oid)

    def pinned_bytes(self, c: int) -> int:
        return sum(o.size for o in self.objs.values() if c in o.pinned_by)

    def lookup(self, c: int, h: int) -> ObjModel | None:
        oid = self.handles[c].get(h)
        return None if oid is None else self.objs[oid]

    def resolve_vram(self, obj: ObjModel, oid: int) -> None:
        """Where the model cannot know whether the object is in VRAM, ask (only then)."""
        if obj.vram is None and not obj.purged:
            hc = self.any_handle(oid)
            if hc is not None:
                placement = self.devs[hc[0]].info(hc[1]).placement
                if placement == "purged":
                    assert obj.maybe_purged(), f"object {oid} was purged though it could not be"
                    obj.purged = True
                else:
                    obj.vram = placement == "vram"

    def failed_access(self, obj: ObjModel, err: int) -> None:
        """Bookkeeping after an observation of an object failed with `err`."""
        if err == EFAULT:
            obj.purged = True
        elif err == ENOMEM and obj.vram and not obj.pinned_by:
            obj.vram = None

    def fault_outcomes(self, obj: ObjModel) -> set[int]:
        """EFAULT if purged, maybe EFAULT if it may be, else nothing."""
        return {EFAULT} if obj.purged or obj.maybe_purged() else set()

    def cpu_sync(self, m: MapModel, write: bool) -> bool:
        """Bring a mapping's object to the CPU domain before touching the mapping; False if
        its contents cannot be predicted (no handle left to do it, pinned in VRAM, ENOMEM)."""
        obj = self.objs[m.oid]
        self.resolve_vram(obj, m.oid)
        if obj.purged or obj.vram is False:
            return True
        hc = self.any_handle(m.oid)
        if hc is None:
            return False
        c, h = hc
        _, err = attempt(self.devs[c].set_domain, h, ugem.DOMAIN_CPU, ugem.DOMAIN_CPU if write else 0)
        allowed = self.fault_outcomes(obj) | ({EFAULT} if obj.purged else {0})
        if obj.pinned_by and obj.vram is not False:
            allowed.add(EBUSY)
        if obj.vram is None:
            allowed.add(ENOMEM)
        check_outcome(err, allowed, f"set_domain(CPU) of handle {h} in client {c}")
        if err == EFAULT:
            obj.purged = True
            return True
        if err == EBUSY:
            obj.vram = True
            return False
        if err:
            return False
        obj.vram = False
        obj.seen_unpurged()
        return True

    # -- rules: handles, names, bytes -------------------------------------------------

    @rule(c=clients, size=sizes)
    def create(self, c: int, size: int) -> None:
        h = self.devs[c].create(size)
        oid, self.next_id = self.next_id, self.next_id + 1
        self.objs[oid] = ObjModel(round_up(size))
        assert h == self.new_handle(c, oid)
        assert self.devs[c].info(h).size == round_up(size)

    @rule(c=clients, pick=picks, bogus=bogus_flags)
    def close_handle(self, c: int, pick: int, bogus: bool) -> None:
        c, h = self.pick(c, pick, bogus)
        if h not in self.handles[c]:
            expect_errno(EINVAL, self.devs[c].close_handle, h)
            return
        self.devs[c].close_handle(h)
        self.drop_handle(c, h)

    @rule(c=clients, pick=picks, bogus=bogus_flags, offset=offsets, data=payloads)
    def pwrite(self, c: int, pick: int, bogus: bool, offset: int, data: bytes) -> None:
        c, h = self.pick(c, pick, bogus)
        dev = self.devs[c]
        if offset < 0:
            if data:
                expect_errno(EINVAL, dev.pwrite, h, offset, data)
            return
        if not data:
            dev.pwrite(h, offset, data)  # length 0: no lookup, no error
            return
        obj = self.lookup(c, h)
        if obj is None:
            expect_errno(ENOENT, dev.pwrite, h, offset, data)
            return
        if offset + len(data) > obj.size or h in self.readonly[c]:
            expect_errno(EINVAL, dev.pwrite, h, offset, data)
            return
        _, err = attempt(dev.pwrite, h, offset, data)
        check_outcome(err, self.fault_outcomes(obj) | ({EFAULT} if obj.purged else {0, ENOMEM}),
                      f"pwrite({h}, {offset}, {len(data)} bytes) in client {c}")
        if err:
            self.failed_access(obj, err)
            return
        obj.data[offset:offset + len(data)] = data
        obj.populated = True
        obj.seen_unpurged()
        if not obj.pinned_by:
            obj.vram = False

    @rule(c=clients, pick=picks, byte=st.integers(0, 255))
    def pwrite_all(self, c: int, pick: int, byte: int) -> None:
        """Populate every page of an object: what makes the small budget bite."""
        c, h = self.pick_real(c, pick)
        obj = self.lookup(c, h)
        if obj is not None:
            self.pwrite(c, pick, False, 0, bytes([byte]) * obj.size)

    @rule(c=clients, pick=picks, bogus=bogus_flags, offset=offsets, length=lengths)
    def pread(self, c: int, pick: int, bogus: bool, offset: int, length: int) -> None:
        c, h = self.pick(c, pick, bogus)
        dev = self.devs[c]
        if length == 0:
            if offset >= 0:  # length 0: no lookup, no error (a negative offset with it is unspecified)
                assert dev.pread(h, offset, 0) == b""
            return
        if offset < 0 or length < 0:
            expect_errno(EINVAL, dev.pread, h, offset, length)
            return
        obj = self.lookup(c, h)
        if obj is None:
            expect_errno(ENOENT, dev.pread, h, offset, length)
            return
        if offset + length > obj.size:
            expect_errno(EINVAL, dev.pread, h, offset, length)
            return
        got, err = attempt(dev.pread, h, offset, length)
        check_outcome(err, self.fault_outcomes(obj) | ({EFAULT} if obj.purged else {0, ENOMEM}),
                      f"pread({h}, {offset}, {length}) in client {c}")
        if err:
            self.failed_access(obj, err)
            return
        assert got == bytes(obj.data[offset:offset + length]), f"pread({h}, {offset}, {length}) in client {c}"
        obj.seen_unpurged()
        if not obj.pinned_by:
            obj.vram = False

    @rule(c=clients, pick=picks, bogus=bogus_flags)
    def flink(self, c: int, pick: int, bogus: bool) -> None:
        c, h = self.pick(c, pick, bogus)
        if h not in self.handles[c]:
            expect_errno(ENOENT, self.devs[c].flink, h)
            return
        obj = self.objs[self.handles[c][h]]
        if not obj.name:
            obj.name = lowest_free(self.names)
            self.names[obj.name] = self.handles[c][h]
        assert self.devs[c].flink(h) == obj.name
        assert self.devs[c].info(h).name == obj.name

    @rule(c=clients, pick=picks, bogus=bogus_flags)
    def open_name(self, c: int, pick: int, bogus: bool) -> None:
        live = sorted(self.names)
        if live and not bogus:
            name = live[pick % len(live)]
        else:  # 0, the lowest unused name (often a vanished one), or far beyond
            name = [0, lowest_free(self.names), max(live, default=0) + 1 + pick][pick % 3]
        if name not in self.names:
            expect_errno(ENOENT, self.devs[c].open_name, name)
            return
        oid = self.names[name]
        h, size = self.devs[c].open_name(name)
        assert (h, size) == (self.new_handle(c, oid), self.objs[oid].size)

    @rule(src=clients, dst=clients, pick=picks, bogus=bogus_flags, writable=st.booleans())
    def export_import(self, src: int, dst: int, pick: int, bogus: bool, writable: bool) -> None:
        src, h = self.pick(src, pick, bogus)
        obj = self.lookup(src, h)
        if obj is None:
            expect_errno(ENOENT, self.devs[src].export, h, writable=writable)
            return
        oid = self.handles[src][h]
        self.resolve_vram(obj, oid)
        fd, err = attempt(self.devs[src].export, h, writable=writable)
        allowed = self.fault_outcomes(obj)
        if not obj.purged:
            if writable and h in self.readonly[src]:
                allowed.add(EACCES)
            elif obj.pinned_by and obj.vram:
                allowed.add(EBUSY)
            else:
                allowed |= {0, ENOMEM}
        check_outcome(err, allowed, f"export({h}, writable={writable}) in client {src}")
        if err == EBUSY:
            obj.vram = True
        if err:
            self.failed_access(obj, err)
            return
        obj.exported, obj.populated, obj.vram = True, True, False
        obj.seen_unpurged()
        try:
            got = self.devs[dst].import_fd(fd)
        finally:
            os.close(fd)
        held = sorted(k for k, v in self.handles[dst].items() if v == oid)
        expected = held[0] if held else self.new_handle(dst, oid, readonly=not writable)
        assert got == expected
        assert self.devs[dst].info(got).readonly is (got in self.readonly[dst])

    # -- rules: memory management -----------------------------------------------------

    @rule(c=clients, pick=picks, bogus=bogus_flags, advice=advices)
    def madvise(self, c: int, pick: int, bogus: bool, advice: int) -> None:
        c, h = self.pick(c, pick, bogus)
        dev = self.devs[c]
        if advice not in (ugem.WILLNEED, ugem.DONTNEED):
            expect_errno(EINVAL, dev.madvise, h, advice)  # advice is checked before the lookup
            return
        obj = self.lookup(c, h)
        if obj is None:
            expect_errno(ENOENT, dev.madvise, h, advice)
            return
        if obj.purged:
            allowed = {False}
        elif obj.maybe_purged():
            allowed = {True, False}
        elif advice == ugem.DONTNEED and not obj.pinned_by and not obj.exported:
            # no pages (never populated; or spilled, which the model cannot see): purged at once
            allowed = {True, False} if obj.populated else {False}
        else:
            allowed = {True}
        retained = dev.madvise(h, advice)
        assert retained in allowed, (f"madvise({h}, {advice}) in client {c} retained={retained}, "
                                     f"allowed {allowed}")
        if not retained:
            obj.purged = True
            return
        obj.seen_unpurged()
        obj.dontneed = advice == ugem.DONTNEED

    @rule(c=clients, pick=picks, bogus=bogus_flags)
    def pin(self, c: int, pick: int, bogus: bool) -> None:
        c, h = self.pick(c, pick, bogus)
        obj = self.lookup(c, h)
        if obj is None:
            expect_errno(ENOENT, self.devs[c].pin, h)
            return
        self.resolve_vram(obj, self.handles[c][h])  # pinned objects stay put: their placement must be known
        _, err = attempt(self.devs[c].pin, h)
        allowed = self.fault_outcomes(obj)
        if not obj.purged:
            if c in obj.pinned_by:
                allowed.add(0)  # a no-op
            elif self.pinned_bytes(c) + obj.size > PIN_LIMIT:
                allowed.add(EDQUOT)
            else:
                allowed |= {0, ENOMEM}
        check_outcome(err, allowed, f"pin({h}) in client {c} (pinned {self.pinned_bytes(c)})")
        if err:
            self.failed_access(obj, err)
            return
        obj.pinned_by.add(c)
        obj.populated = True
        obj.seen_unpurged()

    @rule(c=clients, pick=picks, bogus=bogus_flags)
    def unpin(self, c: int, pick: int, bogus: bool) -> None:
        c, h = self.pick(c, pick, bogus)
        obj = self.lookup(c, h)
        if obj is None:
            expect_errno(ENOENT, self.devs[c].unpin, h)
        elif c not in obj.pinned_by:
            expect_errno(EINVAL, self.devs[c].unpin, h)
        else:
            self.devs[c].unpin(h)
            obj.pinned_by.discard(c)

    # -- rules: the device ------------------------------------------------------------

    @rule(c=clients, specs=st.lists(cmd_specs, min_size=1, max_size=3), empty=rare_bogus)
    def execbuffer(self, c: int, specs: list[tuple[Any, ...]], empty: bool) -> None:
        c, first = self.pick_real(c, specs[0][2])  # the first command's destination, maybe a focus
        commands: list[cmd.Fill | cmd.Copy] = []
        if empty:
            specs = []

        def size_of(h: int) -> int:
            return self.objs[self.handles[c][h]].size if h in self.handles[c] else PAGE

        for is_copy, p_src, p_dst, b_src, b_dst, (fit_s, a_s, b_s), (fit_d, a_d, b_d), byte in specs:
            dst = first if not commands and not b_dst else self.pick_handle(c, p_dst, b_dst)
            dsize = size_of(dst)
            dst_off = a_d % dsize if fit_d else RAW_OFFSETS[a_d % len(RAW_OFFSETS)]
            if not is_copy:
                length = 1 + b_d % (dsize - dst_off) if fit_d else RAW_LENGTHS[b_d % len(RAW_LENGTHS)]
                commands.append(cmd.Fill(dst=dst, offset=dst_off, length=length, byte=byte))
                continue
            src = self.pick_handle(c, p_src, b_src)
            ssize = size_of(src)
            src_off = a_s % ssize if fit_s else RAW_OFFSETS[a_s % len(RAW_OFFSETS)]
            if fit_s and fit_d:
                length = 1 + b_s % min(ssize - src_off, dsize - dst_off)
            else:
                length = RAW_LENGTHS[b_s % len(RAW_LENGTHS)]
            commands.append(cmd.Copy(src=src, src_offset=src_off, dst=dst, dst_offset=dst_off, length=length))
        dev, hs = self.devs[c], self.handles[c]
        if not commands:
            expect_errno(EINVAL, dev.execbuffer, commands)
            return
        named = [h for k in commands for h in ((k.src, k.dst) if isinstance(k, cmd.Copy) else (k.dst,))]
        if any(h not in hs for h in named):
            expect_errno(ENOENT, dev.execbuffer, commands)
            return

        def size(h: int) -> int:
            return self.objs[hs[h]].size

        def bad(k: cmd.Fill | cmd.Copy) -> bool:
            if isinstance(k, cmd.Fill):
                return k.length <= 0 or k.offset < 0 or not 0 <= k.byte <= 255 or k.offset + k.length > size(k.dst)
            return (k.length <= 0 or k.src_offset < 0 or k.dst_offset < 0
                    or k.src_offset + k.length > size(k.src) or k.dst_offset + k.length > size(k.dst))

        if any(bad(k) for k in commands):
            expect_errno(EINVAL, dev.execbuffer, commands)
            return
        oids = sorted({hs[h] for h in named})
        objs = [self.objs[o] for o in oids]
        maybe = [o for o in objs if o.maybe_purged()]
        allowed = {EFAULT} if maybe or any(o.purged for o in objs) else set()
        if not any(o.purged for o in objs):
            allowed |= self.placement_outcomes(oids) if all(k.dst not in self.readonly[c] for k in commands) \
                else {EACCES}
        fence, err = attempt(dev.execbuffer, commands)
        check_outcome(err, allowed, f"execbuffer({commands}) in client {c}")
        if err == EFAULT and len(maybe) == 1 and not any(o.purged for o in objs):
            maybe[0].purged = True
        if err:
            return
        assert dev.wait_fence(fence, -1) == -1
        for k in commands:
            if isinstance(k, cmd.Fill):
                self.objs[hs[k.dst]].data[k.offset:k.offset + k.length] = bytes([k.byte]) * k.length
            else:
                chunk = bytes(self.objs[hs[k.src]].data[k.src_offset:k.src_offset + k.length])
                self.objs[hs[k.dst]].data[k.dst_offset:k.dst_offset + k.length] = chunk
        for other in self.objs.values():  # making room may have evicted any unpinned object
            if other.vram and not other.pinned_by:
                other.vram = None
        for obj in objs:
            obj.seen_unpurged()
            obj.populated = True
            if not obj.pinned_by:  # pinned objects stay where they are (in system: used in place)
                obj.vram = True

    def placement_outcomes(self, oids: list[int]) -> set[int]:
        """What a submission using `oids` may do once the EFAULT/EACCES checks pass: ENOSPC
        when its objects plus the objects pinned in VRAM outside it exceed VRAM; else success
        (or ENOMEM bringing a spilled object back), and ENOSPC only if something that cannot
        move (pinned, or already placed members) may fragment VRAM."""
        members = [self.objs[o] for o in oids]
        need = sum(o.size for o in members if not (o.pinned_by and o.vram is False))  # pinned in system: in place
        pinned = [o for oid, o in self.objs.items() if o.pinned_by and o.vram and oid not in oids]
        if need + sum(o.size for o in pinned) > VRAM:
            return {ENOSPC}
        fragmented = pinned or any(o.vram is not False for o in members)
        return {0, ENOMEM, ENOSPC} if fragmented else {0, ENOMEM}

    # -- rules: mappings --------------------------------------------------------------

    @rule(c=clients, pick=picks, bogus=bogus_flags, fit=map_fit, where=picks,
          pages=st.sampled_from([None, None, 1, 2, 3]), raw=st.tuples(st.sampled_from([0, 1, -PAGE, 3 * PAGE, PAGE]),
                                                                    st.sampled_from([None, 0, -1, 4 * PAGE])),
          writable=st.booleans())
    def mmap(self, c: int, pick: int, bogus: bool, fit: bool, where: int, pages: int | None,
             raw: tuple[int, int | None], writable: bool) -> None:
        c, h = self.pick(c, pick, bogus)
        dev = self.devs[c]
        obj = self.lookup(c, h)
        offset, length = raw
        if fit and obj is not None:
            npages = obj.size // PAGE
            offset = where % npages * PAGE
            length = None if pages is None else min(pages, npages - offset // PAGE) * PAGE
        if obj is None:
            expect_errno(ENOENT, dev.mmap, h, offset=offset, length=length, writable=writable)
            return
        span = obj.size - offset if length is None else length
        if offset < 0 or offset % PAGE or span <= 0 or offset + span > obj.size:
            expect_errno(EINVAL, dev.mmap, h, offset=offset, length=length, writable=writable)
            return
        self.resolve_vram(obj, self.handles[c][h])
        view, err = attempt(dev.mmap, h, offset=offset, length=length, writable=writable)
        allowed = self.fault_outcomes(obj)
        if not obj.purged:
            if writable and h in self.readonly[c]:
                allowed.add(EACCES)
            elif obj.pinned_by and obj.vram:
                allowed.add(EBUSY)
            else:
                allowed |= {0, ENOMEM}
        check_outcome(err, allowed, f"mmap({h}, offset={offset}, length={length}, writable={writable}) in client {c}")
        if err:
            self.failed_access(obj, err)
            return
        assert len(view) == span and view.readonly is not writable
        obj.maps += 1
        obj.populated, obj.vram = True, False
        obj.seen_unpurged()
        m = MapModel(c, self.handles[c][h], offset, span, writable, view)
        self.maps.append(m)
        self.check_map(m, bytes(view))

    def check_map(self, m: MapModel, got: bytes) -> None:
        obj = self.objs[m.oid]
        zeros = bytes(m.length)
        if obj.purged:
            assert obj.garbage or got == zeros, "a purged object's mapping must read zeros"
            return
        expected = bytes(obj.data[m.offset:m.offset + m.length])
        if got == expected:
            return
        assert obj.maybe_purged(), f"mapping of object {m.oid} [{m.offset}, +{m.length}) disagrees with the model"
        if not obj.garbage:
            assert got == zeros, "a mapping of an object that may be purged reads its contents or zeros"
            obj.purged = True  # it reads zeros, so it was purged: from now on EFAULT everywhere

    @rule(pick=picks)
    def map_read(self, pick: int) -> None:
        if not self.maps:
            return
        m = self.maps[pick % len(self.maps)]
        synced = self.cpu_sync(m, write=False)
        got = bytes(m.view)
        if synced:
            self.check_map(m, got)

    @rule(pick=picks, at=picks, data=payloads.filter(bool))
    def map_write(self, pick: int, at: int, data: bytes) -> None:
        if not self.maps:
            return
        m = self.maps[pick % len(self.maps)]
        at %= m.length
        data = data[:m.length - at]
        if not m.writable:
            with pytest.raises(TypeError):
                m.view[at:at + len(data)] = data
            return
        obj = self.objs[m.oid]
        if not self.cpu_sync(m, write=True):
            return  # the device may hold newer contents than the mapping shows: do not mix them
        m.view[at:at + len(data)] = data
        if obj.purged or obj.maybe_purged():
            obj.garbage = True
        if not obj.purged:
            obj.data[m.offset + at:m.offset + at + len(data)] = data

    @rule(pick=picks)
    def map_release(self, pick: int) -> None:
        if not self.maps:
            return
        m = self.maps.pop(pick % len(self.maps))
        m.view.release()
        self.devs[m.c].stats()  # the release is reported before this client's next request
        self.objs[m.oid].maps -= 1
        self.drop_if_dead(m.oid)

    @rule(pick=picks, at=picks, data=payloads.filter(bool))
    def orphan_touch(self, pick: int, at: int, data: bytes) -> None:
        """A mapping outlives its client: still readable; writable once nobody else can see
        its memory (its object is gone from the manager)."""
        if not self.orphans:
            return
        m = self.orphans[pick % len(self.orphans)]
        got = bytes(m.view)
        assert len(got) == m.length
        if m.writable and m.oid not in self.objs:
            at %= m.length
            data = data[:m.length - at]
            m.view[at:at + len(data)] = data
            assert bytes(m.view[at:at + len(data)]) == data

    # -- rules: clients ---------------------------------------------------------------

    @rule(c=clients, really=st.sampled_from([False] * 3 + [True]))
    def disconnect(self, c: int, really: bool) -> None:
        if not really:  # Hypothesis draws this cheap rule often: most draws keep the client's state
            return
        self.devs[c].close()
        self.devs[c] = self.open_client()
        for h in sorted(self.handles[c]):
            self.drop_handle(c, h)
        mine = [m for m in self.maps if m.c == c]
        self.maps = [m for m in self.maps if m.c != c]
        for m in mine:  # the mapping stays valid, but the manager no longer tracks it
            self.orphans.append(m)
            self.objs[m.oid].maps -= 1
            self.drop_if_dead(m.oid)
        st_ = wait_stats(self.devs[c], NCLIENTS)  # the old client is gone once it is fully released
        assert st_["clients"] == NCLIENTS, st_

    # -- invariants -------------------------------------------------------------------

    @invariant()
    def manager_agrees(self) -> None:
        if not self.devs:
            return
        dev = self.devs[0]
        st_ = wait_stats(dev, NCLIENTS, len(self.objs), timeout=0.5) if self.daemon_mode else dev.stats()
        assert st_["objects"] == len(self.objs), (st_["objects"], len(self.objs))
        per = {pc["id"]: pc for pc in st_["per_client"]}
        for c, d in enumerate(self.devs):
            assert per[d.client_id]["objects"] == len(self.handles[c]), (c, per, self.handles)
            assert per[d.client_id]["pinned_bytes"] == self.pinned_bytes(c), (c, per[d.client_id])
        assert st_["pinned_bytes"] == sum(o.size for o in self.objs.values() if o.pinned_by)

        # handle tables, through a consistent bijection model object <-> manager object
        tables = {row["id"]: row["handles"] for row in dev.list_clients()}
        rows = {row["id"]: row for row in dev.list_objects()}
        ids: dict[int, int] = {}
        back: dict[int, int] = {}
        for c, d in enumerate(self.devs):
            table = {int(h): mid for h, mid in tables[d.client_id].items()}
            assert set(table) == set(self.handles[c]), (c, table, self.handles[c])
            for h, oid in self.handles[c].items():
                assert ids.setdefault(oid, table[h]) == table[h], f"client {c} handle {h}: another object"
                assert back.setdefault(table[h], oid) == oid, f"client {c} handle {h}: object shared unexpectedly"
        for oid, mid in ids.items():
            obj, row = self.objs[oid], rows[mid]
            assert (row["size"], row["name"], row["handles"]) == (obj.size, obj.name, self.holders(oid)), (oid, row)
            self.check_placement(oid, obj, row)
        assert sum(1 for r in rows.values() if r["handles"] == 0) == len(self.objs) - len(ids), \
            "objects held only by mappings"
        assert {r["name"] for r in rows.values() if r["name"]} == set(self.names)
        for name, oid in self.names.items():
            assert rows[ids[oid]]["name"] == name

        for obj in self.objs.values():  # from here on, a purge may happen at any request
            if obj.purgeable():
                obj.unsure = True

    def check_placement(self, oid: int, obj: ObjModel, row: dict[str, Any]) -> None:
        placement, advice = row["placement"], row["madvise"]
        if obj.purged:
            assert (placement, advice) == ("purged", "purged"), (oid, row)
            return
        if placement == "purged":
            assert obj.maybe_purged(), f"object {oid} was purged though it could not be: {row}"
            obj.purged = True
            return
        assert advice == ("dontneed" if obj.dontneed else "willneed"), (oid, row)
        if obj.vram is None:  # evicted or not: now we know
            obj.vram = placement == "vram"
        if not obj.populated:
            assert placement == "none", (oid, row)
        elif obj.vram is True:
            assert placement == "vram", (oid, row)
        elif obj.vram is False:
            assert placement in ("system", "spilled"), (oid, row)
        if obj.pinned_by:
            assert placement != "spilled", (oid, row)


# -- bugs the state machine found, reduced -------------------------------------------------


def test_release_of_a_mapping_made_before_a_flush_is_reported() -> None:
    """Reduced from the state machine (shrunk: create, mmap twice, release one, any request,
    close the handle, release the other). `Device.mmap` registered its finalizer with the
    bound ``append`` of the pending-release list of that moment, and every flush swapped in
    a new list, so the release of a mapping made before a flush went into a discarded list:
    the manager never heard of it and the object outlived its last handle and mapping.
    Fixed in the client (one deque drained in place); kept as a regression test."""
    with ugem.Manager() as manager:
        dev = manager.open()
        h = dev.create(PAGE)
        first, second = dev.mmap(h), dev.mmap(h)
        first.release()
        dev.stats()  # reports the first release (a flush)
        dev.close_handle(h)
        second.release()
        assert dev.stats()["objects"] == 0


def test_import_after_restore_returns_the_existing_handle() -> None:
    """Reduced from the state machine (daemon mode shrank to: map an object, move it to VRAM,
    let pressure drop its system pages, export it, import the fd in the same client); fixed
    meanwhile, kept as a regression test. The core recorded an object's identity (its
    memfd's dev/inode) once, when a description of it first left the manager; once its
    system pages were replaced (spill + restore, or a dropped spare copy re-created on
    eviction), importing an fd of the current memfd did not find the object and adopted it
    as a second object sharing the same pages, instead of returning the existing handle."""
    with tempfile.TemporaryDirectory(prefix="ugem-model-") as spill, \
            ugem.Manager(system_budget=4 * PAGE, spill_dir=spill) as manager:
        dev = manager.open()
        a = dev.create(PAGE)
        dev.pwrite(a, 0, b"a" * PAGE)
        dev.mmap(a).release()  # a description left the manager: its identity is recorded
        b = dev.create(4 * PAGE)
        dev.pwrite(b, 0, b"b" * 4 * PAGE)  # over the budget: a is spilled
        assert dev.info(a).placement == "spilled"
        assert dev.pread(a, 0, 1) == b"a"  # and restored into a new memfd
        fd = dev.export(a)
        try:
            assert dev.import_fd(fd) == a
        finally:
            os.close(fd)
        assert dev.stats()["objects"] == 2


def test_purge_of_an_object_in_vram_frees_its_vram() -> None:
    """Found with VRAM pressure (fixed meanwhile in the core, "purge drops the VRAM copy";
    kept as a regression test): a DONTNEED object whose contents live in VRAM keeps its
    system pages as a spare copy, and the shrinker purges it by those. Its VRAM node stayed
    allocated and on the GPU's LRU, and the next eviction that picked it purged it again:
    ``IllegalTransition: purge in state purged`` escaped from execbuffer."""
    with tempfile.TemporaryDirectory(prefix="ugem-model-") as spill, \
            ugem.Manager(vram=4 * PAGE, system_budget=4 * PAGE, spill_dir=spill) as manager:
        dev = manager.open()
        a = dev.create(2 * PAGE)
        dev.pwrite(a, 0, b"a" * 2 * PAGE)
        dev.wait_fence(dev.execbuffer([cmd.Fill(dst=a, offset=0, length=1, byte=1)]), -1)  # into VRAM
        assert dev.madvise(a, ugem.DONTNEED)
        b = dev.create(3 * PAGE)
        dev.pwrite(b, 0, b"b" * 3 * PAGE)  # over the budget: a is purged by its spare system pages
        assert dev.info(a).placement == "purged"
        assert dev.stats()["vram_bytes"] == 0
        c = dev.create(4 * PAGE)
        dev.wait_fence(dev.execbuffer([cmd.Fill(dst=c, offset=0, length=1, byte=1)]), -1)  # all of VRAM
        assert dev.pread(c, 0, 1) == b"\x01"


def test_eviction_does_not_purge_an_exported_object() -> None:
    """Found with VRAM pressure; fixed meanwhile, kept as a regression test: evicting a
    DONTNEED object from VRAM dropped it even when it was exported, and its fd (maybe in
    another process) then read zeros. SPEC §3: exported objects are never purged."""
    with ugem.Manager(vram=2 * PAGE) as manager:
        dev = manager.open()
        a, b = dev.create(2 * PAGE), dev.create(2 * PAGE)
        dev.pwrite(a, 0, b"keep")
        fd = dev.export(a)
        try:
            assert dev.madvise(a, ugem.DONTNEED)
            dev.wait_fence(dev.execbuffer([cmd.Fill(dst=a, offset=100, length=1, byte=1)]), -1)  # a into VRAM
            dev.wait_fence(dev.execbuffer([cmd.Fill(dst=b, offset=0, length=1, byte=1)]), -1)  # evicts a
            assert dev.info(a).placement != "purged"
            assert os.pread(fd, 4, 0) == b"keep"
        finally:
            os.close(fd)


LIVELOCK = """
import tempfile, ugem
from ugem import cmd
P = ugem.PAGE_SIZE
with tempfile.TemporaryDirectory() as d, ugem.Manager(system_budget=4 * P, spill_dir=d) as m:
    dev = m.open()
    a, b, c = dev.create(3 * P), dev.create(3 * P), dev.create(3 * P)
    for h in (a, b, c):
        dev.pwrite(h, 0, b"x" * 3 * P)  # each write spills the one before: a and b end up spilled
    try:
        dev.wait_fence(dev.execbuffer([cmd.Copy(src=a, src_offset=0, dst=b, dst_offset=0, length=1)]), -1)
        print("ok")
    except ugem.OutOfMemory:
        print("ENOMEM")
"""


def test_submission_of_objects_that_cannot_all_be_restored_returns() -> None:
    """Found by the state machine (a run that never finished; both modes); fixed meanwhile,
    kept as a regression test: execbuffer brought its spilled objects back one by one, and
    making room for one spilled another member of the same submission. When the members
    could not all be resident under the budget at once, each retry restored one and
    spilled the other: the request never returned (embedded: the caller spun holding the
    manager lock; daemon: the request parked and woke forever). SPEC §3: the request waits
    for room, and if nothing can be freed it fails with ENOMEM. Run in a child process,
    killed if it hangs."""
    try:
        proc = subprocess.run([sys.executable, "-c", LIVELOCK], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("execbuffer did not return: restoring its members spills them in turn")
    assert proc.returncode == 0 and proc.stdout.strip() in ("ok", "ENOMEM"), (proc.stdout, proc.stderr)


# -- the two modes ----------------------------------------------------------------------

EXAMPLES = int(os.environ.get("UGEM_MODEL_EXAMPLES", "0"))
STEPS = int(os.environ.get("UGEM_MODEL_STEPS", "0"))


def model_settings(examples: int, steps: int) -> settings:
    return settings(max_examples=EXAMPLES or examples, stateful_step_count=STEPS or steps, deadline=None,
                    print_blob=True, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def spill_dir() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="ugem-model-") as directory:
        yield directory


def embedded_machine(spill: str) -> type[HandleModel]:
    managers: list[ugem.Manager] = []

    def start() -> Callable[[], ugem.Device]:
        managers.append(ugem.Manager(spill_dir=spill, **CONFIG))
        return managers[-1].open

    def stop() -> None:
        while managers:
            managers.pop().close()

    return type("EmbeddedHandleModel", (HandleModel,), {"start": staticmethod(start), "stop": staticmethod(stop)})


def daemon_machine(path: str) -> type[HandleModel]:
    def start() -> Callable[[], ugem.Device]:
        return lambda: ugem.connect(path)

    return type("DaemonHandleModel", (HandleModel,),
                {"start": staticmethod(start), "stop": staticmethod(lambda: None), "daemon_mode": True})


@pytest.fixture(scope="module")
def daemon():
    with run_daemon(**CONFIG) as d:
        yield d


def test_model_embedded(spill_dir: str) -> None:
    run_state_machine_as_test(embedded_machine(spill_dir), settings=model_settings(300, 80))


def test_model_daemon(daemon) -> None:
    run_state_machine_as_test(daemon_machine(daemon.path), settings=model_settings(120, 80))
