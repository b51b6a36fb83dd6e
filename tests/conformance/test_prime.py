"""export / import_fd of the manager's own objects (SPEC §2, §8; gem-reference §1.3
PRIME_HANDLE_TO_FD / PRIME_FD_TO_HANDLE; IGT prime_self_import, prime_mmap)."""

from __future__ import annotations

import errno
import fcntl
import mmap
import os

import pytest

import ugem
from ugem.cmd import Fill

PAGE = ugem.PAGE_SIZE
NOBODY = 65534  # the uid the cross-uid test drops to


# -- export ----------------------------------------------------------------------------


@pytest.mark.parametrize("handle", [0, 2, 0x10101010, 2**32])
def test_export_of_an_unknown_handle_is_enoent(dev, errno_of, handle):
    dev.create(PAGE)  # handle 1
    assert errno_of(dev.export, handle) == errno.ENOENT
    assert errno_of(dev.export, handle, writable=False) == errno.ENOENT


def test_export_of_a_closed_handle_is_enoent(dev, errno_of):
    # IGT prime_mmap test_errors: "close gem object before priming"
    h = dev.create(PAGE)
    dev.close_handle(h)
    assert errno_of(dev.export, h) == errno.ENOENT


@pytest.mark.parametrize("writable", [True, False])
def test_exported_fd_is_cloexec_sized_and_readable(dev, fds, writable):
    h = dev.create(3 * PAGE)
    dev.pwrite(h, PAGE, b"exported")
    fd = fds.add(dev.export(h, writable=writable))
    assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    assert not os.get_inheritable(fd)
    assert os.lseek(fd, 0, os.SEEK_END) == 3 * PAGE  # IGT basic-llseek-size
    assert os.pread(fd, 8, PAGE) == b"exported"
    access = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    assert access == (os.O_RDWR if writable else os.O_RDONLY)


def test_each_export_is_a_new_fd(dev, fds):
    h = dev.create(PAGE)
    first, second = fds.add(dev.export(h)), fds.add(dev.export(h))
    assert first != second
    assert os.fstat(first).st_ino == os.fstat(second).st_ino


def test_export_of_a_new_object_gives_zeros(dev, fds):
    h = dev.create(2 * PAGE)
    fd = fds.add(dev.export(h))
    assert os.pread(fd, 2 * PAGE, 0) == bytes(2 * PAGE)
    assert os.lseek(fd, 0, os.SEEK_END) == 2 * PAGE


