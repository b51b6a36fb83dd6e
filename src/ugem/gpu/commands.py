"""GPU command semantics (SPEC §3 "device commands", "tiled layouts"): pure functions.

- `handles(cmd)`, `reads(cmd)` / `writes(cmd)`: the handles a command names / reads / writes,
  so the core can look them up (ENOENT), refuse writes through read-only handles (EACCES)
  and track what the device dirtied.
- `validate(cmd, obj)`: the EINVAL checks of `execbuffer` for one command, against what
  `obj(handle)` returns: anything with size, tiling, stride, caching and proxy (`ObjectLike`:
  the core's object itself, or an `ObjView`).
- `byte_address()` / `addresses()`: where byte (x, y) of a surface lives (linear, X, Y).
- `execute(cmd, targets, cancelled=...)`: perform one command on byte buffers (`Target`s).

Rules:
- No threads, sockets or fds. The only blocking is SemaphoreWait's poll loop, which sleeps
  between polls (20 µs backing off to 1 ms) and raises `Hung` (EIO) once `cancelled()` is true.
- Checks within one command run in a fixed order (see `validate`), so a command with one
  bad field fails with one predictable message naming the field and its value (a valid Fill
  or Copy of plain ints passes a shortcut that formats no message: it runs per command).
  Fields must be ints (not bool); numpy integers are accepted and converted.
- Fill and Copy address raw bytes (no detiling), like pread/pwrite; only Blit goes through
  the tiling. Copy and Blit behave like memmove: a Blit gathers every source byte into a
  temporary before it writes any destination byte, so src == dst with overlapping
  rectangles is correct.
- `execute` re-checks ranges against the real buffers before touching memory (a strided
  view past the end of a buffer would corrupt memory rather than raise), so a bug in the
  caller becomes EINVAL, never a crash. It does not re-check caching: that rule is policy.
- A tiled side of a Blit is gathered/scattered through int64 address arrays, in bands of
  BLIT_BAND elements (bounded memory, a cancellation point per band); linear sides use
  strided views. Tiled blits run at roughly 50-80 ms per 16 MiB, linear ones near memcpy.

Why a Blit's bounds check looks only at two corners: every layout is separable,
addr(x, y) = row(y) + col(x), and both parts strictly increase while x < stride, which
`(x + width) * cpp <= pitch == stride` guarantees. X: col = x//512*4096 + x%512 and
row = y//8 * (stride//512) * 4096 + y%8 * 512 (a step across a tile row adds
(stride//512)*4096 - 7*512 > 0); Y: col = x//128*4096 + (x%128)//16*512 + x%16 and
row = y//32 * (stride//128) * 4096 + y%32 * 16. So the touched bytes span exactly
[addr(x0, y0), addr(x1, y1)] where (x1, y1) is the last byte of the last row.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from ..cmd import Blit, Command, Copy, Fill, SemaphoreWait
from ..constants import CACHING_CACHED, TILING_NONE, TILING_X, TILING_Y
from ..errors import InvalidArgument, IOFailure
from ..ints import integer

__all__ = [
    "Hung",
    "ObjView",
    "ObjectLike",
    "Target",
    "addresses",
    "byte_address",
    "execute",
    "handles",
    "plainly_valid",
    "reads",
    "validate",
    "writes",
]

TILE_BYTES = 4096
TILE_WIDTH = {TILING_X: 512, TILING_Y: 128}
U32_MAX = 0xFFFF_FFFF
BLIT_BAND = 1 << 18  # index elements per band of a tiled blit (2 MiB of int64 addresses)


class Hung(IOFailure):
    """A command was cancelled while it ran (hang_timeout); its fence completes with EIO."""


class ObjectLike(Protocol):
    """What validation needs to know about the object behind one handle."""

    @property
    def size(self) -> int: ...
    @property
    def tiling(self) -> int: ...
    @property
    def stride(self) -> int: ...
    @property
    def caching(self) -> int: ...
    @property
    def proxy(self) -> bool: ...  # userptr or foreign import: used in place, coherently


@dataclass(frozen=True, slots=True)
class ObjView:
    """A plain `ObjectLike`: a snapshot for callers (and tests) without an object at hand."""

    size: int
    tiling: int = TILING_NONE
    stride: int = 0
    caching: int = 0
    proxy: bool = False

    @classmethod
    def of(cls, obj: ObjectLike) -> ObjView:
        return cls(size=obj.size, tiling=obj.tiling, stride=obj.stride, caching=obj.caching, proxy=obj.proxy)


@dataclass(frozen=True, slots=True)
class Target:
    """An object's bytes as the device sees them while a command runs."""

    buf: Any  # writable buffer-protocol object: memoryview, bytearray, numpy uint8 array
    tiling: int = TILING_NONE
    stride: int = 0


