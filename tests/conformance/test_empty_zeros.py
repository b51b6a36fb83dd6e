"""`ugem.empty(shape, dtype, device=)` / `ugem.zeros(...)`: a writable zero-copy array of that
shape and dtype over a new object of `device` (both modes), made with its mapping in one
request (GEM_CREATE_MAPPED) and no handle: the array's mapping keeps the object alive;
zeros touches no page; bad shapes and dtypes are EINVAL naming them, before any
object is made. (Without `device`, the default Device: tests/integration/test_default_device.py.)
"""

from __future__ import annotations

import errno
import gc
from typing import Any

import numpy as np
import pytest

import ugem

PAGE = ugem.PAGE_SIZE

SHAPES = [(3,), (2, 3), 5, (), (4, 0), 0, np.int64(7), [2, 2, 2], (np.int32(3), 1)]
DTYPES = [np.float64, "i1", np.complex128, ">u4", np.dtype([("a", "<i4"), ("b", "<f8")]), None]


def _handles(dev: ugem.Device) -> int:
    [me] = [c for c in dev.stats()["per_client"] if c["id"] == dev.client_id]
    return int(me["objects"])


def _objects(dev: ugem.Device) -> list[dict[str, Any]]:
    return [row for row in dev.list_objects() if row["handles"] or row["mapped"]]


