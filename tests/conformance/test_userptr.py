"""userptr (SPEC §2 `userptr` and the userptr errno of other calls, §5 quotas, §6; gem-reference
§2.10, §5.8 gem_userptr_blits usage-restrictions, forbidden-operations, readonly-*,
mmap-offset-banned, set-cache-level, sync-unmap). Forms: "buffer" (embedded only: a page-aligned
buffer-protocol object) and "memfd" (`(fd, offset, length)` of a memfd sealed with F_SEAL_SHRINK);
tests that do not care use the mode's natural one (buffer embedded, memfd over the daemon)."""

from __future__ import annotations

import errno
import fcntl
import gc
import mmap
import os
import socket
import tempfile
import weakref

import numpy as np
import pytest

import ugem
from ugem.cmd import Copy, Fill, SemaphoreWait

PAGE = ugem.PAGE_SIZE
MiB = 1 << 20
BUDGET = 16 * MiB

# every supported (mode, form) pair; parametrizing `mode` here overrides the conftest fixture
FORMS = pytest.mark.parametrize(("mode", "form"), [("embedded", "buffer"), ("embedded", "memfd"),
                                                   ("daemon", "memfd")])
embedded_only = pytest.mark.parametrize("mode", ["embedded"])


def _data(seed: int, size: int) -> bytes:
    return np.random.default_rng(seed).bytes(size)


@pytest.fixture
def user_mem(mode, sealed_memfd, fds):
    """`make(size, form=None, data=b"", ro_memory=False) -> (arg, mem)`: memory of the test,
    `arg` to pass to `userptr`, `mem` the test's own mapping of the same pages. With
    `ro_memory`, `arg` is read-only memory (a PROT_READ map, or an O_RDONLY fd)."""
    def make(size: int, form: str | None = None, data: bytes = b"", ro_memory: bool = False):
        form = form or ("buffer" if mode == "embedded" else "memfd")
        if form == "buffer" and not ro_memory:
            mem = mmap.mmap(-1, size)
            mem[:len(data)] = data
            return mem, mem
        fd = sealed_memfd(size, data=data)
        if form == "buffer":
            mem = mmap.mmap(fd, size, prot=mmap.PROT_READ)
            return mem, mem
        mem = mmap.mmap(fd, size)
        if ro_memory:
            fd = fds.add(os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC))
        return (fd, 0, size), mem
    return make


def _me(dev) -> dict:
    [me] = [c for c in dev.stats()["per_client"] if c["id"] == dev.client_id]
    return me


# -- creation: EINVAL / EBADF / EACCES -------------------------------------------------


@embedded_only
@pytest.mark.parametrize(("start", "stop"), [(1, 1 + PAGE), (PAGE - 1, 2 * PAGE - 1),  # unaligned address
                                            (0, 1), (0, PAGE - 1), (0, PAGE + 1), (PAGE, 2 * PAGE - 8),  # length
                                            (0, 0), (PAGE, PAGE)])  # empty
def test_unaligned_or_empty_buffer_is_einval(dev, errno_of, start, stop):
    mem = mmap.mmap(-1, 2 * PAGE)  # page-aligned: only the slice is wrong
    assert errno_of(dev.userptr, memoryview(mem)[start:stop]) == errno.EINVAL


@pytest.mark.parametrize("mode", ["daemon"])
def test_plain_buffer_over_the_daemon_is_einval(dev):
    with pytest.raises(ugem.UgemError) as exc:
        dev.userptr(mmap.mmap(-1, PAGE))
    assert exc.value.errno == errno.EINVAL
    assert "(fd, offset, length)" in str(exc.value)  # the message says what the daemon takes


