"""ugem.gpu.commands: validation table, tiled addressing, execution (memmove, tiling, semaphores).

The tile layouts are written out again here (`x_tiled`, `y_tiled`) straight from SPEC §3,
independently of the module, and tiled blits are checked byte for byte against them.
Hypothesis draws a fresh seed per run; replay with ``pytest --hypothesis-seed=<n>``.
"""

from __future__ import annotations

import errno
import struct
import threading
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ugem.cmd import Blit, Copy, Fill, SemaphoreWait
from ugem.constants import CACHING_CACHED, CACHING_DISPLAY, TILING_NONE, TILING_X, TILING_Y
from ugem.errors import InvalidArgument, IOFailure
from ugem.gpu import commands
from ugem.gpu.commands import (
    Hung,
    ObjView,
    Target,
    addresses,
    byte_address,
    execute,
    handles,
    reads,
    validate,
    writes,
)
from ugem.testing.data import PROMPT_S


def never() -> bool:
    return False


# ---------------------------------------------------------------------------- layouts from SPEC §3


def x_tiled(stride: int, x: int, y: int) -> int:
    return ((y // 8) * (stride // 512) + x // 512) * 4096 + (y % 8) * 512 + x % 512


def y_tiled(stride: int, x: int, y: int) -> int:
    return ((y // 32) * (stride // 128) + x // 128) * 4096 + ((x % 128) // 16) * 512 + (y % 32) * 16 + x % 16


def spec_address(tiling: int, pitch: int, x: int, y: int) -> int:
    if tiling == TILING_X:
        return x_tiled(pitch, x, y)
    if tiling == TILING_Y:
        return y_tiled(pitch, x, y)
    return y * pitch + x


def test_byte_address_matches_spec_formulas():
    for tiling, stride in [(TILING_NONE, 700), (TILING_X, 1024), (TILING_Y, 384)]:
        for y in range(0, 70, 3):
            for x in range(0, stride, 7):
                assert byte_address(tiling, stride, x, y) == spec_address(tiling, stride, x, y)


def test_tiles_are_4096_bytes_of_consecutive_memory():
    # the first X tile is 8 rows of 512 bytes; the first Y tile is 8 columns of 16 x 32
    assert sorted(x_tiled(1024, x, y) for y in range(8) for x in range(512)) == list(range(4096))
    assert sorted(y_tiled(256, x, y) for y in range(32) for x in range(128)) == list(range(4096))
    assert byte_address(TILING_X, 1024, 512, 0) == 4096  # next tile to the right
    assert byte_address(TILING_X, 1024, 0, 8) == 8192  # next tile row
    assert byte_address(TILING_Y, 256, 16, 0) == 512  # next 16-byte column inside the tile
    assert byte_address(TILING_Y, 256, 0, 1) == 16


@given(
    tiling=st.sampled_from([TILING_NONE, TILING_X, TILING_Y]),
    tiles=st.integers(1, 4),
    x0=st.integers(0, 600),
    y0=st.integers(0, 80),
    w=st.integers(1, 40),
    h=st.integers(1, 40),
)
def test_addresses_is_byte_address_everywhere(tiling, tiles, x0, y0, w, h):
    pitch = tiles * {TILING_NONE: 300, TILING_X: 512, TILING_Y: 128}[tiling]
    got = addresses(tiling, pitch, x0, y0, w, h)
    assert got.shape == (h, w) and got.dtype == np.int64
    want = [[byte_address(tiling, pitch, x0 + c, y0 + r) for c in range(w)] for r in range(h)]
    assert got.tolist() == want


def test_unknown_tiling_is_einval():
    with pytest.raises(InvalidArgument, match="tiling mode 3"):
        byte_address(3, 512, 0, 0)
    with pytest.raises(InvalidArgument, match="tiling mode 7"):
        addresses(7, 512, 0, 0, 1, 1)


# ---------------------------------------------------------------------------- reads / writes


@dataclass(frozen=True)
class Bogus:
    dst: int = 1


def test_reads_and_writes():
    assert (reads(Fill(dst=1, offset=0, length=1, byte=0)), writes(Fill(dst=1, offset=0, length=1, byte=0))) == (
        [],
        [1],
    )
    cp = Copy(src=2, src_offset=0, dst=3, dst_offset=0, length=1)
    assert (reads(cp), writes(cp)) == ([2], [3])
    bl = Blit(src=4, dst=5, src_x=0, src_y=0, dst_x=0, dst_y=0, width=1, height=1, cpp=1, src_pitch=1, dst_pitch=1)
    assert (reads(bl), writes(bl)) == ([4], [5])
    sw = SemaphoreWait(obj=6, offset=0, value=1)
    assert (reads(sw), writes(sw)) == ([6], [])
    assert [handles(c) for c in (cp, bl, sw)] == [[2, 3], [4, 5], [6]]
    assert handles(Copy(src=7, src_offset=0, dst=7, dst_offset=1, length=1)) == [7]
    for fn in (handles, reads, writes):
        with pytest.raises(InvalidArgument, match="Bogus"):
            fn(Bogus())  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- validate(): one error per case

LIN, LIN2, XT, YT, CACHED, PROXY, XSHORT, DISPLAY = 1, 2, 3, 4, 5, 6, 7, 8
OBJECTS = {
    LIN: ObjView(size=16384),
    LIN2: ObjView(size=16384),
    XT: ObjView(size=65536, tiling=TILING_X, stride=1024),  # 2 tiles per row, 64 rows
    YT: ObjView(size=65536, tiling=TILING_Y, stride=512),  # 4 tiles per row, 128 rows
    CACHED: ObjView(size=4096, caching=CACHING_CACHED),
    PROXY: ObjView(size=4096, proxy=True),
    XSHORT: ObjView(size=12288, tiling=TILING_X, stride=1024),  # tile row 1 has only its left tile
    DISPLAY: ObjView(size=4096, caching=CACHING_DISPLAY),
}
FILL = Fill(dst=LIN, offset=16, length=100, byte=0xAB)
COPY = Copy(src=LIN, src_offset=0, dst=LIN2, dst_offset=8, length=1000)
BLIT = Blit(
    src=LIN, dst=XT, src_x=1, src_y=2, dst_x=3, dst_y=4, width=10, height=5, cpp=4, src_pitch=256, dst_pitch=1024
)
SEMA = SemaphoreWait(obj=CACHED, offset=8, value=7)


def check(cmd: Any) -> None:
    validate(cmd, OBJECTS.__getitem__)


VALID = [
    FILL,
    replace(FILL, offset=16284, length=100),  # ends exactly at the size
    replace(FILL, byte=0),
    replace(FILL, byte=255, offset=np.int64(0)),  # numpy ints are accepted
    COPY,
    replace(COPY, src=LIN, dst=LIN, src_offset=0, dst_offset=1, length=16383),  # overlap is allowed
    BLIT,
    replace(BLIT, src=XT, dst=XT, src_pitch=1024),  # tiled to tiled, same object
    replace(BLIT, dst=YT, dst_pitch=512, dst_x=0, dst_y=127, height=1),  # last row of YT
    replace(BLIT, dst=LIN2, dst_pitch=64, dst_x=0, dst_y=192, width=16, src_y=0, height=64),  # ends at LIN2's end
    replace(BLIT, src_x=54, width=10),  # (54 + 10) * 4 == 256 == pitch
    # XSHORT: rows 8..15 exist only for x < 512; the exact (tiled) bound accepts this ...
    replace(BLIT, src_x=0, src_pitch=1024, dst=XSHORT, dst_x=0, dst_y=8, width=128, height=8),
    SEMA,
    replace(SEMA, offset=4092, value=0xFFFF_FFFF),
    replace(SEMA, obj=PROXY, value=0),
]


@pytest.mark.parametrize("cmd", VALID, ids=range(len(VALID)))
def test_valid_commands_pass(cmd):
    check(cmd)


INVALID = [
    # (command, text the message must contain)
    (Bogus(), "unknown device command type Bogus"),
    (replace(FILL, length=1.5), "Fill.length must be an integer, got 1.5"),
    (replace(FILL, byte=True), "Fill.byte must be an integer, got True"),
    (replace(FILL, length=0), "Fill.length must be > 0, got 0"),
    (replace(FILL, length=-5), "Fill.length must be > 0, got -5"),
    (replace(FILL, offset=-1), "Fill.offset must be >= 0, got -1"),
    (replace(FILL, byte=256), "Fill.byte must be in 0..255, got 256"),
    (replace(FILL, byte=-1), "Fill.byte must be in 0..255, got -1"),
    (replace(FILL, offset=16285), "16285+100 = 16385 exceeds handle 1's size 16384"),
    (replace(COPY, length=0), "Copy.length must be > 0, got 0"),
    (replace(COPY, src_offset=-3), "Copy.src_offset must be >= 0, got -3"),
    (replace(COPY, dst_offset=-4), "Copy.dst_offset must be >= 0, got -4"),
    (replace(COPY, src_offset=15385), "Copy src: range 15385+1000 = 16385 exceeds handle 1's size 16384"),
    (replace(COPY, dst_offset=15385), "Copy dst: range 15385+1000 = 16385 exceeds handle 2's size 16384"),
    (replace(COPY, dst=CACHED, dst_offset=3097), "Copy dst: range 3097+1000 = 4097 exceeds handle 5's size 4096"),
    (replace(BLIT, width=0), "Blit.width must be > 0, got 0"),
    (replace(BLIT, height=-1), "Blit.height must be > 0, got -1"),
    (replace(BLIT, cpp=0), "Blit.cpp must be > 0, got 0"),
    (replace(BLIT, src_pitch=0), "Blit.src_pitch must be > 0, got 0"),
    (replace(BLIT, dst=LIN2, dst_pitch=-64), "Blit.dst_pitch must be > 0, got -64"),
    (replace(BLIT, src_x=-1), "Blit.src_x must be >= 0, got -1"),
    (replace(BLIT, src_y=-2), "Blit.src_y must be >= 0, got -2"),
    (replace(BLIT, dst_x=-3), "Blit.dst_x must be >= 0, got -3"),
    (replace(BLIT, dst_y=-4), "Blit.dst_y must be >= 0, got -4"),
    (replace(BLIT, src_x=55), "Blit src: (x + width) * cpp = (55 + 10) * 4 = 260 > pitch 256"),
    (replace(BLIT, dst_x=247), "Blit dst: (x + width) * cpp = (247 + 10) * 4 = 1028 > pitch 1024"),
    (replace(BLIT, dst_pitch=2048), "Blit.dst_pitch 2048 must equal the stride 1024 of tiled handle 3"),
    (replace(BLIT, src=YT, src_pitch=256), "Blit.src_pitch 256 must equal the stride 512 of tiled handle 4"),
    # last byte: linear 65 * 256 + 43; X: row 64 is tile row 8 (of 8), x 51 -> 16 * 4096 + 51;
    # Y: row 128 is tile row 4 (of 4), x 51 -> 16 * 4096 + (51 // 16) * 512 + 51 % 16
    (replace(BLIT, src_y=61), "Blit src: last byte touched at 16683 is outside handle 1's size 16384"),
    (replace(BLIT, dst_y=60), "Blit dst: last byte touched at 65587 is outside handle 3's size 65536"),
    (
        replace(BLIT, dst=YT, dst_pitch=512, dst_y=124),
        "Blit dst: last byte touched at 67075 is outside handle 4's size",
    ),
    # ... and rejects a touch of the missing right-hand tile of tile row 1
    (
        replace(BLIT, src_x=0, src_pitch=1024, dst=XSHORT, dst_x=1, dst_y=8, width=128, height=8),
        "Blit dst: last byte touched at 15875 is outside handle 7's size 12288",
    ),
    (replace(SEMA, offset=-4), "SemaphoreWait.offset must be >= 0, got -4"),
    (replace(SEMA, value=-1), "SemaphoreWait.value must be a u32, got -1"),
    (replace(SEMA, value=2**32), "SemaphoreWait.value must be a u32, got 4294967296"),
    (replace(SEMA, obj=LIN), "handle 1 must be CACHED, userptr or foreign (caching 0)"),
    (replace(SEMA, obj=DISPLAY), "handle 8 must be CACHED, userptr or foreign (caching 2)"),
    (replace(SEMA, offset=6), "SemaphoreWait.offset must be 4-aligned, got 6"),
    (replace(SEMA, offset=4096), "range 4096+4 = 4100 exceeds handle 5's size 4096"),
]


@pytest.mark.parametrize(("cmd", "message"), INVALID, ids=[m[:40] for _, m in INVALID])
def test_invalid_commands_fail_with_einval(cmd, message):
    with pytest.raises(InvalidArgument) as info:
        check(cmd)
    assert info.value.errno == errno.EINVAL
    assert message in str(info.value)


class CoreObject:
    """Any object with the five attributes will do (the core passes its own objects)."""

    size, tiling, stride, caching = 4096, TILING_NONE, 0, CACHING_CACHED

    @property
    def proxy(self) -> bool:
        return False


def test_validate_takes_any_object_like_and_objview_of_copies_it():
    validate(SEMA, lambda h: CoreObject())
    assert ObjView.of(CoreObject()) == ObjView(size=4096, caching=CACHING_CACHED)
    with pytest.raises(InvalidArgument, match="4096\\+4 = 4100 exceeds handle 5's size 4096"):
        validate(replace(SEMA, offset=4096), lambda h: CoreObject())


def test_tiled_bound_is_exact():
    # the largest valid height on an X-tiled object whose size ends inside a tile row
    view = ObjView(size=3 * 4096, tiling=TILING_X, stride=1024)
    ok = Blit(
        src=1, dst=1, src_x=0, src_y=0, dst_x=0, dst_y=0, width=512, height=16, cpp=1, src_pitch=1024, dst_pitch=1024
    )
    validate(ok, lambda h: view)
    with pytest.raises(InvalidArgument):
        validate(replace(ok, width=513), lambda h: view)
    with pytest.raises(InvalidArgument):
        validate(replace(ok, height=17), lambda h: view)


def test_bad_stride_of_a_tiled_object_is_einval():
    view = ObjView(size=65536, tiling=TILING_Y, stride=200)
    cmd = replace(BLIT, src=1, dst=1, src_pitch=200, dst_pitch=200, src_x=0, dst_x=0, width=1)
    with pytest.raises(InvalidArgument, match="stride 200 is not a multiple of 128"):
        validate(cmd, lambda h: view)


@given(
    tiling=st.sampled_from([TILING_NONE, TILING_X, TILING_Y]),
    tiles=st.integers(1, 3),
    x=st.integers(0, 400),
    y=st.integers(0, 70),
    w=st.integers(1, 64),
    h=st.integers(1, 40),
    cpp=st.sampled_from([1, 2, 4]),
    size=st.integers(1, 40000),
)
def test_blit_bound_accepts_iff_every_touched_byte_is_inside(tiling, tiles, x, y, w, h, cpp, size):
    pitch = tiles * {TILING_NONE: 256, TILING_X: 512, TILING_Y: 128}[tiling]
    if (x + w) * cpp > pitch:
        return
    view = ObjView(size=size, tiling=tiling, stride=pitch if tiling else 0)
    cmd = Blit(
        src=1, dst=1, src_x=x, src_y=y, dst_x=x, dst_y=y, width=w, height=h, cpp=cpp, src_pitch=pitch, dst_pitch=pitch
    )
    inside = max(spec_address(tiling, pitch, x * cpp + c, y + r) for r in range(h) for c in range(w * cpp)) < size
    try:
        validate(cmd, lambda handle: view)
    except InvalidArgument:
        assert not inside
    else:
        assert inside


# ---------------------------------------------------------------------------- execute(): Fill and Copy


def test_fill_sets_exactly_its_range():
    buf = bytearray(b"\x11" * 8192)
    execute(Fill(dst=1, offset=4000, length=200, byte=0xAB), {1: Target(memoryview(buf))}, cancelled=never)
    assert buf[:4000] == b"\x11" * 4000
    assert buf[4000:4200] == b"\xab" * 200
    assert buf[4200:] == b"\x11" * (8192 - 4200)


def test_copy_between_objects():
    src, dst = bytearray(range(256)) * 16, bytearray(4096)
    execute(
        Copy(src=1, src_offset=10, dst=2, dst_offset=3000, length=1000),
        {1: Target(src), 2: Target(dst)},
        cancelled=never,
    )
    assert dst[3000:4000] == src[10:1010]
    assert dst[:3000] == bytes(3000) and dst[4000:] == bytes(96)


def memmove(buf: bytearray, dst: int, src: int, n: int) -> bytearray:
    out = bytearray(buf)
    out[dst : dst + n] = bytes(buf[src : src + n])  # snapshot first: memmove semantics
    return out


@pytest.mark.parametrize(
    ("src_offset", "dst_offset", "length"), [(0, 1, 4095), (1, 0, 4095), (100, 164, 3000), (164, 100, 3000), (5, 5, 50)]
)
@pytest.mark.parametrize("aliased", [False, True], ids=["same-handle", "two-views-of-one-buffer"])
def test_overlapping_copy_is_memmove(src_offset, dst_offset, length, aliased):
    buf = bytearray((i * 7 + 3) % 256 for i in range(4096))
    want = memmove(buf, dst_offset, src_offset, length)
    targets = {1: Target(memoryview(buf)), 2: Target(np.frombuffer(buf, dtype=np.uint8))}
    cmd = Copy(src=1, src_offset=src_offset, dst=2 if aliased else 1, dst_offset=dst_offset, length=length)
    execute(cmd, targets, cancelled=never)
    assert buf == want


def test_execute_rechecks_ranges_against_the_real_buffer():
    buf = bytearray(100)
    with pytest.raises(InvalidArgument, match="exceeds handle 1's size 100"):
        execute(Fill(dst=1, offset=50, length=51, byte=1), {1: Target(buf)}, cancelled=never)
    big = Blit(src=1, dst=1, src_x=0, src_y=0, dst_x=0, dst_y=1, width=10, height=10, cpp=1, src_pitch=10, dst_pitch=10)
    with pytest.raises(InvalidArgument, match="outside handle 1's size 100"):
        execute(big, {1: Target(buf)}, cancelled=never)
    assert buf == bytearray(100)


# ---------------------------------------------------------------------------- execute(): Blit


def gradient(width: int, height: int) -> bytearray:
    """A linear image whose bytes are all distinct modulo 251 along rows and columns."""
    return bytearray((3 * x + 17 * y + 1) % 251 for y in range(height) for x in range(width))


def ref_blit(bufs: dict[int, bytearray], layouts: dict[int, tuple[int, int]], cmd: Blit) -> None:
    """Per-byte reference: snapshot the source, then write each destination byte."""
    snapshot = bytes(bufs[cmd.src])
    (st_, sp), (dt, dp) = layouts[cmd.src], layouts[cmd.dst]
    for r in range(cmd.height):
        for c in range(cmd.width * cmd.cpp):
            s = byte_address(st_, sp, cmd.src_x * cmd.cpp + c, cmd.src_y + r)
            d = byte_address(dt, dp, cmd.dst_x * cmd.cpp + c, cmd.dst_y + r)
            bufs[cmd.dst][d] = snapshot[s]


@pytest.mark.parametrize(
    ("tiling", "stride", "x_bytes", "rows"),
    [
        (TILING_X, 2048, (500, 520), (5, 11)),  # crosses the 512-byte tile edge and row 8
        (TILING_X, 1024, (1000, 1024), (60, 64)),  # the last tile of a tile row, the last tile row
        (TILING_Y, 512, (120, 136), (28, 36)),  # crosses the 128-byte tile edge and row 32
        (TILING_Y, 256, (8, 40), (0, 64)),  # several 16-byte columns, two whole tile rows
    ],
)
@pytest.mark.parametrize("cpp", [1, 4])
def test_blit_into_tiled_object_follows_the_layout(tiling, stride, x_bytes, rows, cpp):
    (x0, x1), (y0, y1) = x_bytes, rows
    assert x0 % cpp == 0 and x1 % cpp == 0, "whole pixels"
    w, h = x1 - x0, y1 - y0
    src = gradient(w + 8, h + 3)  # copy from (8, 3) of a linear image, pitch w + 8
    dst = bytearray(b"\xee" * 65536)
    cmd = Blit(
        src=1,
        dst=2,
        src_x=8 // cpp,
        src_y=3,
        dst_x=x0 // cpp,
        dst_y=y0,
        width=w // cpp,
        height=h,
        cpp=cpp,
        src_pitch=w + 8,
        dst_pitch=stride,
    )
    execute(cmd, {1: Target(src), 2: Target(memoryview(dst), tiling, stride)}, cancelled=never)
    want = bytearray(b"\xee" * 65536)
    for y in range(h):
        for x in range(w):
            want[spec_address(tiling, stride, x0 + x, y0 + y)] = src[(3 + y) * (w + 8) + 8 + x]
    assert dst == want  # every touched byte where the layout says, every other byte untouched


@pytest.mark.parametrize(("tiling", "stride"), [(TILING_X, 1024), (TILING_Y, 256)])
def test_blit_out_of_tiled_object_detiles(tiling, stride):
    tiled = bytearray(i % 253 for i in range(65536))
    out = bytearray(40 * 50)
    cmd = Blit(
        src=1, dst=2, src_x=100, src_y=5, dst_x=0, dst_y=0, width=50, height=40, cpp=1, src_pitch=stride, dst_pitch=50
    )
    execute(cmd, {1: Target(tiled, tiling, stride), 2: Target(out)}, cancelled=never)
    for y in range(40):
        for x in range(50):
            assert out[y * 50 + x] == tiled[spec_address(tiling, stride, 100 + x, 5 + y)]


def test_round_trip_linear_x_y_linear_is_identity():
    width, height, cpp = 150, 45, 4  # 600-byte rows: two X tiles, five Y tiles wide
    image = gradient(width * cpp, height)
    xbuf, ybuf, back = bytearray(65536), bytearray(65536), bytearray(len(image))
    targets = {1: Target(image), 2: Target(xbuf, TILING_X, 1024), 3: Target(ybuf, TILING_Y, 640), 4: Target(back)}
    whole = dict(src_x=0, src_y=0, dst_x=0, dst_y=0, width=width, height=height, cpp=cpp)
    execute(Blit(src=1, dst=2, src_pitch=600, dst_pitch=1024, **whole), targets, cancelled=never)
    execute(Blit(src=2, dst=3, src_pitch=1024, dst_pitch=640, **whole), targets, cancelled=never)
    execute(Blit(src=3, dst=4, src_pitch=640, dst_pitch=600, **whole), targets, cancelled=never)
    assert back == image
    # the intermediate copies really are tiled, not linear
    assert xbuf[x_tiled(1024, 599, 44)] == image[44 * 600 + 599]
    assert ybuf[y_tiled(640, 599, 44)] == image[44 * 600 + 599]
    assert xbuf[: 44 * 600 + 600] != image and ybuf[: 44 * 600 + 600] != image


@pytest.mark.parametrize(
    ("tiling", "pitch", "src_xy", "dst_xy"),
    [
        (TILING_NONE, 64, (0, 0), (3, 2)),  # down-right overlap
        (TILING_NONE, 64, (3, 2), (0, 0)),  # up-left overlap
        (TILING_NONE, 64, (0, 1), (0, 0)),  # one row up
        (TILING_X, 1024, (120, 4), (126, 9)),
        (TILING_Y, 256, (30, 30), (28, 33)),
    ],
)
def test_overlapping_blit_in_one_object_is_memmove(tiling, pitch, src_xy, dst_xy):
    buf = bytearray((i * 13 + 5) % 256 for i in range(65536))
    want = {1: bytearray(buf)}
    cmd = Blit(
        src=1,
        dst=1,
        src_x=src_xy[0],
        src_y=src_xy[1],
        dst_x=dst_xy[0],
        dst_y=dst_xy[1],
        width=12,
        height=20,
        cpp=4,
        src_pitch=pitch,
        dst_pitch=pitch,
    )
    ref_blit(want, {1: (tiling, pitch)}, cmd)
    execute(cmd, {1: Target(buf, tiling, pitch if tiling else 0)}, cancelled=never)
    assert buf == want[1]


def test_tiled_blit_in_bands(monkeypatch):
    monkeypatch.setattr(commands, "BLIT_BAND", 64)  # a few rows per band
    buf = bytearray((i * 31) % 256 for i in range(65536))
    want = {1: bytearray(buf)}
    cmd = Blit(
        src=1, dst=1, src_x=10, src_y=3, dst_x=14, dst_y=9, width=40, height=30, cpp=1, src_pitch=512, dst_pitch=512
    )
    ref_blit(want, {1: (TILING_Y, 512)}, cmd)
    execute(cmd, {1: Target(buf, TILING_Y, 512)}, cancelled=never)
    assert buf == want[1]


def test_cancelled_tiled_blit_raises_hung(monkeypatch):
    monkeypatch.setattr(commands, "BLIT_BAND", 64)
    buf = bytearray(65536)
    cmd = Blit(
        src=1, dst=1, src_x=0, src_y=0, dst_x=0, dst_y=0, width=64, height=32, cpp=1, src_pitch=512, dst_pitch=512
    )
    with pytest.raises(Hung):
        execute(cmd, {1: Target(buf, TILING_X, 512)}, cancelled=lambda: True)


@st.composite
def blit_cases(draw: Any) -> tuple[Blit, dict[int, tuple[int, int]], dict[int, int]]:
    same = draw(st.booleans())
    layouts, sizes = {}, {}
    cpp = draw(st.sampled_from([1, 2, 4, 8]))
    width, height = draw(st.integers(1, 8)), draw(st.integers(1, 12))
    corners = {}
    for handle in (1,) if same else (1, 2):
        tiling = draw(st.sampled_from([TILING_NONE, TILING_X, TILING_Y]))
        unit = {TILING_NONE: 1, TILING_X: 512, TILING_Y: 128}[tiling]
        pitch = unit * draw(st.integers(1, 3)) if tiling else draw(st.integers(width * cpp, 200))
        x = draw(st.integers(0, pitch // cpp - width))
        y = draw(st.integers(0, 40))
        last = byte_address(tiling, pitch, (x + width) * cpp - 1, y + height - 1)
        layouts[handle], sizes[handle], corners[handle] = (tiling, pitch), last + 1 + draw(st.integers(0, 64)), (x, y)
    if same:  # a second rectangle in the same object
        tiling, pitch = layouts[1]
        x2, y2 = draw(st.integers(0, pitch // cpp - width)), draw(st.integers(0, 40))
        sizes[1] = max(sizes[1], byte_address(tiling, pitch, (x2 + width) * cpp - 1, y2 + height - 1) + 1)
        corners[2] = (x2, y2)
    dst = 1 if same else 2
    cmd = Blit(
        src=1,
        dst=dst,
        src_x=corners[1][0],
        src_y=corners[1][1],
        dst_x=corners[2][0],
        dst_y=corners[2][1],
        width=width,
        height=height,
        cpp=cpp,
        src_pitch=layouts[1][1],
        dst_pitch=layouts[dst][1],
    )
    return cmd, layouts, sizes


@settings(max_examples=200, deadline=None)
@given(case=blit_cases(), seed=st.integers(0, 2**32 - 1))
def test_blit_equals_per_byte_reference(case, seed):
    cmd, layouts, sizes = case
    rng = np.random.default_rng(seed)
    bufs = {h: bytearray(rng.integers(0, 256, size, dtype=np.uint8).tobytes()) for h, size in sizes.items()}
    want = {h: bytearray(b) for h, b in bufs.items()}
    ref_blit(want, layouts, cmd)
    targets = {h: Target(memoryview(b), layouts[h][0], layouts[h][1] if layouts[h][0] else 0) for h, b in bufs.items()}
    execute(cmd, targets, cancelled=never)
    assert bufs == want


# ---------------------------------------------------------------------------- execute(): SemaphoreWait


def test_semaphore_already_equal_returns_at_once():
    buf = bytearray(4096)
    buf[8:12] = struct.pack("<I", 0xDEADBEEF)
    execute(SemaphoreWait(obj=1, offset=8, value=0xDEADBEEF), {1: Target(buf)}, cancelled=lambda: pytest.fail("polled"))


def test_semaphore_returns_when_another_thread_writes_the_value():
    buf = bytearray(4096)
    view = memoryview(buf)

    def writer() -> None:
        time.sleep(0.02)
        view[16:20] = struct.pack("<I", 41)  # a different value first: keep waiting
        time.sleep(0.02)
        view[16:20] = struct.pack("<I", 42)

    thread = threading.Thread(target=writer)
    start = time.monotonic()
    thread.start()
    try:
        execute(SemaphoreWait(obj=1, offset=16, value=42), {1: Target(view)}, cancelled=never)
    finally:
        thread.join()
    assert time.monotonic() - start >= 0.04
    assert buf[16:20] == struct.pack("<I", 42)


def test_semaphore_reads_little_endian():
    buf = bytearray(4096)
    buf[0:4] = b"\x01\x00\x00\x00"
    deadline = time.monotonic() + 0.05
    with pytest.raises(Hung):  # 0x01000000 is never there
        execute(
            SemaphoreWait(obj=1, offset=0, value=0x0100_0000),
            {1: Target(buf)},
            cancelled=lambda: time.monotonic() > deadline,
        )
    execute(SemaphoreWait(obj=1, offset=0, value=1), {1: Target(buf)}, cancelled=never)


def test_semaphore_raises_hung_when_cancelled():
    buf = bytearray(4096)
    stop = threading.Event()
    timer = threading.Timer(0.05, stop.set)
    start = time.monotonic()  # before the timer starts: it fires 0.05 s after its own start
    timer.start()
    try:
        with pytest.raises(Hung) as info:
            execute(SemaphoreWait(obj=1, offset=4, value=1), {1: Target(buf)}, cancelled=stop.is_set)
    finally:
        timer.cancel()
    elapsed = time.monotonic() - start
    assert 0.05 <= elapsed < PROMPT_S  # polls back off to ~1 ms, so cancellation is noticed (not hung)
    assert isinstance(info.value, IOFailure) and info.value.errno == errno.EIO


def test_semaphore_validates_alignment_even_on_the_device():
    with pytest.raises(InvalidArgument, match="4-aligned"):
        execute(SemaphoreWait(obj=1, offset=2, value=0), {1: Target(bytearray(64))}, cancelled=never)