@pytest.mark.parametrize("shape", SHAPES, ids=repr)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("make", [ugem.empty, ugem.zeros], ids=["empty", "zeros"])
def test_shape_and_dtype(dev: ugem.Device, make: Any, shape: Any, dtype: Any) -> None:
    arr = make(shape, dtype, device=dev)
    expected = np.zeros(shape, dtype)  # what numpy makes of the same arguments
    assert arr.shape == expected.shape and arr.dtype == expected.dtype
    assert arr.flags.writeable and arr.flags.c_contiguous
    assert arr.tobytes() == expected.tobytes()  # zero
    [row] = _objects(dev)  # a new object, rounded up to a page (one page for no items)
    assert row["size"] == max(PAGE, -(-expected.nbytes // PAGE) * PAGE)
    assert row["handles"] == 0 and row["mapped"] == 1  # handle closed (next request), mapping kept


def _mapping_of(address: int) -> str:
    """The line of /proc/self/maps that holds `address`."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            low, high = (int(x, 16) for x in line.split()[0].split("-"))
            if low <= address < high:
                return line
    raise AssertionError(f"{address:#x} is not mapped")


@pytest.mark.parametrize("make", [ugem.empty, ugem.zeros], ids=["empty", "zeros"])
def test_the_array_is_the_objects_memory(dev: ugem.Device, make: Any) -> None:
    arr = make((256, 256), np.float32, device=dev)
    line = _mapping_of(arr.__array_interface__["data"][0])
    assert line.split()[1] == "rw-s" and "/memfd:ugem:" in line, line  # a shared mapping of its memfd
    arr[1, :4] = (1.5, 2.5, 3.5, 4.5)
    assert arr.base is not None and arr[1, :4].tolist() == [1.5, 2.5, 3.5, 4.5]


def test_zeros_touches_no_page(dev: ugem.Device) -> None:
    arr = ugem.zeros((1024, 1024), device=dev)  # 8 MiB
    assert arr.nbytes == 8 << 20
    stats = dev.stats()
    assert stats["objects"] == 1 and stats["resident_bytes"] == 0, stats
    arr[0, 0] = 1.0
    assert dev.stats()["resident_bytes"] == PAGE  # one page, the one written


def test_the_array_outlives_its_buffer_and_releases_the_object_when_gone(dev: ugem.Device) -> None:
    arr = ugem.zeros(1000, np.int64, device=dev)
    gc.collect()  # nothing but the array refers to anything
    assert _handles(dev) == 0  # the Buffer's handle is closed
    arr[:] = 3
    assert int(arr.sum()) == 3000
    view = arr[10:20].reshape(2, 5)
    del arr
    gc.collect()
    assert dev.stats()["objects"] == 1  # a view of it still keeps the object
    assert int(view.sum()) == 30
    del view
    gc.collect()
    assert dev.stats()["objects"] == 0  # the last view went: the mapping is released, so the object


def test_many_arrays_do_not_grow_the_handle_table(make_env: Any) -> None:
    dev = make_env(client_max_objects=4).open()
    kept = [ugem.zeros((8, 8), np.int16, device=dev) for _ in range(50)]  # arrays alive, handles not
    for i, arr in enumerate(kept):
        arr[0, 0] = i
    for _ in range(200):  # and arrays dropped at once
        ugem.empty(100, device=dev)[0] = 1.0
    assert _handles(dev) <= 1
    assert dev.stats()["objects"] == 50  # the kept arrays' objects, held by their mappings
    assert [int(arr[0, 0]) for arr in kept] == list(range(50))


BAD_SHAPES = [-1, (2, -3), 1.5, (2, 1.5), "abc", b"\x02", None, True, (True, 2), [[1]], {"a": 1}, object()]


@pytest.mark.parametrize("shape", BAD_SHAPES, ids=repr)
def test_a_bad_shape_is_einval_naming_it(dev: ugem.Device, shape: Any) -> None:
    with pytest.raises(ugem.InvalidArgument) as exc:
        ugem.empty(shape, device=dev)
    assert exc.value.errno == errno.EINVAL
    assert "shape" in exc.value.strerror and repr(shape) in exc.value.strerror, exc.value.strerror
    assert dev.stats()["objects"] == 0


@pytest.mark.parametrize("dtype", ["nope", object, "O", "V0", "U0", np.dtype([]), 3.5], ids=repr)
def test_a_bad_dtype_is_einval_naming_it(dev: ugem.Device, dtype: Any) -> None:
    with pytest.raises(ugem.InvalidArgument) as exc:
        ugem.zeros(3, dtype, device=dev)
    assert exc.value.errno == errno.EINVAL
    assert f"dtype {dtype!r}" in exc.value.strerror, exc.value.strerror
    assert dev.stats()["objects"] == 0


def test_more_than_an_object_holds_is_e2big_naming_the_shape(dev: ugem.Device) -> None:
    with pytest.raises(ugem.TooBig, match=r"shape \(1099511627776, 1024\)") as exc:
        ugem.empty((1 << 40, 1 << 10), np.float64, device=dev)
    assert exc.value.errno == errno.E2BIG
    assert dev.stats()["objects"] == 0


@pytest.mark.parametrize("device", ["default", 1, object()], ids=repr)
def test_device_must_be_a_device(device: Any) -> None:
    with pytest.raises(ugem.InvalidArgument, match="device must be a ugem.Device"):
        ugem.zeros(3, device=device)


def test_a_closed_device_is_ebadf(env: Any) -> None:
    dev = env.open()
    dev.close()
    with pytest.raises(ugem.BadFd):
        ugem.zeros(3, device=dev)


def test_an_array_costs_one_request_and_no_handle(dev: ugem.Device, monkeypatch: Any) -> None:
    ops: list[Any] = []
    real = dev._transport.call
    monkeypatch.setattr(dev._transport, "call",
                        lambda op, req, notes=(), **local: ops.append(op) or real(op, req, notes, **local))
    arr = ugem.empty((64, 64), np.float32, device=dev)
    assert [op.name for op in ops] == ["GEM_CREATE_MAPPED"]
    arr[:] = 1
    assert _handles(dev) == 0 and int(arr.sum()) == 64 * 64


def test_create_mapped_refuses_like_create_and_leaves_nothing(make_env: Any) -> None:
    dev = make_env(client_quota=4 * PAGE, client_max_objects=2).open()
    with pytest.raises(ugem.QuotaExceeded):
        ugem.empty(5 * PAGE, np.uint8, device=dev)  # over the client quota
    kept = ugem.empty(4 * PAGE, np.uint8, device=dev)  # exactly the quota
    with pytest.raises(ugem.QuotaExceeded):
        ugem.empty(1, np.uint8, device=dev)
    for size in (0, -PAGE):
        with pytest.raises(ugem.InvalidArgument, match="size must be positive"):
            dev._new_mapping(size)
    with pytest.raises(ugem.TooBig):
        dev._new_mapping(1 << 47)
    assert dev.stats()["objects"] == 1  # only the kept array's
    del kept
    gc.collect()
    assert dev.stats()["objects"] == 0
    a, b = dev.create(PAGE), dev.create(PAGE)  # at the handle limit: refused, as create is
    with pytest.raises(ugem.QuotaExceeded):
        dev._new_mapping(PAGE)
    dev.close_handle(a), dev.close_handle(b)
    assert dev.stats()["objects"] == 0
