"""Hostile but well-formed frames (SPEC §5), and the codec fuzzed in-process.

test_abuse.py sends garbage, cut frames and misplaced fds. Here every frame has a correct
header and a payload laid out as its op's request struct, but the values are hostile: huge
sizes, negative offsets and timeouts, handles that are 0, 2**32-1, never allocated or held
by another client, unknown ops, unknown flag bits, nonzero padding, payloads shorter or
longer than the struct, fd counts that do not match the header or the op, and fds of every
kind (pipes, sockets, directories, regular files, /dev/null, eventfds, memfds with and
without seals, read-only reopenings, exports of another client's object), mixed with valid
requests on the same connection. For every frame the reply must be:

- an error with a positive errno that SPEC allows for that op (exactly EINVAL for unknown
  ops, padding, flags and oversized payloads; exactly what §2 says for unknown handles and
  unacceptable fds), after which the connection still serves valid requests; or success
  with a reply of the right layout; or
- a dropped connection, for framing violations (fd counts) only.

After every case the daemon is alive, a separate client sees its objects intact and is
answered promptly, and the daemon holds exactly the fds it held before the case. The bugs
it found have regression tests at the end (write-sealed memfds taken as writable memory, a
VRAM node leaked when moving in fails, device writes to CACHED objects beyond the budget, a
refused pwrite that populated its object), all fixed; the fuzz strategies, written while
they were open, still leave those inputs out.

The hypothesis seed is printed at the end of the module (pytest -s) together with the
number of cases per test and the hostile frames by outcome (UGEM_FUZZ_DEBUG=1: per op too);
set UGEM_FUZZ_SEED to replay a run.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import json
import os
import random
import select
import socket
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

import ugem
from ugem.cmd import Fill
from ugem.errors import Busy, InvalidArgument, RemoteProtocolError
from ugem.fd import OwnedFd
from ugem.testing import DaemonProcess, run_daemon
from ugem.testing.data import PROMPT_S, SAFETY_S
from ugem.wire import structs as s
from ugem.wire import structs_domain as sd
from ugem.wire import structs_exec as sx
from ugem.wire import structs_share as ss
from ugem.wire.commands import RECORD, decode_commands
from ugem.wire.frames import HEADER, MAX_FDS, MAX_PAYLOAD, FrameKind, FrameParser, Op, encode_header
from ugem.wire.structs_preload import LookupReq

SEED = int(os.environ.get("UGEM_FUZZ_SEED") or random.SystemRandom().randrange(2**32))
CASES: collections.Counter[str] = collections.Counter()
FRAMES: collections.Counter[str] = collections.Counter()  # hostile frames by outcome (errno name)

E = errno
# What SPEC §2 lets each op fail with (EINVAL always: padding, flags, payload size).
ALLOWED: dict[int, set[int]] = {
    Op.GEM_CREATE: {E.EINVAL, E.E2BIG, E.EDQUOT},
    Op.GEM_CLOSE: {E.EINVAL},
    Op.GEM_CLOSE_BATCH: {E.EINVAL},
    Op.GEM_INFO: {E.EINVAL, E.ENOENT},
    Op.GEM_PREAD: {E.EINVAL, E.ENOENT, E.EFAULT, E.ENOMEM},
    Op.GEM_PWRITE: {E.EINVAL, E.ENOENT, E.EFAULT, E.ENOMEM},
    Op.XFER_DONE: {E.EINVAL},
    Op.GEM_MMAP: {E.EINVAL, E.ENOENT, E.ENODEV, E.EFAULT, E.EACCES, E.EBUSY, E.ENOMEM},
    Op.GEM_MUNMAP: {E.EINVAL},
    Op.GEM_FLINK: {E.EINVAL, E.ENOENT},
    Op.GEM_OPEN: {E.EINVAL, E.ENOENT, E.EACCES, E.EDQUOT},
    Op.PRIME_HANDLE_TO_FD: {E.EINVAL, E.ENOENT, E.EFAULT, E.EACCES, E.EBUSY, E.ENOMEM},
    Op.PRIME_FD_TO_HANDLE: {E.EINVAL, E.EBADF, E.EDQUOT, E.ENOMEM},
    Op.PRIME_MAP_TO_FD: {E.EINVAL, E.EFAULT, E.EACCES, E.EBUSY, E.ENOMEM},
    Op.GEM_MADVISE: {E.EINVAL, E.ENOENT},
    Op.GEM_PIN: {E.EINVAL, E.ENOENT, E.EFAULT, E.EDQUOT, E.ENOMEM},
    Op.GEM_UNPIN: {E.EINVAL, E.ENOENT},
    Op.GEM_EXECBUFFER: {E.EINVAL, E.ENOENT, E.EFAULT, E.EACCES, E.ENOSPC, E.EBUSY},
    Op.GEM_BUSY: {E.EINVAL, E.ENOENT},
    Op.GEM_WAIT: {E.EINVAL, E.ENOENT, E.ETIME, E.EIO},
    Op.WAIT_FENCE: {E.EINVAL, E.ENOENT, E.ETIME, E.EIO},
    Op.GEM_SET_DOMAIN: {E.EINVAL, E.ENOENT, E.ENXIO, E.EFAULT, E.EBUSY, E.ENOSPC, E.ENOMEM},
    Op.GEM_SET_TILING: {E.EINVAL, E.ENOENT, E.ENXIO},
    Op.GEM_GET_TILING: {E.EINVAL, E.ENOENT},
    Op.GEM_SET_CACHING: {E.EINVAL, E.ENOENT, E.ENXIO},
    Op.GEM_GET_CACHING: {E.EINVAL, E.ENOENT},
    Op.SUSPEND: {E.EINVAL, E.EACCES},
    Op.RESUME: {E.EINVAL, E.EACCES},
    Op.GEM_USERPTR: {E.EINVAL, E.EACCES, E.EBADF, E.EDQUOT},
    Op.STATS: {E.EINVAL},
    Op.LIST_OBJECTS: {E.EINVAL, E.EACCES},
    Op.LIST_CLIENTS: {E.EINVAL, E.EACCES},
    Op.DEBUG_OPEN: {E.EINVAL, E.ENOENT, E.EACCES, E.EDQUOT},
    Op.GEM_SHARE: {E.EINVAL, E.EACCES, E.EDQUOT},
    Op.GEM_CLAIM: {E.EINVAL, E.ENOENT, E.EAGAIN, E.EACCES, E.EFAULT, E.EBUSY, E.ENOMEM, E.EDQUOT},
    Op.GEM_CLAIM_MAPPED: {E.EINVAL, E.ENOENT, E.EAGAIN, E.EACCES, E.EFAULT, E.EBUSY, E.ENOMEM, E.EDQUOT},
    Op.GEM_DROP_SHARES: {E.EINVAL},
    Op.GEM_SHARE_BATCH: {E.EINVAL},  # a malformed list; a record's own errors are its claimer's
    Op.GEM_CLAIM_MAPPED_BATCH: {E.EINVAL},
    Op.GEM_CREATE_MAPPED: {E.EINVAL, E.E2BIG, E.EDQUOT, E.ENOMEM},
    Op.LOOKUP: {E.EINVAL, E.ENOENT, E.EIO},
    Op.MAPPINGS_FORKED: {E.EINVAL},
    Op.LAZY_CHANNEL: {E.EINVAL},  # an fd that is no Unix stream socket, or a second channel
    Op.GEM_REUSE: {E.EINVAL, E.EACCES, E.EBUSY},
}
REQ: dict[int, type[s.Struct]] = {
    Op.GEM_CREATE: s.CreateReq, Op.GEM_CLOSE: s.CloseReq, Op.GEM_CLOSE_BATCH: s.CloseBatchReq,
    Op.GEM_INFO: s.InfoReq, Op.GEM_PREAD: s.PreadReq,
    Op.GEM_PWRITE: s.PwriteReq, Op.XFER_DONE: s.XferDoneReq, Op.GEM_MMAP: s.MmapReq, Op.GEM_MUNMAP: s.MunmapReq,
    Op.GEM_FLINK: s.FlinkReq, Op.GEM_OPEN: s.OpenReq, Op.PRIME_HANDLE_TO_FD: s.ExportReq,
    Op.PRIME_FD_TO_HANDLE: s.ImportReq, Op.PRIME_MAP_TO_FD: s.MapExportReq, Op.GEM_MADVISE: s.MadviseReq,
    Op.GEM_PIN: s.HandleReq,
    Op.GEM_UNPIN: s.HandleReq, Op.GEM_EXECBUFFER: sx.ExecbufferReq, Op.GEM_BUSY: s.HandleReq,
    Op.GEM_WAIT: sx.WaitReq, Op.WAIT_FENCE: sx.WaitFenceReq, Op.GEM_SET_DOMAIN: sd.SetDomainReq,
    Op.GEM_SET_TILING: sd.TilingReq, Op.GEM_GET_TILING: s.HandleReq, Op.GEM_SET_CACHING: sd.CachingReq,
    Op.GEM_GET_CACHING: s.HandleReq, Op.SUSPEND: s.Empty, Op.RESUME: s.Empty, Op.GEM_USERPTR: s.UserptrReq,
    Op.STATS: s.Empty, Op.LIST_OBJECTS: s.Empty, Op.LIST_CLIENTS: s.Empty, Op.DEBUG_OPEN: s.HandleReq,
    Op.GEM_SHARE: ss.ShareReq, Op.GEM_CLAIM: ss.ClaimReq, Op.GEM_DROP_SHARES: ss.DropSharesReq,
    Op.GEM_CREATE_MAPPED: s.CreateReq, Op.GEM_CLAIM_MAPPED: ss.ClaimMappedReq,
    Op.GEM_SHARE_BATCH: ss.ShareBatchReq, Op.GEM_CLAIM_MAPPED_BATCH: ss.ClaimMappedBatchReq,
    Op.LOOKUP: LookupReq, Op.MAPPINGS_FORKED: s.Empty, Op.LAZY_CHANNEL: s.LazyChannelReq, Op.GEM_REUSE: s.ReuseReq,
}
REPLY: dict[int, type[s.Struct]] = {
    Op.GEM_CREATE: s.CreateReply, Op.GEM_INFO: s.InfoReply, Op.GEM_PREAD: s.PreadReply, Op.GEM_PWRITE: s.PwriteReply,
    Op.GEM_MMAP: s.MmapReply, Op.GEM_FLINK: s.FlinkReply, Op.GEM_OPEN: s.OpenReply,
    Op.PRIME_HANDLE_TO_FD: s.ExportReply, Op.PRIME_MAP_TO_FD: s.ExportReply, Op.PRIME_FD_TO_HANDLE: s.ImportReply,
    Op.GEM_MADVISE: s.MadviseReply,
    Op.GEM_EXECBUFFER: sx.FenceReply, Op.GEM_BUSY: sx.BusyReply, Op.GEM_WAIT: sx.WaitReply,
    Op.WAIT_FENCE: sx.WaitReply, Op.GEM_SET_TILING: sd.TilingReply, Op.GEM_GET_TILING: sd.TilingReply,
    Op.GEM_GET_CACHING: sd.CachingReply, Op.GEM_USERPTR: s.OpenReply, Op.STATS: s.JsonReply,
    Op.LIST_OBJECTS: s.JsonReply, Op.LIST_CLIENTS: s.JsonReply, Op.DEBUG_OPEN: s.OpenReply,
    Op.GEM_CLAIM: s.MmapReply, Op.GEM_CREATE_MAPPED: s.MmapReply,
    Op.LOOKUP: s.FlinkReply,
}
NEW_HANDLE_OPS = {Op.GEM_CREATE, Op.GEM_OPEN, Op.GEM_USERPTR, Op.DEBUG_OPEN, Op.PRIME_FD_TO_HANDLE}
UNKNOWN_OP = max(Op) + 1  # the lowest op number no request uses
HANDLE_OPS = [op for op, cls in REQ.items() if "handle" in cls._names and op != Op.DEBUG_OPEN]

U32 = 2**32 - 1
S64_MIN, S64_MAX = -(2**63), 2**63 - 1
HUGE = [2**46, 2**46 + 1, 2**63 - 1]  # sizes past the object limit, and the s64 maximum

F_SEAL_FUTURE_WRITE = 0x10
DAEMON_FLAGS = dict(vram="64M", system_budget="256M", pin_limit="16M", hang_timeout=1)

assert set(REQ) == {int(op) for op in Op} - {Op.HELLO}, "a new op needs a row in REQ and ALLOWED"
assert set(ALLOWED) == set(REQ)


@pytest.fixture(scope="module", autouse=True)
def _report() -> Iterator[None]:
    yield
    print(f"\ntest_fuzz_frames: hypothesis seed {SEED} (UGEM_FUZZ_SEED={SEED} replays it); "
          f"cases per test {dict(CASES)}; hostile frames by outcome {dict(FRAMES.most_common())}")


@pytest.fixture(autouse=True)
def _say_the_seed() -> None:
    """On each test's captured output, which pytest shows when it fails (CI's only record)."""
    print(f"test_fuzz_frames: UGEM_FUZZ_SEED={SEED} replays this run")


def _fuzz_settings(examples: int, shrink: bool = True) -> Callable[[Any], Any]:
    """`shrink` False for the cases against one daemon (`world`): a case that leaves the
    daemon wrong makes every later case fail too, so shrinking would report the simplest
    of those (and wait out each one's deadline), not the case that did it."""
    phases = list(Phase) if shrink else [Phase.explicit, Phase.reuse, Phase.generate]

    def wrap(fn: Any) -> Any:
        return seed(SEED)(settings(max_examples=examples, deadline=None, database=None, print_blob=True,
                                   phases=phases,
                                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])(fn))
    return wrap


