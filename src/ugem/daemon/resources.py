"""What the daemon sets up before it serves: its fd limit, device memory and spill directory.

Rules: each failure is bad configuration (BadSetting naming the key and the value), with
whatever was made before it undone, so a daemon that refuses to start leaves nothing
behind (the CLI binds the socket first, and closes it if these fail).
"""

from __future__ import annotations

import resource

from ..backing.memfd import MemfdStore
from ..config import BadSetting, Config
from ..device.sim import SimDevice

__all__ = ["open_device_and_store", "raise_fd_limit"]


def open_device_and_store(config: Config) -> tuple[SimDevice, MemfdStore]:
    """Device memory, then the spill directory: BadSetting naming the one that failed,
    with the other undone."""
    try:
        device = SimDevice(config.vram, config.hang_timeout)
    except (OSError, OverflowError) as exc:
        raise BadSetting("vram", config.vram, f"bytes of device memory cannot be mapped: {exc}") from None
    try:
        return device, MemfdStore(config.spill_dir)
    except OSError as exc:
        device.close()
        detail = exc.strerror or str(exc)
        if exc.filename and exc.filename != config.spill_dir:
            detail += f": {exc.filename}"
        raise BadSetting("spill_dir", config.spill_dir, f"cannot be used: {detail}") from None


def raise_fd_limit() -> int:
    """Raise the fd soft limit to the hard limit (SPEC §4); returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard

