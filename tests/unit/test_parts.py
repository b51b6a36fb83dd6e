"""Copies in parts (ugem/parts.py) in the simulated device (gpu/copies.py) and in
`ugem.array`: a data range of at least SPLIT_MIN bytes is moved by the copy threads in
page-aligned parts, through a mapping or the host memory's file, in and out, holes kept; a
part that fails fails the copy, once every part has stopped. COPY_THREADS is set here (3:
parts of unequal count and a short last part), so the split runs whatever the machine's CPU
count."""

from __future__ import annotations

import errno
import mmap
import os
import threading
from collections.abc import Iterator

import numpy as np
import pytest

from ugem import parts
from ugem.fd import OwnedFd
from ugem.gpu import copies
from ugem.gpu.base import CopyIn, CopyOut

PAGE = 4096
SIZE = parts.SPLIT_MIN + 5 * PAGE  # 3 parts: two of a third (page-rounded), one shorter


@pytest.fixture(autouse=True)
def three_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parts, "COPY_THREADS", 3)


@pytest.fixture
def host() -> Iterator[tuple[int, mmap.mmap]]:
    fd = os.memfd_create("copies-test", os.MFD_CLOEXEC)
    os.ftruncate(fd, SIZE)
    view = mmap.mmap(fd, SIZE)
    try:
        yield fd, view
    finally:
        view.close()
        os.close(fd)


def _pattern(seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, SIZE, dtype=np.uint8).tobytes()