# ===================================================================== in-process codec

def _pipe_fds(n: int) -> list[OwnedFd]:
    fds = []
    for _ in range(n):
        r, w = os.pipe2(os.O_CLOEXEC)
        os.close(w)
        fds.append(OwnedFd(r))
    return fds


def _open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@dataclass
class _Sent:
    op: int
    seq: int
    payload: bytes
    nfds: int


_sent_frames = st.lists(st.builds(
    _Sent,
    op=st.integers(0, 0xFFFF),
    seq=st.integers(0, U32),
    payload=st.one_of(st.binary(max_size=40), st.integers(0, 1200).map(lambda n: bytes(i % 251 for i in range(n)))),
    nfds=st.sampled_from([0, 0, 0, 1, 2, MAX_FDS]),
), min_size=1, max_size=8)


@_fuzz_settings(200)
@given(frames=_sent_frames, data=st.data())
def test_parser_delivers_any_valid_stream_under_any_chunking(frames: list[_Sent], data: st.DataObject) -> None:
    """The kernel's view of a sender doing one sendmsg per frame that carries fds (the fds
    travel with the frame's first bytes) and coalescing the rest: a read stops at the end of
    the skb that carried fds; a read starting between frames may hold several frames; a read
    starting inside a frame never asks past its end. Every frame comes out whole, in order,
    with exactly its own fds, whatever the chunking."""
    CASES["codec: valid streams"] += 1
    before = _open_fd_count()
    stream = b"".join(encode_header(len(f.payload), f.op, f.nfds, FrameKind.REQUEST, f.seq) + f.payload for f in frames)
    starts, pos = [], 0
    for f in frames:
        starts.append(pos)
        pos += HEADER.size + len(f.payload)
    # where each fd-carrying frame's first skb ends (the sender's message may be split)
    skb_end = {i: starts[i] + data.draw(st.integers(1, HEADER.size + len(f.payload)), label=f"skb{i}")
               for i, f in enumerate(frames) if f.nfds}
    sent_fds = [_pipe_fds(f.nfds) for f in frames]  # (after the draws above: a draw may end the example)
    parser = FrameParser(FrameKind.REQUEST)
    got = []
    pos = 0
    try:
        while pos < len(stream):
            limit = parser.bytes_desired(data.draw(st.sampled_from([HEADER.size, 64, 16384]), label="between"))
            most = min(limit, len(stream) - pos)  # a whole read, or a short one (any size)
            n = data.draw(st.one_of(st.just(most), st.integers(1, most)), label="read")
            chunk_fds: list[OwnedFd] = []
            for i, end in skb_end.items():  # the first fd-carrying frame starting in the read ends it
                if pos <= starts[i] < pos + n:
                    n = min(n, end - pos)
                    chunk_fds = sent_fds[i]
                    break
            parser.feed(stream[pos:pos + n], chunk_fds)
            pos += n
            while (frame := parser.next_frame()) is not None:
                got.append(frame)
        assert not parser.mid_frame
        assert [(g.op, g.seq, g.payload) for g in got] == [(f.op, f.seq, f.payload) for f in frames]
        for g, fds in zip(got, sent_fds, strict=True):
            assert g.fds == fds, "fds were matched to the wrong frame"
    finally:
        for frame in got:
            frame.close_fds()
        for fds in sent_fds:
            for fd in fds:
                fd.close()
        parser.close()
    assert _open_fd_count() <= before  # none of its own left open (others may close theirs meanwhile: gc)


