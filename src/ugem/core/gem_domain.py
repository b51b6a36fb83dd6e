"""Request handlers for how the CPU and the GPU see an object: domains, tiling, caching.

Same rules as gem.py and gem_exec.py: one signature ``handler(core, client, req) -> reply``,
checks in the kernel's order, work done through library code (core/gpu.py). set_domain
hands an object over between the CPU and the GPU (it may wait, raising Pending, and is
re-run from the start); tiling and caching only set attributes the GPU's commands and
placement read.
"""

from __future__ import annotations

from ..constants import (
    CACHING_CACHED,
    CACHING_DISPLAY,
    CACHING_NONE,
    DOMAIN_CPU,
    DOMAIN_DEVICE,
    TILING_NONE,
    TILING_X,
    TILING_Y,
)
from ..errors import Busy, InvalidArgument, NoSuchDeviceOrAddress
from ..gpu import commands
from ..wire import structs as s
from ..wire import structs_domain as sd
from .client import Client
from .core import Core
from .gem_exec import check_fits
from .jobs import Pending
from .object import Kind
from .states import Placement

__all__ = ["gem_get_caching", "gem_get_tiling", "gem_set_caching", "gem_set_domain", "gem_set_tiling"]

_MAX_STRIDE = 256 << 10


def gem_set_domain(core: Core, client: Client, req: sd.SetDomainReq) -> s.Empty:
    read, write = req.read_domains, req.write_domain
    if (read | write) & ~(DOMAIN_CPU | DOMAIN_DEVICE) or read == DOMAIN_CPU | DOMAIN_DEVICE:
        raise InvalidArgument(f"bad domains read={read:#x} write={write:#x}")
    if write and write != read:
        raise InvalidArgument(f"write domain {write:#x} must equal the read domain {read:#x}")
    if read == 0:
        return s.Empty()
    obj = core.lookup(client, req.handle)
    if obj.kind == Kind.FOREIGN:
        raise NoSuchDeviceOrAddress(f"handle {req.handle} is foreign memory")
    core.check_pages(obj)
    core.memory.ensure_system(obj)
    if read == DOMAIN_CPU:
        core.gpu.to_cpu(obj, write=bool(write))
        return s.Empty()
    if core.gpu.suspended:
        if core.hold_while_suspended:
            raise Pending(resume=True)
        raise Busy("the device is suspended")
    check_fits(core, [obj])
    core.gpu.make_resident([obj])
    core.gpu.wait_for(obj.write_fence)  # returns once the device's copy is taken
    return s.Empty()


def gem_set_tiling(core: Core, client: Client, req: sd.TilingReq) -> sd.TilingReply:
    obj = core.lookup(client, req.handle)
    if obj.proxy:
        raise NoSuchDeviceOrAddress(f"handle {req.handle} is {obj.kind.name.lower()} memory: no tiling")
    if req.mode not in (TILING_NONE, TILING_X, TILING_Y):
        raise InvalidArgument(f"tiling mode must be NONE, X or Y (0, 1, 2), got {req.mode}")
    stride = 0
    if req.mode != TILING_NONE:
        width = commands.TILE_WIDTH[req.mode]
        if req.stride == 0 or req.stride % width or req.stride > _MAX_STRIDE:
            raise InvalidArgument(f"stride {req.stride} must be a nonzero multiple of {width} up to {_MAX_STRIDE}")
        stride = req.stride
    obj.tiling, obj.stride = req.mode, stride
    return sd.TilingReply(mode=obj.tiling, stride=obj.stride)


def gem_get_tiling(core: Core, client: Client, req: s.HandleReq) -> sd.TilingReply:
    obj = core.lookup(client, req.handle)
    return sd.TilingReply(mode=obj.tiling, stride=obj.stride)


def gem_set_caching(core: Core, client: Client, req: sd.CachingReq) -> s.Empty:
    if req.level not in (CACHING_NONE, CACHING_CACHED, CACHING_DISPLAY):
        raise InvalidArgument(f"caching level must be NONE, CACHED or DISPLAY (0, 1, 2), got {req.level}")
    obj = core.lookup(client, req.handle)
    if obj.proxy:
        if req.level != CACHING_CACHED:
            raise NoSuchDeviceOrAddress(f"handle {req.handle} is {obj.kind.name.lower()} memory: only CACHED")
        return s.Empty()
    if req.level == CACHING_CACHED and obj.placement == Placement.VRAM:
        core.gpu.to_cpu(obj, write=True)  # snooped objects live in system memory
    obj.caching = req.level
    return s.Empty()


def gem_get_caching(core: Core, client: Client, req: s.HandleReq) -> sd.CachingReply:
    obj = core.lookup(client, req.handle)
    return sd.CachingReply(level=CACHING_CACHED if obj.proxy else obj.caching)
