"""Manager configuration: the daemon flags of SPEC §4 as one frozen dataclass.

`Config.from_kwargs(**config)` is what `ugem.Manager(**config)` and `ugem serve` both use,
so the embedded manager and the daemon accept exactly the same keys and size strings
("512M", "1G", plain ints of bytes). An unknown key or an unparsable value is EINVAL.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any

from .errors import InvalidArgument

__all__ = ["Config", "default_spill_dir", "parse_size"]

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(value: int | str, what: str = "size") -> int:
    """Parse a byte count: an int, or a string such as ``"512M"`` (K, M, G, T are binary)."""
    if isinstance(value, bool):
        raise InvalidArgument(f"{what}: expected a size, got {value!r}")
    if isinstance(value, int):
        result = value
    elif isinstance(value, str):
        text = value.strip().upper().removesuffix("IB").removesuffix("B")
        unit = text[-1:] if text[-1:] in _UNITS and text[-1:] != "" else ""
        number = text[: len(text) - len(unit)] if unit else text
        try:
            result = int(float(number) * _UNITS[unit])
        except ValueError:
            raise InvalidArgument(f"{what}: cannot parse size {value!r}") from None
    else:
        raise InvalidArgument(f"{what}: expected a size, got {value!r}")
    if result < 0:
        raise InvalidArgument(f"{what}: size must not be negative, got {value!r}")
    return result


def _physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_spill_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ugem", "spill")


@dataclass(frozen=True)
class Config:
    """Every tunable of a manager. Sizes are bytes; 0 for `client_quota` means unlimited."""

    vram: int = 1 << 30
    system_budget: int = 0  # 0: half of physical memory, resolved in __post_init__
    spill_dir: str = ""
    client_quota: int = 0
    client_max_objects: int = 65536
    pin_limit: int = 64 << 20
    hang_timeout: float = 10.0

    def __post_init__(self) -> None:
        if self.system_budget == 0:
            object.__setattr__(self, "system_budget", _physical_memory() // 2)
        if not self.spill_dir:
            object.__setattr__(self, "spill_dir", default_spill_dir())
        if self.client_max_objects <= 0:
            raise InvalidArgument(f"client_max_objects must be positive, got {self.client_max_objects}")
        if self.hang_timeout <= 0:
            raise InvalidArgument(f"hang_timeout must be positive, got {self.hang_timeout}")

    @classmethod
    def from_kwargs(cls, **config: Any) -> Config:
        known = {f.name for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in config.items():
            if key not in known:
                raise InvalidArgument(f"unknown configuration key {key!r}; known: {sorted(known)}")
            if value is None:
                continue
            if key in ("vram", "system_budget", "client_quota", "pin_limit"):
                values[key] = parse_size(value, key)
            elif key == "client_max_objects":
                values[key] = int(value)
            elif key == "hang_timeout":
                values[key] = float(value)
            else:
                values[key] = str(value)
        return cls(**values)