_garbage_chunks = st.lists(st.tuples(
    st.one_of(st.binary(min_size=1, max_size=64),
              st.builds(lambda ln, op, nfds, kind, seq, status, tail: encode_header(ln, op, nfds, kind, seq, status)
                        + tail,
                        st.sampled_from([0, 1, 8, 16, 100, MAX_PAYLOAD, MAX_PAYLOAD + 1, U32]),
                        st.integers(0, 0xFFFF), st.integers(0, 255), st.sampled_from([0, 0, 0, 1, 2, 255]),
                        st.integers(0, U32), st.sampled_from([0, 0, 0, 1, -1, 2**31 - 1]),
                        st.binary(max_size=24))),
    st.integers(0, MAX_FDS + 2)), min_size=1, max_size=10)


@_fuzz_settings(300)
@given(chunks=_garbage_chunks, honour_desired=st.booleans())
def test_parser_on_arbitrary_chunks_gives_frames_or_protocol_error(chunks: list[tuple[bytes, int]],
                                                                   honour_desired: bool) -> None:
    """Arbitrary bytes and fds in arbitrary chunks: only frames or RemoteProtocolError come
    out, and every fd is either in a delivered frame or closed by the parser."""
    CASES["codec: arbitrary chunks"] += 1
    before = _open_fd_count()
    parser = FrameParser(FrameKind.REQUEST)
    delivered: list[Any] = []
    given_fds: list[OwnedFd] = []
    outcome = "ok"
    try:
        for data, nfds in chunks:
            if honour_desired:  # as the daemon reads: never past the end of a frame in progress
                data = data[:parser.bytes_desired(16384)]
            fds = _pipe_fds(nfds)
            given_fds += fds
            parser.feed(data, fds)
            while (frame := parser.next_frame()) is not None:
                assert frame.kind == FrameKind.REQUEST and frame.status == 0
                assert len(frame.payload) <= MAX_PAYLOAD
                assert len(frame.fds) <= MAX_FDS
                delivered.append(frame)
    except RemoteProtocolError:
        outcome = "protocol error"
        assert not parser.mid_frame and not parser.has_frames, "a failed parser keeps nothing"
    held = {id(fd) for frame in delivered for fd in frame.fds}
    if outcome != "ok":
        leaked = [fd for fd in given_fds if not fd.closed and id(fd) not in held]
        assert not leaked, f"the parser left fds open after an error: {leaked}"
    for frame in delivered:
        frame.close_fds()
    parser.close()  # fds of a partial frame
    assert all(fd.closed for fd in given_fds)
    assert _open_fd_count() <= before  # none of its own left open (others may close theirs meanwhile: gc)


@_fuzz_settings(200)
@given(frames=_sent_frames, edit=st.tuples(st.integers(0, 10**6), st.integers(0, 255),
                                            st.sampled_from(["flip", "insert", "delete"])),
       data=st.data())
def test_parser_on_a_mutated_valid_stream(frames: list[_Sent], edit: tuple[int, int, str], data: st.DataObject) -> None:
    CASES["codec: mutated streams"] += 1
    stream = bytearray(b"".join(encode_header(len(f.payload), f.op, 0, FrameKind.REQUEST, f.seq) + f.payload
                                for f in frames))
    at, byte, how = edit
    at %= len(stream)
    if how == "flip":
        stream[at] ^= byte or 1
    elif how == "insert":
        stream[at:at] = bytes([byte])
    else:
        del stream[at]
    parser = FrameParser(FrameKind.REQUEST)
    pos = 0
    try:
        while pos < len(stream):
            n = data.draw(st.integers(1, parser.bytes_desired(16384)))
            parser.feed(bytes(stream[pos:pos + n]), [])
            pos += n
            while (frame := parser.next_frame()) is not None:
                assert len(frame.payload) <= MAX_PAYLOAD
    except RemoteProtocolError:
        pass
    finally:
        parser.close()


_ALL_STRUCTS = sorted({*REQ.values(), *REPLY.values(), s.HelloReq, s.HelloReply, s.Empty, s.PwriteReply,
                       s.PreadReply, s.ExportReply}, key=lambda c: c.__name__)


@_fuzz_settings(400)
@given(cls=st.sampled_from(_ALL_STRUCTS), payload=st.binary(max_size=120), nfds=st.integers(0, 2))
def test_decode_gives_a_struct_or_einval(cls: type[s.Struct], payload: bytes, nfds: int) -> None:
    """structs.decode / check / decode_commands on arbitrary bytes: a struct or EINVAL,
    never another exception; a decoded struct owns its fds (close_unclaimed closes them),
    and a fixed-layout struct re-encodes to the bytes it came from."""
    CASES["codec: decode"] += 1
    fds = _pipe_fds(nfds)
    try:
        try:
            msg = s.decode(cls, payload, list(fds))
        except InvalidArgument as exc:
            assert exc.errno == errno.EINVAL
            return
        try:
            msg.check()
        except InvalidArgument as exc:
            assert exc.errno == errno.EINVAL
        size = struct.calcsize("<" + "".join(code for _, code in cls.LAYOUT))
        assert [getattr(msg, name) for name in cls.FDS][:nfds] == fds[:len(cls.FDS)]
        if cls.TAIL is None and not cls.FDS and len(payload) == size:
            assert b"".join(bytes(p) for p in s.encode(msg)[0]) == payload
        if cls.TAIL is None:
            assert len(payload) <= size
        if cls is sx.ExecbufferReq:
            try:
                cmds = decode_commands(bytes(msg.data))
            except InvalidArgument:
                pass
            else:
                assert len(cmds) * RECORD.size == len(msg.data)
        msg.close_unclaimed()
        assert all(fd.closed for fd in fds)
    finally:
        for fd in fds:  # on EINVAL the caller (Connection) closes them; closing twice is harmless
            fd.close()


# ======================================================================== the daemon

@dataclass
class World:
    """A fuzzed daemon and its bystanders: `victim` holds objects (one of them mapped, one
    pinned) whose contents must never change; `donor` exports an object whose fds the fuzz
    imports (the donor's contents are fair game)."""

    daemon: DaemonProcess
    victim: Any
    contents: dict[int, bytes]
    view: memoryview
    donor: Any
    donor_handle: int
    baseline: int
    tmpdir: str

    def check(self, kit: Any, what: str) -> None:
        replay = f"UGEM_FUZZ_SEED={SEED} replays this run"  # (CI's output must say how to replay it)
        assert self.daemon.proc.poll() is None, \
            f"daemon died after {what} ({replay}):\n{self.daemon.stderr_text()[-4000:]}"
        try:
            kit.wait_fd_count(self.daemon, self.baseline)
        except AssertionError as exc:
            raise AssertionError(f"after {what} ({replay}): {exc}") from None
        t0 = time.perf_counter()
        stats = self.victim.stats()
        assert time.perf_counter() - t0 < PROMPT_S, f"after {what}: a bystander waited {time.perf_counter() - t0:.2f} s"
        assert stats["clients"] == 2 and stats["objects"] == len(self.contents) + 1, (what, stats)
        for handle, data in self.contents.items():
            assert self.victim.pread(handle, 0, len(data)) == data, f"victim object {handle} changed after {what}"
        assert bytes(self.view[:len(self.contents[1])]) == self.contents[1], f"victim mapping changed after {what}"


@pytest.fixture
def world(kit: Any) -> Iterator[World]:
    with run_daemon(env={**os.environ, **kit.WARNINGS_ENV}, **DAEMON_FLAGS) as daemon, \
            tempfile.TemporaryDirectory(prefix="ugem-fuzz-") as tmpdir, \
            daemon.connect() as victim, daemon.connect() as donor:
        rng = random.Random(SEED)
        contents = {}
        for i in range(8):  # handles 1..8: "another client's handles" for the fuzzed one
            handle = victim.create(4096 * (1 + i % 3))
            contents[handle] = rng.randbytes(4096 * (1 + i % 3))
            victim.pwrite(handle, 0, contents[handle])
        view = victim.mmap(1)
        victim.pin(2)
        donor_handle = donor.create(8192)
        donor.pwrite(donor_handle, 0, b"donor")
        w = World(daemon, victim, contents, view, donor, donor_handle, daemon.fd_count(), tmpdir)
        try:
            w.check(kit, "setup")
            yield w
            w.check(kit, "the last case")
            kit.assert_no_leak_warnings(daemon)
        finally:
            view.release()


# -- fds of every kind ---------------------------------------------------------------

