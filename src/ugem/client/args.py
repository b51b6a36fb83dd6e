"""Arguments of the public client API, checked and put in wire form (every failure of a
ugem call is a UgemError with its errno).

Rules:
- an integer argument is an `int` or anything with `__index__` (numpy integers); a bool,
  float, NaN, string or None is EINVAL naming the argument and the value, never a
  struct.error, TypeError or ValueError from deeper down (`ugem.ints.integer`);
- values in range go on the wire as given; values out of the wire field's range are
  mapped to one that fails the manager's own check for that field, with the same errno as
  any other bad value there (`ident`: a handle or name outside 1..2**32-1 goes as 0, never
  valid; `i64`: sizes, offsets and timeouts saturate at the s64 limits, both as in
  ugem/ints.py; `u32`: enums go as 2**32-1; `u64`: fences outside it go as 0), so both
  modes and every daemon answer alike;
- flags (`writable`, `readonly`) take anything with a truth value.
The fast path (a plain int in range) costs one type check per argument.
"""

from __future__ import annotations

from typing import Any

from .. import ints
from ..errors import InvalidArgument

__all__ = ["flag", "i64", "ident", "index", "u32", "u64"]

_U32 = ints.U32_LIMIT
index = ints.integer


def ident(value: Any, what: str = "handle") -> int:
    """A handle or name (u32): out of range goes as 0, which the manager rejects as unknown."""
    if type(value) is not int:
        value = index(value, what)
    return value if 0 < value < _U32 else 0  # ints.handle, without a call


def i64(value: Any, what: str) -> int:
    """A size, offset or timeout (s64), saturated at the s64 limits."""
    if type(value) is not int:
        value = index(value, what)
    return ints.s64(value)


def u32(value: Any, what: str) -> int:
    """A small enum value (u32); out of range goes as 2**32-1, which no check accepts."""
    if type(value) is not int:
        value = index(value, what)
    return value if 0 <= value < _U32 else _U32 - 1


def u64(value: Any, what: str) -> int:
    """A fence (u64): out of range goes as 0, never issued."""
    if type(value) is not int:
        value = index(value, what)
    return value if 0 <= value < 2**64 else 0


def flag(value: Any, what: str) -> bool:
    if value is True or value is False:
        return value
    try:
        return bool(value)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"{what} must be true or false, got {value!r}: {exc}") from None
