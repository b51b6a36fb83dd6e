"""Copies between host memory and device memory for the simulated GPU (CopyIn, CopyOut).

Rules (the GpuBackend protocol's, gpu/base.py):
- a copy in reads only the host's data ranges and clears its holes in device memory; a copy
  out writes the data ranges whole and, in the holes, only pages of device memory that are
  not all zeros (checked a chunk at a time, so the copy reads what the check just read);
- a copy that carries the host memory's `file` goes through it with preadv / pwritev, at
  most 1 GiB per call (no page faults: fresh pages come from the write path, and reading a
  hole allocates nothing); otherwise through a view of `host`, released on exit;
- np.copyto, preadv and pwritev release the GIL: the daemon's loop keeps running meanwhile;
- a data range of at least SPLIT_MIN bytes is moved in page-aligned parts on several copy
  threads at once (ugem/parts.py, its rules there), as a GPU's copy engines split a transfer
  (the gain is in copies through mappings and preadv: pwritev parts into one memfd take
  turns on its inode lock).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from ..constants import PAGE_SIZE as _PAGE
from ..parts import in_parts
from .base import CopyIn, CopyOut, Holes

__all__ = ["copy", "host_view"]

_CHECK_CHUNK = 1 << 20  # bytes of a hole checked for zeros, then copied, at a time (cache-sized)
_MAX_IO = 1 << 30  # one preadv/pwritev moves at most this much (the kernel caps near 2 GiB)


@contextmanager
def host_view(buffer: Any, length: int) -> Iterator[memoryview]:
    """The first `length` bytes of a host buffer as a flat byte view, released on exit."""
    with memoryview(buffer) as view, view.cast("B") as flat, flat[:length] as part:
        yield part


def copy(memory: memoryview, op: CopyIn | CopyOut) -> None:
    """Carry out one checked copy against `memory` (device memory as a flat byte view)."""
    if isinstance(op, CopyIn) and op.host is None:
        np.frombuffer(memory, dtype=np.uint8, count=op.length, offset=op.vram).fill(0)
    elif isinstance(op, CopyIn) and op.file is not None:  # preadv releases the GIL too
        with memory[op.vram:op.vram + op.length] as dst:
            _copy_in(_file_reader(op.file.fileno()), np.frombuffer(dst, dtype=np.uint8), op.holes)
    elif isinstance(op, CopyIn):  # np.copyto releases the GIL: the daemon loop keeps running
        with host_view(op.host, op.length) as src, memory[op.vram:op.vram + op.length] as dst:
            _copy_in(_buffer_reader(np.frombuffer(src, dtype=np.uint8)), np.frombuffer(dst, dtype=np.uint8),
                     op.holes)
    elif isinstance(op, CopyOut) and op.file is not None:  # the write path: no faults on new pages
        with memory[op.vram:op.vram + op.length] as src:
            _copy_out(np.frombuffer(src, dtype=np.uint8), _file_writer(op.file.fileno()), op.holes)
    else:
        with host_view(op.host, op.length) as dst, memory[op.vram:op.vram + op.length] as src:
            _copy_out(np.frombuffer(src, dtype=np.uint8), _buffer_writer(np.frombuffer(dst, dtype=np.uint8)),
                      op.holes)


def _data_ranges(length: int, holes: Holes) -> Iterator[tuple[int, int]]:
    """The (start, end) ranges of [0, length) between the holes."""
    pos = 0
    for offset, size in holes:
        if offset > pos:
            yield pos, offset
        pos = offset + size
    if pos < length:
        yield pos, length


Reader = Callable[[np.ndarray, int], None]  # fill this slice of device memory from this host offset


def _buffer_reader(host: np.ndarray) -> Reader:
    def get(dst: np.ndarray, offset: int) -> None:
        np.copyto(dst, host[offset:offset + len(dst)])
    return get


def _file_reader(fd: int) -> Reader:
    def get(dst: np.ndarray, offset: int) -> None:
        with dst.data as view:
            done = 0
            while done < len(view):
                with view[done:done + _MAX_IO] as part:
                    n = os.preadv(fd, [part], offset + done)
                if n <= 0:
                    raise OSError(errno.EIO, f"short read from host memory at offset {offset + done}")
                done += n
    return get


def _in_parts(move: Callable[[np.ndarray, int], None], region: np.ndarray, offset: int) -> None:
    """`move(region, offset)` (a Reader or a Writer), in parts on the copy threads if big."""
    in_parts(lambda start, end: move(region[start:end], offset + start), len(region))


def _copy_in(get: Reader, vram: np.ndarray, holes: Holes) -> None:
    """Host -> device memory, never reading the host's holes (device memory cleared there)."""
    for start, end in _data_ranges(len(vram), holes):
        _in_parts(get, vram[start:end], start)
    for offset, size in holes:
        vram[offset:offset + size].fill(0)


Writer = Callable[[np.ndarray, int], None]  # put these bytes of device memory at this host offset


def _buffer_writer(host: np.ndarray) -> Writer:
    def put(src: np.ndarray, offset: int) -> None:
        np.copyto(host[offset:offset + len(src)], src)
    return put


def _file_writer(fd: int) -> Writer:
    def put(src: np.ndarray, offset: int) -> None:
        with src.data as view:
            done = 0
            while done < len(view):
                with view[done:done + _MAX_IO] as part:
                    n = os.pwritev(fd, [part], offset + done)
                if n <= 0:
                    raise OSError(errno.EIO, f"short write to host memory at offset {offset + done}")
                done += n
    return put


def _copy_out(vram: np.ndarray, put: Writer, holes: Holes) -> None:
    """Device memory -> host; in the host's holes only pages that are not all zeros, in
    runs of consecutive pages (a hole stays a hole where the device left zeros). A hole
    is checked and copied a chunk at a time, so the copy reads what the check just read
    from the cache."""
    for start, end in _data_ranges(len(vram), holes):
        _in_parts(put, vram[start:end], start)
    for offset, size in holes:
        for chunk in range(offset, offset + size, _CHECK_CHUNK):
            _copy_nonzero_pages(vram, put, chunk, min(chunk + _CHECK_CHUNK, offset + size))


def _copy_nonzero_pages(vram: np.ndarray, put: Writer, start: int, end: int) -> None:
    src = vram[start:end]
    whole = (end - start) // _PAGE * _PAGE
    nonzero = np.zeros(-(-(end - start) // _PAGE), dtype=bool)
    if whole:
        nonzero[:whole // _PAGE] = src[:whole].view(np.uint64).reshape(-1, _PAGE // 8).any(axis=1)
    if whole < end - start:
        nonzero[-1] = bool(src[whole:].any())
    edges = np.flatnonzero(np.diff(np.concatenate(([0], nonzero.view(np.int8), [0]))))
    for first, last in zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True):
        a, b = start + first * _PAGE, min(start + last * _PAGE, end)
        put(vram[a:b], a)