@pytest.mark.parametrize(("offset", "length"), [
    (1, PAGE), (PAGE // 2, PAGE), (PAGE - 1, PAGE), (-PAGE, PAGE),  # offset not page-aligned / negative
    (0, 0), (0, 1), (0, PAGE - 1), (0, PAGE + 1), (0, -PAGE),  # length empty or unaligned
    (0, 3 * PAGE), (PAGE, 2 * PAGE), (2 * PAGE, PAGE), (1 << 62, PAGE), (0, 1 << 62)])  # beyond the memfd
def test_bad_range_of_a_sealed_memfd_is_einval(dev, errno_of, sealed_memfd, offset, length):
    assert errno_of(dev.userptr, (sealed_memfd(2 * PAGE), offset, length)) == errno.EINVAL


@pytest.mark.parametrize("seals", [0, fcntl.F_SEAL_GROW, fcntl.F_SEAL_SEAL])
def test_memfd_not_sealed_against_shrinking_is_einval(dev, errno_of, sealed_memfd, seals):
    assert errno_of(dev.userptr, (sealed_memfd(2 * PAGE, seals=seals), 0, PAGE)) == errno.EINVAL
    assert dev.create(PAGE) == 1  # the failure allocated no handle


def _not_memory(kind: str, fds) -> int:
    if kind == "pipe":
        r, w = os.pipe()
        fds.add(w)
        return fds.add(r)
    if kind == "socket":
        left, right = socket.socketpair()
        fds.add(right.detach())
        return fds.add(left.detach())
    if kind == "/dev/null":
        return fds.add(os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC))
    fd, path = tempfile.mkstemp(dir=None if kind == "file" else "/dev/shm")  # any writer could truncate it
    os.unlink(path)
    os.ftruncate(fd, 2 * PAGE)
    return fds.add(fd)


@pytest.mark.parametrize("kind", ["pipe", "socket", "/dev/null", "file", "tmpfs file"])
def test_fd_that_is_not_a_sealed_memfd_is_einval(dev, errno_of, fds, kind):
    assert errno_of(dev.userptr, (_not_memory(kind, fds), 0, PAGE)) == errno.EINVAL


def test_closed_fd_is_ebadf(dev, errno_of):
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    assert errno_of(dev.userptr, (r, 0, PAGE)) == errno.EBADF


@FORMS
def test_writable_userptr_of_read_only_memory_is_eacces(dev, errno_of, sealed_memfd, fds, form):
    if form == "buffer":
        arg = mmap.mmap(-1, 2 * PAGE, prot=mmap.PROT_READ)
    else:  # an O_RDONLY description of a sealed memfd
        arg = (fds.add(os.open(f"/proc/self/fd/{sealed_memfd(2 * PAGE)}", os.O_RDONLY | os.O_CLOEXEC)), 0, 2 * PAGE)
    assert errno_of(dev.userptr, arg) == errno.EACCES
    h = dev.userptr(arg, readonly=True)
    assert h == 1 and dev.info(h).readonly and dev.info(h).userptr


@FORMS
@pytest.mark.parametrize("readonly", [False, True])
def test_info(dev, user_mem, form, readonly):
    arg, _ = user_mem(3 * PAGE, form)
    h = dev.userptr(arg, readonly=readonly)
    assert h == 1
    assert dev.info(h) == ugem.ObjectInfo(
        size=3 * PAGE, placement="system", madvise="willneed", name=0, tiling=ugem.TILING_NONE, stride=0,
        caching=ugem.CACHING_CACHED, busy=False, pinned=False, userptr=True, readonly=readonly)


def test_a_range_inside_a_larger_memfd(dev, sealed_memfd):
    data = _data(1, 4 * PAGE)
    fd = sealed_memfd(4 * PAGE, data=data)
    mem = mmap.mmap(fd, 4 * PAGE)
    h, other = dev.userptr((fd, PAGE, 2 * PAGE)), dev.create(2 * PAGE)
    assert dev.info(h).size == 2 * PAGE
    dev.execbuffer([Copy(src=h, src_offset=0, dst=other, dst_offset=0, length=2 * PAGE),
                    Fill(dst=h, offset=0, length=2 * PAGE, byte=0xEE)])
    dev.wait(h, -1)
    assert dev.pread(other, 0, 2 * PAGE) == data[PAGE:3 * PAGE]
    assert mem[:] == data[:PAGE] + b"\xee" * 2 * PAGE + data[3 * PAGE:]


# -- restrictions (gem-reference §2.10) ------------------------------------------------


@pytest.fixture
def uh(dev, user_mem):
    """A userptr handle over two pages the test filled with known bytes; (handle, memory)."""
    arg, mem = user_mem(2 * PAGE, data=_data(7, 2 * PAGE))
    return dev.userptr(arg), mem


