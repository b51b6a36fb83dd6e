"""pread / pread_into / pwrite: data, ranges and the kernel's order of checks (SPEC §2;
gem-reference §2.2: length 0 -> negative -> ENOENT -> range -> read-only; IGT gem_readwrite)."""

from __future__ import annotations

import errno
import fcntl
import os

import numpy as np
import pytest

import ugem

PAGE = ugem.PAGE_SIZE
BIG = 3 << 20  # past the daemon client's inline limit: exercises the shared-memory path


def _pattern(n: int, seed: int = 1) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _readonly_handle(env, fds):
    """(owner device, its handle, importer device, read-only handle in the importer)."""
    owner, importer = env.open(), env.open()
    h = owner.create(2 * PAGE)
    owner.pwrite(h, 0, b"owner data")
    ro = importer.import_fd(fds.add(owner.export(h, writable=False)))
    assert importer.info(ro).readonly
    return owner, h, importer, ro


# -- round trips -----------------------------------------------------------------------


def test_write_then_read_whole_and_partial(dev):
    # IGT gem_readwrite read-write: full, partial (4096, 1024) and partial-read round trips
    h = dev.create(4 * PAGE)
    data = _pattern(4 * PAGE)
    dev.pwrite(h, 0, data)
    assert dev.pread(h, 0, 4 * PAGE) == data
    dev.pwrite(h, PAGE, b"\x5a" * 1024)
    expected = data[:PAGE] + b"\x5a" * 1024 + data[PAGE + 1024:]
    assert dev.pread(h, 0, 4 * PAGE) == expected
    assert dev.pread(h, PAGE - 3, 6) == expected[PAGE - 3:PAGE + 3]
    assert dev.pread(h, 4 * PAGE - 1, 1) == expected[-1:]


def test_pwrite_accepts_any_bytes_like(dev):
    h = dev.create(PAGE)
    dev.pwrite(h, 0, bytearray(b"ab"))
    dev.pwrite(h, 2, memoryview(b"cd"))
    dev.pwrite(h, 4, np.array([0x64636265], dtype="<u4"))  # b"ebcd"
    assert dev.pread(h, 0, 8) == b"abcdebcd"