FD_KINDS = [
    "pipe", "socket", "dir", "file", "devnull", "eventfd", "memfd", "memfd-grow-sealed", "memfd-shrink-0",
    "memfd-shrink-100", "memfd-shrink-4096", "memfd-shrink-12288", "memfd-all-seals", "memfd-rdonly",
    "memfd-wronly", "export-rw", "export-ro",
]
# Left out: memfds sealed with F_SEAL_WRITE / F_SEAL_FUTURE_WRITE (a fixed bug: they were taken
# as writable memory; the regression tests at the end of this module cover them).


@dataclass
class MadeFd:
    fd: int
    kind: str
    acceptable: bool  # import would take it (SPEC §6)
    size: int = 0
    readonly: bool = False
    tracer: int = -1  # read end of a pipe whose write end is `fd`

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


def _memfd(size: int, seals: int) -> int:
    fd = os.memfd_create("fuzz", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def make_fd(kind: str, world: World, stack: ExitStack) -> MadeFd:
    """Make an fd of `kind`; `stack` closes our copies at the end of the case."""
    made = _make_fd(kind, world, stack)
    stack.callback(made.close)
    return made


def _make_fd(kind: str, world: World, stack: ExitStack) -> MadeFd:
    shrink = fcntl.F_SEAL_SHRINK
    if kind == "pipe":
        r, w = os.pipe2(os.O_CLOEXEC)
        stack.callback(os.close, r)
        return MadeFd(w, kind, False, tracer=r)
    if kind == "socket":
        a, b = socket.socketpair()
        stack.callback(b.close)
        return MadeFd(a.detach(), kind, False)
    if kind == "dir":
        return MadeFd(os.open(world.tmpdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), kind, False)
    if kind == "file":
        made = MadeFd(os.open(world.tmpdir, os.O_RDWR | os.O_TMPFILE | os.O_CLOEXEC, 0o600), kind, False)
        os.ftruncate(made.fd, 8192)
        return made
    if kind == "devnull":
        return MadeFd(os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC), kind, False)
    if kind == "eventfd":
        return MadeFd(os.eventfd(0, os.EFD_CLOEXEC), kind, False)
    if kind == "memfd":
        return MadeFd(_memfd(8192, 0), kind, False, 8192)
    if kind == "memfd-grow-sealed":
        return MadeFd(_memfd(8192, fcntl.F_SEAL_GROW), kind, False, 8192)
    if kind.startswith("memfd-shrink-"):
        size = int(kind.rsplit("-", 1)[1])
        return MadeFd(_memfd(size, shrink), kind, size > 0 and size % 4096 == 0, size)
    if kind == "memfd-all-seals":
        return MadeFd(_memfd(8192, shrink | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL), kind, True, 8192)
    if kind in ("memfd-rdonly", "memfd-wronly"):
        base = _memfd(8192, shrink)
        try:
            mode = os.O_RDONLY if kind == "memfd-rdonly" else os.O_WRONLY
            fd = os.open(f"/proc/self/fd/{base}", mode | os.O_CLOEXEC)
        finally:
            os.close(base)
        return MadeFd(fd, kind, kind == "memfd-rdonly", 8192, readonly=kind == "memfd-rdonly")
    if kind in ("export-rw", "export-ro"):
        try:
            fd = world.donor.export(world.donor_handle, writable=kind == "export-rw")
        except Busy:  # a hostile frame that imported it pinned it in device memory: the donor gives up on it
            world.donor.close_handle(world.donor_handle)  # (freed with the importer's handle: the fd count holds)
            world.donor_handle = world.donor.create(8192)
            world.donor.pwrite(world.donor_handle, 0, b"donor")
            fd = world.donor.export(world.donor_handle, writable=kind == "export-rw")
        return MadeFd(fd, kind, True, 8192, readonly=kind == "export-ro")
    raise AssertionError(kind)


# -- hostile values --------------------------------------------------------------------

S64_VALUES = [0, 0, 1, 7, 4095, 4096, 4097, 65536, 2**20 - 1, 2**20, 2**20 + 1, *HUGE, -1, -4096, S64_MIN]
SIZE_VALUES = [S64_MIN, -1, 0, 1, 4095, 4096, 4097, 8192, 65536, 2**20, *HUGE]
U32_VALUES = [0, 1, 2, 3, 4, 2**31 - 1, 2**31, U32]


def _s64() -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from(S64_VALUES), st.integers(S64_MIN, S64_MAX), st.integers(0, 3 * 4096))


def _u32() -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from(U32_VALUES), st.integers(0, U32))


def _pad() -> st.SearchStrategy[int]:
    return st.one_of(st.just(0), st.just(0), st.just(0), st.just(0), st.sampled_from([1, 0x100, 2**31, U32]))


@dataclass
class Conn:
    """The fuzzed client's side: its socket and what it must hold."""

    raw: Any
    handles: set[int] = field(default_factory=set)
    sentinel: int = 0
    sentinel_data: bytes = b""
    share_tokens: int = 0  # at most this many shares made (tokens 1, 2, ...: each is the previous plus one)

    def lowest_free(self) -> int:
        h = 1
        while h in self.handles:
            h += 1
        return h


HANDLE_CLASSES = ["ours"] * 6 + ["zero", "max", "2**31", "never", "theirs", "theirs", "any"]


def _handle(conn: Conn, world: World) -> st.SearchStrategy[int]:
    """A handle of some class, resolved against the connection's state when drawn (so the
    choices hypothesis makes do not depend on that state). Never the sentinel."""
    def resolve(choice: tuple[str, int, int]) -> int:
        kind, index, value = choice
        ours = sorted(conn.handles - {conn.sentinel})
        theirs = [h for h in world.contents if h not in conn.handles]
        if kind == "ours" and ours:
            return ours[index % len(ours)]
        if kind == "theirs" and theirs:
            return theirs[index % len(theirs)]
        if kind == "any" and value != conn.sentinel:
            return value
        return {"zero": 0, "max": U32, "2**31": 2**31}.get(kind, 4242)

    return st.tuples(st.sampled_from(HANDLE_CLASSES), st.integers(0, 7), st.integers(0, U32)).map(resolve)


def _commands(conn: Conn, world: World) -> st.SearchStrategy[bytes]:
    used = {1: 3, 2: 3, 3: 9, 4: 2}
    handles = _handle(conn, world)
    own = st.integers(0, 7).map(lambda i: sorted(conn.handles - {conn.sentinel})[i % max(1, len(conn.handles) - 1)]
                                if len(conn.handles) > 1 else 4242)
    small = st.one_of(st.sampled_from([0, 1, 4, 16, 64, 512, 4096, 4097, 2**20, 2**31, -1, S64_MIN, S64_MAX]),
                      st.integers(0, 8192))

    @st.composite
    def record(draw: st.DrawFn) -> bytes:
        kind = draw(st.sampled_from([1, 1, 2, 2, 3, 4, 0, 5, U32]))
        pad = draw(_pad())
        h1 = draw(handles)
        h2 = draw(handles) if kind in (2, 3) or draw(st.integers(0, 9)) == 0 else 0
        n = used.get(kind, 0)
        params = [draw(small) for _ in range(n)] + [0] * (9 - n)
        if kind == 4:
            params[1] = draw(st.sampled_from([0, 0, 0, 1, U32]))  # SemaphoreWait value: hangs only ~hang_timeout
        if kind == 1 and draw(st.booleans()):
            params[2] = draw(st.sampled_from([0, 0x5A, 255, 256, -1]))  # Fill byte
        if draw(st.integers(0, 9)) == 0:
            params[8] = draw(small)  # a nonzero unused field (or a used one for Blit)
        return RECORD.pack(kind, pad, h1, h2, *params)

    @st.composite
    def sane(draw: st.DrawFn) -> bytes:  # in range for most objects: reaches EFAULT/EACCES/ENOSPC and the device
        kind = draw(st.sampled_from([1, 2]))
        h1, h2 = draw(own), draw(own) if kind == 2 else 0
        offset, length = draw(st.integers(0, 4096)), draw(st.integers(1, 4096))
        params = [offset, length, draw(st.integers(0, 255))] if kind == 1 else [offset, draw(st.integers(0, 4096)),
                                                                               length]
        return RECORD.pack(kind, 0, h1, h2, *params, *[0] * 6)

    lists = st.lists(st.one_of(sane(), record()), min_size=1, max_size=3).map(b"".join)
    torn = st.binary(min_size=1, max_size=100)
    return st.sampled_from([0, 0, 0, 0, 1, 2]).flatmap(lambda i: (lists, st.just(b""), torn)[i])


