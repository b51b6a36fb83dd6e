"""create / close_handle / info, handle allocation and client isolation (SPEC §1, §2;
gem-reference §1.2, §1.3, §2.1, IGT gem_basic, gem_create, gem_close)."""

from __future__ import annotations

import dataclasses
import errno

import pytest

import ugem

PAGE = ugem.PAGE_SIZE
MAX = 2**46


# -- create ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, -1, -PAGE, -(2**63)])
def test_create_nonpositive_size_is_einval(dev, errno_of, size):
    assert errno_of(dev.create, size) == errno.EINVAL


@pytest.mark.parametrize("size", [MAX + 1, MAX + PAGE, 2**63 - 1, 2**64, -(1 << 32) & (2**64 - 1)])
def test_create_too_big_is_e2big(dev, errno_of, size):
    # IGT gem_create create-massive uses -1ull << 32; anything past 2**46 is E2BIG
    assert errno_of(dev.create, size) == errno.E2BIG


def test_failed_create_allocates_no_handle(dev, errno_of):
    assert errno_of(dev.create, 0) == errno.EINVAL
    assert errno_of(dev.create, MAX + 1) == errno.E2BIG
    assert dev.create(1) == 1


def test_create_largest_size_is_accepted_without_pages(dev):
    h = dev.create(MAX)
    info = dev.info(h)
    assert info.size == MAX
    assert info.placement == "none"
    # reading a never-used object gives zeros and does not populate it
    assert dev.pread(h, MAX - 16, 16) == bytes(16)
    assert dev.info(h).placement == "none"
    dev.close_handle(h)


@pytest.mark.parametrize("size, rounded", [(1, PAGE), (15, PAGE), (2048, PAGE), (PAGE, PAGE),
                                           (PAGE + 1, 2 * PAGE), (5 * PAGE - 7, 5 * PAGE)])
def test_create_rounds_size_up_to_a_page(dev, size, rounded):
    h = dev.create(size)
    assert dev.info(h).size == rounded


def test_padding_of_a_nonaligned_object_is_usable(dev):
    # IGT gem_create create-valid-nonaligned: pwrite into the padding past the requested size
    h = dev.create(2048)
    dev.pwrite(h, PAGE - 8, b"padding!")
    assert dev.pread(h, PAGE - 8, 8) == b"padding!"


def test_new_objects_read_as_zero(dev):
    sizes = [1, PAGE, 3 * PAGE + 5, 64 * PAGE]
    for size in sizes:
        h = dev.create(size)
        full = dev.info(h).size
        assert dev.pread(h, 0, full) == bytes(full)


def test_new_object_reads_zero_after_a_freed_one_was_dirtied(dev):
    # pages are never recycled with old contents (create-clear)
    h = dev.create(8 * PAGE)
    dev.pwrite(h, 0, b"\xa5" * (8 * PAGE))
    dev.close_handle(h)
    h2 = dev.create(8 * PAGE)
    dev.pwrite(h2, 0, b"x")  # populate it
    assert dev.pread(h2, 1, 8 * PAGE - 1) == bytes(8 * PAGE - 1)


# -- close_handle ----------------------------------------------------------------------


@pytest.mark.parametrize("handle", [0, 1, 2, 0x10101010, -1, 2**32, 2**40])
def test_close_unknown_handle_is_einval(dev, errno_of, handle):
    assert errno_of(dev.close_handle, handle) == errno.EINVAL


def test_double_close_is_einval(dev, errno_of):
    h = dev.create(PAGE)
    dev.close_handle(h)
    assert errno_of(dev.close_handle, h) == errno.EINVAL


def test_closed_handle_is_enoent_everywhere(dev, errno_of):
    h = dev.create(PAGE)
    dev.close_handle(h)
    assert errno_of(dev.info, h) == errno.ENOENT
    assert errno_of(dev.pread, h, 0, 1) == errno.ENOENT
    assert errno_of(dev.pwrite, h, 0, b"x") == errno.ENOENT
    assert errno_of(dev.mmap, h) == errno.ENOENT
    assert errno_of(dev.flink, h) == errno.ENOENT
    assert errno_of(dev.export, h) == errno.ENOENT


# -- handle allocation -----------------------------------------------------------------


def test_handles_are_lowest_free_from_one(dev):
    assert [dev.create(PAGE) for _ in range(4)] == [1, 2, 3, 4]
    dev.close_handle(2)
    assert dev.create(PAGE) == 2
    dev.close_handle(3)
    dev.close_handle(1)
    assert dev.create(PAGE) == 1
    assert dev.create(PAGE) == 3
    assert dev.create(PAGE) == 5


def test_reused_handle_refers_to_the_new_object(dev):
    h = dev.create(PAGE)
    dev.pwrite(h, 0, b"old")
    dev.close_handle(h)
    h2 = dev.create(2 * PAGE)
    assert h2 == h
    assert dev.info(h2).size == 2 * PAGE
    assert dev.pread(h2, 0, 3) == bytes(3)


