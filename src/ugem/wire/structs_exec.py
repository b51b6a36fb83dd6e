"""Request and reply structs of the GPU timeline ops (execbuffer, busy/wait, wait_fence);
same rules as wire/structs.py. Suspend and resume carry no payload (structs.Empty)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .commands import RECORD
from .frames import MAX_PAYLOAD
from .structs import Struct

__all__ = ["MAX_COMMANDS", "BusyReply", "ExecbufferReq", "FenceReply", "WaitFenceReq", "WaitReply", "WaitReq"]


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