def _field(name: str, code: str, op: int, cls: type[s.Struct], conn: Conn, world: World) -> st.SearchStrategy[Any]:
    if name == "handle":
        if op == Op.DEBUG_OPEN:  # by object id, privileged: only ids that name no object (any
            return st.sampled_from([0, 2**31, U32])  # live id would hand us the victim's objects)
        return _handle(conn, world)
    if name.startswith("pad"):
        return st.just(0)  # (nonzero: a mutation of its own in hostile_frames)
    if name == "flags":
        return st.sampled_from(sorted({f & cls.FLAGS for f in range(cls.FLAGS + 1)}))
    if name == "size":
        return st.one_of(st.sampled_from(SIZE_VALUES), st.integers(1, 3 * 4096))
    if name == "advice":
        return st.sampled_from([0, 1, 1, 2, U32])
    if name in ("read_domains", "write_domain"):
        return st.sampled_from([0, 1, 1, 2, 2, 3, 4, 2**31, U32])
    if name == "mode":
        return st.sampled_from([0, 1, 2, 3, U32])
    if name == "stride":
        return st.sampled_from([0, 1, 128, 512, 4096, 256 << 10, (256 << 10) + 512, U32])
    if name == "level":  # not CACHED (1): device writes into it need room (regression test below), which
        return st.sampled_from([0, 2, 3, U32])  # would make the per-op errno oracle depend on the budget
    if name == "timeout_ns":
        return st.sampled_from([0, 0, 1, 1000, -1, S64_MIN, S64_MAX])
    if name == "fence":
        return st.one_of(st.sampled_from([0, 1, 2, 2**63, 2**64 - 1]), st.integers(0, 50))
    if code == "q":
        return _s64()
    if code == "Q":
        return st.sampled_from([0, 1, 2**46 + 1, 2**63 - 1, 2**63, 2**64 - 1])
    if code == "I":
        return _u32()
    raise AssertionError((name, code))


# -- one hostile frame ---------------------------------------------------------------

@dataclass
class Hostile:
    op: int
    payload: bytes
    fds: list[MadeFd]
    nfds: int
    drop: bool = False  # a framing violation: the connection must be dropped
    exact: int | None = None  # the errno the reply must carry (None: success or one of ALLOWED[op])
    why: str = ""
    values: dict[str, Any] = field(default_factory=dict)  # the fields the daemon sees


def _layout(cls: type[s.Struct]) -> struct.Struct:
    return struct.Struct("<" + "".join(code for _, code in cls.LAYOUT))


def _effective(cls: type[s.Struct], payload: bytes) -> tuple[dict[str, Any], str | None]:
    """The fields the daemon decodes (short payloads are zero-extended) and, if the struct
    rules alone make it EINVAL, why."""
    layout = _layout(cls)
    values = dict(zip([n for n, _ in cls.LAYOUT], layout.unpack(payload[:layout.size].ljust(layout.size, b"\0")),
                      strict=True))
    if cls.TAIL is not None:
        values[cls.TAIL] = payload[layout.size:]
    elif len(payload) > layout.size:
        return values, f"{len(payload)} payload bytes for a {layout.size}-byte struct"
    for name, value in values.items():
        if name.startswith("pad") and value:
            return values, f"nonzero {name}"
    if values.get("flags", 0) & ~cls.FLAGS:
        return values, "unknown flags"
    return values, None


@st.composite
def hostile_frames(draw: st.DrawFn, conn: Conn, world: World, stack: ExitStack) -> Hostile:
    shape = draw(st.sampled_from(["fields"] * 6 + ["unknown-op", "fd-mismatch", "fd-kind", "fd-kind"]))
    if shape == "unknown-op":
        op = draw(st.one_of(st.sampled_from([Op.HELLO, UNKNOWN_OP, UNKNOWN_OP + 1, 0x7FFF, 0xFFFF]),
                            st.integers(UNKNOWN_OP, 0xFFFF)))
        return Hostile(op, draw(st.binary(max_size=64)), [], 0, exact=errno.EINVAL, why="unknown op")
    if shape == "fd-mismatch":  # fds that the header or the op does not account for
        op = draw(st.one_of(st.sampled_from(sorted(REQ)), st.integers(UNKNOWN_OP, 0xFFFF)))
        expected = len(REQ[op].FDS) if op in REQ else 0
        attached = draw(st.integers(0, 3))
        nfds = draw(st.sampled_from([attached, 0, 1, 2, MAX_FDS, 255]))
        if nfds == attached == expected:
            attached += 1
        kinds = [draw(st.sampled_from(FD_KINDS)) for _ in range(attached)]
        fds = [make_fd(kind, world, stack) for kind in kinds]
        payload = b"".join(bytes(p) for p in s.encode(REQ[op]())[0]) if op in REQ else b""
        return Hostile(op, payload, fds, nfds, drop=True,
                       why=f"{attached} fds attached, header says {nfds}, op takes {expected}")
    if shape == "fd-kind":
        op = draw(st.sampled_from([Op.PRIME_FD_TO_HANDLE, Op.GEM_USERPTR]))
    else:
        op = draw(st.sampled_from([o for o in sorted(REQ) if o != Op.SUSPEND]
                                  + [Op.GEM_PREAD, Op.GEM_PWRITE, Op.GEM_MMAP, Op.PRIME_HANDLE_TO_FD, Op.GEM_PIN,
                                     Op.GEM_SET_DOMAIN] + [Op.GEM_EXECBUFFER] * 5))
    cls = REQ[op]
    values = {name: draw(_field(name, code, op, cls, conn, world), label=name) for name, code in cls.LAYOUT}
    if cls is s.UserptrReq and draw(st.booleans()):  # mostly sane ranges, to reach the fd checks
        values["offset"], values["length"] = draw(st.sampled_from([(0, 4096), (0, 8192), (4096, 4096), (0, 12288)]))
    # at most one violation of the struct rules per frame, so that most frames reach the handler
    mutation = draw(st.sampled_from(["none"] * 8 + ["pad", "flags", "short", "long"]), label="mutation")
    pads = [name for name in values if name.startswith("pad")]
    if mutation == "pad" and pads:
        values[draw(st.sampled_from(pads))] = draw(st.sampled_from([1, 0x100, 2**31, U32]))
    if mutation == "flags" and "flags" in values:
        values["flags"] |= draw(st.sampled_from([b for b in (1 << i for i in range(32)) if not b & cls.FLAGS]))
    tail = b""
    if cls is s.PwriteReq:
        length = values["length"]
        tail = draw(st.one_of(st.just(b""), st.binary(max_size=64),
                              st.just(bytes(range(256)) * 16).map(lambda b: b[:length] if 0 <= length <= 4096 else b)))
    elif cls is s.CloseBatchReq:  # never the sentinel (the probes need it), nor a list "long" could extend
        handle_lists = st.lists(_handle(conn, world), max_size=4).map(lambda hs: struct.pack(f"<{len(hs)}I", *hs))
        tail = draw(st.one_of(handle_lists, st.binary(max_size=10).filter(lambda b: len(b) % 4 != 0)))
        mutation = "none" if mutation == "long" else mutation
    elif cls is s.MunmapReq:
        tail = draw(st.one_of(st.lists(st.sampled_from([0, 1, 2, 3, U32]), max_size=4).map(
            lambda ids: struct.pack(f"<{len(ids)}I", *ids)), st.binary(max_size=10)))
    elif cls is sx.ExecbufferReq:
        tail = draw(_commands(conn, world))
    elif cls in (ss.ShareBatchReq, ss.ClaimMappedBatchReq):
        tail = draw(_batch_records(cls))
    payload = _layout(cls).pack(*values.values()) + tail
    if mutation == "short" and payload:
        payload = payload[:draw(st.integers(0, len(payload) - 1))]
    elif mutation == "long":
        payload += draw(st.binary(min_size=1, max_size=16))
    if op == Op.SUSPEND or (op == Op.RESUME and not payload):  # never actually suspend the daemon
        payload += b"\x01"
    fds = [make_fd(draw(st.sampled_from(FD_KINDS)), world, stack)] if cls.FDS else []
    effective, einval = _effective(cls, payload)
    hostile = Hostile(op, payload, fds, len(fds), exact=errno.EINVAL if einval else None,
                      why=einval or f"{Op(op).name} {effective}", values=effective)
    if hostile.exact is None and fds:
        hostile.exact = _fd_outcome(cls, effective, fds[0])
    return hostile


