"""import_fd of memory the manager did not make (SPEC §6 "Foreign memory", §2 import_fd /
export; gem-reference §1.3 PRIME_FD_TO_HANDLE: not an fd -> EBADF, not acceptable -> EINVAL)."""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import tempfile

import pytest

import ugem

PAGE = ugem.PAGE_SIZE


# -- not acceptable: EBADF / EINVAL ----------------------------------------------------


def test_not_an_open_fd_is_ebadf(dev, errno_of):
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    assert errno_of(dev.import_fd, r) == errno.EBADF
    assert errno_of(dev.import_fd, w) == errno.EBADF


def test_pipe_is_einval(dev, errno_of, fds):
    r, w = os.pipe()
    fds.add(r)
    fds.add(w)
    assert errno_of(dev.import_fd, r) == errno.EINVAL
    assert errno_of(dev.import_fd, w) == errno.EINVAL


def test_socket_is_einval(dev, errno_of):
    left, right = socket.socketpair()
    with left, right:
        assert errno_of(dev.import_fd, left.fileno()) == errno.EINVAL


def test_dev_null_is_einval(dev, errno_of, fds):
    fd = fds.add(os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC))
    assert errno_of(dev.import_fd, fd) == errno.EINVAL


@pytest.mark.parametrize("directory", [None, "/dev/shm"])
def test_regular_file_is_einval(dev, errno_of, directory):
    # a regular file (even on tmpfs, page-aligned) can be truncated by any writer
    with tempfile.TemporaryFile(dir=directory) as f:
        f.write(b"\0" * PAGE)
        f.flush()
        assert errno_of(dev.import_fd, f.fileno()) == errno.EINVAL


def test_unsealed_memfd_is_einval(dev, errno_of, sealed_memfd, fds):
    assert errno_of(dev.import_fd, sealed_memfd(PAGE, seals=0)) == errno.EINVAL
    plain = fds.add(os.memfd_create("no-sealing", os.MFD_CLOEXEC))  # sealing not even allowed
    os.ftruncate(plain, PAGE)
    assert errno_of(dev.import_fd, plain) == errno.EINVAL


@pytest.mark.parametrize("seals", [fcntl.F_SEAL_GROW, fcntl.F_SEAL_WRITE, fcntl.F_SEAL_SEAL])
def test_memfd_sealed_without_shrink_is_einval(dev, errno_of, sealed_memfd, seals):
    assert errno_of(dev.import_fd, sealed_memfd(PAGE, seals=seals)) == errno.EINVAL


@pytest.mark.parametrize("size", [1, PAGE - 1, PAGE + 1, 3 * PAGE + 100])
def test_sealed_memfd_of_unaligned_size_is_einval(dev, errno_of, sealed_memfd, size):
    assert errno_of(dev.import_fd, sealed_memfd(size)) == errno.EINVAL


def test_sealed_empty_memfd_is_einval(dev, errno_of, sealed_memfd):
    assert errno_of(dev.import_fd, sealed_memfd(0)) == errno.EINVAL


def test_failed_imports_allocate_no_handle(dev, errno_of, sealed_memfd):
    assert errno_of(dev.import_fd, sealed_memfd(PAGE + 1)) == errno.EINVAL
    assert errno_of(dev.import_fd, sealed_memfd(PAGE, seals=0)) == errno.EINVAL
    assert dev.create(PAGE) == 1


# -- acceptable: a memfd sealed against shrinking --------------------------------------


def test_sealed_memfd_is_imported_in_place(dev, fds, sealed_memfd):
    fd = sealed_memfd(2 * PAGE, data=b"client memory")
    h = dev.import_fd(fd)
    info = dev.info(h)
    assert info.size == 2 * PAGE
    assert not info.readonly and not info.userptr
    assert dev.pread(h, 0, 13) == b"client memory"
    dev.pwrite(h, PAGE, b"written by the manager")
    assert os.pread(fd, 22, PAGE) == b"written by the manager"
    os.pwrite(fd, b"CLIENT", 0)
    assert dev.pread(h, 0, 13) == b"CLIENT memory"


def test_foreign_memory_is_shared_through_mappings(dev, sealed_memfd):
    fd = sealed_memfd(PAGE)
    h = dev.import_fd(fd)
    view = dev.mmap(h)
    view[:4] = b"map!"
    assert os.pread(fd, 4, 0) == b"map!"
    os.pwrite(fd, b"file", 4)
    assert bytes(view[:8]) == b"map!file"


@pytest.mark.parametrize("seals", [
    fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW,
    fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL,
])
def test_any_seal_set_with_shrink_is_accepted(dev, sealed_memfd, seals):
    h = dev.import_fd(sealed_memfd(PAGE, seals=seals, data=b"ok"))
    assert dev.pread(h, 0, 2) == b"ok"


def test_reimport_of_a_foreign_memfd_returns_the_same_handle(env, sealed_memfd, fds):
    a, b = env.open(), env.open()
    fd = sealed_memfd(PAGE)
    h = a.import_fd(fd)
    assert a.import_fd(fd) == h
    dup = fds.add(os.dup(fd))
    assert a.import_fd(dup) == h
    hb = b.import_fd(fd)  # another client: a new handle to the same object
    b.pwrite(hb, 0, b"one object")
    assert a.pread(h, 0, 10) == b"one object"


def test_read_only_fd_to_a_sealed_memfd_gives_a_read_only_handle(dev, errno_of, sealed_memfd, fds):
    fd = sealed_memfd(PAGE, data=b"read me")
    ro_fd = fds.add(os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC))
    h = dev.import_fd(ro_fd)
    assert dev.info(h).readonly
    assert dev.pread(h, 0, 7) == b"read me"
    assert errno_of(dev.pwrite, h, 0, b"x") == errno.EINVAL
    assert errno_of(dev.mmap, h) == errno.EACCES


def test_export_of_a_foreign_import_is_einval(dev, errno_of, sealed_memfd):
    h = dev.import_fd(sealed_memfd(PAGE))
    assert errno_of(dev.export, h) == errno.EINVAL
    assert errno_of(dev.export, h, writable=False) == errno.EINVAL


def test_export_of_a_read_only_foreign_import_is_still_einval(dev, errno_of, sealed_memfd, fds):
    # the proxy check comes before the read-only one
    fd = sealed_memfd(PAGE)
    ro = dev.import_fd(fds.add(os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)))
    assert errno_of(dev.export, ro, writable=True) == errno.EINVAL


def test_foreign_memory_is_not_counted_as_resident(make_env, sealed_memfd):
    dev = make_env().open()
    fd = sealed_memfd(16 * PAGE, data=b"\x01" * (16 * PAGE))
    h = dev.import_fd(fd)
    dev.pwrite(h, 0, b"\x02" * (16 * PAGE))
    stats = dev.stats()
    assert stats["objects"] == 1
    assert stats["resident_bytes"] == 0
    [me] = stats["per_client"]
    assert me["objects"] == 1 and me["bytes"] == 0


def test_foreign_import_dies_with_its_last_handle_but_the_memfd_lives(dev, sealed_memfd):
    fd = sealed_memfd(PAGE)
    before = dev.stats()["objects"]
    h = dev.import_fd(fd)
    dev.pwrite(h, 0, b"stays")
    assert dev.stats()["objects"] == before + 1
    dev.close_handle(h)
    assert dev.stats()["objects"] == before
    assert os.pread(fd, 5, 0) == b"stays"
