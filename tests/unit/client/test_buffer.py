"""The object layer (SPEC §2, last paragraph): `Device.new(size) -> Buffer`, numpy views
over one shared mapping, context management, DLPack. Every test runs embedded and against
a daemon (`env`/`dev` fixtures of tests/conftest.py)."""

from __future__ import annotations

import gc
import mmap
import os

import numpy as np
import pytest

import ugem
from ugem import Buffer

PAGE = ugem.PAGE_SIZE
MiB = 1 << 20


@pytest.fixture
def fds():
    opened: list[int] = []
    yield opened
    for fd in opened:
        os.close(fd)


# -- the handle and its metadata -------------------------------------------------------


def test_new_wraps_a_fresh_handle(dev):
    buf = dev.new(10_000)
    assert isinstance(buf, Buffer)
    assert buf.device is dev and buf.handle == 1
    assert buf.size == 3 * PAGE  # rounded up to a page, as create does
    info = buf.info()
    assert (info.size, info.placement, info.madvise, info.readonly) == (3 * PAGE, "none", "willneed", False)
    assert not buf.readonly and not buf.closed
    assert repr(buf) == f"<Buffer handle=1 size={3 * PAGE}>"


def test_new_has_the_errors_of_create(dev):
    with pytest.raises(ugem.InvalidArgument):
        dev.new(0)
    with pytest.raises(ugem.TooBig):
        dev.new(2**46 + 1)


def test_context_manager_closes_the_handle(dev):
    with dev.new(PAGE) as buf:
        handle = buf.handle
        assert dev.info(handle).size == PAGE
    assert buf.closed
    assert repr(buf) == f"<Buffer handle={handle} size={PAGE} closed>"
    with pytest.raises(ugem.NoSuchObject):
        dev.info(handle)


def test_close_is_idempotent_and_a_closed_buffer_never_sends_its_handle(dev):
    buf = dev.new(PAGE)
    buf.close()
    buf.close()
    other = dev.new(2 * PAGE)  # reuses the handle number (lowest free)
    assert other.handle == buf.handle
    for call in (buf.info, buf.read, buf.flink, buf.export, buf.array, buf.map, buf.pin,
                 lambda: buf.write(b"x"), lambda: buf.madvise(ugem.DONTNEED), buf.__dlpack__):
        with pytest.raises(ugem.BadFd):
            call()
    with pytest.raises(ugem.BadFd), buf:
        pass
    assert other.info().madvise == "willneed" and other.info().size == 2 * PAGE


def test_buffer_adopts_a_handle_of_the_handle_layer(dev):
    h = dev.create(PAGE)
    dev.pwrite(h, 0, b"adopted")
    with Buffer(dev, h) as buf:
        assert repr(buf) == f"<Buffer handle={h}>"
        assert buf.size == PAGE and buf.array(np.uint8, 7).tobytes() == b"adopted"
    with pytest.raises(ugem.NoSuchObject):
        dev.info(h)


def test_close_after_the_device_closed_is_a_no_op(env):
    dev = env.open()
    buf = dev.new(PAGE)
    dev.close()
    buf.close()
    assert buf.closed


# -- bulk data -------------------------------------------------------------------------


def test_read_write_read_into(dev):
    buf = dev.new(2 * PAGE)
    buf.write(b"hello", 10)
    buf.write(np.arange(4, dtype=np.uint32), PAGE)
    assert buf.read(8, 9) == b"\0\0hello\0\0"
    assert len(buf.read()) == 2 * PAGE
    assert buf.read(PAGE + 4) == np.arange(1, 4, dtype=np.uint32).tobytes() + bytes(PAGE - 16)
    into = np.zeros(4, dtype=np.uint32)
    assert buf.read_into(into, PAGE) == 16
    assert into.tolist() == [0, 1, 2, 3]


def test_bulk_data_keeps_the_handle_layer_errors(dev):
    buf = dev.new(PAGE)
    with pytest.raises(ugem.InvalidArgument):
        buf.read(PAGE - 1, 2)
    with pytest.raises(ugem.InvalidArgument):
        buf.write(b"xy", PAGE - 1)
    assert buf.read(PAGE, 0) == b""


# -- numpy views -----------------------------------------------------------------------


