"""PRIME_MAP_TO_FD (op 33): export the object behind one of the client's own tracked
mappings, without a handle; what pickling by reference sends (client/pickling.py).
The same checks and errors as PRIME_HANDLE_TO_FD, a read-only mapping standing for a
read-only handle; an unknown or released mapping id is EINVAL."""

from __future__ import annotations

import errno
import fcntl
import os

import numpy as np
import pytest

import ugem
from ugem.client.registry import find_mapping
from ugem.testing.data import write_new

PAGE = ugem.PAGE_SIZE
MiB = 1 << 20


def _map_id(view: memoryview) -> int:
    address = np.frombuffer(view, dtype=np.uint8).__array_interface__["data"][0]
    entry = find_mapping(address, address + 1)
    assert entry is not None
    return entry.map_id


@pytest.mark.parametrize("map_id", [0, 7, 2**32 - 1])
def test_unknown_mapping_id_is_einval(dev, errno_of, map_id):
    view = dev.mmap(dev.create(PAGE))
    assert errno_of(dev._export_mapping, map_id if map_id != _map_id(view) else 8, True) == errno.EINVAL


def test_released_mapping_id_is_einval(dev, errno_of):
    view = dev.mmap(dev.create(PAGE))
    map_id = _map_id(view)
    del view  # its release is sent before the next request
    assert errno_of(dev._export_mapping, map_id, False) == errno.EINVAL


def test_another_clients_mapping_id_is_einval(env, errno_of):
    a, b = env.open(), env.open()
    view = a.mmap(a.create(PAGE))
    assert errno_of(b._export_mapping, _map_id(view), False) == errno.EINVAL


def test_exports_the_mapped_object_without_a_handle(dev, fds):
    h, data = write_new(dev, 3 * PAGE, seed=5)
    view = dev.mmap(h, offset=PAGE)
    dev.close_handle(h)  # the mapping keeps the object alive
    fd = fds.add(dev._export_mapping(_map_id(view), True))
    assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    assert os.lseek(fd, 0, os.SEEK_END) == 3 * PAGE  # the whole object, not only the mapped part
    assert os.pread(fd, 3 * PAGE, 0) == data
    os.pwrite(fd, b"through the fd", PAGE)
    assert bytes(view[:14]) == b"through the fd"
    h2 = dev.import_fd(fd)  # the same object: a new handle, as for any export
    assert dev.pread(h2, 0, 3 * PAGE) == data[:PAGE] + b"through the fd" + data[PAGE + 14:]


def test_read_only_mapping_exports_read_only_only(dev, errno_of, fds):
    h = dev.create(PAGE)
    view = dev.mmap(h, writable=False)
    assert errno_of(dev._export_mapping, _map_id(view), True) == errno.EACCES
    fd = fds.add(dev._export_mapping(_map_id(view), False))
    assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY


def test_reimport_of_a_mapping_export_returns_the_held_handle(dev, fds):
    h = dev.create(PAGE)
    view = dev.mmap(h)
    fd = fds.add(dev._export_mapping(_map_id(view), True))
    assert dev._import_fd(fd) == (h, True)  # already held: nothing new to close
    assert dev.import_fd(fd) == h


def test_purged_mapped_object_is_efault(make_env, errno_of):
    small = make_env(system_budget=16 * MiB).open()
    h, _ = write_new(small, 4 * MiB, seed=1)
    view = small.mmap(h)
    small.madvise(h, ugem.DONTNEED)
    for i in range(8):  # pressure: 16 MiB of newer objects push the DONTNEED one out
        write_new(small, 2 * MiB, seed=100 + i)
    assert small.info(h).placement == "purged"
    assert errno_of(small._export_mapping, _map_id(view), False) == errno.EFAULT


def test_pinned_in_vram_is_ebusy(dev, errno_of):
    h = dev.create(PAGE)
    view = dev.mmap(h)
    dev.set_domain(h, ugem.DOMAIN_DEVICE)
    dev.pin(h)
    assert errno_of(dev._export_mapping, _map_id(view), False) == errno.EBUSY
