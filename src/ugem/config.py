"""Manager configuration: the daemon flags of SPEC §4 as one frozen dataclass.

`Config.from_kwargs(**config)` is what `ugem.Manager(**config)` and `ugem serve` both use,
so the embedded manager and the daemon accept exactly the same keys and values. Rules:
- sizes are ints of bytes or strings such as "512M", "1.5G" (K, M, G, T are binary); every
  size must be positive and finite (0 is not "the default" and not "unlimited");
- timeouts are positive finite numbers of seconds; counts are positive whole numbers;
- the limits `client_quota`, `uid_quota` and `uid_max_clients` also take the word
  "unlimited" (held as None); a key given as None gets its default;
- a bad value raises EINVAL (InvalidArgument) naming the key (or the flag, through
  `name`), the value and what is allowed; an unknown key is EINVAL too;
- defaults that depend on others are resolved here: `system_budget` is half of physical
  memory, `uid_quota` half of `system_budget`, `spill_dir` $XDG_CACHE_HOME/ugem/spill;
- `object` (the daemon's `--object LABEL=PATH`, repeatable) is a list of "LABEL=PATH"
  strings, held as (label, absolute path) pairs: files the manager loads at start into
  read-only objects it owns (core/preload.py). A label is 1 to 255 characters with no
  whitespace and no "="; labels are unique; each file must be a readable, non-empty
  regular file now (a missing or unreadable file is bad configuration, like a bad value),
  and together the files may hold at most `system_budget` bytes of data (preloaded objects
  are never spilled).
The per-uid limits apply to uids other than root and the daemon's own (those are never
limited by them; the core decides who is privileged).
"""

from __future__ import annotations

import math
import os
import re
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .constants import MAX_OBJECT_SIZE
from .errors import InvalidArgument

__all__ = ["UNLIMITED", "BadSetting", "Config", "default_spill_dir", "parse_count", "parse_seconds", "parse_size"]

UNLIMITED = "unlimited"  # how a limit is switched off (flag value or keyword value)
MAX_SIZE = (1 << 63) - 1  # sizes travel as signed 64-bit fields
_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_TEXT = "a positive size in bytes, optionally with a K, M, G or T suffix (e.g. 512M)"


class BadSetting(InvalidArgument):
    """EINVAL: a setting that parses but cannot be used (a spill directory that cannot be
    created, a socket path that cannot be bound); `describe(name)` names it as `name` does."""

    def __init__(self, key: str, value: object, problem: str) -> None:
        super().__init__(f"{key}: {value!r} {problem}")
        self.key, self.value, self.problem = key, value, problem

    def describe(self, name: Callable[[str], str] = str) -> str:
        return f"{name(self.key)}: {self.value!r} {self.problem}"


def _bad(name: str, value: object, allowed: str) -> InvalidArgument:
    return InvalidArgument(f"{name}: {value!r} is not {allowed}")


def parse_size(value: object, name: str = "size", maximum: int = MAX_SIZE) -> int:
    """A positive byte count from an int or a string such as ``"512M"`` (binary units)."""
    allowed = _SIZE_TEXT if maximum == MAX_SIZE else f"{_SIZE_TEXT}, at most {maximum >> 40}T"
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise _bad(name, value, allowed)
    result = value if isinstance(value, int) else _size_from_text(value)
    if result is None or not 0 < result <= maximum:
        raise _bad(name, value, allowed)
    return result


def _size_from_text(value: str) -> int | None:
    text = value.strip().upper().removesuffix("IB").removesuffix("B")
    scale = _UNITS.get(text[-1:], 1)
    number = text[:-1] if scale > 1 else text
    if number.isdigit():
        return int(number) * scale  # exact for whole numbers of any length
    try:
        scaled = float(number) * scale
    except ValueError:
        return None
    return int(scaled) if math.isfinite(scaled) else None


def parse_count(value: object, name: str = "count") -> int:
    """A positive whole number from an int or a string of digits."""
    allowed = "a positive whole number"
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise _bad(name, value, allowed)
    try:
        result = int(value)
    except ValueError:
        raise _bad(name, value, allowed) from None
    if result <= 0:
        raise _bad(name, value, allowed)
    return result


def parse_seconds(value: object, name: str = "timeout") -> float:
    """A positive finite number of seconds from a number or a string."""
    allowed = "a positive finite number of seconds"
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise _bad(name, value, allowed)
    try:
        result = float(value)
    except (ValueError, OverflowError):
        raise _bad(name, value, allowed) from None
    if not (math.isfinite(result) and result > 0):
        raise _bad(name, value, allowed)
    return result


