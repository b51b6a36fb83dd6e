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


def test_concurrent_stores_and_loads_through_the_spill_files_do_not_mix(tmp_path: Path) -> None:
    # the copies share each spill file's description: explicit offsets, no file position
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


def _blocks(fd: int) -> int:
    return os.fstat(fd).st_blocks * 512


def _spill_files(store: SpillStore) -> list[str]:
    return [os.path.join(store.directory, f"spill-{i}") for i in range(spill.FILES)]


def test_a_large_extent_is_split_across_the_files_and_a_segment_may_cross_between_them(tmp_path: Path) -> None:
    store = SpillStore(str(tmp_path))
    size = 32 * MiB
    src, back = _memfd(size), _memfd(size)
    try:
        pieces = {PAGE: os.urandom(3 * MiB + 5), 8 * MiB: os.urandom(5 * MiB), size - 2 * PAGE: os.urandom(PAGE)}
        for offset, data in pieces.items():
            os.pwrite(src, data, offset)
        held = _blocks(src)  # (the partial last page of the first piece is a whole page)
        extent = store.reserve(held)
        assert len(extent.nodes) == spill.FILES == 2 and extent.files == [0, 1]
        assert store.store(src, extent, size) == held
        files = [os.open(p, os.O_RDONLY) for p in _spill_files(store)]
        try:
            assert [_blocks(f) for f in files] == [held // 2, held // 2]  # the 5 MiB segment crosses over
        finally:
            for f in files:
                os.close(f)
        assert _blocks(src) == held  # not asked to free it
        assert store.load(extent, back) == held
        for offset, data in pieces.items():
            assert os.pread(back, len(data), offset) == data
        assert data_segments(back, 0, size) == data_segments(src, 0, size)
        store.release(extent)
        assert store.used_bytes == 0
        assert all(os.stat(p).st_blocks == 0 for p in _spill_files(store))
    finally:
        os.close(src)
        os.close(back)
        store.close()


def test_small_extents_take_turns_between_the_files(tmp_path: Path) -> None:
    store = SpillStore(str(tmp_path))
    try:
        extents = [store.reserve(PAGE) for _ in range(4)]
        assert [e.files for e in extents] == [[0], [1], [0], [1]]
        for e in extents:
            store.release(e)
    finally:
        store.close()


def test_a_spill_frees_its_source_as_it_copies(tmp_path: Path) -> None:
    store = SpillStore(str(tmp_path))
    size = 3 * spill.CHUNK + 5 * PAGE
    src, back = _memfd(size), _memfd(size)
    try:
        data = os.urandom(size)
        os.pwrite(src, data, 0)
        extent = store.reserve(size)
        assert store.store(src, extent, size, free_source=True) == size
        assert _blocks(src) == 0 and os.pread(src, 16, size - 16) == bytes(16)
        assert store.load(extent, back) == size
        assert os.pread(back, size, 0) == data
    finally:
        os.close(src)
        os.close(back)
        store.close()


def test_a_spill_that_fails_half_way_gives_back_what_it_freed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the second file's copy fails at its third chunk, after the first file's half (and two of
    # its own chunks) were freed from the source: the source must read as before
    store = SpillStore(str(tmp_path))
    second = os.path.join(store.directory, "spill-1")
    size = 8 * spill.CHUNK
    src = _memfd(size)
    real = spill.write_out
    calls = {"n": 0}

    def failing(a: int, b: int, piece: tuple[int, int, int], ends: tuple[int, int]) -> None:
        if os.path.samefile(f"/proc/self/fd/{b}", second):
            calls["n"] += 1
            if calls["n"] == 3:
                raise OSError(errno.EIO, "injected")
        real(a, b, piece, ends)

    monkeypatch.setattr(spill, "write_out", failing)
    try:
        data = os.urandom(size)
        os.pwrite(src, data, 0)
        extent = store.reserve(size)
        with pytest.raises(OSError) as failed:
            store.store(src, extent, size, free_source=True)
        assert failed.value.errno == errno.EIO and store.directory in str(failed.value)
        assert calls["n"] == 3
        assert os.pread(src, size, 0) == data
        assert _blocks(src) == size
        store.release(extent)
    finally:
        os.close(src)
        store.close()


def test_a_spill_onto_a_full_disk_fails_before_it_frees_anything(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # a file size limit stands for the full disk (room for one chunk of each half, not two):
    # the space is allocated before any copy, so nothing is punched out of the source
    import resource
    import signal
    store = SpillStore(str(tmp_path))
    size = 4 * spill.CHUNK
    src = _memfd(size)
    punched: list[int] = []
    real = spill.punch_hole

    def punch(fd: int, offset: int, length: int) -> None:
        punched.append(fd)
        real(fd, offset, length)

    monkeypatch.setattr(spill, "punch_hole", punch)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    try:
        data = os.urandom(size)
        os.pwrite(src, data, 0)
        extent = store.reserve(size)
        resource.setrlimit(resource.RLIMIT_FSIZE, (spill.CHUNK + MiB, old[1]))
        try:
            with pytest.raises(OSError) as failed:
                store.store(src, extent, size, free_source=True)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, old)
        assert failed.value.errno == errno.EFBIG
        assert src not in punched
        assert _blocks(src) == size and os.pread(src, size, 0) == data
        store.release(extent)
    finally:
        signal.signal(signal.SIGXFSZ, old_handler)
        os.close(src)
        store.close()