# ---------------------------------------------------------------------------- handles


def handles(cmd: Command) -> list[int]:
    """Every handle `cmd` names, each once, in field order (for the ENOENT pass)."""
    match cmd:  # reads(cmd) then writes(cmd), without repeats
        case Fill():
            return [cmd.dst]
        case Copy() | Blit():
            return [cmd.src] if cmd.src == cmd.dst else [cmd.src, cmd.dst]
        case SemaphoreWait():
            return [cmd.obj]
    raise _unknown(cmd)


def reads(cmd: Command) -> list[int]:
    """Handles whose contents `cmd` reads."""
    match cmd:
        case Fill():
            return []
        case Copy() | Blit():
            return [cmd.src]
        case SemaphoreWait():
            return [cmd.obj]
    raise _unknown(cmd)


def writes(cmd: Command) -> list[int]:
    """Handles whose contents `cmd` writes."""
    match cmd:
        case Fill() | Copy() | Blit():
            return [cmd.dst]
        case SemaphoreWait():
            return []
    raise _unknown(cmd)


def _unknown(cmd: object) -> InvalidArgument:
    return InvalidArgument(f"unknown device command type {type(cmd).__name__}")


# ---------------------------------------------------------------------------- addressing


def _tile_width(tiling: int) -> int:
    if tiling in TILE_WIDTH:
        return TILE_WIDTH[tiling]
    raise InvalidArgument(f"unknown tiling mode {tiling}")