def _limit(parse: Callable[[object, str], int]) -> Callable[[object, str], int | None]:
    """`parse`, or None for the word "unlimited"."""
    def parse_limit(value: object, name: str) -> int | None:
        if isinstance(value, str) and value.strip().lower() == UNLIMITED:
            return None
        try:
            return parse(value, name)
        except InvalidArgument as exc:
            raise InvalidArgument(f"{exc.strerror} or {UNLIMITED!r}") from None
    return parse_limit


_LABEL = re.compile(r"[^\s=]{1,255}")


def _objects(value: object, name: str) -> tuple[tuple[str, str], ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(item, str) for item in items):
        raise _bad(name, value, "a list of LABEL=PATH strings")
    result: dict[str, str] = {}
    for item in items:
        label, _, path = item.partition("=")
        if not _LABEL.fullmatch(label) or not path:
            raise _bad(name, item, "LABEL=PATH with a label of 1 to 255 characters, no whitespace or '='")
        if label in result:
            raise _bad(name, item, f"a new label: {label!r} is given twice")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise _bad(name, item, f"a readable file ({exc.strerror})") from None
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
            raise _bad(name, item, "a non-empty regular file")
        result[label] = os.path.abspath(path)
    return tuple(result.items())


def _spill_dir(value: object, name: str) -> str:
    path = os.fspath(value) if isinstance(value, str | os.PathLike) else None
    if not isinstance(path, str) or not path:
        raise _bad(name, value, "a directory path")
    if os.path.exists(path) and not os.path.isdir(path):
        raise _bad(name, value, "a directory (it exists and is not one)")
    return path


_PARSERS: dict[str, Callable[[object, str], Any]] = {
    "vram": lambda v, n: parse_size(v, n, MAX_OBJECT_SIZE),  # 64T: one mapping of device memory
    "system_budget": parse_size,
    "spill_dir": _spill_dir,
    "client_quota": _limit(parse_size),
    "client_max_objects": parse_count,
    "pin_limit": parse_size,
    "hang_timeout": parse_seconds,
    "uid_quota": _limit(parse_size),
    "uid_max_clients": _limit(parse_count),
    "object": _objects,
}


def _physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_spill_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ugem", "spill")


@dataclass(frozen=True)
class Config:
    """Every tunable of a manager, resolved. Sizes are bytes; None for a limit: unlimited.
    Build one with `from_kwargs` or `parse`, which validate every value."""

    system_budget: int
    spill_dir: str
    uid_quota: int | None  # bytes created plus bytes pinned by one (unprivileged) uid's clients
    vram: int = 1 << 30
    client_quota: int | None = None
    client_max_objects: int = 65536
    pin_limit: int = 64 << 20
    hang_timeout: float = 10.0
    uid_max_clients: int | None = 256  # connections of one (unprivileged) uid
    object: tuple[tuple[str, str], ...] = ()  # (label, path) of the files preloaded at start

    @classmethod
    def from_kwargs(cls, **config: Any) -> Config:
        return cls.parse(config)

    @classmethod
    def parse(cls, config: Mapping[str, Any], name: Callable[[str], str] = str) -> Config:
        """Validate `config` (key -> value; None: the default); `name(key)` is how errors
        call the key (`ugem serve` passes its flags' names)."""
        values: dict[str, Any] = {}
        for key, value in config.items():
            if key not in _PARSERS:
                raise InvalidArgument(f"unknown configuration key {key!r}; known: {sorted(_PARSERS)}")
            if value is not None:
                values[key] = _PARSERS[key](value, name(key))
        values.setdefault("system_budget", _physical_memory() // 2)
        values.setdefault("spill_dir", default_spill_dir())
        values.setdefault("uid_quota", values["system_budget"] // 2)
        data = sum(os.stat(path).st_blocks * 512 for _, path in values.get("object", ()))
        if data > values["system_budget"]:  # they can never be spilled: the rest would have no room
            items = [f"{label}={path}" for label, path in values["object"]]
            raise InvalidArgument(f"{name('object')}: {items!r} hold {data} bytes of data; at most the system "
                                  f"budget of {values['system_budget']} bytes is allowed (they are never spilled)")
        return cls(**values)