def _batch_records(cls: type[s.Struct]) -> st.SearchStrategy[bytes]:
    """Records of a share or claim batch with hostile fields (mostly known flags, so that
    most lists reach the records), or bytes that are no whole number of records."""
    ids, u64s = st.sampled_from([0, 1, 2, ss.CHOSEN_MAP_IDS, ss.CHOSEN_MAP_IDS + 1, U32]), st.sampled_from(
        [0, 1, 2, 3, 2**63 - 1, 2**64 - 1])
    flags = st.sampled_from([0, 1, 1, 0, 2, 0x100, U32])
    if cls is ss.ShareBatchReq:
        offsets = st.sampled_from([0, 4096, -4096, 1, 2**62])
        record = st.tuples(ids, flags, offsets, st.sampled_from([4096, 0, -1, 8192, 2**62]), u64s).map(
            lambda r: ss.SHARE_BATCH_RECORD.pack(*r))
        size = ss.SHARE_BATCH_RECORD.size
    else:
        record = st.tuples(u64s, u64s, flags, ids, u64s, u64s).map(lambda r: ss.CLAIM_BATCH_RECORD.pack(*r))
        size = ss.CLAIM_BATCH_RECORD.size
    return st.one_of(st.lists(record, max_size=4).map(b"".join),
                     st.binary(max_size=2 * size).filter(lambda b: len(b) % size != 0))


def _fd_outcome(cls: type[s.Struct], values: dict[str, Any], made: MadeFd) -> int | None:
    """The exact result of an import or userptr with valid fields (SPEC §2, §6); 0 = success.
    (A lazy channel: None, success or EINVAL: a socket of the wrong kind, or a second one.)"""
    if cls is s.LazyChannelReq:
        return None
    if cls is s.ImportReq:
        return 0 if made.acceptable else errno.EINVAL
    offset, length = values["offset"], values["length"]
    if offset < 0 or length <= 0 or offset % 4096 or length % 4096:
        return errno.EINVAL
    if not made.kind.startswith(("memfd-shrink-", "memfd-all-seals", "memfd-rdonly", "export-")):
        return errno.EINVAL  # not a memfd sealed against shrinking (or write-only)
    if offset + length > made.size:
        return errno.EINVAL
    if made.readonly and not values["flags"] & s.READONLY:
        return errno.EACCES
    return 0


# -- running frames on a connection ------------------------------------------------------

def _send(conn: Conn, h: Hostile) -> int:
    conn.raw.seq += 1
    header = encode_header(len(h.payload), h.op, h.nfds, FrameKind.REQUEST, conn.raw.seq)
    conn.raw.send(header + h.payload, [m.fd for m in h.fds])
    return conn.raw.seq


def _check_success(conn: Conn, h: Hostile, reply: Any) -> None:
    cls = REPLY.get(h.op, s.Empty)
    size = _layout(cls).size
    if cls.TAIL is None:
        assert len(reply.payload) == size, (h.why, reply)
    else:
        assert len(reply.payload) >= size, (h.why, reply)
    assert reply.nfds <= len(cls.FDS), (h.why, reply)
    if h.op in (Op.GEM_MMAP, Op.GEM_CREATE_MAPPED) and h.values.get("flags", 0) & s.TAKES_FD:
        assert reply.nfds == 0, (h.why, reply)  # the client takes the daemon's own fd (server_fd)
        assert struct.unpack_from("<i", reply.payload, 24)[0] >= 0, (h.why, reply)
    elif h.op in (Op.GEM_MMAP, Op.PRIME_HANDLE_TO_FD, Op.PRIME_MAP_TO_FD, Op.GEM_CLAIM, Op.GEM_CREATE_MAPPED):
        assert reply.nfds == 1, (h.why, reply)
    if h.op in NEW_HANDLE_OPS:
        handle = struct.unpack_from("<I", reply.payload)[0]
        if h.op == Op.PRIME_FD_TO_HANDLE and handle in conn.handles:
            return  # re-import: the handle this client already holds
        assert handle == conn.lowest_free(), f"{h.why}: new handle {handle}, lowest free {conn.lowest_free()}"
        conn.handles.add(handle)
    elif h.op == Op.GEM_CLOSE:
        assert h.values["handle"] in conn.handles, f"closing handle {h.values['handle']} we do not hold succeeded"
        conn.handles.discard(h.values["handle"])
    elif h.op == Op.GEM_CLOSE_BATCH:
        conn.handles -= {handle for (handle,) in struct.iter_unpack("<I", h.payload)}  # the others are skipped


def run_hostile(conn: Conn, h: Hostile, world: World) -> bool:
    """Send one hostile frame and check the outcome; False when the connection was dropped."""
    before = world.daemon.fd_count() if h.fds else 0
    if h.op == Op.GEM_SHARE:
        conn.share_tokens += 1
    elif h.op == Op.GEM_SHARE_BATCH:
        conn.share_tokens += len(h.payload) // ss.SHARE_BATCH_RECORD.size
    seq = _send(conn, h)
    for made in h.fds:  # our copy of each fd: the daemon must hold none after answering
        made.close()
    if h.drop:
        conn.raw.assert_dropped()
        FRAMES["dropped (fd framing)"] += 1
        outcome = "dropped"
    else:
        try:
            reply = conn.raw.reply()
        except (ConnectionError, TimeoutError) as exc:
            raise AssertionError(f"no reply to a well-framed request ({h.why}): {exc!r}; "
                                 f"daemon log:\n{world.daemon.stderr_text()[-3000:]}") from None
        assert (reply.op, reply.seq, reply.kind) == (h.op, seq, FrameKind.REPLY), (h.why, reply)
        if reply.status:
            assert reply.nfds == 0 and reply.payload, (h.why, reply)
        if h.exact is not None:
            assert reply.status == h.exact, f"{h.why}: expected errno {h.exact}, got {reply}"
        elif reply.status:
            assert reply.status in ALLOWED.get(h.op, {errno.EINVAL}), \
                f"{h.why}: errno {reply.status} ({errno.errorcode.get(reply.status)}) is not allowed: {reply}"
        if reply.status == 0:
            _check_success(conn, h, reply)
        FRAMES[errno.errorcode.get(reply.status, str(reply.status)) if reply.status else "success"] += 1
        if os.environ.get("UGEM_FUZZ_DEBUG"):
            FRAMES[f"{Op(h.op).name if h.op in REQ else h.op}:{errno.errorcode.get(reply.status, 'ok')}"] += 1
        outcome = "error" if reply.status else "ok"
    for made in h.fds:
        if made.tracer >= 0:  # a pipe: EOF once the daemon closed its copy
            assert select_readable(made.tracer, 5) and os.read(made.tracer, 1) == b"", \
                f"{h.why}: the daemon kept a pipe it was sent ({outcome})"
    if h.fds and outcome == "error":  # a refused fd is closed at once, not with the connection
        deadline = time.monotonic() + SAFETY_S
        while world.daemon.fd_count() > before:  # (fewer: an earlier reply's fd closed just now)
            assert time.monotonic() < deadline, f"{h.why}: daemon fds {world.daemon.fd_count()} > {before} " \
                                                f"after refusing an fd"
            time.sleep(0.005)
    return outcome != "dropped"


def select_readable(fd: int, timeout: float) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def _call(conn: Conn, op: int, msg: s.Struct) -> Any:
    reply = conn.raw.call(op, msg)
    assert reply.status == 0, (Op(op).name, msg, reply)
    return reply


def probe(conn: Conn, kind: str, rng: random.Random) -> None:
    """A valid request after a hostile one: the connection must still serve it correctly."""
    if kind == "stats":
        conn.raw.assert_usable()
    elif kind == "sentinel":
        reply = _call(conn, Op.GEM_PREAD, s.PreadReq(handle=conn.sentinel, length=len(conn.sentinel_data)))
        assert reply.payload[8:] == conn.sentinel_data, "the fuzzed client's own object changed"
    elif kind in ("roundtrip", "fill"):
        handle = s.decode(s.CreateReply, _call(conn, Op.GEM_CREATE, s.CreateReq(size=8192)).payload, []).handle
        assert handle == conn.lowest_free(), (handle, conn.handles)
        conn.handles.add(handle)
        offset, data = rng.randrange(8192 - 100), rng.randbytes(100)
        _call(conn, Op.GEM_PWRITE, s.PwriteReq(handle=handle, offset=offset, length=100, data=data))
        expected = bytearray(8192)
        expected[offset:offset + 100] = data
        if kind == "fill":
            cmd = RECORD.pack(1, 0, handle, 0, 1000, 500, 0xA5, 0, 0, 0, 0, 0, 0)
            fence = s.decode(sx.FenceReply, _call(conn, Op.GEM_EXECBUFFER, sx.ExecbufferReq(data=cmd)).payload,
                             []).fence
            _call(conn, Op.WAIT_FENCE, sx.WaitFenceReq(fence=fence, timeout_ns=-1))
            expected[1000:1500] = b"\xa5" * 500
        reply = _call(conn, Op.GEM_PREAD, s.PreadReq(handle=handle, length=8192))
        assert reply.payload[8:] == expected, "a valid write/read round trip after hostile frames"
        _call(conn, Op.GEM_CLOSE, s.CloseReq(handle=handle))
        conn.handles.discard(handle)
    else:
        raise AssertionError(kind)


