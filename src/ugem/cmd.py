"""Device commands (SPEC §3): dataclasses taking keyword arguments, submitted with
`Device.execbuffer([...])`. Handles name objects of the submitting client.

- `Fill(dst, offset, length, byte)`: set `length` bytes at `offset` of `dst` to `byte`.
- `Copy(src, src_offset, dst, dst_offset, length)`: like memmove (ranges may overlap).
- `Blit(src, dst, src_x, src_y, dst_x, dst_y, width, height, cpp, src_pitch, dst_pitch)`:
  a 2-D copy of width x height pixels of `cpp` bytes, rows `*_pitch` bytes apart, through
  each object's tiling (a tiled object's pitch must equal its stride).
- `SemaphoreWait(obj, offset, value)`: the device waits until the little-endian u32 at
  `offset` of a CACHED (or userptr/foreign) object equals `value` (MI_SEMAPHORE_WAIT).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Blit", "Command", "Copy", "Fill", "SemaphoreWait"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Fill:
    dst: int
    offset: int
    length: int
    byte: int


@dataclass(frozen=True, kw_only=True, slots=True)
class Copy:
    src: int
    src_offset: int
    dst: int
    dst_offset: int
    length: int


@dataclass(frozen=True, kw_only=True, slots=True)
class Blit:
    src: int
    dst: int
    src_x: int
    src_y: int
    dst_x: int
    dst_y: int
    width: int
    height: int
    cpp: int
    src_pitch: int
    dst_pitch: int


@dataclass(frozen=True, kw_only=True, slots=True)
class SemaphoreWait:
    obj: int
    offset: int
    value: int


Command = Fill | Copy | Blit | SemaphoreWait