def test_writable_export_is_mmapable_and_shared(dev, fds):
    h = dev.create(2 * PAGE)
    dev.pwrite(h, 0, b"before")
    fd = fds.add(dev.export(h))
    with mmap.mmap(fd, 2 * PAGE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as m:
        assert m[:6] == b"before"
        m[PAGE:PAGE + 5] = b"via m"
        assert dev.pread(h, PAGE, 5) == b"via m"
        dev.pwrite(h, 0, b"AFTER!")
        assert m[:6] == b"AFTER!"
    os.pwrite(fd, b"pwrite", 100)
    assert dev.pread(h, 100, 6) == b"pwrite"


def test_read_only_export_cannot_be_written(dev, fds):
    h = dev.create(PAGE)
    dev.pwrite(h, 0, b"fixed")
    fd = fds.add(dev.export(h, writable=False))
    with pytest.raises(OSError):
        os.pwrite(fd, b"X", 0)
    with pytest.raises(OSError):
        mmap.mmap(fd, PAGE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    with mmap.mmap(fd, PAGE, mmap.MAP_SHARED, mmap.PROT_READ) as m:
        assert m[:5] == b"fixed"
    assert dev.pread(h, 0, 5) == b"fixed"


def test_read_only_export_cannot_be_reopened_writable_by_a_non_root_process(dev, fds, as_user):
    h = dev.create(PAGE)
    fd = fds.add(dev.export(h, writable=False))

    def try_to_write():
        outcome = {}
        for what, attempt in {
            "reopen": lambda: os.open(f"/proc/self/fd/{fd}", os.O_RDWR),
            "pwrite": lambda: os.pwrite(fd, b"X", 0),
            "mmap": lambda: mmap.mmap(fd, PAGE, mmap.MAP_SHARED, mmap.PROT_WRITE),
            "fchmod": lambda: os.fchmod(fd, 0o666),
        }.items():
            try:
                attempt()
                outcome[what] = 0
            except OSError as exc:
                outcome[what] = exc.errno
        return outcome

    with as_user(NOBODY, try_to_write) as outcome:
        assert all(outcome.values()), outcome
    assert dev.pread(h, 0, 1) == b"\0"


# -- import of our own exports ---------------------------------------------------------


def test_self_import_returns_the_original_handle(dev, fds):
    # IGT prime_self_import basic-with_one_bo
    dev.create(PAGE)
    h = dev.create(PAGE)
    fd = fds.add(dev.export(h))
    assert dev.import_fd(fd) == h
    assert dev.import_fd(fd) == h
    ro = fds.add(dev.export(h, writable=False))
    assert dev.import_fd(ro) == h  # same object: the handle this client already has
    assert not dev.info(h).readonly


def test_reimport_into_another_client_returns_one_handle(env, fds):
    a, b = env.open(), env.open()
    h = a.create(PAGE)
    a.pwrite(h, 0, b"same bytes")
    fd = fds.add(a.export(h))
    hb = b.import_fd(fd)
    assert b.import_fd(fd) == hb
    assert b.import_fd(fds.add(a.export(h))) == hb
    assert b.pread(hb, 0, 10) == b"same bytes"
    b.pwrite(hb, 0, b"SAME")
    assert a.pread(h, 0, 10) == b"SAME bytes"
    assert b.stats()["objects"] == a.stats()["objects"]


def test_import_returns_the_lowest_handle_the_client_holds(env, fds):
    a, b = env.open(), env.open()
    h = a.create(PAGE)
    name = a.flink(h)
    b.create(PAGE)  # handle 1: another object
    h2, _ = b.open_name(name)
    h3, _ = b.open_name(name)
    assert (h2, h3) == (2, 3)
    fd = fds.add(a.export(h))
    assert b.import_fd(fd) == 2
    b.close_handle(2)
    assert b.import_fd(fd) == 3


def test_import_after_the_client_closed_its_handle_gives_a_new_one(dev, fds):
    keep = dev.create(PAGE)
    h = dev.create(PAGE)
    name = dev.flink(h)
    other, _ = dev.open_name(name)
    fd = fds.add(dev.export(h))
    dev.close_handle(h)
    dev.close_handle(other)
    h_again = dev.import_fd(fd)
    assert h_again == h  # lowest free again
    assert keep == 1


def test_memory_survives_in_an_exported_fd_after_all_handles_close(env, fds):
    dev, other = env.open(), env.open()
    before = other.stats()["objects"]
    h = dev.create(2 * PAGE)
    dev.pwrite(h, PAGE, b"kept alive by the fd")
    fd = fds.add(dev.export(h))
    dev.close_handle(h)
    assert other.stats()["objects"] == before  # out of the manager's accounting (§8)
    assert os.pread(fd, 20, PAGE) == b"kept alive by the fd"
    # import_fd adopts the memory again
    h2 = other.import_fd(fd)
    assert other.info(h2).size == 2 * PAGE
    assert not other.info(h2).readonly
    assert other.pread(h2, PAGE, 20) == b"kept alive by the fd"
    other.pwrite(h2, 0, b"adopted")
    assert os.pread(fd, 7, 0) == b"adopted"
    assert other.stats()["objects"] == before + 1
    # adopted memory is ours again: exportable and re-importable as the same object
    fd2 = fds.add(other.export(h2))
    assert other.import_fd(fd2) == h2
    assert dev.import_fd(fd2) == dev.import_fd(fd)


def test_readonly_fd_adopted_back_gives_a_read_only_handle(env, errno_of, fds):
    dev, other = env.open(), env.open()
    h = dev.create(PAGE)
    dev.pwrite(h, 0, b"frozen")
    fd = fds.add(dev.export(h, writable=False))
    dev.close_handle(h)
    h2 = other.import_fd(fd)
    assert other.info(h2).readonly
    assert other.pread(h2, 0, 6) == b"frozen"
    assert errno_of(other.pwrite, h2, 0, b"x") == errno.EINVAL
    assert errno_of(other.export, h2) == errno.EACCES


def test_writable_import_after_a_read_only_adoption_is_writable(env, errno_of, fds):
    # b adopts memory the manager let go through a read-only fd; c, holding no handle,
    # imports a writable fd to it: read-only only if the imported fd is
    a, b, c = env.open(), env.open(), env.open()
    h = a.create(2 * PAGE)
    a.pwrite(h, 0, b"let go")
    ro = fds.add(a.export(h, writable=False))
    rw = fds.add(a.export(h))
    a.close_handle(h)
    hb = b.import_fd(ro)
    assert b.info(hb).readonly
    hc = c.import_fd(rw)
    assert not c.info(hc).readonly
    c.pwrite(hc, 0, b"LET GO")
    assert b.pread(hb, 0, 6) == b"LET GO"
    assert os.pread(ro, 6, 0) == b"LET GO"
    view = c.mmap(hc)
    view[PAGE:PAGE + 6] = b"mapped"
    assert b.pread(hb, PAGE, 6) == b"mapped"
    view.release()
    c.execbuffer([Fill(dst=hc, offset=8, length=4, byte=0x21)])
    assert c.pread(hc, 0, 12) == b"LET GO\0\0!!!!"
    assert c.import_fd(fds.add(c.export(hc))) == hc
    # b's handle keeps its mode, and so does a later read-only import
    assert errno_of(b.pwrite, hb, 0, b"x") == errno.EINVAL
    assert a.info(a.import_fd(ro)).readonly


def test_writable_import_of_foreign_memory_after_a_read_only_one_is_writable(env, errno_of, fds, sealed_memfd):
    b, c = env.open(), env.open()
    fd = sealed_memfd(PAGE, data=b"foreign")
    ro = fds.add(os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC))
    hb = b.import_fd(ro)
    assert b.info(hb).readonly
    hc = c.import_fd(fd)
    assert not c.info(hc).readonly
    c.pwrite(hc, 0, b"FOREIGN")
    assert os.pread(fd, 7, 0) == b"FOREIGN"
    assert b.pread(hb, 0, 7) == b"FOREIGN"
    assert errno_of(b.pwrite, hb, 0, b"x") == errno.EINVAL


# -- read-only handles from a read-only export -----------------------------------------


def test_import_of_a_read_only_export_is_read_only(env, errno_of, fds):
    owner, importer = env.open(), env.open()
    h = owner.create(2 * PAGE)
    owner.pwrite(h, 0, b"look, don't touch")
    ro = importer.import_fd(fds.add(owner.export(h, writable=False)))
    info = importer.info(ro)
    assert info.readonly and info.size == 2 * PAGE
    assert importer.pread(ro, 0, 17) == b"look, don't touch"
    assert errno_of(importer.pwrite, ro, 0, b"touch") == errno.EINVAL
    assert errno_of(importer.mmap, ro) == errno.EACCES
    assert errno_of(importer.export, ro) == errno.EACCES
    assert errno_of(importer.export, ro, writable=True) == errno.EACCES
    # what a read-only handle may do
    assert bytes(importer.mmap(ro, writable=False)[:4]) == b"look"
    again = fds.add(importer.export(ro, writable=False))
    assert os.pread(again, 4, 0) == b"look"
    assert owner.pread(h, 0, 17) == b"look, don't touch"
    assert not owner.info(h).readonly


def test_writable_import_after_a_read_only_one_keeps_the_first_handle(env, fds):
    owner, importer = env.open(), env.open()
    h = owner.create(PAGE)
    ro = importer.import_fd(fds.add(owner.export(h, writable=False)))
    # this client already holds a handle for the object: that one is returned
    assert importer.import_fd(fds.add(owner.export(h))) == ro
    assert importer.info(ro).readonly


# -- import errors for fds that are not memory at all (SPEC §6 has the memfd cases) -----


def test_import_of_a_closed_fd_is_ebadf(dev, errno_of):
    fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    os.close(fd)
    assert errno_of(dev.import_fd, fd) == errno.EBADF
    assert errno_of(dev.import_fd, -1) == errno.EBADF
