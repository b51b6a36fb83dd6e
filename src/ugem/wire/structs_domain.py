"""Request and reply structs of the ops that set how the CPU and the GPU see an object
(set_domain, tiling, caching); same rules as wire/structs.py."""

from __future__ import annotations

from dataclasses import dataclass

from .structs import Struct

__all__ = ["CachingReply", "CachingReq", "SetDomainReq", "TilingReply", "TilingReq"]


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
