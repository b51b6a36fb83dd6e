"""execbuffer: device commands, their errno and their results (SPEC §2 execbuffer, stats;
§3 "vram", "device commands", "tiled layouts"; gem-reference §5.10 gem_lmem_swapping).

Errno tests feed otherwise valid input, so that only the check under test can fire; the
order tests put two faults in one list (in either position) and expect the earlier check of
the SPEC order ENOENT, EINVAL, EFAULT, EACCES, ENOSPC. Results are read back with pread,
which waits for the device and brings the data back from VRAM itself. Expected bytes of
tiled blits are computed here from the SPEC's layout formulas, not with ugem's own code.
"""

from __future__ import annotations

import errno

import pytest

import ugem
from ugem.cmd import Blit, Copy, Fill, SemaphoreWait
from ugem.testing.data import fill as _fill
from ugem.testing.data import filled as _filled
from ugem.testing.data import write_new as _written

PAGE = ugem.PAGE_SIZE
MiB = 1 << 20


def _x_addr(stride: int, x: int, y: int) -> int:  # SPEC §3 "tiled layouts"
    return ((y // 8) * (stride // 512) + x // 512) * 4096 + (y % 8) * 512 + x % 512


def _y_addr(stride: int, x: int, y: int) -> int:
    return ((y // 32) * (stride // 128) + x // 128) * 4096 + ((x % 128) // 16) * 512 + (y % 32) * 16 + x % 16


def _lin_addr(pitch: int, x: int, y: int) -> int:
    return y * pitch + x


def _blit(src: int, dst: int, **kw) -> Blit:
    args = dict(src_x=0, src_y=0, dst_x=0, dst_y=0, width=4, height=4, cpp=4, src_pitch=64, dst_pitch=64)
    args.update(kw)
    return Blit(src=src, dst=dst, **args)


# -- ENOENT ----------------------------------------------------------------------------


@pytest.mark.parametrize("handle", [0, 2, 3, 99, 2**32])
def test_unknown_or_closed_handle_is_enoent(dev, errno_of, handle):
    dev.create(PAGE)  # handle 1
    dev.close_handle(dev.create(PAGE))  # handle 2, closed
    assert errno_of(dev.execbuffer, [_fill(handle)]) == errno.ENOENT


@pytest.mark.parametrize("role", ["src", "dst"])
def test_unknown_handle_in_either_side_of_a_copy_is_enoent(dev, errno_of, role):
    h = dev.create(PAGE)
    sides = {"src": h, "dst": h, role: 77}
    cmd = Copy(src=sides["src"], src_offset=0, dst=sides["dst"], dst_offset=0, length=16)
    assert errno_of(dev.execbuffer, [cmd]) == errno.ENOENT


@pytest.mark.parametrize("unknown_first", [True, False])
def test_enoent_wins_over_einval_across_the_whole_list(dev, errno_of, unknown_first):
    h = dev.create(PAGE)
    bad = [_fill(h, length=0), _fill(h, offset=PAGE, length=1)]  # each EINVAL alone
    cmds = [_fill(42), *bad] if unknown_first else [*bad, _fill(42)]
    assert errno_of(dev.execbuffer, [bad[0]]) == errno.EINVAL
    assert errno_of(dev.execbuffer, cmds) == errno.ENOENT


# -- EINVAL ----------------------------------------------------------------------------


def test_empty_command_list_is_einval(dev, errno_of):
    assert errno_of(dev.execbuffer, []) == errno.EINVAL


@pytest.mark.parametrize("make", [
    lambda h: Fill(dst=h, offset=0, length=0, byte=1),
    lambda h: Copy(src=h, src_offset=0, dst=h, dst_offset=PAGE, length=0),
    lambda h: _blit(h, h, dst_y=8, width=0),
    lambda h: _blit(h, h, dst_y=8, height=0),
    lambda h: _blit(h, h, dst_y=8, cpp=0),
], ids=["fill", "copy", "blit-width", "blit-height", "blit-cpp"])
def test_zero_length_or_size_is_einval(dev, errno_of, make):
    h = dev.create(2 * PAGE)
    assert errno_of(dev.execbuffer, [make(h)]) == errno.EINVAL


@pytest.mark.parametrize("make", [
    lambda h, o: Fill(dst=h, offset=PAGE - 8, length=9, byte=1),
    lambda h, o: Fill(dst=h, offset=PAGE, length=1, byte=1),
    lambda h, o: Fill(dst=h, offset=-1, length=1, byte=1),
    lambda h, o: Copy(src=h, src_offset=PAGE - 4, dst=o, dst_offset=0, length=8),
    lambda h, o: Copy(src=o, src_offset=0, dst=h, dst_offset=PAGE - 4, length=8),
    lambda h, o: Copy(src=o, src_offset=0, dst=h, dst_offset=-8, length=8),
    lambda h, o: Fill(dst=h, offset=0, length=1, byte=256),
], ids=["fill-end", "fill-past", "fill-negative", "copy-src", "copy-dst", "copy-negative", "fill-byte"])
def test_range_outside_an_object_or_bad_field_is_einval(dev, errno_of, make):
    h = dev.create(PAGE)
    other = dev.create(4 * PAGE)  # big enough for every range, so only `h`'s range is wrong
    assert errno_of(dev.execbuffer, [make(h, other)]) == errno.EINVAL
    assert dev.pread(h, 0, PAGE) == bytes(PAGE)


def test_blit_row_wider_than_the_pitch_is_einval(dev, errno_of):
    src, dst = dev.create(PAGE), dev.create(PAGE)
    assert dev.execbuffer([_blit(src, dst, src_x=12, width=4)]) > 0  # (12 + 4) * 4 == 64: fits
    assert errno_of(dev.execbuffer, [_blit(src, dst, src_x=13, width=4)]) == errno.EINVAL
    assert errno_of(dev.execbuffer, [_blit(src, dst, dst_x=13, width=4)]) == errno.EINVAL


def test_blit_touching_bytes_past_the_object_is_einval(dev, errno_of):
    src, dst = dev.create(PAGE), dev.create(PAGE)  # 64 rows of 64 bytes
    assert dev.execbuffer([_blit(src, dst, src_y=60, height=4)]) > 0
    assert errno_of(dev.execbuffer, [_blit(src, dst, src_y=61, height=4)]) == errno.EINVAL
    assert errno_of(dev.execbuffer, [_blit(src, dst, dst_y=61, height=4)]) == errno.EINVAL


def test_blit_bounds_follow_the_tiled_layout(dev, errno_of):
    # X, stride 1024: 2 tiles per tile row; 3 pages hold tile row 0 and the left tile of row 1
    tiled, linear = dev.create(3 * PAGE), dev.create(8 * PAGE)
    dev.set_tiling(tiled, ugem.TILING_X, 1024)
    inside = _blit(linear, tiled, dst_x=0, dst_y=8, width=128, height=8, cpp=4, src_pitch=1024, dst_pitch=1024)
    assert dev.execbuffer([inside]) > 0  # x < 512 of rows 8..15: the third tile
    outside = _blit(linear, tiled, dst_x=1, dst_y=8, width=128, height=1, cpp=4, src_pitch=1024, dst_pitch=1024)
    assert errno_of(dev.execbuffer, [outside]) == errno.EINVAL  # its last byte is in the missing tile


@pytest.mark.parametrize("tiling, stride", [(ugem.TILING_X, 1024), (ugem.TILING_Y, 256)])
@pytest.mark.parametrize("side", ["src", "dst"])
def test_blit_pitch_of_a_tiled_object_must_equal_its_stride(dev, errno_of, tiling, stride, side):
    tiled, linear = dev.create(8 * PAGE), dev.create(8 * PAGE)
    dev.set_tiling(tiled, tiling, stride)
    pitch = stride // 2
    if side == "src":
        good = _blit(tiled, linear, src_pitch=stride, dst_pitch=pitch)
        bad = _blit(tiled, linear, src_pitch=pitch, dst_pitch=pitch)
    else:
        good = _blit(linear, tiled, src_pitch=pitch, dst_pitch=stride)
        bad = _blit(linear, tiled, src_pitch=pitch, dst_pitch=pitch)
    assert dev.execbuffer([good]) > 0
    assert errno_of(dev.execbuffer, [bad]) == errno.EINVAL


@pytest.mark.parametrize("level", [ugem.CACHING_NONE, ugem.CACHING_DISPLAY])
def test_semaphore_wait_on_an_object_that_is_not_cached_is_einval(dev, errno_of, level):
    s = dev.create(PAGE)
    dev.set_caching(s, level)
    dev.pwrite(s, 0, (1).to_bytes(4, "little"))  # would be satisfied at once if it ran
    assert errno_of(dev.execbuffer, [SemaphoreWait(obj=s, offset=0, value=1)]) == errno.EINVAL


@pytest.mark.parametrize("offset", [1, 2, 3, 6, PAGE - 4 + 2])
def test_semaphore_wait_at_an_unaligned_offset_is_einval(dev, errno_of, offset):
    s = dev.create(PAGE)
    dev.set_caching(s, ugem.CACHING_CACHED)
    assert errno_of(dev.execbuffer, [SemaphoreWait(obj=s, offset=offset, value=0)]) == errno.EINVAL


def test_semaphore_wait_past_the_end_is_einval(dev, errno_of):
    s = dev.create(PAGE)
    dev.set_caching(s, ugem.CACHING_CACHED)
    assert dev.execbuffer([SemaphoreWait(obj=s, offset=PAGE - 4, value=0)]) > 0  # zeros: satisfied
    assert errno_of(dev.execbuffer, [SemaphoreWait(obj=s, offset=PAGE, value=0)]) == errno.EINVAL


def test_an_invalid_command_anywhere_fails_the_whole_list(dev, errno_of):
    h, data = _written(dev, PAGE, seed=1)
    cmds = [_fill(h, byte=1), _fill(h, offset=PAGE, length=1), _fill(h, offset=64, byte=2)]
    assert errno_of(dev.execbuffer, cmds) == errno.EINVAL
    assert dev.pread(h, 0, PAGE) == data


# -- EFAULT, EACCES and their order ----------------------------------------------------


def _purged(dev) -> int:
    h = dev.create(PAGE)
    assert dev.madvise(h, ugem.DONTNEED) is False  # no pages: purged at once
    return h


def test_purged_object_is_efault(dev, errno_of):
    p, h = _purged(dev), dev.create(PAGE)
    assert errno_of(dev.execbuffer, [_fill(p)]) == errno.EFAULT
    copy = Copy(src=p, src_offset=0, dst=h, dst_offset=0, length=16)
    assert errno_of(dev.execbuffer, [copy]) == errno.EFAULT


@pytest.mark.parametrize("purged_first", [True, False])
def test_einval_wins_over_efault_across_the_list(dev, errno_of, purged_first):
    p, h = _purged(dev), dev.create(PAGE)
    cmds = [_fill(p), _fill(h, length=0)]
    assert errno_of(dev.execbuffer, cmds if purged_first else cmds[::-1]) == errno.EINVAL


@pytest.fixture
def read_only(env, fds):
    """(owner, h, data, importer, ro): `ro` is importer's read-only handle to owner's `h`."""
    owner, importer = env.open(), env.open()
    h, data = _written(owner, 2 * PAGE, seed=7)
    ro = importer.import_fd(fds.add(owner.export(h, writable=False)))
    assert importer.info(ro).readonly
    return owner, h, data, importer, ro


def test_write_through_a_read_only_handle_is_eacces(read_only, errno_of):
    owner, h, data, importer, ro = read_only
    mine = importer.create(2 * PAGE)
    assert errno_of(importer.execbuffer, [_fill(ro)]) == errno.EACCES
    copy_in = Copy(src=mine, src_offset=0, dst=ro, dst_offset=0, length=64)
    assert errno_of(importer.execbuffer, [copy_in]) == errno.EACCES
    blit_in = _blit(mine, ro)
    assert errno_of(importer.execbuffer, [blit_in]) == errno.EACCES
    assert owner.pread(h, 0, 2 * PAGE) == data
    # reading through it is fine
    importer.execbuffer([Copy(src=ro, src_offset=0, dst=mine, dst_offset=0, length=2 * PAGE)])
    assert importer.pread(mine, 0, 2 * PAGE) == data


@pytest.mark.parametrize("purged_first", [True, False])
def test_efault_wins_over_eacces_across_the_list(read_only, errno_of, purged_first):
    _, _, _, importer, ro = read_only
    p = _purged(importer)
    cmds = [_fill(p), _fill(ro)]
    assert errno_of(importer.execbuffer, cmds if purged_first else cmds[::-1]) == errno.EFAULT


# -- ENOSPC ----------------------------------------------------------------------------


def test_working_set_larger_than_vram_is_enospc_and_changes_nothing(make_env, errno_of):
    dev = make_env(vram="4M").open()
    a, a_data = _written(dev, 4 * MiB, seed=1)
    b, b_data = _written(dev, 4 * MiB, seed=2)
    c, c_data = _written(dev, MiB, seed=3)
    dev.execbuffer([_fill(c, byte=0xC3)])  # c lives in VRAM now
    dev.wait(c, -1)
    assert dev.info(c).placement == "vram"
    before = dev.stats()
    copy = Copy(src=a, src_offset=0, dst=b, dst_offset=0, length=4 * MiB)
    assert errno_of(dev.execbuffer, [copy]) == errno.ENOSPC
    after = dev.stats()
    for key in ("vram_bytes", "evicted_total", "bytes_moved_total", "purged_total", "spilled_total"):
        assert after[key] == before[key], key
    assert [dev.info(x).placement for x in (a, b, c)] == ["system", "system", "vram"]
    assert dev.pread(a, 0, 4 * MiB) == a_data
    assert dev.pread(b, 0, 4 * MiB) == b_data
    assert dev.pread(c, 0, MiB) == _filled(c_data, 0, 16, 0xC3)
    # one of them alone fits: VRAM is not lost after the failure
    dev.execbuffer([_fill(a, byte=1)])
    assert dev.pread(a, 0, 16) == b"\x01" * 16


@pytest.mark.parametrize("ro_first", [True, False])
def test_eacces_wins_over_enospc(make_env, errno_of, fds, ro_first):
    env = make_env(vram="4M")
    owner, importer = env.open(), env.open()
    h = owner.create(4 * MiB)
    ro = importer.import_fd(fds.add(owner.export(h, writable=False)))
    mine = importer.create(4 * MiB)
    cmds = [_fill(ro), _fill(mine)]  # 8 MiB of working set in 4 MiB of VRAM: ENOSPC on its own
    assert errno_of(importer.execbuffer, [Copy(src=ro, src_offset=0, dst=mine, dst_offset=0, length=8)]) \
        == errno.ENOSPC
    assert errno_of(importer.execbuffer, cmds if ro_first else cmds[::-1]) == errno.EACCES


# -- results ---------------------------------------------------------------------------


def test_fill_sets_exactly_its_range(dev):
    h, data = _written(dev, 3 * PAGE, seed=1)
    dev.execbuffer([_fill(h, offset=PAGE - 3, length=PAGE + 6, byte=0xEE)])
    assert dev.pread(h, 0, 3 * PAGE) == _filled(data, PAGE - 3, PAGE + 6, 0xEE)


def test_fill_of_a_never_used_object(dev):
    h = dev.create(2 * PAGE)
    dev.execbuffer([_fill(h, offset=100, length=50, byte=7)])
    assert dev.pread(h, 0, 2 * PAGE) == _filled(bytes(2 * PAGE), 100, 50, 7)


def test_copy_between_objects(dev):
    src, src_data = _written(dev, 4 * PAGE, seed=1)
    dst, dst_data = _written(dev, 2 * PAGE, seed=2)
    dev.execbuffer([Copy(src=src, src_offset=1000, dst=dst, dst_offset=333, length=5000)])
    expected = dst_data[:333] + src_data[1000:6000] + dst_data[5333:]
    assert dev.pread(dst, 0, 2 * PAGE) == expected
    assert dev.pread(src, 0, 4 * PAGE) == src_data


@pytest.mark.parametrize("src_offset, dst_offset", [(0, 100), (100, 0), (0, 1), (1, 0), (500, 500)])
def test_overlapping_copy_is_memmove(dev, src_offset, dst_offset):
    h, data = _written(dev, 2 * PAGE, seed=3)
    length = 6000
    dev.execbuffer([Copy(src=h, src_offset=src_offset, dst=h, dst_offset=dst_offset, length=length)])
    expected = bytearray(data)
    expected[dst_offset:dst_offset + length] = data[src_offset:src_offset + length]
    assert dev.pread(h, 0, 2 * PAGE) == bytes(expected)


def test_one_object_through_two_handles(dev):
    h, data = _written(dev, PAGE, seed=5)
    h2, _ = dev.open_name(dev.flink(h))
    assert h2 != h
    dev.execbuffer([Copy(src=h, src_offset=0, dst=h2, dst_offset=10, length=1000)])
    assert dev.pread(h, 0, PAGE) == data[:10] + data[:1000] + data[1010:]


def test_commands_of_one_list_run_in_order(dev):
    a, b = dev.create(PAGE), dev.create(PAGE)
    dev.execbuffer([
        _fill(a, offset=0, length=64, byte=1),
        Copy(src=a, src_offset=0, dst=b, dst_offset=0, length=64),
        _fill(a, offset=0, length=32, byte=2),
        Copy(src=a, src_offset=0, dst=b, dst_offset=64, length=64),
    ])
    assert dev.pread(b, 0, 128) == b"\x01" * 64 + b"\x02" * 32 + b"\x01" * 32
    assert dev.pread(a, 0, 64) == b"\x02" * 32 + b"\x01" * 32


def test_submissions_and_cpu_writes_interleave_in_order(dev):
    h = dev.create(PAGE)
    dev.execbuffer([_fill(h, length=PAGE, byte=1)])
    dev.pwrite(h, 8, b"cpu")  # waits for the fill, takes the object back
    dev.execbuffer([Copy(src=h, src_offset=8, dst=h, dst_offset=100, length=3)])
    expected = bytearray(b"\x01" * PAGE)
    expected[8:11] = expected[100:103] = b"cpu"
    assert dev.pread(h, 0, PAGE) == bytes(expected)


def _blit_expected(src: bytes, dst: bytes, src_addr, dst_addr, sx: int, sy: int, dx: int, dy: int,
                   width_bytes: int, height: int) -> bytes:
    out = bytearray(dst)
    for row in range(height):
        for col in range(width_bytes):
            out[dst_addr(dx + col, dy + row)] = src[src_addr(sx + col, sy + row)]
    return bytes(out)


def test_linear_blit(dev):
    src, src_data = _written(dev, 2 * PAGE, seed=1)
    dst, dst_data = _written(dev, 2 * PAGE, seed=2)
    dev.execbuffer([Blit(src=src, dst=dst, src_x=3, src_y=5, dst_x=1, dst_y=2, width=7, height=9, cpp=4,
                         src_pitch=64, dst_pitch=128)])
    expected = _blit_expected(src_data, dst_data, lambda x, y: _lin_addr(64, x, y), lambda x, y: _lin_addr(128, x, y),
                              12, 5, 4, 2, 28, 9)
    assert dev.pread(dst, 0, 2 * PAGE) == expected


def test_overlapping_blit_within_one_object_is_memmove(dev):
    h, data = _written(dev, PAGE, seed=4)
    dev.execbuffer([Blit(src=h, dst=h, src_x=0, src_y=0, dst_x=2, dst_y=1, width=8, height=8, cpp=2,
                         src_pitch=32, dst_pitch=32)])
    expected = _blit_expected(data, data, lambda x, y: _lin_addr(32, x, y), lambda x, y: _lin_addr(32, x, y),
                              0, 0, 4, 1, 16, 8)
    assert dev.pread(h, 0, PAGE) == expected


LAYOUTS = {ugem.TILING_X: (_x_addr, 1024), ugem.TILING_Y: (_y_addr, 256)}


@pytest.mark.parametrize("tiling", [ugem.TILING_X, ugem.TILING_Y], ids=["X", "Y"])
def test_blit_into_a_tiled_object_follows_the_spec_layout(dev, tiling):
    addr, stride = LAYOUTS[tiling]
    size = 4 * PAGE  # two rows of two tiles
    tile_rows = size // PAGE // (stride // (512 if tiling == ugem.TILING_X else 128))
    rows = tile_rows * (8 if tiling == ugem.TILING_X else 32)
    src, src_data = _written(dev, 8 * PAGE, seed=5)
    dst, dst_data = _written(dev, size, seed=6)
    assert dev.set_tiling(dst, tiling, stride) == (tiling, stride)
    tile_w, tile_h = (512, 8) if tiling == ugem.TILING_X else (128, 32)
    # a rectangle straddling a tile column boundary and a tile row boundary (and, for Y, 16 B columns)
    dx, dy, width, height, cpp = (tile_w - 20) // 4, tile_h - 3, 11, 6, 4
    assert dy + height <= rows
    dev.execbuffer([Blit(src=src, dst=dst, src_x=2, src_y=1, dst_x=dx, dst_y=dy, width=width, height=height, cpp=cpp,
                         src_pitch=256, dst_pitch=stride)])
    expected = _blit_expected(src_data, dst_data, lambda x, y: _lin_addr(256, x, y), lambda x, y: addr(stride, x, y),
                              8, 1, dx * cpp, dy, width * cpp, height)
    got = dev.pread(dst, 0, size)
    # spot checks at the boundaries, then every byte (raw layout, no detiling)
    for x, y in [(tile_w - 1, tile_h - 1), (tile_w, tile_h - 1), (tile_w - 1, tile_h), (tile_w, tile_h)]:
        assert got[addr(stride, x, y)] == src_data[_lin_addr(256, x - dx * cpp + 8, y - dy + 1)]
    assert got == expected
    assert got != _blit_expected(src_data, dst_data, lambda x, y: _lin_addr(256, x, y),
                                 lambda x, y: _lin_addr(stride, x, y), 8, 1, dx * cpp, dy, width * cpp, height)


def test_tiled_layout_spot_values():
    # the formulas above, pinned to hand-computed offsets (X: 512 B x 8 rows, Y: 128 B x 32 rows)
    assert _x_addr(1024, 511, 7) == 4095 and _x_addr(1024, 512, 0) == 4096 and _x_addr(1024, 0, 8) == 8192
    assert _y_addr(256, 15, 0) == 15 and _y_addr(256, 16, 0) == 512 and _y_addr(256, 0, 1) == 16
    assert _y_addr(256, 128, 0) == 4096 and _y_addr(256, 0, 32) == 8192


def test_blit_between_x_and_y_tiled_objects(dev):
    src, src_data = _written(dev, 4 * PAGE, seed=8)
    dst, dst_data = _written(dev, 4 * PAGE, seed=9)
    dev.set_tiling(src, ugem.TILING_X, 1024)
    dev.set_tiling(dst, ugem.TILING_Y, 256)
    dev.execbuffer([Blit(src=src, dst=dst, src_x=120, src_y=5, dst_x=28, dst_y=29, width=10, height=7, cpp=4,
                         src_pitch=1024, dst_pitch=256)])
    expected = _blit_expected(src_data, dst_data, lambda x, y: _x_addr(1024, x, y), lambda x, y: _y_addr(256, x, y),
                              480, 5, 112, 29, 40, 7)
    assert dev.pread(dst, 0, 4 * PAGE) == expected
    assert dev.pread(src, 0, 4 * PAGE) == src_data
