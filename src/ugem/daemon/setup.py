"""Setting the daemon up: device memory, spill storage, preloaded objects, the fd limit.

Rules: each step that fails is BadSetting naming its key (`vram`, `spill_dir`, `object`),
with every earlier step undone, so bad configuration leaves nothing behind (SPEC §4); the
preloaded objects' copies are planned here and started by the Server (they run in the
background, core/preload.py).
"""

from __future__ import annotations

import os
import resource

from ..backing.memfd import MemfdStore
from ..config import BadSetting, Config
from ..core.core import Core
from ..gpu.sim import SimGpu

__all__ = ["open_core", "raise_fd_limit"]


def _open_gpu_and_store(config: Config) -> tuple[SimGpu, MemfdStore]:
    """Device memory, then the spill directory: BadSetting naming the one that failed,
    with the other undone."""
    try:
        gpu = SimGpu(config.vram, config.hang_timeout)
    except (OSError, OverflowError) as exc:
        raise BadSetting("vram", config.vram, f"bytes of device memory cannot be mapped: {exc}") from None
    try:
        return gpu, MemfdStore(config.spill_dir)
    except OSError as exc:
        gpu.close()
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


def open_core(config: Config) -> tuple[SimGpu, Core]:
    """The device and the core with its preloaded objects created (their copies planned in
    `core.memory.background`); BadSetting naming what failed, all of it undone."""
    gpu, backing = _open_gpu_and_store(config)
    core = Core(config, backing, gpu)
    try:
        core.preloads.start(config.object, os.getpid(), os.getuid())
    except OSError as exc:
        core.preloads.cancel()  # the copies planned so far end at once, closing their fds
        for job in core.memory.take_background():
            job.run()
            core.memory.finish(job)
        core.preloads.release()
        gpu.close()
        backing.close()
        raise BadSetting("object", exc.filename or "", f"cannot be read: {exc.strerror or exc}") from None
    return gpu, core