def test_pread_into_fills_the_buffer(dev):
    h = dev.create(2 * PAGE)
    data = _pattern(2 * PAGE, seed=2)
    dev.pwrite(h, 0, data)
    buf = bytearray(100)
    assert dev.pread_into(h, 50, buf) == 100
    assert bytes(buf) == data[50:150]
    arr = np.zeros(PAGE // 4, dtype=np.uint32)
    assert dev.pread_into(h, PAGE, arr) == PAGE
    assert arr.tobytes() == data[PAGE:]
    view = memoryview(bytearray(10))
    assert dev.pread_into(h, 0, view[2:6]) == 4
    assert bytes(view) == bytes(2) + data[:4] + bytes(4)


def test_large_transfers_round_trip(dev):
    h = dev.create(BIG + PAGE)
    data = _pattern(BIG, seed=3)
    dev.pwrite(h, PAGE // 2, data)
    assert dev.pread(h, PAGE // 2, BIG) == data
    out = np.empty(BIG, dtype=np.uint8)
    assert dev.pread_into(h, PAGE // 2, out) == BIG
    assert out.tobytes() == data
    assert dev.pread(h, 0, PAGE // 2) == bytes(PAGE // 2)
    assert dev.pread(h, BIG + PAGE // 2, PAGE // 2) == bytes(PAGE // 2)


def test_large_read_of_a_new_object_is_zeros_without_pages(dev):
    h = dev.create(BIG)
    assert dev.pread(h, 0, BIG) == bytes(BIG)
    out = np.full(BIG, 0xFF, dtype=np.uint8)
    dev.pread_into(h, 0, out)
    assert not out.any()
    assert dev.info(h).placement == "none"


def test_pwrite_is_visible_to_other_handles_of_the_object(env):
    a, b = env.open(), env.open()
    h = a.create(PAGE)
    hb, _ = b.open_name(a.flink(h))
    a.pwrite(h, 100, b"from a")
    assert b.pread(hb, 100, 6) == b"from a"
    b.pwrite(hb, 0, b"from b")
    assert a.pread(h, 0, 6) == b"from b"


def test_pread_and_pwrite_through_a_mapping_of_the_same_object(dev):
    # IGT gem_pread self / gem_pwrite basic-self: source or destination inside a map
    h = dev.create(2 * PAGE)
    data = _pattern(2 * PAGE, seed=4)
    dev.pwrite(h, 0, data)
    view = dev.mmap(h)
    dev.pread_into(h, 0, view[PAGE:])  # copy page 0 over page 1
    assert dev.pread(h, PAGE, PAGE) == data[:PAGE]
    dev.pwrite(h, 0, view[PAGE + 8:PAGE + 16])
    assert dev.pread(h, 0, 8) == data[8:16]
    del view


# -- length 0: empty result before anything else ---------------------------------------


@pytest.mark.parametrize("handle", [1, 0, 999, 2**32])
def test_zero_length_succeeds_without_lookup(dev, handle):
    # IGT gem_create probes support with a zero-sized pwrite to handle 0
    assert dev.pread(handle, 0, 0) == b""
    assert dev.pread_into(handle, 0, bytearray()) == 0
    assert dev.pwrite(handle, 0, b"") is None


def test_zero_length_ignores_offset(dev):
    h = dev.create(PAGE)
    for offset in (-1, PAGE, 10 * PAGE):
        assert dev.pread(h, offset, 0) == b""
        dev.pwrite(h, offset, b"")
    assert dev.info(h).placement == "none"


def test_zero_length_pwrite_on_a_read_only_handle_succeeds(env, fds):
    owner, h, importer, ro = _readonly_handle(env, fds)
    importer.pwrite(ro, 0, b"")
    assert owner.pread(h, 0, 10) == b"owner data"


# -- one failing check each ------------------------------------------------------------


@pytest.mark.parametrize("offset, length", [(-1, 1), (-PAGE, PAGE), (0, -1), (-(2**63), 1), (0, -(2**70))])
def test_negative_offset_or_length_is_einval(dev, errno_of, offset, length):
    h = dev.create(PAGE)
    assert errno_of(dev.pread, h, offset, length) == errno.EINVAL
    if length > 0:
        assert errno_of(dev.pwrite, h, offset, b"x" * length) == errno.EINVAL
        assert errno_of(dev.pread_into, h, offset, bytearray(length)) == errno.EINVAL


@pytest.mark.parametrize("handle", [0, 2, 1234, 0x10101010, 2**32])
def test_unknown_handle_is_enoent(dev, errno_of, handle):
    dev.create(PAGE)  # handle 1 exists; the others do not
    assert errno_of(dev.pread, handle, 0, 1) == errno.ENOENT
    assert errno_of(dev.pread_into, handle, 0, bytearray(8)) == errno.ENOENT
    assert errno_of(dev.pwrite, handle, 0, b"x") == errno.ENOENT


@pytest.mark.parametrize("offset, length", [
    (0, 2 * PAGE + 1), (2 * PAGE, 1), (2 * PAGE - 1, 2), (PAGE, 2 * PAGE),  # IGT beyond-EOB
    (3 * PAGE, PAGE), (2**63 - 1, 1), (0, 2**62), (2**64, 1),
])
def test_range_beyond_the_object_is_einval(dev, errno_of, offset, length):
    h = dev.create(2 * PAGE)
    assert errno_of(dev.pread, h, offset, length) == errno.EINVAL
    if length <= 2 * PAGE + 1:
        assert errno_of(dev.pwrite, h, offset, b"y" * length) == errno.EINVAL
        assert errno_of(dev.pread_into, h, offset, bytearray(length)) == errno.EINVAL
    assert dev.pread(h, 0, 2 * PAGE) == bytes(2 * PAGE)  # nothing was written


def test_range_at_the_exact_end_is_fine(dev):
    h = dev.create(2 * PAGE)
    dev.pwrite(h, 2 * PAGE - 4, b"tail")
    assert dev.pread(h, 2 * PAGE - 4, 4) == b"tail"
    assert dev.pread(h, 0, 2 * PAGE)[-4:] == b"tail"


def test_large_range_checks_in_both_directions(dev, errno_of):
    h = dev.create(BIG)
    assert errno_of(dev.pread, h, PAGE, BIG) == errno.EINVAL
    assert errno_of(dev.pread_into, h, PAGE, bytearray(BIG)) == errno.EINVAL
    assert errno_of(dev.pwrite, h, PAGE, bytes(BIG)) == errno.EINVAL
    assert errno_of(dev.pread, 77, 0, BIG) == errno.ENOENT
    assert errno_of(dev.pwrite, 77, 0, bytes(BIG)) == errno.ENOENT


def test_pwrite_through_a_read_only_handle_is_einval(env, errno_of, fds):
    owner, h, importer, ro = _readonly_handle(env, fds)
    assert errno_of(importer.pwrite, ro, 0, b"nope") == errno.EINVAL
    assert errno_of(importer.pwrite, ro, 0, bytes(2 * PAGE)) == errno.EINVAL
    assert importer.pread(ro, 0, 10) == b"owner data"  # reading is fine
    assert owner.pread(h, 0, 10) == b"owner data"


# -- order of checks (several would fire; the kernel's first one wins) -----------------


def test_negative_offset_beats_unknown_handle(dev, errno_of):
    assert errno_of(dev.pread, 999, -1, 10) == errno.EINVAL
    assert errno_of(dev.pwrite, 999, -1, b"x") == errno.EINVAL
    assert errno_of(dev.pread, 999, 0, -10) == errno.EINVAL


def test_unknown_handle_beats_range(dev, errno_of):
    dev.create(PAGE)
    assert errno_of(dev.pread, 999, 10 * PAGE, 10) == errno.ENOENT
    assert errno_of(dev.pwrite, 999, 10 * PAGE, b"x") == errno.ENOENT


def test_unknown_handle_beats_read_only(env, errno_of, fds):
    _, _, importer, ro = _readonly_handle(env, fds)
    assert errno_of(importer.pwrite, ro + 1, 0, b"x") == errno.ENOENT


def test_range_is_checked_before_read_only(env, errno_of, fds):
    # both are EINVAL; what matters is that pread (no read-only check) still fails on range
    _, _, importer, ro = _readonly_handle(env, fds)
    assert errno_of(importer.pread, ro, 2 * PAGE, 1) == errno.EINVAL


def test_failed_pwrite_changes_nothing(dev, errno_of):
    h = dev.create(PAGE)
    dev.pwrite(h, 0, b"keep")
    assert errno_of(dev.pwrite, h, PAGE - 2, b"overflow") == errno.EINVAL
    assert dev.pread(h, 0, PAGE) == b"keep" + bytes(PAGE - 4)


def test_manager_io_ignores_flags_set_on_a_client_description(dev, fds):
    # SPEC §3 "own I/O": O_APPEND on an exported fd must not redirect the manager's writes
    h = dev.create(PAGE)
    fd = fds.add(dev.export(h))
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_APPEND)
    dev.pwrite(h, 8, b"in place")
    assert dev.pread(h, 0, 16) == bytes(8) + b"in place"
    assert os.pread(fd, 16, 0) == bytes(8) + b"in place"
