"""`Device.sole(handle)`: whether a handle is all that refers to its object (GEM_INFO with
INFO_ASK_SOLE), which a client asks before reusing an object for new contents (ugem.dask's
pool)."""

from __future__ import annotations

import errno
import os

import numpy as np

import ugem

PAGE = ugem.PAGE_SIZE


def test_a_new_object_is_sole_with_a_name_but_not_while_mapped(dev):
    h = dev.create(4 * PAGE)
    assert dev.sole(h)
    dev.pwrite(h, 0, b"x" * (4 * PAGE))
    dev.flink(h)  # a name holds no reference
    assert dev.sole(h)
    view = np.frombuffer(dev.mmap(h), dtype=np.uint8)
    assert not dev.sole(h)  # the caller's own mapping sees the bytes too
    del view
    assert dev.sole(h)  # the released mapping is reported with the request


def test_another_handle_or_another_clients_mapping_is_not_sole(env):
    a, b = env.open(), env.open()
    h = a.create(4 * PAGE)
    a.pwrite(h, 0, b"x" * PAGE)
    name = a.flink(h)
    h2, _ = a.open_name(name)
    assert not a.sole(h) and not a.sole(h2)  # two handles, even of one client
    a.close_handle(h2)
    assert a.sole(h)
    hb, _ = b.open_name(name)
    assert not a.sole(h)
    view = np.frombuffer(b.mmap(hb), dtype=np.uint8)
    b.close_handle(hb)
    assert not a.sole(h)  # b's mapping still sees the bytes
    del view
    b.stats()  # b's next request reports the mapping released
    assert a.sole(h)


def test_an_exported_object_is_never_sole_again(dev):
    h = dev.create(PAGE)
    fd = dev.export(h)
    os.close(fd)
    assert not dev.sole(h)  # another process may have mapped the fd: the manager cannot see that


def test_sole_of_an_unknown_handle_is_enoent(dev, errno_of):
    assert errno_of(dev.sole, 7) == errno.ENOENT
