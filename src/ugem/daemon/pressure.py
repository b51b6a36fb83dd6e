"""Real memory pressure: the kernel's PSI and MemAvailable (SPEC §3, "shrinks before the
machine swaps or kills").

`PressureWatch.check()` is called about once a second by the daemon loop. It returns a
resident-bytes target when the machine is under pressure (memory stall above
`stall_percent` in the last 10 s of /proc/pressure/memory, or MemAvailable below
`low_percent` of MemTotal), else None. The target asks the shrinker to give back a quarter
of what the manager holds (or the shortfall of available memory, if larger).
"""

from __future__ import annotations

__all__ = ["PressureWatch"]


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


class PressureWatch:
    def __init__(self, stall_percent: float = 10.0, low_percent: float = 5.0,
                 psi_path: str = "/proc/pressure/memory", meminfo_path: str = "/proc/meminfo") -> None:
        self.stall_percent = stall_percent
        self.low_percent = low_percent
        self.psi_path = psi_path
        self.meminfo_path = meminfo_path

    def stall(self) -> float:
        """`some avg10` of memory PSI (percent), 0.0 where PSI does not exist."""
        text = _read(self.psi_path)
        if not text:
            return 0.0
        for line in text.splitlines():
            if line.startswith("some "):
                for field in line.split()[1:]:
                    key, _, value = field.partition("=")
                    if key == "avg10":
                        return float(value)
        return 0.0

    def available(self) -> tuple[int, int]:
        """(MemAvailable, MemTotal) in bytes; (0, 0) when unknown."""
        text = _read(self.meminfo_path) or ""
        values: dict[str, int] = {}
        for line in text.splitlines():
            key, _, rest = line.partition(":")
            if key in ("MemAvailable", "MemTotal"):
                values[key] = int(rest.split()[0]) * 1024
        return values.get("MemAvailable", 0), values.get("MemTotal", 0)

    def check(self, resident: int) -> int | None:
        """A resident target when the machine is short of memory, else None."""
        if resident == 0:
            return None
        available, total = self.available()
        low = total * self.low_percent / 100
        short = total and available < low
        if not short and self.stall() < self.stall_percent:
            return None
        give_back = max(resident // 4, int(low - available) if short else 0)
        return max(0, resident - give_back)