RESTRICTED = {  # one forbidden operation each (gem-reference §2.10, SPEC §2)
    "pread": (lambda d, h: d.pread(h, 0, 16), errno.EINVAL),
    "pread_into": (lambda d, h: d.pread_into(h, PAGE, bytearray(PAGE)), errno.EINVAL),
    "pwrite": (lambda d, h: d.pwrite(h, 0, b"x" * 16), errno.EINVAL),
    "mmap": (lambda d, h: d.mmap(h), errno.ENODEV),
    "mmap read-only": (lambda d, h: d.mmap(h, writable=False), errno.ENODEV),
    "export": (lambda d, h: d.export(h), errno.EINVAL),
    "export read-only": (lambda d, h: d.export(h, writable=False), errno.EINVAL),
    # ENXIO comes before the mode and stride checks (SPEC §2: ENOENT -> ENXIO -> EINVAL)
    "tiling NONE": (lambda d, h: d.set_tiling(h, ugem.TILING_NONE, 0), errno.ENXIO),
    "tiling X": (lambda d, h: d.set_tiling(h, ugem.TILING_X, 512), errno.ENXIO),
    "tiling Y": (lambda d, h: d.set_tiling(h, ugem.TILING_Y, 128), errno.ENXIO),
    "tiling X bad stride": (lambda d, h: d.set_tiling(h, ugem.TILING_X, 0), errno.ENXIO),
    "tiling bad mode": (lambda d, h: d.set_tiling(h, 7, 0), errno.ENXIO),
    "caching NONE": (lambda d, h: d.set_caching(h, ugem.CACHING_NONE), errno.ENXIO),
    "caching DISPLAY": (lambda d, h: d.set_caching(h, ugem.CACHING_DISPLAY), errno.ENXIO),
    "caching bad level": (lambda d, h: d.set_caching(h, 3), errno.EINVAL),  # checked before the lookup
}


@pytest.mark.parametrize("op", RESTRICTED)
def test_restricted_operation(dev, errno_of, uh, op):
    h, mem = uh
    before = mem[:]
    fn, expected = RESTRICTED[op]
    assert errno_of(fn, dev, h) == expected
    assert mem[:] == before
    assert (dev.get_tiling(h), dev.get_caching(h)) == ((ugem.TILING_NONE, 0), ugem.CACHING_CACHED)
    assert dev.info(h).placement == "system"


def test_what_stays_allowed(dev, uh):
    h, _ = uh
    assert dev.pread(h, 0, 0) == b""  # length 0: no lookup, as for any handle
    assert dev.pread_into(h, 0, bytearray()) == 0
    dev.pwrite(h, 0, b"")
    dev.set_caching(h, ugem.CACHING_CACHED)
    assert dev.get_caching(h) == dev.info(h).caching == ugem.CACHING_CACHED