def test_array_dtype_and_shape(dev):
    buf = dev.new(3 * PAGE)
    assert buf.array().shape == (3 * PAGE,) and buf.array().dtype == np.uint8
    assert buf.array(np.float64).shape == (3 * PAGE // 8,)
    assert buf.array(np.int16, 100).shape == (100,)
    grid = buf.array("f4", (32, 64))
    assert grid.shape == (32, 64) and grid.dtype == np.float32 and grid.flags.c_contiguous
    assert buf.array(np.uint8, (0,)).shape == (0,)
    assert buf.array(np.uint16, np.array([4, 8])).shape == (4, 8)
    assert buf.array(np.uint16, np.int64(6)).shape == (6,)
    tail = buf.array(np.uint32, 4, offset=PAGE)
    tail[:] = [1, 2, 3, 4]
    assert buf.read(PAGE, 16) == np.array([1, 2, 3, 4], dtype=np.uint32).tobytes()


@pytest.mark.parametrize("dtype, shape, offset", [
    (np.uint8, 2 * PAGE + 1, 0),
    (np.float64, (PAGE // 8 + 1, 2), 0),
    (np.uint32, (PAGE // 2,), 8),
    (np.uint8, (-1,), 0),
    (np.uint8, None, 2 * PAGE + 1),
    (np.uint8, 1, -1),
    (object, 1, 0),
    (np.dtype("V0"), 1, 0),
])
def test_array_that_does_not_fit_is_einval(dev, dtype, shape, offset):
    buf = dev.new(2 * PAGE)
    with pytest.raises(ugem.InvalidArgument) as exc:
        buf.array(dtype, shape, offset=offset)
    assert exc.value.errno == 22
    assert buf.info().placement == "none"  # refused before mapping anything


def test_array_is_zero_copy_both_ways(dev):
    buf = dev.new(PAGE)
    arr = buf.array(np.int32, (4, 4))
    arr[1] = [7, 8, 9, 10]
    assert buf.read(16, 16) == np.array([7, 8, 9, 10], dtype=np.int32).tobytes()
    buf.write(np.int32(-5).tobytes(), 60)
    assert arr[3, 3] == -5


def test_views_share_one_mapping_while_any_lives(dev, monkeypatch):
    buf = dev.new(4 * PAGE)
    calls = []
    real = dev._mmap
    monkeypatch.setattr(dev, "_mmap", lambda *a, **k: calls.append(k) or real(*a, **k))
    a = buf.array(np.uint8)
    b = buf.array(np.float32, (16, 16))
    c = buf.map()
    d = buf.array(np.uint8, writable=False)
    assert len(calls) == 1
    assert np.shares_memory(a, b) and np.shares_memory(a, d)
    c[0:4] = b"\x01\x02\x03\x04"
    assert a[:4].tolist() == [1, 2, 3, 4] and d[:4].tolist() == [1, 2, 3, 4]
    del a, b, c, d
    gc.collect()
    e = buf.array(np.int64, writable=False)  # the last view died: the mapping lingers, taken back (no request)
    assert len(calls) == 1 and e[0] == 0x04030201 and not e.flags.writeable
    del e
    gc.collect()
    buf.info()  # a request: the lingering mapping is released with it
    buf.array()  # so this maps again
    assert len(calls) == 2


def test_read_only_views(dev):
    buf = dev.new(PAGE)
    ro = buf.array(np.uint8, writable=False)
    assert not ro.flags.writeable
    with pytest.raises(ValueError):
        ro.flags.writeable = True
    rw = buf.array(np.uint8)  # maps again, writable
    rw[0] = 42
    assert ro[0] == 42
    assert buf.map(writable=False).readonly


def test_read_only_handle_maps_read_only_only(env, fds):
    owner, importer = env.open(), env.open()
    src = owner.new(PAGE)
    src.write(b"shared")
    fds.append(src.export(writable=False))
    ro = Buffer.import_fd(importer, fds[-1])
    assert ro.readonly and ro.size == PAGE
    with pytest.raises(ugem.PermissionDenied):
        ro.array()
    view = ro.array(np.uint8, 6, writable=False)
    assert view.tobytes() == b"shared"
    src.array()[0:6] = np.frombuffer(b"SHARED", np.uint8)
    assert view.tobytes() == b"SHARED"


def test_views_outlive_close_and_the_device(env):
    owner, other = env.open(), env.open()
    buf = owner.new(PAGE)
    arr = buf.array(np.uint8, 8)
    reader = Buffer.open_name(other, buf.flink())
    buf.close()
    arr[:] = np.arange(8)
    assert reader.read(0, 8) == bytes(range(8))  # the object lives on: same memory
    owner.close()
    arr[0] = 99
    assert arr[0] == 99


def test_views_release_the_mapping_so_the_object_can_spill(make_env):
    dev = make_env(system_budget=4 * MiB).open()
    buf = dev.new(MiB)
    arr = buf.array(np.uint8)
    arr[:] = 7
    others = [dev.new(MiB) for _ in range(8)]
    for o in others:
        o.write(bytes(range(256)) * (MiB // 256))
    assert buf.info().placement == "system"  # mapped: never spilled
    del arr
    gc.collect()
    for o in others:
        o.write(b"x" * MiB)
    assert buf.info().placement == "spilled"
    assert buf.read(0, 4) == b"\x07" * 4 and int(buf.array().sum()) == 7 * MiB


# -- sharing ---------------------------------------------------------------------------


def test_open_name_gives_a_new_handle_to_the_same_memory(env):
    a, b = env.open(), env.open()
    buf = a.new(2 * PAGE)
    name = buf.flink()
    assert name == buf.flink() == buf.info().name
    peer = Buffer.open_name(b, name)
    assert peer.size == 2 * PAGE and peer.handle == 1
    again = Buffer.open_name(b, name)
    assert again.handle == 2
    peer.array(np.uint16)[5] = 0xBEEF
    assert buf.array(np.uint16)[5] == 0xBEEF
    with pytest.raises(ugem.NoSuchObject):
        Buffer.open_name(b, name + 1000)


def test_export_and_import_fd(env, fds):
    a, b = env.open(), env.open()
    buf = a.new(PAGE)
    fds.append(buf.export())
    assert os.lseek(fds[-1], 0, os.SEEK_END) == PAGE
    with mmap.mmap(fds[-1], PAGE) as raw:
        raw[0:3] = b"raw"
        peer = Buffer.import_fd(b, fds[-1])
        assert peer.read(0, 3) == b"raw" and not peer.readonly
        peer.write(b"RAW")
        assert raw[0:3] == b"RAW"
    assert Buffer.import_fd(a, fds[-1]).handle == buf.handle  # self-import: the same handle
    with pytest.raises(ugem.BadFd):
        Buffer.import_fd(b, 10_000)


# -- memory management -----------------------------------------------------------------


def test_madvise_pin_domains(dev):
    buf = dev.new(PAGE)
    buf.write(b"keep")
    assert buf.madvise(ugem.DONTNEED) is True
    assert buf.info().madvise == "dontneed"
    assert buf.madvise(ugem.WILLNEED) is True
    with pytest.raises(ugem.InvalidArgument):
        buf.madvise(7)
    buf.pin()
    assert buf.info().pinned
    buf.unpin()
    assert not buf.info().pinned
    with pytest.raises(ugem.InvalidArgument):
        buf.unpin()
    buf.set_domain(ugem.DOMAIN_CPU, ugem.DOMAIN_CPU)
    assert not buf.busy() and buf.wait(0) == 0


def test_purged_buffer(dev):
    buf = dev.new(PAGE)  # never populated: DONTNEED purges it at once
    assert buf.madvise(ugem.DONTNEED) is False
    assert buf.info().placement == "purged"
    with pytest.raises(ugem.BadAddress):
        buf.array()
    with pytest.raises(ugem.BadAddress):
        np.from_dlpack(buf)


# -- DLPack ----------------------------------------------------------------------------


def test_dlpack_device_is_cpu(dev):
    assert dev.new(PAGE).__dlpack_device__() == (1, 0)


def test_numpy_from_dlpack_shares_memory(dev):
    buf = dev.new(2 * PAGE)
    arr = np.from_dlpack(buf)
    assert arr.shape == (2 * PAGE,) and arr.dtype == np.uint8 and arr.flags.writeable
    arr[100:104] = [1, 2, 3, 4]
    assert buf.read(100, 4) == b"\x01\x02\x03\x04"
    buf.write(b"\xff", 0)
    assert arr[0] == 0xFF
    assert np.shares_memory(arr, buf.array())
    copied = np.from_dlpack(buf, copy=True)
    copied[0] = 1
    assert buf.read(0, 1) == b"\xff"
    assert np.from_dlpack(buf, device="cpu").shape == (2 * PAGE,)


def test_dlpack_capsule_keeps_the_mapping_alive(dev):
    buf = dev.new(PAGE)
    capsule = buf.__dlpack__(max_version=(1, 0))
    peer = Buffer.open_name(dev, buf.flink())
    buf.close()
    del buf
    gc.collect()

    class Holder:  # hands numpy the capsule made while the Buffer was open
        def __init__(self, capsule):
            self.capsule = capsule

        def __dlpack__(self, **kwargs):
            capsule, self.capsule = self.capsule, None
            return capsule

        def __dlpack_device__(self):
            return (1, 0)

    arr = np.from_dlpack(Holder(capsule))
    del capsule
    gc.collect()
    arr[:4] = [9, 8, 7, 6]
    assert peer.read(0, 4) == b"\x09\x08\x07\x06"


def test_dlpack_of_a_read_only_handle_is_read_only(env, fds):
    owner, importer = env.open(), env.open()
    src = owner.new(PAGE)
    src.write(b"ro")
    fds.append(src.export(writable=False))
    arr = np.from_dlpack(Buffer.import_fd(importer, fds[-1]))
    assert not arr.flags.writeable and arr[:2].tobytes() == b"ro"


def test_typed_dlpack_goes_through_array(dev):
    buf = dev.new(PAGE)
    typed = np.from_dlpack(buf.array(np.float32, (8, 8)))
    typed[2, 3] = 1.5
    assert buf.array(np.float32, (8, 8))[2, 3] == 1.5


def test_torch_from_dlpack_shares_memory(dev):
    torch = pytest.importorskip("torch")
    buf = dev.new(PAGE)
    t = torch.from_dlpack(buf)
    assert t.dtype == torch.uint8 and tuple(t.shape) == (PAGE,) and t.device.type == "cpu"
    t[10:13] = torch.tensor([1, 2, 3], dtype=torch.uint8)
    assert buf.read(10, 3) == b"\x01\x02\x03"
    buf.write(b"\x2a", 0)
    assert int(t[0]) == 42
    f = torch.from_dlpack(buf.array(np.float32, (4, 4)))
    f[1, 1] = 2.5
    assert buf.array(np.float32, (4, 4))[1, 1] == 2.5
    buf.close()
    t[1] = 5  # the tensor keeps the mapping alive after close
    assert int(t[1]) == 5