def byte_address(tiling: int, stride_or_pitch: int, x_bytes: int, y: int) -> int:
    """Offset in the object of byte `x_bytes` of row `y` (SPEC §3 "tiled layouts")."""
    if tiling == TILING_NONE:
        return y * stride_or_pitch + x_bytes
    if tiling == TILING_X:
        tiles = (y // 8) * (stride_or_pitch // 512) + x_bytes // 512
        return tiles * TILE_BYTES + (y % 8) * 512 + x_bytes % 512
    if tiling == TILING_Y:
        tiles = (y // 32) * (stride_or_pitch // 128) + x_bytes // 128
        return tiles * TILE_BYTES + ((x_bytes % 128) // 16) * 512 + (y % 32) * 16 + x_bytes % 16
    raise InvalidArgument(f"unknown tiling mode {tiling}")


def _row_col(
    tiling: int, pitch: int, x0: int, y0: int, width: int, height: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """The separable parts of `addresses`: row offsets (height,) and column offsets (width,)."""
    y = np.arange(y0, y0 + height, dtype=np.int64)
    x = np.arange(x0, x0 + width, dtype=np.int64)
    if tiling == TILING_NONE:
        return y * pitch, x
    if tiling == TILING_X:
        return (y // 8) * ((pitch // 512) * TILE_BYTES) + (y % 8) * 512, (x // 512) * TILE_BYTES + x % 512
    if tiling == TILING_Y:
        row = (y // 32) * ((pitch // 128) * TILE_BYTES) + (y % 32) * 16
        return row, (x // 128) * TILE_BYTES + ((x % 128) // 16) * 512 + x % 16
    raise InvalidArgument(f"unknown tiling mode {tiling}")


def addresses(tiling: int, pitch: int, x0_bytes: int, y0: int, width_bytes: int, height: int) -> npt.NDArray[np.int64]:
    """`byte_address` for every byte of a rectangle, shape (height, width_bytes), int64."""
    row, col = _row_col(tiling, pitch, x0_bytes, y0, width_bytes, height)
    return row[:, None] + col[None, :]


# ---------------------------------------------------------------------------- validation


_FIELD_NAMES = {cls: tuple(f.name for f in fields(cls)) for cls in (Fill, Copy, Blit, SemaphoreWait)}


def _ints(cmd: Command) -> dict[str, int]:
    """Every field of `cmd` as a Python int; EINVAL naming the first field that is not one."""
    names = _FIELD_NAMES.get(type(cmd)) or tuple(f.name for f in fields(cmd))  # (a subclass)
    v: dict[str, int] = {}
    for name in names:
        value = getattr(cmd, name)
        v[name] = value if type(value) is int else integer(value, f"{type(cmd).__name__}.{name}")
    return v


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidArgument(message)


def _positive(name: str, v: dict[str, int], *keys: str) -> None:
    for key in keys:
        _need(v[key] > 0, f"{name}.{key} must be > 0, got {v[key]}")


def _non_negative(name: str, v: dict[str, int], *keys: str) -> None:
    for key in keys:
        _need(v[key] >= 0, f"{name}.{key} must be >= 0, got {v[key]}")


def _in_object(what: str, handle: int, offset: int, length: int, view: ObjectLike) -> None:
    end = offset + length
    _need(end <= view.size, f"{what}: range {offset}+{length} = {end} exceeds handle {handle}'s size {view.size}")


def validate(cmd: Command, obj: Callable[[int], ObjectLike]) -> None:
    """EINVAL unless `cmd` is well formed and stays inside its objects.

    Order: command type; every field an int; then per command --
    Fill: length > 0, offset >= 0, byte in 0..255, range inside dst.
    Copy: length > 0, offsets >= 0, src range, dst range.
    Blit: width, height, cpp > 0; pitches > 0; coordinates >= 0; then src, dst in turn:
    a tiled object's pitch equals its stride, (x + width) * cpp <= pitch, last byte inside.
    SemaphoreWait: offset >= 0, value in u32, object CACHED or proxy, offset 4-aligned,
    offset + 4 <= size.
    """
    if plainly_valid(cmd, lambda handle: obj(handle).size):
        return
    if not isinstance(cmd, Fill | Copy | Blit | SemaphoreWait):
        raise _unknown(cmd)
    v = _ints(cmd)
    match cmd:
        case Fill():
            _positive("Fill", v, "length")
            _non_negative("Fill", v, "offset")
            _need(0 <= v["byte"] <= 255, f"Fill.byte must be in 0..255, got {v['byte']}")
            _in_object("Fill", v["dst"], v["offset"], v["length"], obj(v["dst"]))
        case Copy():
            _positive("Copy", v, "length")
            _non_negative("Copy", v, "src_offset", "dst_offset")
            _in_object("Copy src", v["src"], v["src_offset"], v["length"], obj(v["src"]))
            _in_object("Copy dst", v["dst"], v["dst_offset"], v["length"], obj(v["dst"]))
        case Blit():
            _positive("Blit", v, "width", "height", "cpp", "src_pitch", "dst_pitch")
            _non_negative("Blit", v, "src_x", "src_y", "dst_x", "dst_y")
            for side in ("src", "dst"):
                _check_blit_side(side, v, obj(v[side]))
        case SemaphoreWait():
            _non_negative("SemaphoreWait", v, "offset")
            _need(0 <= v["value"] <= U32_MAX, f"SemaphoreWait.value must be a u32, got {v['value']}")
            view = obj(v["obj"])
            _need(
                view.caching == CACHING_CACHED or view.proxy,
                f"SemaphoreWait: handle {v['obj']} must be CACHED, userptr or foreign (caching {view.caching})",
            )
            _need(v["offset"] % 4 == 0, f"SemaphoreWait.offset must be 4-aligned, got {v['offset']}")
            _in_object("SemaphoreWait", v["obj"], v["offset"], 4, view)


def plainly_valid(cmd: Command, size: Callable[[int], int]) -> bool:
    """`validate`'s checks of a Fill or Copy of plain ints, naming nothing (`size(handle)`: its
    object's size): True if all pass, else `validate` runs them in order for its message.
    Asks for a size only where `validate` would look at that object (the same ones)."""
    if type(cmd) is Fill:
        dst, offset, length, byte = cmd.dst, cmd.offset, cmd.length, cmd.byte
        return (type(dst) is int and type(offset) is int and type(length) is int and type(byte) is int
                and length > 0 and offset >= 0 and 0 <= byte <= 255 and offset + length <= size(dst))
    if type(cmd) is Copy:
        src, dst, src_offset, dst_offset, length = cmd.src, cmd.dst, cmd.src_offset, cmd.dst_offset, cmd.length
        return (type(src) is int and type(dst) is int and type(src_offset) is int and type(dst_offset) is int
                and type(length) is int and length > 0 and src_offset >= 0 and dst_offset >= 0
                and src_offset + length <= size(src) and dst_offset + length <= size(dst))
    return False


def _check_blit_side(side: str, v: dict[str, int], view: ObjectLike) -> None:
    handle, pitch, x, y = v[side], v[f"{side}_pitch"], v[f"{side}_x"], v[f"{side}_y"]
    cpp, width, height = v["cpp"], v["width"], v["height"]
    if view.tiling != TILING_NONE:
        tile_width = _tile_width(view.tiling)
        _need(
            pitch == view.stride,
            f"Blit.{side}_pitch {pitch} must equal the stride {view.stride} of tiled handle {handle}",
        )
        # set_tiling guarantees this; the corner argument in the module docstring needs it
        _need(pitch % tile_width == 0, f"Blit: handle {handle}'s stride {pitch} is not a multiple of {tile_width}")
    row_end = (x + width) * cpp
    _need(row_end <= pitch, f"Blit {side}: (x + width) * cpp = ({x} + {width}) * {cpp} = {row_end} > pitch {pitch}")
    last = byte_address(view.tiling, pitch, row_end - 1, y + height - 1)
    _need(
        last < view.size,
        f"Blit {side}: last byte touched at {last} is outside handle {handle}'s size {view.size}",
    )


# ---------------------------------------------------------------------------- execution


def _bytes(buf: Any) -> npt.NDArray[np.uint8]:
    """A flat uint8 array over `buf` (no copy; writable iff `buf` is)."""
    return np.frombuffer(buf, dtype=np.uint8)


def execute(
    cmd: Command,
    targets: Mapping[int, Target],
    *,
    cancelled: Callable[[], bool],
    poll_interval: float = 20e-6,
    max_poll_interval: float = 1e-3,
) -> None:
    """Perform `cmd` on the buffers of `targets` (handle -> Target).

    `cancelled()` is asked between SemaphoreWait polls and between bands of a large Blit;
    once it returns True, `Hung` is raised (bytes already written stay written).
    """
    arrays = {h: _bytes(targets[h].buf) for h in handles(cmd)}

    def view(handle: int) -> ObjView:
        t = targets[handle]
        return ObjView(size=arrays[handle].size, tiling=t.tiling, stride=t.stride, caching=CACHING_CACHED)

    if not plainly_valid(cmd, lambda handle: int(arrays[handle].size)):
        validate(cmd, view)
    match cmd:
        case Fill():
            arrays[cmd.dst][cmd.offset : cmd.offset + cmd.length].fill(cmd.byte)
        case Copy():
            # np.copyto detects overlapping memory and copies through a temporary: memmove
            src = arrays[cmd.src][cmd.src_offset : cmd.src_offset + cmd.length]
            np.copyto(arrays[cmd.dst][cmd.dst_offset : cmd.dst_offset + cmd.length], src)
        case Blit():
            _blit(cmd, arrays[cmd.src], targets[cmd.src].tiling, arrays[cmd.dst], targets[cmd.dst].tiling, cancelled)
        case SemaphoreWait():
            _semaphore_wait(arrays[cmd.obj], cmd.offset, cmd.value, cancelled, poll_interval, max_poll_interval)


def _linear_rows(arr: npt.NDArray[np.uint8], pitch: int, x0: int, y0: int, w: int, h: int) -> npt.NDArray[np.uint8]:
    """A (h, w) strided view of a linear rectangle (bounds checked by validate)."""
    start = y0 * pitch + x0
    base = arr[start : start + (h - 1) * pitch + w]
    return np.lib.stride_tricks.as_strided(base, shape=(h, w), strides=(pitch, 1), writeable=arr.flags.writeable)


def _band_rows(width: int) -> int:
    """Rows per band, so that one band's address array stays near BLIT_BAND elements."""
    return max(1, BLIT_BAND // width)


def _blit(
    cmd: Blit,
    src: npt.NDArray[np.uint8],
    src_tiling: int,
    dst: npt.NDArray[np.uint8],
    dst_tiling: int,
    cancelled: Callable[[], bool],
) -> None:
    w, h = cmd.width * cmd.cpp, cmd.height
    sx, dx = cmd.src_x * cmd.cpp, cmd.dst_x * cmd.cpp
    step = _band_rows(w)
    # Gather everything first (memmove semantics when src and dst share memory) ...
    if src_tiling == TILING_NONE:
        tmp = _linear_rows(src, cmd.src_pitch, sx, cmd.src_y, w, h).copy()
    else:
        tmp = np.empty((h, w), dtype=np.uint8)
        for r in range(0, h, step):
            n = min(step, h - r)
            tmp[r : r + n] = src[addresses(src_tiling, cmd.src_pitch, sx, cmd.src_y + r, w, n)]
            if cancelled():
                raise Hung("Blit cancelled as hung")
    # ... then scatter.
    if dst_tiling == TILING_NONE:
        _linear_rows(dst, cmd.dst_pitch, dx, cmd.dst_y, w, h)[...] = tmp
        return
    for r in range(0, h, step):
        n = min(step, h - r)
        dst[addresses(dst_tiling, cmd.dst_pitch, dx, cmd.dst_y + r, w, n)] = tmp[r : r + n]
        if cancelled():
            raise Hung("Blit cancelled as hung")


def _semaphore_wait(
    arr: npt.NDArray[np.uint8],
    offset: int,
    value: int,
    cancelled: Callable[[], bool],
    interval: float,
    max_interval: float,
) -> None:
    # One aligned 4-byte load per poll (offset is 4-aligned), as MI_SEMAPHORE_WAIT reads a dword.
    word = arr[offset : offset + 4].view("<u4")
    delay = interval
    while int(word[0]) != value:
        if cancelled():
            raise Hung(f"SemaphoreWait for {value:#x} at offset {offset} cancelled as hung")
        time.sleep(delay)
        delay = min(delay * 2, max_interval)