def _pressure(dev, total: int = 2 * BUDGET, size: int = 2 * MiB) -> list[int]:
    handles = []
    for i in range(total // size):
        handles.append(dev.create(size))
        dev.pwrite(handles[-1], 0, _data(100 + i, size))
    return handles


@pytest.mark.parametrize("advice", [ugem.DONTNEED, ugem.WILLNEED])
def test_never_purged_or_spilled_under_pressure(make_env, user_mem, advice):
    dev = make_env(system_budget=BUDGET).open()
    data = _data(3, 4 * MiB)
    arg, mem = user_mem(4 * MiB, data=data)
    h = dev.userptr(arg)  # the least recently used object of all
    assert dev.madvise(h, advice) is True
    others = _pressure(dev)
    stats = dev.stats()
    assert stats["spilled_total"] > 0 and stats["purged_total"] == 0, stats
    assert "spilled" in {dev.info(o).placement for o in others}
    assert dev.info(h).placement == "system" and dev.madvise(h, advice) is True
    assert mem[:] == data


def test_not_counted_in_resident_or_client_bytes(make_env, user_mem):
    dev = make_env(system_budget=BUDGET).open()
    arg, mem = user_mem(2 * BUDGET)  # twice the budget
    before, mine = dev.stats(), _me(dev)
    h = dev.userptr(arg)
    dev.execbuffer([Fill(dst=h, offset=0, length=2 * BUDGET, byte=0x11)])  # every page touched
    dev.wait(h, -1)
    after, now = dev.stats(), _me(dev)
    assert after["resident_bytes"] == before["resident_bytes"]
    assert after["objects"] == before["objects"] + 1
    assert after["spilled_total"] == after["purged_total"] == 0
    assert now["bytes"] == mine["bytes"] and now["objects"] == mine["objects"] + 1
    assert mem[:] == b"\x11" * 2 * BUDGET


def test_a_userptr_larger_than_the_client_quota_is_accepted(make_env, user_mem, errno_of):
    dev = make_env(client_quota=4 * PAGE).open()
    arg, _ = user_mem(16 * PAGE)
    h = dev.userptr(arg)
    assert dev.info(h).size == 16 * PAGE
    dev.create(4 * PAGE)  # the whole quota is still free
    assert _me(dev)["bytes"] == 4 * PAGE
    assert errno_of(dev.create, PAGE) == errno.EDQUOT


def test_it_counts_against_client_max_objects(make_env, user_mem, errno_of):
    dev = make_env(client_max_objects=2).open()
    dev.create(PAGE)
    arg, _ = user_mem(PAGE)
    dev.userptr(arg)
    arg2, _ = user_mem(PAGE)
    assert errno_of(dev.userptr, arg2) == errno.EDQUOT
    assert errno_of(dev.create, PAGE) == errno.EDQUOT
    assert _me(dev)["objects"] == 2


# -- the device uses the memory in place -----------------------------------------------


@FORMS
def test_device_writes_land_in_the_callers_memory(dev, user_mem, form):
    data = _data(11, 4 * PAGE)
    arg, mem = user_mem(4 * PAGE, form, data=data)
    view = np.frombuffer(mem, dtype=np.uint8)  # the test's own memory, no copy anywhere
    h, src = dev.userptr(arg), dev.create(PAGE)
    dev.pwrite(src, 0, b"from an object")
    dev.execbuffer([Fill(dst=h, offset=PAGE + 100, length=2 * PAGE, byte=0xA5),
                    Copy(src=src, src_offset=0, dst=h, dst_offset=3 * PAGE + 200, length=14)])
    assert dev.wait(h, -1) == -1
    expected = np.frombuffer(data, dtype=np.uint8).copy()
    expected[PAGE + 100:3 * PAGE + 100] = 0xA5
    expected[3 * PAGE + 200:3 * PAGE + 214] = np.frombuffer(b"from an object", dtype=np.uint8)
    assert np.array_equal(view, expected)


def _aligned_array(size: int) -> np.ndarray:
    raw = np.zeros(size + PAGE, dtype=np.uint8)
    skip = -raw.ctypes.data % PAGE
    return raw[skip:skip + size]


@embedded_only
@pytest.mark.parametrize("layout", ["C", "F", "big-endian", "structured"])
def test_any_page_aligned_numpy_array_is_used_in_memory_order(dev, layout):
    base = _aligned_array(2 * PAGE)
    arr = {"C": base.view(np.uint32).reshape(32, 64), "F": base.view(np.uint32).reshape(32, 64).T,
           "big-endian": base.view(">u4"), "structured": base.view([("a", "<u2"), ("b", "u1"), ("c", "u1")])}[layout]
    h = dev.userptr(arr)
    assert dev.info(h).size == 2 * PAGE
    dev.execbuffer([Fill(dst=h, offset=PAGE, length=8, byte=0x81)])
    dev.wait(h, -1)
    assert base[PAGE:PAGE + 8].tolist() == [0x81] * 8 and not base[:PAGE].any() and not base[PAGE + 8:].any()


@FORMS
def test_copy_reads_what_the_caller_wrote(dev, user_mem, form):
    arg, mem = user_mem(4 * PAGE, form)
    h, dst = dev.userptr(arg), dev.create(4 * PAGE)
    data = _data(12, 4 * PAGE)
    mem[:] = data  # written after creation: coherent, no set_domain
    dev.execbuffer([Copy(src=h, src_offset=0, dst=dst, dst_offset=0, length=4 * PAGE)])
    dev.wait(dst, -1)
    assert dev.pread(dst, 0, 4 * PAGE) == data
    mem[:4] = b"next"  # and again, after the device has used it
    dev.execbuffer([Copy(src=h, src_offset=0, dst=dst, dst_offset=PAGE, length=4)])
    assert dev.pread(dst, PAGE, 4) == b"next"


@FORMS
def test_device_writes_to_a_read_only_userptr_are_eacces(dev, errno_of, user_mem, form):
    data = _data(14, 2 * PAGE)
    arg, mem = user_mem(2 * PAGE, form, data=data, ro_memory=True)
    ro, other = dev.userptr(arg, readonly=True), dev.create(2 * PAGE)
    assert errno_of(dev.execbuffer, [Fill(dst=ro, offset=0, length=16, byte=1)]) == errno.EACCES
    copy_in = Copy(src=other, src_offset=0, dst=ro, dst_offset=0, length=PAGE)
    assert errno_of(dev.execbuffer, [copy_in]) == errno.EACCES
    dev.execbuffer([Copy(src=ro, src_offset=0, dst=other, dst_offset=0, length=2 * PAGE)])  # reading is fine
    assert dev.pread(other, 0, 2 * PAGE) == data
    assert mem[:] == data


@FORMS
def test_semaphore_wait_on_a_userptr(dev, errno_of, user_mem, form):
    arg, mem = user_mem(PAGE, form)
    h, out = dev.userptr(arg), dev.create(PAGE)
    dev.execbuffer([SemaphoreWait(obj=h, offset=64, value=0xC0FFEE),
                    Fill(dst=out, offset=0, length=8, byte=0x77)])
    assert errno_of(dev.wait, out, 50_000_000) == errno.ETIME
    assert dev.busy(h)
    mem[64:68] = (0xC0FFEE).to_bytes(4, "little")  # released from our own memory
    assert dev.wait(out, -1) == -1
    assert not dev.busy(h)
    assert dev.pread(out, 0, 8) == b"\x77" * 8


# -- lifetime --------------------------------------------------------------------------


@FORMS
def test_closing_the_handle_leaves_the_memory_to_the_caller(dev, errno_of, user_mem, form):
    arg, mem = user_mem(2 * PAGE, form)
    h = dev.userptr(arg)
    dev.execbuffer([Fill(dst=h, offset=0, length=PAGE, byte=0x3C)])
    dev.wait(h, -1)
    dev.close_handle(h)
    assert errno_of(dev.info, h) == errno.ENOENT
    assert mem[:PAGE] == b"\x3c" * PAGE and mem[PAGE:] == bytes(PAGE)
    mem[:5] = b"still"
    assert mem[:5] == b"still"
    h2 = dev.userptr(arg)  # and it can be wrapped again
    assert h2 == h and dev.info(h2).userptr


def test_the_memfd_may_be_closed_after_creation(dev, sealed_memfd, fds):
    fd = sealed_memfd(2 * PAGE)
    mem = mmap.mmap(fd, 2 * PAGE)
    h = dev.userptr((fd, 0, 2 * PAGE))
    fds.close(fd)
    dev.execbuffer([Fill(dst=h, offset=PAGE, length=PAGE, byte=0x5E)])
    dev.wait(h, -1)
    assert mem[:] == bytes(PAGE) + b"\x5e" * PAGE


# A bytearray (or a subclass of it) cannot serve: its storage comes from malloc, which puts
# it at no page boundary (large blocks start 16 bytes into an mmap). mmap.mmap objects and
# numpy arrays (a page-aligned slice) support weak references and page alignment.
@embedded_only
@pytest.mark.parametrize("kind", ["mmap", "numpy"])
def test_the_manager_keeps_the_buffer_alive_while_the_handle_exists(dev, kind):
    buf = mmap.mmap(-1, 2 * PAGE) if kind == "mmap" else _aligned_array(2 * PAGE)
    ref = weakref.ref(buf)
    h = dev.userptr(buf)
    del buf
    gc.collect()
    assert ref() is not None
    if kind == "mmap":  # gem_userptr_blits sync-unmap: in use, it cannot even be unmapped
        with pytest.raises(BufferError):
            ref().close()
    dev.execbuffer([Fill(dst=h, offset=0, length=2 * PAGE, byte=0x42)])
    dev.wait(h, -1)
    assert bytes(memoryview(ref())[:8]) == b"\x42" * 8  # the same memory, through the weak reference
    dev.close_handle(h)
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize("mode", ["daemon"])
def test_the_daemon_leaks_neither_fds_nor_mappings(env, dev, errno_of, sealed_memfd):
    fd, before = sealed_memfd(4 * PAGE), env.daemon.fd_count()
    for _ in range(5):
        assert errno_of(dev.userptr, (fd, PAGE, 4 * PAGE)) == errno.EINVAL
    h = dev.userptr((fd, 0, 4 * PAGE))
    assert env.daemon.fd_count() == before  # no fd per userptr (SPEC §7: fds bound resident objects)
    dev.close_handle(h)
    dev.stats()  # a round trip after the close
    with open(f"/proc/{env.daemon.pid}/maps") as f:
        assert "memfd:conformance" not in f.read()  # our memfd (sealed_memfd's name) is unmapped


def test_a_userptr_larger_than_vram_is_used_in_place(make_env, user_mem):
    dev = make_env(vram=MiB).open()
    arg, mem = user_mem(4 * MiB)
    h = dev.userptr(arg)
    dev.execbuffer([Fill(dst=h, offset=0, length=4 * MiB, byte=0x6B)])
    dev.wait(h, -1)
    assert mem[:] == b"\x6b" * 4 * MiB
    assert dev.stats()["vram_bytes"] == 0
