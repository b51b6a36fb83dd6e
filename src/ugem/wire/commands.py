"""Device command lists on the wire: fixed 88-byte little-endian records.

    offset  size  field
    0       4     type     1 Fill, 2 Copy, 3 Blit, 4 SemaphoreWait
    4       4     pad      must be zero
    8       4     h1       Fill.dst, Copy.src, Blit.src, SemaphoreWait.obj
    12      4     h2       Copy.dst, Blit.dst (else zero)
    16      72    p[0..8]  nine signed 64-bit parameters, in the order of the dataclass
                           fields after the handles; unused ones must be zero

Both transports carry execbuffer commands in this form (the embedded Device encodes them
too), so both modes decode and reject exactly the same lists. Fields must be integers (int
or numpy integers; a bool, float or anything else is EINVAL naming the command and the
field, `ugem.ints.integer`); out-of-range values on the client side saturate (handles -> 0,
ints -> the s64 limits, as ugem/ints.py does for every argument) so that they fail the
manager's checks rather than the encoder.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

from .. import ints
from ..cmd import Blit, Command, Copy, Fill, SemaphoreWait
from ..errors import InvalidArgument

__all__ = ["RECORD", "decode_commands", "encode_commands"]

RECORD = struct.Struct("<IIII9q")
_pack = RECORD.pack
_TYPES: dict[type, int] = {Fill: 1, Copy: 2, Blit: 3, SemaphoreWait: 4}
# per type: (handle fields, int fields)
_FIELDS: dict[type, tuple[tuple[str, ...], tuple[str, ...]]] = {
    Fill: (("dst",), ("offset", "length", "byte")),
    Copy: (("src", "dst"), ("src_offset", "dst_offset", "length")),
    Blit: (("src", "dst"), ("src_x", "src_y", "dst_x", "dst_y", "width", "height", "cpp", "src_pitch",
                            "dst_pitch")),
    SemaphoreWait: (("obj",), ("offset", "value")),
}


def _int(cmd: Command, name: str, index: int) -> int:
    value: Any = getattr(cmd, name)
    return value if type(value) is int else ints.integer(value, f"command {index} ({type(cmd).__name__}): {name}")


def encode_commands(commands: Sequence[Command]) -> bytes:
    out = bytearray()
    for index, cmd in enumerate(commands):
        if type(cmd) is Fill:  # the common case, when no field needs converting or saturating
            dst, offset, length, byte = cmd.dst, cmd.offset, cmd.length, cmd.byte
            if (type(dst) is int and type(offset) is int and type(length) is int and type(byte) is int
                    and 0 < dst < ints.U32_LIMIT and ints.S64_MIN <= offset <= ints.S64_MAX
                    and ints.S64_MIN <= length <= ints.S64_MAX and ints.S64_MIN <= byte <= ints.S64_MAX):
                out += _pack(1, 0, dst, 0, offset, length, byte, 0, 0, 0, 0, 0, 0)
                continue
        code = _TYPES.get(type(cmd))
        if code is None:
            raise InvalidArgument(f"command {index}: not a device command: {cmd!r}")
        handles, params = _FIELDS[type(cmd)]
        hs = [ints.handle(_int(cmd, name, index)) for name in handles] + [0] * (2 - len(handles))
        ps = [ints.s64(_int(cmd, name, index)) for name in params] + [0] * (9 - len(params))
        out += RECORD.pack(code, 0, *hs, *ps)
    return bytes(out)


# per type code: (class, every field name in record order: handles then ints, handle count)
_LAYOUTS = {code: (cls, _FIELDS[cls][0] + _FIELDS[cls][1], len(_FIELDS[cls][0])) for cls, code in _TYPES.items()}


_UNUSED_BY_FILL = (0,) * 6  # a Fill record's fields past `byte` (one tuple compare, not a generator)


def decode_commands(data: bytes) -> list[Command]:
    """Records back to commands; EINVAL for a torn record, unknown type or nonzero padding."""
    if len(data) % RECORD.size:
        raise InvalidArgument(f"command list of {len(data)} bytes is not a whole number of "
                              f"{RECORD.size}-byte records")
    commands: list[Command] = []
    for index, record in enumerate(RECORD.iter_unpack(data)):
        if record[0] == 1 and not (record[1] or record[3]) and record[7:] == _UNUSED_BY_FILL:  # a Fill: the common case
            commands.append(Fill(dst=record[2], offset=record[4], length=record[5], byte=record[6]))
            continue
        layout = _LAYOUTS.get(record[0])
        if layout is None:
            raise InvalidArgument(f"command {index}: unknown command type {record[0]}")
        cls, names, nhandles = layout
        # the used fields: the handles (h1, h2 from record[2]), then the ints (p0.. from record[4])
        values = record[2:2 + nhandles] + record[4:4 + len(names) - nhandles]
        if record[1] or (nhandles == 1 and record[3]) or any(record[4 + len(names) - nhandles:]):
            raise InvalidArgument(f"command {index}: nonzero padding or unused fields")
        commands.append(cls(**dict(zip(names, values, strict=True))))
    return commands
