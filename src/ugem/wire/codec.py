"""Struct: the base of every request and reply struct, and its codec (encode / decode).

Each struct lists `LAYOUT`, pairs of (field, struct code), in wire order; its codec is
compiled once, when the class is made. Fields named `pad*` must be zero and fields named
`flags` must fit the struct's `FLAGS` mask; a violation is EINVAL (an operation error, the
connection stays up), found by `check()` (one C call when all is zero, the common case).
A struct may end with a variable `TAIL` field (bytes-like: inline pread/pwrite data, JSON
for stats) and may carry fds in the fields listed in `FDS` (each an OwnedFd, sent with
SCM_RIGHTS). A struct with a TAIL declared right after its LAYOUT fields and no fds is
`_tail_last`: decoded positionally too (the fixed part unpacked, the tail after it). A
struct with neither is `_plain`: it is packed and unpacked positionally in
one call (`_codec`, `_values`), and `_framed` (the frame header of wire/frames.py, then the
fixed part) packs or unpacks a whole frame of it in one call: the transports do that inline
on their hot paths. Rules: a short payload is zero-extended, a longer one (without a TAIL)
is EINVAL; nothing here does I/O.
"""

from __future__ import annotations

import operator
import struct
from collections.abc import Callable
from typing import Any, ClassVar

from ..errors import InvalidArgument
from ..fd import OwnedFd
from .frames import HEADER

__all__ = ["Struct", "decode", "encode"]


class Struct:
    __slots__ = ()
    LAYOUT: ClassVar[tuple[tuple[str, str], ...]] = ()
    FLAGS: ClassVar[int] = 0
    TAIL: ClassVar[str | None] = None
    FDS: ClassVar[tuple[str, ...]] = ()
    _codec: ClassVar[struct.Struct]
    _framed: ClassVar[struct.Struct]  # HEADER's fields, then LAYOUT's: a frame of a plain struct
    _names: ClassVar[tuple[str, ...]]
    _pads: ClassVar[tuple[str, ...]]
    _plain: ClassVar[bool]  # no tail, no fds: decode positionally
    _tail_last: ClassVar[bool]  # fields: LAYOUT's, then TAIL; no fds: decode positionally, the tail last
    _values: ClassVar[Callable[[Any], tuple[Any, ...]]]  # the fields of LAYOUT, in order
    _checked: ClassVar[operator.attrgetter[Any] | None]  # (pads..., flags) to check, None: nothing to check
    _clean: ClassVar[Any]  # what `_checked` returns when every pad is 0 and flags is 0

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        codes = "".join(code for _, code in cls.LAYOUT)
        cls._codec = struct.Struct("<" + codes)
        cls._framed = struct.Struct(HEADER.format + codes)
        cls._names = tuple(name for name, _ in cls.LAYOUT)
        cls._pads = tuple(name for name in cls._names if name.startswith("pad"))
        cls._plain = cls.TAIL is None and not cls.FDS
        fields = tuple(cls.__dict__.get("__annotations__", ()))
        cls._tail_last = cls.TAIL is not None and not cls.FDS and fields == (*cls._names, cls.TAIL)
        names = cls._names  # attrgetter of one name returns no tuple
        cls._values = operator.attrgetter(*names) if len(names) > 1 else lambda m: tuple(getattr(m, n) for n in names)
        checked = cls._pads + (("flags",) if "flags" in names else ())
        cls._checked = operator.attrgetter(*checked) if checked else None
        cls._clean = 0 if len(checked) == 1 else (0,) * len(checked)

    def close_unclaimed(self) -> None:
        """Close request fds a handler did not take over (handlers set the field to None)."""
        for name in self.FDS:
            fd = getattr(self, name)
            if isinstance(fd, OwnedFd):
                fd.close()
                setattr(self, name, None)

    def check(self) -> None:
        """Reject nonzero padding and unknown flags with EINVAL (botching-up-ioctls)."""
        checked = self._checked
        if checked is None or checked(self) == self._clean:  # the common case: all zero, one C call
            return
        for name in self._pads:
            if (value := getattr(self, name)) != 0:
                raise InvalidArgument(f"{type(self).__name__}.{name} must be zero, got {value}")
        flags = getattr(self, "flags", 0)
        if flags & ~self.FLAGS:
            raise InvalidArgument(f"{type(self).__name__}: unknown flags {flags & ~self.FLAGS:#x}")


def encode(msg: Struct) -> tuple[list[Any], list[OwnedFd]]:
    """Return (payload pieces, fds) for a struct; pieces are bytes-like, sent in order."""
    fixed = msg._codec.pack(*type(msg)._values(msg))
    if msg._plain:
        return [fixed], []
    pieces: list[Any] = [fixed]
    if msg.TAIL is not None:
        tail = getattr(msg, msg.TAIL)
        if tail is not None and len(tail):
            pieces.append(tail)
    fds = [getattr(msg, name) for name in msg.FDS if getattr(msg, name) is not None]
    return pieces, fds


def decode(cls: type[Struct], payload: bytes, fds: list[OwnedFd]) -> Any:
    """Build a struct from a payload; EINVAL on a malformed payload. Takes over `fds`."""
    size = cls._codec.size
    if cls._plain and len(payload) == size and not fds:
        return cls(*cls._codec.unpack(payload))
    if cls._tail_last and len(payload) >= size and not fds:
        fields: tuple[Any, ...] = (*cls._codec.unpack_from(payload), payload[size:])
        return cls(*fields)
    if cls.TAIL is None and len(payload) > size:
        raise InvalidArgument(f"{cls.__name__}: {len(payload)} payload bytes, layout has {size}")
    fixed = payload[:size]
    if len(fixed) < size:
        fixed = fixed + bytes(size - len(fixed))
    values = dict(zip(cls._names, cls._codec.unpack(fixed), strict=True))
    if cls.TAIL is not None:
        values[cls.TAIL] = payload[size:]
    if len(fds) > len(cls.FDS):
        raise InvalidArgument(f"{cls.__name__}: expected at most {len(cls.FDS)} fds, got {len(fds)}")
    values.update(zip(cls.FDS, fds, strict=False))
    return cls(**values)
