"""Garbage arguments (SPEC §2: every failure raises `ugem.UgemError` with the SPEC's errno):
every public Device and Buffer method, each argument in turn replaced by values of the
wrong type, NaN, infinities, bools, huge and negative numbers, raises nothing but a
UgemError (never struct.error, TypeError, OverflowError, MemoryError or ValueError, nor
DaemonGone), and the client is usable afterwards. numpy integers keep working. Both modes.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

import ugem
from ugem import Buffer
from ugem.cmd import Blit, Copy, Fill, SemaphoreWait

PAGE = ugem.PAGE_SIZE
GARBAGE: list[Any] = [1.5, float("nan"), float("inf"), -float("inf"), "1", b"\x01", None, True, False, [1], (1, 2),
                      object(), 2**64, -(2**64), 2**200, -1, 0, np.float64(2.0), np.array([1, 2]), np.True_, 1j]


@dataclass
class World:
    dev: ugem.Device
    kept: int  # an object with known contents that no call touches
    h: int  # the object the calls work on
    fence: int
    buf: Buffer
    fd: int  # a sealed memfd (import_fd, userptr)


@pytest.fixture
def world(dev: ugem.Device) -> Iterator[World]:
    kept = dev.create(PAGE)
    dev.pwrite(kept, 0, b"intact")
    h = dev.create(2 * PAGE)
    fence = dev.execbuffer([Fill(dst=h, offset=PAGE, length=16, byte=7)])
    fd = os.memfd_create("garbage", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 2 * PAGE)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    try:
        yield World(dev, kept, h, fence, dev.new(PAGE), fd)
    finally:
        os.close(fd)


def _fill(h: Any = None, offset: Any = 0, length: Any = 16, byte: Any = 1) -> Fill:
    return Fill(dst=h, offset=offset, length=length, byte=byte)


# name -> call(world, g): one argument replaced by garbage `g`, the others valid
CALLS: dict[str, Callable[[World, Any], Any]] = {
    "create": lambda w, g: w.dev.create(g),
    "new": lambda w, g: w.dev.new(g),
    "close_handle": lambda w, g: w.dev.close_handle(g),
    "info": lambda w, g: w.dev.info(g),
    "pread.handle": lambda w, g: w.dev.pread(g, 0, 4),
    "pread.offset": lambda w, g: w.dev.pread(w.h, g, 4),
    "pread.length": lambda w, g: w.dev.pread(w.h, 0, g),
    "pread_into.handle": lambda w, g: w.dev.pread_into(g, 0, bytearray(4)),
    "pread_into.offset": lambda w, g: w.dev.pread_into(w.h, g, bytearray(4)),
    "pread_into.buffer": lambda w, g: w.dev.pread_into(w.h, 0, g),
    "pwrite.handle": lambda w, g: w.dev.pwrite(g, PAGE + 64, b"x"),
    "pwrite.offset": lambda w, g: w.dev.pwrite(w.h, g, b"x"),
    "pwrite.data": lambda w, g: w.dev.pwrite(w.h, PAGE + 64, g),
    "mmap.handle": lambda w, g: w.dev.mmap(g),
    "mmap.offset": lambda w, g: w.dev.mmap(w.h, offset=g),
    "mmap.length": lambda w, g: w.dev.mmap(w.h, length=g),
    "mmap.writable": lambda w, g: w.dev.mmap(w.h, writable=g),
    "madvise.handle": lambda w, g: w.dev.madvise(g, ugem.WILLNEED),
    "madvise.advice": lambda w, g: w.dev.madvise(w.h, g),
    "pin": lambda w, g: w.dev.pin(g),
    "unpin": lambda w, g: w.dev.unpin(g),
    "flink": lambda w, g: w.dev.flink(g),
    "open_name": lambda w, g: w.dev.open_name(g),
    "export.handle": lambda w, g: os.close(w.dev.export(g)),
    "export.writable": lambda w, g: os.close(w.dev.export(w.h, writable=g)),
    "import_fd": lambda w, g: w.dev.import_fd(g),
    "userptr.buffer": lambda w, g: w.dev.userptr(g),
    "userptr.fd": lambda w, g: w.dev.userptr((g, 0, PAGE)),
    "userptr.offset": lambda w, g: w.dev.userptr((w.fd, g, PAGE)),
    "userptr.length": lambda w, g: w.dev.userptr((w.fd, 0, g)),
    "userptr.tuple": lambda w, g: w.dev.userptr((w.fd, 0, PAGE, g)),
    "userptr.readonly": lambda w, g: w.dev.userptr((w.fd, 0, PAGE), readonly=g),
    "debug_open": lambda w, g: w.dev.debug_open(g),
    "execbuffer.list": lambda w, g: w.dev.execbuffer(g),
    "execbuffer.command": lambda w, g: w.dev.execbuffer([g]),
    "execbuffer.fill.dst": lambda w, g: w.dev.execbuffer([_fill(h=g)]),
    "execbuffer.fill.offset": lambda w, g: w.dev.execbuffer([_fill(w.h, offset=g)]),
    "execbuffer.fill.length": lambda w, g: w.dev.execbuffer([_fill(w.h, length=g)]),
    "execbuffer.fill.byte": lambda w, g: w.dev.execbuffer([_fill(w.h, byte=g)]),
    "execbuffer.copy.src": lambda w, g: w.dev.execbuffer([Copy(src=g, src_offset=0, dst=w.h, dst_offset=64,
                                                               length=4)]),
    "execbuffer.copy.length": lambda w, g: w.dev.execbuffer([Copy(src=w.h, src_offset=0, dst=w.h, dst_offset=64,
                                                                  length=g)]),
    "execbuffer.blit.cpp": lambda w, g: w.dev.execbuffer([Blit(src=w.h, dst=w.h, src_x=0, src_y=0, dst_x=0, dst_y=2,
                                                               width=1, height=1, cpp=g, src_pitch=64,
                                                               dst_pitch=64)]),
    "execbuffer.semaphore.value": lambda w, g: w.dev.execbuffer([SemaphoreWait(obj=w.h, offset=0, value=g)]),
    "busy": lambda w, g: w.dev.busy(g),
    "wait.handle": lambda w, g: w.dev.wait(g, 0),
    "wait.timeout_ns": lambda w, g: w.dev.wait(w.h, g),
    "wait_fence.fence": lambda w, g: w.dev.wait_fence(g, 0),
    "wait_fence.timeout_ns": lambda w, g: w.dev.wait_fence(w.fence, g),
    "set_domain.handle": lambda w, g: w.dev.set_domain(g, ugem.DOMAIN_CPU),
    "set_domain.read_domains": lambda w, g: w.dev.set_domain(w.h, g),
    "set_domain.write_domain": lambda w, g: w.dev.set_domain(w.h, ugem.DOMAIN_CPU, g),
    "set_tiling.handle": lambda w, g: w.dev.set_tiling(g, ugem.TILING_NONE, 0),
    "set_tiling.mode": lambda w, g: w.dev.set_tiling(w.h, g, 512),
    "set_tiling.stride": lambda w, g: w.dev.set_tiling(w.h, ugem.TILING_X, g),
    "get_tiling": lambda w, g: w.dev.get_tiling(g),
    "set_caching.handle": lambda w, g: w.dev.set_caching(g, ugem.CACHING_NONE),
    "set_caching.level": lambda w, g: w.dev.set_caching(w.h, g),
    "get_caching": lambda w, g: w.dev.get_caching(g),
    "Buffer.handle": lambda w, g: Buffer(w.dev, g),
    "Buffer.size": lambda w, g: Buffer(w.dev, w.buf.handle, g).close(),
    "Buffer.readonly": lambda w, g: Buffer(w.dev, w.buf.handle, readonly=g).close(),
    "Buffer.open_name": lambda w, g: Buffer.open_name(w.dev, g),
    "Buffer.import_fd": lambda w, g: Buffer.import_fd(w.dev, g),
    "Buffer.read.offset": lambda w, g: w.buf.read(g, 4),
    "Buffer.read.length": lambda w, g: w.buf.read(0, g),
    "Buffer.read_into.buffer": lambda w, g: w.buf.read_into(g),
    "Buffer.read_into.offset": lambda w, g: w.buf.read_into(bytearray(4), g),
    "Buffer.write.data": lambda w, g: w.buf.write(g),
    "Buffer.write.offset": lambda w, g: w.buf.write(b"x", g),
    "Buffer.map.writable": lambda w, g: w.buf.map(writable=g),
    "Buffer.array.dtype": lambda w, g: w.buf.array(g),
    "Buffer.array.shape": lambda w, g: w.buf.array(np.uint8, g),
    "Buffer.array.shape-item": lambda w, g: w.buf.array(np.uint8, (2, g)),
    "Buffer.array.offset": lambda w, g: w.buf.array(offset=g),
    "Buffer.array.writable": lambda w, g: w.buf.array(writable=g),
    "Buffer.madvise": lambda w, g: w.buf.madvise(g),
    "Buffer.set_domain.read": lambda w, g: w.buf.set_domain(g),
    "Buffer.set_domain.write": lambda w, g: w.buf.set_domain(ugem.DOMAIN_CPU, g),
    "Buffer.wait": lambda w, g: w.buf.wait(g),
}


def _still_usable(w: World) -> None:
    assert w.dev.pread(w.kept, 0, 6) == b"intact"
    assert w.dev.info(w.kept).size == PAGE and w.dev.info(w.h).size == 2 * PAGE
    scratch = w.dev.create(PAGE)
    w.dev.pwrite(scratch, 0, b"ok")
    assert w.dev.pread(scratch, 0, 2) == b"ok"
    w.dev.close_handle(scratch)
    assert isinstance(w.dev.stats(), dict)


@pytest.mark.parametrize("name", sorted(CALLS))
def test_garbage_raises_only_ugem_errors_and_the_client_stays_usable(world, name):
    call = CALLS[name]
    for garbage in GARBAGE:
        try:
            result = call(world, garbage)
        except ugem.DaemonGone as exc:
            pytest.fail(f"{name}({garbage!r}) lost the connection: {exc!r}")
        except ugem.UgemError as exc:
            assert exc.errno and str(exc), (name, garbage, exc)
        except BaseException as exc:  # noqa: BLE001 - the point of the test
            pytest.fail(f"{name}({garbage!r}) raised {type(exc).__name__}: {exc}")
        else:
            if isinstance(result, memoryview):
                result.release()
        world.buf.close()
        world.buf = world.dev.new(PAGE)
    _still_usable(world)


@pytest.mark.parametrize("value", [1.5, float("nan"), "4096", True, None])
def test_the_einval_message_names_the_argument_and_the_value(dev, value):
    with pytest.raises(ugem.InvalidArgument) as exc:
        dev.create(value)
    assert exc.value.errno == errno.EINVAL
    assert "size" in str(exc.value) and repr(value) in str(exc.value)
    h = dev.create(PAGE)
    with pytest.raises(ugem.InvalidArgument, match=r"timeout_ns must be an integer, got nan"):
        dev.wait(h, float("nan"))


def test_numpy_integers_work_everywhere(dev):
    h = dev.create(np.int64(PAGE))
    assert dev.info(np.uint32(h)).size == PAGE
    dev.pwrite(np.int32(h), np.int64(8), b"np")
    assert dev.pread(np.uint64(h), np.int16(8), np.int8(2)) == b"np"
    fence = dev.execbuffer([Fill(dst=np.int64(h), offset=np.int64(0), length=np.int32(4), byte=np.uint8(9))])
    assert dev.wait_fence(np.uint64(fence), np.int64(-1)) == -1
    assert dev.pread(h, 0, 4) == b"\x09" * 4
    assert dev.madvise(h, np.int64(ugem.WILLNEED)) is True
    buf = Buffer(dev, np.int64(h))
    assert buf.handle == h and type(buf.handle) is int
    assert buf.array(np.uint8, (np.int64(2), np.int64(2)), offset=np.int64(8)).shape == (2, 2)


def test_a_pread_too_big_for_this_process_is_enomem_naming_the_length(dev):
    big = 2**40  # an object this big is legal (holes cost nothing); its bytes cannot come back at once
    h = dev.create(big)
    for _ in range(2):  # without pages (zeros), then with one page written (through a transfer)
        with pytest.raises(ugem.OutOfMemory) as exc:
            dev.pread(h, 0, big)
        assert exc.value.errno == errno.ENOMEM and str(big) in str(exc.value)
        dev.pwrite(h, big - 4, b"last")
    assert dev.pread(h, big - 4, 4) == b"last"  # and the client goes on
    assert dev.stats()["objects"] >= 1


def test_mapping_an_object_too_big_for_the_address_space_is_a_ugem_error(dev):
    h = dev.create(2**46)
    try:
        view = dev.mmap(h)
    except ugem.UgemError as exc:
        assert exc.errno == errno.ENOMEM and str(2**46) in str(exc), exc
    else:  # this machine can reserve 64 TiB of address space: nothing to prove here
        view.release()
    assert dev.info(h).size == 2**46
    assert dev.pread(h, 0, 4) == bytes(4)
