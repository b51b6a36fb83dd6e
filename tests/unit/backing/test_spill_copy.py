"""backing/spill.py: the copies between object memfds and the spill file (splice through a
private pipe at explicit offsets), on real memfds and a real spill directory."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest

from ugem.backing import spill
from ugem.backing.spill import SpillStore, copy_ranges, data_segments, punch_hole

PAGE = 4096
MiB = 1 << 20


def _memfd(size: int) -> int:
    fd = os.memfd_create("spill-test", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def test_copy_ranges_moves_each_range_to_its_offset_and_leaves_file_positions_alone() -> None:
    src, dst = _memfd(4 * MiB), _memfd(4 * MiB)
    try:
        data = os.urandom(3 * MiB + 123)  # longer than the pipe, and not a multiple of it
        os.pwrite(src, data, 0)
        os.lseek(dst, 77, os.SEEK_SET)
        moved = copy_ranges(src, dst, [(0, PAGE, len(data)), (5, 0, 10)])
        assert moved == len(data) + 10
        assert os.pread(dst, len(data), PAGE) == data and os.pread(dst, 10, 0) == data[5:15]
        assert os.lseek(dst, 0, os.SEEK_CUR) == 77 and os.lseek(src, 0, os.SEEK_CUR) == 0
    finally:
        os.close(src)
        os.close(dst)


def test_copy_ranges_past_the_end_of_the_source_is_eio() -> None:
    src, dst = _memfd(PAGE), _memfd(4 * PAGE)
    try:
        with pytest.raises(OSError) as failed:
            copy_ranges(src, dst, [(0, 0, 2 * PAGE)])
        assert failed.value.errno == errno.EIO
    finally:
        os.close(src)
        os.close(dst)


def test_a_small_pipe_limit_still_copies_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spill, "_PIPE", PAGE)  # as where pipe-max-size is tiny
    src, dst = _memfd(MiB), _memfd(MiB)
    try:
        data = os.urandom(MiB)
        os.pwrite(src, data, 0)
        assert copy_ranges(src, dst, [(0, 0, MiB)]) == MiB
        assert os.pread(dst, MiB, 0) == data
    finally:
        os.close(src)
        os.close(dst)


def test_store_and_load_round_trip_a_sparse_object_and_keep_its_holes(tmp_path: Path) -> None:
    store = SpillStore(str(tmp_path))
    size = 64 * MiB
    src, back = _memfd(size), _memfd(size)
    try:
        pieces = {0: os.urandom(3 * PAGE), 10 * MiB + PAGE: os.urandom(2 * MiB + PAGE), size - PAGE: os.urandom(PAGE)}
        for offset, data in pieces.items():
            os.pwrite(src, data, offset)
        held = sum(len(d) for d in pieces.values())
        extent = store.reserve(held)
        assert store.store(src, extent, size) == held
        assert store.load(extent, back) == held
        for offset, data in pieces.items():
            assert os.pread(back, len(data), offset) == data
        assert data_segments(back, 0, size) == data_segments(src, 0, size)  # holes stay holes
        assert os.fstat(back).st_blocks * 512 == held
        store.release(extent)
    finally:
        os.close(src)
        os.close(back)
        store.close()


def test_concurrent_stores_and_loads_through_one_spill_file_do_not_mix(tmp_path: Path) -> None:
    # the copies share the spill file's description: explicit offsets, no file position
    store = SpillStore(str(tmp_path))
    objects = []
    try:
        for i in range(4):
            fd = _memfd(4 * MiB)
            data = os.urandom(4 * MiB - i * PAGE)
            os.pwrite(fd, data, 0)
            objects.append((fd, data, store.reserve(len(data))))
        errors: list[BaseException] = []

        def round_trip(fd: int, data: bytes, extent: spill.Extent) -> None:
            try:
                store.store(fd, extent, 4 * MiB)
                punch_hole(fd, 0, 4 * MiB)
                store.load(extent, fd)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=round_trip, args=o) for o in objects]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        for fd, data, extent in objects:
            assert os.pread(fd, len(data), 0) == data
            store.release(extent)
    finally:
        for fd, _, _ in objects:
            os.close(fd)
        store.close()


def test_a_copy_after_close_fails_ebadf_and_touches_no_other_file(tmp_path: Path) -> None:
    store = SpillStore(str(tmp_path))
    src = _memfd(PAGE)
    try:
        os.pwrite(src, b"x" * PAGE, 0)
        extent = store.reserve(PAGE)
        store.close()
        with pytest.raises(OSError) as failed:
            store.store(src, extent, PAGE)
        assert failed.value.errno == errno.EBADF
    finally:
        os.close(src)