SETUP = ["create", "create", "dontneed", "willneed", "pin", "unpin", "busy", "device", "tiling", "flink", "mmap",
         "pwrite", "close"]


def setup_step(conn: Conn, kind: str, index: int, size: int) -> None:
    """A valid request that changes the fuzzed client's own objects (purged, pinned, busy,
    in VRAM, tiled, named, mapped) so that hostile frames meet them in every state."""
    ours = sorted(conn.handles - {conn.sentinel})
    if kind == "create" or not ours:
        reply = _call(conn, Op.GEM_CREATE, s.CreateReq(size=size))
        handle = s.decode(s.CreateReply, reply.payload, []).handle
        assert handle == conn.lowest_free(), (handle, conn.handles)
        conn.handles.add(handle)
        return
    handle = ours[index % len(ours)]
    op, msg = {
        "dontneed": (Op.GEM_MADVISE, s.MadviseReq(handle=handle, advice=ugem.DONTNEED)),
        "willneed": (Op.GEM_MADVISE, s.MadviseReq(handle=handle, advice=ugem.WILLNEED)),
        "pin": (Op.GEM_PIN, s.HandleReq(handle=handle)),
        "unpin": (Op.GEM_UNPIN, s.HandleReq(handle=handle)),
        "busy": (Op.GEM_EXECBUFFER, sx.ExecbufferReq(data=RECORD.pack(1, 0, handle, 0, 0, 4096, 0x77, *[0] * 6))),
        "device": (Op.GEM_SET_DOMAIN, sd.SetDomainReq(handle=handle, read_domains=ugem.DOMAIN_DEVICE)),
        "tiling": (Op.GEM_SET_TILING, sd.TilingReq(handle=handle, mode=ugem.TILING_X, stride=512)),
        "flink": (Op.GEM_FLINK, s.FlinkReq(handle=handle)),
        "mmap": (Op.GEM_MMAP, s.MmapReq(handle=handle, flags=s.WRITABLE | s.TO_END)),
        "pwrite": (Op.GEM_PWRITE, s.PwriteReq(handle=handle, offset=0, length=3, data=b"set")),
        "close": (Op.GEM_CLOSE, s.CloseReq(handle=handle)),
    }[kind]
    reply = conn.raw.call(op, msg)
    assert reply.status == 0 or reply.status in ALLOWED[op], (kind, reply)
    if kind == "close" and reply.status == 0:
        conn.handles.discard(handle)
    if kind == "unpin":
        assert reply.status in (0, errno.EINVAL), reply  # EINVAL: not pinned by us
    elif kind == "tiling":
        assert reply.status in (0, errno.ENXIO), reply  # ENXIO: an import or userptr of ours
    elif kind in ("willneed", "dontneed", "flink", "close"):
        assert reply.status == 0, (kind, reply)


def drop_shares(world: World, kit: Any, conn: Conn) -> None:
    """Drop what the fuzzed client shared and nobody claimed. Its shares outlive its
    connection: they pass to another client of the same process (the victim or the donor
    here), as an fd in flight outlives the socket it was sent on, until that process drops
    them or ends (core/share_table.py). The fuzzed client's process lives on (it is this
    one), so it drops them, from a new connection, as the client library would."""
    if not conn.share_tokens:
        return
    raw = kit.RawClient(world.daemon.path, timeout=10)
    try:
        raw.hello()
        for first in range(1, conn.share_tokens + 1, ss.MAX_DROPS):
            tokens = range(first, min(conn.share_tokens + 1, first + ss.MAX_DROPS))
            records = b"".join(ss.SHARE_RECORD.pack(conn.raw.client_id, token) for token in tokens)
            _call(Conn(raw), Op.GEM_DROP_SHARES, ss.DropSharesReq(records=records))
    finally:
        raw.close()


def open_conn(world: World, kit: Any, rng: random.Random) -> Conn:
    raw = kit.RawClient(world.daemon.path, timeout=10)
    raw.hello()
    conn = Conn(raw)
    conn.sentinel_data = rng.randbytes(8192)
    reply = _call(conn, Op.GEM_CREATE, s.CreateReq(size=8192))
    conn.sentinel = s.decode(s.CreateReply, reply.payload, []).handle
    conn.handles.add(conn.sentinel)
    _call(conn, Op.GEM_PWRITE, s.PwriteReq(handle=conn.sentinel, length=8192, data=conn.sentinel_data))
    return conn


# -- the tests -----------------------------------------------------------------------------

def test_hostile_frames_mixed_with_valid_requests(world: World, kit: Any) -> None:
    """Up to 3 objects, then up to 12 steps per connection: valid requests that put the client's own objects in every
    state, and hostile frames, each followed by a valid request that must still work."""

    @_fuzz_settings(400, shrink=False)
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        CASES["daemon: mixed connections"] += 1
        rng = random.Random(data.draw(st.integers(0, 2**32), label="rng"))
        with ExitStack() as stack:
            conn = open_conn(world, kit, rng)
            stack.callback(conn.raw.close)
            for _ in range(data.draw(st.integers(0, 3), label="objects")):
                setup_step(conn, "create", 0, data.draw(st.sampled_from([4096, 8192, 65536, 2**20, 2**46]),
                                                        label="size"))
            for _ in range(data.draw(st.integers(1, 12), label="steps")):
                if data.draw(st.integers(0, 9), label="setup?") < 4:
                    setup_step(conn, data.draw(st.sampled_from(SETUP), label="setup"), data.draw(st.integers(0, 7)),
                               data.draw(st.sampled_from([4096, 8192, 65536, 2**20, 2**46]), label="size"))
                    continue
                hostile = data.draw(hostile_frames(conn, world, stack))
                CASES["daemon: hostile frames"] += 1
                if not run_hostile(conn, hostile, world):
                    break
                probe(conn, data.draw(st.sampled_from(["stats", "sentinel", "roundtrip", "fill"]), label="probe"),
                      rng)
            else:
                probe(conn, "sentinel", rng)
        drop_shares(world, kit, conn)
        world.check(kit, "a fuzzed connection")

    run()


def test_a_share_left_by_a_fuzzed_connection_outlives_it_until_dropped(world: World, kit: Any) -> None:
    """The oracle's one exception to "the daemon holds exactly its fds again once a fuzzed
    connection is gone": a share nobody claimed passes to the victim or the donor (same
    process), keeping its object and memfd, until `drop_shares` drops it."""
    conn = open_conn(world, kit, random.Random(SEED))
    try:
        setup_step(conn, "create", 0, 4096)
        setup_step(conn, "mmap", 0, 4096)
        conn.share_tokens += 1
        _call(conn, Op.GEM_SHARE, ss.ShareReq(map_id=1, offset=0, length=4096, token=1))
    finally:
        conn.raw.close()
    kit.wait_until(lambda: world.victim.stats()["clients"] == 2, what="the fuzzed connection is gone")
    assert world.daemon.fd_count() == world.baseline + 1  # the shared object's memfd, now the heir's
    drop_shares(world, kit, conn)
    world.check(kit, "a dropped share")


