"""mmap: zero-copy shared mappings (SPEC §1, §2, §8; gem-reference §1.3 "mmap on the DRM
fd", §2.3; IGT gem_mmap, gem_mmap_offset basic-uaf / partial-mmap, dumb_buffer map-uaf)."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

import ugem

PAGE = ugem.PAGE_SIZE


def _readonly_pair(env, fds):
    owner, importer = env.open(), env.open()
    h = owner.create(2 * PAGE)
    owner.pwrite(h, 0, b"shared bytes")
    ro = importer.import_fd(fds.add(owner.export(h, writable=False)))
    return owner, h, importer, ro


# -- basics ----------------------------------------------------------------------------


def test_map_reads_zeros_then_tracks_pwrite(dev):
    # IGT gem_mmap basic: zero-initialised and coherent with pwrite
    h = dev.create(2 * PAGE)
    view = dev.mmap(h)
    assert len(view) == 2 * PAGE
    assert bytes(view) == bytes(2 * PAGE)
    dev.pwrite(h, PAGE + 5, b"written")
    assert bytes(view[PAGE + 5:PAGE + 12]) == b"written"


def test_writes_through_the_map_are_seen_by_pread(dev):
    h = dev.create(PAGE)
    view = dev.mmap(h)
    view[100:104] = b"map!"
    assert dev.pread(h, 100, 4) == b"map!"
    assert dev.info(h).placement == "system"


def test_map_populates_a_new_object(dev):
    h = dev.create(PAGE)
    assert dev.info(h).placement == "none"
    view = dev.mmap(h, writable=False)
    assert dev.info(h).placement == "system"
    assert bytes(view) == bytes(PAGE)


def test_two_maps_in_one_client_share_pages(dev):
    h = dev.create(PAGE)
    first, second = dev.mmap(h), dev.mmap(h)
    first[0:5] = b"hello"
    assert bytes(second[0:5]) == b"hello"


def test_read_only_map_is_read_only(dev):
    h = dev.create(PAGE)
    dev.pwrite(h, 0, b"ro")
    view = dev.mmap(h, writable=False)
    assert view.readonly
    assert bytes(view[:2]) == b"ro"
    with pytest.raises(TypeError):
        view[0:1] = b"x"
    assert not np.frombuffer(view, dtype=np.uint8).flags.writeable


def test_numpy_frombuffer_on_a_map(dev):
    h = dev.create(4 * PAGE)
    view = dev.mmap(h)
    arr = np.frombuffer(view, dtype=np.uint32)
    assert arr.shape == (PAGE,)
    assert arr.flags.writeable
    arr[:] = np.arange(PAGE, dtype=np.uint32)
    assert dev.pread(h, 0, 4 * PAGE) == np.arange(PAGE, dtype="<u4").tobytes()
    dev.pwrite(h, 8, np.array([0xDEADBEEF], dtype="<u4"))
    assert arr[2] == 0xDEADBEEF
    del arr, view


# -- partial maps ----------------------------------------------------------------------


def test_partial_map_of_one_middle_page(dev):
    h = dev.create(3 * PAGE)
    dev.pwrite(h, 0, b"a" * PAGE + b"b" * PAGE + b"c" * PAGE)
    view = dev.mmap(h, offset=PAGE, length=PAGE)
    assert len(view) == PAGE
    assert bytes(view) == b"b" * PAGE
    view[0:3] = b"BBB"
    assert dev.pread(h, PAGE - 1, 5) == b"aBBBb"


def test_map_from_an_offset_to_the_end(dev):
    h = dev.create(4 * PAGE)
    dev.pwrite(h, 4 * PAGE - 4, b"last")
    view = dev.mmap(h, offset=2 * PAGE)
    assert len(view) == 2 * PAGE
    assert bytes(view[-4:]) == b"last"


def test_partial_maps_of_first_and_last_page(dev):
    # IGT gem_mmap_offset partial-mmap (2 MiB object), short-mmap
    size = 2 << 20
    h = dev.create(size)
    head = dev.mmap(h, length=PAGE)
    tail = dev.mmap(h, offset=size - PAGE, length=PAGE)
    assert bytes(tail) == bytes(PAGE)
    head[0:4] = b"head"
    tail[-4:] = b"tail"
    assert dev.pread(h, 0, 4) == b"head"
    assert dev.pread(h, size - 4, 4) == b"tail"


# -- errors ----------------------------------------------------------------------------


@pytest.mark.parametrize("handle", [0, 2, 0xDEADBEEF, 1 | (1 << 16), 2**32])
def test_map_of_an_unknown_handle_is_enoent(dev, errno_of, handle):
    dev.create(PAGE)  # handle 1
    assert errno_of(dev.mmap, handle) == errno.ENOENT
    assert errno_of(dev.mmap, handle, writable=False) == errno.ENOENT


@pytest.mark.parametrize("offset", [1, 100, PAGE - 1, PAGE + 1, PAGE // 2])
def test_map_at_an_unaligned_offset_is_einval(dev, errno_of, offset):
    h = dev.create(4 * PAGE)
    assert errno_of(dev.mmap, h, offset=offset, length=PAGE) == errno.EINVAL
    assert errno_of(dev.mmap, h, offset=offset) == errno.EINVAL


@pytest.mark.parametrize("length", [0, -1, -PAGE, -(2**64)])
def test_map_of_nonpositive_length_is_einval(dev, errno_of, length):
    h = dev.create(2 * PAGE)
    assert errno_of(dev.mmap, h, length=length) == errno.EINVAL


@pytest.mark.parametrize("offset, length", [
    (0, 2 * PAGE + 1), (0, 3 * PAGE), (PAGE, 2 * PAGE), (2 * PAGE, PAGE), (2 * PAGE, None),
    (-PAGE, PAGE), (-PAGE, None), (3 * PAGE, None), (0, 2**64), (2**64, PAGE),
])
def test_map_beyond_the_object_is_einval(dev, errno_of, offset, length):
    # IGT gem_mmap bad-offset / bad-size, prime_mmap 2x size / overrunning offset
    h = dev.create(2 * PAGE)
    assert errno_of(dev.mmap, h, offset=offset, length=length) == errno.EINVAL


def test_unknown_handle_is_checked_before_the_range(dev, errno_of):
    assert errno_of(dev.mmap, 5, offset=1, length=0) == errno.ENOENT


def test_writable_map_through_a_read_only_handle_is_eacces(env, errno_of, fds):
    _, _, importer, ro = _readonly_pair(env, fds)
    assert errno_of(importer.mmap, ro) == errno.EACCES
    assert errno_of(importer.mmap, ro, offset=PAGE, length=PAGE) == errno.EACCES


def test_read_only_map_through_a_read_only_handle_works(env, fds):
    owner, h, importer, ro = _readonly_pair(env, fds)
    view = importer.mmap(ro, writable=False)
    assert bytes(view[:12]) == b"shared bytes"
    owner.pwrite(h, 0, b"SHARED")
    assert bytes(view[:12]) == b"SHARED bytes"


# -- lifetime --------------------------------------------------------------------------


def test_map_survives_close_handle(dev):
    # IGT gem_mmap basic, gem_mmap_offset basic-uaf, dumb_buffer map-uaf
    h = dev.create(2 * PAGE)
    dev.pwrite(h, 0, b"before close")
    view = dev.mmap(h)
    dev.close_handle(h)
    assert bytes(view[:12]) == b"before close"
    view[PAGE:PAGE + 11] = b"after close"
    assert bytes(view[PAGE:PAGE + 11]) == b"after close"
    view[:] = b"\x77" * (2 * PAGE)  # every page is still there and writable
    assert bytes(view) == b"\x77" * (2 * PAGE)


def test_map_of_a_never_written_object_survives_close(dev):
    h = dev.create(PAGE)
    view = dev.mmap(h)
    dev.close_handle(h)
    assert bytes(view) == bytes(PAGE)
    view[-1:] = b"z"
    assert bytes(view[-1:]) == b"z"


def test_map_survives_closing_the_device(env):
    # SPEC §1: closing never unmaps anything
    dev = env.open()
    h = dev.create(PAGE)
    dev.pwrite(h, 0, b"still here")
    view = dev.mmap(h)
    dev.close()
    assert bytes(view[:10]) == b"still here"
    view[:4] = b"STIL"
    assert bytes(view[:10]) == b"STILl here"


def test_map_keeps_the_object_alive_for_other_clients(env):
    a, b = env.open(), env.open()
    h = a.create(PAGE)
    hb, _ = b.open_name(a.flink(h))
    view = a.mmap(h)
    a.close_handle(h)
    view[0:6] = b"via a "
    assert b.pread(hb, 0, 6) == b"via a "
    b.pwrite(hb, 6, b"and b")
    assert bytes(view[:11]) == b"via a and b"


def test_releasing_the_last_view_releases_the_object(env):
    dev, observer = env.open(), env.open()
    before = observer.stats()["objects"]
    h = dev.create(PAGE)
    view = dev.mmap(h)
    dev.close_handle(h)
    assert observer.stats()["objects"] == before + 1  # the mapping holds it
    del view
    dev.stats()  # the release is reported with the client's next request
    assert observer.stats()["objects"] == before


# -- sharing across clients ------------------------------------------------------------


def test_maps_in_two_clients_see_the_same_bytes(env, fds):
    a, b = env.open(), env.open()
    h = a.create(2 * PAGE)
    hb = b.import_fd(fds.add(a.export(h)))
    va, vb = a.mmap(h), b.mmap(hb)
    va[10:20] = b"0123456789"
    assert b.pread(hb, 10, 10) == b"0123456789"
    assert bytes(vb[10:20]) == b"0123456789"
    arr = np.frombuffer(vb, dtype=np.uint8)
    arr[PAGE:PAGE + 3] = [1, 2, 3]
    assert bytes(va[PAGE:PAGE + 3]) == b"\x01\x02\x03"
    assert a.pread(h, PAGE, 3) == b"\x01\x02\x03"
    del arr



def test_mappings_hold_no_fd(dev):
    # SPEC §2 mmap: the client library maps without keeping an fd per mapping
    handles = [dev.create(PAGE) for _ in range(64)]
    for h in handles:
        dev.pwrite(h, 0, b"populated")  # an embedded manager keeps its memfds in this process
    first = dev.mmap(handles[0])  # (a daemon client may keep one fd for good: its pidfd of the daemon)
    before = len(os.listdir("/proc/self/fd"))
    views = [first, *(dev.mmap(h) for h in handles[1:])]
    assert len(os.listdir("/proc/self/fd")) == before
    assert all(bytes(v[:9]) == b"populated" for v in views)
