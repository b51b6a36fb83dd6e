"""set_tiling / get_tiling and set_caching / get_caching (SPEC §2 rows; §3 "tiled layouts",
"caching and domains"; gem-reference §2.8, §2.9, §5.7 IGT gem_tiling_max_stride,
gem_set_tiling_vs_pwrite, gem_userptr_blits set-cache-level).

Order of checks: set_tiling ENOENT -> ENXIO -> EINVAL; set_caching EINVAL (level) before
the lookup, then ENOENT, then ENXIO. Foreign memory comes from a sealed memfd (SPEC §6).
"""

from __future__ import annotations

import errno

import numpy as np
import pytest

import ugem
from ugem.cmd import Fill

PAGE = ugem.PAGE_SIZE
KiB = 1 << 10
X, Y, NONE = ugem.TILING_X, ugem.TILING_Y, ugem.TILING_NONE
MAX_STRIDE = 256 * KiB


def _data(seed: int, size: int) -> bytes:
    return np.random.default_rng(seed).bytes(size)


# -- set_tiling errno ------------------------------------------------------------------


@pytest.mark.parametrize("handle", [0, 2, 99, 2**32])
def test_set_and_get_tiling_of_an_unknown_handle_are_enoent(dev, errno_of, handle):
    dev.create(PAGE)
    assert errno_of(dev.set_tiling, handle, X, 512) == errno.ENOENT
    assert errno_of(dev.get_tiling, handle) == errno.ENOENT


def test_set_tiling_enoent_comes_before_einval(dev, errno_of):
    assert errno_of(dev.set_tiling, 5, 3, 0) == errno.ENOENT
    assert errno_of(dev.set_tiling, 5, X, 0) == errno.ENOENT


def test_set_tiling_of_a_foreign_import_is_enxio(dev, errno_of, sealed_memfd):
    h = dev.import_fd(sealed_memfd(4 * PAGE))
    assert errno_of(dev.set_tiling, h, X, 512) == errno.ENXIO
    assert errno_of(dev.set_tiling, h, NONE, 0) == errno.ENXIO
    assert errno_of(dev.set_tiling, h, 3, 0) == errno.ENXIO  # ENXIO before EINVAL
    assert dev.get_tiling(h) == (NONE, 0)


@pytest.mark.parametrize("tiling", [3, 4, 0x100, 2**31, 2**32 - 1, -1])
def test_bad_tiling_mode_is_einval(dev, errno_of, tiling):
    h = dev.create(PAGE)
    assert errno_of(dev.set_tiling, h, tiling, 512) == errno.EINVAL
    assert dev.get_tiling(h) == (NONE, 0)


BAD_STRIDES = {
    X: [0, 64, 128, 511, 513, 640, 1000, 1536 + 128, MAX_STRIDE + 512, 2 * MAX_STRIDE, 2**31 - 1, 2**32 - 1, -512],
    Y: [0, 16, 64, 127, 129, 192, 1000, MAX_STRIDE + 128, 2 * MAX_STRIDE, 2**31 - 1, 2**32 - 1, -128],
}


@pytest.mark.parametrize("tiling, stride", [(m, s) for m, ss in BAD_STRIDES.items() for s in ss])
def test_bad_stride_is_einval(dev, errno_of, tiling, stride):
    h = dev.create(PAGE)
    assert errno_of(dev.set_tiling, h, tiling, stride) == errno.EINVAL
    assert dev.get_tiling(h) == (NONE, 0)


def test_a_failed_set_tiling_leaves_the_tiling_alone(dev, errno_of):
    h = dev.create(PAGE)
    assert dev.set_tiling(h, Y, 384) == (Y, 384)
    assert errno_of(dev.set_tiling, h, X, 384) == errno.EINVAL
    assert errno_of(dev.set_tiling, h, 7, 512) == errno.EINVAL
    assert dev.get_tiling(h) == (Y, 384)


# -- set_tiling results ----------------------------------------------------------------


def test_new_objects_are_untiled(dev):
    h = dev.create(PAGE)
    assert dev.get_tiling(h) == (NONE, 0)
    info = dev.info(h)
    assert (info.tiling, info.stride) == (NONE, 0)


@pytest.mark.parametrize("tiling, stride", [
    (X, 512), (X, 1024), (X, 4096), (X, MAX_STRIDE), (Y, 128), (Y, 384), (Y, 2048), (Y, MAX_STRIDE),
])
def test_set_tiling_returns_what_was_set_and_get_tiling_agrees(dev, tiling, stride):
    h = dev.create(PAGE)
    assert dev.set_tiling(h, tiling, stride) == (tiling, stride)
    assert dev.get_tiling(h) == (tiling, stride)
    info = dev.info(h)
    assert (info.tiling, info.stride) == (tiling, stride)


@pytest.mark.parametrize("stride", [0, 4096, 13, 2**32 - 1])
def test_none_ignores_the_stride_and_sets_zero(dev, stride):
    h = dev.create(PAGE)
    assert dev.set_tiling(h, X, 2048) == (X, 2048)
    assert dev.set_tiling(h, NONE, stride) == (NONE, 0)
    assert dev.get_tiling(h) == (NONE, 0)


def test_tiling_is_per_object_and_seen_through_every_handle(env):
    a, b = env.open(), env.open()
    h = a.create(PAGE)
    other = a.create(PAGE)
    a.set_tiling(h, X, 1024)
    h2, _ = b.open_name(a.flink(h))
    assert b.get_tiling(h2) == (X, 1024)
    assert a.get_tiling(other) == (NONE, 0)


