"""ugem/address.py `data_address`: the pointer read from the array object equals numpy's own
`__array_interface__` for every kind of array, and the slow way is taken where it must be."""

from __future__ import annotations

import mmap
from typing import Any

import numpy as np
import pytest

from ugem import address
from ugem.address import data_address


class Sub(np.ndarray):  # type: ignore[type-arg]
    pass


def _arrays() -> list[Any]:
    base = np.arange(4096, dtype=np.float64)
    region = mmap.mmap(-1, 1 << 16)
    readonly = base[10:]
    readonly.flags.writeable = False
    return [
        base, base[1:], base[::3], base[::-1], base.reshape(64, 64).T, base.reshape(64, 64)[5:, 7:],
        np.asfortranarray(base.reshape(64, 64)), readonly, base.view(Sub)[3:], base[:0], np.float64(1.0) * base[:1],
        np.frombuffer(region, dtype=np.uint8)[100:], np.zeros((3, 0, 2)), np.array(3.5), base.view(np.uint8)[1:],
    ]


def test_the_offset_was_found_here() -> None:
    assert address._OFFSET > 0  # CPython: the fast way is in use (else this test module proves nothing)


@pytest.mark.parametrize("i", range(len(_arrays())))
def test_every_kind_of_array_reads_as_numpy_says(i: int) -> None:
    a = _arrays()[i]
    assert data_address(a) == int(a.__array_interface__["data"][0])


def test_without_the_offset_the_slow_way_gives_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    arrays = _arrays()
    fast = [data_address(a) for a in arrays]
    monkeypatch.setattr(address, "_OFFSET", 0)
    assert [data_address(a) for a in arrays] == fast


def test_what_is_not_an_ndarray_is_never_read_raw() -> None:
    class Fake:
        __array_interface__ = {"data": (12345, False), "shape": (1,), "typestr": "|u1", "version": 3}

    assert data_address(Fake()) == 12345  # type: ignore[arg-type]