def test_handles_are_per_client(env, errno_of):
    a, b = env.open(), env.open()
    ha = a.create(PAGE)
    a.pwrite(ha, 0, b"client a")
    assert ha == 1
    # b has no handle 1 yet: everything is ENOENT (close is EINVAL)
    assert errno_of(b.info, ha) == errno.ENOENT
    assert errno_of(b.pread, ha, 0, 8) == errno.ENOENT
    assert errno_of(b.pwrite, ha, 0, b"intruder") == errno.ENOENT
    assert errno_of(b.mmap, ha) == errno.ENOENT
    assert errno_of(b.flink, ha) == errno.ENOENT
    assert errno_of(b.export, ha) == errno.ENOENT
    assert errno_of(b.close_handle, ha) == errno.EINVAL
    # b allocates from 1 on its own; its handle 1 is a different object
    hb = b.create(2 * PAGE)
    assert hb == 1
    assert b.info(hb).size == 2 * PAGE
    assert b.pread(hb, 0, 8) == bytes(8)
    b.close_handle(hb)
    assert a.pread(ha, 0, 8) == b"client a"


# -- info ------------------------------------------------------------------------------


def test_info_of_a_new_object(dev):
    h = dev.create(3 * PAGE)
    assert dev.info(h) == ugem.ObjectInfo(
        size=3 * PAGE, placement="none", madvise="willneed", name=0, tiling=ugem.TILING_NONE, stride=0,
        caching=ugem.CACHING_NONE, busy=False, pinned=False, userptr=False, readonly=False)


def test_info_placement_system_after_first_write(dev):
    h = dev.create(PAGE)
    dev.pread(h, 0, PAGE)
    assert dev.info(h).placement == "none"
    dev.pwrite(h, 10, b"x")
    assert dev.info(h).placement == "system"


def test_info_reports_the_name(dev):
    h = dev.create(PAGE)
    name = dev.flink(h)
    assert name > 0
    assert dev.info(h).name == name


def test_info_is_frozen(dev):
    info = dev.info(dev.create(PAGE))
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.size = 0  # type: ignore[misc]


@pytest.mark.parametrize("handle", [0, 1, 0x10101010, -1, 2**32])
def test_info_unknown_handle_is_enoent(dev, errno_of, handle):
    assert errno_of(dev.info, handle) == errno.ENOENT


# -- closed Device and Manager ---------------------------------------------------------


def _every_call(dev, fd):
    return {
        "create": lambda: dev.create(PAGE),
        "close_handle": lambda: dev.close_handle(1),
        "info": lambda: dev.info(1),
        "pread": lambda: dev.pread(1, 0, 1),
        "pread_empty": lambda: dev.pread(1, 0, 0),
        "pread_into": lambda: dev.pread_into(1, 0, bytearray(1)),
        "pwrite": lambda: dev.pwrite(1, 0, b"x"),
        "pwrite_empty": lambda: dev.pwrite(1, 0, b""),
        "mmap": lambda: dev.mmap(1),
        "flink": lambda: dev.flink(1),
        "open_name": lambda: dev.open_name(1),
        "export": lambda: dev.export(1),
        "import_fd": lambda: dev.import_fd(fd),
        "stats": lambda: dev.stats(),
    }


def test_every_call_on_a_closed_device_is_ebadf(env, errno_of, fds):
    other = env.open()
    fd = fds.add(other.export(other.create(PAGE)))
    dev = env.open()
    h = dev.create(PAGE)
    dev.flink(h)
    dev.close()
    dev.close()  # idempotent
    for what, call in _every_call(dev, fd).items():
        assert errno_of(call) == errno.EBADF, what


def test_device_is_a_context_manager_that_releases_everything(env):
    observer = env.open()
    before = observer.stats()["objects"]
    with env.open() as dev:
        for _ in range(3):
            dev.pwrite(dev.create(PAGE), 0, b"data")
        assert observer.stats()["objects"] == before + 3
    assert dev.closed
    # close returns only after the manager released them
    assert observer.stats()["objects"] == before


def test_closed_manager_fails_with_ebadf(env, errno_of):
    if env.mode != "embedded":
        pytest.skip("a Manager exists only in embedded mode")
    manager = ugem.Manager()
    dev = manager.open()
    dev.create(PAGE)
    manager.close()
    assert errno_of(dev.create, PAGE) == errno.EBADF
    assert errno_of(dev.info, 1) == errno.EBADF
    assert errno_of(manager.open) == errno.EBADF
    dev.close()


def test_embedded_device_owns_its_manager(env, errno_of):
    if env.mode != "embedded":
        pytest.skip("ugem.embedded() is the embedded mode")
    dev = ugem.embedded()
    h = dev.create(PAGE)
    dev.pwrite(h, 0, b"abc")
    assert dev.pread(h, 0, 3) == b"abc"
    dev.close()
    assert errno_of(dev.info, h) == errno.EBADF