@pytest.mark.parametrize("tiling, stride", [(X, 4096), (Y, 512)])
def test_pread_and_pwrite_are_raw_bytes_regardless_of_tiling(dev, tiling, stride):
    h = dev.create(4 * PAGE)
    data = _data(1, 4 * PAGE)
    dev.pwrite(h, 0, data)
    dev.set_tiling(h, tiling, stride)
    assert dev.pread(h, 0, 4 * PAGE) == data  # no detiling
    dev.pwrite(h, 100, b"tiled write")
    dev.set_tiling(h, NONE, 0)
    assert dev.pread(h, 0, 4 * PAGE) == data[:100] + b"tiled write" + data[111:]
    dev.set_tiling(h, tiling, stride)
    assert dev.pread(h, 100, 11) == b"tiled write"


def test_fill_addresses_raw_bytes_of_a_tiled_object(dev):
    h = dev.create(4 * PAGE)
    dev.set_tiling(h, X, 1024)
    dev.execbuffer([Fill(dst=h, offset=1000, length=100, byte=0x11)])
    assert dev.pread(h, 0, 4 * PAGE) == bytes(1000) + b"\x11" * 100 + bytes(4 * PAGE - 1100)


# -- set_caching / get_caching ---------------------------------------------------------


@pytest.mark.parametrize("level", [3, 4, 0x100, 2**31, 2**32 - 1, -1])
def test_bad_caching_level_is_einval(dev, errno_of, level):
    h = dev.create(PAGE)
    assert errno_of(dev.set_caching, h, level) == errno.EINVAL
    assert dev.get_caching(h) == ugem.CACHING_NONE


@pytest.mark.parametrize("handle", [0, 99])
def test_bad_caching_level_is_einval_before_the_lookup(dev, errno_of, handle):
    assert errno_of(dev.set_caching, handle, 3) == errno.EINVAL


@pytest.mark.parametrize("handle", [0, 2, 99, 2**32])
def test_set_and_get_caching_of_an_unknown_handle_are_enoent(dev, errno_of, handle):
    dev.create(PAGE)
    assert errno_of(dev.set_caching, handle, ugem.CACHING_CACHED) == errno.ENOENT
    assert errno_of(dev.get_caching, handle) == errno.ENOENT


@pytest.mark.parametrize("level", [ugem.CACHING_NONE, ugem.CACHING_DISPLAY])
def test_set_caching_of_a_foreign_import_other_than_cached_is_enxio(dev, errno_of, sealed_memfd, level):
    h = dev.import_fd(sealed_memfd(PAGE))
    assert errno_of(dev.set_caching, h, level) == errno.ENXIO


def test_set_caching_cached_of_a_foreign_import_is_accepted(dev, sealed_memfd):
    h = dev.import_fd(sealed_memfd(PAGE, data=b"foreign"))
    dev.set_caching(h, ugem.CACHING_CACHED)
    assert dev.get_caching(h) == ugem.CACHING_CACHED
    assert dev.pread(h, 0, 7) == b"foreign"


def test_new_objects_are_caching_none(dev):
    h = dev.create(PAGE)
    assert dev.get_caching(h) == ugem.CACHING_NONE
    assert dev.info(h).caching == ugem.CACHING_NONE


@pytest.mark.parametrize("level", [ugem.CACHING_CACHED, ugem.CACHING_DISPLAY, ugem.CACHING_NONE])
def test_caching_round_trip(dev, level):
    h = dev.create(PAGE)
    other = dev.create(PAGE)
    dev.set_caching(h, ugem.CACHING_CACHED if level != ugem.CACHING_CACHED else ugem.CACHING_DISPLAY)
    dev.set_caching(h, level)
    assert dev.get_caching(h) == level
    assert dev.info(h).caching == level
    assert dev.get_caching(other) == ugem.CACHING_NONE


def test_cached_objects_stay_in_system_memory(dev):
    h = dev.create(PAGE)
    dev.set_caching(h, ugem.CACHING_CACHED)
    dev.execbuffer([Fill(dst=h, offset=0, length=PAGE, byte=3)])
    dev.wait(h, -1)
    assert dev.info(h).placement == "system"
    assert dev.pread(h, 0, PAGE) == b"\x03" * PAGE


def test_caching_cached_takes_an_object_out_of_vram_with_its_data(dev):
    h = dev.create(2 * PAGE)
    dev.pwrite(h, 0, b"head")
    dev.execbuffer([Fill(dst=h, offset=PAGE, length=PAGE, byte=0xEE)])
    dev.wait(h, -1)
    assert dev.info(h).placement == "vram"
    dev.set_caching(h, ugem.CACHING_CACHED)
    assert dev.info(h).placement == "system"
    assert dev.pread(h, 0, 2 * PAGE) == b"head" + bytes(PAGE - 4) + b"\xee" * PAGE


@pytest.mark.parametrize("level", [ugem.CACHING_NONE, ugem.CACHING_DISPLAY])
def test_uncached_objects_go_to_vram(dev, level):
    h = dev.create(PAGE)
    dev.set_caching(h, level)
    dev.execbuffer([Fill(dst=h, offset=0, length=PAGE, byte=3)])
    dev.wait(h, -1)
    assert dev.info(h).placement == "vram"
    assert dev.pread(h, 0, PAGE) == b"\x03" * PAGE
