"""Request and reply structs of the device ops (execbuffer, busy/wait, domains, tiling,
caching, suspend); same rules as wire/structs.py, split off to keep modules small."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .commands import RECORD
from .frames import MAX_PAYLOAD
from .structs import Struct

__all__ = [
    "MAX_COMMANDS", "BusyReply", "CachingReply", "CachingReq", "ExecbufferReq", "FenceReply", "SetDomainReq",
    "TilingReply", "TilingReq", "WaitFenceReq", "WaitReply", "WaitReq",
]


@dataclass(slots=True)
class ExecbufferReq(Struct):
    """`data` is the command list: 88-byte records (wire/commands.py)."""

    LAYOUT = (("flags", "I"), ("pad", "I"))
    TAIL = "data"
    flags: int = 0
    pad: int = 0
    data: Any = b""


# the most commands one GEM_EXECBUFFER request can carry (one frame); more is E2BIG, in both modes
MAX_COMMANDS = (MAX_PAYLOAD - ExecbufferReq._codec.size) // RECORD.size


@dataclass(slots=True)
class FenceReply(Struct):
    LAYOUT = (("fence", "Q"),)
    fence: int = 0


@dataclass(slots=True)
class BusyReply(Struct):
    LAYOUT = (("busy", "I"), ("pad", "I"))
    busy: int = 0
    pad: int = 0


@dataclass(slots=True)
class WaitReq(Struct):
    LAYOUT = (("handle", "I"), ("flags", "I"), ("timeout_ns", "q"))
    handle: int = 0
    flags: int = 0
    timeout_ns: int = 0


@dataclass(slots=True)
class WaitFenceReq(Struct):
    LAYOUT = (("fence", "Q"), ("timeout_ns", "q"))
    fence: int = 0
    timeout_ns: int = 0


@dataclass(slots=True)
class WaitReply(Struct):
    LAYOUT = (("remaining_ns", "q"),)
    remaining_ns: int = 0


@dataclass(slots=True)
class SetDomainReq(Struct):
    LAYOUT = (("handle", "I"), ("read_domains", "I"), ("write_domain", "I"), ("pad", "I"))
    handle: int = 0
    read_domains: int = 0
    write_domain: int = 0
    pad: int = 0


@dataclass(slots=True)
class TilingReq(Struct):
    LAYOUT = (("handle", "I"), ("mode", "I"), ("stride", "I"), ("pad", "I"))
    handle: int = 0
    mode: int = 0
    stride: int = 0
    pad: int = 0


@dataclass(slots=True)
class TilingReply(Struct):
    LAYOUT = (("mode", "I"), ("stride", "I"))
    mode: int = 0
    stride: int = 0


@dataclass(slots=True)
class CachingReq(Struct):
    LAYOUT = (("handle", "I"), ("level", "I"))
    handle: int = 0
    level: int = 0


@dataclass(slots=True)
class CachingReply(Struct):
    LAYOUT = (("level", "I"), ("pad", "I"))
    level: int = 0
    pad: int = 0