def test_unknown_and_foreign_handles_get_their_exact_errno(world: World, kit: Any) -> None:
    """A handle that is 0, 2**32-1, never allocated, or held only by another client, in an
    otherwise valid request of any op that takes one: GEM_CLOSE says EINVAL, every other op
    ENOENT (SPEC §2), and the connection goes on."""
    rng = random.Random(SEED)
    conn = open_conn(world, kit, rng)  # holds handle 1 (the sentinel); the victim holds 1..8

    def request(op: int, handle: int) -> s.Struct:
        match op:
            case Op.GEM_PREAD:
                return s.PreadReq(handle=handle, offset=0, length=8)
            case Op.GEM_PWRITE:
                return s.PwriteReq(handle=handle, offset=0, length=4, data=b"evil")
            case Op.GEM_MMAP:
                return s.MmapReq(handle=handle, flags=s.WRITABLE, length=4096)
            case Op.PRIME_HANDLE_TO_FD:
                return s.ExportReq(handle=handle, flags=s.WRITABLE)
            case Op.GEM_MADVISE:
                return s.MadviseReq(handle=handle, advice=ugem.DONTNEED)
            case Op.GEM_WAIT:
                return sx.WaitReq(handle=handle, timeout_ns=0)
            case Op.GEM_SET_DOMAIN:
                return sd.SetDomainReq(handle=handle, read_domains=ugem.DOMAIN_CPU, write_domain=ugem.DOMAIN_CPU)
            case Op.GEM_SET_TILING:
                return sd.TilingReq(handle=handle, mode=ugem.TILING_X, stride=512)
            case Op.GEM_SET_CACHING:
                return sd.CachingReq(handle=handle, level=ugem.CACHING_NONE)
            case Op.GEM_EXECBUFFER:  # a valid Copy from the sentinel into `handle`, or the other way
                src, dst = (conn.sentinel, handle) if handle % 2 else (handle, conn.sentinel)
                return sx.ExecbufferReq(data=RECORD.pack(2, 0, src, dst, 0, 0, 16, *[0] * 6))
        return REQ[op](handle=handle)

    @_fuzz_settings(250, shrink=False)
    @given(op=st.sampled_from(HANDLE_OPS + [Op.GEM_EXECBUFFER]),
           handle=st.one_of(st.sampled_from([0, U32, 2**31, 2, 3, 8]), st.integers(2, U32)))
    def run(op: int, handle: int) -> None:
        CASES["daemon: unknown handles"] += 1
        reply = conn.raw.call(op, request(op, handle))
        assert reply.status == (errno.EINVAL if op == Op.GEM_CLOSE else errno.ENOENT), (Op(op).name, handle, reply)

    run()
    probe(conn, "sentinel", rng)
    probe(conn, "fill", rng)
    conn.raw.close()
    world.check(kit, "unknown handles")


def test_fds_of_every_kind(world: World, kit: Any) -> None:
    """import and userptr with one fd of each kind and valid fields: exactly what SPEC §6
    says (EINVAL unless a memfd sealed against shrinking; EACCES for a writable userptr of a
    read-only fd), each refused fd closed at once, and the import usable when it succeeds."""
    rng = random.Random(SEED)

    @_fuzz_settings(90, shrink=False)
    @given(kind=st.sampled_from(FD_KINDS), op=st.sampled_from([Op.PRIME_FD_TO_HANDLE, Op.GEM_USERPTR]),
           readonly=st.booleans(), rng_range=st.sampled_from([(0, 4096), (0, 8192), (4096, 4096), (0, 12288)]))
    def run(kind: str, op: int, readonly: bool, rng_range: tuple[int, int]) -> None:
        CASES["daemon: fd kinds"] += 1
        with ExitStack() as stack:
            conn = open_conn(world, kit, rng)
            stack.callback(conn.raw.close)
            made = make_fd(kind, world, stack)
            if op == Op.PRIME_FD_TO_HANDLE:
                msg: s.Struct = s.ImportReq()
            else:
                msg = s.UserptrReq(flags=s.READONLY if readonly else 0, offset=rng_range[0], length=rng_range[1])
            payload = b"".join(bytes(p) for p in s.encode(msg)[0])
            values, _ = _effective(REQ[op], payload)
            h = Hostile(op, payload, [made], 1, exact=_fd_outcome(REQ[op], values, made), why=f"{Op(op).name} {kind}",
                        values=values)
            assert run_hostile(conn, h, world)
            if h.exact == 0:  # the new object works: read it back, and the bystanders are intact
                handle = max(conn.handles)
                reply = conn.raw.call(Op.GEM_PREAD, s.PreadReq(handle=handle, length=5))
                if op == Op.GEM_USERPTR:
                    assert reply.status == errno.EINVAL, reply  # pread of userptr: EINVAL (SPEC §2)
                else:
                    assert reply.status == 0, reply
                    assert reply.payload[8:] == (b"donor" if kind.startswith("export") else bytes(5)), reply
            probe(conn, "fill", rng)
        world.check(kit, f"an fd of kind {kind}")

    run()


# ================================================================ regressions: bugs this fuzzer found

def _write_sealed_memfd(seal: int) -> int:
    fd = os.memfd_create("sealed", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 8192)
    os.pwrite(fd, b"sealed", 0)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | seal)
    return fd


@pytest.mark.parametrize("seal", [fcntl.F_SEAL_WRITE, F_SEAL_FUTURE_WRITE], ids=["F_SEAL_WRITE", "F_SEAL_FUTURE_WRITE"])
def test_bug_write_sealed_memfd_import(daemon: DaemonProcess, seal: int) -> None:
    fd = _write_sealed_memfd(seal)
    try:
        with daemon.connect() as dev:
            try:
                handle = dev.import_fd(fd)
            except ugem.UgemError as exc:
                assert exc.errno == errno.EINVAL  # refusing it is one correct answer
                return
            assert dev.info(handle).readonly, "write-sealed memory must give a read-only handle"
            with pytest.raises(ugem.UgemError) as exc:
                dev.pwrite(handle, 0, b"x")
            assert exc.value.errno == errno.EINVAL  # read-only handle (SPEC §2 pwrite)
            with pytest.raises(ugem.UgemError) as exc:
                dev.execbuffer([Fill(dst=handle, offset=0, length=16, byte=1)])
            assert exc.value.errno == errno.EACCES
            assert dev.pread(handle, 0, 6) == b"sealed"
    finally:
        os.close(fd)
    assert "Traceback" not in daemon.stderr_text(), daemon.stderr_text()[-3000:]


def test_bug_writable_userptr_of_write_sealed_memfd(daemon: DaemonProcess) -> None:
    fd = _write_sealed_memfd(fcntl.F_SEAL_WRITE)
    try:
        with daemon.connect() as dev, pytest.raises(ugem.UgemError) as exc:
            dev.userptr((fd, 0, 8192))
        assert exc.value.errno in (errno.EACCES, errno.EINVAL), exc.value
    finally:
        os.close(fd)


def test_bug_failed_move_into_vram_leaks_the_node(kit: Any) -> None:
    with run_daemon(vram="16M", system_budget="64M") as daemon:
        with daemon.connect() as dev:
            exported = dev.export(dev.create(4096))
            try:
                name = os.readlink(f"/proc/self/fd/{exported}").removeprefix("/memfd:").removesuffix(" (deleted)")
            finally:
                os.close(exported)
            fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            try:
                os.ftruncate(fd, 8 << 20)
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
                            | fcntl.F_SEAL_WRITE)
                handle = dev.import_fd(fd)
            finally:
                os.close(fd)
            with pytest.raises(ugem.UgemError):
                dev.execbuffer([Fill(dst=handle, offset=0, length=16, byte=1)])
        with daemon.connect() as other:
            kit.wait_until(lambda: other.stats()["clients"] == 1, what="the client to be released")
            assert other.stats()["vram_bytes"] == 0, other.stats()
            big = other.create(12 << 20)  # fits in 16M of VRAM once nothing else is there
            other.wait_fence(other.execbuffer([Fill(dst=big, offset=0, length=16, byte=1)]), -1)


def test_device_writes_to_cached_objects_respect_the_budget() -> None:
    """Found by this fuzzer: device writes into a CACHED object (used in place in system
    memory) added pages without making room first. Now the execbuffer makes room for the
    pages its commands write (ENOMEM when it cannot), like a pwrite."""
    with run_daemon(vram="16M", system_budget="32M") as daemon, daemon.connect() as dev:
        handle = dev.create(256 << 20)
        dev.set_caching(handle, ugem.CACHING_CACHED)
        with pytest.raises(ugem.UgemError) as info:
            dev.execbuffer([Fill(dst=handle, offset=0, length=128 << 20, byte=7)])
        assert info.value.errno == errno.ENOMEM
        dev.wait_fence(dev.execbuffer([Fill(dst=handle, offset=4096, length=8 << 20, byte=7)]), -1)
        assert dev.pread(handle, 4096, 16) == b"\x07" * 16
        stats = dev.stats()
        assert stats["resident_bytes"] <= stats["system_budget"], json.dumps(
            {k: v for k, v in stats.items() if k != "per_client"})


def test_bug_refused_pwrite_populates_the_object(daemon: DaemonProcess, kit: Any) -> None:
    with kit.raw(daemon.path) as raw, daemon.connect() as dev:
        raw.hello()
        assert raw.call(Op.GEM_CREATE, s.CreateReq(size=1 << 20)).status == 0
        reply = raw.call(Op.GEM_PWRITE, s.PwriteReq(handle=1, offset=0, length=1 << 20, data=b"abc"))
        assert reply.status == errno.EINVAL, reply
        info = s.decode(s.InfoReply, raw.call(Op.GEM_INFO, s.InfoReq(handle=1)).payload, [])
        assert info.placement == 0, "a refused pwrite gave the object pages"  # 0: "none"
        assert dev.stats()["memfds"] == 0
