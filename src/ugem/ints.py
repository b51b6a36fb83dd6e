"""Integers from callers: the one integer check and the wire-range rules, shared by the
client's arguments (client/args.py), the wire's GPU command records (wire/commands.py)
and the GPU's command validation (gpu/commands.py).

- `integer(value, what)`: an `int`, or anything with `__index__` (numpy integers), as a
  Python int; a bool (Python or numpy), float, NaN, string, None or anything else is EINVAL
  "`what` must be an integer, got VALUE (TYPE)", never a TypeError from deeper down;
- values out of a wire field's range are mapped to one that fails the manager's own check
  for that field, so both modes and every daemon answer alike: `s64` saturates at the
  signed 64-bit limits (sizes, offsets, timeouts, command parameters), `handle` maps
  anything outside 1..2**32-1 to 0 (handles and names: never valid).
The fast path (a plain int) costs one type check.
"""

from __future__ import annotations

import operator
from typing import Any

from .errors import InvalidArgument

__all__ = ["S64_MAX", "S64_MIN", "U32_LIMIT", "handle", "integer", "s64"]

S64_MIN, S64_MAX = -(2**63), 2**63 - 1
U32_LIMIT = 2**32  # one past the largest u32


def integer(value: Any, what: str) -> int:
    """`value` as a Python int: an int or a numpy integer, not a bool, float or anything else."""
    if type(value) is int:
        return value
    if not isinstance(value, bool):  # numpy bools have no __index__ either
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise InvalidArgument(f"{what} must be an integer, got {value!r} ({type(value).__name__})")


def s64(value: int) -> int:
    """`value` saturated at the s64 limits."""
    return value if S64_MIN <= value <= S64_MAX else (S64_MIN if value < 0 else S64_MAX)


def handle(value: int) -> int:
    """A handle or name (u32): out of range goes as 0, which no lookup accepts."""
    return value if 0 < value < U32_LIMIT else 0