def _threads_seen(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """Names of the threads that run np.copyto, preadv or pwritev from now on: this one and
    copy threads (the patch is process-wide: another test's leftover thread is not counted)."""
    seen: set[str] = set()
    caller = threading.current_thread()

    def spy(name: str, real: object) -> object:
        def call(*args: object, **kwargs: object) -> object:
            thread = threading.current_thread()
            if thread is caller or thread.name == "ugem-copy":
                seen.add(thread.name)
            return real(*args, **kwargs)  # type: ignore[operator]
        return call

    monkeypatch.setattr(np, "copyto", spy("copyto", np.copyto))
    monkeypatch.setattr(copies.os, "preadv", spy("preadv", os.preadv))
    monkeypatch.setattr(copies.os, "pwritev", spy("pwritev", os.pwritev))
    return seen


@pytest.mark.parametrize("through", ["mapping", "file"])
def test_a_large_copy_in_and_out_moves_every_byte_in_parts(host: tuple[int, mmap.mmap], through: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    fd, view = host
    data = _pattern(1)
    view[:] = data
    vram = bytearray(SIZE + 2 * PAGE)
    seen = _threads_seen(monkeypatch)
    file = OwnedFd(os.dup(fd)) if through == "file" else None
    try:
        copies.copy(memoryview(vram), CopyIn(PAGE, view, SIZE, file=file))
        assert bytes(vram[PAGE:PAGE + SIZE]) == data and not any(vram[:PAGE]) and not any(vram[-PAGE:])
        assert seen == {threading.current_thread().name, "ugem-copy"}
        vram[PAGE:PAGE + SIZE] = _pattern(2)
        view[:] = bytes(SIZE)
        out = OwnedFd(os.dup(fd)) if through == "file" else None
        try:
            copies.copy(memoryview(vram), CopyOut(PAGE, view, SIZE, file=out))
        finally:
            if out is not None:
                out.close()
        assert os.pread(fd, SIZE, 0) == _pattern(2)
    finally:
        if file is not None:
            file.close()


def test_holes_stay_holes_around_a_range_moved_in_parts(host: tuple[int, mmap.mmap]) -> None:
    fd, view = host
    vram = bytearray(_pattern(3))
    vram[:PAGE] = bytes(PAGE)  # the host's first page is a hole; device memory holds zeros there
    copies.copy(memoryview(vram), CopyOut(0, view, SIZE, holes=((0, PAGE),), file=None))
    assert os.pread(fd, SIZE, 0) == bytes(vram)
    assert os.fstat(fd).st_blocks * 512 == SIZE - PAGE  # the hole was not written


def test_a_part_that_fails_fails_the_copy_after_every_part_stopped(host: tuple[int, mmap.mmap],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    fd, _ = host
    stopped: list[int] = []
    real = os.pwritev

    def pwritev(fd: int, buffers: list[memoryview], offset: int) -> int:
        if offset > 0 and threading.current_thread().name == "ugem-copy" and not stopped:
            stopped.append(offset)
            raise OSError(errno.EIO, "injected")
        return real(fd, buffers, offset)

    monkeypatch.setattr(copies.os, "pwritev", pwritev)
    before = threading.active_count()
    file = OwnedFd(os.dup(fd))
    try:
        with pytest.raises(OSError) as failed:
            copies.copy(memoryview(bytearray(_pattern(4))), CopyOut(0, bytearray(SIZE), SIZE, file=file))
    finally:
        file.close()
    assert failed.value.errno == errno.EIO and stopped
    assert threading.active_count() == before  # every part's thread was joined


def test_a_small_copy_stays_on_the_calling_thread(host: tuple[int, mmap.mmap], monkeypatch: pytest.MonkeyPatch) -> None:
    fd, view = host
    seen = _threads_seen(monkeypatch)
    size = parts.SPLIT_MIN - PAGE
    copies.copy(memoryview(bytearray(_pattern(5)[:size])), CopyOut(0, view, size))
    assert seen == {threading.current_thread().name}
    assert os.pread(fd, size, 0) == _pattern(5)[:size]


@pytest.mark.parametrize("shape, dtype", [((parts.SPLIT_MIN // 8 + 513,), np.float64),
                                          ((3, parts.SPLIT_MIN // 6 + 7), np.uint16)])
def test_ugem_array_copies_a_big_value_in_parts(shape: tuple[int, ...], dtype: type,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import ugem

    value = np.random.default_rng(6).integers(0, 1000, shape).astype(dtype)
    with ugem.Manager() as manager, manager.open() as dev:
        seen = _threads_seen(monkeypatch)
        got = ugem.array(value, device=dev)
        assert seen == {threading.current_thread().name, "ugem-copy"}
        assert got.shape == value.shape and got.dtype == value.dtype and np.array_equal(got, value)
        strided = ugem.array(value[..., ::2], device=dev)  # not contiguous: numpy's own copy, one thread
        assert np.array_equal(strided, value[..., ::2])
        del got, strided


def test_a_big_read_through_a_mapping_runs_in_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    """client/bulk.py reads a sealed memfd through a mapping (backing/mapping.py
    `read_mapped`), a big one in parts, at any offset."""
    import fcntl

    from ugem.backing.mapping import MAPPED_MIN
    from ugem.client.bulk import preadv_all

    size = MAPPED_MIN + 5 * PAGE  # smaller reads use preadv
    data = (np.arange(size // 8, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)).tobytes()
    fd = OwnedFd(os.memfd_create("parts-read", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING))
    try:
        os.pwrite(fd.fd, data, 0)
        fcntl.fcntl(fd.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        seen = _threads_seen(monkeypatch)
        out = bytearray(size - 3 * PAGE - 5)
        preadv_all(fd, out, 3 * PAGE + 5)
        assert seen == {threading.current_thread().name, "ugem-copy"}
        assert out == data[3 * PAGE + 5:]
    finally:
        fd.close()


def test_a_part_whose_thread_cannot_start_runs_on_the_callers(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    value = np.arange(parts.SPLIT_MIN // 4 + 1000, dtype=np.uint32)
    out = np.zeros_like(value)
    parts.copyto(out, value)
    assert np.array_equal(out, value)


def _filled_memfd(size: int) -> tuple[OwnedFd, bytes]:
    data = (np.arange(size // 8, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)).tobytes()
    fd = OwnedFd(os.memfd_create("parts-preadv", os.MFD_CLOEXEC))
    os.pwrite(fd.fd, data, 0)
    return fd, data


def test_a_big_preadv_below_the_mapping_threshold_runs_in_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    """client/bulk.py and the manager's own reads (backing/memfd.py) read with preadv in parts
    where they do not map (below MAPPED_MIN, or unsealed memory), at any offset."""
    from ugem.backing import memfd
    from ugem.client import bulk

    monkeypatch.setattr(bulk, "MAPPED_MIN", 1 << 40)
    monkeypatch.setattr(memfd, "MAPPED_MIN", 1 << 40)
    fd, data = _filled_memfd(SIZE + PAGE)
    try:
        for read in (lambda out: bulk.preadv_all(fd, out, 3 * PAGE + 5),
                     lambda out: memfd.MemfdStore.read(None, fd, 3 * PAGE + 5, memoryview(out))):  # type: ignore[arg-type]
            seen = _threads_seen(monkeypatch)
            out = bytearray(SIZE - 3 * PAGE)
            read(out)
            assert seen == {threading.current_thread().name, "ugem-copy"}
            assert out == data[3 * PAGE + 5:3 * PAGE + 5 + len(out)]
    finally:
        fd.close()


def test_preadv_into_names_what_the_file_did_not_hold() -> None:
    from ugem.backing import memfd
    from ugem.client import bulk
    from ugem.errors import IOFailure

    fd, data = _filled_memfd(SIZE // 2)  # the file ends inside the second part of three
    try:
        out = bytearray(b"\xee" * SIZE)
        short = parts.preadv_into(fd.fd, memoryview(out), PAGE)
        assert short and short[0][0] == SIZE // 2 - PAGE
        assert out[:SIZE // 2 - PAGE] == data[PAGE:]
        with pytest.raises(IOFailure, match=f"offset {SIZE // 2}"):
            bulk.preadv_all(fd, bytearray(SIZE), PAGE)
        out = bytearray(b"\xee" * SIZE)
        memfd.MemfdStore.read(None, fd, PAGE, memoryview(out))  # type: ignore[arg-type]
        assert out == data[PAGE:] + bytes(SIZE - len(data) + PAGE)  # the rest zero-filled
        assert parts.preadv_into(fd.fd, memoryview(bytearray(SIZE // 4)), 0) == []
    finally:
        fd.close()
